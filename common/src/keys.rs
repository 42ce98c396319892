//! Object keys from remote paths: the watch's key template, rendered so that
//! the result is always a safe S3 key (no `..`, no leading `/`, no control
//! characters) and never shared by two files of one watch.
//!
//! **Rule:** a key names one *version* of one file. Every template contains
//! `{version}` (`<mtime unix seconds>-<size>`, the file identity ferry already
//! uses besides the path), and identifies the path with `{path}`, or `{name}`
//! plus `{dir}` on a recursive watch. These identifying placeholders each fill a
//! whole `/`-separated segment, so a key can be read back into
//! (path, version): two files of one watch never share a key, a replaced file
//! gets a new key beside the old one, and a retry of the same version renders
//! the same key again (idempotent).

use crate::validate::FieldError;

/// Placeholders a key template may use.
pub const PLACEHOLDERS: [&str; 7] = ["server", "watch", "path", "dir", "name", "date", "version"];

/// Placeholders that must fill a whole segment (they identify the file).
const SEGMENT_PLACEHOLDERS: [&str; 4] = ["path", "dir", "name", "version"];

/// The default: the remote directory tree, with each version of a file in its
/// own folder so the object keeps the file's name (and extension).
pub const DEFAULT_TEMPLATE: &str = "{server}/{dir}/{version}/{name}";

/// The default before versions existed; migration 0009 rewrote stored copies.
pub const LEGACY_DEFAULT_TEMPLATE: &str = "{server}/{path}";

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

/// Checks a key template of a watch (`recursive` or not); empty means the
/// default. Returns the template to store. Rejects templates that could give
/// two files of the watch, or two versions of one file, the same key.
pub fn check_template(template: &str, recursive: bool) -> Result<String, FieldError> {
    let err = |m: String| FieldError::new("key_template", m);
    let template = if template.is_empty() {
        DEFAULT_TEMPLATE
    } else {
        template
    };
    let parts = parse(template)?;
    if template.starts_with('/') {
        return Err(err("must not start with '/'".into()));
    }
    if template.chars().any(char::is_control) {
        return Err(err("must not contain control characters".into()));
    }
    for segment in template.split('/') {
        let segment_parts = parse(segment)?;
        for p in &segment_parts {
            if let Part::Placeholder(name) = p
                && SEGMENT_PLACEHOLDERS.contains(&name.as_str())
                && segment_parts.len() != 1
            {
                return Err(err(format!(
                    "{{{name}}} must fill a whole '/'-separated segment (found {segment:?}), \
                     or two files could render to one key"
                )));
            }
        }
    }
    let has = |name: &str| {
        parts
            .iter()
            .any(|p| matches!(p, Part::Placeholder(n) if n == name))
    };
    if !has("version") {
        return Err(err(format!(
            "{template:?} must contain {{version}}, or a replaced file would overwrite the \
             object announced for its earlier version (default: {DEFAULT_TEMPLATE})"
        )));
    }
    if !has("path") && !has("name") {
        return Err(err(format!(
            "{template:?} must contain {{path}} or {{name}}, or every file would overwrite the same key"
        )));
    }
    if recursive && !has("path") && !has("dir") {
        return Err(err(format!(
            "{template:?} uses {{name}} without {{dir}} or {{path}} on a recursive watch: \
             a/x.csv and b/x.csv would share one key"
        )));
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
    /// Size of this version of the file, in bytes.
    pub size: u64,
    /// Modification time of this version of the file (unix seconds).
    pub mtime_unix: i64,
}

/// The `{version}` of a file: stable for one (size, mtime), the identity ferry
/// keeps besides the path, so a retry renders the same key.
pub fn version(size: u64, mtime_unix: i64) -> String {
    format!("{mtime_unix}-{size}")
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
    if !parts
        .iter()
        .any(|p| matches!(p, Part::Placeholder(n) if n == "version"))
    {
        return Err(KeyError::Template(format!(
            "{template:?} lacks {{version}}: a new version would overwrite the announced one"
        )));
    }
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
                "version" => key.push_str(&version(input.size, input.mtime_unix)),
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

/// The key of its own of one version: `key` (rendered for this version)
/// with its `{version}` segment (the last segment equal to `version`, else a
/// new segment before the name) extended by the version's announcement id,
/// `<mtime>-<size>-<announcement id>`. Used when the version's key already
/// holds other bytes: a producer that keeps mtime (`cp -p`, `rsync -a`)
/// wrote different bytes of the same size, and the announced object must
/// not be overwritten. The same row renders the same key again (a retry is
/// idempotent), and no two rows share one (announcement ids are unique).
/// `None` if the result would be longer than S3's 1024 bytes.
pub fn own_key(key: &str, version: &str, announcement_id: &str) -> Option<String> {
    let mut segments: Vec<String> = key.split('/').map(str::to_owned).collect();
    let extended = format!("{version}-{announcement_id}");
    match segments.iter().rposition(|s| s == version) {
        Some(i) => segments[i] = extended,
        None => {
            let at = segments.len().saturating_sub(1);
            segments.insert(at, extended);
        }
    }
    let own = segments.join("/");
    (own.len() <= 1024 && !announcement_id.is_empty()).then_some(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_has_a_key_of_its_own_beside_its_key() {
        let id = "0f8e2a1c-5b7d-4e3a-9c6b-2d1f0e9a8b7c";
        let key = render(DEFAULT_TEMPLATE, &inputs("/data/in/a/b.csv")).unwrap();
        let own = own_key(&key, &version(42, 1_764_324_000), id).unwrap();
        assert_eq!(own, format!("srv/a/1764324000-42-{id}/b.csv"));
        assert_ne!(own, key);
        assert_eq!(
            own_key(&key, &version(42, 1_764_324_000), id).as_deref(),
            Some(own.as_str())
        );
        // A key without the version segment (rendered before templates had
        // one) gets a segment before the name.
        assert_eq!(
            own_key("srv/b.csv", "1-2", id).unwrap(),
            format!("srv/1-2-{id}/b.csv")
        );
        assert_eq!(own_key(&"k/".repeat(510), "1-2", id), None);
        assert_eq!(own_key(&key, "1-2", ""), None);
    }

    fn inputs(path: &str) -> KeyInputs<'_> {
        KeyInputs {
            server: "srv",
            watch_id: 7,
            watch_dir: "/data/in",
            remote_path: path,
            date: "2026-11-28",
            size: 42,
            mtime_unix: 1_764_324_000,
        }
    }

    #[test]
    fn default_template_keeps_the_tree_and_names_the_version() {
        assert_eq!(
            render(DEFAULT_TEMPLATE, &inputs("/data/in/a/b.csv")).unwrap(),
            "srv/a/1764324000-42/b.csv"
        );
        assert_eq!(
            render(DEFAULT_TEMPLATE, &inputs("/data/in/b.csv")).unwrap(),
            "srv/1764324000-42/b.csv"
        );
    }

    #[test]
    fn versions_of_one_path_get_distinct_keys_and_a_retry_the_same() {
        let v1 = inputs("/data/in/a/b.csv");
        let v2 = KeyInputs {
            mtime_unix: v1.mtime_unix + 60,
            ..v1.clone()
        };
        let k1 = render(DEFAULT_TEMPLATE, &v1).unwrap();
        assert_ne!(k1, render(DEFAULT_TEMPLATE, &v2).unwrap());
        assert_eq!(k1, render(DEFAULT_TEMPLATE, &v1).unwrap());
    }

    #[test]
    fn placeholders() {
        let t = "x/{date}/{watch}/{dir}/{version}/{name}";
        assert_eq!(
            render(t, &inputs("/data/in/a/b.csv")).unwrap(),
            "x/2026-11-28/7/a/1764324000-42/b.csv"
        );
        assert_eq!(
            render(t, &inputs("/data/in/b.csv")).unwrap(),
            "x/2026-11-28/7/1764324000-42/b.csv"
        );
    }

    #[test]
    fn unsafe_paths_are_rejected() {
        assert!(render(DEFAULT_TEMPLATE, &inputs("/data/in/../etc/passwd")).is_err());
        assert!(render(DEFAULT_TEMPLATE, &inputs("/data/in/a\nb")).is_err());
        assert!(render(DEFAULT_TEMPLATE, &inputs("/data/in/")).is_err());
    }

    #[test]
    fn a_template_without_version_is_not_rendered() {
        assert!(matches!(
            render(LEGACY_DEFAULT_TEMPLATE, &inputs("/data/in/b.csv")),
            Err(KeyError::Template(_))
        ));
    }

    #[test]
    fn templates_are_checked() {
        let msg = |t: &str, recursive: bool| check_template(t, recursive).unwrap_err().message;
        assert_eq!(check_template("", true).unwrap(), DEFAULT_TEMPLATE);
        assert!(msg("{server}/{nope}", false).contains("{nope}"));
        assert!(check_template("{server}/{path", false).is_err());
        assert!(check_template("/{path}/{version}", false).is_err());
        assert!(msg("{server}/fixed/{version}", false).contains("{path} or {name}"));
        assert!(msg(LEGACY_DEFAULT_TEMPLATE, false).contains("{version}"));
        assert!(msg("{server}/{path}@{version}", false).contains("whole"));
        assert!(msg("{server}/{path}{version}", false).contains("whole"));
        assert!(msg("in/{date}/{version}/{name}", true).contains("recursive"));
        assert!(check_template("in/{date}/{version}/{name}", false).is_ok());
        assert!(check_template("in-{date}/{path}/{version}", true).is_ok());
        assert!(check_template("{server}-{watch}/{dir}/{version}/{name}", true).is_ok());
    }
}
