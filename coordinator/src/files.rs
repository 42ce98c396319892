//! Queries over file versions and their history (`files`, `file_events`),
//! and the admin retry (applied through [`crate::transitions`]).

use chrono::{DateTime, Utc};
use ferry_common::domain::FileStatus;
use ferry_common::lifecycle::{Event, RetryPolicy};
use sqlx::PgPool;

use crate::error::{ApiError, ApiResult, StoreResult};
use crate::transitions::{self, Change};

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct FileRow {
    pub id: i64,
    pub server_id: i64,
    pub server_name: String,
    pub watch_id: i64,
    pub path: String,
    pub size: i64,
    pub mtime_unix: i64,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub fencing_token: i64,
    pub bucket: Option<String>,
    pub object_key: Option<String>,
    pub etag: Option<String>,
    pub sha256: Option<String>,
    pub post_action_result: Option<String>,
    pub discovered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub announcement: Option<String>,
    pub announcement_attempts: Option<i32>,
    pub announcement_error: Option<String>,
    /// Bytes done of the current assignment (0 unless `in_progress`).
    pub bytes_done: i64,
}

const FILE_SELECT: &str = "SELECT f.id, f.server_id, s.name AS server_name, f.watch_id, f.path, \
    f.size, f.mtime_unix, f.status, f.attempts, f.next_attempt_at, f.last_error, f.lease_owner, \
    f.lease_expires_at, f.fencing_token, f.bucket, f.object_key, f.etag, f.sha256, \
    CASE WHEN f.post_action_result IS NULL AND f.post_action_error IS NOT NULL \
         THEN 'retrying after ' || f.post_action_attempts || ' failed attempts: ' || f.post_action_error \
         ELSE f.post_action_result END AS post_action_result, f.discovered_at, f.updated_at, \
    o.announcement, o.announcement_attempts, o.announcement_error, \
    CASE WHEN f.status = 'in_progress' AND f.progress_token = f.fencing_token \
         THEN f.bytes_done ELSE 0 END AS bytes_done \
    FROM files f JOIN servers s ON s.id = f.server_id \
    LEFT JOIN LATERAL (SELECT CASE WHEN published_at IS NOT NULL THEN 'published' \
                                   WHEN parked_at IS NOT NULL THEN 'parked' ELSE 'pending' END AS announcement, \
                              attempts AS announcement_attempts, last_error AS announcement_error \
                       FROM outbox WHERE file_id = f.id ORDER BY id DESC LIMIT 1) o ON true";

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct EventRow {
    pub id: i64,
    pub file_id: i64,
    pub at: DateTime<Utc>,
    pub from_status: Option<String>,
    pub to_status: String,
    pub actor: String,
    pub reason: String,
    pub path: String,
    pub server_id: i64,
    pub watch_id: i64,
}

const EVENT_SELECT: &str = "SELECT e.id, e.file_id, e.at, e.from_status, e.to_status, e.actor, \
    e.reason, f.path, f.server_id, f.watch_id FROM file_events e JOIN files f ON f.id = e.file_id";

/// Filter and page of a file listing.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileFilter {
    pub statuses: Vec<FileStatus>,
    pub server_id: Option<i64>,
    pub watch_id: Option<i64>,
    /// Newest (highest id) first instead of oldest first.
    pub newest_first: bool,
    /// Keyset pagination: return files after this id in the listing's order
    /// (`None` on the first page).
    pub after_id: Option<i64>,
    pub limit: i64,
}

/// One page of files in id order (descending when `newest_first`), and
/// whether more follow.
pub(crate) async fn list_files(
    db: &PgPool,
    filter: &FileFilter,
) -> ApiResult<(Vec<FileRow>, bool)> {
    let statuses: Vec<String> = filter
        .statuses
        .iter()
        .map(|s| s.as_str().to_string())
        .collect();
    let (after, order) = if filter.newest_first {
        ("($1::BIGINT IS NULL OR f.id < $1)", "f.id DESC")
    } else {
        ("($1::BIGINT IS NULL OR f.id > $1)", "f.id")
    };
    let sql = format!(
        "{FILE_SELECT} WHERE {after} AND (cardinality($2::TEXT[]) = 0 OR f.status = ANY($2)) \
         AND ($3::BIGINT IS NULL OR f.server_id = $3) AND ($4::BIGINT IS NULL OR f.watch_id = $4) \
         ORDER BY {order} LIMIT $5"
    );
    let mut rows = sqlx::query_as::<_, FileRow>(&sql)
        .bind(filter.after_id)
        .bind(&statuses)
        .bind(filter.server_id)
        .bind(filter.watch_id)
        .bind(filter.limit + 1)
        .fetch_all(db)
        .await?;
    let more = rows.len() as i64 > filter.limit;
    rows.truncate(filter.limit as usize);
    Ok((rows, more))
}

pub(crate) async fn get_file(db: &PgPool, id: i64) -> ApiResult<FileRow> {
    let sql = format!("{FILE_SELECT} WHERE f.id = $1");
    sqlx::query_as::<_, FileRow>(&sql)
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no file with id {id}")))
}

/// The file waiting longest for a transfer (status new or error, oldest
/// discovery first), if any.
pub(crate) async fn oldest_waiting(db: &PgPool) -> ApiResult<Option<FileRow>> {
    let sql = format!(
        "{FILE_SELECT} WHERE f.status IN ('new', 'error') ORDER BY f.discovered_at, f.id LIMIT 1"
    );
    Ok(sqlx::query_as::<_, FileRow>(&sql)
        .fetch_optional(db)
        .await?)
}

pub(crate) async fn file_events(db: &PgPool, file_id: i64) -> ApiResult<Vec<EventRow>> {
    let sql = format!("{EVENT_SELECT} WHERE e.file_id = $1 ORDER BY e.id");
    Ok(sqlx::query_as::<_, EventRow>(&sql)
        .bind(file_id)
        .fetch_all(db)
        .await?)
}

/// Events after `after_id`, optionally of one server / watch (for live streams).
/// Events of the transactions in `window` (see [`event_horizon`]) with an id
/// above `after_id`, in id order, at most 1000.
pub(crate) async fn events_in(
    db: &PgPool,
    window: &EventWindow,
    after_id: i64,
    server_id: Option<i64>,
    watch_id: Option<i64>,
) -> ApiResult<Vec<EventRow>> {
    let sql = format!(
        "{EVENT_SELECT} WHERE e.xid >= $1::text::xid8 AND e.xid < $2::text::xid8 AND e.id > $3 \
         AND ($4::BIGINT IS NULL OR f.server_id = $4) \
         AND ($5::BIGINT IS NULL OR f.watch_id = $5) ORDER BY e.id LIMIT 1000"
    );
    Ok(sqlx::query_as::<_, EventRow>(&sql)
        .bind(&window.from)
        .bind(&window.to)
        .bind(after_id)
        .bind(server_id)
        .bind(watch_id)
        .fetch_all(db)
        .await?)
}

/// Transactions `[from, to)` (xid8 as text) whose events are all committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventWindow {
    pub from: String,
    pub to: String,
}

/// The oldest transaction of this database still running: every
/// transaction of this database below it has finished, so its events are all
/// visible and no more will appear. Events are delivered window by window up
/// to it.
///
/// Transactions of other databases on the same Postgres do not count: the
/// cluster-wide `xmin` of a snapshot would hold every stream back for as long
/// as any client anywhere on the server keeps a write transaction open.
pub(crate) async fn event_horizon(db: &PgPool) -> ApiResult<String> {
    let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
        .fetch_one(db)
        .await?;
    // Read after the snapshot (a statement of its own): a transaction the
    // snapshot saw running either still shows its xid here, or has ended.
    let ours: Vec<String> = sqlx::query_scalar(
        "SELECT backend_xid::text FROM pg_stat_activity \
         WHERE datname = current_database() AND backend_xid IS NOT NULL \
         UNION ALL \
         SELECT transaction::text FROM pg_prepared_xacts WHERE database = current_database()",
    )
    .fetch_all(db)
    .await?;
    let ours: Vec<u32> = ours.iter().filter_map(|x| x.parse().ok()).collect();
    horizon_of(&snapshot, &ours)
        .map(|h| h.to_string())
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("unreadable snapshot {snapshot:?}")))
}

/// The horizon (pure): the lowest transaction the snapshot
/// (`xmin:xmax:xip,...`, 64-bit ids) saw running that belongs to this
/// database (`ours`: 32-bit ids of this database's running transactions),
/// or the snapshot's `xmax` if none does.
pub(crate) fn horizon_of(snapshot: &str, ours: &[u32]) -> Option<u64> {
    let mut parts = snapshot.split(':');
    let (Some(xmin), Some(xmax), Some(running), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let (xmin, xmax): (u64, u64) = (xmin.parse().ok()?, xmax.parse().ok()?);
    let running = running
        .split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<u64>().ok())
        .collect::<Option<Vec<u64>>>()?;
    // A 64-bit id is the epoch and the 32-bit id.
    let oldest_ours = running
        .into_iter()
        .filter(|x| ours.contains(&(*x as u32)))
        .min();
    Some(oldest_ours.unwrap_or(xmax).max(xmin))
}

/// Which files a retry requeues.
#[derive(Debug, Clone, Default)]
pub(crate) struct RetrySelection {
    pub ids: Vec<i64>,
    /// Defaults to error, failed and lost, plus skipped when `ids` are given.
    pub statuses: Vec<FileStatus>,
    pub server_id: Option<i64>,
    /// Do everything in the transaction, report it, then roll it back.
    pub dry_run: bool,
}

/// Most file ids a retry answers with (its count covers them all), so the
/// answer stays small whatever the selection.
pub(crate) const RETRY_IDS_MAX: usize = 1000;

/// What a retry did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetryOutcome {
    /// Files requeued + announcements unparked + post-actions re-armed.
    pub count: u64,
    /// The first [`RETRY_IDS_MAX`] files concerned, ascending, each once.
    pub file_ids: Vec<i64>,
}

/// Requeues the selected files as `new` (attempts reset), with a history row
/// each, in one transaction. Only files the lifecycle lets an admin retry
/// (error, failed, lost, and skipped when named by id or status) move;
/// others are left alone. When no status filter
/// narrows the selection, parked announcements are offered again and the
/// failed post-actions (`failed after N attempts: ...`) of selected
/// `processed` files are re-armed with fresh attempts (refused ones are not:
/// the path holds another version). Returns how many rows moved or re-armed,
/// and which files. A dry run takes the same path and rolls it back, so it
/// reports exactly what the retry would do at that moment.
pub(crate) async fn retry_files(
    db: &PgPool,
    sel: &RetrySelection,
    actor: &str,
    policy: &RetryPolicy,
) -> StoreResult<RetryOutcome> {
    let statuses: Vec<&str> = if sel.statuses.is_empty() {
        // Named files may be baseline (`skipped`) ones; a blanket retry
        // takes the failures only.
        let named = !sel.ids.is_empty();
        FileStatus::ALL
            .into_iter()
            .filter(|s| s.is_retried_by_default() || (named && s.is_retryable_by_admin()))
            .map(FileStatus::as_str)
            .collect()
    } else {
        sel.statuses.iter().map(|s| s.as_str()).collect()
    };
    let mut tx = db.begin().await?;
    let picked: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM files \
         WHERE status = ANY($1) \
           AND (cardinality($2::BIGINT[]) = 0 OR id = ANY($2)) \
           AND ($3::BIGINT IS NULL OR server_id = $3) \
         ORDER BY id FOR UPDATE",
    )
    .bind(&statuses)
    .bind(&sel.ids)
    .bind(sel.server_id)
    .fetch_all(&mut *tx)
    .await?;
    let changes: Vec<Change> = picked
        .into_iter()
        .map(|id| Change::new(id, Event::AdminRetry))
        .collect();
    let applied = transitions::apply(&mut tx, actor, policy, &changes).await?;
    // Parked announcements of the selected stored files are offered to the
    // broker again when no status filter narrows the selection.
    let moved: Vec<i64> = applied
        .iter()
        .filter(|a| a.outcome.moved_to().is_some())
        .map(|a| a.file_id)
        .collect();
    let (unparked, rearmed) = if sel.statuses.is_empty() {
        (
            unpark_announcements(&mut tx, sel).await?,
            rearm_post_actions(&mut tx, sel, actor).await?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    if sel.dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    let count = (moved.len() + unparked.len() + rearmed.len()) as u64;
    let mut file_ids: Vec<i64> = moved.into_iter().chain(unparked).chain(rearmed).collect();
    file_ids.sort_unstable();
    file_ids.dedup();
    file_ids.truncate(RETRY_IDS_MAX);
    Ok(RetryOutcome { count, file_ids })
}

/// Offers the parked announcements of the selected files to the broker again;
/// returns the file id of each (one per unparked row).
async fn unpark_announcements(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sel: &RetrySelection,
) -> StoreResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "UPDATE outbox o SET parked_at = NULL, attempts = 0, next_attempt_at = now() \
         FROM files f WHERE f.id = o.file_id AND o.parked_at IS NOT NULL \
           AND o.published_at IS NULL \
           AND (cardinality($1::BIGINT[]) = 0 OR f.id = ANY($1)) \
           AND ($2::BIGINT IS NULL OR f.server_id = $2) \
         RETURNING o.file_id",
    )
    .bind(&sel.ids)
    .bind(sel.server_id)
    .fetch_all(&mut **tx)
    .await?)
}

/// Makes the failed post-actions of the selected `processed` files pending
/// again, attempts reset, with a history row each; returns their ids.
async fn rearm_post_actions(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sel: &RetrySelection,
    actor: &str,
) -> StoreResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "WITH rearmed AS ( \
            UPDATE files SET post_action_result = NULL, post_action_attempts = 0, \
                   post_action_error = NULL, post_action_next_at = now(), \
                   post_action_agent = NULL, updated_at = now() \
            WHERE status = 'processed' AND post_action_result LIKE 'failed%' \
              AND (cardinality($1::BIGINT[]) = 0 OR id = ANY($1)) \
              AND ($2::BIGINT IS NULL OR server_id = $2) \
            RETURNING id) \
         INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
         SELECT id, 'processed', 'processed', $3, 'post-action re-armed by admin retry' FROM rearmed \
         RETURNING file_id",
    )
    .bind(&sel.ids)
    .bind(sel.server_id)
    .bind(actor)
    .fetch_all(&mut **tx)
    .await?)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct AgentRow {
    /// The identity, `site/name`.
    pub id: String,
    pub name: String,
    pub site: String,
    pub version: String,
    pub capacity: i32,
    pub connected: bool,
    pub connected_coordinator: Option<String>,
    pub connected_at: Option<DateTime<Utc>>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub in_flight: i32,
    pub files_transferred: i64,
    pub bytes_transferred: i64,
    pub errors: i64,
    pub draining: bool,
    pub bytes_per_sec: i64,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
    pub unavailable: Option<String>,
    pub polled_servers: Vec<String>,
}

/// Up to `limit` agents after the identity `after` (all when `None`), in
/// identity (`site/name`) order; only the agent `only` (an identity) when given.
pub(crate) async fn list_agents(
    db: &PgPool,
    after: Option<&str>,
    only: Option<&str>,
    limit: i64,
) -> ApiResult<Vec<AgentRow>> {
    Ok(sqlx::query_as::<_, AgentRow>(
        "SELECT a.id, a.name, a.site, a.version, a.capacity, a.connected, a.connected_coordinator, \
         a.connected_at, a.last_seen_at, a.in_flight, a.files_transferred, a.bytes_transferred, \
         a.errors, a.draining, a.bytes_per_sec, a.revoked_at, a.revoked_by, a.unavailable, COALESCE(array_agg(s.name ORDER BY s.name) FILTER (WHERE s.id IS NOT NULL), '{}') \
         AS polled_servers FROM agents a \
         LEFT JOIN servers s ON s.poller_agent = a.id AND s.deleted_at IS NULL \
         WHERE ($1::TEXT IS NULL OR a.id > $1) AND ($3::TEXT IS NULL OR a.id = $3) \
         GROUP BY a.site, a.name ORDER BY a.id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .bind(only)
    .fetch_all(db)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactions_of_other_databases_do_not_hold_the_horizon_back() {
        assert_eq!(horizon_of("10:20:", &[]), Some(20));
        assert_eq!(horizon_of("10:20:10,15", &[]), Some(20));
        assert_eq!(horizon_of("10:20:10,15", &[99]), Some(20));
    }

    #[test]
    fn the_oldest_running_transaction_of_this_database_is_the_horizon() {
        assert_eq!(horizon_of("10:20:10,15,17", &[17, 15]), Some(15));
        // 64-bit ids carry the epoch above the 32-bit id.
        let epoch1 = 1u64 << 32;
        let snapshot = format!(
            "{}:{}:{},{}",
            epoch1 + 3,
            epoch1 + 9,
            epoch1 + 3,
            epoch1 + 5
        );
        assert_eq!(horizon_of(&snapshot, &[5]), Some(epoch1 + 5));
    }

    #[test]
    fn an_unreadable_snapshot_is_none() {
        for bad in ["", "10:20", "10:x:", "10:20:1,y", "1:2:3:4"] {
            assert_eq!(horizon_of(bad, &[]), None, "{bad:?}");
        }
    }
}
