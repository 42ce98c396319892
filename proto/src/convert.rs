//! Conversions between domain types (`ferry-common`) and protocol types.

use ferry_common::domain::{FileStatus, PostAction};
use ferry_common::lifecycle::FailureKind;
use ferry_common::validate::{self, FieldError};

use crate::generated as proto;
use crate::generated::post_action::{Action, Delete, Keep, MoveTo};

impl From<FileStatus> for proto::FileStatus {
    fn from(status: FileStatus) -> Self {
        match status {
            FileStatus::New => proto::FileStatus::New,
            FileStatus::InProgress => proto::FileStatus::InProgress,
            FileStatus::Uploaded => proto::FileStatus::Uploaded,
            FileStatus::Processed => proto::FileStatus::Processed,
            FileStatus::Error => proto::FileStatus::Error,
            FileStatus::Failed => proto::FileStatus::Failed,
            FileStatus::Lost => proto::FileStatus::Lost,
            FileStatus::Skipped => proto::FileStatus::Skipped,
        }
    }
}

/// The wire value of a status (`FileStatus` as the `i32` prost stores).
pub fn status_to_wire(status: FileStatus) -> i32 {
    proto::FileStatus::from(status) as i32
}

/// The domain status of a wire status; `None` for `UNSPECIFIED`.
pub fn status_from_proto(status: proto::FileStatus) -> Option<FileStatus> {
    Some(match status {
        proto::FileStatus::Unspecified => return None,
        proto::FileStatus::New => FileStatus::New,
        proto::FileStatus::InProgress => FileStatus::InProgress,
        proto::FileStatus::Uploaded => FileStatus::Uploaded,
        proto::FileStatus::Processed => FileStatus::Processed,
        proto::FileStatus::Error => FileStatus::Error,
        proto::FileStatus::Failed => FileStatus::Failed,
        proto::FileStatus::Lost => FileStatus::Lost,
        proto::FileStatus::Skipped => FileStatus::Skipped,
    })
}

impl From<FailureKind> for proto::FailureKind {
    fn from(kind: FailureKind) -> Self {
        match kind {
            FailureKind::Transient => proto::FailureKind::Transient,
            FailureKind::Lost => proto::FailureKind::Lost,
            FailureKind::Permanent => proto::FailureKind::Permanent,
            FailureKind::Agent => proto::FailureKind::Agent,
        }
    }
}

impl From<&PostAction> for proto::PostAction {
    fn from(action: &PostAction) -> Self {
        proto::PostAction {
            action: Some(match action {
                PostAction::Keep => Action::Keep(Keep {}),
                PostAction::Delete => Action::Delete(Delete {}),
                PostAction::Move(directory) => Action::MoveTo(MoveTo {
                    directory: directory.clone(),
                }),
            }),
        }
    }
}

/// The domain kind of a wire failure kind. Unspecified or unknown values are
/// transient: retrying is the safe reading of a kind nobody set.
pub fn failure_kind_from_wire(kind: i32) -> FailureKind {
    match proto::FailureKind::try_from(kind) {
        Ok(proto::FailureKind::Lost) => FailureKind::Lost,
        Ok(proto::FailureKind::Permanent) => FailureKind::Permanent,
        Ok(proto::FailureKind::Agent) => FailureKind::Agent,
        Ok(proto::FailureKind::Transient | proto::FailureKind::Unspecified) | Err(_) => {
            FailureKind::Transient
        }
    }
}

/// The domain post-action of a wire one, checked by the same rule as its
/// text form (a move needs an absolute directory). Errors name `post_action`.
pub fn post_action_from_proto(action: &proto::PostAction) -> Result<PostAction, FieldError> {
    match &action.action {
        Some(Action::Keep(_)) => Ok(PostAction::Keep),
        Some(Action::Delete(_)) => Ok(PostAction::Delete),
        Some(Action::MoveTo(m)) => validate::post_action_move(&m.directory),
        None => Err(FieldError::new(
            "post_action",
            "set one of keep, delete or move_to",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_actions_round_trip_and_moves_must_be_absolute() {
        for action in [
            PostAction::Keep,
            PostAction::Delete,
            PostAction::Move("/archive".into()),
        ] {
            let wire = proto::PostAction::from(&action);
            assert_eq!(post_action_from_proto(&wire), Ok(action));
        }
        let relative = proto::PostAction {
            action: Some(Action::MoveTo(MoveTo {
                directory: "archive".into(),
            })),
        };
        assert_eq!(
            post_action_from_proto(&relative).unwrap_err().field,
            "post_action"
        );
        let unset = proto::PostAction { action: None };
        assert_eq!(
            post_action_from_proto(&unset).unwrap_err().field,
            "post_action"
        );
        let trailing = proto::PostAction {
            action: Some(Action::MoveTo(MoveTo {
                directory: "/done/".into(),
            })),
        };
        assert_eq!(
            post_action_from_proto(&trailing),
            Ok(PostAction::Move("/done".into()))
        );
    }

    #[test]
    fn every_status_round_trips() {
        for st in FileStatus::ALL {
            assert_eq!(status_from_proto(proto::FileStatus::from(st)), Some(st));
        }
        assert_eq!(status_from_proto(proto::FileStatus::Unspecified), None);
    }

    #[test]
    fn failure_kinds_round_trip_and_unknown_is_transient() {
        for kind in [
            FailureKind::Transient,
            FailureKind::Lost,
            FailureKind::Permanent,
            FailureKind::Agent,
        ] {
            assert_eq!(
                failure_kind_from_wire(proto::FailureKind::from(kind) as i32),
                kind
            );
        }
        assert_eq!(failure_kind_from_wire(0), FailureKind::Transient);
        assert_eq!(failure_kind_from_wire(99), FailureKind::Transient);
    }
}
