//! Encryption at rest of SFTP credentials (AES-256-GCM with the operator's key).
//!
//! A sealed credential is bound to its row: the associated data is the server
//! id and the fields that decide where the credential goes ([`Binding`]), so a
//! row repointed (or given another row's ciphertext) outside ferry cannot be
//! opened. Rows sealed before that (format 1, no associated data) are re-sealed
//! at coordinator start (`registry::reseal_legacy`).
//!
//! **Invariant:** plaintext credentials exist only in memory, on their way to the
//! agent that needs them; they are never returned by the admin API nor logged.

use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::Context;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The SFTP credential of one server.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum Credential {
    Password(String),
    PrivateKey {
        pem: String,
        passphrase: Option<String>,
    },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Password(_) => f.write_str("Password(<redacted>)"),
            Credential::PrivateKey { passphrase, .. } => write!(
                f,
                "PrivateKey(<redacted>, passphrase: {})",
                if passphrase.is_some() {
                    "<redacted>"
                } else {
                    "none"
                }
            ),
        }
    }
}

impl Credential {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Credential::Password(_) => "password",
            Credential::PrivateKey { .. } => "private_key",
        }
    }

    pub(crate) fn has_passphrase(&self) -> bool {
        matches!(
            self,
            Credential::PrivateKey {
                passphrase: Some(_),
                ..
            }
        )
    }
}

/// The row fields a sealed credential is bound to (AEAD associated data):
/// the server's id and everything that decides where the credential goes.
/// Changing any of them outside ferry makes the credential unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Binding<'a> {
    pub server_id: i64,
    pub hostname: &'a str,
    pub port: i32,
    pub username: &'a str,
    pub host_key_fingerprint: &'a str,
    /// Which agents receive the credential.
    pub site: &'a str,
}

/// Domain separation of the v2 associated data.
const AAD_CONTEXT: &[u8] = b"ferry.server-credential.v2";

impl Binding<'_> {
    /// `context || (u32 big-endian length || bytes)` per field, in a fixed
    /// order: no two different bindings encode the same.
    fn associated_data(&self) -> Vec<u8> {
        let fields: [&[u8]; 6] = [
            &self.server_id.to_be_bytes(),
            self.hostname.as_bytes(),
            &self.port.to_be_bytes(),
            self.username.as_bytes(),
            self.host_key_fingerprint.as_bytes(),
            self.site.as_bytes(),
        ];
        let mut out = AAD_CONTEXT.to_vec();
        for field in fields {
            // Every field is far below 4 GiB (validated, and Postgres rows are small).
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field);
        }
        out
    }
}

/// How a `servers.secret_ciphertext` is sealed (`servers.secret_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SealFormat {
    /// Before migration 0005: `nonce || ciphertext+tag`, no associated data.
    /// Read only to re-seal at start ([`SecretBox::open_legacy`]).
    Legacy,
    /// `0x02 || nonce || ciphertext+tag`, bound to its row ([`Binding`]).
    Bound,
}

impl SealFormat {
    pub(crate) const LEGACY: i16 = 1;
    pub(crate) const BOUND: i16 = 2;

    pub(crate) fn from_column(value: i16) -> Result<Self, SealError> {
        match value {
            Self::LEGACY => Ok(SealFormat::Legacy),
            Self::BOUND => Ok(SealFormat::Bound),
            other => Err(SealError::UnknownFormat(other)),
        }
    }
}

/// Why a stored credential could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SealError {
    #[error("the stored credential is truncated")]
    Truncated,
    #[error("the stored credential has unknown format {0}")]
    UnknownFormat(i16),
    #[error(
        "the stored credential is sealed without its connection binding (format 1): \
         a coordinator re-seals such rows when it starts"
    )]
    Unbound,
    /// Authentication failed: the row's bound fields changed, the ciphertext
    /// belongs to another row, or the key is not the one it was sealed with.
    #[error("it does not match the row's connection fields or the secret key")]
    Mismatch,
    #[error("decode the credential: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Encrypts and decrypts credentials with one 256-bit key.
#[derive(Clone)]
pub(crate) struct SecretBox {
    cipher: Aes256Gcm,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBox(<key>)")
    }
}

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// First byte of a [`SealFormat::Bound`] blob.
const BOUND_PREFIX: u8 = 2;

impl SecretBox {
    /// Reads the key file: 32 raw bytes, 64 hex characters, or base64 of 32 bytes.
    pub(crate) fn from_key_file(path: &Path) -> anyhow::Result<Self> {
        let raw = std::fs::read(path)
            .with_context(|| format!("read secret key file {}", path.display()))?;
        let key = parse_key(&raw).with_context(|| format!("secret key file {}", path.display()))?;
        Ok(Self::from_key(&key))
    }

    pub(crate) fn from_key(key: &[u8; 32]) -> Self {
        SecretBox {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// Seals `credential` for the row described by `binding`
    /// ([`SealFormat::Bound`]): `0x02 || nonce || ciphertext+tag` of the JSON
    /// encoding, with the binding as associated data.
    pub(crate) fn seal(
        &self,
        credential: &Credential,
        binding: &Binding<'_>,
    ) -> anyhow::Result<Vec<u8>> {
        let plain = serde_json::to_vec(credential).context("encode credential")?;
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let aad = binding.associated_data();
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce_bytes),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .map_err(|_| anyhow::anyhow!("encrypt credential"))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(BOUND_PREFIX);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a credential stored in `format` for the row described by
    /// `binding`. Only [`SealFormat::Bound`] credentials are handed out.
    pub(crate) fn open(
        &self,
        format: SealFormat,
        sealed: &[u8],
        binding: &Binding<'_>,
    ) -> Result<Credential, SealError> {
        if format != SealFormat::Bound {
            return Err(SealError::Unbound);
        }
        let body = match sealed.split_first() {
            Some((&BOUND_PREFIX, body)) => body,
            Some((&other, _)) => return Err(SealError::UnknownFormat(i16::from(other))),
            None => return Err(SealError::Truncated),
        };
        if body.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::Truncated);
        }
        let (nonce, body) = body.split_at(NONCE_LEN);
        let aad = binding.associated_data();
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Mismatch)?;
        Ok(serde_json::from_slice(&plain)?)
    }

    /// Opens a [`SealFormat::Legacy`] credential (no associated data), only
    /// to re-seal it bound to its row.
    pub(crate) fn open_legacy(&self, sealed: &[u8]) -> Result<Credential, SealError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::Truncated);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), body)
            .map_err(|_| SealError::Mismatch)?;
        Ok(serde_json::from_slice(&plain)?)
    }
}

fn parse_key(raw: &[u8]) -> anyhow::Result<[u8; 32]> {
    if let Ok(key) = <[u8; 32]>::try_from(raw) {
        return Ok(key);
    }
    let text = std::str::from_utf8(raw)
        .context("must be 32 raw bytes, 64 hex characters or base64 of 32 bytes")?
        .trim();
    let decoded = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        hex::decode(text)?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .context("must be 32 raw bytes, 64 hex characters or base64 of 32 bytes")?
    };
    decoded
        .try_into()
        .map_err(|v: Vec<u8>| anyhow::anyhow!("key is {} bytes, expected 32", v.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BINDING: Binding<'static> = Binding {
        server_id: 7,
        hostname: "sftp.example.com",
        port: 22,
        username: "ferry",
        host_key_fingerprint: "SHA256:abc",
        site: "default",
    };

    fn key_credential() -> Credential {
        Credential::PrivateKey {
            pem: "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
            passphrase: Some("pp".into()),
        }
    }

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        let sb = SecretBox::from_key(&[7u8; 32]);
        let cred = key_credential();
        let mut sealed = sb.seal(&cred, &BINDING).unwrap();
        assert_eq!(sealed[0], BOUND_PREFIX);
        assert!(!String::from_utf8_lossy(&sealed).contains("OPENSSH"));
        assert_eq!(sb.open(SealFormat::Bound, &sealed, &BINDING).unwrap(), cred);
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(matches!(
            sb.open(SealFormat::Bound, &sealed, &BINDING),
            Err(SealError::Mismatch)
        ));
        assert!(
            SecretBox::from_key(&[8u8; 32])
                .open(
                    SealFormat::Bound,
                    &sb.seal(&cred, &BINDING).unwrap(),
                    &BINDING
                )
                .is_err()
        );
    }

    #[test]
    fn any_changed_bound_field_refuses_to_open() {
        let sb = SecretBox::from_key(&[7u8; 32]);
        let sealed = sb
            .seal(&Credential::Password("hunter2".into()), &BINDING)
            .unwrap();
        let changed = [
            (
                "server id",
                Binding {
                    server_id: 8,
                    ..BINDING
                },
            ),
            (
                "hostname",
                Binding {
                    hostname: "evil.example.com",
                    ..BINDING
                },
            ),
            (
                "port",
                Binding {
                    port: 2222,
                    ..BINDING
                },
            ),
            (
                "username",
                Binding {
                    username: "root",
                    ..BINDING
                },
            ),
            (
                "host key",
                Binding {
                    host_key_fingerprint: "SHA256:evil",
                    ..BINDING
                },
            ),
            (
                "site",
                Binding {
                    site: "elsewhere",
                    ..BINDING
                },
            ),
        ];
        for (what, binding) in changed {
            assert!(
                matches!(
                    sb.open(SealFormat::Bound, &sealed, &binding),
                    Err(SealError::Mismatch)
                ),
                "a changed {what} still opens the credential"
            );
        }
    }

    #[test]
    fn associated_data_is_unambiguous() {
        // Moving bytes between adjacent fields changes the encoding.
        let a = Binding {
            hostname: "ab",
            username: "c",
            ..BINDING
        };
        let b = Binding {
            hostname: "a",
            username: "bc",
            ..BINDING
        };
        assert_ne!(a.associated_data(), b.associated_data());
    }

    #[test]
    fn legacy_blobs_open_only_for_resealing() {
        let sb = SecretBox::from_key(&[7u8; 32]);
        let cred = Credential::Password("hunter2".into());
        // The pre-0005 format: nonce || ciphertext+tag without associated data.
        let nonce = [3u8; NONCE_LEN];
        let mut legacy = nonce.to_vec();
        legacy.extend(
            sb.cipher
                .encrypt(
                    Nonce::from_slice(&nonce),
                    serde_json::to_vec(&cred).unwrap().as_slice(),
                )
                .unwrap(),
        );
        assert_eq!(sb.open_legacy(&legacy).unwrap(), cred);
        assert!(matches!(
            sb.open(SealFormat::Legacy, &legacy, &BINDING),
            Err(SealError::Unbound)
        ));
        // A legacy blob stored as format 2 does not open either.
        assert!(sb.open(SealFormat::Bound, &legacy, &BINDING).is_err());
        // Nor does a bound blob pass for a legacy one.
        let bound = sb.seal(&cred, &BINDING).unwrap();
        assert!(sb.open_legacy(&bound).is_err());
        assert!(matches!(
            SealFormat::from_column(9),
            Err(SealError::UnknownFormat(9))
        ));
        assert!(matches!(
            sb.open(SealFormat::Bound, &[BOUND_PREFIX, 1, 2], &BINDING),
            Err(SealError::Truncated)
        ));
    }

    #[test]
    fn key_formats() {
        assert!(parse_key(&[1u8; 32]).is_ok());
        assert!(parse_key("ab".repeat(32).as_bytes()).is_ok());
        assert!(parse_key(b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").is_ok());
        assert!(parse_key(b"short").is_err());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = Credential::Password("hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
