//! Object keys from remote paths: the watch's key template, rendered so that
//! the result is always a safe S3 key (no `..`, no leading `/`, no control characters).

use crate::validate::FieldError;

/// Placeholders a key template may use.
pub const PLACEHOLDERS: [&str; 6] = ["server", "watch", "path", "dir", "name", "date"];

pub const DEFAULT_TEMPLATE: &str = "{server}/{path}";

/// One segment of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder(String),
}

fn parse(template: &str) -> Result<Vec<Part>, FieldError> {
    let err = |m: String| FieldError::new("key_template", m);
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(err(format!("{template:?}: unmatched '}}'")));
        }
        if open > 0 {
            parts.push(Part::Literal(rest[..open].to_string()));
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| err(format!("{template:?}: unclosed '{{'")))?;
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(err(format!(
                "unknown placeholder {{{name}}} (known: {})",
                PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(" ")
            )));
        }
        parts.push(Part::Placeholder(name.to_string()));
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_string()));
    }
    Ok(parts)
}

/// Checks a key template; empty means the default. Returns the template to store.
pub fn check_template(template: &str) -> Result<String, FieldError> {
    let template = if template.is_empty() {
        DEFAULT_TEMPLATE
    } else {
        template
    };
    let parts = parse(template)?;
    if template.starts_with('/') {
        return Err(FieldError::new("key_template", "must not start with '/'"));
    }
    if template.chars().any(char::is_control) {
        return Err(FieldError::new(
            "key_template",
            "must not contain control characters",
        ));
    }
    if !parts
        .iter()
        .any(|p| matches!(p, Part::Placeholder(n) if n == "path" || n == "name"))
    {
        return Err(FieldError::new(
            "key_template",
            "must contain {path} or {name}, or every file would overwrite the same key",
        ));
    }
    Ok(template.to_string())
}

/// What a key is rendered from.
#[derive(Debug, Clone)]
pub struct KeyInputs<'a> {
    pub server: &'a str,
    pub watch_id: i64,
    /// Absolute remote directory of the watch.
    pub watch_dir: &'a str,
    /// Absolute remote path of the file.
    pub remote_path: &'a str,
    /// `YYYY-MM-DD` of discovery.
    pub date: &'a str,
}

/// Why a key could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("invalid key template: {0}")]
    Template(String),
    #[error("remote path {0:?} cannot become an object key: {1}")]
    UnsafePath(String, &'static str),
}

/// Renders the object key of a file. Rejects paths whose key would be unsafe.
pub fn render(template: &str, input: &KeyInputs<'_>) -> Result<String, KeyError> {
    let parts = parse(template).map_err(|e| KeyError::Template(e.message))?;
    let unsafe_path = |why| KeyError::UnsafePath(input.remote_path.to_string(), why);
    let base = input.watch_dir.trim_end_matches('/');
    let rel = input
        .remote_path
        .strip_prefix(base)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or(input.remote_path.trim_start_matches('/'));
    if rel.is_empty() {
        return Err(unsafe_path("empty relative path"));
    }
    if rel.chars().any(char::is_control) {
        return Err(unsafe_path("contains control characters"));
    }
    if rel
        .split('/')
        .any(|s| s == ".." || s == "." || s.is_empty())
    {
        return Err(unsafe_path("contains '.', '..' or empty segments"));
    }
    let (dir, name) = match rel.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", rel),
    };
    let mut key = String::new();
    for part in &parts {
        match part {
            Part::Literal(s) => key.push_str(s),
            Part::Placeholder(p) => match p.as_str() {
                "server" => key.push_str(input.server),
                "watch" => key.push_str(&input.watch_id.to_string()),
                "path" => key.push_str(rel),
                "dir" => key.push_str(dir),
                "name" => key.push_str(name),
                "date" => key.push_str(input.date),
                _ => unreachable!("parse() admits only known placeholders"),
            },
        }
    }
    // An empty {dir} leaves "a//b"; collapse it rather than write an odd key.
    let key: String = key
        .split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/");
    if key.is_empty() || key.len() > 1024 {
        return Err(unsafe_path(
            "rendered key is empty or longer than 1024 bytes",
        ));
    }
    if key.split('/').any(|s| s == "..") {
        return Err(unsafe_path("rendered key contains '..'"));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(path: &str) -> KeyInputs<'_> {
        KeyInputs {
            server: "srv",
            watch_id: 7,
            watch_dir: "/data/in",
            remote_path: path,
            date: "2026-11-28",
        }
    }

    #[test]
    fn default_template_uses_path_relative_to_watch() {
        assert_eq!(
            render(DEFAULT_TEMPLATE, &inputs("/data/in/a/b.csv")).unwrap(),
            "srv/a/b.csv"
        );
    }

    #[test]
    fn placeholders() {
        let t = "x/{date}/{watch}/{dir}/{name}";
        assert_eq!(
            render(t, &inputs("/data/in/a/b.csv")).unwrap(),
            "x/2026-11-28/7/a/b.csv"
        );
        assert_eq!(
            render(t, &inputs("/data/in/b.csv")).unwrap(),
            "x/2026-11-28/7/b.csv"
        );
    }

    #[test]
    fn unsafe_paths_are_rejected() {
        assert!(render(DEFAULT_TEMPLATE, &inputs("/data/in/../etc/passwd")).is_err());
        assert!(render(DEFAULT_TEMPLATE, &inputs("/data/in/a\nb")).is_err());
        assert!(render(DEFAULT_TEMPLATE, &inputs("/data/in/")).is_err());
    }

    #[test]
    fn templates_are_checked() {
        assert_eq!(check_template("").unwrap(), DEFAULT_TEMPLATE);
        assert!(
            check_template("{server}/{nope}")
                .unwrap_err()
                .message
                .contains("{nope}")
        );
        assert!(check_template("{server}/{path").is_err());
        assert!(check_template("/{path}").is_err());
        assert!(check_template("{server}/fixed").is_err());
        assert!(check_template("in/{date}/{name}").is_ok());
    }
}
