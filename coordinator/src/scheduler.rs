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
//! - Claims rotate over servers one file at a time, so a busy server cannot
//!   starve the others.

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
}

/// Servers of `site` that have due files, in a rotating order.
pub(crate) async fn servers_with_due_files(db: &PgPool, site: &str) -> StoreResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT s.id FROM servers s \
         WHERE s.site = $1 AND s.enabled AND s.deleted_at IS NULL \
           AND EXISTS (SELECT 1 FROM files f JOIN watches w ON w.id = f.watch_id \
                       WHERE f.server_id = s.id AND f.status IN ('new', 'error') \
                         AND f.next_attempt_at <= now() AND w.deleted_at IS NULL) \
         ORDER BY random()",
    )
    .bind(site)
    .fetch_all(db)
    .await?)
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
/// within the server's free sessions, in one transaction. Returns the claimed
/// files (possibly none).
pub(crate) async fn claim(
    db: &PgPool,
    who: Claimant<'_>,
    server_id: i64,
    want: i64,
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
    let n = want.min(i64::from(max) - running);
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
        "SELECT id, watch_id, path, size, mtime_unix, fencing_token, discovered_at \
         FROM files WHERE id = ANY($1) ORDER BY array_position($1, id)",
    )
    .bind(&moved)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(claimed)
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct Source {
    #[sqlx(flatten)]
    conn: ConnectionRow,
    directory: String,
    bucket: String,
    key_template: String,
}

/// Why a claimed file did not become a task.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AssignmentError {
    /// The file can never become a task (its path cannot be a safe object
    /// key): it fails permanently.
    #[error(transparent)]
    UnsafeKey(#[from] KeyError),
    /// Reading what the task needs failed: the round is retried.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The claim changed hands before the task was recorded (e.g. the lease
    /// was reaped): nothing to send.
    #[error("file {file_id} is no longer in progress with fencing token {token}")]
    Gone { file_id: i64, token: i64 },
    /// The server's credentials could not be unsealed (row changed outside
    /// ferry, or another secret key): that server is skipped this round, the
    /// others go on; its claimed file comes back through its lease.
    #[error("server credentials: {0:#}")]
    Secrets(anyhow::Error),
}

/// Builds the task for a claimed file and records its object location on the
/// file row (for this fencing token), so the result can be checked against it.
pub(crate) async fn assignment(
    db: &PgPool,
    secrets: &SecretBox,
    file: &Claimed,
) -> Result<proto::TaskAssignment, AssignmentError> {
    let src = sqlx::query_as::<_, Source>(&format!(
        "SELECT {CONNECTION_COLUMNS}, w.directory, w.bucket, w.key_template \
         FROM files f JOIN servers s ON s.id = f.server_id JOIN watches w ON w.id = f.watch_id \
         WHERE f.id = $1"
    ))
    .bind(file.id)
    .fetch_one(db)
    .await
    .map_err(StoreError::from)?;
    let date = file.discovered_at.format("%Y-%m-%d").to_string();
    let size = u64::try_from(file.size)
        .map_err(|_| KeyError::UnsafePath(file.path.clone(), "negative size"))?;
    // The key names this version (size, mtime): a replaced file gets a new
    // key, a retry of this one the same key.
    let key = keys::render(
        &src.key_template,
        &KeyInputs {
            server: &src.conn.name,
            watch_id: file.watch_id,
            watch_dir: &src.directory,
            remote_path: &file.path,
            date: &date,
            size,
            mtime_unix: file.mtime_unix,
        },
    )?;
    let source = src
        .conn
        .to_proto(secrets)
        .map_err(AssignmentError::Secrets)?;
    let recorded = sqlx::query(
        "UPDATE files SET assigned_bucket = $3, assigned_key = $4 \
         WHERE id = $1 AND fencing_token = $2 AND status = 'in_progress'",
    )
    .bind(file.id)
    .bind(file.fencing_token)
    .bind(&src.bucket)
    .bind(&key)
    .execute(db)
    .await
    .map_err(StoreError::from)?
    .rows_affected();
    if recorded != 1 {
        return Err(AssignmentError::Gone {
            file_id: file.id,
            token: file.fencing_token,
        });
    }
    let metadata = HashMap::from([
        ("ferry-file-id".to_string(), file.id.to_string()),
        ("ferry-server".to_string(), src.conn.name.clone()),
        ("ferry-mtime".to_string(), file.mtime_unix.to_string()),
    ]);
    Ok(proto::TaskAssignment {
        file_id: file.id,
        fencing_token: file.fencing_token as u64,
        source: Some(source),
        path: file.path.clone(),
        size,
        mtime_unix: file.mtime_unix,
        bucket: src.bucket,
        key,
        metadata,
    })
}

/// One scheduling round for the agents of `sessions` (all of one site):
/// rotate over servers with due files, one file per server per turn, giving
/// each to the agent with the most free capacity. Returns tasks sent.
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
        .filter(|s| s.takes_transfers())
        .map(|s| (s.clone(), i64::from(s.capacity) - i64::from(s.in_flight())))
        .filter(|(_, f)| *f > 0)
        .collect();
    if free.is_empty() {
        return Ok(0);
    }
    let mut servers = servers_with_due_files(db, site).await?;
    let mut sent = 0;
    while !servers.is_empty() {
        free.sort_by_key(|(_, f)| -*f);
        let Some((session, slots)) = free.first_mut().filter(|(_, f)| *f > 0) else {
            break;
        };
        let mut still_due = Vec::with_capacity(servers.len());
        for server_id in servers {
            if *slots <= 0 {
                still_due.push(server_id);
                continue;
            }
            let who = Claimant {
                coordinator,
                agent: &session.agent,
                lease,
                policy,
            };
            let claimed = claim(db, who, server_id, 1).await?;
            let Some(file) = claimed.into_iter().next() else {
                continue;
            };
            match assignment(db, secrets, &file).await {
                Ok(task) => {
                    session.task_started(file.id);
                    if !session.send(Body::TaskAssignment(task)).await {
                        session.task_finished(file.id);
                        // The stream is gone; the lease reaper will requeue the file.
                        return Ok(sent);
                    }
                    *slots -= 1;
                    sent += 1;
                    crate::metrics::transfer_started(site, file.id);
                }
                Err(AssignmentError::UnsafeKey(why)) => {
                    let change = Change::fenced(
                        file.id,
                        file.fencing_token,
                        Event::Rejected {
                            why: why.to_string(),
                        },
                    );
                    let actor = format!("coordinator:{coordinator}");
                    transitions::apply_one(db, &actor, policy, change).await?;
                }
                Err(e @ AssignmentError::Gone { .. }) => {
                    tracing::info!(error = %e, "claimed file not assigned");
                }
                Err(e @ AssignmentError::Secrets(_)) => {
                    // Not this site's other servers' problem: skip this one.
                    tracing::warn!(server = server_id, file = file.id, error = %e, "cannot build a task for this server; skipping it this round");
                    continue;
                }
                // The claimed file keeps its lease; the reaper requeues it.
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("assign file {}", file.id)));
                }
            }
            still_due.push(server_id);
        }
        servers = still_due;
        if free.iter().all(|(_, f)| *f <= 0) {
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
