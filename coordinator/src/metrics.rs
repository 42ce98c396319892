//! Prometheus text exposition (`/metrics` on `FERRY_HTTP_LISTEN`) of what the
//! database says about the system: files by status per server, the
//! announcement backlog, the oldest waiting file, agents and poll health.
//! Computed on scrape from [`crate::status`]; every coordinator reports the
//! same shared state, so scrape one (or aggregate with `max`). Labels are
//! server names and statuses only: bounded cardinality, no paths.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use ferry_common::domain::FileStatus;

use crate::status::StatusRows;

/// A label value escaped for the text format.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn age(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> f64 {
    at.map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
}

/// The exposition text of `rows` at `now`.
pub(crate) fn render(rows: &StatusRows, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };

    // Every status of every live server, zeros included, so series do not vanish.
    let mut files = Vec::new();
    let mut failing = Vec::new();
    let mut last: Option<i64> = None;
    for row in &rows.servers {
        if last != Some(row.server_id) {
            last = Some(row.server_id);
            let server = label(&row.server_name);
            for st in FileStatus::ALL {
                let n = rows
                    .servers
                    .iter()
                    .filter(|r| r.server_id == row.server_id)
                    .find(|r| r.status.as_deref() == Some(st.as_str()))
                    .map_or(0, |r| r.count);
                files.push((
                    format!("{{server=\"{server}\",status=\"{}\"}}", st.as_str()),
                    n as f64,
                ));
            }
            failing.push((
                format!("{{server=\"{server}\"}}"),
                if row.last_poll_error.is_some() {
                    1.0
                } else {
                    0.0
                },
            ));
        }
    }
    gauge("ferry_files", "File versions by server and status.", files);
    gauge(
        "ferry_server_poll_failing",
        "1 when the server's last poll failed.",
        failing,
    );
    gauge(
        "ferry_outbox_unpublished",
        "Announcements not yet confirmed by the broker (parked included).",
        vec![(String::new(), rows.outbox.unpublished as f64)],
    );
    gauge(
        "ferry_outbox_parked",
        "Announcements refused too often, waiting for an admin retry.",
        vec![(String::new(), rows.outbox.parked as f64)],
    );
    gauge(
        "ferry_outbox_oldest_pending_age_seconds",
        "Age of the oldest announcement still being offered to the broker (0 if none).",
        vec![(String::new(), age(rows.outbox.oldest_pending_at, now))],
    );
    gauge(
        "ferry_oldest_waiting_file_age_seconds",
        "Age since discovery of the oldest file in status new or error (0 if none).",
        vec![(
            String::new(),
            age(rows.oldest_waiting.as_ref().map(|f| f.discovered_at), now),
        )],
    );
    gauge(
        "ferry_agents_connected",
        "Agents with a live stream (revoked agents excluded).",
        vec![(String::new(), rows.agents.connected as f64)],
    );
    gauge(
        "ferry_agents_known",
        "Agents that ever connected (revoked agents excluded).",
        vec![(String::new(), rows.agents.total as f64)],
    );
    gauge(
        "ferry_agent_transfers_in_flight",
        "Transfers running on connected agents.",
        vec![(String::new(), rows.agents.in_flight as f64)],
    );
    gauge(
        "ferry_agent_transfer_capacity",
        "Transfer capacity of connected agents.",
        vec![(String::new(), rows.agents.capacity as f64)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{AgentsRow, OutboxRow, ServerCountRow};

    fn row(id: i64, name: &str, status: Option<&str>, count: i64, err: bool) -> ServerCountRow {
        ServerCountRow {
            server_id: id,
            server_name: name.into(),
            last_poll_error: err.then(|| "boom".into()),
            last_poll_at: None,
            status: status.map(str::to_string),
            count,
        }
    }

    #[test]
    fn renders_every_status_per_server_and_escapes_labels() {
        let now = Utc::now();
        let rows = StatusRows {
            servers: vec![
                row(1, "a\"b", Some("new"), 2, false),
                row(1, "a\"b", Some("processed"), 5, false),
                row(2, "idle", None, 0, true),
            ],
            outbox: OutboxRow {
                unpublished: 3,
                parked: 1,
                oldest_pending_at: Some(now - chrono::Duration::seconds(90)),
            },
            oldest_waiting: None,
            agents: AgentsRow {
                connected: 1,
                total: 2,
                in_flight: 3,
                capacity: 8,
            },
        };
        let text = render(&rows, now);
        assert!(
            text.contains("ferry_files{server=\"a\\\"b\",status=\"new\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("ferry_files{server=\"a\\\"b\",status=\"processed\"} 5\n"));
        assert!(text.contains("ferry_files{server=\"a\\\"b\",status=\"lost\"} 0\n"));
        assert!(text.contains("ferry_files{server=\"idle\",status=\"new\"} 0\n"));
        assert!(text.contains("ferry_server_poll_failing{server=\"idle\"} 1\n"));
        assert!(text.contains("ferry_outbox_parked 1\n"));
        assert!(text.contains("ferry_outbox_oldest_pending_age_seconds 90\n"));
        assert!(text.contains("ferry_oldest_waiting_file_age_seconds 0\n"));
        assert!(text.contains("ferry_agent_transfer_capacity 8\n"));
        // Every sample line belongs to a declared metric.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} gauge")), "{line}");
        }
        // One ferry_files series per status per server.
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("ferry_files{"))
                .count(),
            2 * FileStatus::ALL.len()
        );
    }
}
