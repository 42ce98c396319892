//! Task assignment: claims due files (`new`, and `error` whose backoff passed)
//! and hands them to connected agents of the server's site with free capacity;
//! and the lease reaper, which requeues transfers whose agent went silent.
//!
//! **Architecture invariants:**
//! - A claim locks the server row (`FOR UPDATE`) before counting its running
//!   transfers, so `max_sessions` holds across all coordinators.
//! - Every assignment bumps the file's fencing token ([`crate::transitions`]);
//!   a result carrying an older token is stale.
//! - The object location of a task is decided here and recorded on the file
//!   (`assigned_bucket`, `assigned_key`) before the task is sent; a success
//!   report naming another location is a failed attempt.
//! - Claims rotate over servers, the least recently served first
//!   (`servers.last_assigned_at`, set by the claim), each taking an equal
//!   share of the agent's free slots per turn (at least one file), so a busy
//!   server cannot starve the others and every server gets its first file
//!   before any gets another turn; one server's share is claimed in one
//!   transaction and its tasks built with one query and one decryption of
//!   its credentials.
//! - A server's transfers go to the agent that polls it ([`route`]), so one
//!   agent's session pool holds all of the server's SSH connections and
//!   `max_sessions` bounds connections, not just transfers.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_common::domain::FileStatus;
use ferry_common::keys::{self, KeyError, KeyInputs};
use ferry_common::lifecycle::{Event, RetryPolicy};
use ferry_proto::{self as proto, coordinator_message::Body};
use sqlx::PgPool;

use crate::agents::Session;
use crate::error::{StoreError, StoreResult};
use crate::registry::{CONNECTION_COLUMNS, ConnectionRow};
use crate::secrets::SecretBox;
use crate::transitions::{self, Change, Outcome};

/// Transfers assigned per agent slot and per server session: an agent holds
/// up to `capacity * PIPELINE` tasks (and a server's agent up to
/// `max_sessions * PIPELINE` of that server's), running `capacity` at once
/// and starting a queued one the moment another finishes, so the round trip
/// result -> coordinator -> next assignment no longer idles the agent.
pub(crate) const PIPELINE: i64 = 2;

/// A claimed file, ready to become a task assignment.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Claimed {
    pub id: i64,
    pub watch_id: i64,
    pub path: String,
    pub size: i64,
    pub mtime_unix: i64,
    pub fencing_token: i64,
    pub discovered_at: DateTime<Utc>,
    /// The version's announcement id; it travels in the object's metadata
    /// (`ferry-announcement-id`), so a later run can tell what consumers saw.
    pub announcement_id: String,
}

/// A server with due files, and the agent that polls it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct DueServer {
    pub id: i64,
    /// The poll-lease holder, and the coordinator holding its stream.
    pub poller_agent: Option<String>,
    pub poller_coordinator: Option<String>,
    /// The holder takes transfers, as its `agents` row says (connected,
    /// heard from lately, not drained, not unavailable).
    pub poller_ready: bool,
}

/// Servers of `site` that have due files, the least recently served first
/// (never-served ones first of all; ties in random order), so every server
/// gets its turn before any gets a second one.
pub(crate) async fn servers_with_due_files(db: &PgPool, site: &str) -> StoreResult<Vec<DueServer>> {
    Ok(sqlx::query_as(
        "SELECT s.id, s.poller_agent, s.poller_coordinator, \
                COALESCE(a.connected AND NOT a.draining AND a.unavailable IS NULL \
                         AND a.revoked_at IS NULL \
                         AND a.last_seen_at > now() - make_interval(secs => $2), false) AS poller_ready \
         FROM servers s LEFT JOIN agents a ON a.name = s.poller_agent \
         WHERE s.site = $1 AND s.enabled AND s.deleted_at IS NULL \
           AND EXISTS (SELECT 1 FROM files f JOIN watches w ON w.id = f.watch_id \
                       WHERE f.server_id = s.id AND f.status IN ('new', 'error') \
                         AND f.next_attempt_at <= now() AND w.deleted_at IS NULL) \
         ORDER BY s.last_assigned_at NULLS FIRST, random()",
    )
    .bind(site)
    .bind(crate::agents::SILENT_AFTER.as_secs_f64())
    .fetch_all(db)
    .await?)
}

/// An agent of this coordinator as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate<'a> {
    pub agent: &'a str,
    pub takes_transfers: bool,
    pub free: i64,
}

/// Where a server's due files go this turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// To the candidate at this index, leaving `reserve` of the server's
    /// sessions unclaimed (1 when another agent polls the server: the
    /// poller's connection counts against the same `max_sessions`).
    To { candidate: usize, reserve: i64 },
    /// Not now: the poller is busy, or another coordinator serves it.
    Wait,
}

/// Where `server`'s transfers go (pure). **Invariant:** a server's SSH work
/// runs on the agent that polls it, so that agent's session pool is the
/// server's whole connection budget; another agent is used only when the
/// poller does not take transfers (drained, unavailable, silent), then with
/// one session left for the poller, or when there is no poller.
pub(crate) fn route(server: &DueServer, coordinator: &str, here: &[Candidate<'_>]) -> Route {
    // A stand-in leaves one session for the poller, if there is one.
    let most_free_other = |except: Option<&str>| {
        here.iter()
            .enumerate()
            .filter(|(_, c)| c.takes_transfers && c.free > 0 && Some(c.agent) != except)
            .max_by_key(|(i, c)| (c.free, std::cmp::Reverse(*i)))
            .map_or(Route::Wait, |(candidate, _)| Route::To {
                candidate,
                reserve: i64::from(except.is_some()),
            })
    };
    let Some(poller) = server.poller_agent.as_deref() else {
        return most_free_other(None);
    };
    if server.poller_coordinator.as_deref() == Some(coordinator)
        && let Some((i, c)) = here.iter().enumerate().find(|(_, c)| c.agent == poller)
    {
        return match (c.takes_transfers, c.free > 0) {
            (true, true) => Route::To {
                candidate: i,
                reserve: 0,
            },
            (true, false) => Route::Wait,
            (false, _) => most_free_other(Some(poller)),
        };
    }
    // Served by another coordinator, or its stream here is gone.
    if server.poller_ready {
        Route::Wait
    } else {
        most_free_other(Some(poller))
    }
}

/// Who claims: the coordinator's id, the agent that gets the files, and
/// the lease and retry policy they run under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claimant<'a> {
    pub coordinator: &'a str,
    pub agent: &'a str,
    pub lease: Duration,
    pub policy: &'a RetryPolicy,
}

/// Claims up to `want` due files of one server for the claimant's agent,
/// within the server's queue (`max_sessions * PIPELINE`, or for a stand-in
/// `max_sessions - reserve`) less its running transfers, in one transaction.
/// Returns the claimed files (possibly none).
pub(crate) async fn claim(
    db: &PgPool,
    who: Claimant<'_>,
    server_id: i64,
    want: i64,
    reserve: i64,
) -> StoreResult<Vec<Claimed>> {
    let mut tx = db.begin().await?;
    let max: Option<i32> = sqlx::query_scalar(
        "SELECT max_sessions FROM servers WHERE id = $1 AND enabled AND deleted_at IS NULL FOR UPDATE",
    )
    .bind(server_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(max) = max else {
        return Ok(Vec::new());
    };
    let running: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM files WHERE server_id = $1 AND status = 'in_progress'",
    )
    .bind(server_id)
    .fetch_one(&mut *tx)
    .await?;
    // The agent's session pool bounds the connections; transfers beyond
    // them wait there for a session, ready to start the moment one frees.
    // A stand-in (reserve > 0) gets no such queue: its pool is not the
    // poller's, so only the sessions the poller leaves may be used.
    let limit = if reserve == 0 {
        i64::from(max) * PIPELINE
    } else {
        i64::from(max) - reserve
    };
    let n = want.min(limit - running);
    if n <= 0 {
        return Ok(Vec::new());
    }
    let picked: Vec<i64> = sqlx::query_scalar(
        "SELECT f.id FROM files f JOIN watches w ON w.id = f.watch_id \
         WHERE f.server_id = $1 AND f.status IN ('new', 'error') AND f.next_attempt_at <= now() \
           AND w.deleted_at IS NULL \
         ORDER BY f.next_attempt_at, f.id LIMIT $2 FOR UPDATE OF f SKIP LOCKED",
    )
    .bind(server_id)
    .bind(n)
    .fetch_all(&mut *tx)
    .await?;
    if !picked.is_empty() {
        sqlx::query("UPDATE servers SET last_assigned_at = now() WHERE id = $1")
            .bind(server_id)
            .execute(&mut *tx)
            .await?;
    }
    let changes: Vec<Change> = picked
        .iter()
        .map(|&id| {
            Change::new(
                id,
                Event::Assigned {
                    agent: who.agent.to_string(),
                    lease: who.lease,
                },
            )
        })
        .collect();
    let applied = transitions::apply(
        &mut tx,
        &format!("coordinator:{}", who.coordinator),
        who.policy,
        &changes,
    )
    .await?;
    let moved: Vec<i64> = applied
        .iter()
        .filter(|a| a.outcome.moved_to() == Some(FileStatus::InProgress))
        .map(|a| a.file_id)
        .collect();
    let claimed = sqlx::query_as::<_, Claimed>(
        "SELECT id, watch_id, path, size, mtime_unix, fencing_token, discovered_at, \
                announcement_id::text AS announcement_id \
         FROM files WHERE id = ANY($1) ORDER BY array_position($1, id)",
    )
    .bind(&moved)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(claimed)
}

/// A watch of the server a batch of claimed files belongs to, with the
/// server's connection row (one row per watch, from one query).
#[derive(Debug, Clone, sqlx::FromRow)]
struct Source {
    #[sqlx(flatten)]
    conn: ConnectionRow,
    watch_id: i64,
    directory: String,
    bucket: String,
    key_template: String,
}

/// Why a batch of claimed files did not become tasks.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AssignmentError {
    /// Reading or recording what the tasks need failed: the round is retried
    /// (the claimed files come back through their leases).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server's credentials could not be unsealed (row changed outside
    /// ferry, or another secret key): that server is skipped this round, the
    /// others go on; its claimed files come back through their leases.
    #[error("server credentials: {0:#}")]
    Secrets(anyhow::Error),
}

/// The tasks built for one server's batch of claimed files.
#[derive(Debug, Default)]
pub(crate) struct Built {
    /// Ready to send; their object location is recorded on the file rows.
    pub tasks: Vec<proto::TaskAssignment>,
    /// Files whose path cannot be a safe object key: they fail permanently.
    pub unsafe_keys: Vec<(Claimed, KeyError)>,
    /// Files that changed hands before their location was recorded (e.g.
    /// the lease was reaped): nothing to send.
    pub gone: Vec<i64>,
}

/// The task for `file` (pure): its object key names this version (size,
/// mtime), so a replaced file gets a new key and a retry of this one the same.
fn task_for(
    file: &Claimed,
    server: &str,
    watch_dir: &str,
    bucket: &str,
    key_template: &str,
    source: &proto::ServerConnection,
) -> Result<proto::TaskAssignment, KeyError> {
    let date = file.discovered_at.format("%Y-%m-%d").to_string();
    let size = u64::try_from(file.size)
        .map_err(|_| KeyError::UnsafePath(file.path.clone(), "negative size"))?;
    let key = keys::render(
        key_template,
        &KeyInputs {
            server,
            watch_id: file.watch_id,
            watch_dir,
            remote_path: &file.path,
            date: &date,
            size,
            mtime_unix: file.mtime_unix,
        },
    )?;
    let metadata = HashMap::from([
        ("ferry-file-id".to_string(), file.id.to_string()),
        ("ferry-server".to_string(), server.to_string()),
        ("ferry-mtime".to_string(), file.mtime_unix.to_string()),
        (
            ferry_common::announcement::ANNOUNCEMENT_ID_METADATA.to_string(),
            file.announcement_id.clone(),
        ),
    ]);
    Ok(proto::TaskAssignment {
        file_id: file.id,
        fencing_token: file.fencing_token as u64,
        source: Some(source.clone()),
        path: file.path.clone(),
        size,
        mtime_unix: file.mtime_unix,
        bucket: bucket.to_string(),
        key,
        metadata,
    })
}

/// Builds the tasks for claimed files of server `server_id` and records
/// their object locations on the file rows (for their fencing tokens), so
/// results can be checked against them: one query for the server and its
/// watches, one decryption of the credentials, one `UPDATE` for the batch.
pub(crate) async fn assignments(
    db: &PgPool,
    secrets: &SecretBox,
    server_id: i64,
    files: &[Claimed],
) -> Result<Built, AssignmentError> {
    let mut built = Built::default();
    if files.is_empty() {
        return Ok(built);
    }
    let mut watch_ids: Vec<i64> = files.iter().map(|f| f.watch_id).collect();
    watch_ids.sort_unstable();
    watch_ids.dedup();
    let sources: HashMap<i64, Source> = sqlx::query_as::<_, Source>(&format!(
        "SELECT {CONNECTION_COLUMNS}, w.id AS watch_id, w.directory, w.bucket, w.key_template \
         FROM servers s JOIN watches w ON w.server_id = s.id \
         WHERE s.id = $1 AND w.id = ANY($2)"
    ))
    .bind(server_id)
    .bind(&watch_ids)
    .fetch_all(db)
    .await
    .map_err(StoreError::from)?
    .into_iter()
    .map(|s| (s.watch_id, s))
    .collect();
    let Some(any) = sources.values().next() else {
        // Watches and server rows are never deleted (soft delete only).
        return Err(StoreError::from(sqlx::Error::RowNotFound).into());
    };
    let connection = any
        .conn
        .to_proto(secrets)
        .map_err(AssignmentError::Secrets)?;
    let mut tasks = Vec::with_capacity(files.len());
    for file in files {
        let Some(src) = sources.get(&file.watch_id) else {
            return Err(StoreError::from(sqlx::Error::RowNotFound).into());
        };
        match task_for(
            file,
            &src.conn.name,
            &src.directory,
            &src.bucket,
            &src.key_template,
            &connection,
        ) {
            Ok(task) => tasks.push(task),
            Err(why) => built.unsafe_keys.push((file.clone(), why)),
        }
    }
    let recorded: Vec<i64> = sqlx::query_scalar(
        "UPDATE files f SET assigned_bucket = u.bucket, assigned_key = u.key \
         FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[]) AS u(id, token, bucket, key) \
         WHERE f.id = u.id AND f.fencing_token = u.token AND f.status = 'in_progress' \
         RETURNING f.id",
    )
    .bind(tasks.iter().map(|t| t.file_id).collect::<Vec<i64>>())
    .bind(
        tasks
            .iter()
            .map(|t| t.fencing_token as i64)
            .collect::<Vec<i64>>(),
    )
    .bind(tasks.iter().map(|t| t.bucket.as_str()).collect::<Vec<&str>>())
    .bind(tasks.iter().map(|t| t.key.as_str()).collect::<Vec<&str>>())
    .fetch_all(db)
    .await
    .map_err(StoreError::from)?;
    let recorded: std::collections::HashSet<i64> = recorded.into_iter().collect();
    for task in tasks {
        if recorded.contains(&task.file_id) {
            built.tasks.push(task);
        } else {
            built.gone.push(task.file_id);
        }
    }
    Ok(built)
}

/// How many files one server may claim in one turn: an equal share of the
/// agent's free slots over the servers with due files, at least one.
fn turn_share(slots: i64, servers: usize) -> i64 {
    let servers = i64::try_from(servers.max(1)).unwrap_or(i64::MAX);
    (slots / servers).max(1)
}

/// One scheduling round for the agents of `sessions` (all of one site):
/// rotate over servers with due files, each [routed](route) to its poller
/// (or a stand-in), claiming the server's share of that agent's free slots
/// per turn in one transaction. Returns tasks sent.
pub(crate) async fn schedule_site(
    db: &PgPool,
    secrets: &SecretBox,
    coordinator: &str,
    site: &str,
    sessions: &[Session],
    lease: Duration,
    policy: &RetryPolicy,
) -> anyhow::Result<usize> {
    let mut free: Vec<(Session, i64)> = sessions
        .iter()
        .map(|s| {
            let ahead = i64::from(s.capacity) * PIPELINE;
            (s.clone(), ahead - i64::from(s.in_flight()))
        })
        .collect();
    if !free
        .iter()
        .any(|(s, slots)| *slots > 0 && s.takes_transfers())
    {
        return Ok(0);
    }
    let actor = format!("coordinator:{coordinator}");
    let mut servers = servers_with_due_files(db, site).await?;
    let mut sent = 0;
    while !servers.is_empty() {
        let mut still_due = Vec::with_capacity(servers.len());
        let turn = servers.len();
        for server in servers {
            let candidates: Vec<Candidate<'_>> = free
                .iter()
                .map(|(s, slots)| Candidate {
                    agent: &s.agent,
                    takes_transfers: s.takes_transfers(),
                    free: *slots,
                })
                .collect();
            let Route::To { candidate, reserve } = route(&server, coordinator, &candidates) else {
                continue;
            };
            let (session, slots) = &mut free[candidate];
            let who = Claimant {
                coordinator,
                agent: &session.agent,
                lease,
                policy,
            };
            let want = turn_share(*slots, turn).min(*slots);
            let server_id = server.id;
            let claimed = claim(db, who, server_id, want, reserve).await?;
            if claimed.is_empty() {
                continue;
            }
            // Fewer than asked: no more due files or no free sessions now.
            let more = i64::try_from(claimed.len()).is_ok_and(|n| n >= want);
            let built = match assignments(db, secrets, server_id, &claimed).await {
                Ok(built) => built,
                Err(e @ AssignmentError::Secrets(_)) => {
                    // Not this site's other servers' problem: skip this one.
                    tracing::warn!(server = server_id, files = claimed.len(), error = %e, "cannot build tasks for this server; skipping it this round");
                    continue;
                }
                // The claimed files keep their leases; the reaper requeues them.
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("assign files of server {server_id}")));
                }
            };
            if !built.unsafe_keys.is_empty() {
                let changes: Vec<Change> = built
                    .unsafe_keys
                    .iter()
                    .map(|(file, why)| {
                        Change::fenced(
                            file.id,
                            file.fencing_token,
                            Event::Rejected {
                                why: why.to_string(),
                            },
                        )
                    })
                    .collect();
                transitions::apply_batch(db, &actor, policy, &changes).await?;
            }
            for file_id in &built.gone {
                tracing::info!(
                    file = file_id,
                    "claimed file changed hands before its task was recorded; not assigned"
                );
            }
            for task in built.tasks {
                let file_id = task.file_id;
                session.task_started(file_id);
                if !session.send(Body::TaskAssignment(task)).await {
                    session.task_finished(file_id);
                    // The stream is gone; the lease reaper will requeue the files.
                    return Ok(sent);
                }
                *slots -= 1;
                sent += 1;
                crate::metrics::transfer_started(site, file_id);
            }
            if more {
                still_due.push(server);
            }
        }
        servers = still_due;
        if !free
            .iter()
            .any(|(s, slots)| *slots > 0 && s.takes_transfers())
        {
            break;
        }
    }
    Ok(sent)
}

/// A transfer the reaper took away from its silent agent.
#[derive(Debug, Clone)]
pub(crate) struct Reaped {
    pub file_id: i64,
    /// The agent that held the lease; it should stop (`TaskCancellation`).
    pub owner: Option<String>,
    pub to: FileStatus,
    pub reason: String,
}

/// Requeues transfers whose lease expired (agent died or went silent), in
/// one transaction; rows another coordinator is reaping are skipped.
///
/// A lease whose agent is still connected is given one more `lease` first
/// (once per assignment): renewals stop when the coordinators lose their
/// database, transfers do not, and such an outage must not cost an attempt.
/// An agent that is connected but really stuck is reaped one lease later.
pub(crate) async fn reap_expired(
    db: &PgPool,
    coordinator: &str,
    policy: &RetryPolicy,
    lease: Duration,
) -> StoreResult<Vec<Reaped>> {
    let graced = sqlx::query(
        "UPDATE files f SET lease_expires_at = now() + make_interval(secs => $1), \
                lease_graced_token = f.fencing_token \
         WHERE f.status = 'in_progress' AND f.lease_expires_at < now() \
           AND f.lease_graced_token IS DISTINCT FROM f.fencing_token \
           AND EXISTS (SELECT 1 FROM agents a WHERE a.name = f.lease_owner \
                       AND a.connected AND a.revoked_at IS NULL)",
    )
    .bind(lease.as_secs_f64())
    .execute(db)
    .await?
    .rows_affected();
    if graced > 0 {
        tracing::info!(
            files = graced,
            "leases of connected agents expired: one more lease period before reaping"
        );
    }
    let mut tx = db.begin().await?;
    let expired: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT id, lease_owner FROM files \
         WHERE status = 'in_progress' AND lease_expires_at < now() \
         ORDER BY id FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(&mut *tx)
    .await?;
    if expired.is_empty() {
        return Ok(Vec::new());
    }
    let changes: Vec<Change> = expired
        .iter()
        .map(|(id, owner)| {
            Change::new(
                *id,
                Event::LeaseExpired {
                    owner: owner.clone(),
                },
            )
        })
        .collect();
    let applied = transitions::apply(
        &mut tx,
        &format!("coordinator:{coordinator}"),
        policy,
        &changes,
    )
    .await?;
    tx.commit().await?;
    Ok(applied
        .into_iter()
        .zip(expired)
        .filter_map(|(a, (_, owner))| match a.outcome {
            Outcome::Moved { to, reason, .. } => Some(Reaped {
                file_id: a.file_id,
                owner,
                to,
                reason,
            }),
            Outcome::Stale | Outcome::Illegal(_) => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_server_gets_an_equal_share_of_the_free_slots_at_least_one() {
        assert_eq!(turn_share(8, 1), 8);
        assert_eq!(turn_share(8, 3), 2);
        assert_eq!(turn_share(8, 1000), 1);
        assert_eq!(turn_share(1, 0), 1);
    }

    fn due(poller: Option<&str>, coordinator: Option<&str>, ready: bool) -> DueServer {
        DueServer {
            id: 1,
            poller_agent: poller.map(str::to_string),
            poller_coordinator: coordinator.map(str::to_string),
            poller_ready: ready,
        }
    }

    fn here() -> Vec<Candidate<'static>> {
        vec![
            Candidate {
                agent: "a1",
                takes_transfers: true,
                free: 2,
            },
            Candidate {
                agent: "a2",
                takes_transfers: true,
                free: 5,
            },
            Candidate {
                agent: "a3",
                takes_transfers: false,
                free: 9,
            },
        ]
    }

    #[test]
    fn a_servers_transfers_go_to_its_poller_while_it_takes_them() {
        let to = |candidate, reserve| Route::To { candidate, reserve };
        // The poller here, with free slots: it, the whole budget.
        assert_eq!(
            route(&due(Some("a1"), Some("c1"), true), "c1", &here()),
            to(0, 0)
        );
        // The poller here but busy: wait for it, even with others idle.
        let mut busy = here();
        busy[0].free = 0;
        assert_eq!(
            route(&due(Some("a1"), Some("c1"), true), "c1", &busy),
            Route::Wait
        );
        // The poller here takes no transfers: the freest other, one session
        // left for the poller.
        assert_eq!(
            route(&due(Some("a3"), Some("c1"), true), "c1", &here()),
            to(1, 1)
        );
        // Polled through another coordinator by a ready agent: that one's job.
        assert_eq!(
            route(&due(Some("b1"), Some("c2"), true), "c1", &here()),
            Route::Wait
        );
        // ... by an agent that takes none: a stand-in here.
        assert_eq!(
            route(&due(Some("b1"), Some("c2"), false), "c1", &here()),
            to(1, 1)
        );
        // Not polled at all (no live watch, or its agent went away): the
        // freest agent, the whole budget.
        assert_eq!(route(&due(None, None, false), "c1", &here()), to(1, 0));
        // Nobody here can take it.
        let none: Vec<Candidate<'_>> = here().into_iter().filter(|c| !c.takes_transfers).collect();
        assert_eq!(route(&due(None, None, false), "c1", &none), Route::Wait);
    }

    #[test]
    fn a_task_names_the_version_and_its_source() {
        let file = Claimed {
            id: 7,
            watch_id: 3,
            path: "/in/a.csv".into(),
            size: 4096,
            mtime_unix: 1_700_000_000,
            fencing_token: 2,
            discovered_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            announcement_id: "0f8e2a1c-5b7d-4e3a-9c6b-2d1f0e9a8b7c".into(),
        };
        let source = proto::ServerConnection {
            server_id: 1,
            name: "s1".into(),
            ..Default::default()
        };
        let task = task_for(
            &file,
            "s1",
            "/in",
            "b",
            "{server}/{version}/{name}",
            &source,
        )
        .unwrap();
        assert_eq!(task.file_id, 7);
        assert_eq!(task.fencing_token, 2);
        assert_eq!(task.bucket, "b");
        assert_eq!(task.key, "s1/1700000000-4096/a.csv");
        assert_eq!(task.source.as_ref().map(|s| s.server_id), Some(1));
        assert_eq!(task.metadata["ferry-file-id"], "7");
        assert_eq!(
            task.metadata["ferry-announcement-id"],
            "0f8e2a1c-5b7d-4e3a-9c6b-2d1f0e9a8b7c"
        );
        let negative = Claimed { size: -1, ..file };
        assert!(
            task_for(
                &negative,
                "s1",
                "/in",
                "b",
                "{server}/{version}/{name}",
                &source
            )
            .is_err()
        );
    }

    #[tokio::test]
    async fn the_least_recently_served_server_comes_first() {
        let db = crate::transitions::tests::Db::create().await;
        db.seed().await;
        let first: i64 = sqlx::query_scalar("SELECT id FROM servers")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let second: i64 = sqlx::query_scalar(
            "WITH s AS (INSERT INTO servers (name, hostname, username, auth_kind, secret_ciphertext, host_key_fingerprint) \
                        VALUES ('beta', 'h', 'u', 'password', '\\x00', 'SHA256:x') RETURNING id), \
                  w AS (INSERT INTO watches (server_id, directory, bucket) SELECT id, '/in', 'bkt' FROM s RETURNING id, server_id) \
             INSERT INTO files (server_id, watch_id, path, size, mtime_unix) \
             SELECT server_id, id, '/in/c.csv', 3, 1800000000 FROM w RETURNING server_id",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let order = || async {
            servers_with_due_files(&db.pool, "default")
                .await
                .unwrap()
                .iter()
                .map(|s| s.id)
                .collect::<Vec<i64>>()
        };
        let policy = RetryPolicy {
            max_attempts: 3,
            backoff: ferry_common::backoff::Backoff::new(
                Duration::from_secs(1),
                Duration::from_secs(1),
            ),
        };
        let who = |agent| Claimant {
            coordinator: "c1",
            agent,
            lease: Duration::from_secs(60),
            policy: &policy,
        };
        // The first server is served (one of its two files): the other one,
        // never served, comes first now, however the tie was broken before.
        assert_eq!(
            claim(&db.pool, who("a1"), first, 1, 0).await.unwrap().len(),
            1
        );
        for _ in 0..10 {
            assert_eq!(order().await, vec![second, first]);
        }
        assert_eq!(
            claim(&db.pool, who("a1"), second, 1, 0)
                .await
                .unwrap()
                .len(),
            1
        );
        // The second server has nothing due any more.
        assert_eq!(order().await, vec![first]);
        db.drop().await;
    }
}
