//! Errors split by who branches on them: [`StoreError`] for the store
//! functions background loops call (they retry or skip), [`ApiError`] at the
//! API edge only, mapped to `tonic::Status` in one place.

use ferry_common::validate::FieldError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// An API failure the caller can branch on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    /// Unexpected failure; the message is logged, the caller sees a generic text.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// A failure of a store function (Postgres reads and writes of file state).
/// Background loops log it and retry their round; the API edge turns it into
/// an internal error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// Postgres failed or is unreachable; the transaction was rolled back.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A row holds something the code cannot read (e.g. an unknown status):
    /// retrying will not help until the row is repaired.
    #[error("file {file_id}: {what}")]
    Corrupt { file_id: i64, what: String },
}

pub(crate) type StoreResult<T> = Result<T, StoreError>;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Internal(anyhow::Error::new(e).context("store"))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(anyhow::Error::new(e).context("database"))
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            // The message names the field for humans, the `google.rpc.BadRequest`
            // detail for programs.
            ApiError::Invalid(f) => Status::with_error_details(
                Code::InvalidArgument,
                f.to_string(),
                ErrorDetails::with_bad_request_violation(f.field, f.message),
            ),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                Status::internal("internal error (see coordinator log)")
            }
        }
    }
}

/// True when `e` is a unique-constraint violation on `constraint`.
pub(crate) fn is_unique_violation(e: &sqlx::Error, constraint: &str) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505")
        && db.constraint() == Some(constraint))
}
