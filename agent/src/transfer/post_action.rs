//! Post-actions on the source file after its version was stored and
//! announced: delete it, or move it into a directory.

use std::collections::VecDeque;
use std::sync::Mutex;

use ferry_common::domain::PostAction;
use ferry_common::sync::lock;

use super::PostActionOutcome;
use crate::sftp::{FileKind, FileStat, SftpError, SftpSession};

/// Highest suffix tried when the move target name is taken (`name.1` ...).
const MAX_MOVE_SUFFIX: u32 = 1000;

/// The file operations a post-action uses (an SFTP session; a scripted
/// server in the tests).
pub(crate) trait RemoteFiles {
    async fn stat(&self, path: &str) -> Result<FileStat, SftpError>;
    async fn lstat(&self, path: &str) -> Result<FileStat, SftpError>;
    /// Fails (`Failure`) when `to` exists: never replaces a file.
    async fn rename(&self, from: &str, to: &str) -> Result<(), SftpError>;
    async fn remove(&self, path: &str) -> Result<(), SftpError>;
    async fn mkdir_all(&self, dir: &str) -> Result<(), SftpError>;
    /// The sha256 (hex) of the file's bytes.
    async fn sha256(&self, path: &str) -> Result<String, SftpError>;
}

impl RemoteFiles for SftpSession {
    async fn stat(&self, path: &str) -> Result<FileStat, SftpError> {
        SftpSession::stat(self, path).await
    }
    async fn lstat(&self, path: &str) -> Result<FileStat, SftpError> {
        SftpSession::lstat(self, path).await
    }
    async fn rename(&self, from: &str, to: &str) -> Result<(), SftpError> {
        SftpSession::rename(self, from, to).await
    }
    async fn remove(&self, path: &str) -> Result<(), SftpError> {
        SftpSession::remove(self, path).await
    }
    async fn mkdir_all(&self, dir: &str) -> Result<(), SftpError> {
        SftpSession::mkdir_all(self, dir).await
    }
    async fn sha256(&self, path: &str) -> Result<String, SftpError> {
        SftpSession::sha256(self, path).await
    }
}

/// The stored version a post-action is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Version<'a> {
    pub server_id: i64,
    pub file_id: i64,
    pub path: &'a str,
    pub size: u64,
    pub mtime_unix: i64,
    /// The stored bytes' sha256, when they must be compared too: the
    /// request was sent before and not answered, so the action may have
    /// been carried out already and the path may hold a new version of the
    /// same size and mtime.
    pub sha256: Option<&'a str>,
}

/// Post-actions carried out lately (the last [`DONE_REMEMBERED`]), by
/// server, file and version: a request sent again (its answer was lost)
/// reports done without touching the path, which may hold a new version of
/// the same size and mtime by now.
#[derive(Debug, Default)]
pub(crate) struct PostActionsDone(Mutex<VecDeque<DoneEntry>>);

/// (server id, file id, path, size, mtime) of a carried-out post-action.
type DoneEntry = (i64, i64, String, u64, i64);

/// How many carried-out post-actions [`PostActionsDone`] remembers.
const DONE_REMEMBERED: usize = 4096;

impl PostActionsDone {
    fn entry(version: &Version<'_>) -> DoneEntry {
        (
            version.server_id,
            version.file_id,
            version.path.to_owned(),
            version.size,
            version.mtime_unix,
        )
    }

    fn contains(&self, version: &Version<'_>) -> bool {
        lock(&self.0).contains(&Self::entry(version))
    }

    fn insert(&self, version: &Version<'_>) {
        let mut done = lock(&self.0);
        if done.len() >= DONE_REMEMBERED {
            done.pop_front();
        }
        done.push_back(Self::entry(version));
    }
}

/// Runs `action` on the stored version; returns the outcome and the SFTP
/// error behind a failure (for the session's health).
pub(crate) async fn act(
    fs: &impl RemoteFiles,
    done: &PostActionsDone,
    version: &Version<'_>,
    action: &PostAction,
) -> (PostActionOutcome, Option<SftpError>) {
    if done.contains(version) {
        return (PostActionOutcome::Done, None);
    }
    let result = act_once(fs, version, action).await;
    if result.0 == PostActionOutcome::Done {
        done.insert(version);
    }
    result
}

/// The private name a post-action takes the file aside to: hidden, in the
/// same directory (a rename there is atomic and stays on one filesystem),
/// named by the file row so a request sent again finds it.
fn aside_name(path: &str, file_id: i64) -> String {
    let dir = match path.rsplit_once('/') {
        Some((dir, _)) => dir,
        None => "",
    };
    format!("{dir}/.ferry-{file_id}.post-action")
}

/// The action on the checked bytes only: the file at the path is first
/// renamed aside ([`aside_name`]), so a version the producer writes from
/// then on is a new file at the path, untouched; the file taken aside is
/// checked (size and mtime of the stored version) and then deleted or moved
/// (under its own name). If it is another version it is put back and the
/// action refused; if the action fails it is put back too, for the retry.
/// A request sent again finds the file aside if an earlier attempt stopped
/// after taking it there, and nothing at all if it was carried out.
async fn act_once(
    fs: &impl RemoteFiles,
    version: &Version<'_>,
    action: &PostAction,
) -> (PostActionOutcome, Option<SftpError>) {
    let path = version.path;
    let aside = aside_name(path, version.file_id);
    let failed = |what: &str, e: SftpError| {
        (
            PostActionOutcome::Failed(format!("{action} {path}: {what}: {e}")),
            Some(e),
        )
    };
    // 1. Take the file at the path aside.
    let taken = match fs.rename(path, &aside).await {
        Ok(()) => true,
        // Nothing at the path: carried out already, or an earlier attempt
        // stopped with the file aside.
        Err(SftpError::NotFound(_)) => false,
        // The name aside is taken: an earlier attempt's file is there, and
        // the path holds a newer one, which stays.
        Err(SftpError::Failure { .. }) if fs.lstat(&aside).await.is_ok() => false,
        Err(e) => return failed("take aside", e),
    };
    // 2. Check what was taken aside.
    let stat = match fs.stat(&aside).await {
        Ok(stat) => stat,
        Err(SftpError::NotFound(_)) if !taken => return (PostActionOutcome::Done, None),
        Err(e) => {
            let put_back = if taken {
                put_back(fs, &aside, path).await
            } else {
                String::new()
            };
            return failed(&format!("stat {aside}{put_back}"), e);
        }
    };
    if let Err(why) = same_version(&stat, version.size, version.mtime_unix) {
        let put_back = put_back(fs, &aside, path).await;
        return (
            PostActionOutcome::Refused(format!("{action} {path}: {why}{put_back}")),
            None,
        );
    }
    if let Some(stored) = version.sha256 {
        match fs.sha256(&aside).await {
            Ok(now) if now.eq_ignore_ascii_case(stored) => {}
            Ok(now) => {
                let put_back = put_back(fs, &aside, path).await;
                return (
                    PostActionOutcome::Refused(format!(
                        "{action} {path}: other bytes of the same size and mtime \
                         (sha256 {now}, stored {stored}){put_back}"
                    )),
                    None,
                );
            }
            Err(e) => {
                let put_back = put_back(fs, &aside, path).await;
                return failed(&format!("read {aside} to compare its bytes{put_back}"), e);
            }
        }
    }
    // 3. Act on it.
    let result = match action {
        PostAction::Keep => Ok(()),
        PostAction::Delete => match fs.remove(&aside).await {
            Ok(()) | Err(SftpError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        },
        PostAction::Move(dir) => move_into(fs, &aside, name_of(path), dir).await,
    };
    match result {
        Ok(()) => (PostActionOutcome::Done, None),
        Err(e) => {
            let put_back = put_back(fs, &aside, path).await;
            failed(&format!("{}{put_back}", action_verb(action)), e)
        }
    }
}

fn action_verb(action: &PostAction) -> &'static str {
    match action {
        PostAction::Keep => "keep",
        PostAction::Delete => "delete",
        PostAction::Move(_) => "move",
    }
}

/// Renames the file taken aside back to its path; `""` if that worked,
/// else a note for the outcome saying where it stays (the path is taken by
/// a newer file: a rename never replaces one).
async fn put_back(fs: &impl RemoteFiles, aside: &str, path: &str) -> String {
    match fs.rename(aside, path).await {
        Ok(()) => String::new(),
        Err(e) => format!("; it stays at {aside}, as it could not be put back ({e})"),
    }
}

fn name_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether `stat` shows the stored version (`size`, `mtime_unix`); if not, why.
fn same_version(stat: &FileStat, size: u64, mtime_unix: i64) -> Result<(), String> {
    let show = |v: Option<String>| v.unwrap_or_else(|| "unknown".to_owned());
    let (now_size, now_mtime) = (stat.size, stat.mtime_unix);
    if stat.kind == FileKind::File && now_size == Some(size) && now_mtime == Some(mtime_unix) {
        return Ok(());
    }
    Err(format!(
        "changed since stored (size/mtime now {}/{}{}, stored {size}/{mtime_unix})",
        show(now_size.map(|s| s.to_string())),
        show(now_mtime.map(|m| m.to_string())),
        match stat.kind {
            FileKind::File => String::new(),
            kind => format!(", a {kind:?} now"),
        },
    ))
}

/// Renames `path` into `dir` as `name`, or `name.1`, `name.2`, ... when
/// that is taken (a move never replaces a file).
async fn move_into(
    fs: &impl RemoteFiles,
    path: &str,
    name: &str,
    dir: &str,
) -> Result<(), SftpError> {
    fs.mkdir_all(dir).await?;
    for n in 0..=MAX_MOVE_SUFFIX {
        let target = move_target(dir, name, n);
        match fs.rename(path, &target).await {
            Ok(()) => return Ok(()),
            // Plain SFTP rename fails (`Failure`) when the target exists.
            Err(SftpError::Failure { .. }) if fs.lstat(&target).await.is_ok() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(SftpError::Failure {
        path: format!("{dir}/{name}"),
        message: format!("{name} and {name}.1 .. {name}.{MAX_MOVE_SUFFIX} all exist"),
    })
}

/// `dir/name`, or `dir/name.n` for `n > 0`.
fn move_target(dir: &str, name: &str, n: u32) -> String {
    let dir = dir.trim_end_matches('/');
    match n {
        0 => format!("{dir}/{name}"),
        n => format!("{dir}/{name}.{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A file of the scripted server: (size, mtime, content tag).
    type File = (u64, i64, &'static str);

    /// A directory tree in memory whose producer writes `next` to `at` right
    /// after the first call (the moment between any check and any act).
    #[derive(Default)]
    struct Server {
        files: Mutex<BTreeMap<String, File>>,
        producer: Mutex<Option<(String, File)>>,
        calls: Mutex<Vec<String>>,
    }

    impl Server {
        fn with(files: &[(&str, File)]) -> Server {
            let server = Server::default();
            for (path, file) in files {
                lock(&server.files).insert((*path).to_owned(), *file);
            }
            server
        }

        fn producer_writes(self, at: &str, file: File) -> Server {
            *lock(&self.producer) = Some((at.to_owned(), file));
            self
        }

        fn call(&self, what: String) {
            lock(&self.calls).push(what);
            let first = lock(&self.calls).len() == 1;
            if first && let Some((at, file)) = lock(&self.producer).take() {
                lock(&self.files).insert(at, file);
            }
        }

        fn get(&self, path: &str) -> Option<File> {
            lock(&self.files).get(path).copied()
        }

        fn paths(&self) -> Vec<String> {
            lock(&self.files).keys().cloned().collect()
        }
    }

    fn stat_of(file: Option<File>, path: &str) -> Result<FileStat, SftpError> {
        let (size, mtime, _) = file.ok_or_else(|| SftpError::NotFound(path.to_owned()))?;
        Ok(FileStat {
            kind: FileKind::File,
            size: Some(size),
            mtime_unix: Some(mtime),
        })
    }

    impl RemoteFiles for Server {
        async fn stat(&self, path: &str) -> Result<FileStat, SftpError> {
            let file = self.get(path);
            self.call(format!("stat {path}"));
            stat_of(file, path)
        }
        async fn lstat(&self, path: &str) -> Result<FileStat, SftpError> {
            let file = self.get(path);
            self.call(format!("lstat {path}"));
            stat_of(file, path)
        }
        async fn rename(&self, from: &str, to: &str) -> Result<(), SftpError> {
            let result = {
                let mut files = lock(&self.files);
                if files.contains_key(to) {
                    Err(SftpError::Failure {
                        path: format!("rename {from} -> {to}"),
                        message: "exists".into(),
                    })
                } else {
                    match files.remove(from) {
                        Some(file) => {
                            files.insert(to.to_owned(), file);
                            Ok(())
                        }
                        None => Err(SftpError::NotFound(from.to_owned())),
                    }
                }
            };
            self.call(format!("rename {from} {to}"));
            result
        }
        async fn remove(&self, path: &str) -> Result<(), SftpError> {
            let removed = lock(&self.files).remove(path);
            self.call(format!("remove {path}"));
            removed
                .map(drop)
                .ok_or_else(|| SftpError::NotFound(path.to_owned()))
        }
        async fn mkdir_all(&self, dir: &str) -> Result<(), SftpError> {
            self.call(format!("mkdir {dir}"));
            Ok(())
        }
        async fn sha256(&self, path: &str) -> Result<String, SftpError> {
            let file = self.get(path);
            self.call(format!("sha256 {path}"));
            let (_, _, content) = file.ok_or_else(|| SftpError::NotFound(path.to_owned()))?;
            Ok(sha256_of(content))
        }
    }

    fn sha256_of(content: &str) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(content.as_bytes()))
    }

    const STORED: File = (5, 100, "stored");
    const NEWER: File = (5, 100, "newer bytes, same size and mtime");

    fn version(path: &str) -> Version<'_> {
        Version {
            server_id: 1,
            file_id: 7,
            path,
            size: 5,
            mtime_unix: 100,
            sha256: None,
        }
    }

    async fn run(server: &Server, path: &str, action: &PostAction) -> PostActionOutcome {
        act(server, &PostActionsDone::default(), &version(path), action)
            .await
            .0
    }

    #[tokio::test]
    async fn a_version_written_between_check_and_act_is_not_deleted() {
        let server = Server::with(&[("/in/a.csv", STORED)]).producer_writes("/in/a.csv", NEWER);
        assert_eq!(
            run(&server, "/in/a.csv", &PostAction::Delete).await,
            PostActionOutcome::Done
        );
        assert_eq!(
            server.get("/in/a.csv"),
            Some(NEWER),
            "the producer's new version must survive: {:?}",
            lock(&server.calls)
        );
        assert_eq!(server.paths(), ["/in/a.csv"]);
    }

    #[tokio::test]
    async fn a_version_written_between_check_and_act_is_not_moved() {
        let server = Server::with(&[("/in/a.csv", STORED)]).producer_writes("/in/a.csv", NEWER);
        let archive = PostAction::Move("/archive".into());
        assert_eq!(
            run(&server, "/in/a.csv", &archive).await,
            PostActionOutcome::Done
        );
        assert_eq!(server.get("/in/a.csv"), Some(NEWER));
        assert_eq!(server.get("/archive/a.csv"), Some(STORED));
    }

    #[tokio::test]
    async fn another_version_is_refused_and_left_in_place() {
        let other: File = (7, 160, "other");
        let server = Server::with(&[("/in/a.csv", other)]);
        let outcome = run(&server, "/in/a.csv", &PostAction::Delete).await;
        let PostActionOutcome::Refused(why) = outcome else {
            panic!("{outcome:?}");
        };
        assert!(why.contains("changed since stored"), "{why}");
        assert_eq!(server.paths(), ["/in/a.csv"]);
        assert_eq!(server.get("/in/a.csv"), Some(other));
    }

    #[tokio::test]
    async fn a_resent_post_action_after_it_happened_is_done() {
        let server = Server::with(&[("/in/a.csv", STORED)]);
        let done = PostActionsDone::default();
        let v = version("/in/a.csv");
        let delete = PostAction::Delete;
        assert_eq!(
            act(&server, &done, &v, &delete).await.0,
            PostActionOutcome::Done
        );
        // The answer was lost; the request comes again after the producer
        // wrote a new version of the same size and mtime.
        lock(&server.files).insert("/in/a.csv".into(), NEWER);
        assert_eq!(
            act(&server, &done, &v, &delete).await.0,
            PostActionOutcome::Done
        );
        assert_eq!(
            server.get("/in/a.csv"),
            Some(NEWER),
            "{:?}",
            lock(&server.calls)
        );
        // Moved already, the path empty: done as well.
        let moved = Server::with(&[("/archive/a.csv", STORED)]);
        let archive = PostAction::Move("/archive".into());
        assert_eq!(
            act(&moved, &done, &Version { file_id: 8, ..v }, &archive)
                .await
                .0,
            PostActionOutcome::Done
        );
        assert_eq!(moved.paths(), ["/archive/a.csv"]);
    }

    #[tokio::test]
    async fn a_resent_post_action_compares_the_bytes_when_it_remembers_nothing() {
        // The agent that carried it out is gone (restarted, or another agent
        // has the server now): the resend says so by naming the stored bytes.
        let stored = sha256_of(STORED.2);
        let resent = Version {
            sha256: Some(&stored),
            ..version("/in/a.csv")
        };
        let server = Server::with(&[("/in/a.csv", NEWER)]);
        let done = PostActionsDone::default();
        let outcome = act(&server, &done, &resent, &PostAction::Delete).await.0;
        let PostActionOutcome::Refused(why) = &outcome else {
            panic!("a new version of the same size and mtime was not refused: {outcome:?}");
        };
        assert!(
            why.contains("other bytes of the same size and mtime"),
            "{why}"
        );
        assert_eq!(server.paths(), ["/in/a.csv"], "{:?}", lock(&server.calls));
        assert_eq!(server.get("/in/a.csv"), Some(NEWER));
        // The stored bytes themselves are acted on.
        let server = Server::with(&[("/in/a.csv", STORED)]);
        assert_eq!(
            act(&server, &done, &resent, &PostAction::Delete).await.0,
            PostActionOutcome::Done
        );
        assert!(server.paths().is_empty());
    }

    #[tokio::test]
    async fn an_attempt_that_stopped_with_the_file_aside_is_finished() {
        let aside = aside_name("/in/a.csv", 7);
        assert_eq!(aside, "/in/.ferry-7.post-action");
        // The path is empty now...
        let server = Server::with(&[(aside.as_str(), STORED)]);
        assert_eq!(
            run(&server, "/in/a.csv", &PostAction::Delete).await,
            PostActionOutcome::Done
        );
        assert!(server.paths().is_empty(), "{:?}", server.paths());
        // ... or holds a newer version, which stays.
        let server = Server::with(&[(aside.as_str(), STORED), ("/in/a.csv", NEWER)]);
        let archive = PostAction::Move("/archive".into());
        assert_eq!(
            run(&server, "/in/a.csv", &archive).await,
            PostActionOutcome::Done
        );
        assert_eq!(server.get("/in/a.csv"), Some(NEWER));
        assert_eq!(server.get("/archive/a.csv"), Some(STORED));
        assert_eq!(server.paths().len(), 2, "{:?}", server.paths());
    }

    #[test]
    fn only_the_stored_version_is_acted_on() {
        let stat = |kind, size, mtime| FileStat {
            kind,
            size,
            mtime_unix: mtime,
        };
        assert_eq!(
            same_version(&stat(FileKind::File, Some(5), Some(9)), 5, 9),
            Ok(())
        );
        let newer = same_version(&stat(FileKind::File, Some(7), Some(10)), 5, 9).unwrap_err();
        assert_eq!(
            newer,
            "changed since stored (size/mtime now 7/10, stored 5/9)"
        );
        let same_size = same_version(&stat(FileKind::File, Some(5), Some(10)), 5, 9);
        assert!(same_size.is_err());
        let no_attrs = same_version(&stat(FileKind::File, None, None), 5, 9).unwrap_err();
        assert!(no_attrs.contains("now unknown/unknown"), "{no_attrs}");
        let dir = same_version(&stat(FileKind::Dir, Some(5), Some(9)), 5, 9).unwrap_err();
        assert!(dir.contains("a Dir now"), "{dir}");
    }

    #[test]
    fn move_targets() {
        assert_eq!(move_target("/archive", "a.csv", 0), "/archive/a.csv");
        assert_eq!(move_target("/archive/", "a.csv", 2), "/archive/a.csv.2");
        assert_eq!(move_target("/", "a.csv", 0), "/a.csv");
    }
}
