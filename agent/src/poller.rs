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
//!
//! Discovery messages are bounded by count ([`BATCH`] entries) and by bytes
//! ([`BATCH_BYTES`] of encoded entries, see [`split_batches`]), so a tree of
//! long names never makes a message the coordinator refuses. Each watch is
//! listed on its own: a watch whose listing fails or goes past its bounds
//! (`sftp::ListingLimits`) fails the poll with an error naming it, and the
//! server's other watches are still listed.

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
use crate::sftp::{Auth, ListingLimits, RemoteFile, ServerEndpoint, SftpError, SftpSession};
use crate::transfer::Work;

/// Entries per discovery message.
pub(crate) const BATCH: usize = 1000;
/// Encoded entries per discovery message, in bytes: well under the
/// coordinator's decode limit (4 MiB), whatever the paths' lengths.
pub(crate) const BATCH_BYTES: usize = 1024 * 1024;

/// How a poller works, from the agent's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PollSettings {
    /// Resend the full stable set this often.
    pub resync: Duration,
    /// Bounds of every listing.
    pub listing: ListingLimits,
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
                r = poll_due(&runner, &conn, &mut watches, &trackers, &reporter, settings.listing) => r,
            };
            let outcome = match outcome {
                Ok(polled) if polled.errors.is_empty() => Ok(polled.seen),
                Ok(polled) => Err((polled.seen, polled.errors.join("; "))),
                Err(e) => Err((0, e.to_string())),
            };
            let report = match &outcome {
                Ok(seen) => proto::PollReport {
                    server_id,
                    ok: true,
                    files_seen: *seen,
                    ..Default::default()
                },
                Err((seen, error)) => proto::PollReport {
                    server_id,
                    ok: false,
                    files_seen: *seen,
                    error: error.clone(),
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
                Err((_, e)) => {
                    tracing::warn!(server = %conn.name, error = %e.escape_debug(), "poll failed");
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

/// What one poll of a server's due watches found.
#[derive(Debug, Default)]
struct Polled {
    /// Files listed.
    seen: u64,
    /// Per watch that failed or skipped entries, why (the poll then counts
    /// as failed, but the other watches' files were reported).
    errors: Vec<String>,
}

/// Polls every due watch on one pooled SSH connection (an error that breaks
/// it keeps it out of the pool, and ends the poll).
async fn poll_due(
    runner: &Runner,
    conn: &proto::ServerConnection,
    watches: &mut [WatchState],
    trackers: &Trackers,
    reporter: &Reporter<'_>,
    limits: ListingLimits,
) -> Result<Polled, SftpError> {
    let mut session = runner.pool().checkout(conn, Work::Light).await?;
    let mut polled = Polled::default();
    for w in watches.iter_mut().filter(|w| w.next_due <= Instant::now()) {
        w.next_due =
            Instant::now() + Duration::from_secs(u64::from(w.spec.poll_interval_secs.max(1)));
        let watch = w.spec.watch_id;
        match list_watch(&session, conn.server_id, w, trackers, reporter, limits).await {
            Ok(Listed::Done { seen, problems }) => {
                polled.seen += seen;
                if let Some(problems) = problems {
                    polled.errors.push(format!("watch {watch}: {problems}"));
                }
            }
            Ok(Listed::StreamGone { seen }) => {
                polled.seen += seen;
                break;
            }
            Err(e) => {
                trackers.with(&w.spec, StabilityTracker::abandon_poll);
                session.note(&e);
                if e.breaks_session() {
                    return Err(e);
                }
                polled.errors.push(format!("watch {watch}: {e}"));
            }
        }
    }
    Ok(polled)
}

/// How listing one watch ended.
enum Listed {
    /// The listing is complete; `problems` says what it skipped.
    Done { seen: u64, problems: Option<String> },
    /// The control stream is gone: stop polling.
    StreamGone { seen: u64 },
}

async fn list_watch(
    s: &SftpSession,
    server_id: i64,
    w: &mut WatchState,
    trackers: &Trackers,
    reporter: &Reporter<'_>,
    limits: ListingLimits,
) -> Result<Listed, SftpError> {
    let mut seen = 0u64;
    let mut listing = s.listing(&w.spec.directory, &w.matcher, w.spec.recursive, limits);
    if w.baseline_due {
        // The coordinator records the stable files of this watch only
        // after the baseline, so it goes first, whole.
        let mut files: Vec<(String, Observation)> = Vec::new();
        while let Some(batch) = listing.next_batch().await? {
            files.extend(observations(batch));
        }
        let problems = listing.problems();
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
            return Ok(Listed::StreamGone { seen });
        }
        w.baseline_due = false;
        let newly = trackers.with(&w.spec, |t| {
            t.observe(files, chrono::Utc::now().timestamp(), w.spec.min_age_secs)
                .newly_stable
        });
        if !send_batches(reporter, server_id, w.spec.watch_id, &newly, Report::Stable).await {
            return Ok(Listed::StreamGone { seen });
        }
        return Ok(Listed::Done { seen, problems });
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
        let full = full_batches(&newly);
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
                return Ok(Listed::StreamGone { seen });
            }
            newly.drain(..full);
        }
    }
    let problems = listing.problems();
    trackers.with(&w.spec, StabilityTracker::finish_poll);
    if !send_batches(reporter, server_id, w.spec.watch_id, &newly, Report::Stable).await {
        return Ok(Listed::StreamGone { seen });
    }
    Ok(Listed::Done { seen, problems })
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

/// Upper bound of the bytes one entry of `path` adds to an encoded
/// `DiscoveryBatch`: the path and its length prefix, two varints of at most
/// 10 bytes, three field tags, and the entry's own tag and length prefix.
fn entry_bytes(path: &str) -> usize {
    path.len() + 32
}

/// Splits `files` into consecutive batches of at most [`BATCH`] entries and
/// [`BATCH_BYTES`] encoded bytes (an entry larger than that alone goes in
/// a batch of its own). Pure.
fn split_batches(files: &[(String, Observation)]) -> Vec<std::ops::Range<usize>> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (path, _)) in files.iter().enumerate() {
        let len = entry_bytes(path);
        if i > start && (i - start == BATCH || bytes + len > BATCH_BYTES) {
            batches.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < files.len() {
        batches.push(start..files.len());
    }
    batches
}

/// How many of `files` (a prefix) fill whole batches, to be sent while a
/// listing goes on; the rest waits for more entries. Pure.
fn full_batches(files: &[(String, Observation)]) -> usize {
    let batches = split_batches(files);
    match batches.last() {
        Some(last) if last.len() == BATCH => files.len(),
        Some(last) => last.start,
        None => 0,
    }
}

/// Sends `files` in batches bounded by count and bytes ([`split_batches`]);
/// a baseline is sent even when empty, and its last batch says it is
/// complete. False when the stream is gone.
async fn send_batches(
    reporter: &Reporter<'_>,
    server_id: i64,
    watch_id: i64,
    files: &[(String, Observation)],
    report: Report,
) -> bool {
    let baseline = report == Report::Baseline;
    let mut batches = split_batches(files);
    if batches.is_empty() && baseline {
        batches.push(0..0);
    }
    let parts = batches.len();
    for (part, range) in batches.into_iter().enumerate() {
        let chunk = &files[range];
        let batch = proto::DiscoveryBatch {
            server_id,
            watch_id,
            // Set by `track_discovery`.
            batch_id: 0,
            entries: remote_entries(chunk),
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

/// Stable files as the entries of a discovery batch.
fn remote_entries(files: &[(String, Observation)]) -> Vec<proto::RemoteEntry> {
    files
        .iter()
        .map(|(path, o)| proto::RemoteEntry {
            path: path.clone(),
            size: o.size,
            mtime_unix: o.mtime_unix,
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn files(n: usize, path_len: usize) -> Vec<(String, Observation)> {
        (0..n)
            .map(|i| {
                let name = format!("/{i:08}");
                let path = format!("{name}{}", "x".repeat(path_len.saturating_sub(name.len())));
                let o = Observation {
                    size: u64::MAX,
                    mtime_unix: i64::MIN,
                };
                (path, o)
            })
            .collect()
    }

    fn encoded(files: &[(String, Observation)]) -> usize {
        use prost::Message;
        proto::DiscoveryBatch {
            server_id: i64::MAX,
            watch_id: i64::MAX,
            batch_id: u64::MAX,
            entries: remote_entries(files),
            baseline: true,
            baseline_complete: true,
        }
        .encoded_len()
    }

    #[test]
    fn short_paths_split_by_count() {
        let f = files(2500, 40);
        assert_eq!(split_batches(&f), vec![0..1000, 1000..2000, 2000..2500]);
        assert_eq!(full_batches(&f), 2000);
        assert_eq!(full_batches(&f[..1000]), 1000);
        assert_eq!(full_batches(&f[..999]), 0);
        assert!(split_batches(&[]).is_empty());
    }

    #[test]
    fn long_paths_split_by_bytes_and_stay_under_the_bound() {
        // 4 KiB paths: 1,000 of them would be a 4 MiB message.
        let f = files(1000, 4096);
        let batches = split_batches(&f);
        assert!(batches.len() >= 4, "{batches:?}");
        let mut next = 0;
        for b in &batches {
            assert_eq!(b.start, next, "consecutive, nothing lost");
            next = b.end;
            let bytes = encoded(&f[b.clone()]);
            assert!(bytes <= BATCH_BYTES, "{b:?}: {bytes} bytes");
        }
        assert_eq!(next, f.len());
        // While listing, only whole batches go out.
        let full = full_batches(&f);
        assert_eq!(full, batches.last().unwrap().start);
    }

    #[test]
    fn an_entry_larger_than_the_bound_goes_alone() {
        let mut f = files(3, 10);
        f.insert(1, files(1, BATCH_BYTES + 1).remove(0));
        assert_eq!(split_batches(&f), vec![0..1, 1..2, 2..4]);
    }

    #[test]
    fn entry_bytes_bound_the_encoding() {
        for len in [1, 127, 128, 16_383, 16_384, 70_000] {
            let f = files(1, len);
            let one = encoded(&f) - encoded(&[]);
            assert!(one <= entry_bytes(&f[0].0), "{len}: {one}");
        }
    }
}
