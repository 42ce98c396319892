//! Prometheus `/metrics` of both binaries on a running stack: every body is
//! accepted by `promtool check metrics` (installed by deploy/test-deps.sh),
//! and the counters move as files flow — transfers, bytes, announcements,
//! polls and discovery on the coordinator; transfers, bytes, capacity and
//! polls on the agent.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_tests::{AgentOptions, eventually, free_port};

use crate::flow::flow_with;
use crate::health::get;
use crate::stack::WAIT;

/// The body of `/metrics` on `addr` (200 required), once the process listens.
pub(crate) async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = eventually(&format!("/metrics on {addr} answering"), WAIT, || {
        get(addr, "/metrics")
    })
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Runs `promtool check metrics` on `body`; panics with its complaints.
fn promtool_accepts(what: &str, body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (deploy/test-deps.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool rejects the {what} metrics:\n{}{}\n--- body ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// The sum of every sample of `series` (a metric name, optionally followed by
/// a `{` and leading labels that must match), 0 if there is none.
pub(crate) fn sum(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| {
            if series.contains('{') {
                s.starts_with(series.trim_end_matches('}'))
            } else {
                *s == series || s.starts_with(&format!("{series}{{"))
            }
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn both_binaries_export_valid_metrics_that_follow_the_files() {
    let coord_http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent_http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut f = flow_with(&[("FERRY_HTTP_LISTEN", &coord_http.to_string())]).await;
    let id = f.s.add_server(f.s.server_req("metered")).await;
    f.watch(id, "in", "keep").await;
    let mut env = f.s3.env();
    env.push(("FERRY_HTTP_LISTEN".into(), agent_http.to_string()));
    let _agent =
        f.s.agent_with(
            "m1",
            AgentOptions {
                capacity: 3,
                env,
                ..Default::default()
            },
        )
        .await;

    // Before any file: valid, declared, at zero.
    let before = scrape(agent_http).await;
    promtool_accepts("agent (idle)", &before);
    assert_eq!(sum(&before, "ferry_agent_transfer_capacity"), 3.0);
    assert_eq!(
        sum(
            &before,
            "ferry_agent_transfers_total{outcome=\"succeeded\"}"
        ),
        0.0
    );
    let before = scrape(coord_http).await;
    promtool_accepts("coordinator (idle)", &before);
    assert_eq!(sum(&before, "ferry_transfers_succeeded_total"), 0.0);

    let sizes = [0usize, 1, 4096, 70_000, 1 << 20];
    for (i, size) in sizes.iter().enumerate() {
        let bytes: Vec<u8> = (0..*size).map(|b| (b * 31 + i) as u8).collect();
        f.s.sshd.write_file(&format!("in/f{i}.bin"), &bytes);
    }
    let n = sizes.len();
    let total: usize = sizes.iter().sum();
    f.wait_status(n, "processed", Duration::from_secs(120))
        .await;
    assert_eq!(f.messages(n).await.len(), n);

    let coord = scrape(coord_http).await;
    promtool_accepts("coordinator", &coord);
    let server = "{server=\"metered\"}";
    assert_eq!(
        sum(
            &coord,
            "ferry_files{server=\"metered\",status=\"processed\"}"
        ),
        n as f64,
        "{coord}"
    );
    assert_eq!(
        sum(&coord, "ferry_transfers_succeeded_total{site=\"default\"}"),
        n as f64,
        "{coord}"
    );
    assert_eq!(sum(&coord, "ferry_transfers_failed_total"), 0.0, "{coord}");
    assert!(sum(&coord, "ferry_transfers_started_total{site=\"default\"}") >= n as f64);
    assert_eq!(
        sum(&coord, "ferry_transferred_bytes_total{site=\"default\"}"),
        total as f64,
        "{coord}"
    );
    assert_eq!(
        sum(
            &coord,
            "ferry_transfer_duration_seconds_count{site=\"default\"}"
        ),
        n as f64,
        "{coord}"
    );
    assert!(
        sum(&coord, "ferry_announcements_total{outcome=\"published\"}") >= n as f64,
        "{coord}"
    );
    assert_eq!(sum(&coord, "ferry_broker_connected"), 1.0, "{coord}");
    assert_eq!(
        sum(&coord, &format!("ferry_discovered_files_total{server}")),
        n as f64,
        "{coord}"
    );
    assert!(sum(&coord, &format!("ferry_discovery_batches_total{server}")) >= 1.0);
    assert!(sum(&coord, &format!("ferry_discovery_entries_total{server}")) >= n as f64);
    assert!(
        sum(
            &coord,
            &format!("ferry_poll_duration_seconds_count{server}")
        ) >= 1.0
    );
    assert_eq!(
        sum(&coord, &format!("ferry_poll_errors_total{server}")),
        0.0
    );
    assert_eq!(sum(&coord, "ferry_lease_expiries_total"), 0.0);
    assert_eq!(sum(&coord, "ferry_agents_connected"), 1.0);
    assert_eq!(sum(&coord, "ferry_agents_transfer_capacity"), 3.0);

    // The agent's own view, once its transfer tasks have wound down.
    let agent = eventually("agent transfers no longer in flight", WAIT, || async {
        let text = scrape(agent_http).await;
        (sum(&text, "ferry_agent_transfers_in_flight") == 0.0).then_some(text)
    })
    .await;
    promtool_accepts("agent", &agent);
    assert_eq!(
        sum(&agent, "ferry_agent_transfers_total{outcome=\"succeeded\"}"),
        n as f64,
        "{agent}"
    );
    assert_eq!(
        sum(&agent, "ferry_agent_transfers_total"),
        n as f64,
        "{agent}"
    );
    assert_eq!(
        sum(&agent, "ferry_agent_transferred_bytes_total"),
        total as f64
    );
    assert_eq!(
        sum(
            &agent,
            "ferry_agent_transfer_duration_seconds_count{result=\"succeeded\"}"
        ),
        n as f64
    );
    assert!(
        sum(
            &agent,
            &format!("ferry_agent_poll_duration_seconds_count{server}")
        ) >= 1.0
    );
    assert_eq!(
        sum(&agent, &format!("ferry_agent_poll_errors_total{server}")),
        0.0
    );
    // The poller keeps its SFTP session between polls.
    assert!(
        sum(&agent, "ferry_agent_sftp_sessions_open") >= 1.0,
        "{agent}"
    );
}
