//! The control channel: one `AgentService.Connect` stream at a time, to the
//! coordinators in turn, reconnecting with exponential backoff and jitter.
//! Dispatches coordinator messages to the pollers.
//!
//! **Architecture invariant:** the agent never talks to Postgres or AMQP; all
//! it knows of the system arrives on this stream. Its identity is its
//! certificate, never a field it sends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_common::backoff::Backoff;
use ferry_proto::tls::{TlsMaterial, TlsPaths, endpoint_host};
use ferry_proto::{
    self as proto, agent_message::Body, agent_service_client::AgentServiceClient,
    coordinator_message::Body as CBody,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::config::AgentConfig;
use crate::health::Readiness;
use crate::poller::{self, Trackers, message};
use crate::runner::Runner;
use crate::transfer::{S3Target, SessionPool};

/// Why a stream ended.
enum StreamEnd {
    /// Shutdown requested.
    Shutdown,
    /// Connection lost after the coordinator welcomed us.
    Lost(String),
}

/// Runs the agent until `cancel` fires.
pub(crate) async fn run(cfg: AgentConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    let tls = TlsPaths {
        ca: cfg.tls_ca.clone(),
        cert: cfg.tls_cert.clone(),
        key: cfg.tls_key.clone(),
    }
    .load()?;
    for c in &cfg.coordinators {
        endpoint_host(c)?;
    }
    let readiness = Arc::new(Readiness::default());
    crate::metrics::TRANSFER_CAPACITY.set(&[], i64::from(cfg.capacity));
    if let Some(addr) = cfg.http_listen {
        let bound = ferry_proto::http::serve(addr, readiness.clone(), cancel.clone()).await?;
        tracing::info!(%bound, "serving /healthz, /readyz and /metrics over plain HTTP");
    }
    {
        let readiness = readiness.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            readiness.stopping();
        });
    }
    let trackers = Trackers::default();
    let runner = Runner::new(
        SessionPool::new(cfg.sftp_timeouts()),
        S3Target::from_env().await,
        cfg.capacity,
    );
    // Capped well below a task lease: once a coordinator can take the agent
    // again (after a database outage, say), the agent is back within
    // seconds and its hello renews the leases of the transfers it kept
    // running, before the reaper gives up on them.
    let backoff = Backoff::new(Duration::from_millis(500), RECONNECT_MAX);
    let mut attempt = 0u32;
    let mut next = 0usize;
    loop {
        let endpoint = &cfg.coordinators[next % cfg.coordinators.len()];
        let outcome = stream_once(
            endpoint, &tls, &cfg, &trackers, &runner, &readiness, &cancel,
        )
        .await;
        readiness.disconnected();
        match outcome {
            Ok(StreamEnd::Shutdown) => return Ok(()),
            Ok(StreamEnd::Lost(why)) => {
                tracing::warn!(coordinator = %endpoint, reason = %why, "coordinator stream lost; reconnecting");
                attempt = 0;
            }
            Err(e) => {
                tracing::warn!(coordinator = %endpoint, error = format!("{e:#}"), "cannot reach coordinator");
                next += 1;
            }
        }
        let delay = backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn stream_once(
    endpoint: &str,
    tls: &TlsMaterial,
    cfg: &AgentConfig,
    trackers: &Trackers,
    runner: &Runner,
    readiness: &Readiness,
    cancel: &CancellationToken,
) -> anyhow::Result<StreamEnd> {
    let host = endpoint_host(endpoint)?;
    let channel = Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("endpoint {endpoint:?}"))?
        .tls_config(tls.client_config(&host))
        .context("TLS configuration")?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .with_context(|| format!("connect to {endpoint}"))?;
    let (tx, rx) = mpsc::channel::<proto::AgentMessage>(1024);
    tx.send(message(Body::Hello(proto::Hello {
        version: ferry_common::VERSION.to_string(),
        site: cfg.site.clone().unwrap_or_default(),
        capacity: cfg.capacity,
        running_tasks: runner.running_tasks(),
    })))
    .await
    .context("queue hello")?;
    let mut inbound = AgentServiceClient::new(channel)
        .max_decoding_message_size(proto::AGENT_STREAM_MAX_MESSAGE)
        .max_encoding_message_size(proto::AGENT_STREAM_MAX_MESSAGE)
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let welcome = match inbound.message().await.context("read welcome")? {
        Some(proto::CoordinatorMessage {
            body: Some(CBody::Welcome(w)),
        }) => w,
        other => anyhow::bail!("expected welcome, got {other:?}"),
    };
    tracing::info!(coordinator = %welcome.coordinator_id, agent = %welcome.agent_name, "connected");
    readiness.connected(&welcome.coordinator_id);
    // A drain lasts for one stream: the coordinator repeats it after the welcome.
    runner.hold(false);

    // Not a child of `cancel`: on SIGTERM the stream stays up while running
    // transfers finish and their results are delivered (see `drain`).
    let session = CancellationToken::new();
    let forwarder = tokio::spawn({
        let runner = runner.clone();
        let tx = tx.clone();
        let session = session.clone();
        async move { runner.forward(tx, session).await }
    });
    let heartbeat = tokio::spawn(heartbeats(
        runner.clone(),
        tx.clone(),
        Duration::from_secs(u64::from(welcome.heartbeat_interval_secs.max(1))),
        session.clone(),
    ));
    let mut dispatch = Dispatch::new(
        tx.clone(),
        trackers.clone(),
        runner.clone(),
        cfg,
        session.clone(),
    );
    drop(tx);
    let end = loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => {
                drain(&mut dispatch, runner, &mut inbound, cfg.drain_timeout()).await;
                break StreamEnd::Shutdown;
            }
            m = inbound.message() => m,
        };
        match msg {
            Ok(Some(proto::CoordinatorMessage { body: Some(body) })) => {
                dispatch.dispatch(body).await
            }
            Ok(Some(_)) => {}
            Ok(None) => break StreamEnd::Lost("coordinator closed the stream".into()),
            Err(status) => {
                break StreamEnd::Lost(format!("{}: {}", status.code(), status.message()));
            }
        }
    };
    session.cancel();
    dispatch.stop_all().await;
    let _ = heartbeat.await;
    let _ = forwarder.await;
    if matches!(end, StreamEnd::Shutdown) {
        // Close our half of the stream and wait for the coordinator to close
        // its half: it reads in order, so by then it has applied every result
        // sent before (a process exit could otherwise cut them off in flight).
        drop(dispatch);
        let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
        if closed.is_err() {
            tracing::warn!(timeout = ?CLOSE_TIMEOUT, "coordinator did not close the stream; exiting anyway");
        }
    }
    Ok(end)
}

/// How long a shutting-down agent waits for the coordinator to acknowledge
/// the end of its stream.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two attempts to reach a coordinator.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Graceful shutdown: stop polling, refuse new transfers, and keep the stream
/// open until running transfers finished and their results went out (or
/// `timeout` passed; unfinished transfers are then requeued by their lease).
async fn drain(
    dispatch: &mut Dispatch,
    runner: &Runner,
    inbound: &mut tonic::Streaming<proto::CoordinatorMessage>,
    timeout: Duration,
) {
    runner.drain();
    dispatch.stop_all().await;
    let busy = runner.running_tasks().len();
    if busy > 0 {
        tracing::info!(
            transfers = busy,
            ?timeout,
            "draining: finishing running transfers"
        );
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while !runner.is_settled() && tokio::time::Instant::now() < deadline {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(proto::CoordinatorMessage { body: Some(body) })) => dispatch.dispatch(body).await,
                Ok(Some(_)) => {}
                _ => return,
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    if !runner.is_settled() {
        tracing::warn!("drain timeout: leaving unfinished transfers to be requeued");
    }
}

async fn heartbeats(
    runner: Runner,
    tx: mpsc::Sender<proto::AgentMessage>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let hb = runner.heartbeat();
        if tx.send(message(Body::Heartbeat(hb))).await.is_err() {
            return;
        }
    }
}

/// Reads a server's host key for the coordinator (`ferryctl servers probe`,
/// `--trust-host-key`): the SFTP server may be reachable only from this site.
async fn probe_host_key(req: proto::HostKeyProbeRequest, out: mpsc::Sender<proto::AgentMessage>) {
    const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
    let port = u16::try_from(req.port).unwrap_or(0);
    let result = match crate::sftp::probe_host_key(&req.hostname, port, PROBE_TIMEOUT).await {
        Ok((fingerprint, key_algorithm)) => proto::HostKeyProbeResult {
            request_id: req.request_id,
            fingerprint,
            key_algorithm,
            error: String::new(),
        },
        Err(e) => proto::HostKeyProbeResult {
            request_id: req.request_id,
            error: e.to_string(),
            ..Default::default()
        },
    };
    let _ = out.send(message(Body::HostKeyProbeResult(result))).await;
}

/// What one stream asks of the agent: pollers by server id, and transfers
/// and post-actions handed to the [`Runner`].
struct Dispatch {
    out: mpsc::Sender<proto::AgentMessage>,
    trackers: Trackers,
    runner: Runner,
    poll: poller::PollSettings,
    cancel: CancellationToken,
    running: HashMap<i64, (proto::PollAssignment, CancellationToken, JoinHandle<()>)>,
    /// The coordinator drained this agent on this stream.
    drained: bool,
}

impl Dispatch {
    fn new(
        out: mpsc::Sender<proto::AgentMessage>,
        trackers: Trackers,
        runner: Runner,
        cfg: &AgentConfig,
        cancel: CancellationToken,
    ) -> Self {
        Dispatch {
            out,
            trackers,
            runner,
            poll: cfg.poll_settings(),
            cancel,
            running: HashMap::new(),
            drained: false,
        }
    }

    async fn dispatch(&mut self, body: CBody) {
        match body {
            CBody::PollAssignment(a) => {
                let Some(server) = &a.server else { return };
                if self.drained {
                    // Sent before the coordinator saw the drain; it revokes it.
                    tracing::info!(server = %server.name, "drained: poll assignment ignored");
                    return;
                }
                let id = server.server_id;
                if self.running.get(&id).is_some_and(|(cur, ..)| *cur == a) {
                    return;
                }
                self.stop(id).await;
                tracing::info!(server = %server.name, watches = a.watches.len(), "polling");
                let token = self.cancel.child_token();
                let task = tokio::spawn(poller::run(
                    a.clone(),
                    self.out.clone(),
                    self.runner.clone(),
                    self.trackers.clone(),
                    self.poll,
                    token.clone(),
                ));
                self.running.insert(id, (a, token, task));
                self.forget_unassigned_watches();
            }
            CBody::PollRevocation(r) => {
                tracing::info!(server = r.server_id, reason = %r.reason, "polling stopped");
                self.stop(r.server_id).await;
                self.forget_unassigned_watches();
            }
            CBody::TaskAssignment(task) => self.runner.start(task),
            CBody::TaskCancellation(c) => {
                tracing::info!(file = c.file_id, reason = %c.reason, "transfer cancelled");
                self.runner.cancel(c.file_id);
            }
            CBody::PostAction(req) => self.runner.post_action(req, self.trackers.clone()),
            CBody::ResultAck(ack) => self.runner.acknowledged(&ack),
            CBody::DiscoveryAck(ack) => self.runner.discovery_acknowledged(&ack),
            CBody::HostKeyProbe(req) => {
                tokio::spawn(probe_host_key(req, self.out.clone()));
            }
            CBody::Drain(d) if d.resume => {
                tracing::info!("drain lifted: taking work again");
                self.drained = false;
                self.runner.hold(false);
            }
            CBody::Drain(_) => {
                tracing::info!(
                    transfers = self.runner.running_tasks().len(),
                    "drained by the coordinator: polling stopped, finishing running transfers"
                );
                self.drained = true;
                self.runner.hold(true);
                self.stop_all().await;
                self.forget_unassigned_watches();
            }
            other => tracing::debug!(message = ?std::mem::discriminant(&other), "not handled yet"),
        }
    }

    fn forget_unassigned_watches(&self) {
        let live: Vec<i64> = self
            .running
            .values()
            .flat_map(|(a, ..)| a.watches.iter().map(|w| w.watch_id))
            .collect();
        self.trackers.retain(|id| live.contains(&id));
    }

    async fn stop(&mut self, server_id: i64) {
        if let Some((_, token, task)) = self.running.remove(&server_id) {
            token.cancel();
            let _ = task.await;
        }
    }

    async fn stop_all(&mut self) {
        let ids: Vec<i64> = self.running.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}
