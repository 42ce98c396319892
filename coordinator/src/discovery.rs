//! Recording what agents discover: new file versions become `new` rows with a
//! `file_events` row (`NULL -> new`), idempotent on (watch, path, size, mtime),
//! one statement per batch. Creating a row is not a move between statuses, so
//! it does not go through [`crate::transitions`].

use sqlx::PgPool;

use crate::error::StoreResult;

/// One stable remote file reported by an agent.
#[derive(Debug, Clone)]
pub(crate) struct Discovered {
    pub path: String,
    pub size: i64,
    pub mtime_unix: i64,
}

/// Inserts the batch for `watch_id` of `server_id`, if `agent` currently holds
/// the server's poll lease and the watch is live. Returns the number of new rows.
pub(crate) async fn record_batch(
    db: &PgPool,
    agent: &str,
    server_id: i64,
    watch_id: i64,
    entries: &[Discovered],
) -> StoreResult<u64> {
    if entries.is_empty() {
        return Ok(0);
    }
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    let sizes: Vec<i64> = entries.iter().map(|e| e.size).collect();
    let mtimes: Vec<i64> = entries.iter().map(|e| e.mtime_unix).collect();
    let inserted = sqlx::query(
        "WITH allowed AS ( \
            SELECT w.id FROM watches w JOIN servers s ON s.id = w.server_id \
            WHERE w.id = $4 AND s.id = $5 AND w.deleted_at IS NULL AND w.enabled \
              AND s.deleted_at IS NULL AND s.enabled AND s.poller_agent = $6), \
         input AS (SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS t(path, size, mtime)), \
         ins AS ( \
            INSERT INTO files (server_id, watch_id, path, size, mtime_unix) \
            SELECT $5, allowed.id, input.path, input.size, input.mtime FROM input CROSS JOIN allowed \
            ON CONFLICT (watch_id, path, size, mtime_unix) DO NOTHING RETURNING id) \
         INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
         SELECT id, NULL, 'new', 'agent:' || $6, 'discovered' FROM ins",
    )
    .bind(&paths)
    .bind(&sizes)
    .bind(&mtimes)
    .bind(watch_id)
    .bind(server_id)
    .bind(agent)
    .execute(db)
    .await?
    .rows_affected();
    Ok(inserted)
}
