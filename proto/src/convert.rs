//! Conversions between domain types (`ferry-common`) and protocol types.

use ferry_common::domain::FileStatus;
use ferry_common::lifecycle::FailureKind;

use crate::generated as proto;

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
    })
}

impl From<FailureKind> for proto::FailureKind {
    fn from(kind: FailureKind) -> Self {
        match kind {
            FailureKind::Transient => proto::FailureKind::Transient,
            FailureKind::Lost => proto::FailureKind::Lost,
            FailureKind::Permanent => proto::FailureKind::Permanent,
        }
    }
}

/// The domain kind of a wire failure kind. Unspecified or unknown values are
/// transient: retrying is the safe reading of a kind nobody set.
pub fn failure_kind_from_wire(kind: i32) -> FailureKind {
    match proto::FailureKind::try_from(kind) {
        Ok(proto::FailureKind::Lost) => FailureKind::Lost,
        Ok(proto::FailureKind::Permanent) => FailureKind::Permanent,
        Ok(proto::FailureKind::Transient | proto::FailureKind::Unspecified) | Err(_) => {
            FailureKind::Transient
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
