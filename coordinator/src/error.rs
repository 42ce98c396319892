//! Errors of the admin and agent APIs, mapped to `tonic::Status` in one place.

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
