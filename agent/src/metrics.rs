//! This agent's Prometheus metrics (`/metrics` on its `FERRY_HTTP_LISTEN`):
//! transfers in flight and capacity, transfers by outcome, bytes and
//! durations, poll durations and errors by server, open SFTP sessions.
//! Counted where things happen with one-line calls (the runner, the poller,
//! the SFTP session); rendered by [`render`]. Labels are server names and
//! outcomes only.

use std::time::Instant;

use ferry_proto::metrics::{
    self as m, Counter, FAST_SECONDS, Gauge, GaugeHold, Histogram, Metric, SLOW_SECONDS,
};
use ferry_proto::{self as proto, task_result::Outcome};

pub(crate) static TRANSFERS_IN_FLIGHT: Gauge = Gauge::new(
    "ferry_agent_transfers_in_flight",
    "Transfers this agent is running now.",
    &[],
);

pub(crate) static TRANSFER_CAPACITY: Gauge = Gauge::new(
    "ferry_agent_transfer_capacity",
    "Concurrent transfers this agent takes (FERRY_CAPACITY).",
    &[],
);

pub(crate) static TRANSFERS: Counter = Counter::new(
    "ferry_agent_transfers_total",
    "Transfers this agent finished, by outcome: succeeded, transient, lost, permanent \
     (failure kinds), cancelled (the coordinator took it back), refused (draining).",
    &["outcome"],
)
.preset(&[
    &["succeeded"],
    &["transient"],
    &["lost"],
    &["permanent"],
    &["cancelled"],
    &["refused"],
]);

pub(crate) static TRANSFERRED_BYTES: Counter = Counter::new(
    "ferry_agent_transferred_bytes_total",
    "Bytes of the files this agent stored.",
    &[],
);

pub(crate) static TRANSFER_DURATION: Histogram = Histogram::new(
    "ferry_agent_transfer_duration_seconds",
    "Duration of finished transfers (SFTP read to S3 upload), by result (succeeded, failed).",
    &["result"],
    SLOW_SECONDS,
);

pub(crate) static POLL_DURATION: Histogram = Histogram::new(
    "ferry_agent_poll_duration_seconds",
    "Duration of polls (listing every due watch of a server), by server.",
    &["server"],
    FAST_SECONDS,
);

pub(crate) static POLL_ERRORS: Counter = Counter::new(
    "ferry_agent_poll_errors_total",
    "Failed polls, by server.",
    &["server"],
);

pub(crate) static SFTP_SESSIONS: Gauge = Gauge::new(
    "ferry_agent_sftp_sessions_open",
    "Open SFTP sessions (SSH connections), for polls and transfers.",
    &[],
);

/// This agent's metrics, in exposition order.
static ALL: &[&dyn Metric] = &[
    &TRANSFERS_IN_FLIGHT,
    &TRANSFER_CAPACITY,
    &TRANSFERS,
    &TRANSFERRED_BYTES,
    &TRANSFER_DURATION,
    &POLL_DURATION,
    &POLL_ERRORS,
    &SFTP_SESSIONS,
];

/// The exposition text of this agent's metrics.
pub(crate) fn render() -> String {
    m::render(ALL)
}

/// One running transfer: in flight while alive; counted as `cancelled` if
/// dropped before [`Transfer::finished`].
#[derive(Debug)]
pub(crate) struct Transfer {
    started: Instant,
    _in_flight: GaugeHold,
    done: bool,
}

/// A transfer starts running.
pub(crate) fn transfer() -> Transfer {
    Transfer {
        started: Instant::now(),
        _in_flight: TRANSFERS_IN_FLIGHT.hold(),
        done: false,
    }
}

/// The outcome label of a transfer result (pure).
fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Success(_) => "succeeded",
        Outcome::Failure(f) => match proto::FailureKind::try_from(f.kind) {
            Ok(proto::FailureKind::Lost) => "lost",
            Ok(proto::FailureKind::Permanent) => "permanent",
            Ok(proto::FailureKind::Agent) => "agent",
            Ok(proto::FailureKind::Transient | proto::FailureKind::Unspecified) | Err(_) => {
                "transient"
            }
        },
    }
}

impl Transfer {
    /// The transfer ended with `outcome`.
    pub(crate) fn finished(mut self, outcome: &Outcome) {
        self.done = true;
        TRANSFERS.inc(&[outcome_label(outcome)]);
        let result = match outcome {
            Outcome::Success(ok) => {
                TRANSFERRED_BYTES.add(&[], ok.size);
                "succeeded"
            }
            Outcome::Failure(_) => "failed",
        };
        TRANSFER_DURATION.observe_duration(&[result], self.started.elapsed());
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if !self.done {
            TRANSFERS.inc(&["cancelled"]);
        }
    }
}

/// A poll of `server` ended (`report` is what goes to the coordinator).
pub(crate) fn polled(server: &str, report: &proto::PollReport) {
    POLL_DURATION.observe(&[server], f64::from(report.duration_ms) / 1000.0);
    if !report.ok {
        POLL_ERRORS.inc(&[server]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: proto::FailureKind) -> Outcome {
        Outcome::Failure(proto::TaskFailure {
            kind: kind as i32,
            message: String::new(),
        })
    }

    #[test]
    fn transfers_count_by_outcome_and_leave_flight() {
        let before_ok = TRANSFERS.get(&["succeeded"]);
        let before_cancelled = TRANSFERS.get(&["cancelled"]);
        let before_bytes = TRANSFERRED_BYTES.get(&[]);
        let t = transfer();
        let cancelled = transfer();
        assert!(TRANSFERS_IN_FLIGHT.get(&[]) >= 2);
        t.finished(&Outcome::Success(proto::TaskSuccess {
            size: 123,
            ..Default::default()
        }));
        drop(cancelled);
        assert_eq!(TRANSFERS.get(&["succeeded"]), before_ok + 1);
        assert_eq!(TRANSFERS.get(&["cancelled"]), before_cancelled + 1);
        assert_eq!(TRANSFERRED_BYTES.get(&[]), before_bytes + 123);
        assert!(TRANSFER_DURATION.count(&["succeeded"]) >= 1);
        let text = render();
        assert!(text.contains("# TYPE ferry_agent_transfer_duration_seconds histogram\n"));
        assert!(text.contains("ferry_agent_transfers_total{outcome=\"refused\"} 0\n"));
    }

    #[test]
    fn failure_kinds_are_outcomes() {
        assert_eq!(outcome_label(&failure(proto::FailureKind::Lost)), "lost");
        assert_eq!(
            outcome_label(&failure(proto::FailureKind::Permanent)),
            "permanent"
        );
        assert_eq!(
            outcome_label(&failure(proto::FailureKind::Unspecified)),
            "transient"
        );
    }

    #[test]
    fn polls_count_by_server() {
        polled(
            "metrics-test",
            &proto::PollReport {
                ok: false,
                duration_ms: 1500,
                ..Default::default()
            },
        );
        assert_eq!(POLL_ERRORS.get(&["metrics-test"]), 1);
        assert_eq!(POLL_DURATION.count(&["metrics-test"]), 1);
        assert!(render().contains(
            "ferry_agent_poll_duration_seconds_bucket{server=\"metrics-test\",le=\"2.5\"} 1\n"
        ));
    }
}
