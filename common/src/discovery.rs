//! What an agent may report as discovered: each entry of a discovery batch is
//! checked against the watch it claims to belong to, so an agent cannot make
//! other agents upload (and later delete) paths outside what an operator
//! configured. Pure: the coordinator loads the watch and applies
//! [`WatchScope::check`] to every entry, keeping the valid ones.

use std::fmt;

use globset::GlobMatcher;

use crate::validate::{self, FieldError};

/// Latest mtime accepted: 9999-12-31T23:59:59Z (later ones are not
/// representable as timestamps in announcements).
pub const MAX_MTIME_UNIX: i64 = 253_402_300_799;

/// Longest remote path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// A watch's directory, glob and recursion: the remote files it covers.
#[derive(Debug, Clone)]
pub struct WatchScope {
    /// Absolute, without trailing slash (except `/` itself).
    directory: String,
    glob: GlobMatcher,
    recursive: bool,
}

/// A discovered entry that is valid for its watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub size: i64,
    pub mtime_unix: i64,
}

/// Why a discovered entry is not a file of its watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryFault {
    /// Longer than [`MAX_PATH_BYTES`].
    PathTooLong(usize),
    /// Contains a NUL byte.
    Nul,
    /// A `.`, `..` or empty segment (or a relative path).
    Unnormalized,
    /// Not below the watch's directory.
    OutsideDirectory,
    /// In a subdirectory of a non-recursive watch.
    NotRecursive,
    /// The file name does not match the watch's glob.
    GlobMismatch,
    /// Larger than a signed 64-bit size.
    SizeTooLarge(u64),
    /// Before 1970 or after [`MAX_MTIME_UNIX`].
    MtimeOutOfRange(i64),
}

impl fmt::Display for EntryFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryFault::PathTooLong(n) => {
                write!(f, "path is {n} bytes long (at most {MAX_PATH_BYTES})")
            }
            EntryFault::Nul => write!(f, "path contains a NUL byte"),
            EntryFault::Unnormalized => {
                write!(f, "path is not absolute or has '.', '..' or empty segments")
            }
            EntryFault::OutsideDirectory => write!(f, "path is not under the watch's directory"),
            EntryFault::NotRecursive => {
                write!(f, "path is in a subdirectory of a non-recursive watch")
            }
            EntryFault::GlobMismatch => write!(f, "file name does not match the watch's glob"),
            EntryFault::SizeTooLarge(n) => write!(f, "size {n} is larger than {}", i64::MAX),
            EntryFault::MtimeOutOfRange(t) => {
                write!(f, "mtime {t} is outside 0..={MAX_MTIME_UNIX}")
            }
        }
    }
}

impl std::error::Error for EntryFault {}

impl WatchScope {
    /// The scope of a watch as stored (directory and glob were validated when
    /// the watch was written; an invalid one is reported, not trusted).
    pub fn new(directory: &str, glob: &str, recursive: bool) -> Result<Self, FieldError> {
        Ok(WatchScope {
            directory: validate::directory(directory)?,
            glob: validate::glob_matcher(glob)?,
            recursive,
        })
    }

    /// Checks one reported entry: a normalized absolute path under the
    /// directory (directly, unless recursive) whose name matches the glob, a
    /// size that fits the database, a plausible mtime.
    pub fn check(&self, path: &str, size: u64, mtime_unix: i64) -> Result<Entry, EntryFault> {
        if path.len() > MAX_PATH_BYTES {
            return Err(EntryFault::PathTooLong(path.len()));
        }
        if path.contains('\0') {
            return Err(EntryFault::Nul);
        }
        let Some(absolute) = path.strip_prefix('/') else {
            return Err(EntryFault::Unnormalized);
        };
        if absolute
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(EntryFault::Unnormalized);
        }
        let relative = if self.directory == "/" {
            Some(absolute)
        } else {
            path.strip_prefix(self.directory.as_str())
                .and_then(|r| r.strip_prefix('/'))
        };
        let Some(relative) = relative else {
            return Err(EntryFault::OutsideDirectory);
        };
        let name = match relative.rsplit_once('/') {
            Some(_) if !self.recursive => return Err(EntryFault::NotRecursive),
            Some((_, name)) => name,
            None => relative,
        };
        if !self.glob.is_match(name) {
            return Err(EntryFault::GlobMismatch);
        }
        let size = i64::try_from(size).map_err(|_| EntryFault::SizeTooLarge(size))?;
        if !(0..=MAX_MTIME_UNIX).contains(&mtime_unix) {
            return Err(EntryFault::MtimeOutOfRange(mtime_unix));
        }
        Ok(Entry {
            path: path.to_string(),
            size,
            mtime_unix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_700_000_000;

    fn csv(recursive: bool) -> WatchScope {
        WatchScope::new("/data/in/", "*.csv", recursive).unwrap()
    }

    #[test]
    fn files_of_the_watch_are_accepted() {
        assert_eq!(
            csv(false).check("/data/in/a.csv", 10, T),
            Ok(Entry {
                path: "/data/in/a.csv".into(),
                size: 10,
                mtime_unix: T
            })
        );
        assert!(csv(true).check("/data/in/x/y/a.csv", 0, 0).is_ok());
        let root = WatchScope::new("/", "", false).unwrap();
        assert!(root.check("/a.bin", 1, T).is_ok());
        assert_eq!(root.check("/x/a.bin", 1, T), Err(EntryFault::NotRecursive));
        assert!(
            csv(false)
                .check("/data/in/b.csv", 1, MAX_MTIME_UNIX)
                .is_ok()
        );
    }

    #[test]
    fn everything_else_is_rejected_naming_why() {
        use EntryFault as F;
        let w = csv(false);
        let cases: [(&str, u64, i64, EntryFault); 13] = [
            ("/etc/passwd.csv", 1, T, F::OutsideDirectory),
            ("/data/inbox/a.csv", 1, T, F::OutsideDirectory),
            ("/data/in", 1, T, F::OutsideDirectory),
            ("/data/in/notes.txt", 1, T, F::GlobMismatch),
            ("/data/in/sub/a.csv", 1, T, F::NotRecursive),
            ("/data/in/a\0b.csv", 1, T, F::Nul),
            ("/data/in/../etc/a.csv", 1, T, F::Unnormalized),
            ("/data/in/./a.csv", 1, T, F::Unnormalized),
            ("/data/in//a.csv", 1, T, F::Unnormalized),
            ("data/in/a.csv", 1, T, F::Unnormalized),
            ("/data/in/a.csv", u64::MAX, T, F::SizeTooLarge(u64::MAX)),
            ("/data/in/a.csv", 1, -5, F::MtimeOutOfRange(-5)),
            ("/data/in/a.csv", 1, i64::MAX, F::MtimeOutOfRange(i64::MAX)),
        ];
        for (path, size, mtime, fault) in cases {
            assert_eq!(w.check(path, size, mtime), Err(fault), "{path:?}");
        }
        let long = format!("/data/in/{}.csv", "x".repeat(MAX_PATH_BYTES));
        assert!(matches!(w.check(&long, 1, T), Err(F::PathTooLong(_))));
        assert!(F::GlobMismatch.to_string().contains("glob"));
    }

    #[test]
    fn a_watch_that_cannot_be_read_is_an_error() {
        assert_eq!(
            WatchScope::new("relative", "*", false).unwrap_err().field,
            "directory"
        );
        assert_eq!(
            WatchScope::new("/in", "[a-", false).unwrap_err().field,
            "glob"
        );
    }
}
