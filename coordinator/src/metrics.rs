//! Prometheus text exposition (`/metrics` on `FERRY_HTTP_LISTEN`) of a
//! coordinator, in two parts:
//!
//! - **Shared state**, computed from Postgres on each scrape ([`render`] of
//!   [`crate::status`]'s rows): files by status per server, the announcement
//!   backlog, the oldest waiting file, agents and poll health. Every
//!   coordinator reports the same values, so scrape one (or aggregate with
//!   `max`).
//! - **This process's** counters and histograms (the `static`s below, in
//!   [`PROCESS`]), counted where things happen with one-line calls: the relay
//!   (announcements), the scheduler (transfers started), agents' results,
//!   poll reports and discovery batches, the lease reaper, the broker
//!   connection. They count what *this* coordinator did since it started;
//!   sum them over coordinators.
//!
//! Labels are server names, sites, statuses, failure kinds and outcomes only:
//! bounded cardinality, never paths or ids.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use ferry_common::domain::FileStatus;
use ferry_common::lifecycle::FailureKind;
use ferry_common::sync::lock;
use ferry_proto::convert::failure_kind_from_wire;
use ferry_proto::metrics::{
    self as m, Counter, FAST_SECONDS, Gauge, Histogram, Metric, SLOW_SECONDS,
};
use ferry_proto::{self as proto, task_result::Outcome as WireOutcome};
use sqlx::PgPool;

use crate::scheduler::Reaped;
use crate::status::StatusRows;
use crate::transitions::Outcome;

pub(crate) static ANNOUNCEMENTS: Counter = Counter::new(
    "ferry_announcements_total",
    "Announcements offered to the broker by this coordinator's relay, by outcome: \
     published (confirmed and recorded), returned (unroutable), nacked.",
    &["outcome"],
)
.preset(&[&["published"], &["returned"], &["nacked"]]);

pub(crate) static BROKER_CONNECTED: Gauge = Gauge::new(
    "ferry_broker_connected",
    "1 while this coordinator's relay holds a working broker connection.",
    &[],
);

pub(crate) static TRANSFERS_STARTED: Counter = Counter::new(
    "ferry_transfers_started_total",
    "Transfers this coordinator assigned to agents, by site.",
    &["site"],
);

pub(crate) static TRANSFERS_SUCCEEDED: Counter = Counter::new(
    "ferry_transfers_succeeded_total",
    "Transfer results applied as stored (file uploaded), by site of the reporting agent.",
    &["site"],
);

pub(crate) static TRANSFERS_FAILED: Counter = Counter::new(
    "ferry_transfers_failed_total",
    "Transfer results applied as failures, by site and kind (transient, lost, permanent, \
     mismatch: a success that did not match the assigned location or size).",
    &["site", "kind"],
);

pub(crate) static TRANSFER_RESULTS_IGNORED: Counter = Counter::new(
    "ferry_transfer_results_ignored_total",
    "Transfer results that changed nothing (stale token, not the lease holder, repeated), by site.",
    &["site"],
);

pub(crate) static TRANSFERRED_BYTES: Counter = Counter::new(
    "ferry_transferred_bytes_total",
    "Bytes of the files whose stored result was applied, by site.",
    &["site"],
);

pub(crate) static TRANSFER_DURATION: Histogram = Histogram::new(
    "ferry_transfer_duration_seconds",
    "From assignment to applied result, for transfers this coordinator assigned, by site.",
    &["site"],
    SLOW_SECONDS,
);

pub(crate) static LEASE_EXPIRIES: Counter = Counter::new(
    "ferry_lease_expiries_total",
    "Transfers requeued by this coordinator's lease reaper (the agent went silent).",
    &[],
);

pub(crate) static POLL_DURATION: Histogram = Histogram::new(
    "ferry_poll_duration_seconds",
    "Duration of agents' polls (listing every due watch of a server), by server.",
    &["server"],
    FAST_SECONDS,
);

pub(crate) static POLL_ERRORS: Counter = Counter::new(
    "ferry_poll_errors_total",
    "Polls agents reported as failed, by server.",
    &["server"],
);

pub(crate) static DISCOVERY_BATCHES: Counter = Counter::new(
    "ferry_discovery_batches_total",
    "Discovery batches recorded (from the server's poll-lease holder), by server.",
    &["server"],
);

pub(crate) static DISCOVERY_ENTRIES: Counter = Counter::new(
    "ferry_discovery_entries_total",
    "Entries of recorded discovery batches (stable files, resent every poll), by server.",
    &["server"],
);

pub(crate) static DISCOVERED_FILES: Counter = Counter::new(
    "ferry_discovered_files_total",
    "New file versions recorded from discovery batches, by server.",
    &["server"],
);

pub(crate) static RETENTION_PRUNED: Counter = Counter::new(
    "ferry_retention_pruned_total",
    "Rows removed by this coordinator's retention passes, by kind (files, events, announcements).",
    &["kind"],
);

/// This process's metrics, in exposition order.
pub(crate) static PROCESS: &[&dyn Metric] = &[
    &ANNOUNCEMENTS,
    &BROKER_CONNECTED,
    &TRANSFERS_STARTED,
    &TRANSFERS_SUCCEEDED,
    &TRANSFERS_FAILED,
    &TRANSFER_RESULTS_IGNORED,
    &TRANSFERRED_BYTES,
    &TRANSFER_DURATION,
    &LEASE_EXPIRIES,
    &POLL_DURATION,
    &POLL_ERRORS,
    &DISCOVERY_BATCHES,
    &DISCOVERY_ENTRIES,
    &DISCOVERED_FILES,
    &RETENTION_PRUNED,
];

/// Assignments still waiting for their result, by file id: when they were
/// sent, for [`TRANSFER_DURATION`]. Bounded; a result that arrives at
/// another coordinator (the agent reconnected) is simply not timed.
static STARTED: Mutex<BTreeMap<i64, Instant>> = Mutex::new(BTreeMap::new());
const MAX_STARTED: usize = 100_000;

/// Server names by id, for labelling agents' reports (which name the id);
/// refreshed from the live servers on every scrape, filled on a miss.
static SERVER_NAMES: Mutex<BTreeMap<i64, String>> = Mutex::new(BTreeMap::new());

/// The scheduler sent the transfer of `file_id` to an agent of `site`.
pub(crate) fn transfer_started(site: &str, file_id: i64) {
    TRANSFERS_STARTED.inc(&[site]);
    let mut started = lock(&STARTED);
    if started.len() < MAX_STARTED {
        started.insert(file_id, Instant::now());
    }
}

/// How an applied transfer result counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResultClass {
    /// Stored: the size in bytes.
    Succeeded(u64),
    Failed(&'static str),
    Ignored,
}

/// The class of `result` once applied with `outcome` (pure).
fn classify(result: &proto::TaskResult, outcome: &Outcome) -> ResultClass {
    let Some(to) = outcome.moved_to() else {
        return ResultClass::Ignored;
    };
    match (&result.outcome, to) {
        (Some(WireOutcome::Success(ok)), FileStatus::Uploaded) => ResultClass::Succeeded(ok.size),
        (Some(WireOutcome::Success(_)), _) => ResultClass::Failed("mismatch"),
        (Some(WireOutcome::Failure(f)), _) => {
            ResultClass::Failed(kind(failure_kind_from_wire(f.kind)))
        }
        (None, _) => ResultClass::Failed(kind(FailureKind::Transient)),
    }
}

fn kind(k: FailureKind) -> &'static str {
    match k {
        FailureKind::Transient => "transient",
        FailureKind::Lost => "lost",
        FailureKind::Permanent => "permanent",
        FailureKind::Agent => "agent",
    }
}

/// Counts a transfer result of an agent of `site` as it was applied.
pub(crate) fn transfer_result(site: &str, result: &proto::TaskResult, outcome: &Outcome) {
    let started = lock(&STARTED).remove(&result.file_id);
    match classify(result, outcome) {
        ResultClass::Succeeded(bytes) => {
            TRANSFERS_SUCCEEDED.inc(&[site]);
            TRANSFERRED_BYTES.add(&[site], bytes);
        }
        ResultClass::Failed(kind) => TRANSFERS_FAILED.inc(&[site, kind]),
        ResultClass::Ignored => {
            TRANSFER_RESULTS_IGNORED.inc(&[site]);
            return;
        }
    }
    if let Some(at) = started {
        TRANSFER_DURATION.observe_duration(&[site], at.elapsed());
    }
}

/// Counts transfers the lease reaper requeued.
pub(crate) fn leases_expired(reaped: &[Reaped]) {
    LEASE_EXPIRIES.add(&[], reaped.len() as u64);
    let mut started = lock(&STARTED);
    for r in reaped {
        started.remove(&r.file_id);
    }
}

/// The name of server `id` (cached; `None` if it does not exist or the
/// database cannot say now).
async fn server_name(db: &PgPool, id: i64) -> Option<String> {
    if let Some(name) = lock(&SERVER_NAMES).get(&id) {
        return Some(name.clone());
    }
    let name: String = sqlx::query_scalar("SELECT name FROM servers WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
        .ok()??;
    lock(&SERVER_NAMES).insert(id, name.clone());
    Some(name)
}

/// Counts an agent's poll report.
pub(crate) async fn poll_reported(db: &PgPool, report: &proto::PollReport) {
    let Some(server) = server_name(db, report.server_id).await else {
        return;
    };
    POLL_DURATION.observe(&[&server], f64::from(report.duration_ms) / 1000.0);
    if !report.ok {
        POLL_ERRORS.inc(&[&server]);
    }
}

/// Counts a recorded discovery batch of `entries` entries, `inserted` of them new.
pub(crate) async fn discovered(db: &PgPool, server_id: i64, entries: usize, inserted: u64) {
    let Some(server) = server_name(db, server_id).await else {
        return;
    };
    DISCOVERY_BATCHES.inc(&[&server]);
    DISCOVERY_ENTRIES.add(&[&server], entries as u64);
    DISCOVERED_FILES.add(&[&server], inserted);
}

fn age(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> f64 {
    at.map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
}

/// The exposition text: the shared state of `rows` at `now`, then this
/// process's metrics. Refreshes the server-name cache from `rows`.
pub(crate) fn render(rows: &StatusRows, now: DateTime<Utc>) -> String {
    let names: BTreeMap<i64, String> = rows
        .servers
        .iter()
        .map(|r| (r.server_id, r.server_name.clone()))
        .collect();
    *lock(&SERVER_NAMES) = names;
    let mut out = render_state(rows, now);
    out.push_str(&m::render(PROCESS));
    out
}

/// The shared state of `rows` at `now` (pure).
fn render_state(rows: &StatusRows, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    // Every status of every live server, zeros included, so series do not vanish.
    let mut files = Vec::new();
    let mut failing = Vec::new();
    let mut last: Option<i64> = None;
    for row in &rows.servers {
        if last != Some(row.server_id) {
            last = Some(row.server_id);
            for st in FileStatus::ALL {
                let n = rows
                    .servers
                    .iter()
                    .filter(|r| r.server_id == row.server_id)
                    .find(|r| r.status.as_deref() == Some(st.as_str()))
                    .map_or(0, |r| r.count);
                files.push((
                    vec![
                        ("server", row.server_name.as_str()),
                        ("status", st.as_str()),
                    ],
                    n as f64,
                ));
            }
            failing.push((
                vec![("server", row.server_name.as_str())],
                if row.last_poll_error.is_some() {
                    1.0
                } else {
                    0.0
                },
            ));
        }
    }
    let one = |v: f64| vec![(Vec::new(), v)];
    m::write_gauge(
        &mut out,
        "ferry_files",
        "File versions by server and status.",
        &files,
    );
    m::write_gauge(
        &mut out,
        "ferry_server_poll_failing",
        "1 when the server's last poll failed.",
        &failing,
    );
    m::write_gauge(
        &mut out,
        "ferry_outbox_unpublished",
        "Announcements not yet confirmed by the broker (parked included).",
        &one(rows.outbox.unpublished as f64),
    );
    m::write_gauge(
        &mut out,
        "ferry_outbox_parked",
        "Announcements refused too often, waiting for an admin retry.",
        &one(rows.outbox.parked as f64),
    );
    m::write_gauge(
        &mut out,
        "ferry_outbox_oldest_pending_age_seconds",
        "Age of the oldest announcement still being offered to the broker (0 if none).",
        &one(age(rows.outbox.oldest_pending_at, now)),
    );
    m::write_gauge(
        &mut out,
        "ferry_oldest_waiting_file_age_seconds",
        "Age since discovery of the oldest file in status new or error (0 if none).",
        &one(age(
            rows.oldest_waiting.as_ref().map(|f| f.discovered_at),
            now,
        )),
    );
    m::write_gauge(
        &mut out,
        "ferry_agents_connected",
        "Agents with a live stream (revoked agents excluded).",
        &one(rows.agents.connected as f64),
    );
    m::write_gauge(
        &mut out,
        "ferry_agents_known",
        "Agents that ever connected (revoked agents excluded).",
        &one(rows.agents.total as f64),
    );
    m::write_gauge(
        &mut out,
        "ferry_agents_transfers_in_flight",
        "Transfers running on connected agents (from their heartbeats).",
        &one(rows.agents.in_flight as f64),
    );
    m::write_gauge(
        &mut out,
        "ferry_agents_transfer_capacity",
        "Transfer capacity of connected agents.",
        &one(rows.agents.capacity as f64),
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
        let text = render_state(&rows, now);
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
        assert!(text.contains("ferry_agents_transfer_capacity 8\n"));
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

    fn result(outcome: Option<WireOutcome>) -> proto::TaskResult {
        proto::TaskResult {
            file_id: 7,
            fencing_token: 1,
            outcome,
        }
    }

    fn moved(to: FileStatus) -> Outcome {
        Outcome::Moved {
            from: FileStatus::InProgress,
            to,
            reason: String::new(),
        }
    }

    #[test]
    fn results_are_classified_by_what_they_did() {
        let ok = result(Some(WireOutcome::Success(proto::TaskSuccess {
            size: 42,
            ..Default::default()
        })));
        assert_eq!(
            classify(&ok, &moved(FileStatus::Uploaded)),
            ResultClass::Succeeded(42)
        );
        // A success that did not match the assignment became a failed attempt.
        assert_eq!(
            classify(&ok, &moved(FileStatus::Error)),
            ResultClass::Failed("mismatch")
        );
        assert_eq!(classify(&ok, &Outcome::Stale), ResultClass::Ignored);
        let lost = result(Some(WireOutcome::Failure(proto::TaskFailure {
            kind: proto::FailureKind::Lost as i32,
            message: "gone".into(),
        })));
        assert_eq!(
            classify(&lost, &moved(FileStatus::Lost)),
            ResultClass::Failed("lost")
        );
        let permanent = result(Some(WireOutcome::Failure(proto::TaskFailure {
            kind: proto::FailureKind::Permanent as i32,
            message: "denied".into(),
        })));
        assert_eq!(
            classify(&permanent, &moved(FileStatus::Failed)),
            ResultClass::Failed("permanent")
        );
        assert_eq!(
            classify(&result(None), &moved(FileStatus::Error)),
            ResultClass::Failed("transient")
        );
    }

    #[test]
    fn process_metrics_follow_the_state_and_are_all_declared() {
        transfer_started("metrics-test-site", 1);
        let ok = result(Some(WireOutcome::Success(proto::TaskSuccess {
            size: 1000,
            ..Default::default()
        })));
        let ok = proto::TaskResult { file_id: 1, ..ok };
        transfer_result("metrics-test-site", &ok, &moved(FileStatus::Uploaded));
        assert_eq!(TRANSFERS_STARTED.get(&["metrics-test-site"]), 1);
        assert_eq!(TRANSFERS_SUCCEEDED.get(&["metrics-test-site"]), 1);
        assert_eq!(TRANSFERRED_BYTES.get(&["metrics-test-site"]), 1000);
        assert_eq!(TRANSFER_DURATION.count(&["metrics-test-site"]), 1);
        // A repeated result is ignored and not timed again.
        transfer_result("metrics-test-site", &ok, &Outcome::Stale);
        assert_eq!(TRANSFER_RESULTS_IGNORED.get(&["metrics-test-site"]), 1);
        assert_eq!(TRANSFER_DURATION.count(&["metrics-test-site"]), 1);

        let rows = StatusRows {
            servers: vec![row(3, "s3", Some("new"), 1, false)],
            outbox: OutboxRow {
                unpublished: 0,
                parked: 0,
                oldest_pending_at: None,
            },
            oldest_waiting: None,
            agents: AgentsRow {
                connected: 0,
                total: 0,
                in_flight: 0,
                capacity: 0,
            },
        };
        let text = render(&rows, Utc::now());
        assert!(text.contains("ferry_files{server=\"s3\",status=\"new\"} 1\n"));
        assert!(text.contains("ferry_announcements_total{outcome=\"published\"} 0\n"));
        assert!(text.contains("ferry_transfers_succeeded_total{site=\"metrics-test-site\"} 1\n"));
        assert!(text.contains("ferry_lease_expiries_total 0\n"));
        assert_eq!(lock(&SERVER_NAMES).get(&3).map(String::as_str), Some("s3"));
        // Every sample belongs to a declared family, each declared once.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!declared.contains(&name), "{name} declared twice");
                declared.push(name);
            } else if !line.starts_with('#') {
                let series = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| series.strip_suffix(s))
                    .filter(|f| declared.contains(f))
                    .unwrap_or(series);
                assert!(declared.contains(&family), "{line}");
                assert!(family.starts_with("ferry_"), "{line}");
            }
        }
    }
}
