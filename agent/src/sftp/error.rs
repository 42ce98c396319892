//! [`SftpError`], the error callers of the `sftp` module branch on, and the
//! single place where russh and russh-sftp errors are classified into it.

use russh_sftp::client::error::Error as SftpLibError;
use russh_sftp::protocol::StatusCode;

/// Why an SFTP operation failed, phrased for an operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SftpError {
    /// The server presented a different host key than the pinned one.
    #[error("host key mismatch: expected {expected}, server presented {actual}")]
    HostKeyMismatch { expected: String, actual: String },
    /// No host key is pinned for this server.
    #[error(
        "host key not pinned: server presented {actual}; pin it (or explicitly allow trust on first use)"
    )]
    HostKeyUnknown { actual: String },
    /// The server rejected the credentials.
    #[error("authentication failed for user {user} (server accepts: {methods})")]
    AuthFailed { user: String, methods: String },
    /// The configured private key cannot be used (corrupt, unsupported or a
    /// wrong/missing passphrase).
    #[error("cannot use the configured private key: {0}")]
    InvalidKey(String),
    /// The connection names no password or private key (a coordinator bug).
    #[error("no credential configured for this server")]
    NoCredential,
    /// DNS failure, refused or unreachable TCP, or no SSH session within the
    /// connect timeout.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The path does not exist (SFTP `NO_SUCH_FILE`).
    #[error("no such file or directory: {0}")]
    NotFound(String),
    /// The login may not do this to the path (SFTP `PERMISSION_DENIED`).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Nothing arrived in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The SSH connection or SFTP channel went away.
    #[error("connection lost: {0}")]
    Disconnected(String),
    /// The server answered with its generic failure status (`FAILURE`),
    /// e.g. a full disk, a rename target that exists, or an I/O error.
    #[error("{path}: server reported failure: {message}")]
    Failure { path: String, message: String },
    /// Something the server said makes no sense to us, or it cannot speak
    /// what we need (no common algorithm, no SFTP subsystem, ...).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A listing went past one of its bounds (`listing::ListingLimits`): the
    /// server's directory does not end, or is larger than the agent takes.
    #[error("{0}")]
    ListingLimit(String),
}

impl SftpError {
    /// True when the session that produced this error should not be reused
    /// (return it to no pool; open a new one).
    pub(crate) fn breaks_session(&self) -> bool {
        matches!(
            self,
            SftpError::Connect(_)
                | SftpError::Timeout(_)
                | SftpError::Disconnected(_)
                | SftpError::Protocol(_)
        )
    }
}
/// A failure from either library, classified by [`classify`].
pub(crate) enum LibError {
    Ssh(russh::Error),
    Sftp(SftpLibError),
}

impl From<russh::Error> for LibError {
    fn from(err: russh::Error) -> Self {
        LibError::Ssh(err)
    }
}

impl From<SftpLibError> for LibError {
    fn from(err: SftpLibError) -> Self {
        LibError::Sftp(err)
    }
}

/// Maps a russh / russh-sftp error to [`SftpError`]. `path` names what the
/// failed operation was about (a remote path, or `host:port` for
/// connection-level errors).
///
/// Host key rejection (`russh::Error::UnknownKey`) is turned into
/// `HostKeyMismatch` by the connect code, which knows both fingerprints;
/// here it can only become a protocol error.
pub(crate) fn classify(err: impl Into<LibError>, path: &str) -> SftpError {
    match err.into() {
        LibError::Ssh(err) => classify_ssh(err, path),
        LibError::Sftp(err) => classify_sftp(err, path),
    }
}

fn classify_ssh(err: russh::Error, what: &str) -> SftpError {
    use russh::Error as E;
    match err {
        E::ConnectionTimeout => SftpError::Timeout("SSH connection"),
        E::KeepaliveTimeout => SftpError::Timeout("SSH keepalive replies"),
        E::InactivityTimeout => SftpError::Timeout("activity on the SSH connection"),
        E::Elapsed(_) => SftpError::Timeout("SSH reply"),
        E::IO(io) => SftpError::Disconnected(format!("{what}: {io}")),
        E::Disconnect
        | E::HUP
        | E::SendError
        | E::RecvError
        | E::Join(_)
        | E::WrongChannel
        | E::PacketAuth
        | E::DecryptionError => SftpError::Disconnected(format!("{what}: {err}")),
        E::ChannelOpenFailure(reason) => SftpError::Connect(format!(
            "{what}: server refused to open an SSH channel ({reason:?})"
        )),
        E::NoCommonAlgo { kind, theirs, .. } => SftpError::Protocol(format!(
            "{what}: no {kind:?} algorithm in common with the server (server offers: {})",
            theirs.join(",")
        )),
        E::Version => SftpError::Protocol(format!(
            "{what}: no SSH version banner (is this an SSH server?)"
        )),
        E::UnknownKey => SftpError::Protocol(format!("{what}: server host key rejected")),
        E::Keys(key) => SftpError::InvalidKey(key.to_string()),
        other => SftpError::Protocol(format!("{what}: {other}")),
    }
}

fn classify_sftp(err: SftpLibError, path: &str) -> SftpError {
    match err {
        SftpLibError::Status(status) => match status.status_code {
            StatusCode::NoSuchFile => SftpError::NotFound(path.to_owned()),
            StatusCode::PermissionDenied => SftpError::PermissionDenied(path.to_owned()),
            StatusCode::Failure => SftpError::Failure {
                path: path.to_owned(),
                message: if status.error_message.is_empty() {
                    "failure".to_owned()
                } else {
                    status.error_message
                },
            },
            StatusCode::NoConnection | StatusCode::ConnectionLost => {
                SftpError::Disconnected(format!("{path}: {}", status.error_message))
            }
            StatusCode::Ok
            | StatusCode::Eof
            | StatusCode::BadMessage
            | StatusCode::OpUnsupported => SftpError::Protocol(format!(
                "{path}: unexpected status {}: {}",
                status.status_code, status.error_message
            )),
        },
        SftpLibError::Timeout => SftpError::Timeout("sftp request"),
        SftpLibError::IO(message) => SftpError::Disconnected(format!("{path}: {message}")),
        // russh-sftp reports a dead channel only through these texts:
        // "session closed" (request on a closed channel), "sender dropped"
        // (reader task ended while waiting), "SendError: ..." / "RecvError: ...".
        SftpLibError::UnexpectedBehavior(message)
            if ["session closed", "sender dropped", "SendError", "RecvError"]
                .iter()
                .any(|needle| message.contains(needle)) =>
        {
            SftpError::Disconnected(format!("{path}: SFTP channel closed ({message})"))
        }
        // Client-side enforcement of the server's `limits@openssh.com`
        // (e.g. too many open handles): a busy session, not a broken one.
        SftpLibError::Limited(message) => SftpError::Failure {
            path: path.to_owned(),
            message,
        },
        SftpLibError::UnexpectedBehavior(message) => {
            SftpError::Protocol(format!("{path}: {message}"))
        }
        SftpLibError::UnexpectedPacket => {
            SftpError::Protocol(format!("{path}: unexpected reply packet"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::FailureKind;
    use russh_sftp::protocol::Status;

    fn status(code: StatusCode, message: &str) -> SftpLibError {
        SftpLibError::Status(Status {
            id: 7,
            status_code: code,
            error_message: message.to_owned(),
            language_tag: "en".to_owned(),
        })
    }

    /// The one classification of failures (`transfer::failure::classify`).
    fn kind(err: SftpError) -> FailureKind {
        let failure = crate::transfer::failure::classify(
            &crate::transfer::failure::TransferError::sftp("op", err),
        );
        FailureKind::try_from(failure.kind).unwrap()
    }

    #[test]
    fn sftp_status_codes_map_to_what_callers_branch_on() {
        assert_eq!(
            classify(status(StatusCode::NoSuchFile, "No such file"), "/in/a.csv"),
            SftpError::NotFound("/in/a.csv".into())
        );
        assert_eq!(
            classify(status(StatusCode::PermissionDenied, "denied"), "/in"),
            SftpError::PermissionDenied("/in".into())
        );
        let failure = classify(status(StatusCode::Failure, "disk full"), "/out/x");
        assert_eq!(
            failure.to_string(),
            "/out/x: server reported failure: disk full"
        );
        assert_eq!(kind(failure.clone()), FailureKind::Transient);
        assert!(!failure.breaks_session());
        assert!(matches!(
            classify(status(StatusCode::OpUnsupported, "nope"), "/x"),
            SftpError::Protocol(_)
        ));
        assert_eq!(
            classify(SftpLibError::Timeout, "/x"),
            SftpError::Timeout("sftp request")
        );
        assert!(matches!(
            classify(
                SftpLibError::UnexpectedBehavior("session closed".into()),
                "/x"
            ),
            SftpError::Disconnected(_)
        ));
    }

    #[test]
    fn ssh_errors_map_to_transient_or_permanent() {
        assert_eq!(
            kind(classify(russh::Error::KeepaliveTimeout, "h:22")),
            FailureKind::Transient
        );
        assert_eq!(
            kind(classify(russh::Error::HUP, "h:22")),
            FailureKind::Transient
        );
        let version = classify(russh::Error::Version, "h:22");
        assert!(version.breaks_session());
    }

    #[test]
    fn operator_texts() {
        let mismatch = SftpError::HostKeyMismatch {
            expected: "SHA256:aaa".into(),
            actual: "SHA256:bbb".into(),
        };
        assert_eq!(
            mismatch.to_string(),
            "host key mismatch: expected SHA256:aaa, server presented SHA256:bbb"
        );
        // Per-server configuration an operator fixes: retried within max_attempts.
        assert_eq!(kind(mismatch), FailureKind::Transient);
        let auth = SftpError::AuthFailed {
            user: "alice".into(),
            methods: "publickey,password".into(),
        };
        assert_eq!(
            auth.to_string(),
            "authentication failed for user alice (server accepts: publickey,password)"
        );
        assert_eq!(kind(auth), FailureKind::Transient);
    }
}
