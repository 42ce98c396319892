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
//!   (`assigned_bucket`, `assigned_key`) in the same write that claims it,
//!   before the task is sent; a success report naming another location is a
//!   failed attempt.
//! - Claims rotate over servers, the least recently served first
//!   (`servers.last_assigned_at`, set by the claim; ties by id), read page
//!   by page in that order so a round costs what it serves rather than a
//!   look at every server of the site, each taking an equal
//!   share of the agent's free slots per turn (at least one file), so a busy
//!   server cannot starve the others and every server gets its first file
//!   before any gets another turn. One turn is one claim transaction per
//!   agent for all the servers routed to it; the claim's status write also
//!   records each task's object location, one query reads the servers and
//!   watches, and each server's credentials are decrypted once.
//! - A server's transfers go to the agent that polls it ([`route`]), so one
//!   agent's session pool holds all of the server's SSH connections and
//!   `max_sessions` bounds connections, not just transfers.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
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

/// Transfers assigned per agent slot and per server session: an agent holds
/// up to `capacity * PIPELINE` tasks (and a server's agent up to
/// `max_sessions * PIPELINE` of that server's), running `capacity` at once
/// and starting a queued one the moment another finishes, so the round trip
/// result -> coordinator -> next assignment no longer idles the agent.
pub(crate) const PIPELINE: i64 = 2;

/// A claimed file, ready to become a task assignment.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Claimed {
    pub id: i64,
    pub server_id: i64,
    pub watch_id: i64,
    pub path: String,
    pub size: i64,
    pub mtime_unix: i64,
    pub fencing_token: i64,
    pub discovered_at: DateTime<Utc>,
    /// The version's announcement id; it travels in the object's metadata
    /// (`ferry-announcement-id`), so a later run can tell what consumers saw.
    pub announcement_id: String,
}

/// A server with due files, and the agent that polls it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct DueServer {
    pub id: i64,
    /// The poll-lease holder, and the coordinator holding its stream.
    pub poller_agent: Option<String>,
    pub poller_coordinator: Option<String>,
    /// The holder takes transfers, as its `agents` row says (connected,
    /// heard from lately, not drained, not unavailable).
    pub poller_ready: bool,
    /// When the server was last given files (the epoch if never): with
    /// `id`, its place in the serving order.
    pub served_at: DateTime<Utc>,
}

/// A place in the serving order: servers after it come next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServeKey {
    served_at: DateTime<Utc>,
    id: i64,
}

impl ServeKey {
    /// Before every server (never-served ones count as served at the epoch).
    pub(crate) fn start() -> Self {
        ServeKey {
            served_at: DateTime::<Utc>::UNIX_EPOCH - chrono::Duration::seconds(1),
            id: 0,
        }
    }

    fn of(server: &DueServer) -> Self {
        ServeKey {
            served_at: server.served_at,
            id: server.id,
        }
    }
}

/// Up to `limit` servers of `site` that have due files, after `after` in
/// the serving order: the least recently served first (never-served ones
/// first of all; ties by id), so every server gets its turn before any gets
/// a second one. Read page by page along the index `servers_serve_order`,
/// so a round costs what it serves, not a look at every server of the site.
pub(crate) async fn servers_with_due_files(
    db: &PgPool,
    site: &str,
    after: ServeKey,
    limit: i64,
) -> StoreResult<Vec<DueServer>> {
    Ok(sqlx::query_as(
        "SELECT s.id, s.poller_agent, s.poller_coordinator, \
                COALESCE(a.connected AND NOT a.draining AND a.unavailable IS NULL \
                         AND a.revoked_at IS NULL \
                         AND a.last_seen_at > now() - make_interval(secs => $2), false) AS poller_ready, \
                COALESCE(s.last_assigned_at, '1970-01-01 00:00:00+00'::timestamptz) AS served_at \
         FROM servers s LEFT JOIN agents a ON a.id = s.poller_agent \
         WHERE s.site = $1 AND s.enabled AND s.deleted_at IS NULL \
           AND (COALESCE(s.last_assigned_at, '1970-01-01 00:00:00+00'::timestamptz), s.id) > ($3, $4) \
           AND EXISTS (SELECT 1 FROM files f JOIN watches w ON w.id = f.watch_id \
                       WHERE f.server_id = s.id AND f.status IN ('new', 'error') \
                         AND f.next_attempt_at <= now() AND w.deleted_at IS NULL) \
         ORDER BY COALESCE(s.last_assigned_at, '1970-01-01 00:00:00+00'::timestamptz), s.id \
         LIMIT $5",
    )
    .bind(site)
    .bind(crate::agents::SILENT_AFTER.as_secs_f64())
    .bind(after.served_at)
    .bind(after.id)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// An agent of this coordinator as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate<'a> {
    pub agent: &'a str,
    pub takes_transfers: bool,
    pub free: i64,
}

/// Where a server's due files go this turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// To the candidate at this index, leaving `reserve` of the server's
    /// sessions unclaimed (1 when another agent polls the server: the
    /// poller's connection counts against the same `max_sessions`).
    To { candidate: usize, reserve: i64 },
    /// Not now: the poller is busy, or another coordinator serves it.
    Wait,
}

/// Where `server`'s transfers go (pure). **Invariant:** a server's SSH work
/// runs on the agent that polls it, so that agent's session pool is the
/// server's whole connection budget; another agent is used only when the
/// poller does not take transfers (drained, unavailable, silent), then with
/// one session left for the poller, or when there is no poller.
pub(crate) fn route(server: &DueServer, coordinator: &str, here: &[Candidate<'_>]) -> Route {
    // A stand-in leaves one session for the poller, if there is one.
    let most_free_other = |except: Option<&str>| {
        here.iter()
            .enumerate()
            .filter(|(_, c)| c.takes_transfers && c.free > 0 && Some(c.agent) != except)
            .max_by_key(|(i, c)| (c.free, std::cmp::Reverse(*i)))
            .map_or(Route::Wait, |(candidate, _)| Route::To {
                candidate,
                reserve: i64::from(except.is_some()),
            })
    };
    let Some(poller) = server.poller_agent.as_deref() else {
        return most_free_other(None);
    };
    if server.poller_coordinator.as_deref() == Some(coordinator)
        && let Some((i, c)) = here.iter().enumerate().find(|(_, c)| c.agent == poller)
    {
        return match (c.takes_transfers, c.free > 0) {
            (true, true) => Route::To {
                candidate: i,
                reserve: 0,
            },
            (true, false) => Route::Wait,
            (false, _) => most_free_other(Some(poller)),
        };
    }
    // Served by another coordinator, or its stream here is gone.
    if server.poller_ready {
        Route::Wait
    } else {
        most_free_other(Some(poller))
    }
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

/// One server's part of a claim: up to `want` files, leaving `reserve` of
/// its sessions unclaimed (see [`Route::To`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ask {
    pub server_id: i64,
    pub want: i64,
    pub reserve: i64,
}

/// How many files a server may get now (pure): what was asked, within the
/// server's queue (`max_sessions * PIPELINE`, or for a stand-in
/// `max_sessions - reserve`) less its running transfers.
///
/// The agent's session pool bounds the connections; transfers beyond them
/// wait there for a session, ready to start the moment one frees. A
/// stand-in (reserve > 0) gets no such queue: its pool is not the poller's,
/// so only the sessions the poller leaves may be used.
fn room(ask: &Ask, max_sessions: i32, running: i64) -> i64 {
    let limit = if ask.reserve == 0 {
        i64::from(max_sessions) * PIPELINE
    } else {
        i64::from(max_sessions) - ask.reserve
    };
    ask.want.min(limit - running).max(0)
}

/// A watch of a server whose files are being claimed, with the server's
/// connection row (one row per watch, from one query).
#[derive(Debug, Clone, sqlx::FromRow)]
struct Source {
    #[sqlx(flatten)]
    conn: ConnectionRow,
    watch_id: i64,
    directory: String,
    bucket: String,
    key_template: String,
}

/// What one claim gave its agent.
#[derive(Debug, Default)]
pub(crate) struct Claim {
    /// Ready to send: the files are `in_progress`, leased to the claimant's
    /// agent, with the object location of their task recorded.
    pub tasks: Vec<proto::TaskAssignment>,
    /// Servers that got all they asked for: they may have more due.
    pub full: HashSet<i64>,
    /// Files whose path cannot be a safe object key: failed for good in the
    /// same transaction.
    pub rejected: Vec<(i64, KeyError)>,
    /// Servers whose credentials could not be unsealed (row changed outside
    /// ferry, or another secret key): none of their files was claimed, the
    /// other servers go on.
    pub sealed: Vec<(i64, anyhow::Error)>,
}

/// Claims due files of several servers for the claimant's agent, each
/// server's [`room`], in one transaction: the server rows are locked (in id
/// order) before their running transfers are counted, the files are taken
/// oldest first (`SKIP LOCKED`), and each moves to `in_progress` with the
/// object location of its task in one write; one query reads the servers
/// and watches, and each server's credentials are decrypted once.
pub(crate) async fn claim(
    db: &PgPool,
    secrets: &SecretBox,
    who: Claimant<'_>,
    asks: &[Ask],
) -> StoreResult<Claim> {
    let mut claim = Claim::default();
    if asks.is_empty() {
        return Ok(claim);
    }
    let ids: Vec<i64> = asks.iter().map(|a| a.server_id).collect();
    let mut tx = crate::db::begin_batch(db).await?;
    let max: HashMap<i64, i32> = sqlx::query_as(
        "SELECT id, max_sessions FROM servers WHERE id = ANY($1) AND enabled AND deleted_at IS NULL \
         ORDER BY id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let running: HashMap<i64, i64> = sqlx::query_as(
        "SELECT server_id, count(*) FROM files \
         WHERE server_id = ANY($1) AND status = 'in_progress' GROUP BY server_id",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let (servers, counts): (Vec<i64>, Vec<i64>) = asks
        .iter()
        .filter_map(|ask| {
            let max = *max.get(&ask.server_id)?;
            let n = room(ask, max, running.get(&ask.server_id).copied().unwrap_or(0));
            (n > 0).then_some((ask.server_id, n))
        })
        .unzip();
    if servers.is_empty() {
        return Ok(claim);
    }
    let picked: Vec<Claimed> = sqlx::query_as(
        "SELECT f.id, f.server_id, f.watch_id, f.path, f.size, f.mtime_unix, f.fencing_token, \
                f.discovered_at, f.announcement_id::text AS announcement_id \
         FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS q(server_id, n, turn) \
         CROSS JOIN LATERAL ( \
             SELECT f.* FROM files f JOIN watches w ON w.id = f.watch_id \
             WHERE f.server_id = q.server_id AND f.status IN ('new', 'error') \
               AND f.next_attempt_at <= now() AND w.deleted_at IS NULL \
             ORDER BY f.next_attempt_at, f.id LIMIT q.n FOR UPDATE OF f SKIP LOCKED) f \
         ORDER BY q.turn, f.next_attempt_at, f.id",
    )
    .bind(&servers)
    .bind(&counts)
    .fetch_all(&mut *tx)
    .await?;
    if picked.is_empty() {
        return Ok(claim);
    }
    let mut watch_ids: Vec<i64> = picked.iter().map(|f| f.watch_id).collect();
    watch_ids.sort_unstable();
    watch_ids.dedup();
    let sources: HashMap<i64, Source> = sqlx::query_as::<_, Source>(&format!(
        "SELECT {CONNECTION_COLUMNS}, w.id AS watch_id, w.directory, w.bucket, w.key_template \
         FROM watches w JOIN servers s ON s.id = w.server_id WHERE w.id = ANY($1)"
    ))
    .bind(&watch_ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|s| (s.watch_id, s))
    .collect();

    let assigned = Event::Assigned {
        agent: who.agent.to_string(),
        lease: who.lease,
    };
    let mut connections: HashMap<i64, anyhow::Result<proto::ServerConnection>> = HashMap::new();
    let mut got: HashMap<i64, i64> = HashMap::new();
    let mut changes = Vec::with_capacity(picked.len());
    let mut tasks = Vec::with_capacity(picked.len());
    let mut unsafe_keys = Vec::new();
    for file in &picked {
        // Watches and server rows are never deleted (soft delete only).
        let src = sources
            .get(&file.watch_id)
            .ok_or_else(|| StoreError::from(sqlx::Error::RowNotFound))?;
        let Ok(connection) = connections
            .entry(file.server_id)
            .or_insert_with(|| src.conn.to_proto(secrets))
        else {
            continue;
        };
        *got.entry(file.server_id).or_default() += 1;
        // The claim below bumps the fencing token of the locked row.
        let next = Claimed {
            fencing_token: file.fencing_token + 1,
            ..file.clone()
        };
        match task_for(&next, src, connection) {
            Ok(task) => {
                changes.push(
                    Change::new(file.id, assigned.clone()).at_location(&task.bucket, &task.key),
                );
                tasks.push(task);
            }
            Err(why) => {
                changes.push(Change::new(file.id, assigned.clone()));
                unsafe_keys.push((next.id, next.fencing_token, why));
            }
        }
    }
    let served: Vec<i64> = got.keys().copied().collect();
    sqlx::query("UPDATE servers SET last_assigned_at = now() WHERE id = ANY($1)")
        .bind(&served)
        .execute(&mut *tx)
        .await?;
    let actor = format!("coordinator:{}", who.coordinator);
    let moved: HashSet<i64> = transitions::apply(&mut tx, &actor, who.policy, &changes)
        .await?
        .into_iter()
        .filter(|a| a.outcome.moved_to() == Some(FileStatus::InProgress))
        .map(|a| a.file_id)
        .collect();
    let rejections: Vec<Change> = unsafe_keys
        .iter()
        .filter(|(id, _, _)| moved.contains(id))
        .map(|(id, token, why)| {
            Change::fenced(
                *id,
                *token,
                Event::Rejected {
                    why: why.to_string(),
                },
            )
        })
        .collect();
    transitions::apply(&mut tx, &actor, who.policy, &rejections).await?;
    tx.commit().await?;

    claim.tasks = tasks
        .into_iter()
        .filter(|t| moved.contains(&t.file_id))
        .collect();
    claim.rejected = unsafe_keys
        .into_iter()
        .filter(|(id, _, _)| moved.contains(id))
        .map(|(id, _, why)| (id, why))
        .collect();
    claim.full = asks
        .iter()
        .filter(|a| got.get(&a.server_id).is_some_and(|n| *n >= a.want))
        .map(|a| a.server_id)
        .collect();
    claim.sealed = connections
        .into_iter()
        .filter_map(|(server, c)| c.err().map(|e| (server, e)))
        .collect();
    Ok(claim)
}

/// The task for `file` from `src` (pure): its object key names this version
/// (size, mtime), so a replaced file gets a new key and a retry of this one
/// the same.
fn task_for(
    file: &Claimed,
    src: &Source,
    source: &proto::ServerConnection,
) -> Result<proto::TaskAssignment, KeyError> {
    let server = src.conn.name.as_str();
    let date = file.discovered_at.format("%Y-%m-%d").to_string();
    let size = u64::try_from(file.size)
        .map_err(|_| KeyError::UnsafePath(file.path.clone(), "negative size"))?;
    let key = keys::render(
        &src.key_template,
        &KeyInputs {
            server,
            watch_id: file.watch_id,
            watch_dir: &src.directory,
            remote_path: &file.path,
            date: &date,
            size,
            mtime_unix: file.mtime_unix,
        },
    )?;
    let metadata = HashMap::from([
        ("ferry-file-id".to_string(), file.id.to_string()),
        ("ferry-server".to_string(), server.to_string()),
        ("ferry-mtime".to_string(), file.mtime_unix.to_string()),
        (
            ferry_common::announcement::ANNOUNCEMENT_ID_METADATA.to_string(),
            file.announcement_id.clone(),
        ),
    ]);
    let own_key = keys::own_key(
        &key,
        &keys::version(size, file.mtime_unix),
        &file.announcement_id,
    )
    .unwrap_or_default();
    Ok(proto::TaskAssignment {
        own_key,
        file_id: file.id,
        fencing_token: file.fencing_token as u64,
        source: Some(source.clone()),
        path: file.path.clone(),
        size,
        mtime_unix: file.mtime_unix,
        bucket: src.bucket.clone(),
        key,
        metadata,
    })
}

/// How many files one server may claim in one turn: an equal share of the
/// agent's free slots over the servers with due files, at least one.
fn turn_share(slots: i64, servers: usize) -> i64 {
    let servers = i64::try_from(servers.max(1)).unwrap_or(i64::MAX);
    (slots / servers).max(1)
}

/// One turn's plan (pure): each server, in order, [routed](route) to its
/// poller (or a stand-in) and given its [share](turn_share) of what that
/// agent has left; the asks grouped by agent (index into `free`).
fn plan_turn(servers: &[DueServer], coordinator: &str, free: &[Candidate<'_>]) -> Vec<Vec<Ask>> {
    let mut left: Vec<Candidate<'_>> = free.to_vec();
    let mut asks = vec![Vec::new(); free.len()];
    for server in servers {
        let Route::To { candidate, reserve } = route(server, coordinator, &left) else {
            continue;
        };
        let slots = left[candidate].free;
        let want = turn_share(slots, servers.len()).min(slots);
        left[candidate].free -= want;
        asks[candidate].push(Ask {
            server_id: server.id,
            want,
            reserve,
        });
    }
    asks
}

/// Servers read per page of a round (pure): the free slots of the agents
/// that take transfers (each served server takes at least one), within
/// bounds; servers that must wait (their poller is busy or elsewhere) only
/// make the round read another page.
fn page_size(free: &[(Session, i64)]) -> i64 {
    let slots: i64 = free
        .iter()
        .filter(|(s, _)| s.takes_transfers())
        .map(|(_, slots)| (*slots).max(0))
        .sum();
    slots.clamp(16, 512)
}

/// What a round works with: where it claims, for whom, under which lease
/// and retry policy.
struct Round<'a> {
    db: &'a PgPool,
    secrets: &'a SecretBox,
    coordinator: &'a str,
    site: &'a str,
    lease: Duration,
    policy: &'a RetryPolicy,
}

/// How a turn ended.
enum Turned {
    /// The servers that got all they asked for: they may have more due.
    Served(HashSet<i64>),
    /// An agent's stream is gone: the round stops.
    StreamGone,
}

impl Round<'_> {
    /// One turn over `servers`: [planned](plan_turn), one [claim] per agent
    /// covering every server planned for it, the tasks sent; `free` and
    /// `sent` are updated.
    async fn turn(
        &self,
        free: &mut [(Session, i64)],
        servers: &[DueServer],
        sent: &mut usize,
    ) -> anyhow::Result<Turned> {
        let candidates: Vec<Candidate<'_>> = free
            .iter()
            .map(|(s, slots)| Candidate {
                agent: &s.agent,
                takes_transfers: s.takes_transfers(),
                free: *slots,
            })
            .collect();
        let plan = plan_turn(servers, self.coordinator, &candidates);
        let mut more = HashSet::new();
        for (i, asks) in plan.iter().enumerate() {
            if asks.is_empty() {
                continue;
            }
            let (session, slots) = &mut free[i];
            let who = Claimant {
                coordinator: self.coordinator,
                agent: &session.agent,
                lease: self.lease,
                policy: self.policy,
            };
            // On error the files claimed so far keep their leases; the
            // reaper requeues any that were not sent.
            let claim = claim(self.db, self.secrets, who, asks)
                .await
                .with_context(|| format!("claim files for agent {}", session.agent))?;
            for (server, e) in &claim.sealed {
                tracing::warn!(
                    server,
                    error = format!("{e:#}"),
                    "cannot build tasks for this server; skipping it this round"
                );
            }
            for (file, why) in &claim.rejected {
                tracing::warn!(file, error = ?why, "path cannot be an object key; file failed");
            }
            more.extend(claim.full);
            for task in claim.tasks {
                let file_id = task.file_id;
                session.task_started(file_id);
                if !session.send(Body::TaskAssignment(task)).await {
                    session.task_finished(file_id);
                    // The stream is gone; the lease reaper will requeue the files.
                    return Ok(Turned::StreamGone);
                }
                *slots -= 1;
                *sent += 1;
                crate::metrics::transfer_started(self.site, file_id);
            }
        }
        Ok(Turned::Served(more))
    }
}

/// One scheduling round for the agents of `sessions` (all of one site):
/// first turns for the servers with due files, page by page in serving
/// order, until the agents are full or no server is left; then further
/// turns for the servers that may have more, until the agents are full or
/// none has. Each turn is one [claim] per agent. Returns tasks sent.
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
        .map(|s| {
            let ahead = i64::from(s.capacity) * PIPELINE;
            (s.clone(), ahead - i64::from(s.in_flight()))
        })
        .collect();
    let any_free = |free: &[(Session, i64)]| {
        free.iter()
            .any(|(s, slots)| *slots > 0 && s.takes_transfers())
    };
    if !any_free(&free) {
        return Ok(0);
    }
    let round = Round {
        db,
        secrets,
        coordinator,
        site,
        lease,
        policy,
    };
    let page = page_size(&free);
    let mut sent = 0;
    let mut after = ServeKey::start();
    // Servers that had their first turn in this round; one served earlier
    // in the round shows up again further on (served just now), and is
    // skipped there.
    let mut turned = HashSet::new();
    let mut again: Vec<DueServer> = Vec::new();
    loop {
        let mut servers = servers_with_due_files(db, site, after, page).await?;
        let last_page = i64::try_from(servers.len()).is_ok_and(|n| n < page);
        if let Some(last) = servers.last() {
            after = ServeKey::of(last);
        }
        servers.retain(|s| turned.insert(s.id));
        if !servers.is_empty() {
            let Turned::Served(more) = round.turn(&mut free, &servers, &mut sent).await? else {
                return Ok(sent);
            };
            again.extend(servers.into_iter().filter(|s| more.contains(&s.id)));
        }
        if last_page || !any_free(&free) {
            break;
        }
    }
    while !again.is_empty() && any_free(&free) {
        let Turned::Served(more) = round.turn(&mut free, &again, &mut sent).await? else {
            return Ok(sent);
        };
        again.retain(|s| more.contains(&s.id));
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
           AND EXISTS (SELECT 1 FROM agents a WHERE a.id = f.lease_owner \
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_server_gets_an_equal_share_of_the_free_slots_at_least_one() {
        assert_eq!(turn_share(8, 1), 8);
        assert_eq!(turn_share(8, 3), 2);
        assert_eq!(turn_share(8, 1000), 1);
        assert_eq!(turn_share(1, 0), 1);
    }

    fn due(poller: Option<&str>, coordinator: Option<&str>, ready: bool) -> DueServer {
        DueServer {
            id: 1,
            poller_agent: poller.map(str::to_string),
            poller_coordinator: coordinator.map(str::to_string),
            poller_ready: ready,
            served_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    fn here() -> Vec<Candidate<'static>> {
        vec![
            Candidate {
                agent: "a1",
                takes_transfers: true,
                free: 2,
            },
            Candidate {
                agent: "a2",
                takes_transfers: true,
                free: 5,
            },
            Candidate {
                agent: "a3",
                takes_transfers: false,
                free: 9,
            },
        ]
    }

    #[test]
    fn a_servers_transfers_go_to_its_poller_while_it_takes_them() {
        let to = |candidate, reserve| Route::To { candidate, reserve };
        // The poller here, with free slots: it, the whole budget.
        assert_eq!(
            route(&due(Some("a1"), Some("c1"), true), "c1", &here()),
            to(0, 0)
        );
        // The poller here but busy: wait for it, even with others idle.
        let mut busy = here();
        busy[0].free = 0;
        assert_eq!(
            route(&due(Some("a1"), Some("c1"), true), "c1", &busy),
            Route::Wait
        );
        // The poller here takes no transfers: the freest other, one session
        // left for the poller.
        assert_eq!(
            route(&due(Some("a3"), Some("c1"), true), "c1", &here()),
            to(1, 1)
        );
        // Polled through another coordinator by a ready agent: that one's job.
        assert_eq!(
            route(&due(Some("b1"), Some("c2"), true), "c1", &here()),
            Route::Wait
        );
        // ... by an agent that takes none: a stand-in here.
        assert_eq!(
            route(&due(Some("b1"), Some("c2"), false), "c1", &here()),
            to(1, 1)
        );
        // Not polled at all (no live watch, or its agent went away): the
        // freest agent, the whole budget.
        assert_eq!(route(&due(None, None, false), "c1", &here()), to(1, 0));
        // Nobody here can take it.
        let none: Vec<Candidate<'_>> = here().into_iter().filter(|c| !c.takes_transfers).collect();
        assert_eq!(route(&due(None, None, false), "c1", &none), Route::Wait);
    }

    fn source(key_template: &str) -> Source {
        Source {
            conn: ConnectionRow {
                server_id: 1,
                name: "s1".into(),
                hostname: "h".into(),
                port: 22,
                username: "u".into(),
                secret_ciphertext: Vec::new(),
                secret_format: 2,
                host_key_fingerprint: "SHA256:x".into(),
                server_site: "default".into(),
                max_sessions: 4,
            },
            watch_id: 3,
            directory: "/in".into(),
            bucket: "b".into(),
            key_template: key_template.into(),
        }
    }

    #[test]
    fn a_task_names_the_version_and_its_source() {
        let file = Claimed {
            id: 7,
            server_id: 1,
            watch_id: 3,
            path: "/in/a.csv".into(),
            size: 4096,
            mtime_unix: 1_700_000_000,
            fencing_token: 2,
            discovered_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            announcement_id: "0f8e2a1c-5b7d-4e3a-9c6b-2d1f0e9a8b7c".into(),
        };
        let connection = proto::ServerConnection {
            server_id: 1,
            name: "s1".into(),
            ..Default::default()
        };
        let src = source("{server}/{version}/{name}");
        let task = task_for(&file, &src, &connection).unwrap();
        assert_eq!(task.file_id, 7);
        assert_eq!(task.fencing_token, 2);
        assert_eq!(task.bucket, "b");
        assert_eq!(task.key, "s1/1700000000-4096/a.csv");
        assert_eq!(
            task.own_key,
            "s1/1700000000-4096-0f8e2a1c-5b7d-4e3a-9c6b-2d1f0e9a8b7c/a.csv"
        );
        assert_eq!(task.source.as_ref().map(|s| s.server_id), Some(1));
        assert_eq!(task.metadata["ferry-file-id"], "7");
        assert_eq!(
            task.metadata["ferry-announcement-id"],
            "0f8e2a1c-5b7d-4e3a-9c6b-2d1f0e9a8b7c"
        );
        let negative = Claimed { size: -1, ..file };
        assert!(task_for(&negative, &src, &connection).is_err());
    }

    #[test]
    fn room_is_the_ask_within_the_servers_queue_less_its_running_transfers() {
        let ask = |want, reserve| Ask {
            server_id: 1,
            want,
            reserve,
        };
        // The poller's queue: max_sessions * PIPELINE.
        assert_eq!(room(&ask(100, 0), 4, 0), 4 * PIPELINE);
        assert_eq!(room(&ask(3, 0), 4, 0), 3);
        assert_eq!(room(&ask(100, 0), 4, 4 * PIPELINE - 1), 1);
        // A stand-in: only the sessions the poller leaves, no queue.
        assert_eq!(room(&ask(100, 1), 4, 0), 3);
        assert_eq!(room(&ask(100, 1), 4, 3), 0);
        // Over the limit (max_sessions lowered): nothing, never negative.
        assert_eq!(room(&ask(100, 0), 1, 5), 0);
    }

    #[test]
    fn a_turn_gives_each_server_its_share_of_its_agents_slots() {
        let servers: Vec<DueServer> = (1..=3)
            .map(|id| DueServer {
                id,
                poller_agent: Some(if id == 3 { "a2" } else { "a1" }.into()),
                poller_coordinator: Some("c1".into()),
                poller_ready: true,
                served_at: DateTime::<Utc>::UNIX_EPOCH,
            })
            .collect();
        let plan = plan_turn(&servers, "c1", &here());
        let wants = |i: usize| {
            plan[i]
                .iter()
                .map(|a| (a.server_id, a.want))
                .collect::<Vec<_>>()
        };
        // a1 has 2 slots over a turn of 3 servers: one each, at least one.
        assert_eq!(wants(0), vec![(1, 1), (2, 1)]);
        // a2 has 5: its one server gets 5 / 3.
        assert_eq!(wants(1), vec![(3, 1)]);
        assert!(plan[2].is_empty());
        // Slots run out: the rest wait for the next round.
        let mut one = here();
        one[0].free = 1;
        let plan = plan_turn(&servers, "c1", &one);
        assert_eq!(plan[0].len(), 1);
    }

    /// Seals a password for every server row bound to it, as the registry
    /// does, under a test key.
    async fn seal_all(db: &PgPool) -> SecretBox {
        use crate::secrets::{Credential, SealFormat};
        let secrets = SecretBox::from_key(&[7; 32]);
        let rows: Vec<ConnectionRow> =
            sqlx::query_as(&format!("SELECT {CONNECTION_COLUMNS} FROM servers s"))
                .fetch_all(db)
                .await
                .unwrap();
        for row in rows {
            let sealed = secrets
                .seal(&Credential::Password("pw".into()), &row.binding())
                .unwrap();
            sqlx::query(
                "UPDATE servers SET secret_ciphertext = $2, secret_format = $3 WHERE id = $1",
            )
            .bind(row.server_id)
            .bind(sealed)
            .bind(SealFormat::BOUND)
            .execute(db)
            .await
            .unwrap();
        }
        secrets
    }

    /// A second server `name` with one watch and `files` due files; its id.
    async fn add_server(db: &PgPool, name: &str, max_sessions: i32, files: i64) -> i64 {
        sqlx::query_scalar(
            "WITH s AS (INSERT INTO servers (name, hostname, username, auth_kind, secret_ciphertext, \
                                            host_key_fingerprint, max_sessions) \
                        VALUES ($1, 'h', 'u', 'password', '\\x00', 'SHA256:x', $2) RETURNING id), \
                  w AS (INSERT INTO watches (server_id, directory, bucket) SELECT id, '/in', 'bkt' FROM s \
                        RETURNING id, server_id) \
             INSERT INTO files (server_id, watch_id, path, size, mtime_unix) \
             SELECT server_id, id, '/in/' || $1 || '-' || g || '.csv', 3, 1800000000 \
             FROM w, generate_series(1, $3) g RETURNING server_id",
        )
        .bind(name)
        .bind(max_sessions)
        .bind(files)
        .fetch_all(db)
        .await
        .unwrap()[0]
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            backoff: ferry_common::backoff::Backoff::new(
                Duration::from_secs(1),
                Duration::from_secs(1),
            ),
        }
    }

    fn claimant<'a>(agent: &'a str, policy: &'a RetryPolicy) -> Claimant<'a> {
        Claimant {
            coordinator: "c1",
            agent,
            lease: Duration::from_secs(60),
            policy,
        }
    }

    /// A test database with the seeded server (two due files); its id.
    async fn seeded() -> (crate::transitions::tests::Db, i64) {
        let db = crate::transitions::tests::Db::create().await;
        db.seed().await;
        let first: i64 = sqlx::query_scalar("SELECT id FROM servers")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (db, first)
    }

    #[tokio::test]
    async fn one_claim_serves_several_servers_within_their_sessions_and_records_each_location() {
        let (db, first) = seeded().await;
        let busy = add_server(&db.pool, "busy", 1, 5).await;
        let sealed = add_server(&db.pool, "sealed", 4, 2).await;
        let secrets = seal_all(&db.pool).await;
        // Sealed for another row: its credentials cannot be opened.
        sqlx::query("UPDATE servers SET secret_ciphertext = (SELECT secret_ciphertext FROM servers WHERE id = $2) WHERE id = $1")
            .bind(sealed)
            .bind(first)
            .execute(&db.pool)
            .await
            .unwrap();
        // One of the first server's files cannot be an object key.
        sqlx::query("UPDATE files SET path = '/in/../b.csv' WHERE path = '/in/b.csv'")
            .execute(&db.pool)
            .await
            .unwrap();
        let policy = policy();
        let ask = |server_id, want| Ask {
            server_id,
            want,
            reserve: 0,
        };
        let got = claim(
            &db.pool,
            &secrets,
            claimant("a1", &policy),
            &[ask(first, 5), ask(busy, 5), ask(sealed, 5)],
        )
        .await
        .unwrap();
        // busy: max_sessions 1, so a queue of PIPELINE; the first server:
        // one task, one rejection; the sealed server: nothing claimed.
        let mut per_server: HashMap<String, usize> = HashMap::new();
        for t in &got.tasks {
            *per_server
                .entry(t.source.as_ref().unwrap().name.clone())
                .or_default() += 1;
            assert_eq!(t.source.as_ref().map(|s| s.auth.is_some()), Some(true));
        }
        assert_eq!(per_server.get("busy"), Some(&(PIPELINE as usize)));
        assert_eq!(per_server.get("acme"), Some(&1));
        assert_eq!(got.tasks.len(), 1 + PIPELINE as usize);
        assert_eq!(got.rejected.len(), 1);
        assert_eq!(
            got.sealed.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![sealed]
        );
        assert!(got.full.is_empty(), "nobody got all 5: {:?}", got.full);
        // Each task's location and token are the row's, written by the claim.
        for t in &got.tasks {
            let (status, token, bucket, key, owner): (String, i64, Option<String>, Option<String>, Option<String>) =
                sqlx::query_as(
                    "SELECT status, fencing_token, assigned_bucket, assigned_key, lease_owner FROM files WHERE id = $1",
                )
                .bind(t.file_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
            assert_eq!(status, "in_progress");
            assert_eq!(token as u64, t.fencing_token);
            assert_eq!(bucket.as_deref(), Some(t.bucket.as_str()));
            assert_eq!(key.as_deref(), Some(t.key.as_str()));
            assert_eq!(owner.as_deref(), Some("a1"));
        }
        let statuses: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM files GROUP BY status ORDER BY status")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            statuses,
            vec![
                ("failed".into(), 1),
                ("in_progress".into(), 1 + PIPELINE),
                ("new".into(), 5 - PIPELINE + 2),
            ]
        );
        // The queue is full now: busy gets nothing more.
        let again = claim(&db.pool, &secrets, claimant("a1", &policy), &[ask(busy, 5)])
            .await
            .unwrap();
        assert!(again.tasks.is_empty());
        db.drop().await;
    }

    #[tokio::test]
    async fn the_least_recently_served_server_comes_first() {
        let (db, first) = seeded().await;
        let second = add_server(&db.pool, "beta", 4, 1).await;
        let secrets = seal_all(&db.pool).await;
        let order = || async {
            servers_with_due_files(&db.pool, "default", ServeKey::start(), 100)
                .await
                .unwrap()
                .iter()
                .map(|s| s.id)
                .collect::<Vec<i64>>()
        };
        let policy = policy();
        let one = |server_id| {
            [Ask {
                server_id,
                want: 1,
                reserve: 0,
            }]
        };
        // The first server is served (one of its two files): the other one,
        // never served, comes first now, however the tie was broken before.
        let got = claim(&db.pool, &secrets, claimant("a1", &policy), &one(first))
            .await
            .unwrap();
        assert_eq!(got.tasks.len(), 1);
        assert_eq!(got.full, HashSet::from([first]));
        for _ in 0..10 {
            assert_eq!(order().await, vec![second, first]);
        }
        let got = claim(&db.pool, &secrets, claimant("a1", &policy), &one(second))
            .await
            .unwrap();
        assert_eq!(got.tasks.len(), 1);
        // The second server has nothing due any more.
        assert_eq!(order().await, vec![first]);
        db.drop().await;
    }

    #[tokio::test]
    async fn pages_in_serving_order_cover_each_server_once_and_a_served_one_comes_last() {
        let (db, first) = seeded().await;
        let mut ids = vec![first];
        for name in ["b", "c", "d", "e"] {
            ids.push(add_server(&db.pool, name, 4, 2).await);
        }
        // A server with nothing due is never listed.
        let idle = add_server(&db.pool, "idle", 4, 1).await;
        sqlx::query("UPDATE files SET status = 'processed' WHERE server_id = $1")
            .bind(idle)
            .execute(&db.pool)
            .await
            .unwrap();
        let secrets = seal_all(&db.pool).await;
        let all_pages = || async {
            let (mut after, mut seen) = (ServeKey::start(), Vec::new());
            loop {
                let page = servers_with_due_files(&db.pool, "default", after, 2)
                    .await
                    .unwrap();
                assert!(page.len() <= 2);
                let Some(last) = page.last() else {
                    return seen;
                };
                after = ServeKey::of(last);
                seen.extend(page.iter().map(|s| s.id));
            }
        };
        // Never served: in id order.
        assert_eq!(all_pages().await, ids);
        // The third server is served: it comes after all the others.
        let policy = policy();
        let ask = [Ask {
            server_id: ids[2],
            want: 1,
            reserve: 0,
        }];
        let got = claim(&db.pool, &secrets, claimant("a1", &policy), &ask)
            .await
            .unwrap();
        assert_eq!(got.tasks.len(), 1);
        let mut expected = ids.clone();
        let served = expected.remove(2);
        expected.push(served);
        assert_eq!(all_pages().await, expected);
        db.drop().await;
    }
}
