//! `ferry.v1.AgentService`: one bidirectional stream per connected agent.
//!
//! The agent's identity is the (site, name) in its certificate's SAN URI
//! ([`AgentId`], recorded as `site/name`). Each stream is a [`Session`] in
//! this coordinator's table; the reconciler
//! ([`crate::tasks`]) sends it poll assignments, and the reader task here
//! records what it reports.

use ferry_common::sync::lock;
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_common::domain::AgentId;
use ferry_common::lifecycle::RetryPolicy;
use ferry_common::validate::FieldError;
use ferry_proto::{self as proto, agent_message::Body, agent_service_server::AgentService};
use futures::{FutureExt, Stream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::agent_input;
use crate::discovery::{self, BatchKind, BatchOutcome, Discovered};
use crate::error::ApiError;
use crate::hostkey::{PROBE_ANSWER_TIMEOUT, PendingProbes, ProbeError, ProbedKey};
use crate::polls;
use crate::results;
use crate::state::Coordinator;
use crate::transitions::Outcome;

/// Seconds between agent heartbeats, announced in the welcome.
pub(crate) const HEARTBEAT_SECS: u32 = 5;
/// An agent that sent nothing (not even a heartbeat) for this long is
/// treated as silent: no new transfers or post-actions go to it.
pub(crate) const SILENT_AFTER: Duration = Duration::from_secs(3 * HEARTBEAT_SECS as u64);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most task results applied in one transaction: the ones an agent sent
/// that are already received when the first is read.
const RESULT_BATCH: usize = 256;

/// Ordinary discovery batches of one agent recorded at once (each in its
/// own transaction). Only consecutive ones overlap: any other message of
/// the stream is handled after every batch received before it, so a
/// stream's messages take effect in order except within such a run.
const DISCOVERY_IN_FLIGHT: usize = 4;

/// How transfers are leased and retried, and how much may wait for an agent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskSettings {
    pub lease: Duration,
    pub retry: RetryPolicy,
    /// Messages queued per agent stream before the agent counts as not
    /// reading and is disconnected.
    pub send_queue: usize,
}

/// An ordinary (not baseline) discovery batch, the one kind of message that
/// is recorded concurrently with the next ones of its stream.
fn is_ordinary_discovery(msg: &Option<Result<proto::AgentMessage, Status>>) -> bool {
    matches!(
        msg,
        Some(Ok(proto::AgentMessage {
            body: Some(Body::Discovery(batch)),
        })) if !batch.baseline
    )
}

/// One live agent stream on this coordinator.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// The agent's identity as recorded everywhere (`site/name`, see
    /// [`AgentId`]): leases, poll leases, post-action recipients, logs.
    pub agent: String,
    pub site: String,
    pub capacity: u32,
    pub id: String,
    pub tx: mpsc::Sender<proto::CoordinatorMessage>,
    /// Poll assignments sent on this stream: server id -> version.
    pub sent_polls: Arc<Mutex<HashMap<i64, String>>>,
    /// Files whose transfer this agent runs (assigned, no result yet).
    pub tasks: Arc<Mutex<HashSet<i64>>>,
    /// Drained by an operator (`agents.draining`, as last told to the agent).
    pub draining: Arc<AtomicBool>,
    /// Why the agent takes no transfers for now (it said so in its last
    /// heartbeat, or a result blamed the agent itself); `None` when it does.
    pub unavailable: Arc<Mutex<Option<String>>>,
    /// When the agent last sent anything on this stream (it sends a
    /// heartbeat every [`HEARTBEAT_SECS`]).
    pub heard: Arc<Mutex<Instant>>,
    /// Cancelled when this stream must end (superseded by a newer stream of
    /// the same agent, or the agent was revoked); see [`Session::close`].
    pub ended: CancellationToken,
    /// The status the agent is told when its stream is closed.
    end_status: Arc<Mutex<Option<Status>>>,
}

impl Session {
    pub(crate) fn in_flight(&self) -> u32 {
        lock(&self.tasks).len() as u32
    }

    /// Drained agents get no transfers, post-actions or poll leases.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Agents that are unavailable get no transfers (they still poll and
    /// run post-actions: SFTP works, their S3 configuration does not), nor do
    /// silent ones (no message for [`SILENT_AFTER`]: frozen, or cut off
    /// while the stream looks open).
    pub(crate) fn takes_transfers(&self) -> bool {
        !self.is_draining() && lock(&self.unavailable).is_none() && !self.is_silent()
    }

    /// Treats the agent as silent until its next message (a lease of its
    /// expired although the stream is open).
    pub(crate) fn mark_silent(&self) {
        let long_ago = Instant::now().checked_sub(SILENT_AFTER + Duration::from_secs(1));
        if let Some(at) = long_ago {
            *lock(&self.heard) = at;
        }
    }

    /// Nothing heard from the agent for [`SILENT_AFTER`].
    pub(crate) fn is_silent(&self) -> bool {
        lock(&self.heard).elapsed() > SILENT_AFTER
    }

    pub(crate) fn task_started(&self, file_id: i64) {
        lock(&self.tasks).insert(file_id);
    }

    pub(crate) fn task_finished(&self, file_id: i64) {
        lock(&self.tasks).remove(&file_id);
    }

    /// Ends this stream: the agent receives `status` as the end of its
    /// response stream, and the coordinator stops reading from it. The first
    /// reason given wins.
    pub(crate) fn close(&self, status: Status) {
        lock(&self.end_status).get_or_insert(status);
        self.ended.cancel();
    }

    /// Queues a message without waiting; false if the stream is gone.
    ///
    /// **Invariant:** sending never blocks the loops that serve every agent
    /// (poll reconciler, scheduler, post-actions). An agent whose queue is
    /// full is not reading its stream: it is disconnected
    /// (`RESOURCE_EXHAUSTED`), and what it held comes back through its leases.
    pub(crate) async fn send(&self, body: proto::coordinator_message::Body) -> bool {
        match self
            .tx
            .try_send(proto::CoordinatorMessage { body: Some(body) })
        {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(agent = %self.agent, queued = self.tx.max_capacity(), "agent does not read its stream; disconnecting it");
                self.close(Status::resource_exhausted(format!(
                    "agent {}: {} messages queued and not read; the coordinator closed the stream",
                    self.agent,
                    self.tx.max_capacity()
                )));
                false
            }
        }
    }
}

/// Tells every loop that watches the agents (poll reconciliation and
/// scheduling) that one came, went or changed. Each subscriber sees every
/// change: a `Notify::notify_one` shared by the two loops woke only one of
/// them, and the other waited for its rescan (the poll reconciler up to 3 s,
/// so a new agent got its polls that much later).
#[derive(Debug, Clone)]
pub(crate) struct AgentChanges(Arc<watch::Sender<u64>>);

impl Default for AgentChanges {
    fn default() -> Self {
        AgentChanges(Arc::new(watch::channel(0).0))
    }
}

impl AgentChanges {
    pub(crate) fn notify(&self) {
        self.0.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that sees the changes from now on.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// The agent streams held by this coordinator.
#[derive(Clone)]
pub(crate) struct AgentStreams {
    coord: Coordinator,
    pub settings: TaskSettings,
    cancel: CancellationToken,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
    /// Wakes the poll reconciler and the scheduler when an agent comes, goes
    /// or changes.
    pub changed: AgentChanges,
    probes: PendingProbes,
    poll_reports: polls::ReportRecorder,
}

impl AgentStreams {
    pub(crate) fn new(
        coord: Coordinator,
        settings: TaskSettings,
        cancel: CancellationToken,
    ) -> Self {
        AgentStreams {
            poll_reports: polls::ReportRecorder::start(coord.db.clone()),
            coord,
            settings,
            cancel,
            sessions: Arc::default(),
            changed: AgentChanges::default(),
            probes: PendingProbes::default(),
        }
    }

    /// Reads the SSH host key of `host:port` through a connected agent of `site`.
    pub(crate) async fn probe_host_key(
        &self,
        site: &str,
        host: &str,
        port: u16,
    ) -> Result<ProbedKey, ProbeError> {
        let Some(session) = self.snapshot().into_iter().find(|s| s.site == site) else {
            return Err(ProbeError::NoAgent {
                site: site.to_string(),
                host: host.to_string(),
                port,
            });
        };
        let (request_id, answer) = self.probes.register(&session.agent);
        let no_answer = || ProbeError::NoAnswer {
            agent: session.agent.clone(),
            host: host.to_string(),
            port,
            secs: PROBE_ANSWER_TIMEOUT.as_secs(),
        };
        let sent = session
            .send(proto::coordinator_message::Body::HostKeyProbe(
                proto::HostKeyProbeRequest {
                    request_id: request_id.clone(),
                    hostname: host.to_string(),
                    port: u32::from(port),
                },
            ))
            .await;
        if !sent {
            self.probes.forget(&request_id);
            return Err(no_answer());
        }
        let result = match tokio::time::timeout(PROBE_ANSWER_TIMEOUT, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => {
                self.probes.forget(&request_id);
                return Err(no_answer());
            }
        };
        if result.error.is_empty() {
            Ok(ProbedKey {
                fingerprint: result.fingerprint,
                algorithm: result.key_algorithm,
            })
        } else {
            Err(ProbeError::Failed {
                agent: session.agent.clone(),
                site: site.to_string(),
                host: host.to_string(),
                port,
                message: result.error,
            })
        }
    }

    /// The open session of `agent` on this coordinator, if it has one.
    pub(crate) fn session(&self, agent: &str) -> Option<Session> {
        lock(&self.sessions).get(agent).cloned()
    }

    /// The sessions open right now.
    pub(crate) fn snapshot(&self) -> Vec<Session> {
        lock(&self.sessions).values().cloned().collect()
    }

    /// Marks this coordinator's agents disconnected and releases their leases.
    pub(crate) async fn shutdown(&self) {
        let sessions: Vec<Session> = lock(&self.sessions).drain().map(|(_, s)| s).collect();
        for s in sessions {
            self.disconnected(&s).await;
        }
    }

    async fn disconnected(&self, s: &Session) {
        let db = &self.coord.db;
        let r = sqlx::query(
            "UPDATE agents SET connected = false, in_flight = 0, unavailable = NULL \
             WHERE id = $1 AND session_id = $2",
        )
        .bind(&s.agent)
        .bind(&s.id)
        .execute(db)
        .await;
        if let Err(e) = r {
            tracing::warn!(agent = %s.agent, error = %e, "could not mark agent disconnected");
        }
        if let Err(e) = polls::release_agent(db, &self.coord.id, &s.agent).await {
            tracing::warn!(agent = %s.agent, error = %e, "could not release poll leases");
        }
        tracing::info!(agent = %s.agent, "agent disconnected");
        self.changed.notify();
    }

    async fn register(&self, who: &AgentId, hello: &proto::Hello) -> Result<Session, Status> {
        let agent = &who.to_string();
        let site = &who.site;
        // The site comes from the certificate; the agent's own setting is only
        // checked against it, so a misconfigured agent says so at once.
        if !hello.site.is_empty() && hello.site != *site {
            return Err(Status::permission_denied(format!(
                "agent {agent}: its certificate is for site {site:?}, but it was started with \
                 FERRY_SITE={:?}; an agent serves only the site its certificate names",
                hello.site
            )));
        }
        let revoked: Option<(Option<chrono::DateTime<chrono::Utc>>, Option<String>)> =
            sqlx::query_as("SELECT revoked_at, revoked_by FROM agents WHERE id = $1")
                .bind(agent)
                .fetch_optional(&self.coord.db)
                .await
                .map_err(|e| Status::from(ApiError::from(e)))?;
        if let Some((Some(at), by)) = revoked {
            return Err(Status::permission_denied(format!(
                "agent {agent} was revoked at {} by {}; its certificate is refused",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                by.as_deref().unwrap_or("an admin")
            )));
        }
        let id = Uuid::new_v4().to_string();
        let draining: bool = sqlx::query_scalar(
            "INSERT INTO agents (name, site, version, capacity, connected, connected_coordinator, \
                                 session_id, connected_at, last_seen_at) \
             VALUES ($1, $2, $3, $4, true, $5, $6, now(), now()) \
             ON CONFLICT (site, name) DO UPDATE SET version = $3, capacity = $4, connected = true, \
                connected_coordinator = $5, session_id = $6, connected_at = now(), last_seen_at = now() \
             RETURNING draining",
        )
        .bind(&who.name)
        .bind(site)
        .bind(&hello.version)
        .bind(hello.capacity as i32)
        .bind(&self.coord.id)
        .bind(&id)
        .fetch_one(&self.coord.db)
        .await
        .map_err(|e| Status::from(ApiError::from(e)))?;
        let (tx, _) = mpsc::channel(1);
        Ok(Session {
            agent: agent.to_string(),
            site: site.to_string(),
            capacity: hello.capacity,
            id,
            tx,
            sent_polls: Arc::default(),
            tasks: Arc::default(),
            heard: Arc::new(Mutex::new(Instant::now())),
            draining: Arc::new(AtomicBool::new(draining)),
            unavailable: Arc::default(),
            ended: CancellationToken::new(),
            end_status: Arc::default(),
        })
    }

    /// Closes `agent`'s stream if this coordinator holds it (revocation).
    pub(crate) fn close_agent(&self, agent: &str, status: Status) -> bool {
        let session = lock(&self.sessions).get(agent).cloned();
        match session {
            Some(s) => {
                s.close(status);
                true
            }
            None => false,
        }
    }

    /// Closes this coordinator's streams that are no longer the agent's
    /// current one (it connected again, here or elsewhere) or whose agent was
    /// revoked. Runs with the poll reconciler, so it does not depend on the
    /// agent sending heartbeats.
    pub(crate) async fn sweep(&self) -> Result<(), sqlx::Error> {
        let sessions = self.snapshot();
        if sessions.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = sessions.iter().map(|s| s.agent.clone()).collect();
        let ids: Vec<String> = sessions.iter().map(|s| s.id.clone()).collect();
        let rows: Vec<(String, String, bool, bool)> = sqlx::query_as(
            "SELECT s.name, s.id, a.session_id IS NOT DISTINCT FROM s.id, a.revoked_at IS NOT NULL \
             FROM unnest($1::text[], $2::text[]) AS s(name, id) JOIN agents a ON a.id = s.name",
        )
        .bind(&names)
        .bind(&ids)
        .fetch_all(&self.coord.db)
        .await?;
        for (name, id, current, revoked) in rows {
            let Some(s) = sessions.iter().find(|s| s.agent == name && s.id == id) else {
                continue;
            };
            let row = current.then_some((s.is_draining(), revoked));
            self.check_still_current(s, row).await;
        }
        Ok(())
    }

    /// What a heartbeat or the sweep found when it looked for this stream's row.
    async fn check_still_current(&self, s: &Session, row: Option<(bool, bool)>) -> Option<bool> {
        match row {
            Some((_, true)) => {
                tracing::warn!(agent = %s.agent, "revoked agent: closing its stream");
                s.close(Status::permission_denied(format!(
                    "agent {} was revoked; its certificate is refused",
                    s.agent
                )));
                None
            }
            Some((draining, false)) => Some(draining),
            None => {
                // Another stream of the same agent registered since (on this
                // or another coordinator): one live stream per agent, the
                // newest wins.
                let elsewhere: Option<String> =
                    sqlx::query_scalar("SELECT connected_coordinator FROM agents WHERE id = $1")
                        .bind(&s.agent)
                        .fetch_optional(&self.coord.db)
                        .await
                        .ok()
                        .flatten();
                tracing::warn!(agent = %s.agent, newer_on = ?elsewhere, "a newer stream of this agent took over; closing this one");
                s.close(Status::aborted(format!(
                    "agent {}: a newer stream of the same agent took over (on coordinator {}); \
                     one live stream per agent (site and name)",
                    s.agent,
                    elsewhere.as_deref().unwrap_or("?")
                )));
                None
            }
        }
    }

    /// Tells `agent`'s stream, if this coordinator holds it, that its drain
    /// state is now `draining` (see [`Self::apply_drain`]).
    pub(crate) async fn drain_changed(&self, agent: &str, draining: bool) {
        let session = lock(&self.sessions).get(agent).cloned();
        if let Some(s) = session {
            self.apply_drain(&s, draining).await;
        }
    }

    /// Sends `Drain` when the recorded state differs from what the stream was
    /// told. Called by `DrainAgent` on this coordinator and on every heartbeat
    /// (which reads `agents.draining`), so a drain set through any
    /// coordinator reaches the agent within a heartbeat.
    async fn apply_drain(&self, s: &Session, draining: bool) {
        if s.draining.swap(draining, Ordering::SeqCst) == draining {
            return;
        }
        tracing::info!(agent = %s.agent, draining, "agent drain changed");
        s.send(proto::coordinator_message::Body::Drain(proto::Drain {
            resume: !draining,
        }))
        .await;
        // Poll leases and capacity changed hands.
        self.changed.notify();
    }

    /// Applies a batch of transfer results of `s`'s agent (in one transaction
    /// per run of distinct files), acknowledges them and wakes the scheduler
    /// once.
    async fn handle_results(
        &self,
        s: &Session,
        batch: Vec<proto::TaskResult>,
    ) -> anyhow::Result<()> {
        for r in &batch {
            s.task_finished(r.file_id);
            if let Some(proto::task_result::Outcome::Failure(f)) = &r.outcome
                && f.kind == proto::FailureKind::Agent as i32
            {
                // Until its next heartbeat says otherwise.
                *lock(&s.unavailable) = Some(f.message.clone());
            }
        }
        let outcomes =
            results::apply(&self.coord.db, &s.agent, &batch, &self.settings.retry).await?;
        for (r, outcome) in batch.iter().zip(&outcomes) {
            crate::metrics::transfer_result(&s.site, r, outcome);
            match outcome {
                Outcome::Moved { to, .. } => {
                    tracing::info!(agent = %s.agent, file = r.file_id, status = %to, "transfer result")
                }
                Outcome::Stale | Outcome::Illegal(_) => {
                    tracing::warn!(agent = %s.agent, file = r.file_id, token = r.fencing_token, "transfer result ignored: the file is not leased to this agent with this token")
                }
            }
        }
        // Recorded (or for good not applicable): the agent may forget them.
        // Results that failed to apply (database error, `?` above) are not
        // acknowledged, and the agent sends them again.
        for r in &batch {
            s.send(proto::coordinator_message::Body::ResultAck(
                proto::ResultAck {
                    file_id: r.file_id,
                    fencing_token: r.fencing_token,
                },
            ))
            .await;
        }
        // Capacity freed: wake the scheduler.
        self.coord.capacity_freed_here();
        Ok(())
    }

    /// Records a discovery batch of `s`'s agent and acknowledges it, or
    /// leaves it unacknowledged (so the agent sends it again) while the
    /// watch's baseline is pending or when recording failed.
    async fn handle_discovery(
        &self,
        s: &Session,
        batch: proto::DiscoveryBatch,
    ) -> anyhow::Result<()> {
        let db = &self.coord.db;
        let kind = if batch.baseline {
            BatchKind::Baseline {
                complete: batch.baseline_complete,
            }
        } else {
            BatchKind::Ordinary
        };
        let entries: Vec<Discovered> = batch
            .entries
            .into_iter()
            .map(|e| Discovered {
                path: e.path,
                size: e.size,
                mtime_unix: e.mtime_unix,
            })
            .collect();
        let outcome = discovery::record_batch(
            db,
            &s.agent,
            batch.server_id,
            batch.watch_id,
            kind,
            &entries,
        )
        .await?;
        match outcome {
            BatchOutcome::NotPolled => {
                tracing::info!(agent = %s.agent, server = batch.server_id, watch = batch.watch_id, entries = entries.len(), "discovery batch ignored: the agent does not poll this server, or the watch is not one of its live watches");
            }
            BatchOutcome::AwaitingBaseline => {
                // Not acknowledged: the agent sends it again once
                // its baseline is recorded.
                tracing::debug!(agent = %s.agent, watch = batch.watch_id, entries = entries.len(), "discovery batch held back: the watch's baseline is not recorded yet");
                return Ok(());
            }
            BatchOutcome::BaselineAlreadyTaken => {
                tracing::info!(agent = %s.agent, watch = batch.watch_id, entries = entries.len(), "baseline part ignored: the watch's baseline was already recorded");
            }
            BatchOutcome::Recorded(r) => {
                crate::metrics::discovered(db, batch.server_id, entries.len(), r.inserted).await;
                if let Some((path, why)) = &r.example {
                    tracing::warn!(agent = %s.agent, server = batch.server_id, watch = batch.watch_id, rejected = r.rejected, example = ?path, why = %why, "agent fault: discovered entries outside the watch rejected");
                }
                if r.baseline_complete {
                    tracing::info!(agent = %s.agent, watch = batch.watch_id, "watch baseline recorded: files present now are skipped, later ones flow");
                }
                tracing::debug!(agent = %s.agent, watch = batch.watch_id, reported = entries.len(), new = r.inserted, baseline = batch.baseline, "discovery");
                if r.inserted > 0 && kind == BatchKind::Ordinary {
                    self.coord.files_due().await;
                }
            }
        }
        // Recorded, or for good not applicable: the agent may forget
        // it. A batch that failed (database error, `?` above) is not
        // acknowledged and comes again.
        s.send(proto::coordinator_message::Body::DiscoveryAck(
            proto::DiscoveryAck {
                batch_id: batch.batch_id,
            },
        ))
        .await;
        Ok(())
    }

    async fn handle(&self, s: &Session, body: Body) -> anyhow::Result<()> {
        let db = &self.coord.db;
        match body {
            Body::Heartbeat(h) => {
                let unavailable = (!h.unavailable.is_empty()).then(|| h.unavailable.clone());
                let was = std::mem::replace(&mut *lock(&s.unavailable), unavailable.clone());
                if was.is_some() != unavailable.is_some() {
                    tracing::warn!(agent = %s.agent, unavailable = ?unavailable, "agent availability for transfers changed");
                    if unavailable.is_none() {
                        self.changed.notify();
                    }
                }
                let row: Option<(bool, bool)> = sqlx::query_as(
                    "UPDATE agents SET last_seen_at = now(), in_flight = $3, files_transferred = $4, \
                     bytes_transferred = $5, errors = $6, bytes_per_sec = $7, unavailable = $8 \
                     WHERE id = $1 AND session_id = $2 RETURNING draining, revoked_at IS NOT NULL",
                )
                .bind(&s.agent)
                .bind(&s.id)
                .bind(h.in_flight as i32)
                .bind(h.files_transferred as i64)
                .bind(h.bytes_transferred as i64)
                .bind(h.errors as i64)
                .bind(h.bytes_per_sec as i64)
                .bind(&unavailable)
                .fetch_optional(db)
                .await?;
                if let Some(draining) = self.check_still_current(s, row).await {
                    self.apply_drain(s, draining).await;
                }
            }
            Body::Discovery(batch) => self.handle_discovery(s, batch).await?,
            Body::PollReport(report) => {
                // Only the poller of a server speaks for it: a report of a
                // server this stream was not assigned counts nowhere (the
                // recorder checks the poll lease again when it writes).
                if !lock(&s.sent_polls).contains_key(&report.server_id) {
                    tracing::debug!(agent = %s.agent, server = report.server_id, "poll report for a server this agent does not poll ignored");
                    return Ok(());
                }
                if !report.ok {
                    tracing::warn!(agent = %s.agent, server = report.server_id, error = ?report.error, "poll failed");
                }
                crate::metrics::poll_reported(db, &report).await;
                self.poll_reports.record(&s.agent, report).await;
            }
            Body::TaskProgress(p) => {
                if !results::renew_lease(
                    db,
                    p.file_id,
                    p.fencing_token,
                    &s.agent,
                    self.settings.lease,
                    Some(p.bytes_done),
                )
                .await?
                {
                    tracing::info!(agent = %s.agent, file = p.file_id, "progress for a task this agent no longer holds");
                }
            }
            Body::TaskResult(r) => self.handle_results(s, vec![r]).await?,
            Body::PostActionResult(r) => {
                if !r.ok {
                    tracing::warn!(agent = %s.agent, file = r.file_id, error = ?r.message, "post-action failed");
                }
                if !results::record_post_action(db, &s.agent, &r, &self.settings.retry).await? {
                    tracing::warn!(agent = %s.agent, file = r.file_id, "post-action result for a post-action not pending with this agent ignored");
                }
            }
            Body::HostKeyProbeResult(r) => {
                if !self.probes.resolve(&s.agent, r) {
                    tracing::info!(agent = %s.agent, "host-key probe answer nobody waits for");
                }
            }
            Body::Hello(_) => anyhow::bail!("hello sent twice"),
        }
        Ok(())
    }
}

/// An agent message as the reader handles it: one over a cap of
/// [`agent_input::admit`] becomes the status that ends the stream.
fn admitted(msg: Result<proto::AgentMessage, Status>) -> Result<proto::AgentMessage, Status> {
    let mut msg = msg?;
    if let Some(body) = &mut msg.body {
        agent_input::admit(body).map_err(|refusal| {
            tracing::warn!(field = refusal.field, why = %refusal.message, "agent message refused");
            Status::from(refusal)
        })?;
    }
    Ok(msg)
}

type OutStream = Pin<Box<dyn Stream<Item = Result<proto::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentStreams {
    type ConnectStream = OutStream;

    async fn connect(
        &self,
        req: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let Some(who) = ferry_proto::tls::peer_role(&req).and_then(|r| r.agent_id()) else {
            return Err(Status::permission_denied("not an agent certificate"));
        };
        let agent = who.to_string();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let not_hello =
            || ApiError::from(FieldError::new("body", "the first message must be hello")).into();
        let Some(proto::AgentMessage {
            body: Some(mut first),
        }) = first
        else {
            return Err(not_hello());
        };
        agent_input::admit(&mut first)?;
        let Body::Hello(hello) = first else {
            return Err(not_hello());
        };
        let mut session = self.register(&who, &hello).await?;
        // Transfers that survived a reconnect keep their lease if still current.
        match results::renew_running(
            &self.coord.db,
            &hello.running_tasks,
            &agent,
            self.settings.lease,
        )
        .await
        {
            Ok(held) => held.into_iter().for_each(|id| session.task_started(id)),
            Err(e) => {
                tracing::warn!(agent = %agent, error = %e, "could not renew the leases of the transfers still running")
            }
        }
        let (tx, rx) = mpsc::channel(self.settings.send_queue.max(1));
        session.tx = tx;
        session
            .send(proto::coordinator_message::Body::Welcome(proto::Welcome {
                agent_name: who.name.clone(),
                coordinator_id: self.coord.id.clone(),
                heartbeat_interval_secs: HEARTBEAT_SECS,
            }))
            .await;
        if session.is_draining() {
            session
                .send(proto::coordinator_message::Body::Drain(proto::Drain {
                    resume: false,
                }))
                .await;
        }
        let older = lock(&self.sessions).insert(agent.clone(), session.clone());
        if let Some(old) = older {
            tracing::info!(agent = %agent, "closing an older stream of the same agent");
            old.close(Status::aborted(format!(
                "agent {agent}: a newer stream of the same agent took over (on coordinator {}); \
                 one live stream per agent (site and name)",
                self.coord.id
            )));
        }
        tracing::info!(agent = %agent, site = %session.site, version = ?hello.version, "agent connected");
        self.changed.notify();

        let session_end = session.ended.clone();
        let end_status = session.end_status.clone();
        let streams = self.clone();
        // Every message is bounded before it is handled: a refused one
        // arrives as an error, which ends the stream with that status.
        let mut inbound = inbound.map(admitted);
        tokio::spawn(async move {
            // A message read ahead while gathering a batch of results.
            let mut ahead = None;
            let discovery_slots = Arc::new(Semaphore::new(DISCOVERY_IN_FLIGHT));
            loop {
                let msg = match ahead.take() {
                    Some(msg) => msg,
                    None => tokio::select! {
                        _ = streams.cancel.cancelled() => break,
                        _ = session.ended.cancelled() => break,
                        m = inbound.next() => m,
                    },
                };
                *lock(&session.heard) = Instant::now();
                if !is_ordinary_discovery(&msg) {
                    // Everything received before this message takes effect
                    // first: wait for the discovery batches being recorded.
                    let Ok(_all) = discovery_slots
                        .acquire_many(DISCOVERY_IN_FLIGHT as u32)
                        .await
                    else {
                        break;
                    };
                }
                match msg {
                    Some(Ok(proto::AgentMessage {
                        body: Some(Body::TaskResult(first)),
                    })) => {
                        // Results already received are applied together.
                        let mut results = vec![first];
                        while results.len() < RESULT_BATCH {
                            match inbound.next().now_or_never() {
                                Some(Some(Ok(proto::AgentMessage {
                                    body: Some(Body::TaskResult(r)),
                                }))) => results.push(r),
                                Some(other) => {
                                    ahead = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                        if let Err(e) = streams.handle_results(&session, results).await {
                            tracing::warn!(agent = %session.agent, error = format!("{e:#}"), "agent results failed");
                        }
                    }
                    Some(Ok(proto::AgentMessage {
                        body: Some(Body::Discovery(batch)),
                    })) if !batch.baseline => {
                        // Ordinary batches are idempotent inserts, each
                        // checking the watch's baseline flag under its row
                        // lock, so several are recorded at once (the first
                        // poll of a big directory sends hundreds). Baseline
                        // parts stay in order, below: a later part that
                        // committed first would make an earlier one count
                        // as already taken.
                        let Ok(slot) = discovery_slots.clone().acquire_owned().await else {
                            break;
                        };
                        let (streams, session) = (streams.clone(), session.clone());
                        tokio::spawn(async move {
                            let _slot = slot;
                            if let Err(e) = streams.handle_discovery(&session, batch).await {
                                tracing::warn!(agent = %session.agent, error = format!("{e:#}"), "agent message failed");
                            }
                        });
                    }
                    Some(Ok(proto::AgentMessage { body: Some(body) })) => {
                        if let Err(e) = streams.handle(&session, body).await {
                            tracing::warn!(agent = %session.agent, error = format!("{e:#}"), "agent message failed");
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(status)) => {
                        tracing::info!(agent = %session.agent, error = ?status.message(), "agent stream error");
                        session.close(status);
                        break;
                    }
                    None => break,
                }
            }
            let current = {
                let mut map = lock(&streams.sessions);
                match map.get(&session.agent) {
                    Some(s) if s.id == session.id => map.remove(&session.agent).is_some(),
                    _ => false,
                }
            };
            if current {
                streams.disconnected(&session).await;
            }
        });
        // The response ends when the session is closed, with the status
        // `Session::close` recorded (normal ends carry none).
        let messages = futures::StreamExt::take_until(
            ReceiverStream::new(rx).map(Ok),
            session_end.clone().cancelled_owned(),
        );
        let last = futures::stream::once(async move { lock(&end_status).take().map(Err) })
            .filter_map(|end| end);
        Ok(Response::new(Box::pin(messages.chain(last)) as OutStream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_agent_change_wakes_every_loop_that_waits_for_one() {
        let changes = AgentChanges::default();
        let mut polls = changes.subscribe();
        let mut scheduler = changes.subscribe();
        // Nothing changed yet: neither wakes.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), polls.changed())
                .await
                .is_err()
        );
        changes.notify();
        for (name, rx) in [("polls", &mut polls), ("scheduler", &mut scheduler)] {
            tokio::time::timeout(Duration::from_secs(1), rx.changed())
                .await
                .unwrap_or_else(|_| panic!("the {name} loop was not woken"))
                .unwrap();
        }
        // A change made while a loop was busy is seen when it next waits.
        changes.notify();
        tokio::time::timeout(Duration::from_secs(1), polls.changed())
            .await
            .expect("a change while busy is not lost")
            .unwrap();
    }
}
