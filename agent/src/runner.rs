//! Runs the transfers and post-actions the coordinator assigns (the
//! coordinator keeps within the agent's capacity), and keeps their results
//! until a stream delivers them.
//!
//! Results outlive streams: a transfer that finishes while the agent is
//! reconnecting is reported on the next stream (and the hello lists the
//! transfers still running, so their leases are kept).

use ferry_common::sync::lock;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_proto::{self as proto, agent_message::Body, task_result::Outcome};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::availability::Availability;
use crate::poller::{Trackers, message};
use crate::transfer::{self, PostActionOutcome, S3Target, SessionPool};

/// How often running transfers report progress (which renews their lease).
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// An unacknowledged task result is sent again after this long (well inside
/// a task lease, so it lands before the lease is reaped; a duplicate is
/// acknowledged and ignored).
const RESEND_UNACKED: Duration = Duration::from_secs(5);

struct Running {
    token: u64,
    bytes: Arc<AtomicU64>,
    cancel: CancellationToken,
}

/// What an acknowledgement names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Unacked {
    Result { file_id: i64, fencing_token: u64 },
    Discovery { batch_id: u64 },
}

#[derive(Default)]
struct Counters {
    files: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

struct Inner {
    pool: SessionPool,
    s3: S3Target,
    /// One permit per transfer that may run at once (the agent's capacity).
    /// The coordinator assigns ahead of free slots, so assigned transfers
    /// queue here and start the moment one finishes, without waiting for a
    /// round trip to the coordinator.
    slots: Arc<Semaphore>,
    /// Cancelled on shutdown: transfers still queued for a slot are handed
    /// back at once.
    shutting_down: CancellationToken,
    running: Mutex<HashMap<i64, Running>>,
    /// Results not yet handed to a stream.
    pending: Mutex<VecDeque<proto::AgentMessage>>,
    /// Task results and discovery batches handed to a stream and not yet
    /// acknowledged by a coordinator (`ResultAck`, `DiscoveryAck`), with when
    /// they were last sent: sent again on every new stream and after
    /// [`RESEND_UNACKED`].
    unacked: Mutex<HashMap<Unacked, (proto::AgentMessage, Instant)>>,
    /// Ids of discovery batches, for their acknowledgement.
    next_batch: AtomicU64,
    wake: Notify,
    counters: Counters,
    /// Set on shutdown: new assignments are refused.
    draining: AtomicBool,
    /// Set while the coordinator drains this agent (`Drain`): new
    /// assignments are refused until it resumes.
    held: AtomicBool,
    /// Rate window of the heartbeats: when the last one was taken and the
    /// bytes read by then.
    rate: Mutex<Option<RateSample>>,
    /// Paused after faults of the agent itself (see [`Availability`]).
    availability: Mutex<Availability>,
    /// Post-actions carried out lately, so a resent request reports done.
    post_actions_done: transfer::PostActionsDone,
}

#[derive(Debug, Clone, Copy)]
struct RateSample {
    at: Instant,
    bytes: u64,
}

/// Bytes per second between two samples (0 when the count went down: a
/// failed transfer's bytes are no longer counted).
fn bytes_per_sec(prev: Option<RateSample>, now: RateSample) -> u64 {
    let Some(prev) = prev else { return 0 };
    let secs = now.at.saturating_duration_since(prev.at).as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    (now.bytes.saturating_sub(prev.bytes) as f64 / secs) as u64
}

/// Cheap-to-clone handle on the agent's transfers.
#[derive(Clone)]
pub(crate) struct Runner(Arc<Inner>);

impl Runner {
    pub(crate) fn new(pool: SessionPool, s3: S3Target, capacity: u32) -> Runner {
        Runner(Arc::new(Inner {
            pool,
            s3,
            slots: Arc::new(Semaphore::new(capacity as usize)),
            shutting_down: CancellationToken::new(),
            running: Mutex::default(),
            pending: Mutex::default(),
            unacked: Mutex::default(),
            next_batch: AtomicU64::new(1),
            wake: Notify::new(),
            counters: Counters::default(),
            draining: AtomicBool::new(false),
            held: AtomicBool::new(false),
            rate: Mutex::new(None),
            availability: Mutex::default(),
            post_actions_done: transfer::PostActionsDone::default(),
        }))
    }

    /// The agent's SSH connections (polls use them too).
    pub(crate) fn pool(&self) -> &SessionPool {
        &self.0.pool
    }

    /// The coordinator drains (`true`) or resumes (`false`) this agent.
    pub(crate) fn hold(&self, held: bool) {
        self.0.held.store(held, Ordering::SeqCst);
    }

    /// Refuses new transfers from now on, and hands back the queued ones
    /// (shutdown).
    pub(crate) fn drain(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
        self.0.shutting_down.cancel();
    }

    /// Why this agent takes no transfer now, if it does not.
    fn refusal(&self) -> Option<String> {
        if self.0.draining.load(Ordering::SeqCst) {
            Some("agent is shutting down".to_owned())
        } else if self.0.held.load(Ordering::SeqCst) {
            Some("agent is drained".to_owned())
        } else {
            lock(&self.0.availability).unavailable(Instant::now())
        }
    }

    /// Hands a task back: the agent's state, not the file's, so no attempt
    /// is counted.
    fn refuse(&self, file_id: i64, fencing_token: u64, why: String) {
        crate::metrics::TRANSFERS.inc(&["refused"]);
        self.queue(message(Body::TaskResult(proto::TaskResult {
            file_id,
            fencing_token,
            outcome: Some(Outcome::Failure(proto::TaskFailure {
                kind: proto::FailureKind::Agent as i32,
                message: why,
            })),
        })));
    }

    /// No transfer running and every result acknowledged by a coordinator.
    /// Read in the order work moves (running -> pending -> unacknowledged),
    /// so an item moving along is never missed.
    pub(crate) fn is_settled(&self) -> bool {
        lock(&self.0.running).is_empty()
            && lock(&self.0.pending).is_empty()
            && lock(&self.0.unacked).is_empty()
    }

    /// A coordinator applied this result: forget it.
    pub(crate) fn acknowledged(&self, ack: &proto::ResultAck) {
        lock(&self.0.unacked).remove(&Unacked::Result {
            file_id: ack.file_id,
            fencing_token: ack.fencing_token,
        });
    }

    /// A coordinator recorded this discovery batch: forget it.
    pub(crate) fn discovery_acknowledged(&self, ack: &proto::DiscoveryAck) {
        lock(&self.0.unacked).remove(&Unacked::Discovery {
            batch_id: ack.batch_id,
        });
    }

    /// Gives `batch` its id and keeps it until a coordinator acknowledges it;
    /// returns the message to send.
    pub(crate) fn track_discovery(&self, mut batch: proto::DiscoveryBatch) -> proto::AgentMessage {
        batch.batch_id = self.0.next_batch.fetch_add(1, Ordering::Relaxed);
        let key = Unacked::Discovery {
            batch_id: batch.batch_id,
        };
        let msg = message(Body::Discovery(batch));
        lock(&self.0.unacked).insert(key, (msg.clone(), Instant::now()));
        msg
    }

    /// Queues again the unacknowledged results last sent at or before
    /// `older_than` (all of them on a new stream).
    fn resend_unacked(&self, older_than: Instant) {
        let again: Vec<proto::AgentMessage> = lock(&self.0.unacked)
            .values()
            .filter(|(_, sent)| *sent <= older_than)
            .map(|(msg, _)| msg.clone())
            .collect();
        if again.is_empty() {
            return;
        }
        tracing::info!(
            results = again.len(),
            "sending unacknowledged task results again"
        );
        let mut pending = lock(&self.0.pending);
        for msg in again {
            pending.push_front(msg);
        }
    }

    /// Transfers in progress, for the hello after a reconnect.
    pub(crate) fn running_tasks(&self) -> Vec<proto::RunningTask> {
        lock(&self.0.running)
            .iter()
            .map(|(id, r)| proto::RunningTask {
                file_id: *id,
                fencing_token: r.token,
            })
            .collect()
    }

    pub(crate) fn heartbeat(&self) -> proto::Heartbeat {
        let c = &self.0.counters;
        let (in_flight, running_bytes) = {
            let running = lock(&self.0.running);
            let bytes: u64 = running
                .values()
                .map(|r| r.bytes.load(Ordering::Relaxed))
                .sum();
            (running.len() as u32, bytes)
        };
        // Finished files' bytes plus what running transfers have read so far.
        let now = RateSample {
            at: Instant::now(),
            bytes: c
                .bytes
                .load(Ordering::Relaxed)
                .saturating_add(running_bytes),
        };
        let rate = bytes_per_sec(lock(&self.0.rate).replace(now), now);
        proto::Heartbeat {
            in_flight,
            bytes_per_sec: rate,
            files_transferred: c.files.load(Ordering::Relaxed),
            bytes_transferred: c.bytes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            unavailable: lock(&self.0.availability)
                .unavailable(Instant::now())
                .unwrap_or_default(),
        }
    }

    fn queue(&self, msg: proto::AgentMessage) {
        lock(&self.0.pending).push_back(msg);
        self.0.wake.notify_one();
    }

    /// Starts a transfer as soon as a slot is free (a repeated assignment of
    /// a running or queued file is ignored).
    pub(crate) fn start(&self, task: proto::TaskAssignment) {
        if let Some(why) = self.refusal() {
            self.refuse(task.file_id, task.fencing_token, why);
            return;
        }
        let bytes = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        {
            let mut running = lock(&self.0.running);
            if let Some(cur) = running.get(&task.file_id) {
                if cur.token == task.fencing_token {
                    return;
                }
                // Reassigned with a newer token: the old attempt is void.
                cur.cancel.cancel();
            }
            running.insert(
                task.file_id,
                Running {
                    token: task.fencing_token,
                    bytes: bytes.clone(),
                    cancel: cancel.clone(),
                },
            );
        }
        let runner = self.clone();
        tokio::spawn(async move {
            let file_id = task.file_id;
            let token = task.fencing_token;
            let queued = tokio::select! {
                permit = runner.0.slots.clone().acquire_owned() => permit.ok(),
                _ = runner.0.shutting_down.cancelled() => None,
                _ = cancel.cancelled() => return,
            };
            // Paused or shutting down while it waited: hand it back.
            let refused = match &queued {
                Some(_) => runner.refusal(),
                None => Some("agent is shutting down".to_owned()),
            };
            if let Some(why) = refused {
                runner.refuse(file_id, token, why);
                runner.forget_running(file_id, token);
                return;
            }
            let _slot = queued;
            let metered = crate::metrics::transfer();
            tracing::info!(file = file_id, path = %task.path, key = %task.key, "transfer started");
            let progress = {
                let bytes = bytes.clone();
                move |done: u64| bytes.store(done, Ordering::Relaxed)
            };
            let outcome = tokio::select! {
                o = transfer::transfer(&task, &runner.0.pool, &runner.0.s3, &progress) => o,
                _ = cancel.cancelled() => return,
            };
            metered.finished(&outcome);
            let c = &runner.0.counters;
            match &outcome {
                Outcome::Success(ok) => {
                    lock(&runner.0.availability).succeeded();
                    c.files.fetch_add(1, Ordering::Relaxed);
                    c.bytes.fetch_add(ok.size, Ordering::Relaxed);
                    tracing::info!(file = file_id, size = ok.size, sha256 = %ok.sha256, "transfer done");
                }
                Outcome::Failure(f) => {
                    if f.kind == proto::FailureKind::Agent as i32 {
                        lock(&runner.0.availability).agent_fault(&f.message, Instant::now());
                    }
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(file = file_id, kind = f.kind, error = %f.message, "transfer failed");
                }
            }
            // Queued before it leaves the running set, so the agent never
            // looks settled (nothing running, nothing to send) in between.
            runner.queue(message(Body::TaskResult(proto::TaskResult {
                file_id,
                fencing_token: token,
                outcome: Some(outcome),
            })));
            runner.forget_running(file_id, token);
        });
    }

    /// Drops `file_id` from the running set if it is still this attempt.
    fn forget_running(&self, file_id: i64, token: u64) {
        let mut running = lock(&self.0.running);
        if running.get(&file_id).is_some_and(|r| r.token == token) {
            running.remove(&file_id);
        }
    }

    pub(crate) fn cancel(&self, file_id: i64) {
        if let Some(r) = lock(&self.0.running).remove(&file_id) {
            r.cancel.cancel();
        }
    }

    /// Runs a post-action and queues its result. A path ferry deleted or
    /// moved is forgotten by the stability trackers, so a file put back
    /// there (even the same bytes and mtime) is a new version.
    pub(crate) fn post_action(&self, req: proto::PostActionRequest, trackers: Trackers) {
        let runner = self.clone();
        tokio::spawn(async move {
            let outcome =
                transfer::post_action(&req, &runner.0.pool, &runner.0.post_actions_done).await;
            let (ok, refused, text) = match outcome {
                PostActionOutcome::Done => {
                    trackers.forget_path(&req.path);
                    (true, false, String::new())
                }
                PostActionOutcome::Refused(why) => {
                    tracing::warn!(file = req.file_id, why = %why, "post-action refused");
                    (false, true, why)
                }
                PostActionOutcome::Failed(e) => {
                    tracing::warn!(file = req.file_id, error = %e, "post-action failed");
                    (false, false, e)
                }
            };
            runner.queue(message(Body::PostActionResult(proto::PostActionResult {
                file_id: req.file_id,
                ok,
                message: text,
                refused,
            })));
        });
    }

    /// Feeds results and progress into the current stream until `cancel`.
    /// A result leaves the queue only once the stream accepted it.
    pub(crate) async fn forward(
        &self,
        tx: mpsc::Sender<proto::AgentMessage>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        // A new stream: whatever the last one did not acknowledge goes again.
        self.resend_unacked(Instant::now());
        loop {
            loop {
                let msg = {
                    // Tracked as unacknowledged before it leaves `pending`
                    // (under its lock), so `is_settled` never sees it in
                    // neither.
                    let mut pending = lock(&self.0.pending);
                    let Some(msg) = pending.pop_front() else {
                        break;
                    };
                    let key = match &msg.body {
                        Some(Body::TaskResult(r)) => Some(Unacked::Result {
                            file_id: r.file_id,
                            fencing_token: r.fencing_token,
                        }),
                        Some(Body::Discovery(d)) => Some(Unacked::Discovery {
                            batch_id: d.batch_id,
                        }),
                        _ => None,
                    };
                    if let Some(key) = key {
                        lock(&self.0.unacked).insert(key, (msg.clone(), Instant::now()));
                    }
                    msg
                };
                if let Err(mpsc::error::SendError(msg)) = tx.send(msg).await {
                    lock(&self.0.pending).push_front(msg);
                    return;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.0.wake.notified() => {}
                _ = tick.tick() => {
                    if let Some(before) = Instant::now().checked_sub(RESEND_UNACKED) {
                        self.resend_unacked(before);
                    }
                    let progress: Vec<proto::TaskProgress> = lock(&self.0.running)
                        .iter()
                        .map(|(id, r)| proto::TaskProgress {
                            file_id: *id,
                            fencing_token: r.token,
                            bytes_done: r.bytes.load(Ordering::Relaxed),
                        })
                        .collect();
                    for p in progress {
                        if tx.send(message(Body::TaskProgress(p))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_bytes_over_the_heartbeat_interval() {
        let t0 = Instant::now();
        let first = RateSample {
            at: t0,
            bytes: 1000,
        };
        assert_eq!(bytes_per_sec(None, first), 0, "no interval yet");
        let later = RateSample {
            at: t0 + Duration::from_secs(2),
            bytes: 5000,
        };
        assert_eq!(bytes_per_sec(Some(first), later), 2000);
        let dropped = RateSample {
            at: t0 + Duration::from_secs(4),
            bytes: 10,
        };
        assert_eq!(bytes_per_sec(Some(later), dropped), 0);
        assert_eq!(bytes_per_sec(Some(first), first), 0, "no time passed");
    }
}
