//! A partner's SFTP server cannot take an agent down: against a scripted
//! server that lies ([`LyingSftp`]), a file claiming a size no object store
//! takes fails alone before anything is read, an endless `READDIR` or a
//! bottomless tree fails the poll with a clear error while the agent's memory
//! stays bounded, and the server's other files still flow.

use ferry_proto as proto;
use ferry_tests::{Agent, LyingSftp, eventually};

use crate::flow::{BUCKET, Flow, flow, post_action_of, sha256_hex};
use crate::stack::WAIT;

/// 2^60 bytes: what the lying server claims for one file.
const HUGE: u64 = 1 << 60;

async fn watch(f: &mut Flow, server_id: i64, dir: &str, recursive: bool) -> i64 {
    f.s.admin
        .add_watch(proto::AddWatchRequest {
            server_id,
            directory: dir.into(),
            glob: "*".into(),
            recursive,
            poll_interval_secs: 1,
            bucket: BUCKET.into(),
            key_template: "{server}/{dir}/{version}/{name}".into(),
            post_action: Some(post_action_of("keep")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

/// (status, attempts, last_error) of the one file row whose path ends in `/name`.
async fn row(f: &Flow, name: &str) -> Option<(String, i32, Option<String>)> {
    sqlx::query_as("SELECT status, attempts, last_error FROM files WHERE path LIKE '%/' || $1")
        .bind(name)
        .fetch_optional(f.s.db.pool())
        .await
        .unwrap()
}

/// The agent process is still running (it did not abort: an exited child
/// not yet reaped is a zombie).
fn alive(agent: &Agent) -> bool {
    let Some(pid) = agent.pid() else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .is_some_and(|state| !state.trim_start().starts_with(['Z', 'X']))
    })
}

/// Resident memory of the agent in KiB, from `/proc/<pid>/status`.
fn rss_kib(agent: &Agent) -> u64 {
    let pid = agent.pid().expect("agent pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("the agent is gone ({e}); log:\n{}", agent.log_tail(40)));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

#[tokio::test]
async fn a_file_claiming_an_impossible_size_fails_alone_before_it_is_read() {
    let mut f = flow().await;
    let bodies: [(&str, Vec<u8>); 3] = [
        ("a.csv", b"alpha,1\n".to_vec()),
        (
            "b.csv",
            (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect(),
        ),
        ("c.csv", b"gamma,3\n".repeat(1000)),
    ];
    let mut builder = LyingSftp::builder()
        .claiming_size("/in/huge.bin", b"not that big".to_vec(), HUGE)
        .vanishing("/in/ghost.csv", b"gone when opened".to_vec());
    for (name, body) in &bodies {
        builder = builder.file(&format!("/in/{name}"), body.clone());
    }
    let sftp = builder.start().await;
    let server = f.s.add_server(sftp.add_server_request("partner")).await;
    watch(&mut f, server, "/in", false).await;
    let agent = f.s.agent_with("a1", f.agent_opts(4)).await;

    let (status, attempts, error) = eventually("huge.bin ends failed", WAIT, || async {
        assert!(
            alive(&agent),
            "the agent died; huge.bin is {:?}; log:\n{}",
            row(&f, "huge.bin").await,
            agent.log_tail(30)
        );
        row(&f, "huge.bin").await.filter(|(s, ..)| s == "failed")
    })
    .await;
    let error = error.unwrap_or_default();
    eprintln!("huge.bin failed: {error}");
    assert_eq!(status, "failed");
    assert_eq!(attempts, 1, "a permanent failure: {error}");
    assert!(error.contains(&HUGE.to_string()), "{error}");
    assert!(error.contains("5 TiB"), "names the store's limit: {error}");
    assert_eq!(
        sftp.counts("/in/huge.bin").reads,
        0,
        "nothing of the huge file was read"
    );

    // The other files flowed, their bytes as the server holds them.
    f.wait_status(3, "processed", WAIT).await;
    for (name, body) in &bodies {
        assert_eq!(
            row(&f, name).await.map(|r| r.0).as_deref(),
            Some("processed")
        );
        assert_eq!(
            sha256_hex(&f.stored(name).await),
            sha256_hex(body),
            "{name}"
        );
    }
    // Listed, then gone when opened: lost, not retried forever.
    let ghost = eventually("ghost.csv ends lost", WAIT, || async {
        row(&f, "ghost.csv").await.filter(|(s, ..)| s == "lost")
    })
    .await;
    assert!(
        ghost.2.unwrap_or_default().contains("vanished"),
        "ghost.csv"
    );
    assert!(alive(&agent), "log:\n{}", agent.log_tail(30));
}

#[tokio::test]
async fn an_endless_or_bottomless_listing_fails_the_poll_in_bounded_memory() {
    let mut f = flow().await;
    let long_name = format!("{}.csv", "n".repeat(2000));
    let sftp = LyingSftp::builder()
        .endless_dir("/endless")
        .deep_tree("/deep")
        .file("/in/a.csv", b"first".to_vec())
        .file("/in/b.csv", b"second".to_vec())
        .file(&format!("/in/{long_name}"), b"long".to_vec())
        .start()
        .await;
    let server = f.s.add_server(sftp.add_server_request("partner")).await;
    // Listed before the healthy watch, so a listing that never ends would
    // hold it back.
    let endless = watch(&mut f, server, "/endless", false).await;
    let deep = watch(&mut f, server, "/deep", true).await;
    watch(&mut f, server, "/in", false).await;
    let mut opts = f.agent_opts(2);
    opts.env
        .push(("FERRY_MAX_LISTING_ENTRIES".into(), "20000".into()));
    let agent = f.s.agent_with("a1", opts).await;

    // The poll fails with an error naming each bound and its watch.
    let ctl = f.s.coord.ctl(&f.s.pki.admin("alice"));
    let error = eventually("a poll error on the server", WAIT, || async {
        assert!(
            alive(&agent),
            "the agent died; log:\n{}",
            agent.log_tail(30)
        );
        let servers = ctl.json(&["--json", "servers", "list"]).await;
        servers
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["id"] == server)
            .and_then(|s| s["health"]["last_error"].as_str().map(str::to_owned))
            .filter(|e| e.contains("/endless") && e.contains("deeper"))
    })
    .await;
    eprintln!("poll error: {error}");
    assert!(
        error.contains(&format!("watch {endless}")) && error.contains("more than 20000"),
        "{error}"
    );
    assert!(error.contains(&format!("watch {deep}")), "{error}");
    assert!(error.contains("deeper than 64 levels"), "{error}");
    assert!(
        error.contains("name is 2004 bytes, over the limit of 1024"),
        "{error}"
    );

    // The healthy files flow meanwhile; the over-long name is not ingested.
    f.wait_status(2, "processed", WAIT).await;
    assert_eq!(sha256_hex(&f.stored("a.csv").await), sha256_hex(b"first"));
    assert_eq!(sha256_hex(&f.stored("b.csv").await), sha256_hex(b"second"));
    let rows = f.s.files().await;
    assert!(
        rows.iter()
            .all(|(p, ..)| p.starts_with("/in/") && !p.contains(&long_name)),
        "only the healthy files are rows: {:?}",
        rows.iter()
            .map(|r| &r.0[..r.0.len().min(40)])
            .collect::<Vec<_>>()
    );

    // Poll after poll, the memory stays where it was.
    let readdirs = sftp.readdirs();
    let first = rss_kib(&agent);
    f.s.wait_polls(server, 5).await;
    let later = rss_kib(&agent);
    eprintln!(
        "agent RSS {first} KiB, {later} KiB after 5 more polls; {} READDIRs served",
        sftp.readdirs() - readdirs
    );
    assert!(
        sftp.readdirs() > readdirs + 4 * 200,
        "the endless directory was listed again each poll"
    );
    assert!(alive(&agent), "log:\n{}", agent.log_tail(30));
    assert!(
        later < 200 * 1024,
        "the agent holds {later} KiB after polling an endless directory"
    );
    assert!(
        later < first + 32 * 1024,
        "the agent grew from {first} KiB to {later} KiB over 5 polls"
    );
}
