//! The one place file statuses change: applies a batch of lifecycle events
//! ([`ferry_common::lifecycle`]) in one transaction.
//!
//! [`apply`] locks the batch's rows (`FOR UPDATE`, in id order), checks each
//! change's guard against its row, asks the pure table where the event leads,
//! then writes with set-based statements (`unnest` arrays, one statement per
//! table, not one per file): the `files` columns each event owns, one
//! `file_events` row per move, and for `Stored` the `outbox` row carrying the
//! [`Announcement`], built here from the locked row; a move to `failed` or
//! `lost` writes a [`FailureAnnouncement`] row the same way, unless
//! [`announce_failures`] turned that off (`FERRY_ANNOUNCE_FAILURES=false`).
//!
//! **Architecture invariant:** the fencing and ownership checks live here. A
//! change that names a fencing token (an agent's result, the rejection of a
//! claim) counts only while the file is `in_progress` with exactly that
//! token; a change that names a lease holder (every agent's result) counts
//! only while that agent holds the lease, so a guessed token changes nothing;
//! a lease expiry counts only while the named owner still holds an expired
//! lease. Anything else is [`Outcome::Stale`] and writes nothing.
//!
//! **Architecture invariant:** the object location is the assigned one. A
//! `Stored` report is checked against the file's size and the location the
//! scheduler assigned (`files.assigned_bucket`/`assigned_key`,
//! [`ferry_common::lifecycle::Stored::mismatch`]); one that differs is a
//! failed attempt, and the location written and announced is the assigned one.
//!
//! Every status change goes through here: the scheduler's claim and lease
//! reaper, transfer results, rejections of unsafe keys, the relay's confirms
//! and admin retries. Two writes stay outside, because they are not moves
//! between statuses: discovery inserts new rows with their first event
//! (`NULL -> new`, [`crate::discovery`], one idempotent `INSERT ... ON
//! CONFLICT` per batch), and post-action outcomes are recorded on `processed`
//! files ([`crate::results::record_post_action`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_common::announcement::{Announcement, Failure, FailureAnnouncement, SCHEMA_VERSION};
use ferry_common::domain::FileStatus;
use ferry_common::keys;
use ferry_common::lifecycle::{
    self, Event, Expected, FailureKind, IllegalTransition, RetryPolicy, Stored, Transition,
};
use sqlx::{PgConnection, PgPool};

use crate::error::{StoreError, StoreResult};

/// One event for one file.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub file_id: i64,
    pub event: Event,
    /// The assignment this change belongs to: `Some` for agents' results and
    /// rejections of a claim, checked against the file's fencing token.
    pub token: Option<i64>,
    /// The agent that must hold the file's lease: `Some` for agents' results.
    pub holder: Option<String>,
    /// For an assignment: the object location its task names (bucket, key),
    /// recorded in the same write as the move, so a result can be checked
    /// against it.
    pub location: Option<(String, String)>,
}

impl Change {
    pub(crate) fn new(file_id: i64, event: Event) -> Self {
        Change {
            file_id,
            event,
            token: None,
            holder: None,
            location: None,
        }
    }

    /// A change valid only for the assignment with fencing token `token`.
    pub(crate) fn fenced(file_id: i64, token: i64, event: Event) -> Self {
        Change {
            file_id,
            event,
            token: Some(token),
            holder: None,
            location: None,
        }
    }

    /// This change counts only while `agent` holds the file's lease (an
    /// agent's own result: another agent cannot speak for it).
    pub(crate) fn held_by(self, agent: &str) -> Self {
        Change {
            holder: Some(agent.to_string()),
            ..self
        }
    }

    /// An assignment whose task names this object location.
    pub(crate) fn at_location(self, bucket: &str, key: &str) -> Self {
        Change {
            location: Some((bucket.to_string(), key.to_string())),
            ..self
        }
    }
}

/// What a change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The file moved; `reason` is its history text.
    Moved {
        from: FileStatus,
        to: FileStatus,
        reason: String,
    },
    /// The guard did not hold: no such file, an older fencing token, no
    /// longer in progress, another lease owner, a renewed lease, or the file
    /// already changed earlier in the same batch. Nothing was written.
    Stale,
    /// The table does not allow this event in the file's status.
    Illegal(IllegalTransition),
}

impl Outcome {
    /// The status the file moved to, if it moved.
    pub(crate) fn moved_to(&self) -> Option<FileStatus> {
        match self {
            Outcome::Moved { to, .. } => Some(*to),
            Outcome::Stale | Outcome::Illegal(_) => None,
        }
    }
}

/// The outcome of one change of a batch, in the batch's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Applied {
    pub file_id: i64,
    pub outcome: Outcome,
}

/// The locked row: what guards, the table and the announcement read.
#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i64,
    status: String,
    attempts: i32,
    fencing_token: i64,
    lease_owner: Option<String>,
    lease_expired: bool,
    server_id: i64,
    server: String,
    watch_id: i64,
    path: String,
    size: i64,
    mtime_unix: i64,
    discovered_at: DateTime<Utc>,
    assigned_bucket: Option<String>,
    assigned_key: Option<String>,
    announcement_id: String,
}

/// Applies `changes` in its own transaction; see [`apply`].
pub(crate) async fn apply_batch(
    db: &PgPool,
    actor: &str,
    policy: &RetryPolicy,
    changes: &[Change],
) -> StoreResult<Vec<Applied>> {
    let mut tx = crate::db::begin_batch(db).await?;
    let applied = apply(&mut tx, actor, policy, changes).await?;
    tx.commit().await?;
    Ok(applied)
}

/// Applies one change in its own transaction (the tests' shorthand).
#[cfg(test)]
pub(crate) async fn apply_one(
    db: &PgPool,
    actor: &str,
    policy: &RetryPolicy,
    change: Change,
) -> StoreResult<Outcome> {
    let file_id = change.file_id;
    let applied = apply_batch(db, actor, policy, &[change]).await?;
    Ok(applied
        .into_iter()
        .find(|a| a.file_id == file_id)
        .map_or(Outcome::Stale, |a| a.outcome))
}

/// Applies `changes` inside the caller's transaction (so a claim can hold its
/// server lock, and the relay can mark its outbox rows, in the same commit).
/// `actor` goes into every history row (`agent:<name>`, `coordinator:<id>`,
/// `admin:<name>`). A file should appear once per batch; a repeat is `Stale`.
pub(crate) async fn apply(
    conn: &mut PgConnection,
    actor: &str,
    policy: &RetryPolicy,
    changes: &[Change],
) -> StoreResult<Vec<Applied>> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = changes.iter().map(|c| c.file_id).collect();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT f.id, f.status, f.attempts, f.fencing_token, f.lease_owner, \
                COALESCE(f.lease_expires_at < now(), false) AS lease_expired, \
                f.server_id, s.name AS server, f.watch_id, f.path, f.size, f.mtime_unix, f.discovered_at, \
                f.assigned_bucket, f.assigned_key, f.announcement_id::text AS announcement_id \
         FROM files f JOIN servers s ON s.id = f.server_id \
         WHERE f.id = ANY($1) ORDER BY f.id FOR UPDATE OF f",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let rows: HashMap<i64, Row> = rows.into_iter().map(|r| (r.id, r)).collect();
    let adoptions = adoptions(conn, changes, &rows).await?;

    let mut seen = HashSet::with_capacity(changes.len());
    let mut applied = Vec::with_capacity(changes.len());
    let mut writes = Writes::default();
    for change in changes {
        let outcome = match rows.get(&change.file_id) {
            Some(row) if seen.insert(change.file_id) => decide(row, change, policy)?,
            _ => Decision::Stale,
        };
        let outcome = match outcome {
            Decision::Stale => Outcome::Stale,
            Decision::Illegal(e) => Outcome::Illegal(e),
            Decision::Move { from, event, mut t } => {
                let adopt = match &event {
                    Event::Stored(s) => {
                        let adopt = adoptions.get(&change.file_id).cloned();
                        if let Some(note) = already_stored_note(s, adopt.as_deref()) {
                            t.reason = format!("{}; {note}", t.reason);
                        }
                        adopt
                    }
                    _ => None,
                };
                let reason = t.reason.clone();
                let to = t.to;
                writes.push(change, from, &event, t, adopt);
                Outcome::Moved { from, to, reason }
            }
        };
        applied.push(Applied {
            file_id: change.file_id,
            outcome,
        });
    }
    writes.execute(conn, actor, &rows).await?;
    Ok(applied)
}

/// The announcement ids of earlier stores of the same versions
/// ([`Stored::stored_announcement_id`]) that the reporting files take over,
/// by file id. Consumers saw the version under that id, so announcing it
/// again under the same id is a duplicate they drop, where a new id would be
/// a second delivery of the same bytes. An id another row holds stays with
/// that row (the same bytes sent again after ferry deleted them are a new
/// version with its own announcement).
async fn adoptions(
    conn: &mut PgConnection,
    changes: &[Change],
    rows: &HashMap<i64, Row>,
) -> StoreResult<HashMap<i64, String>> {
    let wanted: Vec<(i64, String)> = changes
        .iter()
        .filter_map(|c| match &c.event {
            Event::Stored(s) => s
                .stored_announcement_id
                .as_deref()
                .and_then(canonical_uuid)
                .filter(|id| {
                    rows.get(&c.file_id)
                        .is_some_and(|r| r.announcement_id != *id)
                })
                .map(|id| (c.file_id, id)),
            _ => None,
        })
        .collect();
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&str> = wanted.iter().map(|(_, id)| id.as_str()).collect();
    let held: HashSet<String> = sqlx::query_scalar(
        "SELECT announcement_id::text FROM files WHERE announcement_id = ANY($1::text[]::uuid[])",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    let mut taken = HashSet::new();
    Ok(wanted
        .into_iter()
        .filter(|(_, id)| !held.contains(id) && taken.insert(id.clone()))
        .collect())
}

/// `id` as Postgres prints a UUID (lower-case, hyphenated), if it is one.
fn canonical_uuid(id: &str) -> Option<String> {
    let id = id.to_ascii_lowercase();
    let shape = id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    shape.then_some(id)
}

/// What the history says about a version the bucket already held (pure):
/// `adopted` is the earlier announcement id this row now carries.
fn already_stored_note(stored: &Stored, adopted: Option<&str>) -> Option<String> {
    let earlier = stored.stored_announcement_id.as_deref()?;
    Some(match adopted {
        Some(id) => format!(
            "the bucket already held this version, stored by an earlier run as announcement {id} \
             (its row was lost, e.g. by a database restore): not written again, announced again \
             under {id}"
        ),
        None => format!(
            "the bucket already held this version (announcement {earlier}): not written again"
        ),
    })
}

enum Decision {
    Stale,
    Illegal(IllegalTransition),
    /// `event` is the one to record: a `Stored` report that does not match
    /// the file has become a failed attempt.
    Move {
        from: FileStatus,
        event: Event,
        t: Transition,
    },
}

/// Guards, then the table.
fn decide(row: &Row, change: &Change, policy: &RetryPolicy) -> StoreResult<Decision> {
    let from: FileStatus = row.status.parse().map_err(|e| StoreError::Corrupt {
        file_id: row.id,
        what: e,
    })?;
    if let Some(token) = change.token
        && (from != FileStatus::InProgress || row.fencing_token != token)
    {
        return Ok(Decision::Stale);
    }
    if let Some(holder) = &change.holder
        && row.lease_owner.as_ref() != Some(holder)
    {
        return Ok(Decision::Stale);
    }
    if let Event::LeaseExpired { owner } = &change.event
        && (!row.lease_expired || row.lease_owner != *owner)
    {
        return Ok(Decision::Stale);
    }
    let event = match &change.event {
        Event::Stored(s) => match s.mismatch(&expected(row, own_key(row).as_deref())?) {
            Some(message) => Event::TransferFailed {
                kind: FailureKind::Transient,
                message,
            },
            None => change.event.clone(),
        },
        other => other.clone(),
    };
    Ok(
        match lifecycle::transition(from, &event, row.attempts, policy) {
            Ok(t) => Decision::Move { from, event, t },
            Err(e) => Decision::Illegal(e),
        },
    )
}

/// What the current assignment of `row` gave its agent. A file assigned
/// before its location was recorded expects an empty one, so its report is a
/// failed attempt and the retry records it.
fn expected<'a>(row: &'a Row, own_key: Option<&'a str>) -> StoreResult<Expected<'a>> {
    Ok(Expected {
        size: size(row)?,
        bucket: row.assigned_bucket.as_deref().unwrap_or_default(),
        key: row.assigned_key.as_deref().unwrap_or_default(),
        own_key,
    })
}

/// The key of its own the assignment of `row` named besides its key (the
/// scheduler renders it the same way, [`keys::own_key`]).
fn own_key(row: &Row) -> Option<String> {
    let key = row.assigned_key.as_deref()?;
    let size = u64::try_from(row.size).ok()?;
    keys::own_key(
        key,
        &keys::version(size, row.mtime_unix),
        &row.announcement_id,
    )
}

fn size(row: &Row) -> StoreResult<u64> {
    u64::try_from(row.size).map_err(|_| StoreError::Corrupt {
        file_id: row.id,
        what: format!("negative size {}", row.size),
    })
}

/// Column arrays of the moves of one batch, one entry per moved file.
#[derive(Debug, Default)]
struct Writes {
    id: Vec<i64>,
    from: Vec<&'static str>,
    status: Vec<&'static str>,
    reason: Vec<String>,
    attempts: Vec<i32>,
    /// Assignment: bump the fencing token.
    bump: Vec<bool>,
    /// Assignment: the new lease; every other move ends the lease.
    lease_owner: Vec<Option<String>>,
    lease_secs: Vec<Option<f64>>,
    /// Due again after this many seconds (`None`: due time unchanged).
    retry_secs: Vec<Option<f64>>,
    /// Whether `last_error` is overwritten (with `error`, NULL clears it).
    set_error: Vec<bool>,
    error: Vec<Option<String>>,
    bucket: Vec<Option<String>>,
    key: Vec<Option<String>>,
    etag: Vec<Option<String>>,
    sha256: Vec<Option<String>>,
    /// Stored moves, for `uploaded_at` and the announcement.
    stored: Vec<Option<Stored>>,
    /// The earlier announcement id the file takes over (see [`adoptions`]).
    adopt: Vec<Option<String>>,
    /// Assignment: the location its task names (`None`: unchanged).
    assigned_bucket: Vec<Option<String>>,
    assigned_key: Vec<Option<String>>,
}

impl Writes {
    fn push(
        &mut self,
        change: &Change,
        from: FileStatus,
        event: &Event,
        t: Transition,
        adopt: Option<String>,
    ) {
        let (set_error, error) = match event {
            Event::TransferFailed { message, .. } => (true, Some(message.clone())),
            Event::Rejected { why } => (true, Some(why.clone())),
            Event::LeaseExpired { .. } => (true, Some(t.reason.clone())),
            Event::Stored(_) | Event::AdminRetry => (true, None),
            Event::Assigned { .. } | Event::Announced => (false, None),
        };
        let (lease_owner, lease) = match event {
            Event::Assigned { agent, lease } => (Some(agent.clone()), Some(*lease)),
            _ => (None, None),
        };
        let stored = match event {
            Event::Stored(s) => Some(s.clone()),
            _ => None,
        };
        let location = match event {
            Event::Assigned { .. } => change.location.clone(),
            _ => None,
        };
        self.id.push(change.file_id);
        self.from.push(from.as_str());
        self.status.push(t.to.as_str());
        self.attempts.push(t.attempts);
        self.bump.push(lease.is_some());
        self.lease_owner.push(lease_owner);
        self.lease_secs.push(lease.map(|l| l.as_secs_f64()));
        self.retry_secs
            .push(t.retry_in.map(|d: Duration| d.as_secs_f64()));
        self.set_error.push(set_error);
        self.error.push(error);
        self.bucket.push(stored.as_ref().map(|s| s.bucket.clone()));
        self.key.push(stored.as_ref().map(|s| s.key.clone()));
        self.etag.push(stored.as_ref().map(|s| s.etag.clone()));
        self.sha256.push(stored.as_ref().map(|s| s.sha256.clone()));
        self.stored.push(stored);
        self.adopt.push(adopt);
        let (bucket, key) = location.unzip();
        self.assigned_bucket.push(bucket);
        self.assigned_key.push(key);
        self.reason.push(t.reason);
    }

    async fn execute(
        self,
        conn: &mut PgConnection,
        actor: &str,
        rows: &HashMap<i64, Row>,
    ) -> StoreResult<()> {
        if self.id.is_empty() {
            return Ok(());
        }
        // The row changes and their history rows in one statement (one
        // round trip): a data-modifying `WITH` runs to completion whether or
        // not the outer query reads it.
        let updated: Vec<(i64, Option<DateTime<Utc>>)> = sqlx::query_as(
            "WITH history AS ( \
                 INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
                 SELECT id, from_status, to_status, $20, reason \
                 FROM unnest($1::bigint[], $18::text[], $2::text[], $19::text[]) \
                      AS e(id, from_status, to_status, reason)) \
             UPDATE files f SET status = u.status, attempts = u.attempts, \
                    fencing_token = f.fencing_token + CASE WHEN u.bump THEN 1 ELSE 0 END, \
                    lease_owner = u.lease_owner, \
                    lease_expires_at = now() + u.lease_secs * interval '1 second', \
                    next_attempt_at = COALESCE(now() + u.retry_secs * interval '1 second', f.next_attempt_at), \
                    last_error = CASE WHEN u.set_error THEN u.error ELSE f.last_error END, \
                    bucket = COALESCE(u.bucket, f.bucket), object_key = COALESCE(u.object_key, f.object_key), \
                    etag = COALESCE(u.etag, f.etag), sha256 = COALESCE(u.sha256, f.sha256), \
                    uploaded_at = CASE WHEN u.stored THEN now() ELSE f.uploaded_at END, \
                    announcement_id = COALESCE(u.adopt::uuid, f.announcement_id), \
                    assigned_bucket = COALESCE(u.assigned_bucket, f.assigned_bucket), \
                    assigned_key = COALESCE(u.assigned_key, f.assigned_key), \
                    updated_at = now() \
             FROM unnest($1::bigint[], $2::text[], $3::int4[], $4::bool[], $5::text[], $6::float8[], \
                         $7::float8[], $8::bool[], $9::text[], $10::text[], $11::text[], $12::text[], \
                         $13::text[], $14::bool[], $15::text[], $16::text[], $17::text[]) \
                  AS u(id, status, attempts, bump, lease_owner, lease_secs, retry_secs, set_error, \
                       error, bucket, object_key, etag, sha256, stored, adopt, assigned_bucket, assigned_key) \
             WHERE f.id = u.id \
             RETURNING f.id, f.uploaded_at",
        )
        .bind(&self.id)
        .bind(&self.status)
        .bind(&self.attempts)
        .bind(&self.bump)
        .bind(&self.lease_owner)
        .bind(&self.lease_secs)
        .bind(&self.retry_secs)
        .bind(&self.set_error)
        .bind(&self.error)
        .bind(&self.bucket)
        .bind(&self.key)
        .bind(&self.etag)
        .bind(&self.sha256)
        .bind(self.stored.iter().map(Option::is_some).collect::<Vec<bool>>())
        .bind(&self.adopt)
        .bind(&self.assigned_bucket)
        .bind(&self.assigned_key)
        .bind(&self.from)
        .bind(&self.reason)
        .bind(actor)
        .fetch_all(&mut *conn)
        .await?;

        let uploaded_at: HashMap<i64, Option<DateTime<Utc>>> = updated.into_iter().collect();
        let mut outbox_files = Vec::new();
        let mut payloads = Vec::new();
        for ((id, stored), adopt) in self.id.iter().zip(&self.stored).zip(&self.adopt) {
            let (Some(stored), Some(row)) = (stored, rows.get(id)) else {
                continue;
            };
            let uploaded_at =
                uploaded_at
                    .get(id)
                    .copied()
                    .flatten()
                    .ok_or_else(|| StoreError::Corrupt {
                        file_id: *id,
                        what: "stored without an upload time".into(),
                    })?;
            let mut announcement = announcement(row, stored, uploaded_at)?;
            if let Some(adopted) = adopt {
                announcement.announcement_id = adopted.clone();
            }
            let payload =
                serde_json::to_string(&announcement).map_err(|e| StoreError::Corrupt {
                    file_id: *id,
                    what: format!("encode announcement: {e}"),
                })?;
            outbox_files.push(*id);
            payloads.push(payload);
        }
        for (i, id) in self.id.iter().enumerate() {
            if let Some(failure) = rows
                .get(id)
                .map(|row| {
                    failure_announcement(row, self.status[i], self.attempts[i], &self.reason[i])
                })
                .transpose()?
                .flatten()
            {
                let payload = serde_json::to_string(&failure).map_err(|e| StoreError::Corrupt {
                    file_id: *id,
                    what: format!("encode failure announcement: {e}"),
                })?;
                outbox_files.push(*id);
                payloads.push(payload);
            }
        }
        if !outbox_files.is_empty() {
            sqlx::query(
                "INSERT INTO outbox (file_id, payload) \
                 SELECT id, payload::jsonb FROM unnest($1::bigint[], $2::text[]) AS o(id, payload)",
            )
            .bind(&outbox_files)
            .bind(&payloads)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// Whether moves to `failed` / `lost` write a [`FailureAnnouncement`] to the
/// outbox; set once at start from `FERRY_ANNOUNCE_FAILURES` (default on).
static ANNOUNCE_FAILURES: AtomicBool = AtomicBool::new(true);

/// Turns failure announcements on or off for this process.
pub(crate) fn announce_failures(on: bool) {
    ANNOUNCE_FAILURES.store(on, Ordering::Relaxed);
}

/// The announcement of a file that moves to `to` now, if `to` is `failed` or
/// `lost` and failures are announced; `reason` is the move's history text.
fn failure_announcement(
    row: &Row,
    to: &str,
    attempts: i32,
    reason: &str,
) -> StoreResult<Option<FailureAnnouncement>> {
    let Some(event) = Failure::of_status(to).filter(|_| ANNOUNCE_FAILURES.load(Ordering::Relaxed))
    else {
        return Ok(None);
    };
    Ok(Some(FailureAnnouncement {
        schema_version: SCHEMA_VERSION,
        event,
        file_id: row.id,
        server: row.server.clone(),
        server_id: row.server_id,
        watch_id: row.watch_id,
        path: row.path.clone(),
        size: size(row)?,
        mtime: mtime(row)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        error: reason.to_string(),
        discovered_at: row.discovered_at,
        failed_at: Utc::now(),
    }))
}

fn mtime(row: &Row) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp(row.mtime_unix, 0).ok_or_else(|| StoreError::Corrupt {
        file_id: row.id,
        what: format!("mtime {} is not a representable time", row.mtime_unix),
    })
}

/// The announcement of a file that is being stored now.
fn announcement(
    row: &Row,
    stored: &Stored,
    uploaded_at: DateTime<Utc>,
) -> StoreResult<Announcement> {
    let mtime = mtime(row)?;
    Ok(Announcement {
        schema_version: SCHEMA_VERSION,
        announcement_id: row.announcement_id.clone(),
        file_id: row.id,
        server: row.server.clone(),
        server_id: row.server_id,
        watch_id: row.watch_id,
        path: row.path.clone(),
        size: size(row)?,
        mtime,
        sha256: stored.sha256.clone(),
        bucket: stored.bucket.clone(),
        key: stored.key.clone(),
        etag: stored.etag.clone(),
        discovered_at: row.discovered_at,
        uploaded_at,
    })
}

/// The store against a real Postgres (`FERRY_TEST_PG_URL`, default the local
/// server): a fresh database per test, migrated, dropped at the end.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_common::backoff::Backoff;
    use sqlx::{Connection, Executor};

    const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    /// A fresh migrated database on the local Postgres (other modules'
    /// store tests use it too).
    pub(crate) struct Db {
        pub(crate) pool: PgPool,
        name: String,
        admin_url: String,
    }

    impl Db {
        pub(crate) async fn create() -> Db {
            let admin_url = std::env::var("FERRY_TEST_PG_URL").unwrap_or_else(|_| ADMIN_URL.into());
            let name = format!("ferry_u_{}", uuid::Uuid::new_v4().simple());
            let mut admin = PgConnection::connect(&admin_url).await.unwrap();
            admin
                .execute(format!("CREATE DATABASE \"{name}\"").as_str())
                .await
                .unwrap();
            admin.close().await.unwrap();
            let (base, _) = admin_url.rsplit_once('/').unwrap();
            let pool = PgPool::connect(&format!("{base}/{name}")).await.unwrap();
            crate::db::migrate(&pool).await.unwrap();
            Db {
                pool,
                name,
                admin_url,
            }
        }

        pub(crate) async fn drop(self) {
            self.pool.close().await;
            let mut admin = PgConnection::connect(&self.admin_url).await.unwrap();
            admin
                .execute(format!("DROP DATABASE \"{}\" WITH (FORCE)", self.name).as_str())
                .await
                .unwrap();
        }

        /// A server, a watch and two `new` files; returns the file ids.
        pub(crate) async fn seed(&self) -> (i64, i64) {
            let server: i64 = sqlx::query_scalar(
                "INSERT INTO servers (name, hostname, username, auth_kind, secret_ciphertext, host_key_fingerprint) \
                 VALUES ('acme', 'h', 'u', 'password', '\\x00', 'SHA256:x') RETURNING id",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            let watch: i64 = sqlx::query_scalar(
                "INSERT INTO watches (server_id, directory, bucket) VALUES ($1, '/in', 'bkt') RETURNING id",
            )
            .bind(server)
            .fetch_one(&self.pool)
            .await
            .unwrap();
            let ids: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO files (server_id, watch_id, path, size, mtime_unix) \
                 VALUES ($1, $2, '/in/a.csv', 12, 1800000000), ($1, $2, '/in/b.csv', 5, 1800000000) \
                 RETURNING id",
            )
            .bind(server)
            .bind(watch)
            .fetch_all(&self.pool)
            .await
            .unwrap();
            (ids[0], ids[1])
        }

        async fn file(&self, id: i64) -> (String, i64, i32, Option<String>, Option<String>) {
            sqlx::query_as(
                "SELECT status, fencing_token, attempts, lease_owner, last_error FROM files WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
        }

        async fn events(&self, id: i64) -> Vec<(Option<String>, String, String, String)> {
            sqlx::query_as(
                "SELECT from_status, to_status, actor, reason FROM file_events WHERE file_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .unwrap()
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_secs(60), Duration::from_secs(60)),
        }
    }

    fn assigned() -> Event {
        Event::Assigned {
            agent: "a1".into(),
            lease: Duration::from_secs(60),
        }
    }

    fn stored(size: u64) -> Event {
        Event::Stored(Stored {
            bucket: "bkt".into(),
            key: "acme/a.csv".into(),
            etag: "etag-1".into(),
            size,
            sha256: "ab".repeat(32),
            stored_announcement_id: None,
        })
    }

    fn moved(from: FileStatus, to: FileStatus, reason: &str) -> Outcome {
        Outcome::Moved {
            from,
            to,
            reason: reason.into(),
        }
    }

    #[tokio::test]
    async fn a_version_stored_at_its_key_of_its_own_is_announced_there() {
        use FileStatus as S;
        let db = Db::create().await;
        let (a, b) = db.seed().await;
        let p = policy();
        for id in [a, b] {
            let assign = apply_one(&db.pool, "coordinator:c1", &p, Change::new(id, assigned()));
            assert_eq!(assign.await.unwrap().moved_to(), Some(S::InProgress));
        }
        sqlx::query("UPDATE files SET assigned_bucket = 'bkt', assigned_key = 'acme/1800000000-' || size || '/' || substr(path, 5)")
            .execute(&db.pool)
            .await
            .unwrap();
        let at = |id: i64, size: u64, key: String| {
            let Event::Stored(s) = stored(size) else {
                unreachable!()
            };
            Change::fenced(id, 1, Event::Stored(Stored { key, ..s })).held_by("a1")
        };
        let announcement: String =
            sqlx::query_scalar("SELECT announcement_id::text FROM files WHERE id = $1")
                .bind(a)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        // What the scheduler sent as the key of its own (keys::own_key).
        let own = format!("acme/1800000000-12-{announcement}/a.csv");
        let applied = apply_batch(
            &db.pool,
            "agent:a1",
            &p,
            &[
                at(a, 12, own.clone()),
                at(b, 5, "acme/elsewhere/b.csv".into()),
            ],
        )
        .await
        .unwrap();
        assert_eq!(applied[0].outcome.moved_to(), Some(S::Uploaded));
        assert_eq!(
            applied[1].outcome.moved_to(),
            Some(S::Error),
            "any other key is a failed attempt"
        );
        let payload: serde_json::Value =
            sqlx::query_scalar("SELECT payload FROM outbox WHERE file_id = $1")
                .bind(a)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(payload["key"], own.as_str());
    }

    #[tokio::test]
    async fn applies_guards_the_table_and_the_outbox() {
        use FileStatus as S;
        let db = Db::create().await;
        let (a, b) = db.seed().await;
        sqlx::query("UPDATE files SET status = 'processed' WHERE id = $1")
            .bind(b)
            .execute(&db.pool)
            .await
            .unwrap();
        let p = policy();

        // One batch: a move, a repeat of the same file, an illegal event, a missing file.
        let applied = apply_batch(
            &db.pool,
            "coordinator:c1",
            &p,
            &[
                Change::new(a, assigned()),
                Change::new(a, assigned()),
                Change::new(b, assigned()),
                Change::new(i64::MAX, assigned()),
            ],
        )
        .await
        .unwrap();
        let outcomes: Vec<Outcome> = applied.into_iter().map(|a| a.outcome).collect();
        assert_eq!(
            outcomes,
            vec![
                moved(S::New, S::InProgress, "assigned to agent a1 (attempt 1)"),
                Outcome::Stale,
                Outcome::Illegal(IllegalTransition {
                    from: S::Processed,
                    event: lifecycle::EventKind::Assigned,
                }),
                Outcome::Stale,
            ]
        );
        assert_eq!(
            db.file(a).await,
            ("in_progress".into(), 1, 1, Some("a1".into()), None)
        );
        assert_eq!(db.file(b).await.0, "processed");
        assert!(
            db.events(b).await.is_empty(),
            "an illegal event writes nothing"
        );

        // The claim records where the object goes (scheduler::claim).
        sqlx::query("UPDATE files SET assigned_bucket = 'bkt', assigned_key = 'acme/a.csv'")
            .execute(&db.pool)
            .await
            .unwrap();

        // Guards: an older token, another agent than the lease holder (even
        // with the right token), and a lease that has not expired, are stale.
        let stale = apply_one(&db.pool, "agent:a1", &p, Change::fenced(a, 0, stored(12)))
            .await
            .unwrap();
        assert_eq!(stale, Outcome::Stale);
        let lost = Event::TransferFailed {
            kind: FailureKind::Lost,
            message: "says mallory".into(),
        };
        let stale = apply_one(
            &db.pool,
            "agent:mallory",
            &p,
            Change::fenced(a, 1, lost).held_by("mallory"),
        )
        .await
        .unwrap();
        assert_eq!(
            stale,
            Outcome::Stale,
            "only the lease holder's result counts"
        );
        let not_expired = Event::LeaseExpired {
            owner: Some("a1".into()),
        };
        let stale = apply_one(&db.pool, "coordinator:c1", &p, Change::new(a, not_expired))
            .await
            .unwrap();
        assert_eq!(stale, Outcome::Stale);
        assert_eq!(db.file(a).await.0, "in_progress");

        // A success report that does not match the file is a failed attempt.
        let wrong = apply_one(
            &db.pool,
            "agent:a1",
            &p,
            Change::fenced(a, 1, stored(13)).held_by("a1"),
        )
        .await
        .unwrap();
        assert_eq!(wrong.moved_to(), Some(S::Error));
        let (status, token, attempts, owner, error) = db.file(a).await;
        assert_eq!(
            (status.as_str(), token, attempts, owner),
            ("error", 1, 1, None)
        );
        assert!(error.unwrap().contains("expected 12 bytes"));
        let later: bool = sqlx::query_scalar(
            "SELECT next_attempt_at > now() + interval '20 seconds' FROM files WHERE id = $1",
        )
        .bind(a)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(later, "an error file waits for its backoff");

        // Reassigned (token 2), then stored: uploaded, with its announcement in the outbox.
        sqlx::query("UPDATE files SET next_attempt_at = now() WHERE id = $1")
            .bind(a)
            .execute(&db.pool)
            .await
            .unwrap();
        let again = apply_one(&db.pool, "coordinator:c1", &p, Change::new(a, assigned()))
            .await
            .unwrap();
        assert_eq!(
            again,
            moved(S::Error, S::InProgress, "assigned to agent a1 (attempt 2)")
        );
        // A report naming another location than the assigned one is a failed
        // attempt too, and nothing of it is stored or announced.
        let Event::Stored(elsewhere) = stored(12) else {
            unreachable!("stored() is a Stored event")
        };
        let elsewhere = Event::Stored(Stored {
            key: "stolen/a.csv".into(),
            ..elsewhere
        });
        let moved_away = apply_one(
            &db.pool,
            "agent:a1",
            &p,
            Change::fenced(a, 2, elsewhere).held_by("a1"),
        )
        .await
        .unwrap();
        assert_eq!(moved_away.moved_to(), Some(S::Error));
        let (bucket, key, error): (Option<String>, Option<String>, Option<String>) =
            sqlx::query_as("SELECT bucket, object_key, last_error FROM files WHERE id = $1")
                .bind(a)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!((bucket, key), (None, None));
        assert!(error.unwrap().contains("stolen/a.csv"));
        sqlx::query("UPDATE files SET next_attempt_at = now() WHERE id = $1")
            .bind(a)
            .execute(&db.pool)
            .await
            .unwrap();
        let again = apply_one(&db.pool, "coordinator:c1", &p, Change::new(a, assigned()))
            .await
            .unwrap();
        assert_eq!(again.moved_to(), Some(S::InProgress));

        let ok = apply_one(
            &db.pool,
            "agent:a1",
            &p,
            Change::fenced(a, 3, stored(12)).held_by("a1"),
        )
        .await
        .unwrap();
        assert_eq!(ok.moved_to(), Some(S::Uploaded));
        assert_eq!(
            db.file(a).await,
            ("uploaded".into(), 3, 3, None, None),
            "the lease and the last error are cleared"
        );
        let payloads: Vec<serde_json::Value> =
            sqlx::query_scalar("SELECT payload FROM outbox WHERE file_id = $1")
                .bind(a)
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(payloads.len(), 1);
        let body: Announcement = serde_json::from_value(payloads[0].clone()).unwrap();
        assert_eq!(body.schema_version, 1);
        assert_eq!((body.file_id, body.server.as_str()), (a, "acme"));
        let row_id: String =
            sqlx::query_scalar("SELECT announcement_id::text FROM files WHERE id = $1")
                .bind(a)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(body.announcement_id, row_id, "the row's announcement id");
        assert_eq!((body.path.as_str(), body.size), ("/in/a.csv", 12));
        assert_eq!(
            (body.bucket.as_str(), body.key.as_str()),
            ("bkt", "acme/a.csv")
        );
        assert_eq!(
            (body.etag.as_str(), body.sha256),
            ("etag-1", "ab".repeat(32))
        );
        assert_eq!(body.mtime.timestamp(), 1_800_000_000);
        assert_eq!(payloads[0]["mtime"], "2027-01-15T08:00:00Z");

        // Confirmed by the broker: processed.
        let done = apply_one(
            &db.pool,
            "coordinator:c1",
            &p,
            Change::new(a, Event::Announced),
        )
        .await
        .unwrap();
        assert_eq!(done, moved(S::Uploaded, S::Processed, "announced on AMQP"));
        let history: Vec<String> = db
            .events(a)
            .await
            .into_iter()
            .map(|(from, to, actor, _)| format!("{}>{to} {actor}", from.unwrap_or_default()))
            .collect();
        assert_eq!(
            history,
            [
                "new>in_progress coordinator:c1",
                "in_progress>error agent:a1",
                "error>in_progress coordinator:c1",
                "in_progress>error agent:a1",
                "error>in_progress coordinator:c1",
                "in_progress>uploaded agent:a1",
                "uploaded>processed coordinator:c1",
            ]
        );
        db.drop().await;
    }

    #[tokio::test]
    async fn a_version_already_in_the_bucket_keeps_the_announcement_id_consumers_saw() {
        let db = Db::create().await;
        let (a, b) = db.seed().await;
        let p = policy();
        for id in [a, b] {
            apply_one(&db.pool, "coordinator:c1", &p, Change::new(id, assigned()))
                .await
                .unwrap();
        }
        sqlx::query("UPDATE files SET assigned_bucket = 'bkt', assigned_key = 'acme/a.csv'")
            .execute(&db.pool)
            .await
            .unwrap();
        let announcement_of = |id: i64| {
            let pool = db.pool.clone();
            async move {
                sqlx::query_scalar::<_, String>(
                    "SELECT announcement_id::text FROM files WHERE id = $1",
                )
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
            }
        };
        let b_own = announcement_of(b).await;
        let already = |size: u64, id: &str| {
            let Event::Stored(s) = stored(size) else {
                unreachable!("stored() is a Stored event")
            };
            Event::Stored(Stored {
                stored_announcement_id: Some(id.into()),
                ..s
            })
        };

        // Stored by an earlier run under an id no row holds (the restore lost
        // its row): the file takes that id, and so does its announcement.
        let earlier = "0f8e2a1c-5b7d-4e3a-9c6b-2d1f0e9a8b7c";
        let outcome = apply_one(
            &db.pool,
            "agent:a1",
            &p,
            Change::fenced(a, 1, already(12, &earlier.to_uppercase())).held_by("a1"),
        )
        .await
        .unwrap();
        assert_eq!(outcome.moved_to(), Some(FileStatus::Uploaded));
        assert_eq!(announcement_of(a).await, earlier);
        let payload: serde_json::Value =
            sqlx::query_scalar("SELECT payload FROM outbox WHERE file_id = $1")
                .bind(a)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(payload["announcement_id"], earlier);
        let reason = db.events(a).await.last().unwrap().3.clone();
        assert!(
            reason.contains(&format!("announced again under {earlier}")),
            "{reason}"
        );

        // An id another row holds stays with it: this file keeps its own.
        let outcome = apply_one(
            &db.pool,
            "agent:a1",
            &p,
            Change::fenced(b, 1, already(5, earlier)).held_by("a1"),
        )
        .await
        .unwrap();
        assert_eq!(outcome.moved_to(), Some(FileStatus::Uploaded));
        assert_eq!(announcement_of(b).await, b_own);
        let reason = db.events(b).await.last().unwrap().3.clone();
        assert!(
            reason.contains(&format!(
                "already held this version (announcement {earlier})"
            )),
            "{reason}"
        );
        db.drop().await;
    }

    #[tokio::test]
    async fn expired_leases_and_admin_retries() {
        use FileStatus as S;
        let db = Db::create().await;
        let (a, b) = db.seed().await;
        let p = policy();
        apply_batch(
            &db.pool,
            "coordinator:c1",
            &p,
            &[Change::new(a, assigned()), Change::new(b, assigned())],
        )
        .await
        .unwrap();
        sqlx::query("UPDATE files SET lease_expires_at = now() - interval '1 second'")
            .execute(&db.pool)
            .await
            .unwrap();
        let expired = |owner: &str| Event::LeaseExpired {
            owner: Some(owner.into()),
        };
        let applied = apply_batch(
            &db.pool,
            "coordinator:c1",
            &p,
            &[
                Change::new(a, expired("a1")),
                Change::new(b, expired("other")),
            ],
        )
        .await
        .unwrap();
        assert_eq!(
            applied[0].outcome,
            moved(
                S::InProgress,
                S::Error,
                "lease expired: agent a1 stopped reporting"
            )
        );
        assert_eq!(applied[1].outcome, Outcome::Stale, "another owner's lease");
        let (status, _, _, owner, error) = db.file(a).await;
        assert_eq!((status.as_str(), owner), ("error", None));
        assert_eq!(
            error.as_deref(),
            Some("lease expired: agent a1 stopped reporting")
        );

        // An admin retry requeues the error file and leaves the running one alone.
        let applied = apply_batch(
            &db.pool,
            "admin:alice",
            &p,
            &[
                Change::new(a, Event::AdminRetry),
                Change::new(b, Event::AdminRetry),
            ],
        )
        .await
        .unwrap();
        assert_eq!(applied[0].outcome, moved(S::Error, S::New, "manual retry"));
        assert!(matches!(applied[1].outcome, Outcome::Illegal(_)));
        assert_eq!(db.file(a).await, ("new".into(), 1, 0, None, None));
        assert_eq!(db.file(b).await.0, "in_progress");
        db.drop().await;
    }

    /// File rows refer to their server and watch without a foreign key
    /// (`migrations/0021_hot_path_foreign_keys.sql`), so the database
    /// refuses to delete those rows instead, even a watch no file refers to.
    #[tokio::test]
    async fn servers_and_watches_are_only_ever_soft_deleted() {
        let db = Db::create().await;
        db.seed().await;
        let idle: i64 = sqlx::query_scalar(
            "INSERT INTO watches (server_id, directory, bucket) \
             SELECT id, '/idle', 'bkt' FROM servers RETURNING id",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        for sql in [
            format!("DELETE FROM watches WHERE id = {idle}"),
            "DELETE FROM servers".to_string(),
            "TRUNCATE servers CASCADE".to_string(),
        ] {
            let e = sqlx::query(&sql).execute(&db.pool).await.unwrap_err();
            assert!(
                e.to_string().contains("set deleted_at instead"),
                "{sql}: {e}"
            );
        }
        let left: (i64, i64) =
            sqlx::query_as("SELECT (SELECT count(*) FROM servers), (SELECT count(*) FROM watches)")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(left, (1, 2));
        db.drop().await;
    }
}
