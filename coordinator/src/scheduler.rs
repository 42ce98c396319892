//! Task assignment: claims due files (`new`, and `error` whose backoff passed)
//! and hands them to connected agents of the server's site with free capacity.
//!
//! **Architecture invariants:**
//! - A claim locks the server row (`FOR UPDATE`) before counting its running
//!   transfers, so `max_sessions` holds across all coordinators.
//! - Every assignment bumps the file's fencing token; a result carrying an
//!   older token is rejected ([`crate::results`]).
//! - Claims rotate over servers one file at a time, so a busy server cannot
//!   starve the others.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_common::keys::{self, KeyInputs};
use ferry_proto::{self as proto, coordinator_message::Body};
use sqlx::PgPool;

use crate::agents::Session;
use crate::error::ApiResult;
use crate::registry::{CONNECTION_COLUMNS, ConnectionRow};
use crate::secrets::SecretBox;

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
pub(crate) async fn servers_with_due_files(db: &PgPool, site: &str) -> ApiResult<Vec<i64>> {
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

/// Claims up to `want` due files of one server for `agent`, within the
/// server's free sessions. Returns the claimed files (possibly none).
pub(crate) async fn claim(
    db: &PgPool,
    coordinator: &str,
    agent: &str,
    server_id: i64,
    want: i64,
    lease: Duration,
) -> ApiResult<Vec<Claimed>> {
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
    let claimed = sqlx::query_as::<_, Claimed>(
        "WITH picked AS ( \
            SELECT f.id, f.status FROM files f JOIN watches w ON w.id = f.watch_id \
            WHERE f.server_id = $1 AND f.status IN ('new', 'error') AND f.next_attempt_at <= now() \
              AND w.deleted_at IS NULL \
            ORDER BY f.next_attempt_at, f.id LIMIT $2 FOR UPDATE OF f SKIP LOCKED), \
         moved AS ( \
            UPDATE files f SET status = 'in_progress', attempts = f.attempts + 1, \
                   fencing_token = f.fencing_token + 1, lease_owner = $3, \
                   lease_expires_at = now() + make_interval(secs => $4), updated_at = now() \
            FROM picked WHERE f.id = picked.id \
            RETURNING f.id, f.server_id, f.watch_id, f.path, f.size, f.mtime_unix, f.fencing_token, \
                      f.attempts, f.discovered_at, picked.status AS old), \
         events AS ( \
            INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
            SELECT id, old, 'in_progress', 'coordinator:' || $5, \
                   'assigned to agent ' || $3 || ' (attempt ' || attempts || ')' FROM moved) \
         SELECT id, server_id, watch_id, path, size, mtime_unix, fencing_token, attempts, discovered_at FROM moved",
    )
    .bind(server_id)
    .bind(n)
    .bind(agent)
    .bind(lease.as_secs_f64())
    .bind(coordinator)
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

/// Builds the task for a claimed file. `Err` carries a permanent failure
/// (e.g. a path that cannot become a safe object key).
pub(crate) async fn assignment(
    db: &PgPool,
    secrets: &SecretBox,
    file: &Claimed,
) -> anyhow::Result<Result<proto::TaskAssignment, String>> {
    let src = sqlx::query_as::<_, Source>(&format!(
        "SELECT {CONNECTION_COLUMNS}, w.directory, w.bucket, w.key_template \
         FROM files f JOIN servers s ON s.id = f.server_id JOIN watches w ON w.id = f.watch_id \
         WHERE f.id = $1"
    ))
    .bind(file.id)
    .fetch_one(db)
    .await?;
    let date = file.discovered_at.format("%Y-%m-%d").to_string();
    let key = match keys::render(
        &src.key_template,
        &KeyInputs {
            server: &src.conn.name,
            watch_id: file.watch_id,
            watch_dir: &src.directory,
            remote_path: &file.path,
            date: &date,
        },
    ) {
        Ok(k) => k,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let source = src.conn.to_proto(secrets)?;
    let metadata = HashMap::from([
        ("ferry-file-id".to_string(), file.id.to_string()),
        ("ferry-server".to_string(), src.conn.name.clone()),
        ("ferry-mtime".to_string(), file.mtime_unix.to_string()),
    ]);
    Ok(Ok(proto::TaskAssignment {
        file_id: file.id,
        fencing_token: file.fencing_token as u64,
        source: Some(source),
        path: file.path.clone(),
        size: file.size as u64,
        mtime_unix: file.mtime_unix,
        bucket: src.bucket,
        key,
        metadata,
    }))
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
) -> anyhow::Result<usize> {
    let mut free: Vec<(Session, i64)> = sessions
        .iter()
        .filter(|s| !s.is_draining())
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
            let claimed = claim(db, coordinator, &session.agent, server_id, 1, lease).await?;
            let Some(file) = claimed.into_iter().next() else {
                continue;
            };
            match assignment(db, secrets, &file).await? {
                Ok(task) => {
                    session.task_started(file.id);
                    if !session.send(Body::TaskAssignment(task)).await {
                        session.task_finished(file.id);
                        // The stream is gone; the lease reaper will requeue the file.
                        return Ok(sent);
                    }
                    *slots -= 1;
                    sent += 1;
                }
                Err(why) => {
                    crate::results::fail_permanently(
                        db,
                        coordinator,
                        file.id,
                        file.fencing_token,
                        &why,
                    )
                    .await?;
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

/// Requeues transfers whose lease expired (agent died or went silent).
pub(crate) async fn reap_expired(
    db: &PgPool,
    coordinator: &str,
    max_attempts: i32,
) -> ApiResult<u64> {
    let n = sqlx::query(
        "WITH expired AS ( \
            SELECT id, attempts, lease_owner FROM files \
            WHERE status = 'in_progress' AND lease_expires_at < now() FOR UPDATE SKIP LOCKED), \
         moved AS ( \
            UPDATE files f SET status = CASE WHEN expired.attempts >= $2 THEN 'failed' ELSE 'error' END, \
                   last_error = 'lease expired: agent ' || COALESCE(expired.lease_owner, '?') || ' stopped reporting', \
                   lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = now(), updated_at = now() \
            FROM expired WHERE f.id = expired.id RETURNING f.id, f.status, f.last_error) \
         INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
         SELECT id, 'in_progress', status, 'coordinator:' || $1, last_error FROM moved",
    )
    .bind(coordinator)
    .bind(max_attempts)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n)
}
