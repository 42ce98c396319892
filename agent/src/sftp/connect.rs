//! The SSH side: TCP connect, handshake with a pinned host key, login, and
//! the `sftp` subsystem channel. Also the host-key probe used to pin a new
//! server, and the OpenSSH-compatible fingerprint.
//!
//! russh reports a rejected host key only as `Error::UnknownKey`, so the
//! handler records the key it was shown in shared state; that is how a
//! rejection becomes [`SftpError::HostKeyMismatch`] with both fingerprints.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use russh::client::{self, AuthResult, Handle, KeyboardInteractiveAuthResponse};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, MethodKind, MethodSet};
use russh_sftp::client::RawSftpSession;
use tokio::net::TcpStream;

use super::error::{SftpError, classify};
use super::keys;
use super::session::SftpSession;
use super::{Auth, ServerEndpoint, Timeouts};

/// SSH channel window. Large so that many pipelined SFTP reads can be in
/// flight on a high-latency link; russh re-opens the window as data
/// *arrives* (not when it is consumed), so this is not a memory bound.
const WINDOW_SIZE: u32 = 8 * 1024 * 1024;
/// Largest CHANNEL_DATA packet we accept. russh logs an error above 65535.
const MAX_PACKET_SIZE: u32 = 65535;
/// Channel messages buffered between the russh session task and the SFTP
/// reader task; the real memory bound per session (`x MAX_PACKET_SIZE`).
/// Sized to one window so a full window never stalls the connection task.
const CHANNEL_BUFFER: usize = (WINDOW_SIZE / MAX_PACKET_SIZE) as usize + 1;
/// Unanswered keepalives before russh drops the connection.
const KEEPALIVE_MAX: usize = 3;
/// Read size when the server does not announce `limits@openssh.com`; every
/// SFTP server must serve 32 KiB reads.
const DEFAULT_READ_CHUNK: u32 = 32 * 1024;
/// Upper bound of a read request: russh-sftp rejects reply packets above its
/// `max_packet_len` (256 KiB), minus the DATA header.
const MAX_READ_CHUNK: u32 = 256 * 1024 - 1024;
/// Logins in progress to one host and port at once. OpenSSH starts refusing
/// unauthenticated connections beyond `MaxStartups` (10 by default): an
/// agent polling many servers of one host (one per directory or account)
/// would otherwise open them all at once and see most of them refused.
const LOGINS_PER_HOST: usize = 8;
const _: () = assert!(LOGINS_PER_HOST < 10, "below OpenSSH's default MaxStartups");

/// The login slots of `host:port`, shared by every connection this agent
/// opens to it.
fn login_slots(host: &str, port: u16) -> Arc<tokio::sync::Semaphore> {
    type Slots = std::collections::HashMap<(String, u16), Arc<tokio::sync::Semaphore>>;
    static SLOTS: OnceLock<std::sync::Mutex<Slots>> = OnceLock::new();
    let mut slots = ferry_common::sync::lock(SLOTS.get_or_init(Default::default));
    slots
        .entry((host.to_ascii_lowercase(), port))
        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(LOGINS_PER_HOST)))
        .clone()
}

/// OpenSSH-style fingerprint of a public key: `SHA256:` + unpadded base64 of
/// the SHA-256 of the wire-encoded key, exactly what `ssh-keygen -lf` prints.
pub(crate) fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Brings a configured fingerprint to the form [`fingerprint`] produces:
/// trims whitespace and base64 padding, and adds a missing `SHA256:` prefix.
pub(crate) fn normalize_fingerprint(pinned: &str) -> String {
    let trimmed = pinned.trim().trim_end_matches('=');
    if trimmed.is_empty() {
        String::new()
    } else if trimmed.contains(':') {
        trimmed.to_owned()
    } else {
        format!("SHA256:{trimmed}")
    }
}

/// The key a server presented during the handshake.
#[derive(Debug, Clone)]
struct SeenKey {
    fingerprint: String,
    algorithm: String,
}

/// russh client handler: accepts the server only if its key matches the pin,
/// and records whatever key it was shown.
pub(crate) struct PinnedHostKey {
    /// Normalized; `None` rejects every key (probe mode / nothing pinned).
    pinned: Option<String>,
    seen: Arc<OnceLock<SeenKey>>,
}

impl client::Handler for PinnedHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // For a host certificate this is the certified key, the one
        // `ssh-keygen -lf` of the server's key file shows.
        let key = server_key.public_key();
        let seen = SeenKey {
            fingerprint: fingerprint(&key),
            algorithm: key.algorithm().as_str().to_owned(),
        };
        let accept = self.pinned.as_deref() == Some(seen.fingerprint.as_str());
        // Only the initial key exchange calls this; a second set cannot happen.
        let _ = self.seen.set(seen);
        Ok(accept)
    }
}

fn client_config(t: &Timeouts) -> client::Config {
    client::Config {
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET_SIZE,
        channel_buffer_size: CHANNEL_BUFFER,
        inactivity_timeout: Some(t.idle),
        keepalive_interval: (!t.keepalive.is_zero()).then_some(t.keepalive),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        ..client::Config::default()
    }
}

/// DNS + TCP connect with Nagle off; every failure is [`SftpError::Connect`].
async fn tcp_connect(hostname: &str, port: u16) -> Result<TcpStream, SftpError> {
    let addrs: Vec<_> = tokio::net::lookup_host((hostname, port))
        .await
        .map_err(|e| SftpError::Connect(format!("cannot resolve {hostname}: {e}")))?
        .collect();
    let mut last_error = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%addr, error = %e, "set_nodelay failed");
                }
                return Ok(stream);
            }
            Err(e) if addr.ip().to_string() == hostname => last_error = Some(e.to_string()),
            Err(e) => last_error = Some(format!("{e} (address {addr})")),
        }
    }
    Err(SftpError::Connect(format!(
        "{hostname}:{port}: {}",
        last_error
            .as_deref()
            .unwrap_or("name resolves to no address")
    )))
}

/// Runs the SSH handshake on `stream` and returns its outcome together with
/// the host key the server presented (if it got that far).
async fn handshake(
    stream: TcpStream,
    t: &Timeouts,
    pinned: Option<String>,
) -> (Result<Handle<PinnedHostKey>, russh::Error>, Option<SeenKey>) {
    let seen = Arc::new(OnceLock::new());
    let handler = PinnedHostKey {
        pinned,
        seen: seen.clone(),
    };
    let result = client::connect_stream(Arc::new(client_config(t)), stream, handler).await;
    (result, seen.get().cloned())
}

/// Decoded login secret.
enum Credentials<'a> {
    Password(&'a str),
    Key(Arc<PrivateKey>),
}

/// Connects, verifies the pinned host key, logs in and opens the SFTP
/// subsystem. The whole sequence is bounded by `t.connect`.
pub(crate) async fn connect(ep: &ServerEndpoint, t: &Timeouts) -> Result<SftpSession, SftpError> {
    // A bad key is a configuration error: report it without touching the network.
    let credentials = match &ep.auth {
        Auth::Password(password) => Credentials::Password(password),
        Auth::PrivateKey { pem, passphrase } => {
            let (text, pass) = (pem.clone(), passphrase.clone());
            Credentials::Key(
                keys::decoded(pem, passphrase.as_deref(), move || decode_key(&text, &pass)).await?,
            )
        }
    };
    let target = format!("{}@{}:{}", ep.username, ep.hostname, ep.port);
    // Waiting for a slot is not part of the connect timeout.
    let slots = login_slots(&ep.hostname, ep.port);
    let _slot = slots
        .acquire()
        .await
        .map_err(|_| SftpError::Connect(format!("{target}: login slots closed")))?;
    match tokio::time::timeout(t.connect, connect_inner(ep, t, credentials, &target)).await {
        Ok(result) => result,
        Err(_) => Err(SftpError::Connect(format!(
            "{target}: no SFTP session within {:?}",
            t.connect
        ))),
    }
}

async fn connect_inner(
    ep: &ServerEndpoint,
    t: &Timeouts,
    credentials: Credentials<'_>,
    target: &str,
) -> Result<SftpSession, SftpError> {
    let pinned = Some(normalize_fingerprint(&ep.host_key_fingerprint)).filter(|p| !p.is_empty());
    let stream = tcp_connect(&ep.hostname, ep.port).await?;
    let mut handle = match handshake(stream, t, pinned.clone()).await {
        (Ok(handle), _) => handle,
        // russh turns our `false` into a bare UnknownKey; the handler kept the key.
        (Err(russh::Error::UnknownKey), Some(seen)) => {
            return Err(match pinned {
                Some(expected) => SftpError::HostKeyMismatch {
                    expected,
                    actual: seen.fingerprint,
                },
                None => SftpError::HostKeyUnknown {
                    actual: seen.fingerprint,
                },
            });
        }
        (Err(e), _) => return Err(classify(e, target)),
    };

    match credentials {
        Credentials::Password(password) => {
            login_password(&mut handle, &ep.username, password).await?
        }
        Credentials::Key(key) => login_key(&mut handle, &ep.username, key).await?,
    }

    let mut channel = handle
        .channel_open_session()
        .await
        .map_err(|e| classify(e, target))?;
    channel
        .request_subsystem(true, "sftp")
        .await
        .map_err(|e| classify(e, target))?;
    // request_subsystem only sends; the verdict arrives on the channel.
    loop {
        match channel.wait().await {
            Some(ChannelMsg::Success) => break,
            Some(ChannelMsg::Failure) => {
                return Err(SftpError::Protocol(format!(
                    "{target}: server refused the sftp subsystem"
                )));
            }
            Some(ChannelMsg::Close | ChannelMsg::Eof) | None => {
                return Err(SftpError::Disconnected(format!(
                    "{target}: channel closed while requesting the sftp subsystem"
                )));
            }
            Some(_) => {}
        }
    }

    let config = russh_sftp::client::Config {
        request_timeout_secs: whole_seconds(t.request),
        ..russh_sftp::client::Config::default()
    };
    let max_packet_len = config.max_packet_len;
    let mut sftp = RawSftpSession::new_with_config(channel.into_stream(), config);
    let version = sftp.init().await.map_err(|e| match e {
        russh_sftp::client::error::Error::Timeout => SftpError::Timeout("SFTP version reply"),
        other => SftpError::Protocol(format!(
            "{target}: SFTP initialisation failed: {other} (does the login shell print text, or is the sftp subsystem disabled?)"
        )),
    })?;

    let mut read_chunk = DEFAULT_READ_CHUNK;
    if version
        .extensions
        .get(russh_sftp::extensions::LIMITS)
        .is_some_and(|v| v == "1")
    {
        match sftp.limits().await {
            Ok(limits) => {
                let limits = russh_sftp::client::rawsession::Limits::from(limits);
                read_chunk = read_chunk_for(limits.read_len, limits.packet_len, max_packet_len);
                sftp.set_limits(limits);
            }
            Err(e) => {
                tracing::debug!(target, error = %e, "limits@openssh.com failed; using defaults")
            }
        }
    }
    tracing::debug!(
        target,
        version = version.version,
        read_chunk,
        "SFTP session open"
    );
    Ok(SftpSession::new(
        handle,
        sftp,
        read_chunk,
        target.to_owned(),
    ))
}

/// Read request size from the server's announced limits, capped by what
/// russh-sftp accepts as one packet.
fn read_chunk_for(read_len: Option<u64>, packet_len: Option<u64>, our_packet_len: u32) -> u32 {
    // DATA reply header: length(4) + type(1) + id(4) + data length(4).
    let by_packet = |len: u64| len.saturating_sub(13);
    let mut chunk = u64::from(MAX_READ_CHUNK).min(by_packet(u64::from(our_packet_len)));
    if let Some(len) = read_len {
        chunk = chunk.min(len);
    }
    if let Some(len) = packet_len {
        chunk = chunk.min(by_packet(len));
    }
    u32::try_from(chunk).unwrap_or(DEFAULT_READ_CHUNK).max(1024)
}

fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

fn decode_key(pem: &str, passphrase: &Option<String>) -> Result<PrivateKey, SftpError> {
    russh::keys::decode_secret_key(pem, passphrase.as_deref()).map_err(|e| {
        SftpError::InvalidKey(match (e, passphrase) {
            (russh::keys::Error::KeyIsEncrypted, None) => {
                "the key is encrypted and no passphrase is configured".to_owned()
            }
            (e, Some(_)) => format!("{e} (wrong passphrase?)"),
            (e, None) => e.to_string(),
        })
    })
}

fn method_names(methods: &MethodSet) -> String {
    if methods.is_empty() {
        return "none offered".to_owned();
    }
    methods
        .iter()
        .map(<&'static str>::from)
        .collect::<Vec<_>>()
        .join(",")
}

fn auth_failed(user: &str, methods: &MethodSet) -> SftpError {
    SftpError::AuthFailed {
        user: user.to_owned(),
        methods: method_names(methods),
    }
}

/// Password login; falls back to keyboard-interactive (answering the single
/// hidden prompt with the password) when the server only offers that, as
/// PAM-backed servers with `PasswordAuthentication no` do.
async fn login_password(
    handle: &mut Handle<PinnedHostKey>,
    user: &str,
    password: &str,
) -> Result<(), SftpError> {
    let remaining = match handle
        .authenticate_password(user, password)
        .await
        .map_err(|e| classify(e, user))?
    {
        AuthResult::Success => return Ok(()),
        AuthResult::Failure {
            remaining_methods, ..
        } => remaining_methods,
    };
    if !remaining
        .iter()
        .any(|m| matches!(m, MethodKind::KeyboardInteractive))
    {
        return Err(auth_failed(user, &remaining));
    }
    let mut reply = handle
        .authenticate_keyboard_interactive_start(user, None)
        .await
        .map_err(|e| classify(e, user))?;
    // A server may send an empty info request before the real prompt.
    for _ in 0..4 {
        match reply {
            KeyboardInteractiveAuthResponse::Success => return Ok(()),
            KeyboardInteractiveAuthResponse::Failure {
                remaining_methods, ..
            } => return Err(auth_failed(user, &remaining_methods)),
            KeyboardInteractiveAuthResponse::InfoRequest { prompts, .. } => {
                // Never type the password into an echoed prompt (user name,
                // OTP, ...), nor guess which of several prompts wants it.
                if prompts.len() > 1 || prompts.iter().any(|p| p.echo) {
                    return Err(auth_failed(user, &remaining));
                }
                let answers = prompts.iter().map(|_| password.to_owned()).collect();
                reply = handle
                    .authenticate_keyboard_interactive_respond(answers)
                    .await
                    .map_err(|e| classify(e, user))?;
            }
        }
    }
    Err(auth_failed(user, &remaining))
}

/// Public-key login. RSA keys sign with SHA-2 (`rsa-sha2-512/256`) unless
/// the server announces it only knows `ssh-rsa`; a server that announces
/// nothing gets SHA-512 first, then SHA-1.
async fn login_key(
    handle: &mut Handle<PinnedHostKey>,
    user: &str,
    key: Arc<PrivateKey>,
) -> Result<(), SftpError> {
    let hashes = if key.algorithm().is_rsa() {
        match handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| classify(e, user))?
        {
            Some(announced) => vec![announced],
            None => vec![Some(HashAlg::Sha512), None],
        }
    } else {
        vec![None]
    };
    let mut remaining = MethodSet::empty();
    for hash in hashes {
        let signer = PrivateKeyWithHashAlg::new(key.clone(), hash);
        match handle
            .authenticate_publickey(user, signer)
            .await
            .map_err(|e| classify(e, user))?
        {
            AuthResult::Success => return Ok(()),
            AuthResult::Failure {
                remaining_methods, ..
            } => remaining = remaining_methods,
        }
    }
    Err(auth_failed(user, &remaining))
}

/// Connects to `hostname:port`, captures the server's host key during the
/// handshake and aborts before authenticating. Returns the key's
/// fingerprint (`SHA256:...`) and algorithm (e.g. `ssh-ed25519`): the key
/// russh negotiates, i.e. the one [`connect`] will check against the pin.
pub(crate) async fn probe_host_key(
    hostname: &str,
    port: u16,
    timeout: Duration,
) -> Result<(String, String), SftpError> {
    let target = format!("{hostname}:{port}");
    // Nothing is pinned, so the handler records the key and rejects it,
    // which ends the handshake before any authentication.
    let captured = tokio::time::timeout(timeout, async {
        let stream = tcp_connect(hostname, port).await?;
        let t = Timeouts {
            idle: timeout,
            ..Timeouts::default()
        };
        match handshake(stream, &t, None).await {
            (_, Some(seen)) => Ok(seen),
            (Err(e), None) => Err(classify(e, &target)),
            (Ok(_), None) => Err(SftpError::Protocol(format!(
                "{target}: handshake finished without a server host key"
            ))),
        }
    })
    .await;
    match captured {
        Ok(Ok(key)) => Ok((key.fingerprint, key.algorithm)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SftpError::Connect(format!(
            "{target}: no SSH host key within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_to_one_host_share_a_few_slots_and_other_hosts_have_their_own() {
        let a = login_slots("Sftp.Example", 22);
        assert!(Arc::ptr_eq(&a, &login_slots("sftp.example", 22)));
        assert!(!Arc::ptr_eq(&a, &login_slots("sftp.example", 2222)));
        assert!(!Arc::ptr_eq(&a, &login_slots("other.example", 22)));
        assert_eq!(a.available_permits(), LOGINS_PER_HOST);
    }

    // Generated with `ssh-keygen -t ed25519 -C fixture` / `-t rsa -b 2048`;
    // the fingerprints are what `ssh-keygen -lf` printed for them.
    const ED25519_PUB: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIh0zNP9wWXTvyZ0U8cJ/XnTfqmTUwDhKnHawHVNEw1M fixture";
    const ED25519_FP: &str = "SHA256:QVVIQnXPRoy4MwdbtF1iiE34Ol8eyHVM4+/Etj1iezI";
    const RSA_PUB: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDoAKQhJ0WxlRI6zuYGTfKQUDSbM/3tJqoznZ5LAcGY3Lwgmy6bYVNt34F1XqvHwyU1naaHzmEEOXxD6Uffniu75GeGCNYpDcrofmYH9+QTwDDJuIsuoNeNvmWB5iHyqFx+Wu/zOjM8WLyULBpCR4LGIglQXpoRlu1yyHJ3ixS039ZL2fbWW3TfqGRN6jM5CxrFf0mBPmLGLuFbs8Drz89RzxKoAeDbfGqsYvZ3fIhSxw6GnWxiFXO0EoJNvz0tCX2SOYebqypt6pKm3FoNrek3mRi9LQsbPwyfaNGxt0N5s3P2yvYJNyE2mvlCA9D1ba/3jq1G0u6iHw4Pt5AFdnsV fixture";
    const RSA_FP: &str = "SHA256:hd3Cs2yiIJaieyyXZgSPAD62Bb80WGwv3QhKIUUAES0";

    #[test]
    fn fingerprint_matches_ssh_keygen() {
        for (text, expected) in [(ED25519_PUB, ED25519_FP), (RSA_PUB, RSA_FP)] {
            let key = PublicKey::from_openssh(text).expect("fixture key parses");
            assert_eq!(fingerprint(&key), expected);
        }
    }

    #[test]
    fn fingerprint_is_sha256_of_the_wire_key_unpadded() {
        use base64::Engine as _;
        use sha2::Digest as _;
        let blob = ED25519_PUB.split(' ').nth(1).expect("blob field");
        let wire = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .expect("base64 blob");
        let digest = sha2::Sha256::digest(&wire);
        let manual = format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        );
        assert_eq!(manual, ED25519_FP);
    }

    #[test]
    fn pinned_fingerprints_are_normalized() {
        assert_eq!(
            normalize_fingerprint(&format!(" {ED25519_FP}\n")),
            ED25519_FP
        );
        assert_eq!(normalize_fingerprint(&format!("{ED25519_FP}=")), ED25519_FP);
        assert_eq!(
            normalize_fingerprint(ED25519_FP.trim_start_matches("SHA256:")),
            ED25519_FP
        );
        assert_eq!(normalize_fingerprint("  "), "");
    }

    #[test]
    fn read_chunk_follows_server_limits() {
        // OpenSSH announces 256 KiB packets and 255 KiB reads.
        assert_eq!(
            read_chunk_for(Some(261_120), Some(262_144), 262_144),
            261_120
        );
        assert_eq!(read_chunk_for(Some(32_768), None, 262_144), 32_768);
        assert_eq!(read_chunk_for(None, Some(40_000), 262_144), 40_000 - 13);
        assert_eq!(read_chunk_for(Some(0), None, 262_144), 1024);
    }

    #[test]
    fn whole_seconds_round_up() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(30)), 30);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
    }
}
