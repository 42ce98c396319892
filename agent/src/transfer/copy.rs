//! One transfer: check the remote file is still the version the task names,
//! read it with pipelined SFTP requests while hashing it, upload it as one
//! `PutObject` (up to one part size) or as a multipart upload with a few
//! parts in flight, check the file did not change meanwhile, and complete.
//! Writes are create-only: an object already at the task's key is used only
//! if it holds exactly these bytes, else the version goes to its key of its
//! own (`TaskAssignment.own_key`); nothing is ever written over.
//!
//! Memory per transfer is bounded by the read window (about 4 MiB of
//! requests in flight) plus `PARTS_IN_FLIGHT + 1` part buffers. No buffer is
//! sized by the size the server claims: a file over the object store's
//! limit fails before it is opened, and buffers are reserved only up to
//! `sizing::MAX_PREALLOCATION`, growing with the bytes that arrive.

use ferry_common::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_s3::types::CompletedPart;
use ferry_proto as proto;
use futures::StreamExt;
use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpLibError;
use russh_sftp::protocol::StatusCode;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use super::failure::{TransferError, classify};
use super::object::{self, AlreadyThere, Source, check_destination};
use super::pool::{PooledSession, SessionPool, Work};
use super::s3::{ExistingObject, ObjectRef, S3Target, Written};
use super::sizing::{buffer_reservation, check_object_size, part_size, read_window};
use crate::sftp::{FileKind, FileStat, SftpError, SftpSession};

/// Part uploads running at once; one more part fills meanwhile.
pub(crate) const PARTS_IN_FLIGHT: usize = 2;
/// Least time between two progress reports.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Copies the file a task names from its SFTP server to S3 and says how it
/// went. `progress` is called with the bytes read so far, at most about
/// once a second.
pub(crate) async fn transfer(
    task: &proto::TaskAssignment,
    pool: &SessionPool,
    s3: &S3Target,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> proto::task_result::Outcome {
    use proto::task_result::Outcome;
    let started = Instant::now();
    let mut phases = Phases::new();
    match run(task, pool, s3, progress, &mut phases).await {
        Ok(success) => {
            tracing::debug!(
                file_id = task.file_id,
                path = %task.path,
                bytes = success.size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                phases = %phases,
                "transfer done"
            );
            Outcome::Success(success)
        }
        Err(err) => Outcome::Failure(classify(&err)),
    }
}

async fn run(
    task: &proto::TaskAssignment,
    pool: &SessionPool,
    s3: &S3Target,
    progress: &(dyn Fn(u64) + Send + Sync),
    phases: &mut Phases,
) -> Result<proto::TaskSuccess, TransferError> {
    check_destination(&task.bucket, &task.key).map_err(TransferError::Permanent)?;
    if !task.own_key.is_empty() {
        check_destination(&task.bucket, &task.own_key).map_err(TransferError::Permanent)?;
    }
    check_object_size(task.size)
        .map_err(|why| TransferError::Permanent(format!("{}: {why}", task.path)))?;
    let conn = task
        .source
        .as_ref()
        .ok_or_else(|| TransferError::Permanent("task names no source server".to_owned()))?;
    s3.check_bucket(&task.bucket).await?;
    phases.lap("bucket");
    let work = Work::transfer(task.size);
    let (mut session, handle) = checkout_and_open(pool, conn, work, &task.path, phases).await?;
    let result = copy(task, &conn.name, &session, handle, s3, progress, phases).await;
    if let Err(TransferError::Sftp { err, .. }) = &result {
        session.note(err);
    }
    result
}

/// A session and the file opened on it. A pooled session may have died
/// since its last use: if the open fails in a way that breaks the session,
/// the session is discarded and the next one (eventually a new connection)
/// tried.
async fn checkout_and_open(
    pool: &SessionPool,
    conn: &proto::ServerConnection,
    work: Work,
    path: &str,
    phases: &mut Phases,
) -> Result<(PooledSession, OpenHandle), TransferError> {
    loop {
        let mut session = pool
            .checkout(conn, work)
            .await
            .map_err(|e| TransferError::sftp(format!("connect to server {}", conn.name), e))?;
        phases.lap("checkout");
        let opened = session.open_read(path).await;
        phases.lap("open");
        match opened {
            Ok(handle) => {
                let handle = OpenHandle {
                    raw: session.raw().clone(),
                    handle: Some(handle),
                };
                return Ok((session, handle));
            }
            Err(e) if e.breaks_session() && session.reused() => {
                tracing::debug!(target = session.target(), error = %e, "pooled SFTP session is dead; retrying");
                session.discard();
            }
            Err(SftpError::NotFound(_)) => {
                return Err(TransferError::Lost(format!(
                    "file vanished before transfer: {path}"
                )));
            }
            Err(e) => {
                session.note(&e);
                return Err(TransferError::sftp(format!("open {path}"), e));
            }
        }
    }
}

/// How `stat` differs from the version the task names, or `None`. Fields
/// the server did not send are not compared.
pub(crate) fn describe_change(size: u64, mtime_unix: i64, stat: &FileStat) -> Option<String> {
    if !matches!(stat.kind, FileKind::File | FileKind::Unknown) {
        return Some(format!("now a {:?}, not a regular file", stat.kind).to_lowercase());
    }
    let mut changes = Vec::new();
    if let Some(now) = stat.size.filter(|s| *s != size) {
        changes.push(format!("size {size} -> {now}"));
    }
    if let Some(now) = stat.mtime_unix.filter(|m| *m != mtime_unix) {
        changes.push(format!("mtime {mtime_unix} -> {now}"));
    }
    (!changes.is_empty()).then(|| changes.join(", "))
}

/// Copies the open file. A small file is read whole and then stored with
/// one `PutObject`; its version is checked once, after the read (below). A
/// large one is checked before the read too, so that a changed file is not
/// read for nothing. **Invariant:** the bytes stored are those of the
/// version the task names: the open handle's attributes after the last
/// read match its size and mtime, and all of its bytes were read.
async fn copy(
    task: &proto::TaskAssignment,
    server: &str,
    session: &SftpSession,
    handle: OpenHandle,
    s3: &S3Target,
    progress: &(dyn Fn(u64) + Send + Sync),
    phases: &mut Phases,
) -> Result<proto::TaskSuccess, TransferError> {
    let obj = ObjectRef {
        bucket: &task.bucket,
        key: &task.key,
        content_type: object::content_type(&task.path),
    };
    let part_len = part_size(task.size);
    let result = if task.size <= part_len {
        copy_single(task, server, session, handle, obj, s3, progress, phases).await
    } else {
        copy_multipart(
            task, server, session, handle, obj, s3, part_len, progress, phases,
        )
        .await
    };
    match result {
        Err(failure @ TransferError::Sftp { .. }) => {
            Err(changed_instead(task, session, failure).await)
        }
        other => other,
    }
}

/// After an SFTP failure: `Lost` if the file is no longer the version the
/// task names (it changed, vanished or is no longer a regular file), which
/// explains the failure better; else the failure itself.
async fn changed_instead(
    task: &proto::TaskAssignment,
    session: &SftpSession,
    failure: TransferError,
) -> TransferError {
    match session.stat(&task.path).await {
        Err(SftpError::NotFound(_)) => TransferError::Lost(format!(
            "file vanished during transfer: {} ({failure})",
            task.path
        )),
        Ok(stat) => match describe_change(task.size, task.mtime_unix, &stat) {
            Some(change) => TransferError::Lost(format!(
                "file changed during transfer: {}: {change} ({failure})",
                task.path
            )),
            None => failure,
        },
        Err(_) => failure,
    }
}

/// Small file: read it whole, then one `PutObject` with all metadata.
#[expect(
    clippy::too_many_arguments,
    reason = "the open source handle, target, progress and timing of one copy"
)]
async fn copy_single(
    task: &proto::TaskAssignment,
    server: &str,
    session: &SftpSession,
    handle: OpenHandle,
    obj: ObjectRef<'_>,
    s3: &S3Target,
    progress: &(dyn Fn(u64) + Send + Sync),
    phases: &mut Phases,
) -> Result<proto::TaskSuccess, TransferError> {
    let buffer_len = usize::try_from(task.size).unwrap_or(usize::MAX);
    let read = read_file(task, session, &handle, buffer_len, None, progress).await?;
    phases.lap("read");
    verify(task, session, &handle, &read).await?;
    phases.lap("verify");
    let metadata = object::metadata(
        &Source {
            server,
            path: &task.path,
            mtime_unix: task.mtime_unix,
            sha256: Some(&read.sha256),
        },
        &task.metadata,
    );
    // The handle is done with: closing it need not hold up the upload.
    let body = bytes::Bytes::from(read.tail);
    let (put, ()) = tokio::join!(
        store_small(task, s3, obj, body, &metadata, &read.sha256),
        handle.close()
    );
    let placed = put?;
    phases.lap("put+close");
    Ok(success(task, read.bytes, read.sha256, placed))
}

/// Where a transfer's bytes are: the key (the task's key or its key of its
/// own), the object's ETag, and the announcement id it carries when ferry
/// had stored these bytes there before (nothing was written then).
struct Placed {
    key: String,
    etag: String,
    earlier: Option<String>,
}

/// The keys a version may be written to, in order: its key, then its key of
/// its own (if the coordinator named one).
fn keys_of(task: &proto::TaskAssignment) -> impl Iterator<Item = &str> {
    std::iter::once(task.key.as_str())
        .chain((!task.own_key.is_empty()).then_some(task.own_key.as_str()))
}

/// Writes a small object create-only: at the task's key, or, when that holds
/// other bytes, at its key of its own. A key already holding exactly these
/// bytes of this version, stored by ferry, is used as it is. **Invariant:**
/// no object is written over; with both keys holding other bytes the
/// transfer fails permanently (visibly, and no post-action runs).
async fn store_small(
    task: &proto::TaskAssignment,
    s3: &S3Target,
    obj: ObjectRef<'_>,
    body: bytes::Bytes,
    metadata: &HashMap<String, String>,
    sha256: &str,
) -> Result<Placed, TransferError> {
    for key in keys_of(task) {
        let at = ObjectRef { key, ..obj };
        if let Written::Created(etag) = s3.put_object(at, body.clone(), metadata, true).await? {
            return Ok(Placed {
                key: key.to_owned(),
                etag,
                earlier: None,
            });
        }
        if let Some((etag, id)) = holds_these_bytes(s3, at, metadata, task.size, sha256).await? {
            return Ok(Placed {
                key: key.to_owned(),
                etag,
                earlier: Some(id),
            });
        }
    }
    Err(occupied(task, Some(sha256)))
}

/// After a create-only write found an object at `obj`: its ETag and
/// announcement id if ferry stored exactly these bytes (`sha256`) of this
/// version there, else `None` (it stays as it is).
async fn holds_these_bytes(
    s3: &S3Target,
    obj: ObjectRef<'_>,
    ours: &HashMap<String, String>,
    size: u64,
    sha256: &str,
) -> Result<Option<(String, String)>, TransferError> {
    match s3.head_object(obj).await? {
        Some(existing) => same_bytes(s3, obj, &existing, ours, size, sha256).await,
        None => Ok(None),
    }
}

/// Whether `existing` (the object at `obj`) holds exactly these bytes of
/// this version, stored by ferry: its ETag and announcement id if so. An
/// object of this version without a sha256 (multipart) is read back and
/// hashed (the rare path: only when a version's key is already taken).
async fn same_bytes(
    s3: &S3Target,
    obj: ObjectRef<'_>,
    existing: &ExistingObject,
    ours: &HashMap<String, String>,
    size: u64,
    sha256: &str,
) -> Result<Option<(String, String)>, TransferError> {
    let same = match object::judge_existing(
        &existing.metadata,
        existing.size,
        ours,
        size,
        Some(sha256),
    ) {
        AlreadyThere::SameBytes { announcement_id } => Some(announcement_id),
        AlreadyThere::SameVersion {
            announcement_id,
            sha256: Some(theirs),
        } => (theirs == sha256).then_some(announcement_id),
        AlreadyThere::SameVersion {
            announcement_id,
            sha256: None,
        } => {
            let read_back = s3.hash_object(obj, &existing.etag).await?;
            tracing::debug!(object = %obj, same = ?read_back.as_ref().map(|(h, n)| h == sha256 && *n == size), "read back an object without sha256 to judge it");
            read_back
                .is_some_and(|(theirs, len)| theirs == sha256 && len == size)
                .then_some(announcement_id)
        }
        AlreadyThere::Other => None,
    };
    Ok(same.map(|id| (existing.etag.clone(), id)))
}

/// The permanent failure of a version whose keys all hold other bytes
/// (`sha256` of this version's bytes, if read yet).
fn occupied(task: &proto::TaskAssignment, sha256: Option<&str>) -> TransferError {
    let own = if task.own_key.is_empty() {
        "and the coordinator named no key of its own".to_owned()
    } else {
        format!("and so does its key of its own {}", task.own_key)
    };
    let what = match sha256 {
        Some(sha256) => format!("other bytes than this version (sha256 {sha256})"),
        None => "an object that is not this version".to_owned(),
    };
    TransferError::Permanent(format!(
        "S3 object {}/{} holds {what}, {own}: an object is never written over",
        task.bucket, task.key
    ))
}

/// Large file: multipart upload; aborted on any failure. The upload's key
/// is fixed when it starts, before the bytes are known: an object already at
/// the version's key sends the upload to the key of its own, and if that
/// object may hold these very bytes (ferry's object of this version), it is
/// compared with them once they are read, and used if they match.
#[expect(
    clippy::too_many_arguments,
    reason = "the open source handle, target, sizing, progress and timing of one copy"
)]
async fn copy_multipart(
    task: &proto::TaskAssignment,
    server: &str,
    session: &SftpSession,
    handle: OpenHandle,
    obj: ObjectRef<'_>,
    s3: &S3Target,
    part_len: u64,
    progress: &(dyn Fn(u64) + Send + Sync),
    phases: &mut Phases,
) -> Result<proto::TaskSuccess, TransferError> {
    let stat = session
        .fstat(handle.id(), &task.path)
        .await
        .map_err(|e| TransferError::sftp(format!("stat {}", task.path), e))?;
    if let Some(change) = describe_change(task.size, task.mtime_unix, &stat) {
        return Err(TransferError::Lost(format!(
            "file changed since discovery: {}: {change}",
            task.path
        )));
    }
    phases.lap("stat");
    let metadata = object::metadata(
        &Source {
            server,
            path: &task.path,
            mtime_unix: task.mtime_unix,
            sha256: None,
        },
        &task.metadata,
    );
    let mut upload = Multipart::new(s3, obj, metadata.clone());
    upload.destined(task);
    let result = async {
        let part_len = usize::try_from(part_len).unwrap_or(usize::MAX);
        let mut read = read_file(
            task,
            session,
            &handle,
            part_len,
            Some(&mut upload),
            progress,
        )
        .await?;
        phases.lap("read+parts");
        verify(task, session, &handle, &read).await?;
        phases.lap("verify");
        upload.resolve().await?;
        let (target, candidate) = (upload.obj, upload.candidate.take());
        if let Some(existing) = &candidate
            && let Some((etag, id)) =
                same_bytes(s3, obj, existing, &metadata, task.size, &read.sha256).await?
        {
            upload.abort().await;
            handle.close().await;
            phases.lap("compare+close");
            let placed = Placed {
                key: task.key.clone(),
                etag,
                earlier: Some(id),
            };
            return Ok(success(task, read.bytes, read.sha256, placed));
        }
        if !read.tail.is_empty() {
            upload.submit(std::mem::take(&mut read.tail)).await?;
        }
        let (completed, ()) = tokio::join!(upload.complete(), handle.close());
        let placed = match completed? {
            Written::Created(etag) => Placed {
                key: target.key.to_owned(),
                etag,
                earlier: None,
            },
            Written::AlreadyThere => {
                match holds_these_bytes(s3, target, &metadata, task.size, &read.sha256).await? {
                    Some((etag, id)) => {
                        upload.abort().await;
                        Placed {
                            key: target.key.to_owned(),
                            etag,
                            earlier: Some(id),
                        }
                    }
                    // Written at the key since it was looked at: the next
                    // attempt sees it and goes to the key of its own.
                    None if target.key == task.key && !task.own_key.is_empty() => {
                        return Err(TransferError::Transient(format!(
                            "S3 object {target} appeared during the upload, with other bytes"
                        )));
                    }
                    None => return Err(occupied(task, Some(&read.sha256))),
                }
            }
        };
        phases.lap("complete+close");
        Ok(success(task, read.bytes, read.sha256, placed))
    }
    .await;
    if result.is_err() {
        upload.abort().await;
    }
    result
}

fn success(
    task: &proto::TaskAssignment,
    size: u64,
    sha256: String,
    placed: Placed,
) -> proto::TaskSuccess {
    proto::TaskSuccess {
        size,
        sha256,
        etag: placed.etag,
        bucket: task.bucket.clone(),
        key: placed.key,
        stored_announcement_id: placed.earlier.unwrap_or_default(),
    }
}

/// Where one transfer's time went, phase by phase; logged with
/// "transfer done" at debug level (what to read when small files are slow).
#[derive(Debug)]
struct Phases {
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new() -> Self {
        Phases {
            last: Instant::now(),
            laps: Vec::with_capacity(8),
        }
    }

    /// Ends phase `name` now; the next phase starts.
    fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps.push((name, now - self.last));
        self.last = now;
    }
}

/// `checkout=0.1ms stat=0.6ms ...`
impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, took)) in self.laps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={:.1}ms", took.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

/// What reading produced.
struct ReadResult {
    bytes: u64,
    /// Lower-case hex SHA-256 of the bytes read.
    sha256: String,
    /// Bytes not handed to the multipart upload (the whole file without one).
    tail: Vec<u8>,
}

/// Reads up to `task.size` bytes with pipelined requests, hashing them.
/// Every `part_len` bytes go to `upload` if there is one; the rest is
/// returned in [`ReadResult::tail`].
async fn read_file(
    task: &proto::TaskAssignment,
    session: &SftpSession,
    handle: &OpenHandle,
    part_len: usize,
    mut upload: Option<&mut Multipart<'_>>,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<ReadResult, TransferError> {
    let path = task.path.as_str();
    let size = task.size;
    let chunk = u64::from(session.read_chunk().max(1));
    let handle_id = handle.id().to_owned();
    let raw = session.raw().clone();
    let ranges = (0..size.div_ceil(chunk)).map(move |i| {
        let offset = i * chunk;
        // At most `chunk`, so it fits a u32.
        let len = (size - offset).min(chunk) as u32;
        (offset, len)
    });
    let mut reads = futures::stream::iter(ranges)
        .map(|(offset, len)| {
            let raw = raw.clone();
            let handle = handle_id.clone();
            async move { (offset, len, read_range(&raw, &handle, offset, len).await) }
        })
        .buffered(read_window(session.read_chunk()));

    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let buffer_capacity = buffer_reservation(part_len as u64, size);
    let mut buffer = Vec::with_capacity(buffer_capacity);
    let mut last_progress = Instant::now();
    while let Some((offset, len, result)) = reads.next().await {
        let data = result.map_err(|e| {
            TransferError::sftp(
                format!("read {path} at offset {offset}"),
                session.map_error(e, path),
            )
        })?;
        hasher.update(&data);
        bytes += data.len() as u64;
        let mut rest = data.as_slice();
        if let Some(upload) = upload.as_deref_mut() {
            while buffer.len() + rest.len() >= part_len {
                let (head, tail) = rest.split_at(part_len - buffer.len());
                buffer.extend_from_slice(head);
                rest = tail;
                let next = upload
                    .take_spare()
                    .unwrap_or_else(|| Vec::with_capacity(buffer_capacity));
                let full = std::mem::replace(&mut buffer, next);
                // Reported before the hand-over, which waits while the
                // store is slow: the bytes read so far are news.
                progress(bytes);
                upload.submit(full).await?;
            }
        }
        buffer.extend_from_slice(rest);
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            progress(bytes);
            last_progress = Instant::now();
        }
        if data.len() < len as usize {
            // End of file before the expected size; `verify` reports it.
            break;
        }
    }
    progress(bytes);
    Ok(ReadResult {
        bytes,
        sha256: hex::encode(hasher.finalize()),
        tail: buffer,
    })
}

/// Reads `len` bytes at `offset`, re-requesting the remainder after a short
/// read; returns fewer bytes only at end of file.
async fn read_range(
    raw: &RawSftpSession,
    handle: &str,
    offset: u64,
    len: u32,
) -> Result<Vec<u8>, SftpLibError> {
    let mut out: Vec<u8> = Vec::new();
    while out.len() < len as usize {
        let done = out.len() as u64;
        let want = len - done as u32;
        match raw.read(handle, offset + done, want).await {
            Ok(data) if data.data.is_empty() => break,
            Ok(mut data) => {
                // A server must not send more than asked; never trust it.
                data.data.truncate(want as usize);
                if out.is_empty() {
                    out = data.data;
                } else {
                    out.extend_from_slice(&data.data);
                }
            }
            Err(SftpLibError::Status(status)) if status.status_code == StatusCode::Eof => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// After reading: the open file must still be the version the task names,
/// and all of it must have been read. The handle's attributes are those of
/// the bytes read even if another file was renamed over the path meanwhile
/// (that one is a new version, found by the next poll).
async fn verify(
    task: &proto::TaskAssignment,
    session: &SftpSession,
    handle: &OpenHandle,
    read: &ReadResult,
) -> Result<(), TransferError> {
    let path = task.path.as_str();
    let stat = match session.fstat(handle.id(), path).await {
        Ok(stat) => stat,
        Err(SftpError::NotFound(_)) => {
            return Err(TransferError::Lost(format!(
                "file vanished during transfer: {path}"
            )));
        }
        Err(e) => return Err(TransferError::sftp(format!("stat {path}"), e)),
    };
    if let Some(change) = describe_change(task.size, task.mtime_unix, &stat) {
        return Err(TransferError::Lost(format!(
            "file changed during transfer: {path}: {change}"
        )));
    }
    if read.bytes != task.size {
        return Err(TransferError::Transient(format!(
            "SFTP read {path}: got {} bytes, expected {} (file unchanged per stat)",
            read.bytes, task.size
        )));
    }
    Ok(())
}

/// A multipart upload in progress: created with the first part, parts
/// uploading in background tasks, at most [`PARTS_IN_FLIGHT`] at once.
/// Dropping it unfinished (the transfer was cancelled) aborts the upload in
/// the background.
struct Multipart<'a> {
    s3: &'a S3Target,
    /// Where the parts go: once [`Multipart::resolve`] ran, the version's
    /// key or its key of its own.
    obj: ObjectRef<'a>,
    /// The task whose version this is, until its destination is resolved
    /// (`None`: `obj` is final).
    unresolved: Option<&'a proto::TaskAssignment>,
    /// The object found at the version's key that may hold these very bytes
    /// (compared once they are read).
    candidate: Option<ExistingObject>,
    metadata: Option<HashMap<String, String>>,
    upload_id: Option<String>,
    next_part: i32,
    running: JoinSet<Result<CompletedPart, TransferError>>,
    done: Vec<CompletedPart>,
    /// Part buffers back from finished uploads, reused for the next parts so
    /// that steady state allocates nothing (fresh 8 MiB buffers freed on other
    /// threads fragmented glibc's arenas and grew RSS).
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl<'a> Multipart<'a> {
    fn new(s3: &'a S3Target, obj: ObjectRef<'a>, metadata: HashMap<String, String>) -> Self {
        Multipart {
            s3,
            obj,
            unresolved: None,
            candidate: None,
            metadata: Some(metadata),
            upload_id: None,
            next_part: 1,
            running: JoinSet::new(),
            done: Vec::new(),
            spare: Arc::default(),
        }
    }

    /// Makes the upload choose its key at its first part (see
    /// [`Multipart::resolve`]) instead of going to `obj` as it is.
    fn destined(&mut self, task: &'a proto::TaskAssignment) {
        self.unresolved = Some(task);
    }

    /// Fixes the key before the upload starts, by looking at the version's
    /// key (the first part is read before the store is asked anything): free,
    /// the upload goes there; taken by an object that may be these very bytes
    /// (ferry's object of this version), it is kept as the candidate to
    /// compare once the bytes are read, and the upload goes to the key of its
    /// own if there is one, else to the key (completed only if the object
    /// there is found to be these bytes); taken by another version, to the
    /// key of its own, or the version fails.
    async fn resolve(&mut self) -> Result<(), TransferError> {
        let Some(task) = self.unresolved.take() else {
            return Ok(());
        };
        let Some(existing) = self.s3.head_object(self.obj).await? else {
            return Ok(());
        };
        let ours = self.metadata.as_ref().cloned().unwrap_or_default();
        let maybe_ours =
            object::judge_existing(&existing.metadata, existing.size, &ours, task.size, None)
                != AlreadyThere::Other;
        self.candidate = maybe_ours.then_some(existing);
        match task.own_key.as_str() {
            "" if self.candidate.is_some() => {}
            "" => return Err(occupied(task, None)),
            own => {
                self.obj = ObjectRef {
                    key: own,
                    ..self.obj
                }
            }
        }
        Ok(())
    }

    /// An emptied buffer of an uploaded part, if one came back.
    fn take_spare(&self) -> Option<Vec<u8>> {
        lock(&self.spare).pop()
    }

    /// Starts uploading `body` as the next part, after waiting for a free
    /// upload slot. Reports the failure of any earlier part.
    async fn submit(&mut self, body: Vec<u8>) -> Result<(), TransferError> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                self.resolve().await?;
                let metadata = self.metadata.take().unwrap_or_default();
                let id = self.s3.create_multipart(self.obj, metadata).await?;
                self.upload_id = Some(id.clone());
                id
            }
        };
        while let Some(joined) = self.running.try_join_next() {
            self.record(joined)?;
        }
        while self.running.len() >= PARTS_IN_FLIGHT {
            if let Some(joined) = self.running.join_next().await {
                self.record(joined)?;
            }
        }
        let number = self.next_part;
        self.next_part += 1;
        let s3 = self.s3.clone();
        let (bucket, key) = (self.obj.bucket.to_owned(), self.obj.key.to_owned());
        let spare = self.spare.clone();
        self.running.spawn(async move {
            let body = bytes::Bytes::from(body);
            let ours = body.clone();
            let result = s3.upload_part(bucket, key, upload_id, number, body).await;
            // The SDK has dropped its handle once the request is done: take the
            // allocation back (if it still holds one, the buffer is just freed).
            if let Ok(buffer) = ours.try_into_mut() {
                let mut buffer = Vec::from(buffer);
                buffer.clear();
                lock(&spare).push(buffer);
            }
            result
        });
        Ok(())
    }

    fn record(
        &mut self,
        joined: Result<Result<CompletedPart, TransferError>, tokio::task::JoinError>,
    ) -> Result<(), TransferError> {
        match joined {
            Ok(Ok(part)) => {
                self.done.push(part);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(TransferError::Transient(format!(
                "S3 UploadPart of {}: upload task failed: {e}",
                self.obj
            ))),
        }
    }

    /// Waits for all parts and completes the upload create-only. When an
    /// object is already at the key ([`Written::AlreadyThere`]) the upload
    /// stays open: the caller judges that object, then aborts.
    async fn complete(&mut self) -> Result<Written, TransferError> {
        while let Some(joined) = self.running.join_next().await {
            self.record(joined)?;
        }
        let Some(upload_id) = self.upload_id.clone() else {
            return Err(TransferError::Transient(format!(
                "S3 CompleteMultipartUpload {}: no part was uploaded",
                self.obj
            )));
        };
        let parts = std::mem::take(&mut self.done);
        let written = self
            .s3
            .complete_multipart(self.obj, &upload_id, parts, true)
            .await?;
        if matches!(written, Written::Created(_)) {
            self.upload_id = None;
        }
        Ok(written)
    }

    /// Stops running part uploads and discards the upload. Best effort: if
    /// S3 cannot be reached now, the abort is retried in the background for
    /// a while (S3 lifecycle rules clean up what remains after that).
    async fn abort(&mut self) {
        self.running.abort_all();
        while self.running.join_next().await.is_some() {}
        if let Some(upload_id) = self.upload_id.take()
            && let Err(e) = self.s3.abort_multipart(self.obj, &upload_id).await
        {
            tracing::debug!(upload_id, error = %e, "abort of multipart upload failed; retrying in the background");
            spawn_abort(self.s3, self.obj, upload_id, ABORT_RETRY_DELAYS);
        }
    }
}

/// Waits before the background attempts to abort a multipart upload.
const ABORT_RETRY_DELAYS: &[Duration] = &[
    Duration::from_secs(5),
    Duration::from_secs(15),
    Duration::from_secs(45),
    Duration::from_secs(120),
];

/// Aborts a multipart upload in a background task, once after each of
/// `delays`, until an attempt succeeds or S3 says the upload is gone.
fn spawn_abort(s3: &S3Target, obj: ObjectRef<'_>, upload_id: String, delays: &'static [Duration]) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let s3 = s3.clone();
    let (bucket, key, content_type) = (obj.bucket.to_owned(), obj.key.to_owned(), obj.content_type);
    runtime.spawn(async move {
        let obj = ObjectRef {
            bucket: &bucket,
            key: &key,
            content_type,
        };
        let mut last = None;
        for delay in delays {
            tokio::time::sleep(*delay).await;
            match s3.abort_multipart(obj, &upload_id).await {
                Ok(()) => return,
                Err(TransferError::S3 { fault, .. })
                    if fault.code.as_deref() == Some("NoSuchUpload") =>
                {
                    return;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            tracing::warn!(upload_id, error = %e, "gave up aborting multipart upload; its parts stay until a lifecycle rule removes them");
        }
    });
}

impl Drop for Multipart<'_> {
    fn drop(&mut self) {
        // Still set: the transfer was cancelled mid-upload.
        if let Some(upload_id) = self.upload_id.take() {
            self.running.abort_all();
            spawn_abort(self.s3, self.obj, upload_id, ABORT_ON_DROP_DELAYS);
        }
    }
}

/// Background abort of a cancelled transfer: at once, then as on failure.
const ABORT_ON_DROP_DELAYS: &[Duration] = &[
    Duration::ZERO,
    Duration::from_secs(5),
    Duration::from_secs(15),
    Duration::from_secs(45),
    Duration::from_secs(120),
];

/// An open remote file handle; closed by [`OpenHandle::close`], or in the
/// background when dropped (transfer cancelled).
struct OpenHandle {
    raw: std::sync::Arc<RawSftpSession>,
    handle: Option<String>,
}

impl OpenHandle {
    fn id(&self) -> &str {
        self.handle.as_deref().unwrap_or_default()
    }

    async fn close(mut self) {
        if let Some(handle) = self.handle.take()
            && let Err(e) = self.raw.close(handle).await
        {
            tracing::debug!(error = %e, "closing SFTP file handle");
        }
    }
}

impl Drop for OpenHandle {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let raw = self.raw.clone();
            runtime.spawn(async move {
                if let Err(e) = raw.close(handle).await {
                    tracing::debug!(error = %e, "closing abandoned SFTP file handle");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(kind: FileKind, size: Option<u64>, mtime: Option<i64>) -> FileStat {
        FileStat {
            kind,
            size,
            mtime_unix: mtime,
        }
    }

    #[test]
    fn changes_are_described() {
        assert_eq!(
            describe_change(10, 100, &stat(FileKind::File, Some(10), Some(100))),
            None
        );
        assert_eq!(
            describe_change(10, 100, &stat(FileKind::Unknown, None, None)),
            None
        );
        assert_eq!(
            describe_change(10, 100, &stat(FileKind::File, Some(12), Some(100))).as_deref(),
            Some("size 10 -> 12")
        );
        assert_eq!(
            describe_change(10, 100, &stat(FileKind::File, Some(12), Some(160))).as_deref(),
            Some("size 10 -> 12, mtime 100 -> 160")
        );
        assert_eq!(
            describe_change(10, 100, &stat(FileKind::Dir, Some(10), Some(100))).as_deref(),
            Some("now a dir, not a regular file")
        );
    }
}
