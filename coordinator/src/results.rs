//! What agents report about their transfers: results become lifecycle events
//! applied in batches by [`crate::transitions`] (which checks the lease holder and the
//! fencing token and, on success, the assigned location, and writes the
//! outbox row in the same transaction); progress renews the lease;
//! post-action outcomes are recorded on `processed` files.
//!
//! **Architecture invariant:** everything here counts only for the agent it
//! was given to. A result or progress report counts only if the reporting
//! agent holds the file's lease, its fencing token is the file's current one
//! and the file is still `in_progress`; renewal never changes the owner. A
//! post-action outcome counts only from the agent the post-action was sent
//! to (`files.post_action_agent`). Anything else is ignored: safety does not
//! rest on fencing tokens being unguessable.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ferry_common::lifecycle::{Event, FailureKind, RetryPolicy, Stored};
use ferry_proto::convert::failure_kind_from_wire;
use ferry_proto::{self as proto, task_result::Outcome as WireOutcome};
use sqlx::PgPool;

use crate::error::StoreResult;
use crate::post_actions::{self, Answer, Verdict};
use crate::transitions::{self, Change, Outcome};

/// Renews the lease of a running transfer that `agent` holds (progress
/// report with its `bytes_done`, or a transfer that survived a reconnect,
/// `None`). False if it does not hold it (any more): another agent's lease
/// is never touched.
pub(crate) async fn renew_lease(
    db: &PgPool,
    file_id: i64,
    token: u64,
    agent: &str,
    lease: Duration,
    bytes_done: Option<u64>,
) -> StoreResult<bool> {
    let Ok(token) = i64::try_from(token) else {
        return Ok(false);
    };
    let bytes_done = bytes_done.map(|b| i64::try_from(b).unwrap_or(i64::MAX));
    let n = sqlx::query(
        "UPDATE files SET lease_expires_at = now() + make_interval(secs => $4), \
         bytes_done = COALESCE($5, bytes_done), \
         progress_token = CASE WHEN $5::BIGINT IS NULL THEN progress_token ELSE fencing_token END \
         WHERE id = $1 AND fencing_token = $2 AND status = 'in_progress' AND lease_owner = $3",
    )
    .bind(file_id)
    .bind(token)
    .bind(agent)
    .bind(lease.as_secs_f64())
    .bind(bytes_done)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Renews, in one statement, the leases of the transfers a reconnecting
/// agent says are still running (`Hello.running_tasks`); returns the ids it
/// still holds with those tokens. Like [`renew_lease`], another agent's
/// lease is never touched.
pub(crate) async fn renew_running(
    db: &PgPool,
    running: &[proto::RunningTask],
    agent: &str,
    lease: Duration,
) -> StoreResult<Vec<i64>> {
    let (ids, tokens): (Vec<i64>, Vec<i64>) = running
        .iter()
        .filter_map(|t| Some((t.file_id, i64::try_from(t.fencing_token).ok()?)))
        .unzip();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "UPDATE files f SET lease_expires_at = now() + make_interval(secs => $4) \
         FROM unnest($1::BIGINT[], $2::BIGINT[]) AS t(id, token) \
         WHERE f.id = t.id AND f.fencing_token = t.token AND f.status = 'in_progress' \
           AND f.lease_owner = $3 \
         RETURNING f.id",
    )
    .bind(&ids)
    .bind(&tokens)
    .bind(agent)
    .bind(lease.as_secs_f64())
    .fetch_all(db)
    .await?)
}

/// The lifecycle event an agent's result stands for.
fn event(result: &proto::TaskResult) -> Event {
    match &result.outcome {
        Some(WireOutcome::Success(ok)) => Event::Stored(Stored {
            bucket: ok.bucket.clone(),
            key: ok.key.clone(),
            etag: ok.etag.clone(),
            size: ok.size,
            sha256: ok.sha256.clone(),
            stored_announcement_id: Some(ok.stored_announcement_id.clone())
                .filter(|id| !id.is_empty()),
        }),
        Some(WireOutcome::Failure(f)) => Event::TransferFailed {
            kind: failure_kind_from_wire(f.kind),
            message: f.message.clone(),
        },
        None => Event::TransferFailed {
            kind: FailureKind::Transient,
            message: "empty result".into(),
        },
    }
}

/// Splits `results` into runs in which no file appears twice, keeping their
/// order: a file may be reported twice in a row (a result sent again), and
/// within one batch [`transitions::apply`] counts only a file's first change.
fn runs(results: &[proto::TaskResult]) -> Vec<&[proto::TaskResult]> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut seen = HashSet::new();
    for (i, r) in results.iter().enumerate() {
        if !seen.insert(r.file_id) {
            runs.push(&results[start..i]);
            start = i;
            seen.clear();
            seen.insert(r.file_id);
        }
    }
    if start < results.len() {
        runs.push(&results[start..]);
    }
    runs
}

/// Applies transfer results of `agent`, in order, each stale unless `agent`
/// holds the file's lease with its fencing token: one transaction (one
/// statement per table) per run of distinct files. Returns one outcome per
/// result, in order.
pub(crate) async fn apply(
    db: &PgPool,
    agent: &str,
    results: &[proto::TaskResult],
    policy: &RetryPolicy,
) -> StoreResult<Vec<Outcome>> {
    let actor = format!("agent:{agent}");
    let mut outcomes = Vec::with_capacity(results.len());
    for run in runs(results) {
        let changes: Vec<Change> = run
            .iter()
            .filter_map(|r| {
                let token = i64::try_from(r.fencing_token).ok()?;
                Some(Change::fenced(r.file_id, token, event(r)).held_by(agent))
            })
            .collect();
        let applied = transitions::apply_batch(db, &actor, policy, &changes).await?;
        let mut by_file: HashMap<i64, Outcome> = applied
            .into_iter()
            .map(|a| (a.file_id, a.outcome))
            .collect();
        // A token that does not fit is no current assignment: stale.
        outcomes.extend(
            run.iter()
                .map(|r| by_file.remove(&r.file_id).unwrap_or(Outcome::Stale)),
        );
    }
    Ok(outcomes)
}

/// Records an agent's answer to a post-action if it was sent to `agent` and
/// is still pending, as [`post_actions::judge`] decides: final (`done`,
/// `refused: ...`, `failed after N attempts: ...`; done and refused mark the
/// version gone from the server) or a retry after a backoff. Not a status
/// change: the file stays `processed`, with a history row. Returns whether it
/// was recorded.
pub(crate) async fn record_post_action(
    db: &PgPool,
    agent: &str,
    r: &proto::PostActionResult,
    policy: &RetryPolicy,
) -> StoreResult<bool> {
    let mut tx = db.begin().await?;
    let attempts: Option<i32> = sqlx::query_scalar(
        "SELECT post_action_attempts FROM files \
         WHERE id = $1 AND status = 'processed' AND post_action_result IS NULL \
           AND post_action_agent = $2 FOR UPDATE",
    )
    .bind(r.file_id)
    .bind(agent)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(attempts) = attempts else {
        return Ok(false);
    };
    let reason = match post_actions::judge(&Answer::from_wire(r), attempts, policy) {
        Verdict::Final { result, gone } => {
            sqlx::query(
                "UPDATE files SET post_action_result = $2, post_action_agent = NULL, \
                   gone_at = CASE WHEN $3 THEN now() ELSE gone_at END, updated_at = now() \
                 WHERE id = $1",
            )
            .bind(r.file_id)
            .bind(&result)
            .bind(gone)
            .execute(&mut *tx)
            .await?;
            format!("post-action {result}")
        }
        Verdict::Retry {
            attempts,
            error,
            delay,
        } => {
            sqlx::query(
                "UPDATE files SET post_action_attempts = $2, post_action_error = $3, \
                   post_action_next_at = now() + make_interval(secs => $4), \
                   post_action_agent = NULL, updated_at = now() \
                 WHERE id = $1",
            )
            .bind(r.file_id)
            .bind(attempts)
            .bind(&error)
            .bind(delay.as_secs_f64())
            .execute(&mut *tx)
            .await?;
            format!(
                "post-action attempt {attempts} failed: {error} (retry in {}s)",
                delay.as_secs()
            )
        }
    };
    sqlx::query(
        "INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
         VALUES ($1, 'processed', 'processed', $2, $3)",
    )
    .bind(r.file_id)
    .bind(format!("agent:{agent}"))
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_file_starts_a_new_run() {
        let r = |file_id| proto::TaskResult {
            file_id,
            fencing_token: 1,
            outcome: None,
        };
        let results = [r(1), r(2), r(1), r(3), r(3)];
        let ids: Vec<Vec<i64>> = runs(&results)
            .iter()
            .map(|run| run.iter().map(|r| r.file_id).collect())
            .collect();
        assert_eq!(ids, vec![vec![1, 2], vec![1, 3], vec![3]]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn results_become_events() {
        let ok = proto::TaskResult {
            file_id: 1,
            fencing_token: 2,
            outcome: Some(WireOutcome::Success(proto::TaskSuccess {
                size: 3,
                sha256: "s".into(),
                etag: "e".into(),
                key: "k".into(),
                bucket: "b".into(),
                stored_announcement_id: "u-1".into(),
            })),
        };
        assert_eq!(
            event(&ok),
            Event::Stored(Stored {
                bucket: "b".into(),
                key: "k".into(),
                etag: "e".into(),
                size: 3,
                sha256: "s".into(),
                stored_announcement_id: Some("u-1".into()),
            })
        );
        let lost = proto::TaskResult {
            outcome: Some(WireOutcome::Failure(proto::TaskFailure {
                kind: proto::FailureKind::Lost as i32,
                message: "vanished".into(),
            })),
            ..ok.clone()
        };
        assert_eq!(
            event(&lost),
            Event::TransferFailed {
                kind: FailureKind::Lost,
                message: "vanished".into()
            }
        );
        let empty = proto::TaskResult {
            outcome: None,
            ..ok
        };
        assert!(matches!(
            event(&empty),
            Event::TransferFailed {
                kind: FailureKind::Transient,
                ..
            }
        ));
    }
}
