//! Retention: prunes what ferry no longer needs, older than
//! `FERRY_RETENTION_DAYS`, in small batches (no long locks; rows another
//! coordinator is pruning are skipped), every `FERRY_RETENTION_INTERVAL_SECS`.
//!
//! - **File rows** of `processed` (and baseline `skipped`) versions that are gone from the server
//!   (ferry deleted or moved them, or another version replaced them:
//!   `gone_at`) or whose watch or server was removed, with their history and
//!   published announcements. A processed version still on the server keeps
//!   its row: the row is what stops it from being ingested again.
//! - **History** (`file_events`) of the `processed` and `skipped` versions that keep their row.
//! - **Published announcements** (`outbox`) of any file.
//!
//! Never pruned: files in any other status, and announcements not yet
//! confirmed by the broker (pending or parked).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::StoreResult;

/// Rows per statement.
const BATCH: i64 = 1000;

/// How long to keep, and how often to prune.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retention {
    /// Keep this long; `None`: keep forever.
    pub keep: Option<Duration>,
    pub every: Duration,
}

/// What one pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pruned {
    pub files: u64,
    pub events: u64,
    pub announcements: u64,
}

/// Prunes every `every` until cancelled; does nothing when `keep` is `None`.
pub(crate) async fn run(db: PgPool, retention: Retention, cancel: CancellationToken) {
    let Some(keep) = retention.keep else {
        return;
    };
    loop {
        let pass = prune(&db, keep).await;
        if let Ok(p) = &pass {
            use crate::metrics::RETENTION_PRUNED;
            RETENTION_PRUNED.add(&["files"], p.files);
            RETENTION_PRUNED.add(&["events"], p.events);
            RETENTION_PRUNED.add(&["announcements"], p.announcements);
        }
        match pass {
            Ok(p) if p != Pruned::default() => tracing::info!(
                files = p.files,
                events = p.events,
                announcements = p.announcements,
                "retention pruned old rows"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "retention pass failed; trying again next interval")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(retention.every) => {}
        }
    }
}

/// One pass: batches until nothing older than `keep` is left to prune.
/// Each kind of row is walked in id order from where its last batch ended
/// (a keyset cursor), so a batch never reads again the index entries of the
/// rows the batches before it deleted (dead until vacuum: starting each batch
/// from the lowest id read all of them again, and a catch-up slowed down as
/// it went). Rows passed over (not prunable yet, or locked by another
/// coordinator) are looked at again by the next pass.
pub(crate) async fn prune(db: &PgPool, keep: Duration) -> StoreResult<Pruned> {
    let secs = keep.as_secs_f64();
    let mut total = Pruned::default();
    // The last id each kind's batches reached; 0 before the first.
    let (mut after_file, mut after_event, mut after_outbox) = (0i64, 0i64, 0i64);
    loop {
        let (files, events, announcements, last_file): (i64, i64, i64, Option<i64>) =
            sqlx::query_as(
                "WITH doomed AS ( \
                 SELECT f.id FROM files f \
                 JOIN watches w ON w.id = f.watch_id JOIN servers s ON s.id = f.server_id \
                 WHERE f.id > $3 AND f.status IN ('processed', 'skipped') \
                   AND f.updated_at < now() - make_interval(secs => $1) \
                   AND (f.gone_at IS NOT NULL OR w.deleted_at IS NOT NULL OR s.deleted_at IS NOT NULL) \
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.file_id = f.id AND o.published_at IS NULL) \
                 ORDER BY f.id LIMIT $2 FOR UPDATE OF f SKIP LOCKED), \
             gone_outbox AS (DELETE FROM outbox WHERE file_id IN (SELECT id FROM doomed) RETURNING 1), \
             gone_events AS (DELETE FROM file_events WHERE file_id IN (SELECT id FROM doomed) RETURNING 1), \
             gone_files AS (DELETE FROM files WHERE id IN (SELECT id FROM doomed) RETURNING 1) \
             SELECT (SELECT count(*) FROM gone_files), (SELECT count(*) FROM gone_events), \
                    (SELECT count(*) FROM gone_outbox), (SELECT max(id) FROM doomed)",
            )
            .bind(secs)
            .bind(BATCH)
            .bind(after_file)
            .fetch_one(db)
            .await?;
        let (history, last_event): (i64, Option<i64>) = sqlx::query_as(
            "WITH old AS ( \
                 SELECT e.id FROM file_events e JOIN files f ON f.id = e.file_id \
                 WHERE e.id > $3 AND f.status IN ('processed', 'skipped') \
                   AND e.at < now() - make_interval(secs => $1) \
                 ORDER BY e.id LIMIT $2), \
             gone AS (DELETE FROM file_events WHERE id IN (SELECT id FROM old) RETURNING 1) \
             SELECT (SELECT count(*) FROM gone), (SELECT max(id) FROM old)",
        )
        .bind(secs)
        .bind(BATCH)
        .bind(after_event)
        .fetch_one(db)
        .await?;
        let (published, last_outbox): (i64, Option<i64>) = sqlx::query_as(
            "WITH old AS ( \
                 SELECT id FROM outbox \
                 WHERE id > $3 AND published_at < now() - make_interval(secs => $1) \
                 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED), \
             gone AS (DELETE FROM outbox WHERE id IN (SELECT id FROM old) RETURNING 1) \
             SELECT (SELECT count(*) FROM gone), (SELECT max(id) FROM old)",
        )
        .bind(secs)
        .bind(BATCH)
        .bind(after_outbox)
        .fetch_one(db)
        .await?;
        after_file = last_file.unwrap_or(after_file);
        after_event = last_event.unwrap_or(after_event);
        after_outbox = last_outbox.unwrap_or(after_outbox);
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        total.files += count(files);
        total.events += count(events) + count(history);
        total.announcements += count(announcements) + count(published);
        if files < BATCH && history < BATCH && published < BATCH {
            return Ok(total);
        }
    }
}
