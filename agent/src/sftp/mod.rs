//! SFTP access for the agent: one authenticated SSH connection with one SFTP
//! channel per [`SftpSession`], host keys pinned by SHA256 fingerprint.
//!
//! What lives where:
//! - [`connect`](connect()) / [`probe_host_key`] / [`fingerprint`]: the SSH side
//!   (russh), in `connect.rs`.
//! - decoded private keys, kept per key text and passphrase so a
//!   passphrase-protected key is not derived again at every login, in
//!   `keys.rs`.
//! - [`SftpSession`]: the file operations the agent needs (listing, stat,
//!   read, post-actions), in `session.rs`; directory walking in `listing.rs`;
//!   the sequential file reader in `reader.rs`.
//! - [`SftpError`]: the one error type callers branch on, and the one place
//!   russh / russh-sftp errors are classified, in `error.rs`.
//!
//! The SFTP channel is driven through russh-sftp's [`RawSftpSession`] rather
//! than its high-level `SftpSession`: the high-level `read_dir` buffers a whole
//! directory (quadratically) before returning, and its `File` reports server
//! errors as bare `io::Error::other(message)`, losing the status code that
//! separates "file vanished" from "transient failure".
//!
//! [`RawSftpSession`]: russh_sftp::client::RawSftpSession

mod connect;
mod error;
mod keys;
mod listing;
mod session;

use std::fmt;
use std::time::Duration;

pub(crate) use connect::{connect, probe_host_key};
pub(crate) use error::SftpError;
pub(crate) use listing::{DEFAULT_MAX_ENTRIES, ListingLimits};
pub(crate) use session::{FileKind, FileStat, RemoteFile, SftpSession};

/// Where and how to log in to one SFTP server.
#[derive(Clone)]
pub(crate) struct ServerEndpoint {
    pub hostname: String,
    pub port: u16,
    pub username: String,
    pub auth: Auth,
    /// Pinned host key as `ssh-keygen -lf` prints it: `SHA256:<base64, no
    /// padding>`. Empty means "nothing pinned": the connection is refused with
    /// [`SftpError::HostKeyUnknown`] (trust-on-first-use is the caller's
    /// explicit decision, via [`probe_host_key`]).
    pub host_key_fingerprint: String,
}

/// Login secret. `Debug` never prints the secret itself.
#[derive(Clone)]
pub(crate) enum Auth {
    Password(String),
    /// OpenSSH (`-----BEGIN OPENSSH PRIVATE KEY-----`), PKCS#1/PKCS#8 PEM or
    /// PuTTY key text, optionally encrypted with `passphrase`.
    PrivateKey {
        pem: String,
        passphrase: Option<String>,
    },
}

impl fmt::Debug for ServerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerEndpoint")
            .field("hostname", &self.hostname)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("auth", &self.auth)
            .field("host_key_fingerprint", &self.host_key_fingerprint)
            .finish()
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Password(_) => f.write_str("Password(<redacted>)"),
            Auth::PrivateKey { passphrase, .. } => f
                .debug_struct("PrivateKey")
                .field("pem", &"<redacted>")
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

/// Time limits for one SFTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// Whole connection setup: DNS, TCP, SSH handshake, authentication and
    /// SFTP initialisation.
    pub connect: Duration,
    /// One SFTP request/response round trip. russh-sftp counts whole
    /// seconds: sub-second values are rounded up.
    pub request: Duration,
    /// russh inactivity timeout. While keepalives are answered the
    /// connection never counts as inactive, so with `keepalive` set this only
    /// fires for a peer that stopped answering; closing healthy sessions that
    /// sat unused is the pool's job (see [`SftpSession::idle_for`]).
    pub idle: Duration,
    /// Interval of SSH keepalives on a quiet connection; three unanswered
    /// keepalives close it. Also keeps NAT/firewall state alive.
    pub keepalive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(30),
            idle: Duration::from_secs(300),
            keepalive: Duration::from_secs(15),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_secrets() {
        let ep = ServerEndpoint {
            hostname: "sftp.example".into(),
            port: 22,
            username: "alice".into(),
            auth: Auth::Password("hunter2".into()),
            host_key_fingerprint: "SHA256:abc".into(),
        };
        let text = format!("{ep:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("alice") && text.contains("<redacted>"),
            "{text}"
        );

        let key = Auth::PrivateKey {
            pem: "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret".into(),
            passphrase: Some("opensesame".into()),
        };
        let text = format!("{key:?}");
        assert!(
            !text.contains("secret") && !text.contains("opensesame"),
            "{text}"
        );
        let no_pass = Auth::PrivateKey {
            pem: "x".into(),
            passphrase: None,
        };
        assert!(format!("{no_pass:?}").contains("passphrase: None"));
    }
}
