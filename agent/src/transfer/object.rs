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

/// The metadata entries ferry writes itself (besides the task's).
const SHA256: &str = "ferry-sha256";
const SERVER: &str = "ferry-server";
const MTIME: &str = "ferry-mtime";
const PATH: &str = "ferry-path";
/// The sha256 of the encoded path, written instead of the path when the
/// path does not fit the budget (judging an existing object needs one).
const PATH_SHA256: &str = "ferry-path-sha256";
/// The keys of entries dropped for the budget, comma-separated.
const DROPPED: &str = "ferry-dropped";
/// Bytes kept free for [`DROPPED`] once anything is dropped.
const DROPPED_BUDGET: usize = 128;

/// User metadata for an object, within [`METADATA_LIMIT`]. First, and
/// always written: the announcement id (the task's `ferry-announcement-id`),
/// `ferry-sha256` (when known), `ferry-server`, `ferry-mtime` and the path
/// as `ferry-path`, or as `ferry-path-sha256` when the encoded path does not
/// fit (these are what [`judge_existing`] compares; together at most about
/// 400 bytes, as server names are at most 128). Then the task's other
/// entries (which cannot override ferry's), in key order, as far as they
/// fit. Entries with unusable keys are skipped. When anything is dropped,
/// `ferry-dropped` names what (cut short itself if need be) and a warning is
/// logged.
pub(crate) fn metadata(
    source: &Source<'_>,
    extra: &HashMap<String, String>,
) -> HashMap<String, String> {
    let id_key = ferry_common::announcement::ANNOUNCEMENT_ID_METADATA;
    let mut required: Vec<(String, String)> = Vec::new();
    if let Some(id) = extra.get(id_key) {
        required.push((id_key.to_owned(), encode_value(id)));
    }
    if let Some(sha) = source.sha256 {
        required.push((SHA256.into(), sha.to_owned()));
    }
    required.push((SERVER.into(), encode_value(source.server)));
    required.push((MTIME.into(), source.mtime_unix.to_string()));
    let mut dropped: Vec<String> = Vec::new();
    let path = encode_value(source.path);
    // Decided without the task's entries, so every attempt and every row of
    // one version chooses the same form.
    if size_of(&required) + PATH.len() + path.len() <= METADATA_LIMIT - DROPPED_BUDGET {
        required.push((PATH.into(), path));
    } else {
        required.push((PATH_SHA256.into(), path_sha256(&path)));
        dropped.push(PATH.into());
    }
    let mut optional: Vec<(String, String)> = Vec::new();
    let mut extra: Vec<_> = extra.iter().collect();
    extra.sort();
    for (key, value) in extra {
        match normalize_key(key) {
            Some(key)
                if !required.iter().any(|(k, _)| *k == key)
                    && ![PATH, PATH_SHA256, DROPPED].contains(&key.as_str()) =>
            {
                optional.push((key, encode_value(value)));
            }
            Some(_) => {}
            None => tracing::debug!(key, "skipping object metadata entry with unusable key"),
        }
    }
    let mut used = size_of(&required);
    let mut out: HashMap<String, String> = required.into_iter().collect();
    if dropped.is_empty() && used + size_of(&optional) <= METADATA_LIMIT {
        out.extend(optional);
        return out;
    }
    for (key, value) in optional {
        let len = key.len() + value.len();
        if used + len > METADATA_LIMIT - DROPPED_BUDGET {
            dropped.push(key);
            continue;
        }
        used += len;
        out.insert(key, value);
    }
    if !dropped.is_empty() {
        tracing::warn!(
            path = %source.path,
            dropped = %dropped.join(","),
            "object metadata entries dropped: over S3's 2 KiB user-metadata limit"
        );
        out.insert(
            DROPPED.into(),
            dropped_list(&dropped, DROPPED_BUDGET - DROPPED.len()),
        );
    }
    out
}

fn size_of<'a>(entries: impl IntoIterator<Item = &'a (String, String)>) -> usize {
    entries.into_iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// `names` joined by `,`, within `budget` bytes: cut at a name, ending in
/// `,...` when cut.
fn dropped_list(names: &[String], budget: usize) -> String {
    let mut out = String::new();
    for name in names {
        let sep = if out.is_empty() { "" } else { "," };
        if out.len() + sep.len() + name.len() + ",...".len() > budget {
            out.push_str(if out.is_empty() { "..." } else { ",..." });
            return out;
        }
        out.push_str(sep);
        out.push_str(name);
    }
    out
}

/// Lower-case hex sha256 of an encoded path ([`PATH_SHA256`]).
fn path_sha256(encoded: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(encoded.as_bytes()))
}

/// The path an object's metadata names, as the sha256 of its encoded form
/// (whichever of the two forms it carries).
fn path_id(metadata: &HashMap<String, String>) -> Option<String> {
    match (metadata.get(PATH_SHA256), metadata.get(PATH)) {
        (Some(sha), _) => Some(sha.clone()),
        (None, Some(path)) => Some(path_sha256(path)),
        (None, None) => None,
    }
}

/// An object already at the key a transfer writes to, judged (pure).
/// **Rule:** ferry never writes over an object: whatever is there that is
/// not this version's bytes stays, and the version goes to its key of its
/// own (or fails).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AlreadyThere {
    /// ferry stored exactly these bytes of this version there (same server,
    /// path, mtime, size and sha256), under this announcement id: an earlier
    /// attempt of this row (the same id) or an earlier run's row (another
    /// id, e.g. lost in a database restore). Not written again.
    SameBytes { announcement_id: String },
    /// ferry's object of this version (same server, path, mtime and size)
    /// whose bytes are not known to be these: one side's sha256 is unknown.
    /// `sha256` is the existing object's, if it carries one; without it (a
    /// multipart object: its metadata is written before its bytes are read)
    /// only reading the object back tells.
    SameVersion {
        announcement_id: String,
        sha256: Option<String>,
    },
    /// Anything else: other bytes of this version, another version or file,
    /// an object from outside ferry. Never written over.
    Other,
}

/// What the object with `existing` user metadata and `existing_size` is to
/// the write of `ours` (the metadata this transfer writes, from
/// [`metadata`]) of `size` bytes hashing to `our_sha256`, if known yet.
pub(crate) fn judge_existing(
    existing: &HashMap<String, String>,
    existing_size: Option<i64>,
    ours: &HashMap<String, String>,
    size: u64,
    our_sha256: Option<&str>,
) -> AlreadyThere {
    let same = |key: &str| existing.get(key).is_some_and(|v| Some(v) == ours.get(key));
    let id = ferry_common::announcement::ANNOUNCEMENT_ID_METADATA;
    let (Some(announcement_id), true) = (existing.get(id), ours.contains_key(id)) else {
        return AlreadyThere::Other;
    };
    let same_version = same(SERVER)
        && same(MTIME)
        && path_id(existing).is_some()
        && path_id(existing) == path_id(ours)
        && existing_size.and_then(|s| u64::try_from(s).ok()) == Some(size);
    if !same_version {
        return AlreadyThere::Other;
    }
    let announcement_id = announcement_id.clone();
    match (existing.get(SHA256), our_sha256) {
        (Some(theirs), Some(ours)) if theirs == ours => AlreadyThere::SameBytes { announcement_id },
        (Some(_), Some(_)) => AlreadyThere::Other,
        (theirs, _) => AlreadyThere::SameVersion {
            announcement_id,
            sha256: theirs.cloned(),
        },
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
        assert_eq!(md["ferry-path-sha256"], path_sha256(&long_path));
        assert!(md.contains_key("ferry-sha256") && md.contains_key("note"));
        assert_eq!(md["ferry-dropped"], "ferry-path");
        let total: usize = md.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total <= METADATA_LIMIT);
    }

    #[test]
    fn the_announcement_id_and_the_judged_fields_always_fit() {
        let id = "0f8e2a1c-5b7d-4e3a-9c6b-2d1f0e9a8b7c";
        let server = "s".repeat(128);
        // Every length of a non-ASCII path around the budget, with task
        // entries that crowd it.
        for n in 250..400 {
            let path = format!("/in/{}x.csv", "é".repeat(n));
            let extra = HashMap::from([
                ("ferry-announcement-id".to_owned(), id.to_owned()),
                ("ferry-file-id".to_owned(), "123456".to_owned()),
                ("team".to_owned(), "ü".repeat(200)),
            ]);
            let source = Source {
                server: &server,
                path: &path,
                mtime_unix: 1_700_000_000,
                sha256: Some(&"a".repeat(64)),
            };
            let md = metadata(&source, &extra);
            assert_eq!(md["ferry-announcement-id"], id, "path of {n}");
            assert!(md.contains_key("ferry-sha256") && md.contains_key("ferry-mtime"));
            assert_eq!(md["ferry-server"], server);
            assert!(md.contains_key("ferry-path") || md.contains_key("ferry-path-sha256"));
            let total: usize = md.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(total <= METADATA_LIMIT, "{total} bytes for a path of {n}");
            let kept_all = md.contains_key("ferry-path") && md.contains_key("team");
            assert_eq!(!kept_all, md.contains_key("ferry-dropped"), "{md:?}");
        }
    }

    #[test]
    fn dropped_names_are_listed_within_their_budget() {
        let names: Vec<String> = (0..40).map(|i| format!("entry-{i}")).collect();
        assert_eq!(dropped_list(&names[..2], 100), "entry-0,entry-1");
        let cut = dropped_list(&names, 50);
        assert!(cut.len() <= 50 && cut.ends_with(",..."), "{cut}");
        assert_eq!(dropped_list(&names, 5), "...");
    }

    fn version(sha: Option<&str>, announcement: &str) -> HashMap<String, String> {
        version_at("/out/a.csv", sha, announcement)
    }

    fn version_at(path: &str, sha: Option<&str>, announcement: &str) -> HashMap<String, String> {
        let mut extra = HashMap::new();
        extra.insert("ferry-announcement-id".to_owned(), announcement.to_owned());
        metadata(
            &Source {
                server: "acme",
                path,
                mtime_unix: 1_700_000_000,
                sha256: sha,
            },
            &extra,
        )
    }

    #[test]
    fn the_same_bytes_stored_earlier_are_recognised_with_their_announcement_id() {
        let ours = version(Some("ab"), "id-now");
        for earlier in ["id-now", "id-before-restore"] {
            assert_eq!(
                judge_existing(&version(Some("ab"), earlier), Some(4), &ours, 4, Some("ab")),
                AlreadyThere::SameBytes {
                    announcement_id: earlier.to_owned()
                }
            );
        }
        let long = format!("/out/{}", "é".repeat(400));
        assert_eq!(
            judge_existing(
                &version_at(&long, Some("ab"), "x"),
                Some(4),
                &version_at(&long, Some("ab"), "y"),
                4,
                Some("ab")
            ),
            AlreadyThere::SameBytes {
                announcement_id: "x".to_owned()
            }
        );
    }

    #[test]
    fn a_version_whose_bytes_are_unknown_on_one_side_is_only_a_candidate() {
        // A multipart object carries no sha256: its bytes must be read back.
        let ours = version(None, "id-now");
        assert_eq!(
            judge_existing(&version(None, "x"), Some(4), &ours, 4, Some("ab")),
            AlreadyThere::SameVersion {
                announcement_id: "x".to_owned(),
                sha256: None
            }
        );
        // Before our bytes are read, the existing object's sha256 is kept to
        // compare with them.
        assert_eq!(
            judge_existing(&version(Some("cd"), "x"), Some(4), &ours, 4, None),
            AlreadyThere::SameVersion {
                announcement_id: "x".to_owned(),
                sha256: Some("cd".to_owned())
            }
        );
    }

    #[test]
    fn anything_else_at_the_key_is_other() {
        let ours = version(Some("ab"), "id-now");
        let judge = |existing: &HashMap<String, String>, size| {
            judge_existing(existing, Some(size), &ours, 4, Some("ab"))
        };
        assert_eq!(judge(&version(Some("cd"), "x"), 4), AlreadyThere::Other);
        assert_eq!(judge(&version(Some("ab"), "x"), 5), AlreadyThere::Other);
        assert_eq!(judge(&HashMap::new(), 4), AlreadyThere::Other);
        let mut older_ferry = version(Some("ab"), "x");
        older_ferry.remove("ferry-announcement-id");
        assert_eq!(judge(&older_ferry, 4), AlreadyThere::Other);
        let mut other_mtime = version(Some("ab"), "x");
        other_mtime.insert("ferry-mtime".into(), "1".into());
        assert_eq!(judge(&other_mtime, 4), AlreadyThere::Other);
        let other_path = version_at("/out/b.csv", Some("ab"), "x");
        assert_eq!(judge(&other_path, 4), AlreadyThere::Other);
    }
}
