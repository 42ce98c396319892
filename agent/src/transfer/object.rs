//! What ferry writes to S3 besides the bytes: the destination check and the
//! object's user metadata (`x-amz-meta-*`), encoded so every value is a
//! valid HTTP header value and the whole set fits S3's 2 KiB limit.

use std::collections::HashMap;
use std::fmt::Write as _;

/// `Content-Type` of an object, from the source file's extension (the
/// object key may not end with the file name); unknown extensions are
/// `application/octet-stream`.
pub(crate) fn content_type(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    let Some((_, ext)) = name.rsplit_once('.') else {
        return "application/octet-stream";
    };
    match ext.to_ascii_lowercase().as_str() {
        "csv" => "text/csv",
        "tsv" => "text/tab-separated-values",
        "txt" | "log" => "text/plain",
        "json" => "application/json",
        "ndjson" | "jsonl" => "application/x-ndjson",
        "xml" => "application/xml",
        "html" | "htm" => "text/html",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "bz2" => "application/x-bzip2",
        "xz" => "application/x-xz",
        "zst" => "application/zstd",
        "tar" => "application/x-tar",
        "parquet" => "application/vnd.apache.parquet",
        "avro" => "application/avro",
        "edi" | "x12" => "application/EDI-X12",
        "edifact" => "application/EDIFACT",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "tif" | "tiff" => "image/tiff",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "xls" => "application/vnd.ms-excel",
        _ => "application/octet-stream",
    }
}

/// S3 limit on user metadata: the sum of key and value lengths, in bytes.
pub(super) const METADATA_LIMIT: usize = 2048;
/// S3 limit on object key length, in bytes.
const MAX_KEY_LEN: usize = 1024;

/// Checks what the coordinator named as destination. The coordinator derives
/// keys safely already; this guards against writing somewhere surprising
/// if it ever did not.
pub(crate) fn check_destination(bucket: &str, key: &str) -> Result<(), String> {
    if bucket.is_empty() {
        return Err("no destination bucket".to_owned());
    }
    let problem = if key.is_empty() {
        Some("is empty")
    } else if key.len() > MAX_KEY_LEN {
        Some("is longer than 1024 bytes")
    } else if key.starts_with('/') {
        Some("starts with '/'")
    } else if key.split('/').any(|seg| seg == ".." || seg == ".") {
        Some("has a '.' or '..' segment")
    } else if key.chars().any(char::is_control) {
        Some("contains control characters")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(format!("object key {key:?} {problem}")),
        None => Ok(()),
    }
}

/// Percent-encodes every byte outside printable ASCII, and `%` itself, so
/// the value is a valid header value and decodes back to the original bytes.
pub(crate) fn encode_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A metadata key S3 and HTTP accept unchanged: lower-case letters, digits,
/// `-`, `_` and `.`. Others are lower-cased if that is all they need.
fn normalize_key(key: &str) -> Option<String> {
    let key = key.to_ascii_lowercase();
    let ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    ok.then_some(key)
}

/// What ferry knows about the source of an object.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'a> {
    /// Server name.
    pub server: &'a str,
    pub path: &'a str,
    pub mtime_unix: i64,
    /// Lower-case hex; `None` while unknown (a multipart upload declares its
    /// metadata before the first byte is read).
    pub sha256: Option<&'a str>,
}

/// User metadata for an object: `ferry-server`, `ferry-path`, `ferry-mtime`,
/// `ferry-sha256` (when known), then the task's own entries (which cannot
/// override ferry's). Entries with unusable keys are skipped; entries that
/// would exceed [`METADATA_LIMIT`] are dropped, least important first
/// (task entries, then the path).
pub(crate) fn metadata(
    source: &Source<'_>,
    extra: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut entries: Vec<(String, String)> = Vec::new();
    if let Some(sha) = source.sha256 {
        entries.push(("ferry-sha256".into(), sha.to_owned()));
    }
    entries.push(("ferry-server".into(), encode_value(source.server)));
    entries.push(("ferry-mtime".into(), source.mtime_unix.to_string()));
    entries.push(("ferry-path".into(), encode_value(source.path)));
    let mut extra: Vec<_> = extra.iter().collect();
    extra.sort();
    for (key, value) in extra {
        match normalize_key(key) {
            Some(key) if !entries.iter().any(|(k, _)| *k == key) => {
                entries.push((key, encode_value(value)));
            }
            Some(_) => {}
            None => tracing::debug!(key, "skipping object metadata entry with unusable key"),
        }
    }
    let mut used = 0;
    let mut out = HashMap::new();
    for (key, value) in entries {
        let len = key.len() + value.len();
        if used + len > METADATA_LIMIT {
            tracing::debug!(
                key,
                len,
                "object metadata entry dropped: over the 2 KiB limit"
            );
            continue;
        }
        used += len;
        out.insert(key, value);
    }
    out
}

/// An object already at the key a transfer writes to, judged (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AlreadyThere {
    /// ferry stored this same version there (same server, path, mtime and
    /// size, and sha256 where both sides know it), under this announcement
    /// id: an earlier attempt of this row (the same id) or an earlier run's
    /// row (another id, e.g. lost in a database restore). Not written again.
    SameVersion { announcement_id: String },
    /// Anything else (another version under a key template without the
    /// version, or an object from outside ferry): written over, as the key
    /// template asks.
    Other,
}

/// What the object with `existing` user metadata and `existing_size` is to
/// the write of `ours` (the metadata this transfer writes, from
/// [`metadata`]) of `size` bytes.
pub(crate) fn judge_existing(
    existing: &HashMap<String, String>,
    existing_size: Option<i64>,
    ours: &HashMap<String, String>,
    size: u64,
) -> AlreadyThere {
    let same = |key: &str| existing.get(key).is_some_and(|v| Some(v) == ours.get(key));
    let same_sha = match (existing.get("ferry-sha256"), ours.get("ferry-sha256")) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    let id = ferry_common::announcement::ANNOUNCEMENT_ID_METADATA;
    match existing.get(id) {
        Some(announcement_id)
            if ours.contains_key(id)
                && same("ferry-server")
                && same("ferry-path")
                && same("ferry-mtime")
                && same_sha
                && existing_size.and_then(|s| u64::try_from(s).ok()) == Some(size) =>
        {
            AlreadyThere::SameVersion {
                announcement_id: announcement_id.clone(),
            }
        }
        _ => AlreadyThere::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_follow_the_source_extension() {
        assert_eq!(content_type("/in/report.csv"), "text/csv");
        assert_eq!(content_type("/in/REPORT.CSV"), "text/csv");
        assert_eq!(content_type("/in/a.tar.gz"), "application/gzip");
        assert_eq!(content_type("/in/photo.JPeG"), "image/jpeg");
        assert_eq!(content_type("/in/no-extension"), "application/octet-stream");
        assert_eq!(
            content_type("/in.d/no-extension"),
            "application/octet-stream"
        );
        assert_eq!(content_type("/in/x.unknown"), "application/octet-stream");
    }

    #[test]
    fn destinations() {
        assert!(check_destination("b", "srv/in/a.csv").is_ok());
        assert!(check_destination("b", "a..b/c").is_ok());
        assert!(check_destination("", "k").is_err());
        for bad in ["", "/abs", "a/../b", "./a", "a\nb", &"x".repeat(1025)] {
            let err = check_destination("b", bad).unwrap_err();
            assert!(err.starts_with("object key"), "{err}");
        }
    }

    #[test]
    fn values_are_header_safe_and_reversible() {
        assert_eq!(encode_value("/in/a b.csv"), "/in/a b.csv");
        assert_eq!(encode_value("/in/é.csv"), "/in/%C3%A9.csv");
        assert_eq!(encode_value("a\tb\r\n"), "a%09b%0D%0A");
        assert_eq!(encode_value("50%"), "50%25");
        assert_eq!(encode_value("\u{7f}"), "%7F");
    }

    fn source(path: &str) -> Source<'_> {
        Source {
            server: "srv",
            path,
            mtime_unix: 1_700_000_000,
            sha256: Some("ab12"),
        }
    }

    #[test]
    fn ferry_entries_and_task_entries() {
        let extra = HashMap::from([
            ("Team".to_owned(), "ops é".to_owned()),
            ("ferry-path".to_owned(), "spoofed".to_owned()),
            ("bad key".to_owned(), "x".to_owned()),
        ]);
        let md = metadata(&source("/in/ü.csv"), &extra);
        assert_eq!(md["ferry-server"], "srv");
        assert_eq!(md["ferry-path"], "/in/%C3%BC.csv");
        assert_eq!(md["ferry-mtime"], "1700000000");
        assert_eq!(md["ferry-sha256"], "ab12");
        assert_eq!(md["team"], "ops %C3%A9");
        assert_eq!(md.len(), 5, "{md:?}");

        let no_sha = Source {
            sha256: None,
            ..source("/a")
        };
        assert!(!metadata(&no_sha, &HashMap::new()).contains_key("ferry-sha256"));
    }

    #[test]
    fn stays_under_the_size_limit() {
        let long_path = format!("/in/{}", "d".repeat(3000));
        let extra = HashMap::from([("note".to_owned(), "y".repeat(100))]);
        let md = metadata(&source(&long_path), &extra);
        assert!(!md.contains_key("ferry-path"));
        assert!(md.contains_key("ferry-sha256") && md.contains_key("note"));
        let total: usize = md.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total <= METADATA_LIMIT);
    }

    fn version(sha: Option<&str>, announcement: &str) -> HashMap<String, String> {
        let mut extra = HashMap::new();
        extra.insert("ferry-announcement-id".to_owned(), announcement.to_owned());
        metadata(
            &Source {
                server: "acme",
                path: "/out/a.csv",
                mtime_unix: 1_700_000_000,
                sha256: sha,
            },
            &extra,
        )
    }

    #[test]
    fn the_same_version_stored_earlier_is_recognised_with_its_announcement_id() {
        let ours = version(Some("ab"), "id-now");
        for earlier in ["id-now", "id-before-restore"] {
            assert_eq!(
                judge_existing(&version(Some("ab"), earlier), Some(4), &ours, 4),
                AlreadyThere::SameVersion {
                    announcement_id: earlier.to_owned()
                }
            );
        }
        // A multipart object carries no sha256: the version decides.
        assert_eq!(
            judge_existing(&version(None, "x"), Some(4), &ours, 4),
            AlreadyThere::SameVersion {
                announcement_id: "x".to_owned()
            }
        );
    }

    #[test]
    fn anything_else_at_the_key_is_written_over() {
        let ours = version(Some("ab"), "id-now");
        let other_bytes = version(Some("cd"), "x");
        assert_eq!(
            judge_existing(&other_bytes, Some(4), &ours, 4),
            AlreadyThere::Other
        );
        assert_eq!(
            judge_existing(&version(Some("ab"), "x"), Some(5), &ours, 4),
            AlreadyThere::Other
        );
        assert_eq!(
            judge_existing(&HashMap::new(), Some(4), &ours, 4),
            AlreadyThere::Other
        );
        let mut older_ferry = version(Some("ab"), "x");
        older_ferry.remove("ferry-announcement-id");
        assert_eq!(
            judge_existing(&older_ferry, Some(4), &ours, 4),
            AlreadyThere::Other
        );
        let mut other_mtime = version(Some("ab"), "x");
        other_mtime.insert("ferry-mtime".into(), "1".into());
        assert_eq!(
            judge_existing(&other_mtime, Some(4), &ours, 4),
            AlreadyThere::Other
        );
    }
}
