//! Moving files: SFTP -> S3 transfers and the post-actions that follow a
//! confirmed upload.
//!
//! What lives where:
//! - [`transfer`] (in `copy.rs`): one task, from stat to completed upload,
//!   with pipelined SFTP reads and bounded multipart uploads.
//! - [`SessionPool`] (in `pool.rs`): SFTP sessions reused per server within
//!   its `max_sessions`.
//! - [`S3Target`] (in `s3.rs`): the S3 client and the requests a transfer
//!   makes.
//! - [`part_size`] and [`read_window`] (in `sizing.rs`), object key checks
//!   and metadata encoding (in `object.rs`): pure decisions, unit-tested.
//! - [`TransferError`] and [`classify`] (in `failure.rs`): the single place
//!   deciding transient / lost / permanent.
//! - [`post_action`] (here): delete or move the source after upload.
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
pub(crate) use pool::SessionPool;
pub(crate) use s3::S3Target;

use crate::sftp::SftpError;

/// Highest suffix tried when the move target name is taken (`name.1` ...).
const MAX_MOVE_SUFFIX: u32 = 1000;

/// Runs a post-action on the source file. Deleting or moving a file that is
/// no longer there counts as done (the request may be a repeat after a lost
/// answer). A move never replaces an existing file: if `dir/<name>` is
/// taken, `dir/<name>.1`, `dir/<name>.2`, ... are tried.
pub(crate) async fn post_action(
    req: &proto::PostActionRequest,
    pool: &SessionPool,
) -> Result<(), String> {
    let action = match &req.action {
        Some(action) => post_action_from_proto(action).map_err(|e| e.to_string())?,
        None => return Err("post-action request names no action".to_owned()),
    };
    let conn = req
        .source
        .as_ref()
        .ok_or_else(|| "post-action names no source server".to_owned())?;
    let path = req.path.as_str();
    let mut session = pool
        .checkout(conn)
        .await
        .map_err(|e| format!("SFTP connect to server {}: {e}", conn.name))?;
    let result = match &action {
        PostAction::Keep => Ok(()),
        PostAction::Delete => match session.remove(path).await {
            Ok(()) | Err(SftpError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        },
        PostAction::Move(dir) => move_into(&session, path, dir).await,
    };
    result.map_err(|e| {
        session.note(&e);
        format!("{action} {path}: {e}")
    })
}

async fn move_into(
    session: &crate::sftp::SftpSession,
    path: &str,
    dir: &str,
) -> Result<(), SftpError> {
    match session.stat(path).await {
        Ok(_) => {}
        Err(SftpError::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    }
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
    fn move_targets() {
        assert_eq!(move_target("/archive", "a.csv", 0), "/archive/a.csv");
        assert_eq!(move_target("/archive/", "a.csv", 2), "/archive/a.csv.2");
        assert_eq!(move_target("/", "a.csv", 0), "/a.csv");
    }
}
