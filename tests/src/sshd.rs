//! A real OpenSSH `sshd` (Debian's openssh-server) per test: its own config,
//! fresh host keys (ed25519 and RSA) and client keys, a free loopback port,
//! password and public-key logins for the system user `ferrytest` (created by
//! `deploy/test-deps.sh`), `internal-sftp`, and a fresh data directory under
//! `/home/ferrytest` that tests fill with files.
//!
//! sshd needs root (it switches to the login user), like the suite itself.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::process::Command;

use crate::netns::Site;
use crate::util::{ChildGuard, LogDir, free_port, log_tail, random_hex};

const SSHD: &str = "/usr/sbin/sshd";
/// The login user; `deploy/test-deps.sh` creates it with [`PASSWORD`].
pub const USER: &str = "ferrytest";
pub const PASSWORD: &str = "ferrytest-password";
/// Passphrase of [`Sshd::client_key_encrypted`].
pub const KEY_PASSPHRASE: &str = "pp";

/// One of the server's host keys.
#[derive(Debug, Clone)]
pub struct HostKey {
    /// SSH algorithm name: `ssh-ed25519` or `ssh-rsa`.
    pub algorithm: String,
    /// `SHA256:<base64>` as printed by `ssh-keygen -l`.
    pub fingerprint: String,
    /// The OpenSSH public key line without comment: `ssh-ed25519 AAAA...`.
    pub public_key: String,
}

/// A running sshd. Killed, and its data directory removed, on drop.
#[derive(Debug)]
pub struct Sshd {
    dir: LogDir,
    child: ChildGuard,
    port: u16,
    host_keys: Vec<HostKey>,
    client_ed25519: String,
    client_rsa: String,
    client_encrypted: String,
    root: PathBuf,
    uid: u32,
    gid: u32,
    log: PathBuf,
}

impl Sshd {
    /// Generates keys, writes the config, starts sshd and waits for its port.
    /// Panics with the sshd log tail if it does not come up.
    pub async fn start() -> Self {
        Self::try_start(None)
            .await
            .unwrap_or_else(|e| panic!("start sshd: {e:#}"))
    }

    /// Like [`Sshd::start`], inside `site`: it listens on the site's own
    /// 127.0.0.1, which nothing outside the site can reach.
    pub async fn start_in(site: &Site) -> Self {
        Self::try_start(Some(site))
            .await
            .unwrap_or_else(|e| panic!("start sshd in {}: {e:#}", site.name()))
    }

    async fn try_start(site: Option<&Site>) -> anyhow::Result<Self> {
        let (uid, gid) = lookup_user(USER)?;
        let dir = LogDir::new("sshd")?;
        // sshd reads authorized_keys as the login user: it must reach the dir.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .context("chmod sshd temp dir")?;
        std::fs::create_dir_all("/run/sshd").context("create /run/sshd (privilege separation)")?;

        let d = dir.path();
        let (host_ed, host_rsa, client_ed, client_rsa, client_enc) = tokio::try_join!(
            keygen(d.join("host_ed25519"), "ed25519", ""),
            keygen(d.join("host_rsa"), "rsa", ""),
            keygen(d.join("client_ed25519"), "ed25519", ""),
            keygen(d.join("client_rsa"), "rsa", ""),
            keygen(d.join("client_ed25519_pp"), "ed25519", KEY_PASSPHRASE),
        )?;
        let host_keys = vec![host_key(&host_ed).await?, host_key(&host_rsa).await?];

        let authorized = d.join("authorized_keys");
        let mut keys = String::new();
        for key in [&client_ed, &client_rsa, &client_enc] {
            keys.push_str(
                &std::fs::read_to_string(key.with_extension("pub"))
                    .context("read client public key")?,
            );
        }
        std::fs::write(&authorized, keys).context("write authorized_keys")?;
        std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o644))
            .context("chmod authorized_keys")?;

        let root = Path::new("/home")
            .join(USER)
            .join(format!("ferry-{}", random_hex(6)));
        std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        std::os::unix::fs::chown(&root, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", root.display()))?;

        let log = d.join("sshd.log");
        let stderr_log = d.join("sshd.stderr.log");
        let mut last_err = None;
        // The free port can be taken between probing and binding: retry.
        for _ in 0..3 {
            let port = free_port();
            let config = d.join("sshd_config");
            std::fs::write(
                &config,
                sshd_config(d, port, &authorized, &[&host_ed, &host_rsa]),
            )
            .context("write sshd_config")?;
            let stderr = std::fs::File::create(&stderr_log).context("create sshd stderr log")?;
            let mut command = match site {
                Some(site) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", site.name(), SSHD]);
                    c
                }
                None => Command::new(SSHD),
            };
            let child = command
                .arg("-D")
                .arg("-E")
                .arg(&log)
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(stderr))
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("spawn {SSHD} (is openssh-server installed?)"))?;
            let mut child = ChildGuard::new(child, "sshd");
            let up = match site {
                // The site's loopback is out of reach from here: sshd's log says when it listens.
                Some(_) => {
                    wait_for_log(&log, &format!("port {port}."), Duration::from_secs(10)).await
                }
                None => {
                    child
                        .wait_for_port(
                            SocketAddr::from(([127, 0, 0, 1], port)),
                            Duration::from_secs(10),
                        )
                        .await
                }
            };
            match up {
                Ok(()) => {
                    return Ok(Self {
                        client_ed25519: read(&client_ed)?,
                        client_rsa: read(&client_rsa)?,
                        client_encrypted: read(&client_enc)?,
                        dir,
                        child,
                        port,
                        host_keys,
                        root,
                        uid,
                        gid,
                        log,
                    });
                }
                Err(e) => {
                    child.kill().await;
                    last_err = Some(anyhow::anyhow!(
                        "{e:#}\nsshd stderr:\n{}\nsshd log {}:\n{}",
                        log_tail(&stderr_log, 20),
                        log.display(),
                        log_tail(&log, 20)
                    ));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&root);
        Err(last_err.expect("at least one attempt"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn user(&self) -> &'static str {
        USER
    }

    pub fn password(&self) -> &'static str {
        PASSWORD
    }

    /// SHA256 fingerprint of the ed25519 host key (`SHA256:...`). Clients that
    /// prefer RSA see [`Sshd::host_keys`]' other entry instead.
    pub fn host_key_fingerprint(&self) -> &str {
        &self.host_key("ssh-ed25519").fingerprint
    }

    /// All host keys the server offers (ed25519 first, then RSA).
    pub fn host_keys(&self) -> &[HostKey] {
        &self.host_keys
    }

    /// `(algorithm, fingerprint)` for every host key, e.g. `("ssh-rsa", "SHA256:...")`.
    pub fn fingerprints(&self) -> Vec<(String, String)> {
        self.host_keys
            .iter()
            .map(|k| (k.algorithm.clone(), k.fingerprint.clone()))
            .collect()
    }

    /// The host key with this algorithm (`ssh-ed25519` or `ssh-rsa`).
    pub fn host_key(&self, algorithm: &str) -> &HostKey {
        self.host_keys
            .iter()
            .find(|k| k.algorithm == algorithm)
            .unwrap_or_else(|| panic!("sshd has no {algorithm} host key"))
    }

    /// Unencrypted ed25519 private key authorized for [`USER`] (OpenSSH PEM format).
    pub fn client_key_ed25519_pem(&self) -> &str {
        &self.client_ed25519
    }

    /// Unencrypted RSA-3072 private key authorized for [`USER`] (OpenSSH PEM format).
    pub fn client_key_rsa_pem(&self) -> &str {
        &self.client_rsa
    }

    /// Passphrase-protected ed25519 private key authorized for [`USER`], and its passphrase.
    pub fn client_key_encrypted(&self) -> (&str, &'static str) {
        (&self.client_encrypted, KEY_PASSPHRASE)
    }

    /// Number of SSH connections the server is handling right now (direct
    /// child processes of the listening sshd; includes connections that have
    /// not authenticated yet).
    pub fn session_count(&self) -> usize {
        let Some(pid) = self.child.id() else {
            return 0;
        };
        children_of(pid).len()
    }

    /// A `'static` counter of [`Sshd::session_count`], for a sampling task.
    pub fn session_counter(&self) -> impl Fn() -> usize + Send + 'static {
        let pid = self.child.id();
        move || pid.map_or(0, |pid| children_of(pid).len())
    }

    /// sshd's log (`LogLevel VERBOSE`).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// The test's data directory, `/home/ferrytest/ferry-<hex>`, owned by
    /// [`USER`]; the same absolute path is valid over SFTP.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root()/rel` as a string, the path an SFTP client uses.
    pub fn remote_path(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    /// Writes `root()/rel` (creating parent directories), owned by [`USER`].
    pub fn write_file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = self.root.join(rel);
        self.create_dirs(path.parent().expect("file path has a parent"));
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        self.chown(&path);
        path
    }

    /// Appends to `root()/rel` (creating it), e.g. to simulate a growing upload.
    pub fn append_file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        use std::io::Write;
        let path = self.root.join(rel);
        self.create_dirs(path.parent().expect("file path has a parent"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        file.write_all(bytes)
            .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
        self.chown(&path);
        path
    }

    /// Sets the modification time of `root()/rel`.
    pub fn set_mtime(&self, rel: &str, mtime: SystemTime) {
        let path = self.root.join(rel);
        let file = std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        file.set_modified(mtime)
            .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
    }

    /// Creates the directory `root()/rel` (and parents), owned by [`USER`].
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let path = self.root.join(rel);
        self.create_dirs(&path);
        path
    }

    /// Removes the file `root()/rel`.
    pub fn remove_file(&self, rel: &str) {
        let path = self.root.join(rel);
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    }

    /// Whether `root()/rel` exists.
    pub fn exists(&self, rel: &str) -> bool {
        self.root.join(rel).exists()
    }

    /// Reads `root()/rel`.
    pub fn read_file(&self, rel: &str) -> Vec<u8> {
        let path = self.root.join(rel);
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// The temp dir with config, keys and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates `path` and its missing ancestors below `root()`, owned by [`USER`].
    fn create_dirs(&self, path: &Path) {
        let mut missing = Vec::new();
        let mut cur = path;
        while !cur.exists() {
            missing.push(cur.to_path_buf());
            cur = cur.parent().expect("path below root has a parent");
        }
        for dir in missing.iter().rev() {
            std::fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            self.chown(dir);
        }
    }

    fn chown(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Waits until the file at `log` contains `needle` ("Server listening on ... port N.").
async fn wait_for_log(log: &Path, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle)) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "sshd log {} did not say {needle:?} within {timeout:?}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sshd_config(dir: &Path, port: u16, authorized: &Path, host_keys: &[&Path]) -> String {
    let mut c = String::new();
    c.push_str("ListenAddress 127.0.0.1\n");
    c.push_str(&format!("Port {port}\n"));
    for key in host_keys {
        c.push_str(&format!("HostKey {}\n", key.display()));
    }
    c.push_str(&format!("PidFile {}\n", dir.join("sshd.pid").display()));
    c.push_str(&format!("AuthorizedKeysFile {}\n", authorized.display()));
    // Without PAM, sshd (running as root) checks passwords against /etc/shadow itself.
    c.push_str(
        "PasswordAuthentication yes\n\
         PubkeyAuthentication yes\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         StrictModes no\n\
         PermitRootLogin no\n\
         AllowUsers ferrytest\n\
         UseDNS no\n\
         PrintMotd no\n\
         X11Forwarding no\n\
         AllowTcpForwarding no\n\
         Subsystem sftp internal-sftp\n\
         MaxSessions 64\n\
         RekeyLimit 256M\n\
         MaxStartups 100:30:200\n\
         LogLevel VERBOSE\n",
    );
    c
}

/// `ssh-keygen -t <kind>` into `path` (+ `.pub`); returns `path`.
async fn keygen(path: PathBuf, kind: &str, passphrase: &str) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", "ferry-test", "-f"])
        .arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "3072"]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .context("run ssh-keygen (is openssh-client installed?)")?;
    anyhow::ensure!(
        out.status.success(),
        "ssh-keygen -t {kind} -f {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(path)
}

/// Fingerprint and public key line of a host key pair written by [`keygen`].
async fn host_key(private: &Path) -> anyhow::Result<HostKey> {
    let public = private.with_extension("pub");
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&public)
        .output()
        .await
        .context("run ssh-keygen -lf")?;
    anyhow::ensure!(
        out.status.success(),
        "ssh-keygen -lf {} failed",
        public.display()
    );
    // "256 SHA256:abc... comment (ED25519)"
    let listing = String::from_utf8_lossy(&out.stdout);
    let fingerprint = listing
        .split_whitespace()
        .nth(1)
        .filter(|f| f.starts_with("SHA256:"))
        .with_context(|| format!("unexpected ssh-keygen -l output {listing:?}"))?
        .to_string();
    let line = std::fs::read_to_string(&public).context("read host public key")?;
    let mut fields = line.split_whitespace();
    let algorithm = fields.next().context("empty public key file")?.to_string();
    let blob = fields.next().context("public key file has no key")?;
    Ok(HostKey {
        public_key: format!("{algorithm} {blob}"),
        algorithm,
        fingerprint,
    })
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

/// uid and gid of a local user, from /etc/passwd.
fn lookup_user(name: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == name {
            let uid = fields[2].parse().context("uid in /etc/passwd")?;
            let gid = fields[3].parse().context("gid in /etc/passwd")?;
            return Ok((uid, gid));
        }
    }
    anyhow::bail!("user {name} does not exist; run deploy/test-deps.sh as root")
}

/// Pids whose parent is `parent`, from /proc/<pid>/stat.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // "pid (comm) state ppid ...": comm may contain spaces and ')'.
                    let after = &stat[stat.rfind(')')? + 1..];
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
