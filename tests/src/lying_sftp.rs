//! A scriptable hostile SFTP server, run inside the test process: russh's
//! and russh-sftp's server sides on a free loopback port, with its own
//! ed25519 host key and one password login. Unlike [`crate::Sshd`] it says
//! whatever the script makes it say, so tests can play a partner's server
//! that lies:
//!
//! - [`LyingSftpBuilder::file`]: an honest file (any name, also very long);
//! - [`LyingSftpBuilder::claiming_size`]: a file whose listing, `STAT` and
//!   `FSTAT` claim a size other than its bytes (e.g. 2^60);
//! - [`LyingSftpBuilder::changing_file`]: a file whose bytes differ on every
//!   `READ`, with a steady size and mtime;
//! - [`LyingSftpBuilder::vanishing`]: listed by `READDIR`, but gone for
//!   `STAT`, `LSTAT` and `OPEN`;
//! - [`LyingSftpBuilder::endless_dir`]: a directory whose `READDIR` never
//!   ends: new file names forever;
//! - [`LyingSftpBuilder::deep_tree`]: a directory holding a directory `d`,
//!   holding a directory `d`, ... without end.
//!
//! Directories above scripted paths exist implicitly. Every file has the
//! same old mtime ([`MTIME`]). [`LyingSftp::counts`] tells what clients did
//! to a path (opens, reads), so a test can prove nothing was read.
//!
//! ```text
//! let sftp = LyingSftp::builder()
//!     .file("/in/a.csv", b"alpha".to_vec())
//!     .claiming_size("/in/huge.bin", b"tiny".to_vec(), 1 << 60)
//!     .start()
//!     .await;
//! let server_id = stack.add_server(sftp.add_server_request("partner")).await;
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto as proto;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId};
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The login user and password of every lying server.
pub const USER: &str = "partner";
pub const PASSWORD: &str = "partner-password";
/// The mtime of every file (2023-11-14): old enough for any `min_age`.
pub const MTIME: u32 = 1_700_000_000;
/// Names per `READDIR` reply of an endless directory.
const ENDLESS_REPLY: usize = 100;
/// Bytes of names per `READDIR` reply, well under the 256 KiB packet limit
/// of russh-sftp clients (each name is sent twice, as name and long name).
const REPLY_NAME_BYTES: usize = 96 * 1024;

/// How a file's bytes come out.
#[derive(Debug, Clone)]
enum Content {
    Fixed(Vec<u8>),
    /// `len` bytes, all equal to the number of `READ`s served so far (mod 256).
    Changing {
        len: u64,
    },
}

#[derive(Debug, Clone)]
struct FileScript {
    content: Content,
    /// What listings and stats say instead of the real length.
    claimed_size: Option<u64>,
    vanishes: bool,
}

impl FileScript {
    fn real_len(&self) -> u64 {
        match &self.content {
            Content::Fixed(b) => b.len() as u64,
            Content::Changing { len } => *len,
        }
    }

    fn attrs(&self) -> FileAttributes {
        FileAttributes {
            size: Some(self.claimed_size.unwrap_or_else(|| self.real_len())),
            uid: Some(0),
            gid: Some(0),
            permissions: Some(0o100_644),
            atime: Some(MTIME),
            mtime: Some(MTIME),
            ..FileAttributes::empty()
        }
    }
}

#[derive(Debug, Clone)]
enum Node {
    File(FileScript),
    EndlessDir,
    DeepTree,
}

/// What one path resolves to.
#[derive(Debug, Clone)]
enum Resolved {
    File(FileScript),
    /// A finite directory: its children are those of the script.
    Dir,
    Endless,
    /// A directory of a deep tree: one child, the directory `d`.
    Deep,
}

fn dir_attrs() -> FileAttributes {
    FileAttributes {
        size: Some(4096),
        uid: Some(0),
        gid: Some(0),
        permissions: Some(0o040_755),
        atime: Some(MTIME),
        mtime: Some(MTIME),
        ..FileAttributes::empty()
    }
}

/// The script: absolute paths (no trailing slash) to what they are.
#[derive(Debug, Default)]
struct Script {
    nodes: BTreeMap<String, Node>,
}

impl Script {
    fn resolve(&self, path: &str) -> Option<Resolved> {
        let path = normalize(path);
        if let Some(node) = self.nodes.get(&path) {
            return Some(match node {
                Node::File(f) => Resolved::File(f.clone()),
                Node::EndlessDir => Resolved::Endless,
                Node::DeepTree => Resolved::Deep,
            });
        }
        for (root, node) in &self.nodes {
            let Some(rest) = path.strip_prefix(root.as_str()) else {
                continue;
            };
            let Some(rest) = rest.strip_prefix('/') else {
                continue;
            };
            match node {
                Node::EndlessDir if !rest.contains('/') => {
                    return Some(Resolved::File(FileScript {
                        content: Content::Fixed(b"x".to_vec()),
                        claimed_size: None,
                        vanishes: false,
                    }));
                }
                Node::DeepTree if rest.split('/').all(|s| s == "d") => {
                    return Some(Resolved::Deep);
                }
                _ => {}
            }
        }
        let prefix = if path == "/" {
            "/".to_owned()
        } else {
            format!("{path}/")
        };
        self.nodes
            .keys()
            .any(|k| k.starts_with(&prefix))
            .then_some(Resolved::Dir)
    }

    /// The entries of the finite directory `dir`, in name order.
    fn children(&self, dir: &str) -> Vec<File> {
        let dir = normalize(dir);
        let prefix = if dir == "/" {
            "/".to_owned()
        } else {
            format!("{dir}/")
        };
        let names: BTreeSet<&str> = self
            .nodes
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter_map(|rest| rest.split('/').next())
            .filter(|n| !n.is_empty())
            .collect();
        names
            .into_iter()
            .filter_map(|name| {
                let attrs = match self.resolve(&format!("{prefix}{name}"))? {
                    Resolved::File(f) => f.attrs(),
                    _ => dir_attrs(),
                };
                Some(File::new(name, attrs))
            })
            .collect()
    }
}

/// `path` without trailing slashes (the root stays `/`).
fn normalize(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// What clients did to one path.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PathCounts {
    pub opens: u64,
    pub reads: u64,
    pub stats: u64,
}

#[derive(Debug, Default)]
struct Counters {
    paths: HashMap<String, PathCounts>,
    readdirs: u64,
    logins: u64,
}

/// Builds a [`LyingSftp`]; see the module docs.
#[derive(Debug, Default)]
pub struct LyingSftpBuilder {
    script: Script,
}

impl LyingSftpBuilder {
    /// An honest file at the absolute `path`.
    pub fn file(mut self, path: &str, bytes: Vec<u8>) -> Self {
        self.insert_file(path, Content::Fixed(bytes), None, false);
        self
    }

    /// A file of `bytes` whose listing, `STAT` and `FSTAT` claim `size`.
    pub fn claiming_size(mut self, path: &str, bytes: Vec<u8>, size: u64) -> Self {
        self.insert_file(path, Content::Fixed(bytes), Some(size), false);
        self
    }

    /// A file of `len` bytes whose content differs on every `READ`.
    pub fn changing_file(mut self, path: &str, len: u64) -> Self {
        self.insert_file(path, Content::Changing { len }, None, false);
        self
    }

    /// A file that `READDIR` lists but that is gone for everything else.
    pub fn vanishing(mut self, path: &str, bytes: Vec<u8>) -> Self {
        self.insert_file(path, Content::Fixed(bytes), None, true);
        self
    }

    /// A directory whose `READDIR` never says end of directory: it sends
    /// new one-byte files (`entry-0`, `entry-1`, ...) forever.
    pub fn endless_dir(mut self, path: &str) -> Self {
        self.script.nodes.insert(normalize(path), Node::EndlessDir);
        self
    }

    /// A directory holding the directory `d`, holding `d`, ... forever.
    pub fn deep_tree(mut self, path: &str) -> Self {
        self.script.nodes.insert(normalize(path), Node::DeepTree);
        self
    }

    fn insert_file(&mut self, path: &str, content: Content, claimed: Option<u64>, vanishes: bool) {
        assert!(path.starts_with('/'), "scripted paths are absolute: {path}");
        self.script.nodes.insert(
            normalize(path),
            Node::File(FileScript {
                content,
                claimed_size: claimed,
                vanishes,
            }),
        );
    }

    /// Binds a free loopback port and serves the script until dropped.
    pub async fn start(self) -> LyingSftp {
        let seed: [u8; 32] = rand::random();
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        let fingerprint = key.public_key().fingerprint(HashAlg::Sha256).to_string();
        let config = Arc::new(russh::server::Config {
            auth_rejection_time: Duration::from_millis(100),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![key],
            ..Default::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the lying SFTP server");
        let addr = listener.local_addr().expect("local address");
        let shared = Shared {
            script: Arc::new(self.script),
            counters: Arc::default(),
        };
        let serving = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = SshHandler {
                    shared: serving.clone(),
                    channels: HashMap::new(),
                };
                let config = config.clone();
                tokio::spawn(async move {
                    if let Ok(session) = russh::server::run_stream(config, stream, handler).await {
                        let _ = session.await;
                    }
                });
            }
        });
        LyingSftp {
            addr,
            fingerprint,
            shared,
            accept,
        }
    }
}

#[derive(Debug, Clone)]
struct Shared {
    script: Arc<Script>,
    counters: Arc<Mutex<Counters>>,
}

impl Shared {
    fn count(&self, path: &str, f: impl FnOnce(&mut PathCounts)) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        f(c.paths.entry(normalize(path)).or_default());
    }
}

/// A running lying SFTP server; stops accepting connections when dropped.
#[derive(Debug)]
pub struct LyingSftp {
    addr: SocketAddr,
    fingerprint: String,
    shared: Shared,
    accept: JoinHandle<()>,
}

impl LyingSftp {
    pub fn builder() -> LyingSftpBuilder {
        LyingSftpBuilder::default()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `SHA256:<base64>`, as `ssh-keygen -l` prints it: what ferry pins.
    pub fn host_key_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// What clients did to `path` so far.
    pub fn counts(&self, path: &str) -> PathCounts {
        let c = self
            .shared
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.paths.get(&normalize(path)).copied().unwrap_or_default()
    }

    /// `READDIR` requests served so far, over all directories.
    pub fn readdirs(&self) -> u64 {
        let c = self
            .shared
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.readdirs
    }

    /// Successful logins so far.
    pub fn logins(&self) -> u64 {
        let c = self
            .shared
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.logins
    }

    /// An `AddServer` request for this server (password login, host key pinned).
    pub fn add_server_request(&self, name: &str) -> proto::AddServerRequest {
        proto::AddServerRequest {
            name: name.into(),
            hostname: "127.0.0.1".into(),
            port: u32::from(self.port()),
            username: USER.into(),
            auth: Some(proto::add_server_request::Auth::Password(proto::Password {
                password: PASSWORD.into(),
            })),
            host_key_fingerprint: self.fingerprint.clone(),
            ..Default::default()
        }
    }
}

impl Drop for LyingSftp {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The SSH side of one connection: password login, then the `sftp` subsystem.
struct SshHandler {
    shared: Shared,
    channels: HashMap<ChannelId, Channel<Msg>>,
}

impl russh::server::Handler for SshHandler {
    type Error = anyhow::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if user == USER && password == PASSWORD {
            let mut c = self
                .shared
                .counters
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            c.logins += 1;
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.close(channel)?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.channels.remove(&channel_id)) {
            ("sftp", Some(channel)) => {
                session.channel_success(channel_id)?;
                let sftp = SftpHandler {
                    shared: self.shared.clone(),
                    handles: HashMap::new(),
                    next_handle: 0,
                    reads: 0,
                };
                russh_sftp::server::run(channel.into_stream(), sftp).await;
            }
            _ => session.channel_failure(channel_id)?,
        }
        Ok(())
    }
}

enum OpenThing {
    Dir {
        path: String,
        /// Finite directories: the reply was sent. Endless: names sent.
        sent: u64,
    },
    File {
        path: String,
        script: FileScript,
    },
}

/// The SFTP side of one connection.
struct SftpHandler {
    shared: Shared,
    handles: HashMap<String, OpenThing>,
    next_handle: u64,
    reads: u64,
}

impl SftpHandler {
    fn new_handle(&mut self, thing: OpenThing) -> String {
        self.next_handle += 1;
        let handle = format!("h{}", self.next_handle);
        self.handles.insert(handle.clone(), thing);
        handle
    }

    fn stat_of(&self, path: &str) -> Result<FileAttributes, StatusCode> {
        self.shared.count(path, |c| c.stats += 1);
        match self.shared.script.resolve(path) {
            Some(Resolved::File(f)) if f.vanishes => Err(StatusCode::NoSuchFile),
            Some(Resolved::File(f)) => Ok(f.attrs()),
            Some(_) => Ok(dir_attrs()),
            None => Err(StatusCode::NoSuchFile),
        }
    }
}

/// Takes entries from `files` while they fit one reply.
fn one_reply(files: &mut Vec<File>) -> Vec<File> {
    let mut bytes = 0;
    let mut n = 0;
    for f in files.iter() {
        let len = f.filename.len() + f.longname.len() + 64;
        if n > 0 && bytes + len > REPLY_NAME_BYTES {
            break;
        }
        bytes += len;
        n += 1;
    }
    files.drain(..n).collect()
}

impl russh_sftp::server::Handler for SftpHandler {
    type Error = StatusCode;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let path = if path.starts_with('/') {
            normalize(&path)
        } else {
            "/".to_owned()
        };
        Ok(Name {
            id,
            files: vec![File::dummy(path)],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        Ok(Attrs {
            id,
            attrs: self.stat_of(&path)?,
        })
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        Ok(Attrs {
            id,
            attrs: self.stat_of(&path)?,
        })
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        match self.shared.script.resolve(&path) {
            Some(Resolved::Dir | Resolved::Endless | Resolved::Deep) => {
                let handle = self.new_handle(OpenThing::Dir {
                    path: normalize(&path),
                    sent: 0,
                });
                Ok(Handle { id, handle })
            }
            Some(Resolved::File(_)) => Err(StatusCode::Failure),
            None => Err(StatusCode::NoSuchFile),
        }
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        {
            let mut c = self
                .shared
                .counters
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            c.readdirs += 1;
        }
        let script = self.shared.script.clone();
        let Some(OpenThing::Dir { path, sent }) = self.handles.get_mut(&handle) else {
            return Err(StatusCode::Failure);
        };
        let files = match script.resolve(path) {
            Some(Resolved::Endless) => {
                let files = (0..ENDLESS_REPLY as u64)
                    .map(|i| {
                        let attrs = FileAttributes {
                            size: Some(1),
                            permissions: Some(0o100_644),
                            mtime: Some(MTIME),
                            atime: Some(MTIME),
                            ..FileAttributes::empty()
                        };
                        File::new(format!("entry-{}", *sent + i), attrs)
                    })
                    .collect();
                *sent += ENDLESS_REPLY as u64;
                return Ok(Name { id, files });
            }
            Some(Resolved::Deep) if *sent == 0 => vec![File::new("d", dir_attrs())],
            Some(Resolved::Dir) => {
                let mut all = script.children(path);
                let skip = usize::try_from(*sent).unwrap_or(usize::MAX).min(all.len());
                all.drain(..skip);
                one_reply(&mut all)
            }
            _ => Vec::new(),
        };
        if files.is_empty() {
            return Err(StatusCode::Eof);
        }
        *sent += files.len() as u64;
        Ok(Name { id, files })
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        _attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        self.shared.count(&filename, |c| c.opens += 1);
        if pflags.intersects(OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE) {
            return Err(StatusCode::PermissionDenied);
        }
        match self.shared.script.resolve(&filename) {
            Some(Resolved::File(f)) if !f.vanishes => {
                let handle = self.new_handle(OpenThing::File {
                    path: normalize(&filename),
                    script: f,
                });
                Ok(Handle { id, handle })
            }
            Some(Resolved::File(_)) | None => Err(StatusCode::NoSuchFile),
            Some(_) => Err(StatusCode::Failure),
        }
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        match self.handles.get(&handle) {
            Some(OpenThing::File { script, .. }) => Ok(Attrs {
                id,
                attrs: script.attrs(),
            }),
            Some(OpenThing::Dir { .. }) => Ok(Attrs {
                id,
                attrs: dir_attrs(),
            }),
            None => Err(StatusCode::Failure),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let Some(OpenThing::File { path, script }) = self.handles.get(&handle) else {
            return Err(StatusCode::Failure);
        };
        self.shared.count(path, |c| c.reads += 1);
        self.reads += 1;
        let real = script.real_len();
        if offset >= real {
            return Err(StatusCode::Eof);
        }
        let n = u64::from(len).min(real - offset) as usize;
        let data = match &script.content {
            Content::Fixed(bytes) => bytes[offset as usize..offset as usize + n].to_vec(),
            Content::Changing { .. } => vec![self.reads as u8; n],
        };
        Ok(Data { id, data })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        self.handles.remove(&handle);
        Ok(Status {
            id,
            status_code: StatusCode::Ok,
            error_message: "Ok".to_owned(),
            language_tag: "en-US".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script() -> Script {
        LyingSftp::builder()
            .file("/in/a.csv", b"a".to_vec())
            .claiming_size("/in/huge", b"h".to_vec(), 1 << 60)
            .endless_dir("/endless")
            .deep_tree("/deep")
            .script
    }

    #[test]
    fn paths_resolve_to_their_script() {
        let s = script();
        assert!(matches!(s.resolve("/in"), Some(Resolved::Dir)));
        assert!(matches!(s.resolve("/"), Some(Resolved::Dir)));
        assert!(matches!(s.resolve("/in/a.csv"), Some(Resolved::File(_))));
        assert!(s.resolve("/in/b.csv").is_none());
        assert!(matches!(
            s.resolve("/endless/entry-9"),
            Some(Resolved::File(_))
        ));
        assert!(matches!(s.resolve("/deep/d/d/d"), Some(Resolved::Deep)));
        assert!(s.resolve("/deep/x").is_none());
        let names: Vec<String> = s.children("/in").into_iter().map(|f| f.filename).collect();
        assert_eq!(names, ["a.csv", "huge"]);
        let huge = s.children("/in").remove(1);
        assert_eq!(huge.attrs.size, Some(1 << 60));
    }
}
