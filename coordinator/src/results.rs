//! Applying transfer results: a status change, its `file_events` row and, on
//! success, its `outbox` notification commit in one transaction.
//!
//! **Architecture invariant:** a result counts only if its fencing token is the
//! file's current one and the file is still `in_progress`; anything else is a
//! stale agent and is ignored.

use std::time::Duration;

use ferry_common::backoff::Backoff;
use ferry_proto::{self as proto, FailureKind, task_result::Outcome};
use sqlx::PgPool;

use crate::error::ApiResult;

/// Retry policy of failed transfers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    pub max_attempts: i32,
    pub backoff: Backoff,
}

/// What happened to a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The file moved to this status.
    Moved(&'static str),
    /// Stale token or the file is not in progress: ignored.
    Stale,
}

/// The status after a failure, and when to try again.
pub(crate) fn after_failure(
    kind: FailureKind,
    attempts: i32,
    policy: &RetryPolicy,
) -> (&'static str, Duration) {
    match kind {
        FailureKind::Lost => ("lost", Duration::ZERO),
        FailureKind::Permanent => ("failed", Duration::ZERO),
        FailureKind::Transient | FailureKind::Unspecified => {
            if attempts >= policy.max_attempts {
                ("failed", Duration::ZERO)
            } else {
                (
                    "error",
                    policy.backoff.delay(attempts.saturating_sub(1) as u32),
                )
            }
        }
    }
}

/// Renews the lease of a running transfer (progress report).
pub(crate) async fn renew_lease(
    db: &PgPool,
    file_id: i64,
    token: u64,
    agent: &str,
    lease: Duration,
) -> ApiResult<bool> {
    let n = sqlx::query(
        "UPDATE files SET lease_expires_at = now() + make_interval(secs => $4), lease_owner = $3 \
         WHERE id = $1 AND fencing_token = $2 AND status = 'in_progress'",
    )
    .bind(file_id)
    .bind(token as i64)
    .bind(agent)
    .bind(lease.as_secs_f64())
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

pub(crate) async fn apply(
    db: &PgPool,
    agent: &str,
    result: &proto::TaskResult,
    policy: &RetryPolicy,
) -> ApiResult<Applied> {
    let token = result.fencing_token as i64;
    match &result.outcome {
        Some(Outcome::Success(ok)) => succeed(db, agent, result.file_id, token, ok, policy).await,
        Some(Outcome::Failure(f)) => {
            let kind = FailureKind::try_from(f.kind).unwrap_or(FailureKind::Transient);
            fail(
                db,
                &format!("agent:{agent}"),
                result.file_id,
                token,
                kind,
                &f.message,
                policy,
            )
            .await
        }
        None => {
            fail(
                db,
                &format!("agent:{agent}"),
                result.file_id,
                token,
                FailureKind::Transient,
                "empty result",
                policy,
            )
            .await
        }
    }
}

async fn succeed(
    db: &PgPool,
    agent: &str,
    file_id: i64,
    token: i64,
    ok: &proto::TaskSuccess,
    policy: &RetryPolicy,
) -> ApiResult<Applied> {
    let mut tx = db.begin().await?;
    let expected: Option<(i64,)> = sqlx::query_as(
        "SELECT size FROM files WHERE id = $1 AND fencing_token = $2 AND status = 'in_progress' FOR UPDATE",
    )
    .bind(file_id)
    .bind(token)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((size,)) = expected else {
        return Ok(Applied::Stale);
    };
    if ok.size as i64 != size || ok.sha256.len() != 64 {
        drop(tx);
        let why = format!(
            "agent reported {} bytes (sha256 {:?}), expected {size} bytes",
            ok.size, ok.sha256
        );
        // A report that does not match the file is a failed attempt like any other.
        return fail(
            db,
            &format!("agent:{agent}"),
            file_id,
            token,
            FailureKind::Transient,
            &why,
            policy,
        )
        .await;
    }
    sqlx::query(
        "UPDATE files SET status = 'uploaded', bucket = $2, object_key = $3, etag = $4, sha256 = $5, \
                uploaded_at = now(), updated_at = now(), lease_owner = NULL, lease_expires_at = NULL, last_error = NULL \
         WHERE id = $1",
    )
    .bind(file_id)
    .bind(&ok.bucket)
    .bind(&ok.key)
    .bind(&ok.etag)
    .bind(&ok.sha256)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
         VALUES ($1, 'in_progress', 'uploaded', $2, $3)",
    )
    .bind(file_id)
    .bind(format!("agent:{agent}"))
    .bind(format!(
        "stored as s3://{}/{} ({} bytes, sha256 {})",
        ok.bucket, ok.key, ok.size, ok.sha256
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO outbox (file_id, payload) \
         SELECT f.id, jsonb_build_object( \
            'file_id', f.id, 'server', s.name, 'server_id', s.id, 'watch_id', f.watch_id, 'path', f.path, \
            'size', f.size, 'mtime', to_char(to_timestamp(f.mtime_unix) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
            'sha256', f.sha256, 'bucket', f.bucket, 'key', f.object_key, 'etag', f.etag, \
            'discovered_at', f.discovered_at, 'uploaded_at', f.uploaded_at) \
         FROM files f JOIN servers s ON s.id = f.server_id WHERE f.id = $1",
    )
    .bind(file_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Applied::Moved("uploaded"))
}

async fn fail(
    db: &PgPool,
    actor: &str,
    file_id: i64,
    token: i64,
    kind: FailureKind,
    message: &str,
    policy: &RetryPolicy,
) -> ApiResult<Applied> {
    let mut tx = db.begin().await?;
    let attempts: Option<i32> = sqlx::query_scalar(
        "SELECT attempts FROM files WHERE id = $1 AND fencing_token = $2 AND status = 'in_progress' FOR UPDATE",
    )
    .bind(file_id)
    .bind(token)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(attempts) = attempts else {
        return Ok(Applied::Stale);
    };
    let (status, delay) = after_failure(kind, attempts, policy);
    sqlx::query(
        "UPDATE files SET status = $2, last_error = $3, next_attempt_at = now() + make_interval(secs => $4), \
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now() WHERE id = $1",
    )
    .bind(file_id)
    .bind(status)
    .bind(message)
    .bind(delay.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    let reason = match status {
        "error" => format!(
            "{message} (attempt {attempts}, retry in {}s)",
            delay.as_secs()
        ),
        _ => format!("{message} (attempt {attempts})"),
    };
    sqlx::query(
        "INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
         VALUES ($1, 'in_progress', $2, $3, $4)",
    )
    .bind(file_id)
    .bind(status)
    .bind(actor)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Applied::Moved(status))
}

/// Fails a claimed file for a reason found before any transfer (e.g. unsafe key).
pub(crate) async fn fail_permanently(
    db: &PgPool,
    coordinator: &str,
    file_id: i64,
    token: i64,
    why: &str,
) -> ApiResult<()> {
    let policy = RetryPolicy {
        max_attempts: 0,
        backoff: Backoff::new(Duration::ZERO, Duration::ZERO),
    };
    fail(
        db,
        &format!("coordinator:{coordinator}"),
        file_id,
        token,
        FailureKind::Permanent,
        why,
        &policy,
    )
    .await?;
    Ok(())
}

/// Records the outcome of a post-action (`done`, or the error text).
pub(crate) async fn record_post_action(
    db: &PgPool,
    agent: &str,
    r: &proto::PostActionResult,
) -> ApiResult<()> {
    let text = if r.ok {
        "done".to_string()
    } else {
        format!("error: {}", r.message)
    };
    let mut tx = db.begin().await?;
    let n = sqlx::query("UPDATE files SET post_action_result = $2, updated_at = now() WHERE id = $1 AND status = 'processed'")
        .bind(r.file_id)
        .bind(&text)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n == 1 {
        sqlx::query(
            "INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
             VALUES ($1, 'processed', 'processed', $2, $3)",
        )
        .bind(r.file_id)
        .bind(format!("agent:{agent}"))
        .bind(format!("post-action {text}"))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_statuses() {
        let p = RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(60)),
        };
        assert_eq!(after_failure(FailureKind::Lost, 1, &p).0, "lost");
        assert_eq!(after_failure(FailureKind::Permanent, 1, &p).0, "failed");
        let (st, delay) = after_failure(FailureKind::Transient, 2, &p);
        assert_eq!(st, "error");
        assert!(delay >= Duration::from_secs(2) && delay <= Duration::from_secs(4));
        assert_eq!(after_failure(FailureKind::Transient, 3, &p).0, "failed");
    }
}
