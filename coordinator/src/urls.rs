//! Connection URLs (`FERRY_DATABASE_URL`, `FERRY_AMQP_URL`) as they may be
//! shown: in errors, logs and `/readyz`. Pure.
//!
//! **Invariant:** no shown URL carries a secret, whatever form it takes: the
//! password of the userinfo (`postgres://user:secret@host`) is dropped, and
//! the value of every query parameter whose name says it is secret
//! (`password`, `sslpassword`, `passfile`, `token`, `secret`, ... matched on
//! the percent-decoded, lower-cased name) is replaced by `<redacted>`; a
//! keyword/value string (`host=h password=secret`) is treated the same way.

/// What replaces a secret value.
const REDACTED: &str = "<redacted>";

/// Parameter names (percent-decoded, lower case) that hold secrets contain
/// one of these.
const SECRET_NAME_PARTS: [&str; 5] = ["pass", "pwd", "secret", "token", "auth"];

/// The query parameters `sqlx` 0.8 understands in a Postgres URL; it ignores
/// any other with a log line carrying the value, which therefore is
/// silenced (`ferry_proto::telemetry`) and replaced by [`unrecognized_pg_params`].
const PG_PARAMS: [&str; 19] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
    "options[",
];

/// Whether a parameter of this name holds a secret.
fn is_secret_name(raw_name: &str) -> bool {
    let name = percent_decode(raw_name).to_ascii_lowercase();
    SECRET_NAME_PARTS.iter().any(|part| name.contains(part))
}

/// `%XX` decoded (invalid escapes kept as written), `+` as a space.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL (or keyword/value connection string) without its secrets.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_keywords(url);
    };
    // The userinfo ends at the last '@' (a password may hold an unescaped
    // one); when the '@' is in the query instead, the cut hides more than
    // needed, never less.
    let rest = match rest.rsplit_once('@') {
        Some((creds, host)) => {
            let user = creds.split(':').next().unwrap_or("");
            format!("{user}@{host}")
        }
        None => rest.to_string(),
    };
    let (base, fragment) = match rest.split_once('#') {
        Some((base, fragment)) => (base, Some(fragment)),
        None => (rest.as_str(), None),
    };
    let mut shown = format!("{scheme}://");
    match base.split_once('?') {
        Some((path, query)) => {
            shown.push_str(path);
            shown.push('?');
            shown.push_str(&redact_query(query));
        }
        None => shown.push_str(base),
    }
    if let Some(fragment) = fragment {
        shown.push('#');
        shown.push_str(&redact_query(fragment));
    }
    shown
}

/// `a=1&password=x;b=2` with the secret values replaced.
fn redact_query(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for pair in query.split_inclusive(['&', ';']) {
        let (body, sep) = match pair.strip_suffix(['&', ';']) {
            Some(body) => (body, &pair[body.len()..]),
            None => (pair, ""),
        };
        match body.split_once('=') {
            Some((name, _)) if is_secret_name(name) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(body),
        }
        out.push_str(sep);
    }
    out
}

/// `host=h password='a b' user=u` with the secret values replaced (values may
/// be single-quoted, with `\'` escapes, as libpq reads them).
fn redact_keywords(conninfo: &str) -> String {
    let mut out = String::with_capacity(conninfo.len());
    let mut rest = conninfo;
    while !rest.is_empty() {
        let start = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let Some(eq) = rest.find('=') else {
            out.push_str(rest);
            break;
        };
        let name = rest[..eq].trim();
        let value_and_more = rest[eq + 1..].trim_start();
        let value_len = quoted_or_word_len(value_and_more);
        let consumed = rest.len() - value_and_more.len() + value_len;
        if is_secret_name(name) && !name.contains(char::is_whitespace) {
            out.push_str(&rest[..rest.len() - value_and_more.len()]);
            out.push_str(REDACTED);
        } else {
            out.push_str(&rest[..consumed]);
        }
        rest = &rest[consumed..];
    }
    out
}

/// Length of the value at the start of `s`: a single-quoted string (with
/// `\` escapes; unterminated: the rest) or a word up to whitespace.
fn quoted_or_word_len(s: &str) -> usize {
    if let Some(quoted) = s.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => return i + 2,
                _ => {}
            }
        }
        return s.len();
    }
    s.find(char::is_whitespace).unwrap_or(s.len())
}

/// Names of the query parameters of a Postgres URL that sqlx does not
/// understand and ignores (names only: their values may be secrets).
pub(crate) fn unrecognized_pg_params(url: &str) -> Vec<String> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    let query = query.split('#').next().unwrap_or("");
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| percent_decode(pair.split('=').next().unwrap_or("")))
        .filter(|name| {
            !PG_PARAMS
                .iter()
                .any(|known| name == known || (known.ends_with('[') && name.starts_with(known)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_passwords_are_dropped() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert_eq!(
            redact("amqp://guest:guest@h:5672/%2f"),
            "amqp://guest@h:5672/%2f"
        );
    }

    #[test]
    fn secret_query_parameters_are_redacted() {
        for (url, shown) in [
            (
                "postgres://u@h/db?password=hunter2",
                "postgres://u@h/db?password=<redacted>",
            ),
            (
                "postgres://u@h/db?sslmode=require&password=hunter2&application_name=ferry",
                "postgres://u@h/db?sslmode=require&password=<redacted>&application_name=ferry",
            ),
            (
                "postgres://h/db?sslpassword=hunter2;PassWord=hunter2",
                "postgres://h/db?sslpassword=<redacted>;PassWord=<redacted>",
            ),
            (
                "postgres://h/db?pass%77ord=hunter2",
                "postgres://h/db?pass%77ord=<redacted>",
            ),
            (
                "postgres://h/db?x=1#password=hunter2",
                "postgres://h/db?x=1#password=<redacted>",
            ),
            (
                "postgres://u:hunter2@h/db?password=hunter2",
                "postgres://u@h/db?password=<redacted>",
            ),
            (
                "amqps://h/vhost?auth_token=hunter2&heartbeat=10",
                "amqps://h/vhost?auth_token=<redacted>&heartbeat=10",
            ),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
        // An '@' in the query: more is hidden, nothing leaks.
        let shown = redact("postgres://h/db?password=hunter2&application_name=a@b");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn keyword_value_strings_are_redacted() {
        assert_eq!(
            redact("host=h user=u password=hunter2 dbname=d"),
            "host=h user=u password=<redacted> dbname=d"
        );
        assert_eq!(
            redact("host=h password = 'hun ter\\'2' sslpassword=x"),
            "host=h password = <redacted> sslpassword=<redacted>"
        );
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn unrecognized_parameters_are_named_without_values() {
        assert_eq!(
            unrecognized_pg_params(
                "postgres://h/db?sslmode=require&sslpassword=x&options[search_path]=a&pass%77ord=y&connect_timeout=3"
            ),
            vec!["sslpassword".to_string(), "connect_timeout".to_string()]
        );
        assert!(unrecognized_pg_params("postgres://u:p@h/db").is_empty());
    }
}
