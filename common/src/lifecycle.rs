//! The file status machine (SPEC §2) as data: the events that move a file
//! version, and one pure function, [`transition`], that says where each
//! (status, event) pair leads, with the history text and the retry delay.
//!
//! The coordinator's store (`coordinator/src/transitions.rs`) is the only
//! place that applies it; guards that need the database row (fencing token,
//! lease owner, lease expiry) are checked there, not here.
//!
//! ```text
//! new --assign--> in_progress --upload ok--> uploaded --AMQP confirm--> processed
//!   ^                 |  |
//!   |                 |  +--file gone on server--> lost
//!   +--backoff-- error <--+--failure (attempts < max)
//!                     +--attempts exhausted--> failed   (manual retry)
//!
//! skipped (baseline of a watch added with "skip existing files") --manual retry--> new
//! ```

use std::fmt;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::domain::FileStatus;

/// Why a transfer failed, as the agent classified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// Worth retrying (network, timeouts, S3 5xx).
    Transient,
    /// The remote file is gone or changed: the version will never arrive.
    Lost,
    /// Retrying will not help (permission denied, bucket missing).
    Permanent,
    /// A fault of the agent, not of the file (its S3 credentials were
    /// refused, it is draining): the attempt is given back and any agent may
    /// take the file at once.
    Agent,
}

/// Retry policy of failed transfers.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Transfer attempts before a file becomes `failed`.
    pub max_attempts: i32,
    /// Delay before the next attempt of an `error` file.
    pub backoff: Backoff,
}

/// Something that happens to a file version.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A scheduler leased the file to `agent` for `lease`.
    Assigned { agent: String, lease: Duration },
    /// The agent stored the object and read exactly the expected bytes.
    Stored(Stored),
    /// The agent reports a failed transfer.
    TransferFailed { kind: FailureKind, message: String },
    /// The lease of `owner` expired without a result (agent died or went silent).
    LeaseExpired { owner: Option<String> },
    /// The broker confirmed the announcement.
    Announced,
    /// A permanent failure found before any transfer (e.g. an unsafe object key).
    Rejected { why: String },
    /// An operator requeued the file.
    AdminRetry,
}

/// Where a stored file landed, as the agent reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub size: u64,
    /// Lower-case hex sha256 of the bytes read.
    pub sha256: String,
    /// The bucket already held this version, stored by ferry under this
    /// announcement id (an earlier run's, e.g. before a database restore);
    /// the object was not written again.
    pub stored_announcement_id: Option<String>,
}

/// What an agent was given for a transfer: the file's size and the object
/// location it was assigned. A success report is checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected<'a> {
    pub size: u64,
    pub bucket: &'a str,
    pub key: &'a str,
    /// The version's key of its own ([`crate::keys::own_key`]), where the
    /// agent writes when `key` holds other bytes; `None` if there is none.
    pub own_key: Option<&'a str>,
}

impl Stored {
    /// Why this report cannot be the assigned transfer, if it cannot: another
    /// size, a malformed sha256, or another object location than the assigned
    /// one or the version's key of its own (the object location is the
    /// coordinator's decision, never the agent's). A report that does not
    /// match counts as a failed attempt.
    pub fn mismatch(&self, expected: &Expected<'_>) -> Option<String> {
        let hex = self.sha256.len() == 64
            && self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if self.size != expected.size || !hex {
            return Some(format!(
                "agent reported {} bytes (sha256 {:?}), expected {} bytes",
                self.size, self.sha256, expected.size
            ));
        }
        let assigned_key = self.key == expected.key || Some(self.key.as_str()) == expected.own_key;
        if self.bucket != expected.bucket || !assigned_key {
            return Some(format!(
                "agent reported the object at {}/{}, but it was assigned {}/{}",
                self.bucket, self.key, expected.bucket, expected.key
            ));
        }
        None
    }
}

/// The kind of an [`Event`], without its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Assigned,
    Stored,
    TransferFailed,
    LeaseExpired,
    Announced,
    Rejected,
    AdminRetry,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Assigned,
        EventKind::Stored,
        EventKind::TransferFailed,
        EventKind::LeaseExpired,
        EventKind::Announced,
        EventKind::Rejected,
        EventKind::AdminRetry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Assigned => "assigned",
            EventKind::Stored => "stored",
            EventKind::TransferFailed => "transfer failed",
            EventKind::LeaseExpired => "lease expired",
            EventKind::Announced => "announced",
            EventKind::Rejected => "rejected",
            EventKind::AdminRetry => "admin retry",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Assigned { .. } => EventKind::Assigned,
            Event::Stored(_) => EventKind::Stored,
            Event::TransferFailed { .. } => EventKind::TransferFailed,
            Event::LeaseExpired { .. } => EventKind::LeaseExpired,
            Event::Announced => EventKind::Announced,
            Event::Rejected { .. } => EventKind::Rejected,
            Event::AdminRetry => EventKind::AdminRetry,
        }
    }
}

/// An allowed move of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub to: FileStatus,
    /// The `file_events.reason` text.
    pub reason: String,
    /// The file's `attempts` after the move (assignments made so far).
    pub attempts: i32,
    /// The file is due again after this delay (`next_attempt_at`); `None`
    /// leaves the due time alone.
    pub retry_in: Option<Duration>,
}

/// A (status, event) pair the machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a file in status {from} cannot take the event \"{event}\"")]
pub struct IllegalTransition {
    pub from: FileStatus,
    pub event: EventKind,
}

/// Where `event` takes a file in status `from` that has had `attempts`
/// assignments so far.
pub fn transition(
    from: FileStatus,
    event: &Event,
    attempts: i32,
    policy: &RetryPolicy,
) -> Result<Transition, IllegalTransition> {
    use FileStatus as S;
    let illegal = IllegalTransition {
        from,
        event: event.kind(),
    };
    let to = |to, reason, attempts, retry_in| Transition {
        to,
        reason,
        attempts,
        retry_in,
    };
    match (from, event) {
        (S::New | S::Error, Event::Assigned { agent, .. }) => {
            let attempt = attempts.saturating_add(1);
            Ok(to(
                S::InProgress,
                format!("assigned to agent {agent} (attempt {attempt})"),
                attempt,
                None,
            ))
        }
        (S::InProgress, Event::Stored(s)) => Ok(to(
            S::Uploaded,
            format!(
                "stored as s3://{}/{} ({} bytes, sha256 {})",
                s.bucket, s.key, s.size, s.sha256
            ),
            attempts,
            None,
        )),
        (
            S::InProgress,
            Event::TransferFailed {
                kind: FailureKind::Agent,
                message,
            },
        ) => Ok(to(
            S::Error,
            format!("{message} (a fault of the agent, not of the file: attempt not counted)"),
            attempts.saturating_sub(1).max(0),
            Some(Duration::ZERO),
        )),
        (S::InProgress, Event::TransferFailed { kind, message }) => {
            let (status, delay) = after_failure(*kind, attempts, policy);
            let reason = match status {
                S::Error => format!(
                    "{message} (attempt {attempts}, retry in {}s)",
                    delay.as_secs()
                ),
                _ => format!("{message} (attempt {attempts})"),
            };
            Ok(to(status, reason, attempts, Some(delay)))
        }
        (S::InProgress, Event::Rejected { why }) => Ok(to(
            S::Failed,
            format!("{why} (attempt {attempts})"),
            attempts,
            Some(Duration::ZERO),
        )),
        (S::InProgress, Event::LeaseExpired { owner }) => {
            // A silent agent is retried at once: it was the agent, not the file.
            let status = if attempts >= policy.max_attempts {
                S::Failed
            } else {
                S::Error
            };
            Ok(to(
                status,
                lease_expired_reason(owner.as_deref()),
                attempts,
                Some(Duration::ZERO),
            ))
        }
        (S::Uploaded, Event::Announced) => {
            Ok(to(S::Processed, "announced on AMQP".into(), attempts, None))
        }
        (S::Error | S::Failed | S::Lost | S::Skipped, Event::AdminRetry) => {
            Ok(to(S::New, "manual retry".into(), 0, Some(Duration::ZERO)))
        }
        _ => Err(illegal),
    }
}

/// The history text (and `last_error`) of an expired lease.
pub fn lease_expired_reason(owner: Option<&str>) -> String {
    format!(
        "lease expired: agent {} stopped reporting",
        owner.unwrap_or("?")
    )
}

/// The status after a failed transfer, and when to try again.
fn after_failure(kind: FailureKind, attempts: i32, policy: &RetryPolicy) -> (FileStatus, Duration) {
    match kind {
        FailureKind::Lost => (FileStatus::Lost, Duration::ZERO),
        FailureKind::Permanent => (FileStatus::Failed, Duration::ZERO),
        FailureKind::Transient if attempts >= policy.max_attempts => {
            (FileStatus::Failed, Duration::ZERO)
        }
        FailureKind::Transient => (
            FileStatus::Error,
            policy
                .backoff
                .delay(u32::try_from(attempts.saturating_sub(1)).unwrap_or(0)),
        ),
        FailureKind::Agent => (FileStatus::Error, Duration::ZERO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FileStatus as S;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(60)),
        }
    }

    fn stored() -> Stored {
        Stored {
            bucket: "b".into(),
            key: "k/x.csv".into(),
            etag: "e-1".into(),
            size: 12,
            sha256: "ab".repeat(32),
            stored_announcement_id: None,
        }
    }

    /// One event of each kind.
    fn sample(kind: EventKind) -> Event {
        match kind {
            EventKind::Assigned => Event::Assigned {
                agent: "a1".into(),
                lease: Duration::from_secs(60),
            },
            EventKind::Stored => Event::Stored(stored()),
            EventKind::TransferFailed => Event::TransferFailed {
                kind: FailureKind::Transient,
                message: "timeout".into(),
            },
            EventKind::LeaseExpired => Event::LeaseExpired {
                owner: Some("a1".into()),
            },
            EventKind::Announced => Event::Announced,
            EventKind::Rejected => Event::Rejected {
                why: "unsafe key".into(),
            },
            EventKind::AdminRetry => Event::AdminRetry,
        }
    }

    /// The table written out independently of `transition`: the target of
    /// every allowed pair (with 1 attempt made, below max_attempts).
    fn expected(from: FileStatus, kind: EventKind) -> Option<FileStatus> {
        use EventKind as E;
        match (from, kind) {
            (S::New | S::Error, E::Assigned) => Some(S::InProgress),
            (S::InProgress, E::Stored) => Some(S::Uploaded),
            (S::InProgress, E::TransferFailed) => Some(S::Error),
            (S::InProgress, E::LeaseExpired) => Some(S::Error),
            (S::InProgress, E::Rejected) => Some(S::Failed),
            (S::Uploaded, E::Announced) => Some(S::Processed),
            (S::Error | S::Failed | S::Lost | S::Skipped, E::AdminRetry) => Some(S::New),
            _ => None,
        }
    }

    #[test]
    fn every_status_and_event_pair_is_allowed_or_illegal() {
        let mut allowed = 0;
        for from in FileStatus::ALL {
            for kind in EventKind::ALL {
                let event = sample(kind);
                assert_eq!(event.kind(), kind);
                let got = transition(from, &event, 1, &policy());
                match (expected(from, kind), got) {
                    (Some(want), Ok(t)) => {
                        assert_eq!(t.to, want, "{from} + {kind}");
                        assert!(!t.reason.is_empty(), "{from} + {kind}");
                        allowed += 1;
                    }
                    (None, Err(e)) => {
                        assert_eq!(e, IllegalTransition { from, event: kind });
                        assert!(e.to_string().contains(from.as_str()));
                    }
                    (want, got) => panic!("{from} + {kind}: expected {want:?}, got {got:?}"),
                }
            }
        }
        assert_eq!(allowed, 11);
    }

    #[test]
    fn processed_is_final() {
        for kind in EventKind::ALL {
            assert!(transition(S::Processed, &sample(kind), 1, &policy()).is_err());
        }
    }

    #[test]
    fn assignment_counts_the_attempt() {
        let t = transition(S::Error, &sample(EventKind::Assigned), 2, &policy()).unwrap();
        assert_eq!(t.attempts, 3);
        assert_eq!(t.reason, "assigned to agent a1 (attempt 3)");
        assert_eq!(t.retry_in, None);
    }

    #[test]
    fn stored_reason_names_the_object() {
        let t = transition(S::InProgress, &sample(EventKind::Stored), 1, &policy()).unwrap();
        assert_eq!(
            t.reason,
            format!(
                "stored as s3://b/k/x.csv (12 bytes, sha256 {})",
                "ab".repeat(32)
            )
        );
        assert_eq!(t.attempts, 1);
    }

    #[test]
    fn failures_map_to_statuses() {
        let p = policy();
        let fail = |kind, attempts| {
            transition(
                S::InProgress,
                &Event::TransferFailed {
                    kind,
                    message: "boom".into(),
                },
                attempts,
                &p,
            )
            .unwrap()
        };
        let lost = fail(FailureKind::Lost, 1);
        assert_eq!(
            (lost.to, lost.reason.as_str()),
            (S::Lost, "boom (attempt 1)")
        );
        assert_eq!(fail(FailureKind::Permanent, 1).to, S::Failed);
        let t = fail(FailureKind::Transient, 2);
        assert_eq!(t.to, S::Error);
        let delay = t.retry_in.unwrap();
        assert!(delay >= Duration::from_secs(2) && delay <= Duration::from_secs(4));
        assert_eq!(
            t.reason,
            format!("boom (attempt 2, retry in {}s)", delay.as_secs())
        );
        let last = fail(FailureKind::Transient, 3);
        assert_eq!(
            (last.to, last.reason.as_str()),
            (S::Failed, "boom (attempt 3)")
        );
        // An agent's fault gives the attempt back, even the last one.
        let agent = fail(FailureKind::Agent, 3);
        assert_eq!(
            (agent.to, agent.attempts, agent.retry_in),
            (S::Error, 2, Some(Duration::ZERO))
        );
        assert!(
            agent.reason.contains("attempt not counted"),
            "{}",
            agent.reason
        );
    }

    #[test]
    fn expired_lease_retries_at_once_until_attempts_run_out() {
        let t = transition(
            S::InProgress,
            &sample(EventKind::LeaseExpired),
            2,
            &policy(),
        )
        .unwrap();
        assert_eq!(t.to, S::Error);
        assert_eq!(t.reason, "lease expired: agent a1 stopped reporting");
        assert_eq!(t.retry_in, Some(Duration::ZERO));
        let t = transition(
            S::InProgress,
            &Event::LeaseExpired { owner: None },
            3,
            &policy(),
        )
        .unwrap();
        assert_eq!(t.to, S::Failed);
        assert_eq!(t.reason, "lease expired: agent ? stopped reporting");
    }

    #[test]
    fn rejection_is_permanent_and_admin_retry_resets_attempts() {
        let t = transition(S::InProgress, &sample(EventKind::Rejected), 1, &policy()).unwrap();
        assert_eq!(
            (t.to, t.reason.as_str()),
            (S::Failed, "unsafe key (attempt 1)")
        );
        for from in [S::Error, S::Failed, S::Lost] {
            let t = transition(from, &Event::AdminRetry, 5, &policy()).unwrap();
            assert_eq!(
                (t.to, t.attempts, t.reason.as_str()),
                (S::New, 0, "manual retry")
            );
            assert_eq!(t.retry_in, Some(Duration::ZERO));
        }
    }

    #[test]
    fn announcement_processes_an_uploaded_file() {
        let t = transition(S::Uploaded, &Event::Announced, 1, &policy()).unwrap();
        assert_eq!(
            (t.to, t.reason.as_str()),
            (S::Processed, "announced on AMQP")
        );
    }

    #[test]
    fn a_stored_report_must_match_the_file() {
        let s = stored();
        let expected = Expected {
            size: 12,
            bucket: &s.bucket,
            key: &s.key,
            own_key: Some("own"),
        };
        assert_eq!(s.mismatch(&expected), None);
        let at_own_key = Stored {
            key: "own".into(),
            ..stored()
        };
        assert_eq!(at_own_key.mismatch(&expected), None);
        let no_own_key = Expected {
            own_key: None,
            ..expected
        };
        assert!(at_own_key.mismatch(&no_own_key).is_some());
        let bigger = Expected {
            size: 13,
            ..expected
        };
        assert!(s.mismatch(&bigger).unwrap().contains("expected 13 bytes"));
        let short = Stored {
            sha256: "abc".into(),
            ..stored()
        };
        assert!(short.mismatch(&expected).is_some());
        let not_hex = Stored {
            sha256: "zz".repeat(32),
            ..stored()
        };
        assert!(not_hex.mismatch(&expected).is_some());
        let elsewhere = Stored {
            bucket: "evil".into(),
            ..stored()
        };
        let why = elsewhere.mismatch(&expected).unwrap();
        assert!(why.contains("evil/") && why.contains("assigned"), "{why}");
        let other_key = Stored {
            key: "other".into(),
            ..stored()
        };
        assert!(other_key.mismatch(&expected).is_some());
    }
}
