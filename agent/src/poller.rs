//! Polling one assigned server: lists each watch on its interval, feeds the
//! stable-file rule, and reports newly stable files in batches. A watch
//! whose assignment asks for a baseline first gets its whole first listing
//! sent as baseline parts (recorded `skipped` by the coordinator).
//!
//! The stability trackers outlive the poller (they are kept per watch in
//! [`Trackers`]), so after a reconnect or reassignment the agent resends its
//! full stable set and the coordinator deduplicates. It also resends it every
//! [`PollSettings::resync`]: a backstop for a discovery that was acknowledged
//! but did not end up in a row (the coordinator inserts idempotently, so a
//! resync of known files writes nothing).

use ferry_common::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_common::backoff::Backoff;
use ferry_common::stability::{Observation, StabilityTracker};
use ferry_proto::{self as proto, agent_message::Body};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::runner::Runner;
use crate::sftp::{Auth, RemoteFile, ServerEndpoint, SftpError, SftpSession};
use crate::transfer::Work;

/// Entries per discovery message.
pub(crate) const BATCH: usize = 1000;

/// How a poller works, from the agent's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PollSettings {
    /// Resend the full stable set this often.
    pub resync: Duration,
}

/// What identifies a watch's listing: a change resets its tracker.
type WatchKey = (String, String, bool);

/// Stability state per watch id, shared across pollers and reconnects.
#[derive(Clone, Default)]
pub(crate) struct Trackers(Arc<Mutex<HashMap<i64, (WatchKey, StabilityTracker)>>>);

impl Trackers {
    fn with<R>(&self, spec: &proto::WatchSpec, f: impl FnOnce(&mut StabilityTracker) -> R) -> R {
        let key = (spec.directory.clone(), spec.glob.clone(), spec.recursive);
        let mut map = lock(&self.0);
        let entry = map
            .entry(spec.watch_id)
            .or_insert_with(|| (key.clone(), StabilityTracker::default()));
        if entry.0 != key {
            *entry = (key, StabilityTracker::default());
        }
        f(&mut entry.1)
    }

    /// Forgets `path` in every watch (ferry deleted or moved it; watches of a
    /// server never overlap, so at most one has it).
    pub(crate) fn forget_path(&self, path: &str) {
        for (_, tracker) in lock(&self.0).values_mut() {
            tracker.forget(path);
        }
    }

    /// Forgets watches that are no longer assigned anywhere on this agent.
    pub(crate) fn retain(&self, live: impl Fn(i64) -> bool) {
        lock(&self.0).retain(|id, _| live(*id));
    }
}

/// Builds the SFTP endpoint of an assignment.
pub(crate) fn endpoint(conn: &proto::ServerConnection) -> Result<ServerEndpoint, SftpError> {
    use proto::server_connection::Auth as WireAuth;
    let auth = match &conn.auth {
        Some(WireAuth::Password(p)) => Auth::Password(p.password.clone()),
        Some(WireAuth::PrivateKey(k)) => Auth::PrivateKey {
            pem: k.pem.clone(),
            passphrase: (!k.passphrase.is_empty()).then(|| k.passphrase.clone()),
        },
        None => return Err(SftpError::NoCredential),
    };
    Ok(ServerEndpoint {
        hostname: conn.hostname.clone(),
        port: u16::try_from(conn.port).unwrap_or(22),
        username: conn.username.clone(),
        auth,
        host_key_fingerprint: conn.host_key_fingerprint.clone(),
    })
}

struct WatchState {
    spec: proto::WatchSpec,
    matcher: globset::GlobMatcher,
    next_due: Instant,
    /// The next listing is sent whole as the watch's baseline
    /// ([`proto::WatchSpec::baseline`]); cleared once it is.
    baseline_due: bool,
}

/// What a discovery batch carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    /// Newly stable files, or the stable set again.
    Stable,
    /// A whole listing, the watch's baseline.
    Baseline,
}

/// Polls one server until cancelled.
pub(crate) async fn run(
    assignment: proto::PollAssignment,
    out: mpsc::Sender<proto::AgentMessage>,
    runner: Runner,
    trackers: Trackers,
    settings: PollSettings,
    cancel: CancellationToken,
) {
    let Some(conn) = assignment.server else {
        return;
    };
    let server_id = conn.server_id;
    // The credentials are checked once here; connections come from the
    // agent's session pool (the server's one connection budget).
    match endpoint(&conn) {
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(server = %conn.name, error = %e, "cannot poll");
            let report = proto::PollReport {
                server_id,
                ok: false,
                error: e.to_string(),
                at: Some(now_timestamp()),
                ..Default::default()
            };
            if out.send(message(Body::PollReport(report))).await.is_ok() {
                cancel.cancelled().await;
            }
            return;
        }
    }
    let mut watches: Vec<WatchState> = Vec::new();
    for spec in assignment.watches {
        match globset::GlobBuilder::new(&spec.glob)
            .literal_separator(true)
            .build()
        {
            Ok(g) => watches.push(WatchState {
                matcher: g.compile_matcher(),
                baseline_due: spec.baseline,
                spec,
                next_due: Instant::now(),
            }),
            Err(e) => tracing::warn!(watch = spec.watch_id, error = %e, "bad glob; watch skipped"),
        }
    }
    if watches.is_empty() {
        cancel.cancelled().await;
        return;
    }
    let reporter = Reporter {
        out: &out,
        runner: &runner,
    };
    let retry = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut failures = 0u32;
    // Full resend of what is already known stable: now (after a reconnect
    // or reassignment), then every `resync`.
    let mut next_resync = Instant::now();
    loop {
        let now = Instant::now();
        if next_resync <= now {
            for w in &watches {
                let stable = trackers.with(&w.spec, |t| t.stable_set());
                if !send_batches(
                    &reporter,
                    server_id,
                    w.spec.watch_id,
                    &stable,
                    Report::Stable,
                )
                .await
                {
                    return;
                }
            }
            next_resync = now + settings.resync.max(Duration::from_secs(1));
        }
        if watches.iter().any(|w| w.next_due <= now) {
            let started = Instant::now();
            let outcome = tokio::select! {
                _ = cancel.cancelled() => break,
                r = poll_due(&runner, &conn, &mut watches, &trackers, &reporter) => r,
            };
            let report = match &outcome {
                Ok(seen) => proto::PollReport {
                    server_id,
                    ok: true,
                    files_seen: *seen,
                    ..Default::default()
                },
                Err(e) => proto::PollReport {
                    server_id,
                    ok: false,
                    error: e.to_string(),
                    ..Default::default()
                },
            };
            let report = proto::PollReport {
                at: Some(now_timestamp()),
                duration_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
                ..report
            };
            crate::metrics::polled(&conn.name, &report);
            if out.send(message(Body::PollReport(report))).await.is_err() {
                break;
            }
            match outcome {
                Ok(_) => failures = 0,
                Err(e) => {
                    tracing::warn!(server = %conn.name, error = %e, "poll failed");
                    // Retry sooner than the interval would, but back off.
                    let delay = retry.delay(failures);
                    failures = failures.saturating_add(1);
                    for w in &mut watches {
                        let interval =
                            Duration::from_secs(u64::from(w.spec.poll_interval_secs.max(1)));
                        w.next_due = Instant::now() + delay.min(interval);
                    }
                }
            }
        }
        let next = watches
            .iter()
            .map(|w| w.next_due)
            .min()
            .unwrap_or_else(Instant::now)
            .min(next_resync);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
    }
}

/// Polls every due watch on one pooled SSH connection (an error that breaks
/// it keeps it out of the pool). Returns the files seen.
async fn poll_due(
    runner: &Runner,
    conn: &proto::ServerConnection,
    watches: &mut [WatchState],
    trackers: &Trackers,
    reporter: &Reporter<'_>,
) -> Result<u64, SftpError> {
    let mut session = runner.pool().checkout(conn, Work::Light).await?;
    let outcome = list_due(&session, conn.server_id, watches, trackers, reporter).await;
    if let Err(e) = &outcome {
        session.note(e);
    }
    outcome
}

async fn list_due(
    s: &SftpSession,
    server_id: i64,
    watches: &mut [WatchState],
    trackers: &Trackers,
    reporter: &Reporter<'_>,
) -> Result<u64, SftpError> {
    let mut seen = 0u64;
    for w in watches.iter_mut().filter(|w| w.next_due <= Instant::now()) {
        w.next_due =
            Instant::now() + Duration::from_secs(u64::from(w.spec.poll_interval_secs.max(1)));
        let mut listing = s.listing(&w.spec.directory, &w.matcher, w.spec.recursive);
        if w.baseline_due {
            // The coordinator records the stable files of this watch only
            // after the baseline, so it goes first, whole.
            let mut files: Vec<(String, Observation)> = Vec::new();
            while let Some(batch) = listing.next_batch().await? {
                files.extend(observations(batch));
            }
            seen += files.len() as u64;
            if !send_batches(
                reporter,
                server_id,
                w.spec.watch_id,
                &files,
                Report::Baseline,
            )
            .await
            {
                return Ok(seen);
            }
            w.baseline_due = false;
            let newly = trackers.with(&w.spec, |t| {
                t.observe(files, chrono::Utc::now().timestamp(), w.spec.min_age_secs)
                    .newly_stable
            });
            if !send_batches(reporter, server_id, w.spec.watch_id, &newly, Report::Stable).await {
                return Ok(seen);
            }
            continue;
        }
        // Stable files are reported while the listing goes on, in full
        // batches; the poll counts (forgets what it did not list) only once
        // the listing is complete.
        trackers.with(&w.spec, StabilityTracker::begin_poll);
        let mut newly: Vec<(String, Observation)> = Vec::new();
        while let Some(batch) = listing.next_batch().await? {
            seen += batch.len() as u64;
            let now_unix = chrono::Utc::now().timestamp();
            newly.extend(trackers.with(&w.spec, |t| {
                t.observe_part(observations(batch), now_unix, w.spec.min_age_secs)
            }));
            let full = newly.len() - newly.len() % BATCH;
            if full > 0 {
                if !send_batches(
                    reporter,
                    server_id,
                    w.spec.watch_id,
                    &newly[..full],
                    Report::Stable,
                )
                .await
                {
                    return Ok(seen);
                }
                newly.drain(..full);
            }
        }
        trackers.with(&w.spec, StabilityTracker::finish_poll);
        if !send_batches(reporter, server_id, w.spec.watch_id, &newly, Report::Stable).await {
            return Ok(seen);
        }
    }
    Ok(seen)
}

fn observations(batch: Vec<RemoteFile>) -> impl Iterator<Item = (String, Observation)> {
    batch.into_iter().map(|f| {
        let o = f.observation();
        (f.path, o)
    })
}

/// Where discoveries go: the stream, through the runner's acknowledgement
/// tracking.
struct Reporter<'a> {
    out: &'a mpsc::Sender<proto::AgentMessage>,
    runner: &'a Runner,
}

/// Sends `files` in batches of [`BATCH`]; a baseline is sent even when
/// empty, and its last batch says it is complete. False when the stream is
/// gone.
async fn send_batches(
    reporter: &Reporter<'_>,
    server_id: i64,
    watch_id: i64,
    files: &[(String, Observation)],
    report: Report,
) -> bool {
    let baseline = report == Report::Baseline;
    let parts = files.len().div_ceil(BATCH).max(usize::from(baseline));
    for part in 0..parts {
        let chunk = &files[part * BATCH..((part + 1) * BATCH).min(files.len())];
        let batch = proto::DiscoveryBatch {
            server_id,
            watch_id,
            // Set by `track_discovery`.
            batch_id: 0,
            entries: chunk
                .iter()
                .map(|(path, o)| proto::RemoteEntry {
                    path: path.clone(),
                    size: o.size,
                    mtime_unix: o.mtime_unix,
                })
                .collect(),
            baseline,
            baseline_complete: baseline && part + 1 == parts,
        };
        if reporter
            .out
            .send(reporter.runner.track_discovery(batch))
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}

pub(crate) fn message(body: Body) -> proto::AgentMessage {
    proto::AgentMessage { body: Some(body) }
}

fn now_timestamp() -> prost_types::Timestamp {
    let now = chrono::Utc::now();
    prost_types::Timestamp {
        seconds: now.timestamp(),
        nanos: now.timestamp_subsec_nanos() as i32,
    }
}
