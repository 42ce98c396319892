//! [`SftpSession`]: one SSH connection plus its SFTP channel, and the file
//! operations the agent performs on it (listing, stat, read, post-actions).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use globset::GlobMatcher;
use russh::client::Handle;
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags};

use super::connect::PinnedHostKey;
use super::error::{LibError, SftpError, classify};
use super::listing::{Listing, ListingLimits};

/// A regular file found by a listing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RemoteFile {
    /// Absolute remote path.
    pub path: String,
    pub size: u64,
    /// Seconds since the Unix epoch (SFTP v3 has whole seconds only).
    pub mtime_unix: i64,
}

impl RemoteFile {
    /// The (size, mtime) pair the stability rule compares across polls.
    pub(crate) fn observation(&self) -> ferry_common::stability::Observation {
        ferry_common::stability::Observation {
            size: self.size,
            mtime_unix: self.mtime_unix,
        }
    }
}

/// What an entry is, from the `S_IFMT` bits of its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    File,
    Dir,
    Symlink,
    /// Device, FIFO, socket, ...
    Other,
    /// The server sent no mode bits.
    Unknown,
}

impl FileKind {
    pub(crate) fn from_attrs(attrs: &FileAttributes) -> FileKind {
        match attrs.permissions {
            None => FileKind::Unknown,
            Some(mode) => match mode & 0o170_000 {
                0o100_000 => FileKind::File,
                0o040_000 => FileKind::Dir,
                0o120_000 => FileKind::Symlink,
                _ => FileKind::Other,
            },
        }
    }
}

/// Attributes of one path; fields the server did not send are `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStat {
    pub kind: FileKind,
    pub size: Option<u64>,
    pub mtime_unix: Option<i64>,
}

impl FileStat {
    pub(crate) fn from_attrs(attrs: &FileAttributes) -> FileStat {
        FileStat {
            kind: FileKind::from_attrs(attrs),
            size: attrs.size,
            mtime_unix: attrs.mtime.map(i64::from),
        }
    }
}

/// An authenticated SSH connection with one open SFTP channel.
///
/// Methods take `&self` and may run concurrently (SFTP requests are
/// multiplexed by id). Dropping the session closes the channel and the
/// connection.
pub(crate) struct SftpSession {
    ssh: Handle<PinnedHostKey>,
    sftp: Arc<RawSftpSession>,
    read_chunk: u32,
    /// `user@host:port`, for messages.
    target: String,
    opened: Instant,
    /// Milliseconds after `opened` of the last operation started.
    last_used_ms: AtomicU64,
    _open: ferry_proto::metrics::GaugeHold,
}

impl SftpSession {
    pub(crate) fn new(
        ssh: Handle<PinnedHostKey>,
        sftp: RawSftpSession,
        read_chunk: u32,
        target: String,
    ) -> SftpSession {
        SftpSession {
            ssh,
            sftp: Arc::new(sftp),
            read_chunk,
            target,
            opened: Instant::now(),
            last_used_ms: AtomicU64::new(0),
            _open: crate::metrics::SFTP_SESSIONS.hold(),
        }
    }

    /// The underlying russh-sftp protocol session, for work this type does
    /// not wrap (a pipelined reader issues `read(handle, offset, len)`
    /// requests concurrently on it). Map its errors with
    /// [`SftpSession::map_error`]. Request timeouts are already applied.
    pub(crate) fn raw(&self) -> &Arc<RawSftpSession> {
        &self.sftp
    }

    /// Bytes per SFTP read request this server accepts (from
    /// `limits@openssh.com`, else 32 KiB): the natural pipelining unit.
    pub(crate) fn read_chunk(&self) -> u32 {
        self.read_chunk
    }

    /// `user@host:port` of this session.
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// Classifies an error from [`SftpSession::raw`] the way this type's own
    /// methods do.
    pub(crate) fn map_error(&self, err: russh_sftp::client::error::Error, path: &str) -> SftpError {
        self.error(err, path)
    }

    /// False once the SSH connection has ended (server closed it, keepalive
    /// or inactivity timeout, [`SftpSession::close`]).
    pub(crate) fn is_alive(&self) -> bool {
        !self.ssh.is_closed()
    }

    /// Time since the last operation was started on this session (or since
    /// it was opened); for closing pooled sessions nobody uses.
    pub(crate) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }

    /// Closes the SFTP channel and disconnects. Best effort: a connection
    /// that is already gone is not an error.
    pub(crate) async fn close(&self) {
        if let Err(e) = self.sftp.close_session() {
            tracing::debug!(target = %self.target, error = %e, "closing SFTP channel");
        }
        if let Err(e) = self
            .ssh
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await
        {
            tracing::debug!(target = %self.target, error = %e, "SSH disconnect");
        }
        // The connection counts against the server's session budget until
        // it has really ended (bounded: a dead peer may never answer).
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.ssh.is_closed() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Attributes of `path`, following symlinks (SFTP `STAT`).
    pub(crate) async fn stat(&self, path: &str) -> Result<FileStat, SftpError> {
        self.touch();
        let attrs = self
            .sftp
            .stat(path)
            .await
            .map_err(|e| self.error(e, path))?;
        Ok(FileStat::from_attrs(&attrs.attrs))
    }

    /// Opens `path` for reading; returns the handle (close it with the raw
    /// session's `close`).
    pub(crate) async fn open_read(&self, path: &str) -> Result<String, SftpError> {
        self.touch();
        let opened = self
            .sftp
            .open(path, OpenFlags::READ, FileAttributes::default())
            .await
            .map_err(|e| self.error(e, path))?;
        Ok(opened.handle)
    }

    /// The sha256 (hex) of the whole file at `path`, read start to end one
    /// request at a time (for the rare checks of bytes already stored, not
    /// for transfers).
    pub(crate) async fn sha256(&self, path: &str) -> Result<String, SftpError> {
        use russh_sftp::protocol::StatusCode;
        use sha2::{Digest, Sha256};
        let handle = self.open_read(path).await?;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        let read = loop {
            self.touch();
            match self
                .sftp
                .read(handle.as_str(), offset, self.read_chunk())
                .await
            {
                Ok(data) if data.data.is_empty() => break Ok(()),
                Ok(mut data) => {
                    data.data.truncate(self.read_chunk() as usize);
                    offset += data.data.len() as u64;
                    hasher.update(&data.data);
                }
                Err(russh_sftp::client::error::Error::Status(status))
                    if status.status_code == StatusCode::Eof =>
                {
                    break Ok(());
                }
                Err(e) => break Err(self.error(e, path)),
            }
        };
        let _ = self.sftp.close(handle.as_str()).await;
        read.map(|()| hex::encode(hasher.finalize()))
    }

    /// Attributes of the open file `handle` (SFTP `FSTAT`); `path` names it
    /// in errors.
    pub(crate) async fn fstat(&self, handle: &str, path: &str) -> Result<FileStat, SftpError> {
        self.touch();
        let attrs = self
            .sftp
            .fstat(handle)
            .await
            .map_err(|e| self.error(e, path))?;
        Ok(FileStat::from_attrs(&attrs.attrs))
    }

    /// Attributes of `path` itself, not following a symlink (SFTP `LSTAT`),
    /// like the listing sees it.
    pub(crate) async fn lstat(&self, path: &str) -> Result<FileStat, SftpError> {
        self.touch();
        let attrs = self
            .sftp
            .lstat(path)
            .await
            .map_err(|e| self.error(e, path))?;
        Ok(FileStat::from_attrs(&attrs.attrs))
    }

    /// Deletes the file `path`.
    pub(crate) async fn remove(&self, path: &str) -> Result<(), SftpError> {
        self.touch();
        self.sftp
            .remove(path)
            .await
            .map(drop)
            .map_err(|e| self.error(e, path))
    }

    /// Renames `from` to `to` with plain SFTP v3 `RENAME`, which never
    /// replaces an existing `to` (OpenSSH answers `Failure`).
    pub(crate) async fn rename(&self, from: &str, to: &str) -> Result<(), SftpError> {
        self.touch();
        self.sftp
            .rename(from, to)
            .await
            .map(drop)
            .map_err(|e| match self.error(e, from) {
                SftpError::Failure { message, .. } => SftpError::Failure {
                    path: format!("rename {from} -> {to}"),
                    message,
                },
                other => other,
            })
    }

    /// Creates `dir` and any missing parents; succeeds if it already exists
    /// (also when another client creates it concurrently).
    pub(crate) async fn mkdir_all(&self, dir: &str) -> Result<(), SftpError> {
        self.touch();
        // Common case first: the directory is already there.
        if let Ok(FileStat {
            kind: FileKind::Dir,
            ..
        }) = self.stat(dir).await
        {
            return Ok(());
        }
        let absolute = dir.starts_with('/');
        let mut prefix = String::new();
        for part in dir.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if absolute || !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            match self.stat(&prefix).await {
                Ok(FileStat {
                    kind: FileKind::Dir,
                    ..
                }) => continue,
                Ok(_) => {
                    return Err(SftpError::Failure {
                        path: prefix,
                        message: "exists and is not a directory".to_owned(),
                    });
                }
                Err(SftpError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            if let Err(e) = self
                .sftp
                .mkdir(prefix.as_str(), FileAttributes::empty())
                .await
            {
                // Lost a race with another creator? Then the directory is there.
                match self.stat(&prefix).await {
                    Ok(FileStat {
                        kind: FileKind::Dir,
                        ..
                    }) => {}
                    _ => return Err(self.error(e, &prefix)),
                }
            }
        }
        Ok(())
    }

    /// Streaming form of [`SftpSession::list`]: yields matches one server
    /// `READDIR` reply at a time (OpenSSH sends ~100 names per reply).
    pub(crate) fn listing<'a>(
        &'a self,
        dir: &str,
        glob: &'a GlobMatcher,
        recursive: bool,
        limits: ListingLimits,
    ) -> Listing<'a> {
        Listing::new(self, dir, glob, recursive, limits)
    }

    pub(crate) fn sftp(&self) -> &Arc<RawSftpSession> {
        &self.sftp
    }

    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn error(&self, err: impl Into<LibError>, path: &str) -> SftpError {
        match classify(err, path) {
            // When the connection is gone, odd replies are a symptom of that.
            SftpError::Protocol(message) if self.ssh.is_closed() => SftpError::Disconnected(
                format!("{}: SSH connection closed ({message})", self.target),
            ),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(mode: Option<u32>) -> FileAttributes {
        FileAttributes {
            permissions: mode,
            size: Some(5),
            mtime: Some(1_700_000_000),
            ..FileAttributes::default()
        }
    }

    #[test]
    fn kind_comes_from_the_mode_type_bits() {
        assert_eq!(
            FileKind::from_attrs(&attrs(Some(0o100_644))),
            FileKind::File
        );
        assert_eq!(FileKind::from_attrs(&attrs(Some(0o040_755))), FileKind::Dir);
        assert_eq!(
            FileKind::from_attrs(&attrs(Some(0o120_777))),
            FileKind::Symlink
        );
        assert_eq!(
            FileKind::from_attrs(&attrs(Some(0o010_644))),
            FileKind::Other
        ); // FIFO
        assert_eq!(
            FileKind::from_attrs(&attrs(Some(0o140_755))),
            FileKind::Other
        ); // socket
        assert_eq!(
            FileKind::from_attrs(&attrs(Some(0o060_660))),
            FileKind::Other
        ); // block dev
        assert_eq!(FileKind::from_attrs(&attrs(None)), FileKind::Unknown);
        let stat = FileStat::from_attrs(&attrs(Some(0o100_600)));
        assert_eq!(stat.size, Some(5));
        assert_eq!(stat.mtime_unix, Some(1_700_000_000));
    }
}
