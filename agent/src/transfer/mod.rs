//! Moving files: SFTP -> S3 transfers and the post-actions that follow a
//! confirmed upload.
//!
//! What lives where:
//! - [`transfer`] (in `copy.rs`): one task, from stat to completed upload,
//!   with pipelined SFTP reads and bounded multipart uploads.
//! - [`SessionPool`] (in `pool.rs`): SSH connections per server within its
//!   `max_sessions`, several checkouts sharing one connection for light
//!   [`Work`] (listings, post-actions, small files).
//! - [`S3Target`] (in `s3.rs`): the S3 client and the requests a transfer
//!   makes.
//! - [`part_size`] and [`read_window`] (in `sizing.rs`), object key checks
//!   and metadata encoding (in `object.rs`): pure decisions, unit-tested.
//! - [`TransferError`] and [`classify`] (in `failure.rs`): the single place
//!   deciding transient / lost / permanent.
//! - [`post_action`] (here): delete or move the stored version of the
//!   source after upload, refusing if the path now holds another version.
//!
//! **Invariant:** a transfer reports success only after
//! CompleteMultipartUpload (or PutObject) succeeded, every byte of the
//! task's size was read and hashed, and a stat after reading still shows
//! the size and mtime the task names. Any failure after
//! CreateMultipartUpload aborts the upload.

mod copy;
pub(crate) mod failure;
mod object;
mod pool;
mod s3;
mod sizing;

use ferry_common::domain::PostAction;
use ferry_proto::{self as proto, convert::post_action_from_proto};

pub(crate) use copy::transfer;
pub(crate) use pool::{SessionPool, Work};
pub(crate) use s3::S3Target;

use crate::sftp::{FileKind, FileStat, SftpError};

/// Highest suffix tried when the move target name is taken (`name.1` ...).
const MAX_MOVE_SUFFIX: u32 = 1000;

/// What became of a post-action.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PostActionOutcome {
    /// Deleted or moved, or the version was already gone.
    Done,
    /// The path holds another version than the stored one: nothing was done.
    Refused(String),
    /// The action could not be carried out (worth retrying later).
    Failed(String),
}

/// Runs a post-action on the stored version of the source file. The path is
/// stat'ed right before acting: if it holds another version (size or mtime
/// differ from the request's), nothing is done and the action is refused.
/// Deleting or moving a file that is no longer there counts as done (the
/// request may be a repeat after a lost answer). A move never replaces an
/// existing file: if `dir/<name>` is taken, `dir/<name>.1`, `dir/<name>.2`,
/// ... are tried.
pub(crate) async fn post_action(
    req: &proto::PostActionRequest,
    pool: &SessionPool,
) -> PostActionOutcome {
    let action = match &req.action {
        Some(action) => match post_action_from_proto(action) {
            Ok(action) => action,
            Err(e) => return PostActionOutcome::Failed(e.to_string()),
        },
        None => return PostActionOutcome::Failed("post-action request names no action".into()),
    };
    let Some(conn) = req.source.as_ref() else {
        return PostActionOutcome::Failed("post-action names no source server".into());
    };
    let path = req.path.as_str();
    let mut session = match pool.checkout(conn, Work::Light).await {
        Ok(session) => session,
        Err(e) => {
            return PostActionOutcome::Failed(format!("SFTP connect to server {}: {e}", conn.name));
        }
    };
    if matches!(action, PostAction::Keep) {
        return PostActionOutcome::Done;
    }
    match session.stat(path).await {
        Ok(stat) => {
            if let Err(why) = same_version(&stat, req.size, req.mtime_unix) {
                return PostActionOutcome::Refused(format!("{action} {path}: {why}"));
            }
        }
        Err(SftpError::NotFound(_)) => return PostActionOutcome::Done,
        Err(e) => {
            session.note(&e);
            return PostActionOutcome::Failed(format!("{action} {path}: stat: {e}"));
        }
    }
    let result = match &action {
        PostAction::Keep => Ok(()),
        PostAction::Delete => match session.remove(path).await {
            Ok(()) | Err(SftpError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        },
        PostAction::Move(dir) => move_into(&session, path, dir).await,
    };
    match result {
        Ok(()) => PostActionOutcome::Done,
        Err(e) => {
            session.note(&e);
            PostActionOutcome::Failed(format!("{action} {path}: {e}"))
        }
    }
}

/// Whether `stat` shows the stored version (`size`, `mtime_unix`); if not, why.
fn same_version(stat: &FileStat, size: u64, mtime_unix: i64) -> Result<(), String> {
    let show = |v: Option<String>| v.unwrap_or_else(|| "unknown".to_owned());
    let (now_size, now_mtime) = (stat.size, stat.mtime_unix);
    if stat.kind == FileKind::File && now_size == Some(size) && now_mtime == Some(mtime_unix) {
        return Ok(());
    }
    Err(format!(
        "changed since stored (size/mtime now {}/{}{}, stored {size}/{mtime_unix})",
        show(now_size.map(|s| s.to_string())),
        show(now_mtime.map(|m| m.to_string())),
        match stat.kind {
            FileKind::File => String::new(),
            kind => format!(", a {kind:?} now"),
        },
    ))
}

async fn move_into(
    session: &crate::sftp::SftpSession,
    path: &str,
    dir: &str,
) -> Result<(), SftpError> {
    session.mkdir_all(dir).await?;
    let name = path.rsplit('/').next().unwrap_or(path);
    for n in 0..=MAX_MOVE_SUFFIX {
        let target = move_target(dir, name, n);
        match session.rename(path, &target).await {
            Ok(()) => return Ok(()),
            // Plain SFTP rename fails (`Failure`) when the target exists.
            Err(SftpError::Failure { .. }) if session.lstat(&target).await.is_ok() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(SftpError::Failure {
        path: format!("{dir}/{name}"),
        message: format!("{name} and {name}.1 .. {name}.{MAX_MOVE_SUFFIX} all exist"),
    })
}

/// `dir/name`, or `dir/name.n` for `n > 0`.
fn move_target(dir: &str, name: &str, n: u32) -> String {
    let dir = dir.trim_end_matches('/');
    match n {
        0 => format!("{dir}/{name}"),
        n => format!("{dir}/{name}.{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_stored_version_is_acted_on() {
        let stat = |kind, size, mtime| FileStat {
            kind,
            size,
            mtime_unix: mtime,
        };
        assert_eq!(
            same_version(&stat(FileKind::File, Some(5), Some(9)), 5, 9),
            Ok(())
        );
        let newer = same_version(&stat(FileKind::File, Some(7), Some(10)), 5, 9).unwrap_err();
        assert_eq!(
            newer,
            "changed since stored (size/mtime now 7/10, stored 5/9)"
        );
        let same_size = same_version(&stat(FileKind::File, Some(5), Some(10)), 5, 9);
        assert!(same_size.is_err());
        let no_attrs = same_version(&stat(FileKind::File, None, None), 5, 9).unwrap_err();
        assert!(no_attrs.contains("now unknown/unknown"), "{no_attrs}");
        let dir = same_version(&stat(FileKind::Dir, Some(5), Some(9)), 5, 9).unwrap_err();
        assert!(dir.contains("a Dir now"), "{dir}");
    }

    #[test]
    fn move_targets() {
        assert_eq!(move_target("/archive", "a.csv", 0), "/archive/a.csv");
        assert_eq!(move_target("/archive/", "a.csv", 2), "/archive/a.csv.2");
        assert_eq!(move_target("/", "a.csv", 0), "/a.csv");
    }
}
