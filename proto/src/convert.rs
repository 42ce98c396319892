//! Conversions between domain types (`ferry-common`) and protocol types.

use ferry_common::domain::FileStatus;

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
}
