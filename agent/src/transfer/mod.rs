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
//! - [`post_action`] (in `post_action.rs`): delete or move the stored
//!   version of the source after upload, acting only on the checked bytes
//!   and refusing if the path now holds another version.
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
mod post_action;
mod s3;
mod sizing;

use ferry_common::domain::PostAction;
use ferry_proto::{self as proto, convert::post_action_from_proto};

pub(crate) use copy::transfer;
pub(crate) use pool::{SessionPool, Work};
pub(crate) use post_action::PostActionsDone;
pub(crate) use s3::S3Target;

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

/// Runs a post-action on the stored version of the source file (see
/// [`post_action::act`] for how it acts only on the checked bytes).
pub(crate) async fn post_action(
    req: &proto::PostActionRequest,
    pool: &SessionPool,
    done: &PostActionsDone,
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
    let mut session = match pool.checkout(conn, Work::Light).await {
        Ok(session) => session,
        Err(e) => {
            return PostActionOutcome::Failed(format!("SFTP connect to server {}: {e}", conn.name));
        }
    };
    if matches!(action, PostAction::Keep) {
        return PostActionOutcome::Done;
    }
    let version = post_action::Version {
        server_id: conn.server_id,
        file_id: req.file_id,
        path: &req.path,
        size: req.size,
        mtime_unix: req.mtime_unix,
        sha256: (req.verify_bytes && !req.sha256.is_empty()).then_some(req.sha256.as_str()),
    };
    let (outcome, error) = post_action::act(&*session, done, &version, &action).await;
    if let Some(e) = error {
        session.note(&e);
    }
    outcome
}
