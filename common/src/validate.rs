//! Validation of admin input. Each check names the offending field so that the
//! API can answer `INVALID_ARGUMENT` with a message an operator can act on.

use std::fmt;

/// A rejected input field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        FieldError {
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

pub type Checked<T> = Result<T, FieldError>;

/// Server names: 1..=128 characters of letters, digits, `-`, `_`, `.`.
pub fn server_name(name: &str) -> Checked<()> {
    if name.is_empty() {
        return Err(FieldError::new("name", "must not be empty"));
    }
    if name.len() > 128 {
        return Err(FieldError::new("name", "must be at most 128 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(FieldError::new(
            "name",
            format!("{name:?} may only contain letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

/// A DNS name (RFC 1123 labels) or an IPv4/IPv6 literal.
pub fn hostname(host: &str) -> Checked<()> {
    let field = "hostname";
    if host.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if host.len() > 253 {
        return Err(FieldError::new(field, "is longer than 253 characters"));
    }
    for label in host.trim_end_matches('.').split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(FieldError::new(
                field,
                format!("{host:?} is not a valid DNS name or IP address"),
            ));
        }
    }
    Ok(())
}

/// TCP port 1..=65535; 0 in a create request means "default 22".
pub fn port(port: u32) -> Checked<u16> {
    match u16::try_from(port) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(FieldError::new(
            "port",
            format!("{port} is out of range (1..65535)"),
        )),
    }
}

pub fn username(user: &str) -> Checked<()> {
    if user.trim().is_empty() {
        return Err(FieldError::new("username", "must not be empty"));
    }
    if user.chars().any(char::is_control) {
        return Err(FieldError::new(
            "username",
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// `SHA256:` followed by the unpadded base64 of a 32-byte digest, as OpenSSH prints it.
pub fn host_key_fingerprint(fp: &str) -> Checked<()> {
    use base64::Engine;
    let field = "host_key_fingerprint";
    let Some(b64) = fp.strip_prefix("SHA256:") else {
        return Err(FieldError::new(
            field,
            format!("{fp:?} must look like SHA256:<base64> (as printed by ssh-keygen -lf)"),
        ));
    };
    match base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64.trim_end_matches('=')) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        _ => Err(FieldError::new(
            field,
            format!(
                "{fp:?} is not a SHA256 fingerprint (expected 43 base64 characters after SHA256:)"
            ),
        )),
    }
}

/// How a private key is protected, as far as its encoding tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProtection {
    Plain,
    Encrypted,
    /// The encoding does not say (PEM forms other than OpenSSH's, PuTTY).
    Unknown,
}

/// Checks that `pem` is encoded like an SSH private key (OpenSSH, PKCS#1,
/// PKCS#8, SEC1 or PuTTY) without decoding the key material: the key itself
/// is parsed where SSH lives, by the agent, which reports a key it cannot use
/// as a poll error. Returns what the encoding says about encryption.
pub fn private_key_shape(pem: &str) -> Checked<KeyProtection> {
    use base64::Engine;
    let field = "private_key";
    let text = pem.trim();
    if text.starts_with("PuTTY-User-Key-File-") {
        return Ok(KeyProtection::Unknown);
    }
    let mut lines = text.lines().map(str::trim);
    let Some(label) = lines
        .next()
        .and_then(|l| l.strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"))
    else {
        return Err(FieldError::new(
            field,
            "cannot be parsed as an OpenSSH/PEM private key: no -----BEGIN ...----- line",
        ));
    };
    const LABELS: [&str; 5] = [
        "OPENSSH PRIVATE KEY",
        "RSA PRIVATE KEY",
        "PRIVATE KEY",
        "ENCRYPTED PRIVATE KEY",
        "EC PRIVATE KEY",
    ];
    if !LABELS.contains(&label) {
        return Err(FieldError::new(
            field,
            format!("cannot be parsed as an OpenSSH/PEM private key: unknown type {label:?}"),
        ));
    }
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    let mut headers_encrypted = false;
    let mut ended = false;
    for line in lines {
        if line == end {
            ended = true;
            break;
        }
        if line.starts_with("Proc-Type:") && line.contains("ENCRYPTED") {
            headers_encrypted = true;
        }
        if line.contains(':') || line.is_empty() {
            continue;
        }
        body.push_str(line);
    }
    if !ended {
        return Err(FieldError::new(
            field,
            format!("cannot be parsed as an OpenSSH/PEM private key: no {end} line"),
        ));
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(&body)
        .map_err(|e| {
            FieldError::new(
                field,
                format!("cannot be parsed as an OpenSSH/PEM private key: body is not base64 ({e})"),
            )
        })?;
    if label == "OPENSSH PRIVATE KEY" {
        const MAGIC: &[u8] = b"openssh-key-v1\0";
        let cipher = der
            .strip_prefix(MAGIC)
            .and_then(|rest| {
                let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
                rest.get(4..4 + len)
            })
            .ok_or_else(|| {
                FieldError::new(
                    field,
                    "cannot be parsed as an OpenSSH private key: not an openssh-key-v1 encoding",
                )
            })?;
        return Ok(if cipher == b"none" {
            KeyProtection::Plain
        } else {
            KeyProtection::Encrypted
        });
    }
    if der.first() != Some(&0x30) {
        return Err(FieldError::new(
            field,
            "cannot be parsed as a PEM private key: body is not DER",
        ));
    }
    Ok(match (label, headers_encrypted) {
        ("ENCRYPTED PRIVATE KEY", _) | (_, true) => KeyProtection::Encrypted,
        _ => KeyProtection::Unknown,
    })
}

/// 1..=`max` ASCII letters, digits, '-', '_' or '.' (names in certificates
/// and labels that end up in URIs and routing keys).
fn is_label(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// An agent's name, as its certificate carries it.
pub fn agent_name(name: &str) -> Checked<()> {
    if !is_label(name, 128) {
        return Err(FieldError::new(
            "name",
            format!("{name:?} is not an agent name (1..128 letters, digits, '-', '_' or '.')"),
        ));
    }
    Ok(())
}

pub fn site(site: &str) -> Checked<()> {
    if !is_label(site, 64) {
        return Err(FieldError::new(
            "site",
            format!("{site:?} must be 1..64 letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(())
}

/// Which agent an admin call names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRef {
    /// Site and name: one identity.
    Exact(crate::domain::AgentId),
    /// A name alone: it stands for an agent only if one site has it.
    Bare(String),
}

/// The agent of an admin call, from its `site` field (may be empty) and its
/// `name`, which may carry the site itself as `site/name`.
pub fn agent_ref(site_field: &str, name: &str) -> Checked<AgentRef> {
    let (site_part, name) = match name.split_once('/') {
        Some((s, n)) => (Some(s), n),
        None => (None, name),
    };
    agent_name(name)?;
    let chosen = match (site_part, site_field) {
        (Some(s), "") => s,
        (Some(s), f) if s == f => s,
        (Some(s), f) => {
            return Err(FieldError::new(
                "site",
                format!("{f:?} differs from the site {s:?} in the name {s}/{name}"),
            ));
        }
        (None, "") => return Ok(AgentRef::Bare(name.to_string())),
        (None, f) => f,
    };
    site(chosen)?;
    Ok(AgentRef::Exact(crate::domain::AgentId::new(chosen, name)))
}

pub fn max_sessions(n: u32) -> Checked<u32> {
    if (1..=1024).contains(&n) {
        Ok(n)
    } else {
        Err(FieldError::new(
            "max_sessions",
            format!("{n} is out of range (1..1024)"),
        ))
    }
}

/// Checks that `dir` names one remote directory one way: absolute, no control
/// characters, at most [`crate::discovery::MAX_PATH_BYTES`] bytes, and no
/// `.`, `..` or empty segments (`//`), so that comparing two directories as
/// text compares the directories (the overlap rule, the paths discovery
/// reports). Trailing `/`s are dropped (`/` stays `/`). Returns the
/// normalized directory, or why `dir` is not one, naming no field (the
/// caller's field names it).
pub fn absolute_dir(dir: &str) -> Result<String, String> {
    if dir.is_empty() {
        return Err("must not be empty".into());
    }
    if !dir.starts_with('/') {
        return Err(format!("{dir:?} must be an absolute path, e.g. /archive"));
    }
    if dir.chars().any(char::is_control) {
        return Err(format!("{dir:?} must not contain control characters"));
    }
    let max = crate::discovery::MAX_PATH_BYTES;
    if dir.len() > max {
        return Err(format!("is {} bytes long (at most {max})", dir.len()));
    }
    let trimmed = dir.trim_end_matches('/');
    if let Some(seg) = trimmed
        .split('/')
        .skip(1)
        .find(|seg| matches!(*seg, "" | "." | ".."))
    {
        let what = if seg.is_empty() {
            "an empty segment (//)".to_string()
        } else {
            format!("a {seg:?} segment")
        };
        return Err(format!(
            "{dir:?} contains {what}: give the directory the one way it is meant, \
             without '.', '..' or '//'"
        ));
    }
    Ok(if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    })
}

/// A watch's absolute remote directory; returned without trailing slash
/// (except `/`). See [`absolute_dir`].
pub fn directory(dir: &str) -> Checked<String> {
    absolute_dir(dir).map_err(|why| FieldError::new("directory", why))
}

/// A file-name glob (`*.csv`, `data-??.{csv,json}`); empty means `*`.
pub fn glob(pattern: &str) -> Checked<String> {
    let pattern = if pattern.is_empty() { "*" } else { pattern };
    glob_matcher(pattern)?;
    Ok(pattern.to_string())
}

/// The matcher of a file-name glob (empty means `*`), as watches apply it: to
/// a file's name, `*` never crossing a `/`.
pub fn glob_matcher(pattern: &str) -> Checked<globset::GlobMatcher> {
    let pattern = if pattern.is_empty() { "*" } else { pattern };
    Ok(globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| FieldError::new("glob", format!("{pattern:?}: {}", e.kind())))?
        .compile_matcher())
}

pub fn poll_interval_secs(secs: u32) -> Checked<u32> {
    if secs == 0 || secs > 86_400 {
        return Err(FieldError::new(
            "poll_interval_secs",
            format!("{secs} is out of range (1..86400 seconds)"),
        ));
    }
    Ok(secs)
}

pub fn min_age_secs(secs: u32) -> Checked<u32> {
    if secs > 30 * 86_400 {
        return Err(FieldError::new(
            "min_age_secs",
            format!("{secs} is more than 30 days"),
        ));
    }
    Ok(secs)
}

/// S3 bucket naming rules (the subset MinIO and AWS agree on).
pub fn bucket(name: &str) -> Checked<()> {
    let field = "bucket";
    let bad = |why: &str| Err(FieldError::new(field, format!("{name:?} {why}")));
    if name.len() < 3 || name.len() > 63 {
        return bad("must be 3..63 characters long");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return bad("may only contain lower-case letters, digits, '-' and '.'");
    }
    let first_last_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_last_ok(name.chars().next()) || !first_last_ok(name.chars().last()) {
        return bad("must start and end with a letter or digit");
    }
    if name.contains("..") {
        return bad("must not contain '..'");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return bad("must not look like an IP address");
    }
    Ok(())
}

/// A move post-action's target directory (absolute).
pub fn post_action_move(directory: &str) -> Checked<crate::domain::PostAction> {
    crate::domain::PostAction::move_to(directory).map_err(|e| FieldError::new("post_action", e))
}

/// `keep`, `delete` or `move:<absolute dir>`.
pub fn post_action(action: &str) -> Checked<crate::domain::PostAction> {
    action
        .parse()
        .map_err(|e: String| FieldError::new("post_action", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for ok in [
            "sftp.example.com",
            "localhost",
            "127.0.0.1",
            "::1",
            "[::1]",
            "a-b.c",
        ] {
            assert!(hostname(ok).is_ok(), "{ok}");
        }
        for bad in ["", "bad host", "-x.com", "a..b", "x_y.com", "host/evil"] {
            assert_eq!(hostname(bad).unwrap_err().field, "hostname", "{bad}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(port(22).unwrap(), 22);
        assert!(port(0).is_err());
        assert!(port(70000).unwrap_err().message.contains("70000"));
    }

    #[test]
    fn fingerprints() {
        assert!(host_key_fingerprint("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU").is_ok());
        assert!(host_key_fingerprint("MD5:aa:bb").is_err());
        assert!(host_key_fingerprint("SHA256:short").is_err());
    }

    #[test]
    fn directories_and_globs() {
        assert_eq!(directory("/data/in/").unwrap(), "/data/in");
        assert_eq!(directory("/").unwrap(), "/");
        assert!(directory("data").is_err());
        assert!(directory("").is_err());
        assert!(directory("/a/../b").is_err());
        assert_eq!(directory("/data/in//").unwrap(), "/data/in");
        assert_eq!(directory("///").unwrap(), "/");
        assert_eq!(glob("").unwrap(), "*");
        assert!(glob("*.{csv,json}").is_ok());
        assert_eq!(glob("[a-").unwrap_err().field, "glob");
    }

    #[test]
    fn buckets() {
        assert!(bucket("ferry-inbox").is_ok());
        for bad in [
            "ab",
            "Upper",
            "-lead",
            "trail-",
            "a..b",
            "192.168.1.1",
            "under_score",
        ] {
            assert!(bucket(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_agent_is_named_by_site_and_name() {
        use crate::domain::AgentId;
        let exact = |s: &str, n: &str| Ok(AgentRef::Exact(AgentId::new(s, n)));
        assert_eq!(agent_ref("", "site-a/agent-1"), exact("site-a", "agent-1"));
        assert_eq!(agent_ref("site-a", "agent-1"), exact("site-a", "agent-1"));
        assert_eq!(
            agent_ref("site-a", "site-a/agent-1"),
            exact("site-a", "agent-1")
        );
        assert_eq!(
            agent_ref("", "agent-1"),
            Ok(AgentRef::Bare("agent-1".into()))
        );
        assert_eq!(
            agent_ref("site-b", "site-a/agent-1").unwrap_err().field,
            "site"
        );
        assert_eq!(agent_ref("", "bad site/a").unwrap_err().field, "site");
        assert_eq!(agent_ref("", "a/b/c").unwrap_err().field, "name");
        assert_eq!(agent_ref("", "").unwrap_err().field, "name");
    }

    #[test]
    fn directories_mean_one_thing() {
        for bad in [
            "/in/.",
            "/in/./",
            "/./in",
            "/x/../in",
            "/in/..",
            "/..",
            "/.",
            "/a//b",
            "//in",
            "/in\n",
            "/in\tx",
            "/in\u{7f}",
            "/in\0",
        ] {
            let err = directory(bad).unwrap_err();
            assert_eq!(err.field, "directory", "{bad:?}");
            assert!(
                absolute_dir(bad).is_err(),
                "{bad:?} must not be a directory"
            );
        }
        assert!(
            directory("/x/../in")
                .unwrap_err()
                .message
                .contains("\"..\" segment")
        );
        assert!(directory("/a//b").unwrap_err().message.contains("//"));
        let long = format!("/{}", "d".repeat(crate::discovery::MAX_PATH_BYTES));
        assert!(directory(&long).unwrap_err().message.contains("at most"));
        for ok in ["/in", "/in/sub", "/in/.hidden", "/in/..x", "/in/a..b", "/"] {
            assert_eq!(directory(ok).unwrap(), ok, "{ok}");
        }
    }
}
