//! Encryption at rest of SFTP credentials (AES-256-GCM with the operator's key).
//!
//! **Invariant:** plaintext credentials exist only in memory, on their way to the
//! agent that needs them; they are never returned by the admin API nor logged.

use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::{Context, bail};
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

    /// `nonce || ciphertext+tag` of the JSON encoding.
    pub(crate) fn seal(&self, credential: &Credential) -> anyhow::Result<Vec<u8>> {
        let plain = serde_json::to_vec(credential).context("encode credential")?;
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce_bytes), plain.as_slice())
            .map_err(|_| anyhow::anyhow!("encrypt credential"))?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub(crate) fn open(&self, sealed: &[u8]) -> anyhow::Result<Credential> {
        if sealed.len() < NONCE_LEN + 16 {
            bail!("stored credential is truncated");
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), body)
            .map_err(|_| {
                anyhow::anyhow!("cannot decrypt stored credential: wrong FERRY_SECRET_KEY_FILE?")
            })?;
        serde_json::from_slice(&plain).context("decode credential")
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

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        let sb = SecretBox::from_key(&[7u8; 32]);
        let cred = Credential::PrivateKey {
            pem: "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
            passphrase: Some("pp".into()),
        };
        let mut sealed = sb.seal(&cred).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("OPENSSH"));
        assert_eq!(sb.open(&sealed).unwrap(), cred);
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(sb.open(&sealed).is_err());
        assert!(
            SecretBox::from_key(&[8u8; 32])
                .open(&sb.seal(&cred).unwrap())
                .is_err()
        );
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
