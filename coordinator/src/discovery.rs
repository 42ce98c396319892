//! Recording what agents discover: new file versions become `new` rows with a
//! `file_events` row (`NULL -> new`), idempotent on (watch, path, size, mtime)
//! among the versions still on the server, one statement per batch. Creating a
//! row is not a move between statuses, so it does not go through
//! [`crate::transitions`].
//!
//! **Invariant:** a version's post-action is the watch's setting when the
//! version was discovered (`files.post_action`, snapshotted here); changing the
//! watch later never reaches versions already recorded.
//!
//! A version that ferry deleted or moved away (`files.gone_at`) no longer
//! holds its identity: the same (path, size, mtime) seen again — `rsync -a`
//! or `scp -p` re-sending the same bytes — is a new version with a new row.
//!
//! **Baseline** (a watch added with "skip existing files",
//! `watches.baseline_pending`): the agent sends its first listing whole, as
//! baseline parts, recorded as `skipped` rows (never transferred or
//! announced; an admin retry makes one `new`); the last part clears the flag
//! in the same transaction. Until then ordinary batches of the watch are
//! neither recorded nor acknowledged (the agent sends them again), so no file
//! that was present is ingested and none that came later is skipped. A file
//! still being written during the baseline is skipped in that version and
//! ingested when it settles with another size or mtime.
//!
//! **Architecture invariant:** a discovery counts only from the agent holding
//! the server's poll lease, for a live watch of that server, and only for
//! entries inside the watch ([`WatchScope::check`]: under its directory,
//! matching its glob, respecting `recursive`, sane size and mtime). Other
//! entries are rejected one by one; the valid entries of the batch still land.

use anyhow::Context;
use ferry_common::discovery::{Entry, EntryFault, WatchScope};
use sqlx::{PgPool, Postgres, Transaction};

/// One file as an agent reported it (not yet checked).
#[derive(Debug, Clone)]
pub(crate) struct Discovered {
    pub path: String,
    pub size: u64,
    pub mtime_unix: i64,
}

/// What a batch carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchKind {
    /// Newly stable files (or a resend of the stable set).
    Ordinary,
    /// Part of the watch's baseline listing: every file present, recorded as
    /// `skipped`; `complete` on the last part.
    Baseline { complete: bool },
}

/// What became of a batch.
#[derive(Debug)]
pub(crate) enum BatchOutcome {
    /// The agent does not hold the server's poll lease, or the watch is not a
    /// live watch of that server: nothing was recorded.
    NotPolled,
    /// An ordinary batch of a watch whose baseline is not recorded yet:
    /// nothing was recorded and the batch must not be acknowledged, so the
    /// agent sends it again (after the baseline it is recorded normally).
    AwaitingBaseline,
    /// A baseline part for a watch whose baseline is already recorded (a
    /// second poller's late baseline): nothing was recorded, since files
    /// that appeared after the baseline must flow; the ordinary discovery of
    /// the same agent reports them.
    BaselineAlreadyTaken,
    Recorded(Recorded),
}

/// A batch from the poll-lease holder.
#[derive(Debug, Default)]
pub(crate) struct Recorded {
    /// New file rows (`skipped` ones for a baseline part).
    pub inserted: u64,
    /// Entries rejected as not being files of the watch.
    pub rejected: usize,
    /// The first rejected entry and why.
    pub example: Option<(String, EntryFault)>,
    /// This batch completed the watch's baseline.
    pub baseline_complete: bool,
}

#[derive(Debug, sqlx::FromRow)]
struct ScopeRow {
    directory: String,
    glob: String,
    recursive: bool,
    baseline_pending: bool,
}

/// Records the batch for `watch_id` of `server_id` if `agent` currently holds
/// the server's poll lease and the watch is live; entries outside the watch
/// are rejected individually.
pub(crate) async fn record_batch(
    db: &PgPool,
    agent: &str,
    server_id: i64,
    watch_id: i64,
    kind: BatchKind,
    entries: &[Discovered],
) -> anyhow::Result<BatchOutcome> {
    let mut tx = db.begin().await?;
    // The watch row is locked so a baseline part and the clearing of the
    // flag serialize with ordinary batches of the same watch.
    let scope: Option<ScopeRow> = sqlx::query_as(
        "SELECT w.directory, w.glob, w.recursive, w.baseline_pending \
         FROM watches w JOIN servers s ON s.id = w.server_id \
         WHERE w.id = $1 AND s.id = $2 AND w.deleted_at IS NULL AND w.enabled \
           AND s.deleted_at IS NULL AND s.enabled AND s.poller_agent = $3 \
         FOR SHARE OF w",
    )
    .bind(watch_id)
    .bind(server_id)
    .bind(agent)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(scope) = scope else {
        return Ok(BatchOutcome::NotPolled);
    };
    let status = match (kind, scope.baseline_pending) {
        (BatchKind::Ordinary, true) => return Ok(BatchOutcome::AwaitingBaseline),
        (BatchKind::Ordinary, false) => "new",
        (BatchKind::Baseline { .. }, false) => return Ok(BatchOutcome::BaselineAlreadyTaken),
        (BatchKind::Baseline { .. }, true) => "skipped",
    };
    let watch_scope = WatchScope::new(&scope.directory, &scope.glob, scope.recursive)
        .with_context(|| format!("watch {watch_id} as stored"))?;
    let mut recorded = Recorded::default();
    let mut valid: Vec<Entry> = Vec::with_capacity(entries.len());
    for e in entries {
        match watch_scope.check(&e.path, e.size, e.mtime_unix) {
            Ok(entry) => valid.push(entry),
            Err(fault) => {
                recorded.rejected += 1;
                recorded.example.get_or_insert((e.path.clone(), fault));
            }
        }
    }
    recorded.inserted = insert(&mut tx, agent, server_id, watch_id, status, &valid).await?;
    if kind == (BatchKind::Baseline { complete: true }) {
        sqlx::query("UPDATE watches SET baseline_pending = false WHERE id = $1")
            .bind(watch_id)
            .execute(&mut *tx)
            .await?;
        recorded.baseline_complete = true;
    }
    tx.commit().await?;
    Ok(BatchOutcome::Recorded(recorded))
}

/// Inserts checked entries in `status` (`new`, or `skipped` for a
/// baseline); the poll lease is checked again in the same statement, so a
/// lease that moved meanwhile records nothing.
async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    agent: &str,
    server_id: i64,
    watch_id: i64,
    status: &str,
    entries: &[Entry],
) -> sqlx::Result<u64> {
    if entries.is_empty() {
        return Ok(0);
    }
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    let sizes: Vec<i64> = entries.iter().map(|e| e.size).collect();
    let mtimes: Vec<i64> = entries.iter().map(|e| e.mtime_unix).collect();
    let reason = if status == "skipped" {
        "present when the watch was added with skip-existing (baseline)"
    } else {
        "discovered"
    };
    Ok(sqlx::query(
        "WITH allowed AS ( \
            SELECT w.id, w.post_action FROM watches w JOIN servers s ON s.id = w.server_id \
            WHERE w.id = $4 AND s.id = $5 AND w.deleted_at IS NULL AND w.enabled \
              AND s.deleted_at IS NULL AND s.enabled AND s.poller_agent = $6), \
         input AS (SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS t(path, size, mtime)), \
         ins AS ( \
            INSERT INTO files (server_id, watch_id, path, size, mtime_unix, post_action, status) \
            SELECT $5, allowed.id, input.path, input.size, input.mtime, allowed.post_action, $7 \
            FROM input CROSS JOIN allowed \
            ON CONFLICT (watch_id, path, size, mtime_unix) WHERE gone_at IS NULL DO NOTHING \
            RETURNING id) \
         INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
         SELECT id, NULL, $7, 'agent:' || $6, $8 FROM ins",
    )
    .bind(&paths)
    .bind(&sizes)
    .bind(&mtimes)
    .bind(watch_id)
    .bind(server_id)
    .bind(agent)
    .bind(status)
    .bind(reason)
    .execute(&mut **tx)
    .await?
    .rows_affected())
}
