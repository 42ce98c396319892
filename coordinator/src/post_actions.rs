//! Post-actions (`delete`, `move:<dir>`) after a file is `processed`: sent to
//! the agent that polls the server (or, without a live poller, a connected
//! agent of the server's site); the agent's answer is judged here
//! ([`judge`], pure) and recorded by [`crate::results::record_post_action`].
//!
//! **Invariants:** a post-action is only ever requested for a `processed` file,
//! that is, after the object is stored and its notification confirmed. It acts
//! on the stored *version*: the request names its size and mtime, and the
//! agent refuses if the path holds another version. The action is the one
//! snapshotted when the version was discovered (`files.post_action`), never
//! the watch's current setting; a removed or disabled watch, or a removed or
//! disabled server, gets none. The agent it is sent to is recorded first
//! (`files.post_action_agent`), and only that agent's answer counts; a resend
//! to another agent moves the record.
//!
//! A failed post-action is retried with the transfer retry policy's backoff
//! (`post_action_attempts`, `post_action_next_at`, `post_action_error`) and,
//! once the attempts are used up, stays `failed after N attempts: ...` until
//! an admin retries the file ([`crate::files::retry_files`]). A refusal is
//! final: the newer version is a new file the poller reports.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ferry_common::domain::PostAction;
use ferry_common::lifecycle::RetryPolicy;
use ferry_proto::{self as proto, coordinator_message::Body};

use crate::agents::Session;
use crate::registry::{CONNECTION_COLUMNS, ConnectionRow};
use crate::state::Coordinator;

/// A post-action is pending for `f` (of watch `w`, server `s`): a processed
/// version whose snapshotted action is not `keep`, not answered for good, of a
/// live enabled watch of a live enabled server.
const PENDING: &str = "f.status = 'processed' AND f.post_action_result IS NULL \
    AND f.post_action <> 'keep' AND w.deleted_at IS NULL AND w.enabled \
    AND s.deleted_at IS NULL AND s.enabled";

/// How long to wait for an agent's answer before asking again.
const RESEND_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, sqlx::FromRow)]
struct Due {
    file_id: i64,
    path: String,
    size: i64,
    mtime_unix: i64,
    next_at: DateTime<Utc>,
    #[sqlx(try_from = "String")]
    post_action: PostAction,
    /// The stored bytes' sha256.
    sha256: Option<String>,
    /// Sent before without an answer, or answered with a failure: the
    /// action may have been carried out, so the agent compares the bytes.
    sent_before: bool,
    site: String,
    /// The server's poll-lease holder, the coordinator holding its stream,
    /// and whether its `agents` row says it is live (connected, heard from
    /// lately, not drained).
    poller_agent: Option<String>,
    poller_coordinator: Option<String>,
    poller_live: bool,
    #[sqlx(flatten)]
    conn: ConnectionRow,
}

/// Requests already sent and not yet answered, by file id: the arming they
/// were for (`post_action_next_at`) and when. A recorded failure or an admin
/// retry re-arms the file with a new time, so it is sent as soon as it is due.
#[derive(Debug, Default)]
pub(crate) struct PostActions {
    sent: HashMap<i64, (DateTime<Utc>, Instant)>,
}

impl PostActions {
    /// Sends the due post-actions to agents of the right site. Returns how many.
    pub(crate) async fn dispatch(
        &mut self,
        coord: &Coordinator,
        sessions: &[Session],
    ) -> anyhow::Result<usize> {
        self.sent.retain(|_, (_, at)| at.elapsed() < RESEND_AFTER);
        let sites: Vec<String> = sessions.iter().map(|s| s.site.clone()).collect();
        if sites.is_empty() {
            return Ok(0);
        }
        let due = sqlx::query_as::<_, Due>(&format!(
            "SELECT f.id AS file_id, f.path, f.size, f.mtime_unix, \
                    f.post_action_next_at AS next_at, f.post_action, f.sha256, \
                    (f.post_action_agent IS NOT NULL OR f.post_action_attempts > 0) AS sent_before, \
                    s.site, \
                    s.poller_agent, s.poller_coordinator, \
                    COALESCE(a.connected AND NOT a.draining AND a.revoked_at IS NULL \
                             AND a.last_seen_at > now() - make_interval(secs => $2), false) AS poller_live, \
                    {CONNECTION_COLUMNS} \
             FROM files f JOIN watches w ON w.id = f.watch_id JOIN servers s ON s.id = f.server_id \
             LEFT JOIN agents a ON a.id = s.poller_agent \
             WHERE {PENDING} AND f.post_action_next_at <= now() \
               AND s.site = ANY($1) ORDER BY f.post_action_next_at, f.id LIMIT 200"
        ))
        .bind(&sites)
        .bind(crate::agents::SILENT_AFTER.as_secs_f64())
        .fetch_all(&coord.db)
        .await?;
        let mut sent = 0;
        for d in due {
            if self
                .sent
                .get(&d.file_id)
                .is_some_and(|(armed, _)| *armed == d.next_at)
            {
                continue;
            }
            let Ok(size) = u64::try_from(d.size) else {
                tracing::error!(
                    file = d.file_id,
                    size = d.size,
                    "file row with a negative size: no post-action"
                );
                continue;
            };
            let Some(agent) = recipient(&d, &coord.id, sessions) else {
                continue;
            };
            let source = match d.conn.to_proto(&coord.secrets) {
                Ok(source) => source,
                Err(e) => {
                    // That server's problem only: the other files go on.
                    tracing::warn!(file = d.file_id, server = %d.conn.name, error = format!("{e:#}"), "cannot unseal the server's credentials; post-action not sent");
                    continue;
                }
            };
            if !record_recipient(coord, d.file_id, &agent.agent).await? {
                continue;
            }
            let req = proto::PostActionRequest {
                file_id: d.file_id,
                source: Some(source),
                path: d.path,
                action: Some((&d.post_action).into()),
                size,
                mtime_unix: d.mtime_unix,
                verify_bytes: d.sent_before,
                sha256: d.sha256.unwrap_or_default(),
            };
            if agent.send(Body::PostAction(req)).await {
                self.sent.insert(d.file_id, (d.next_at, Instant::now()));
                sent += 1;
            }
        }
        Ok(sent)
    }
}

/// The agent of this coordinator that runs `d`'s post-action: the server's
/// poller (its session pool is the server's connection budget, see
/// `scheduler::route`), or, when the server has no live poller, the least
/// busy live agent of the site. `None` when the poller is served by another
/// coordinator (it sends the request) or no agent here can take it.
fn recipient<'a>(d: &Due, coordinator: &str, sessions: &'a [Session]) -> Option<&'a Session> {
    let live = |s: &&Session| s.site == d.site && !s.is_draining() && !s.is_silent();
    if let Some(poller) = d.poller_agent.as_deref() {
        if d.poller_coordinator.as_deref() == Some(coordinator)
            && let Some(s) = sessions.iter().filter(live).find(|s| s.agent == poller)
        {
            return Some(s);
        }
        if d.poller_live {
            return None;
        }
    }
    sessions.iter().filter(live).min_by_key(|s| s.in_flight())
}

/// Records that `file_id`'s post-action goes to `agent`, if it is still
/// pending; false if it no longer is (answered meanwhile).
async fn record_recipient(coord: &Coordinator, file_id: i64, agent: &str) -> anyhow::Result<bool> {
    let n = sqlx::query(&format!(
        "UPDATE files f SET post_action_agent = $2 \
         FROM watches w, servers s WHERE w.id = f.watch_id AND s.id = f.server_id \
           AND f.id = $1 AND {PENDING}"
    ))
    .bind(file_id)
    .bind(agent)
    .execute(&coord.db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// An agent's answer to a post-action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Done,
    /// The path holds another version: nothing was done.
    Refused(String),
    Failed(String),
}

impl Answer {
    pub(crate) fn from_wire(r: &proto::PostActionResult) -> Answer {
        if r.ok {
            Answer::Done
        } else if r.refused {
            Answer::Refused(r.message.clone())
        } else {
            Answer::Failed(r.message.clone())
        }
    }
}

/// What an answer does to the file version's post-action.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Answered for good (`post_action_result` = the text); `gone` says the
    /// version is no longer on the server (it may be discovered again as a
    /// new version).
    Final { result: String, gone: bool },
    /// Try again after `delay`; this was failed attempt number `attempts`.
    Retry {
        attempts: i32,
        error: String,
        delay: Duration,
    },
}

/// Judges an answer after `attempts` earlier failed attempts: done and refused
/// are final (a refused version is gone: the path holds another one); a
/// failure is retried with the policy's backoff until `max_attempts` failed
/// attempts, then it is final as `failed after N attempts: ...`.
pub(crate) fn judge(answer: &Answer, attempts: i32, policy: &RetryPolicy) -> Verdict {
    match answer {
        Answer::Done => Verdict::Final {
            result: "done".into(),
            gone: true,
        },
        Answer::Refused(why) => Verdict::Final {
            result: format!("refused: {why}"),
            gone: true,
        },
        Answer::Failed(error) => {
            let attempts = attempts.saturating_add(1);
            if attempts >= policy.max_attempts {
                Verdict::Final {
                    result: format!("failed after {attempts} attempts: {error}"),
                    gone: false,
                }
            } else {
                Verdict::Retry {
                    attempts,
                    error: error.clone(),
                    delay: policy
                        .backoff
                        .delay(u32::try_from(attempts - 1).unwrap_or(0)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_common::backoff::Backoff;

    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(60)),
        }
    }

    #[test]
    fn done_and_refused_are_final_and_the_version_is_gone() {
        assert_eq!(
            judge(&Answer::Done, 2, &policy()),
            Verdict::Final {
                result: "done".into(),
                gone: true
            }
        );
        assert_eq!(
            judge(
                &Answer::Refused("changed since stored".into()),
                0,
                &policy()
            ),
            Verdict::Final {
                result: "refused: changed since stored".into(),
                gone: true
            }
        );
    }

    #[test]
    fn failures_back_off_then_stay_failed() {
        let failed = Answer::Failed("permission denied".into());
        let Verdict::Retry {
            attempts, delay, ..
        } = judge(&failed, 0, &policy())
        else {
            panic!("first failure is retried");
        };
        assert_eq!(attempts, 1);
        assert!(delay >= Duration::from_secs(1) && delay <= Duration::from_secs(2));
        let Verdict::Retry { delay, .. } = judge(&failed, 1, &policy()) else {
            panic!("second failure is retried");
        };
        assert!(delay >= Duration::from_secs(2) && delay <= Duration::from_secs(4));
        assert_eq!(
            judge(&failed, 2, &policy()),
            Verdict::Final {
                result: "failed after 3 attempts: permission denied".into(),
                gone: false
            }
        );
    }
}
