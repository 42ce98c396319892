//! File counts by server and status without reading `files` (migration
//! 0029): what `/metrics` and `GetStatus` show, at the same cost for 100 M
//! file rows as for 1,000.
//!
//! Writers only append deltas (`file_count_deltas`), by the triggers of
//! migration 0029 on `files` (statement triggers for inserted and deleted
//! rows, a row trigger for a changed status), so every path that changes a
//! file is counted, ferry's or an operator's SQL. [`run`] folds the deltas into
//! `file_counts` every [`FOLD_EVERY`] on whichever coordinator takes the
//! fold's advisory lock; a reader adds the deltas not folded yet, so counts
//! are exact as of its snapshot.
//!
//! **Invariant:** a count is `file_counts` plus the unfolded deltas, and every
//! insert, delete or status change of a `files` row appends its delta in its
//! own transaction.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::StoreResult;

/// How often the deltas are folded into the counts.
pub(crate) const FOLD_EVERY: Duration = Duration::from_secs(5);
/// Advisory lock key of the fold: one coordinator folds at a time.
const FOLD_LOCK: i64 = 0x6665_7272_7963_6e74; // "ferrycnt"

/// Folds the deltas into the counts until cancelled.
pub(crate) async fn run(db: PgPool, cancel: CancellationToken) {
    loop {
        if let Err(e) = fold(&db).await {
            tracing::warn!(error = %e, "folding file counts failed; trying again");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(FOLD_EVERY) => {}
        }
    }
}

/// Moves the committed deltas into `file_counts`, in one transaction;
/// false when another coordinator is folding right now.
pub(crate) async fn fold(db: &PgPool) -> StoreResult<bool> {
    let mut tx = db.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(FOLD_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(false);
    }
    sqlx::query(
        "WITH folded AS (DELETE FROM file_count_deltas RETURNING server_id, status, n) \
         INSERT INTO file_counts AS c (server_id, status, n) \
         SELECT server_id, status, sum(n) FROM folded GROUP BY server_id, status \
         ON CONFLICT (server_id, status) DO UPDATE SET n = c.n + excluded.n",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM file_counts WHERE n = 0")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// The current counts as a query (`server_id`, `status`, `n`), nonzero
/// ones only: the folded counts plus the deltas not folded yet.
pub(crate) const CURRENT: &str = "SELECT server_id, status, sum(n)::BIGINT AS n FROM ( \
         SELECT server_id, status, n FROM file_counts \
         UNION ALL SELECT server_id, status, n FROM file_count_deltas) c \
     GROUP BY server_id, status HAVING sum(n) <> 0";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transitions::tests::Db;

    /// One file count: files of `server_id` in `status`.
    #[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
    struct FileCount {
        server_id: i64,
        status: String,
        n: i64,
    }

    /// Every nonzero count as the store keeps it, by server and status.
    async fn all(db: &PgPool) -> StoreResult<Vec<FileCount>> {
        Ok(
            sqlx::query_as(&format!("{CURRENT} ORDER BY server_id, status"))
                .fetch_all(db)
                .await?,
        )
    }

    /// What counting `files` row by row says.
    async fn counted(db: &PgPool) -> Vec<FileCount> {
        sqlx::query_as(
            "SELECT server_id, status, count(*) AS n FROM files \
             GROUP BY server_id, status ORDER BY server_id, status",
        )
        .fetch_all(db)
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn counts_follow_inserts_status_changes_and_deletes_across_folds() {
        let db = Db::create().await;
        let (a, b) = db.seed().await;
        assert_eq!(all(&db.pool).await.unwrap(), counted(&db.pool).await);
        // A status change through the store, before and after a fold.
        let policy = ferry_common::lifecycle::RetryPolicy {
            max_attempts: 3,
            backoff: ferry_common::backoff::Backoff::new(
                Duration::from_secs(1),
                Duration::from_secs(1),
            ),
        };
        let assign = |id| {
            crate::transitions::Change::new(
                id,
                ferry_common::lifecycle::Event::Assigned {
                    agent: "default/a1".into(),
                    lease: Duration::from_secs(60),
                },
            )
        };
        crate::transitions::apply_batch(&db.pool, "test", &policy, &[assign(a)])
            .await
            .unwrap();
        assert_eq!(all(&db.pool).await.unwrap(), counted(&db.pool).await);
        assert!(fold(&db.pool).await.unwrap());
        assert_eq!(all(&db.pool).await.unwrap(), counted(&db.pool).await);
        crate::transitions::apply_batch(&db.pool, "test", &policy, &[assign(b)])
            .await
            .unwrap();
        sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(a)
            .execute(&db.pool)
            .await
            .unwrap();
        assert_eq!(all(&db.pool).await.unwrap(), counted(&db.pool).await);
        assert!(fold(&db.pool).await.unwrap());
        let after = all(&db.pool).await.unwrap();
        assert_eq!(after, counted(&db.pool).await);
        assert_eq!(after.len(), 1, "{after:?}");
        assert_eq!((after[0].status.as_str(), after[0].n), ("in_progress", 1));
        // Folded: nothing left to add.
        let deltas: i64 = sqlx::query_scalar("SELECT count(*) FROM file_count_deltas")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(deltas, 0);
        db.drop().await;
    }
}
