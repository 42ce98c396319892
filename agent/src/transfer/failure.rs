//! [`TransferError`], what can go wrong in a transfer, and [`classify`], the
//! one place that decides whether a failure is transient, lost or permanent
//! (the coordinator retries, gives up on the file version, or fails it).
//!
//! S3 SDK errors are first flattened into an [`S3Fault`] (kind, HTTP status,
//! S3 error code, text) so the decision is a plain function of plain data.

use std::error::Error as StdError;
use std::fmt;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use ferry_proto as proto;

use crate::sftp::SftpError;

/// S3 error codes that no retry of the file fixes: the destination is wrong.
const PERMANENT_S3_CODES: &[&str] = &[
    "NoSuchBucket",
    "InvalidBucketName",
    "KeyTooLongError",
    "MetadataTooLarge",
    "EntityTooLarge",
    "InvalidStorageClass",
];

/// S3 error codes that say the agent's own S3 configuration is refused
/// (credentials, their permissions, its clock): every file it touches would
/// fail the same way, and another agent (or this one once its keys are
/// rotated or its clock fixed) would succeed. So do HTTP 401 and 403.
const AGENT_S3_CODES: &[&str] = &[
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "RequestTimeTooSkewed",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
];

/// Why a transfer failed. `Display` is the message reported to the
/// coordinator (after the kind decided by [`classify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TransferError {
    /// An SFTP operation failed; `op` names it and its path
    /// (`read /in/a.csv at offset 8388608`).
    Sftp { op: String, err: SftpError },
    /// An S3 request failed; `op` names it and the object
    /// (`UploadPart 3 of bucket/key`).
    S3 { op: String, fault: S3Fault },
    /// The source file is gone or is no longer the version the task names.
    Lost(String),
    /// Worth retrying, not an SFTP or S3 request failure (e.g. a short read).
    Transient(String),
    /// Retrying cannot help (e.g. an unusable object key).
    Permanent(String),
}

impl fmt::Display for TransferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransferError::Sftp { op, err } => write!(f, "SFTP {op}: {err}"),
            TransferError::S3 { op, fault } => write!(f, "S3 {op}: {}", fault.detail),
            TransferError::Lost(m) | TransferError::Transient(m) | TransferError::Permanent(m) => {
                f.write_str(m)
            }
        }
    }
}

impl StdError for TransferError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            TransferError::Sftp { err, .. } => Some(err),
            _ => None,
        }
    }
}

impl TransferError {
    pub(crate) fn sftp(op: impl Into<String>, err: SftpError) -> Self {
        TransferError::Sftp { op: op.into(), err }
    }

    /// Flattens an SDK error of the S3 operation `op`.
    pub(crate) fn s3<E>(op: impl Into<String>, err: &SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + StdError + 'static,
    {
        TransferError::S3 {
            op: op.into(),
            fault: S3Fault::from_sdk(err),
        }
    }
}

/// How an S3 request failed, independent of the SDK's types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum S3FaultKind {
    /// No answer in time (connect or attempt timeout).
    Timeout,
    /// The request never got an HTTP response: refused, reset, DNS, TLS.
    Connection,
    /// The server answered with an error (see `status` and `code`).
    Response,
    /// The SDK could not build the request (bad input or configuration).
    Construction,
    Other,
}

/// A flattened S3 SDK error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct S3Fault {
    pub kind: S3FaultKind,
    /// HTTP status of the error response, if one arrived.
    pub status: Option<u16>,
    /// S3 error code (`NoSuchBucket`), if the response carried one.
    pub code: Option<String>,
    /// Operator-facing text: `NoSuchBucket: The specified bucket does not
    /// exist`, `connection refused`, `timed out`.
    pub detail: String,
}

impl S3Fault {
    pub(crate) fn from_sdk<E>(err: &SdkError<E, HttpResponse>) -> S3Fault
    where
        E: ProvideErrorMetadata + StdError + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_owned);
        let kind = match err {
            SdkError::TimeoutError(_) => S3FaultKind::Timeout,
            SdkError::DispatchFailure(d) if d.is_timeout() => S3FaultKind::Timeout,
            SdkError::DispatchFailure(_) => S3FaultKind::Connection,
            SdkError::ResponseError(_) | SdkError::ServiceError(_) => S3FaultKind::Response,
            SdkError::ConstructionFailure(_) => S3FaultKind::Construction,
            _ => S3FaultKind::Other,
        };
        let detail = match (&kind, &code) {
            (S3FaultKind::Timeout, _) => "timed out".to_owned(),
            (S3FaultKind::Response, Some(code)) => match err.message() {
                Some(message) if !message.is_empty() => format!("{code}: {message}"),
                _ => code.clone(),
            },
            (S3FaultKind::Response, None) => match status {
                Some(status) => format!("HTTP {status}"),
                None => error_chain(err),
            },
            (S3FaultKind::Connection, _) => innermost(err),
            _ => error_chain(err),
        };
        S3Fault {
            kind,
            status,
            code,
            detail,
        }
    }
}

/// The failure reported to the coordinator for `err`.
pub(crate) fn classify(err: &TransferError) -> proto::TaskFailure {
    use proto::FailureKind as K;
    let kind = match err {
        TransferError::Sftp { err, .. } => match err {
            SftpError::NotFound(_) => K::Lost,
            // Connection, timeout and server failures are transient; so are
            // permission denied (producers often write first and chmod
            // after), host key and login problems: per-server configuration
            // an operator fixes. Backoff and max_attempts bound the retries.
            _ => K::Transient,
        },
        TransferError::S3 { fault, .. } => s3_kind(fault),
        TransferError::Lost(_) => K::Lost,
        TransferError::Transient(_) => K::Transient,
        TransferError::Permanent(_) => K::Permanent,
    };
    proto::TaskFailure {
        kind: kind as i32,
        message: err.to_string(),
    }
}

fn s3_kind(fault: &S3Fault) -> proto::FailureKind {
    use proto::FailureKind as K;
    if let Some(code) = &fault.code {
        if PERMANENT_S3_CODES.contains(&code.as_str()) {
            return K::Permanent;
        }
        if AGENT_S3_CODES.contains(&code.as_str()) {
            return K::Agent;
        }
    }
    match fault.kind {
        S3FaultKind::Timeout | S3FaultKind::Connection | S3FaultKind::Other => K::Transient,
        S3FaultKind::Construction => K::Permanent,
        S3FaultKind::Response => match fault.status {
            Some(401 | 403) => K::Agent,
            // 5xx, 408 request timeout, 429 slow down, 404 NoSuchUpload (the
            // upload was aborted under us: start over), other client errors.
            _ => K::Transient,
        },
    }
}

/// All messages of an error and its sources, de-duplicated, joined by ": ".
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// The most specific message of an error chain (for connection errors the
/// OS error, e.g. "Connection refused (os error 111)"), lower-cased at the
/// start like the rest of ferry's messages.
fn innermost(err: &(dyn StdError + 'static)) -> String {
    let mut last = err;
    while let Some(source) = last.source() {
        last = source;
    }
    let text = last.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => error_chain(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::FailureKind as K;

    fn kind(err: &TransferError) -> K {
        K::try_from(classify(err).kind).expect("valid kind")
    }

    fn s3(kind: S3FaultKind, status: Option<u16>, code: Option<&str>) -> TransferError {
        TransferError::S3 {
            op: "UploadPart 3 of b/k".into(),
            fault: S3Fault {
                kind,
                status,
                code: code.map(str::to_owned),
                detail: "detail".into(),
            },
        }
    }

    #[test]
    fn sftp_errors() {
        let gone = TransferError::sftp("open /in/a", SftpError::NotFound("/in/a".into()));
        assert_eq!(kind(&gone), K::Lost);
        assert_eq!(
            classify(&gone).message,
            "SFTP open /in/a: no such file or directory: /in/a"
        );
        let denied = TransferError::sftp("open /in/a", SftpError::PermissionDenied("/in/a".into()));
        assert_eq!(kind(&denied), K::Transient);
        for err in [
            SftpError::Timeout("sftp request"),
            SftpError::Disconnected("x".into()),
            SftpError::Connect("refused".into()),
            SftpError::Failure {
                path: "/in/a".into(),
                message: "io".into(),
            },
        ] {
            assert_eq!(kind(&TransferError::sftp("read", err)), K::Transient);
        }
    }

    #[test]
    fn s3_errors() {
        use S3FaultKind::*;
        // The agent's credentials, their permissions or its clock: its fault.
        for code in [
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "RequestTimeTooSkewed",
        ] {
            assert_eq!(
                kind(&s3(Response, Some(403), Some(code))),
                K::Agent,
                "{code}"
            );
        }
        assert_eq!(kind(&s3(Response, Some(403), None)), K::Agent);
        assert_eq!(kind(&s3(Response, Some(401), None)), K::Agent);
        // The destination itself: no retry helps.
        assert_eq!(
            kind(&s3(Response, Some(404), Some("NoSuchBucket"))),
            K::Permanent
        );
        assert_eq!(
            kind(&s3(Response, Some(400), Some("KeyTooLongError"))),
            K::Permanent
        );
        assert_eq!(
            kind(&s3(Response, Some(503), Some("SlowDown"))),
            K::Transient
        );
        assert_eq!(kind(&s3(Response, Some(500), None)), K::Transient);
        assert_eq!(
            kind(&s3(Response, Some(404), Some("NoSuchUpload"))),
            K::Transient
        );
        assert_eq!(kind(&s3(Timeout, None, None)), K::Transient);
        assert_eq!(kind(&s3(Connection, None, None)), K::Transient);
        assert_eq!(kind(&s3(Construction, None, None)), K::Permanent);
        assert_eq!(
            classify(&s3(Connection, None, None)).message,
            "S3 UploadPart 3 of b/k: detail"
        );
    }

    #[test]
    fn plain_kinds() {
        assert_eq!(kind(&TransferError::Lost("gone".into())), K::Lost);
        assert_eq!(
            kind(&TransferError::Transient("short".into())),
            K::Transient
        );
        assert_eq!(
            kind(&TransferError::Permanent("bad key".into())),
            K::Permanent
        );
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl StdError for Layer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn StdError + 'static))
        }
    }

    #[test]
    fn error_texts() {
        let err = Layer(
            "dispatch failure",
            Some(Box::new(Layer(
                "io error",
                Some(Box::new(Layer("Connection refused (os error 111)", None))),
            ))),
        );
        assert_eq!(innermost(&err), "connection refused (os error 111)");
        assert_eq!(
            error_chain(&err),
            "dispatch failure: io error: Connection refused (os error 111)"
        );
        let repeated = Layer("timeout: deadline", Some(Box::new(Layer("deadline", None))));
        assert_eq!(error_chain(&repeated), "timeout: deadline");
    }
}
