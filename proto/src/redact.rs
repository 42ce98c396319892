//! Hand-written `Debug` for the messages that carry an SSH secret, so that no
//! log line or error built with `{:?}` can print one. `build.rs` turns the
//! generated `Debug` off for exactly these messages; every message embedding
//! them (`ServerConnection`, `PollAssignment`, `TaskAssignment`,
//! `PostActionRequest`, `CoordinatorMessage`, `AddServerRequest`) derives its
//! `Debug` from these, so it is redacted too.

use std::fmt;

use crate::generated::{self as proto, update_server_request};

const REDACTED: &str = "<redacted>";

/// `<redacted>` for a set secret, `""` for an empty one (telling them apart
/// helps debugging and reveals nothing).
fn secret(s: &str) -> &'static str {
    if s.is_empty() { "" } else { REDACTED }
}

impl fmt::Debug for proto::Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Password")
            .field("password", &secret(&self.password))
            .finish()
    }
}

impl fmt::Debug for proto::PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("pem", &secret(&self.pem))
            .field("passphrase", &secret(&self.passphrase))
            .finish()
    }
}

impl fmt::Debug for update_server_request::Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Password(p) => f.debug_tuple("Password").field(p).finish(),
            Self::PrivateKey(k) => f.debug_tuple("PrivateKey").field(k).finish(),
            Self::Passphrase(p) => f.debug_tuple("Passphrase").field(&secret(p)).finish(),
        }
    }
}

impl fmt::Debug for proto::UpdateServerRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateServerRequest")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("hostname", &self.hostname)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("host_key_fingerprint", &self.host_key_fingerprint)
            .field("trust_host_key", &self.trust_host_key)
            .field("site", &self.site)
            .field("max_sessions", &self.max_sessions)
            .field("enabled", &self.enabled)
            .field("auth", &self.auth)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generated::{coordinator_message::Body, server_connection};

    const PASSWORD: &str = "pw-SECRET-1";
    const PEM: &str =
        "-----BEGIN OPENSSH PRIVATE KEY-----\nKEY-SECRET-2\n-----END OPENSSH PRIVATE KEY-----\n";
    const PASSPHRASE: &str = "pp-SECRET-3";

    fn password() -> proto::Password {
        proto::Password {
            password: PASSWORD.into(),
        }
    }

    fn key() -> proto::PrivateKey {
        proto::PrivateKey {
            pem: PEM.into(),
            passphrase: PASSPHRASE.into(),
        }
    }

    fn connections() -> Vec<proto::ServerConnection> {
        [
            server_connection::Auth::Password(password()),
            server_connection::Auth::PrivateKey(key()),
        ]
        .into_iter()
        .map(|auth| proto::ServerConnection {
            server_id: 7,
            name: "s1".into(),
            hostname: "sftp.example.com".into(),
            auth: Some(auth),
            ..Default::default()
        })
        .collect()
    }

    fn assert_redacted(what: &str, text: &str) {
        for secret in [PASSWORD, "KEY-SECRET-2", PASSPHRASE] {
            assert!(!text.contains(secret), "{what} prints a secret: {text}");
        }
        assert!(
            text.contains(REDACTED),
            "{what} hides that a secret is set: {text}"
        );
    }

    #[test]
    fn no_message_prints_a_secret() {
        let mut printed: Vec<(&str, String)> = vec![
            ("Password", format!("{:?}", password())),
            ("PrivateKey", format!("{:?}", key())),
            ("PrivateKey alternate", format!("{:#?}", key())),
        ];
        for conn in connections() {
            printed.push(("ServerConnection", format!("{conn:?}")));
            let poll = proto::PollAssignment {
                server: Some(conn.clone()),
                watches: vec![],
            };
            printed.push(("PollAssignment", format!("{poll:?}")));
            let task = proto::TaskAssignment {
                file_id: 1,
                source: Some(conn.clone()),
                ..Default::default()
            };
            printed.push(("TaskAssignment", format!("{task:?}")));
            let post = proto::PostActionRequest {
                file_id: 1,
                source: Some(conn.clone()),
                ..Default::default()
            };
            printed.push(("PostActionRequest", format!("{post:?}")));
            for body in [
                Body::PollAssignment(poll),
                Body::TaskAssignment(task),
                Body::PostAction(post),
            ] {
                let msg = proto::CoordinatorMessage { body: Some(body) };
                printed.push(("CoordinatorMessage", format!("{msg:?}")));
            }
        }
        for auth in [
            proto::add_server_request::Auth::Password(password()),
            proto::add_server_request::Auth::PrivateKey(key()),
        ] {
            let add = proto::AddServerRequest {
                name: "s1".into(),
                auth: Some(auth),
                ..Default::default()
            };
            printed.push(("AddServerRequest", format!("{add:?}")));
        }
        for auth in [
            update_server_request::Auth::Password(password()),
            update_server_request::Auth::PrivateKey(key()),
            update_server_request::Auth::Passphrase(PASSPHRASE.into()),
        ] {
            let update = proto::UpdateServerRequest {
                id: 3,
                auth: Some(auth),
                ..Default::default()
            };
            printed.push(("UpdateServerRequest", format!("{update:?}")));
            printed.push(("UpdateServerRequest alternate", format!("{update:#?}")));
        }
        for (what, text) in &printed {
            assert_redacted(what, text);
        }
    }

    #[test]
    fn redacted_debug_still_shows_the_rest() {
        let update = proto::UpdateServerRequest {
            id: 3,
            hostname: Some("sftp.example.com".into()),
            auth: Some(update_server_request::Auth::Passphrase(String::new())),
            ..Default::default()
        };
        let text = format!("{update:?}");
        assert!(text.contains("sftp.example.com"), "{text}");
        assert!(
            text.contains("Passphrase(\"\")"),
            "an empty secret shows as empty: {text}"
        );
    }
}
