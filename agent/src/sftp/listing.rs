//! Directory walking: streams `READDIR` replies, keeps regular files whose
//! name matches the watch glob, and descends into subdirectories on request.
//!
//! Entry types come from the attributes in the `READDIR` reply, which
//! servers fill with `lstat` semantics: a symlink shows up as a symlink and is
//! skipped, so links can neither escape the watched tree nor loop.
//!
//! A listing is bounded whatever the server says ([`ListingLimits`]): it
//! reads at most `max_entries` directory entries (an endless `READDIR` ends
//! the listing with [`SftpError::ListingLimit`]), descends at most
//! [`MAX_DEPTH`] levels, and skips names over [`MAX_NAME_BYTES`] and paths
//! over [`MAX_PATH_BYTES`]; what it skipped is told by [`Listing::problems`].

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::{BoxFuture, MaybeDone, maybe_done};
use globset::GlobMatcher;
use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpLibError;
use russh_sftp::protocol::{FileAttributes, Name, StatusCode};

use super::error::SftpError;
use super::session::{FileKind, RemoteFile, SftpSession};

/// Levels below the watch directory a recursive listing descends.
pub(crate) const MAX_DEPTH: usize = 64;
/// Longest entry name taken, in bytes (file systems allow 255; servers on
/// UTF-16 file systems up to 765).
pub(crate) const MAX_NAME_BYTES: usize = 1024;
/// Longest path taken, in bytes (Linux `PATH_MAX`).
pub(crate) const MAX_PATH_BYTES: usize = 4096;
/// Default of [`ListingLimits::max_entries`] (`FERRY_MAX_LISTING_ENTRIES`).
pub(crate) const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
/// Longest excerpt of a name or path quoted in a message.
const QUOTE_CHARS: usize = 120;

/// Bounds of one listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListingLimits {
    /// Directory entries read per listing (every entry of every directory,
    /// whether it matches or not).
    pub max_entries: u64,
    pub max_depth: usize,
    pub max_name_bytes: usize,
    pub max_path_bytes: usize,
}

impl Default for ListingLimits {
    fn default() -> Self {
        ListingLimits {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_depth: MAX_DEPTH,
            max_name_bytes: MAX_NAME_BYTES,
            max_path_bytes: MAX_PATH_BYTES,
        }
    }
}

/// A listing in progress; see [`SftpSession::listing`].
///
/// Holds at most one open directory handle on the server, with up to
/// [`READDIR_AHEAD`] requests on it. Dropping it early closes that handle in
/// the background.
pub(crate) struct Listing<'a> {
    session: &'a SftpSession,
    glob: &'a GlobMatcher,
    recursive: bool,
    limits: ListingLimits,
    /// The watch directory as given, for messages.
    watch_dir: String,
    /// The watch directory until it has been opened.
    root: Option<String>,
    /// Subdirectories still to read (absolute paths) and their depth below
    /// the watch directory.
    pending: Vec<(String, usize)>,
    open: Option<OpenDir>,
    /// Directory entries read so far.
    entries: u64,
    /// The first entry skipped for a limit, and how many were.
    first_problem: Option<String>,
    problems: u64,
}

/// `READDIR` requests kept in flight on the open directory. One reply
/// holds about 100 entries (OpenSSH), so a directory of 100,000 files took
/// 1,000 round trips one after another; a few requests ahead overlap them.
/// Replies are consumed in the order the requests were sent; the
/// directory's end is the first end-of-directory reply, and the requests
/// sent after it are still awaited (a server that answers out of order may
/// have given one of them entries), their errors ignored.
const READDIR_AHEAD: usize = 4;
/// A reply with at least this many entries (OpenSSH sends up to 100) marks
/// a large directory: from then on [`READDIR_AHEAD`] requests are kept in
/// flight. Until then one at a time: most polled directories hold a few
/// files, which one reply carries before the end-of-directory reply, and
/// every request sent past the end is work for the server and the agent on
/// each poll (with 1,000 servers polled every 2 s, 1,500 such requests a
/// second).
const FULL_REPLY: usize = 50;

/// Requests to keep in flight after a reply of `entries` entries, from
/// `ahead` (pure): one until a reply is full, then [`READDIR_AHEAD`].
fn readdir_ahead(ahead: usize, entries: usize) -> usize {
    if entries >= FULL_REPLY {
        READDIR_AHEAD
    } else {
        ahead
    }
}

/// A `READDIR` request sent, with its reply once it came.
type Pending = MaybeDone<BoxFuture<'static, Result<Name, SftpLibError>>>;

struct OpenDir {
    path: String,
    /// Levels below the watch directory (the watch directory is 0).
    depth: usize,
    handle: String,
    /// Requests sent and not yet consumed, oldest first.
    ahead: VecDeque<Pending>,
    /// How many requests to keep in flight ([`readdir_ahead`]).
    limit: usize,
    /// A reply said end of directory: no more requests are sent.
    at_end: bool,
}

impl OpenDir {
    fn new(path: String, depth: usize, handle: String) -> Self {
        OpenDir {
            path,
            depth,
            handle,
            ahead: VecDeque::new(),
            limit: 1,
            at_end: false,
        }
    }
}

/// What to do with one directory entry.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Skip,
    /// A regular file matching the glob.
    Match,
    /// A subdirectory to descend into.
    Descend,
}

impl<'a> Listing<'a> {
    pub(crate) fn new(
        session: &'a SftpSession,
        dir: &str,
        glob: &'a GlobMatcher,
        recursive: bool,
        limits: ListingLimits,
    ) -> Listing<'a> {
        Listing {
            session,
            glob,
            recursive,
            limits,
            watch_dir: dir.to_owned(),
            root: Some(dir.to_owned()),
            pending: Vec::new(),
            open: None,
            entries: 0,
            first_problem: None,
            problems: 0,
        }
    }

    /// What the listing skipped for a limit (a name, path or depth over
    /// its bound), or `None`: the first case and how many there were.
    pub(crate) fn problems(&self) -> Option<String> {
        let first = self.first_problem.as_ref()?;
        Some(match self.problems {
            0 | 1 => first.clone(),
            n => format!("{first} (and {} more entries skipped)", n - 1),
        })
    }

    fn skipped(&mut self, why: String) {
        tracing::warn!(target = %self.session.target(), watch_dir = %self.watch_dir, "{why}");
        self.problems += 1;
        if self.first_problem.is_none() {
            self.first_problem = Some(why);
        }
    }

    /// The next non-empty batch of matching files, or `None` when the walk
    /// is complete.
    ///
    /// The watch directory itself failing (missing: [`SftpError::NotFound`],
    /// unreadable, ...) is an error, and so is a listing that reads more
    /// than [`ListingLimits::max_entries`] entries
    /// ([`SftpError::ListingLimit`]). A subdirectory that vanished or cannot
    /// be read is skipped (logged), so one bad subtree does not hide the rest.
    pub(crate) async fn next_batch(&mut self) -> Result<Option<Vec<RemoteFile>>, SftpError> {
        loop {
            let Some(dir) = &mut self.open else {
                if self.open_next_dir().await? {
                    continue;
                }
                return Ok(None);
            };
            while !dir.at_end && dir.ahead.len() < dir.limit {
                self.session.touch();
                let (sftp, handle) = (self.session.sftp().clone(), dir.handle.clone());
                let mut request = maybe_done(async move { sftp.readdir(handle).await }.boxed());
                // Polled once: the request goes out now, behind the others.
                let _ = futures::poll!(&mut request);
                dir.ahead.push_back(request);
            }
            let (path, depth, at_end) = (dir.path.clone(), dir.depth, dir.at_end);
            let Some(mut request) = dir.ahead.pop_front() else {
                // The end was seen and every request sent is answered.
                self.close_open().await;
                continue;
            };
            (&mut request).await;
            let Some(reply) = Pin::new(&mut request).take_output() else {
                // Not reachable: a finished `MaybeDone` holds its output.
                continue;
            };
            match reply {
                Ok(name) => {
                    if let Some(dir) = &mut self.open {
                        dir.limit = readdir_ahead(dir.limit, name.files.len());
                    }
                    self.entries = self.entries.saturating_add(name.files.len() as u64);
                    if let Some(why) = over_entry_limit(self.entries, &self.limits) {
                        self.close_open().await;
                        return Err(SftpError::ListingLimit(format!(
                            "listing of {} stopped in {}: {why}",
                            quote(&self.watch_dir),
                            quote(&path)
                        )));
                    }
                    let mut batch = Vec::new();
                    for file in name.files {
                        self.take(&path, depth, file, &mut batch).await?;
                    }
                    if !batch.is_empty() {
                        return Ok(Some(batch));
                    }
                }
                Err(SftpLibError::Status(status)) if status.status_code == StatusCode::Eof => {
                    if let Some(dir) = &mut self.open {
                        dir.at_end = true;
                    }
                }
                Err(e) if at_end => {
                    tracing::debug!(target = %self.session.target(), dir = path, error = %e, "READDIR after the end of the directory failed; ignored");
                }
                Err(e) => {
                    self.close_open().await;
                    return Err(self.session.error(e, &path));
                }
            }
        }
    }

    /// Opens the next directory to read; false when none is left.
    async fn open_next_dir(&mut self) -> Result<bool, SftpError> {
        let sftp = self.session.sftp();
        if let Some(root) = self.root.take() {
            let root = if root.starts_with('/') {
                trim_dir(&root).to_owned()
            } else {
                // Relative to the login directory; results must be absolute.
                let relative = if root.is_empty() { "." } else { root.as_str() };
                let name = sftp
                    .realpath(relative)
                    .await
                    .map_err(|e| self.session.error(e, relative))?;
                match name.files.into_iter().next() {
                    Some(file) => trim_dir(&file.filename).to_owned(),
                    None => {
                        return Err(SftpError::Protocol(format!(
                            "{relative}: server resolved the path to nothing"
                        )));
                    }
                }
            };
            self.session.touch();
            let handle = sftp
                .opendir(root.as_str())
                .await
                .map_err(|e| self.session.error(e, &root))?
                .handle;
            self.open = Some(OpenDir::new(root, 0, handle));
            return Ok(true);
        }
        while let Some((dir, depth)) = self.pending.pop() {
            self.session.touch();
            match sftp.opendir(dir.as_str()).await {
                Ok(handle) => {
                    self.open = Some(OpenDir::new(dir, depth, handle.handle));
                    return Ok(true);
                }
                Err(e) => match self.session.error(e, &dir) {
                    SftpError::NotFound(_) => {
                        tracing::debug!(target = %self.session.target(), dir, "subdirectory vanished during listing");
                    }
                    SftpError::PermissionDenied(_) => {
                        tracing::warn!(target = %self.session.target(), dir, "cannot read subdirectory (permission denied); skipping it");
                    }
                    other => return Err(other),
                },
            }
        }
        Ok(false)
    }

    /// Files one entry of `dir` into `batch` or the pending directories.
    async fn take(
        &mut self,
        dir: &str,
        depth: usize,
        file: russh_sftp::protocol::File,
        batch: &mut Vec<RemoteFile>,
    ) -> Result<(), SftpError> {
        let mut entry = classify_entry(
            &file.filename,
            &file.attrs,
            &file.longname,
            self.glob,
            self.recursive,
        );
        if entry != Entry::Skip
            && let Some(why) = over_bounds(dir, &file.filename, depth, &entry, &self.limits)
        {
            self.skipped(why);
            entry = Entry::Skip;
        }
        match entry {
            Entry::Skip => {
                if file
                    .filename
                    .contains(['/', '\0', char::REPLACEMENT_CHARACTER])
                {
                    tracing::warn!(target = %self.session.target(), dir, name = %file.filename.escape_debug(), "skipping entry with an unusable name (slash, NUL or not UTF-8)");
                }
            }
            Entry::Descend => self.pending.push((join(dir, &file.filename), depth + 1)),
            Entry::Match => {
                let path = join(dir, &file.filename);
                let (size, mtime) = match (file.attrs.size, file.attrs.mtime) {
                    (Some(size), Some(mtime)) => (Some(size), Some(i64::from(mtime))),
                    // Some servers omit attributes in READDIR; ask for them.
                    _ => match self.session.lstat(&path).await {
                        Ok(stat) => (stat.size, stat.mtime_unix),
                        Err(SftpError::NotFound(_)) => (None, None),
                        Err(e) => return Err(e),
                    },
                };
                match (size, mtime) {
                    (Some(size), Some(mtime_unix)) => batch.push(RemoteFile {
                        path,
                        size,
                        mtime_unix,
                    }),
                    _ => {
                        tracing::warn!(target = %self.session.target(), path, "server reports no size or mtime; skipping file");
                    }
                }
            }
        }
        Ok(())
    }

    async fn close_open(&mut self) {
        if let Some(dir) = self.open.take()
            && let Err(e) = self.session.sftp().close(dir.handle).await
        {
            tracing::debug!(target = %self.session.target(), dir = dir.path, error = %e, "closing directory handle");
        }
    }
}

impl Drop for Listing<'_> {
    fn drop(&mut self) {
        if let Some(dir) = self.open.take() {
            close_in_background(self.session.sftp().clone(), dir.handle);
        }
    }
}

/// Decides what one `READDIR` entry is to the walk. Pure.
fn classify_entry(
    name: &str,
    attrs: &FileAttributes,
    longname: &str,
    glob: &GlobMatcher,
    recursive: bool,
) -> Entry {
    if name.is_empty()
        || name == "."
        || name == ".."
        // A name with a slash would address another directory; a lossily
        // decoded non-UTF-8 name cannot be opened again.
        || name.contains(['/', '\0', char::REPLACEMENT_CHARACTER])
    {
        return Entry::Skip;
    }
    let kind = match FileKind::from_attrs(attrs) {
        // No mode bits: fall back to the `ls -l` style long name.
        FileKind::Unknown => match longname.chars().next() {
            Some('-') => FileKind::File,
            Some('d') => FileKind::Dir,
            _ => FileKind::Unknown,
        },
        kind => kind,
    };
    match kind {
        FileKind::File if glob.is_match(name) => Entry::Match,
        FileKind::Dir if recursive => Entry::Descend,
        _ => Entry::Skip,
    }
}

/// Why a listing that has read `entries` entries must stop, or `None`. Pure.
fn over_entry_limit(entries: u64, limits: &ListingLimits) -> Option<String> {
    (entries > limits.max_entries).then(|| {
        format!(
            "more than {} directory entries read (FERRY_MAX_LISTING_ENTRIES); \
             the directory does not end, or the watch covers too much",
            limits.max_entries
        )
    })
}

/// Why the entry `name` of `dir` (at `depth` below the watch directory),
/// taken as `entry`, is over a limit of the listing, or `None`. Pure.
fn over_bounds(
    dir: &str,
    name: &str,
    depth: usize,
    entry: &Entry,
    limits: &ListingLimits,
) -> Option<String> {
    if name.len() > limits.max_name_bytes {
        return Some(format!(
            "skipped an entry of {}: its name is {} bytes, over the limit of {} ({})",
            quote(dir),
            name.len(),
            limits.max_name_bytes,
            quote(name)
        ));
    }
    let path_len = dir.len() + 1 + name.len();
    if path_len > limits.max_path_bytes {
        return Some(format!(
            "skipped an entry of {}: its path is {path_len} bytes, over the limit of {}",
            quote(dir),
            limits.max_path_bytes
        ));
    }
    if *entry == Entry::Descend && depth + 1 > limits.max_depth {
        return Some(format!(
            "skipped directory {}: deeper than {} levels below the watch directory",
            quote(&join(dir, name)),
            limits.max_depth
        ));
    }
    None
}

/// `text` escaped for a message, cut to [`QUOTE_CHARS`] characters (the
/// tail of a deep path is what tells where it is).
fn quote(text: &str) -> String {
    let escaped: Vec<char> = text.escape_debug().collect();
    if escaped.len() <= QUOTE_CHARS {
        return escaped.into_iter().collect();
    }
    let tail: String = escaped[escaped.len() - QUOTE_CHARS..].iter().collect();
    format!("...{tail}")
}

/// `dir` without trailing slashes, except the root itself.
fn trim_dir(dir: &str) -> &str {
    let trimmed = dir.trim_end_matches('/');
    if trimmed.is_empty() && dir.starts_with('/') {
        "/"
    } else {
        trimmed
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Sends `CLOSE` for `handle` without waiting for the answer, if a Tokio
/// runtime is around to run it (otherwise the server frees the handle when
/// the channel closes).
fn close_in_background(sftp: Arc<RawSftpSession>, handle: String) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(e) = sftp.close(handle).await {
                tracing::debug!(error = %e, "closing abandoned SFTP handle");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_directory_is_read_one_request_at_a_time_and_a_large_one_ahead() {
        // A poll of a directory of 5 files: the reply of 5, then the end.
        assert_eq!(readdir_ahead(1, 5), 1);
        assert_eq!(readdir_ahead(1, 0), 1);
        // The first full reply (OpenSSH: 100 entries) opens the pipeline.
        assert_eq!(readdir_ahead(1, 100), READDIR_AHEAD);
        assert_eq!(readdir_ahead(1, FULL_REPLY), READDIR_AHEAD);
        // A short reply later (the tail of the directory) keeps it open.
        assert_eq!(readdir_ahead(READDIR_AHEAD, 7), READDIR_AHEAD);
    }

    fn glob(pattern: &str) -> GlobMatcher {
        globset::Glob::new(pattern)
            .expect("valid glob")
            .compile_matcher()
    }

    fn attrs(mode: Option<u32>) -> FileAttributes {
        FileAttributes {
            permissions: mode,
            size: Some(1),
            mtime: Some(1),
            ..FileAttributes::default()
        }
    }

    const FILE: Option<u32> = Some(0o100_644);
    const DIR: Option<u32> = Some(0o040_755);
    const LINK: Option<u32> = Some(0o120_777);

    #[test]
    fn glob_applies_to_regular_files_by_name() {
        let csv = glob("*.csv");
        let entry = |name: &str, mode| classify_entry(name, &attrs(mode), "", &csv, true);
        assert_eq!(entry("a.csv", FILE), Entry::Match);
        assert_eq!(entry("a.txt", FILE), Entry::Skip);
        // Directories are descended whatever their name, only when recursive.
        assert_eq!(entry("2024", DIR), Entry::Descend);
        assert_eq!(
            classify_entry("2024", &attrs(DIR), "", &csv, false),
            Entry::Skip
        );
        // A directory named like a match is not a file.
        assert_eq!(
            classify_entry("x.csv", &attrs(DIR), "", &csv, false),
            Entry::Skip
        );
    }

    #[test]
    fn symlinks_specials_and_dot_entries_are_skipped() {
        let all = glob("*");
        let entry = |name: &str, mode| classify_entry(name, &attrs(mode), "", &all, true);
        assert_eq!(entry("link.csv", LINK), Entry::Skip);
        assert_eq!(entry("fifo", Some(0o010_644)), Entry::Skip);
        assert_eq!(entry("sock", Some(0o140_755)), Entry::Skip);
        assert_eq!(entry(".", DIR), Entry::Skip);
        assert_eq!(entry("..", DIR), Entry::Skip);
        assert_eq!(entry("a/b", FILE), Entry::Skip);
        assert_eq!(entry("bad\u{FFFD}name", FILE), Entry::Skip);
        // Hidden files are ordinary files to the walker; the glob decides.
        assert_eq!(entry(".hidden", FILE), Entry::Match);
    }

    #[test]
    fn missing_mode_falls_back_to_longname() {
        let all = glob("*");
        let entry = |longname: &str| classify_entry("x", &attrs(None), longname, &all, true);
        assert_eq!(entry("-rw-r--r-- 1 u g 5 Jan 1 00:00 x"), Entry::Match);
        assert_eq!(entry("drwxr-xr-x 2 u g 4096 Jan 1 00:00 x"), Entry::Descend);
        assert_eq!(entry("lrwxrwxrwx 1 u g 3 Jan 1 00:00 x -> y"), Entry::Skip);
        assert_eq!(entry(""), Entry::Skip);
    }

    #[test]
    fn listings_stop_past_the_entry_bound() {
        let limits = ListingLimits {
            max_entries: 100,
            ..ListingLimits::default()
        };
        assert_eq!(over_entry_limit(100, &limits), None);
        let why = over_entry_limit(101, &limits).expect("over");
        assert!(why.contains("more than 100 directory entries"), "{why}");
        assert!(why.contains("FERRY_MAX_LISTING_ENTRIES"), "{why}");
    }

    #[test]
    fn long_names_long_paths_and_deep_directories_are_skipped() {
        let limits = ListingLimits::default();
        let ok =
            |dir: &str, name: &str, depth, entry| over_bounds(dir, name, depth, &entry, &limits);
        assert_eq!(ok("/in", "a.csv", 0, Entry::Match), None);
        let name = "n".repeat(MAX_NAME_BYTES);
        assert_eq!(ok("/in", &name, 0, Entry::Match), None);
        let long = ok("/in", &format!("{name}x"), 0, Entry::Match).expect("too long");
        assert!(
            long.contains("its name is 1025 bytes, over the limit of 1024"),
            "{long}"
        );
        assert!(long.len() < 400, "the message quotes an excerpt: {long}");
        // Four names of the longest length: each fine, the path not.
        let dir = format!("/{0}/{0}/{0}", "d".repeat(MAX_NAME_BYTES));
        let path = ok(&dir, &name, 3, Entry::Match).expect("path too long");
        assert!(
            path.contains("its path is 4100 bytes, over the limit of 4096"),
            "{path}"
        );
        // Directories below the depth bound are not descended; files at
        // the deepest level are still taken.
        assert_eq!(ok("/in/d", "d", MAX_DEPTH - 1, Entry::Descend), None);
        let deep = ok("/in/d", "d", MAX_DEPTH, Entry::Descend).expect("too deep");
        assert!(deep.contains("deeper than 64 levels"), "{deep}");
        assert_eq!(ok("/in/d", "f.csv", MAX_DEPTH, Entry::Match), None);
    }

    #[test]
    fn quotes_are_escaped_and_cut() {
        assert_eq!(quote("/in/a\nb"), "/in/a\\nb");
        let q = quote(&"x".repeat(500));
        assert_eq!(q.len(), QUOTE_CHARS + 3);
        assert!(q.starts_with("..."));
    }

    #[test]
    fn paths_join_without_double_slashes() {
        assert_eq!(trim_dir("/data/in/"), "/data/in");
        assert_eq!(trim_dir("/"), "/");
        assert_eq!(trim_dir("//"), "/");
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/data", "a"), "/data/a");
    }
}
