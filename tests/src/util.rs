//! Small process and network plumbing shared by every harness component:
//! free ports, waiting for a listener, locating the workspace's binaries,
//! random names, log directories that survive a failing test, and
//! [`ChildGuard`], which kills a spawned process when the test lets go of it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::RngCore;
use tempfile::TempDir;
use tokio::process::Child;

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it for a
/// listener we closed straight away). Another process may grab it before the
/// caller binds it; components that start servers retry with a fresh port.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of probe listener")
        .port()
}

/// A free port for a server the test stops and starts again on the same
/// port (a test-owned Postgres or RabbitMQ node). It lies below the kernel's
/// ephemeral range, so while the server is down neither an outgoing
/// connection nor another test's [`free_port`] can take it.
pub fn stable_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.max(10_001));
    let span = u64::from(to - from);
    let seed = u64::from_str_radix(&random_hex(4), 16).unwrap_or(0);
    for i in 0..span {
        let port = from + u16::try_from((seed + i) % span).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {from}..{to}");
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("nothing accepted connections on {addr} within {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The workspace root (the parent of the `tests/` package).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// Path of a workspace binary next to the running test executable
/// (`target/<profile>/deps/e2e-*` -> `target/<profile>/<name>`).
///
/// Panics when the binary has not been built: `cargo test -p ferry-tests`
/// does not build the other packages' binaries.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running test executable");
    let deps = exe
        .parent()
        .expect("test executable has a parent directory");
    let profile_dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps/ has a parent directory")
    } else {
        deps
    };
    let path = profile_dir.join(name);
    if !path.is_file() {
        panic!(
            "binary {name} not found at {}; run `cargo build --workspace --bins` \
             (with the same CARGO_TARGET_DIR and profile) before the e2e tests",
            path.display()
        );
    }
    path
}

/// `bytes` random bytes as lowercase hex (2 * `bytes` characters).
/// Sends `signal` (e.g. "STOP", "CONT", "KILL") to `pid` via `/bin/kill`;
/// panics if it cannot be delivered.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("/bin/kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("run /bin/kill -{signal} {pid}: {e}"));
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// The last `max_lines` lines of a log file, for panic messages.
pub fn log_tail(path: &Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            lines[start..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A temporary directory for a component's files and logs. It is deleted on
/// drop, except when the thread is panicking (a failing test): then it is kept
/// and its path printed, so the logs can be read afterwards.
#[derive(Debug)]
pub struct LogDir {
    dir: TempDir,
    what: &'static str,
}

impl LogDir {
    pub fn new(what: &'static str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferry-{what}-"))
            .tempdir()
            .with_context(|| format!("create temp dir for {what}"))?;
        Ok(Self { dir, what })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "[ferry-tests] kept {} files in {}",
                self.what,
                self.dir.path().display()
            );
        }
    }
}

/// Owns a spawned process and kills it (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    /// Wraps `child`; `what` names the process in messages.
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child,
            what: what.into(),
        }
    }

    /// The OS process id, `None` once the process has been reaped.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The wrapped process, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends SIGKILL and waits for the process to go away.
    pub async fn kill(&mut self) {
        if let Err(e) = self.child.kill().await {
            eprintln!("[ferry-tests] kill {}: {e}", self.what);
        }
    }

    /// Sends SIGTERM (via `/bin/kill`, to stay free of `unsafe`); does not wait.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let Some(pid) = self.child.id() else {
            anyhow::bail!("{} has already exited", self.what);
        };
        let status = std::process::Command::new("/bin/kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .with_context(|| format!("run /bin/kill -TERM {pid} ({})", self.what))?;
        anyhow::ensure!(
            status.success(),
            "/bin/kill -TERM {pid} ({}) failed: {status}",
            self.what
        );
        Ok(())
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> anyhow::Result<ExitStatus> {
        self.child
            .wait()
            .await
            .with_context(|| format!("wait for {}", self.what))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(Some(
                status.with_context(|| format!("wait for {}", self.what))?,
            )),
            Err(_) => Ok(None),
        }
    }

    /// Waits until the process accepts TCP connections on `addr`, failing
    /// fast if it exits first.
    pub async fn wait_for_port(
        &mut self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                anyhow::bail!(
                    "{} exited with {status} before listening on {addr}",
                    self.what
                );
            }
            if wait_for_port(addr, Duration::from_millis(100))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!("{} did not listen on {addr} within {timeout:?}", self.what);
            }
        }
    }

    /// The exit status if the process has already exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // `kill_on_drop(true)` on the Command does the same; this also covers
        // children spawned without it. Errors mean it has already exited.
        let _ = self.child.start_kill();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[tokio::test]
    async fn terminate_sends_sigterm() {
        let child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut guard = ChildGuard::new(child, "sleep");
        guard.terminate().unwrap();
        let status = guard.wait_timeout(Duration::from_secs(5)).await.unwrap();
        assert_eq!(status.and_then(|s| s.signal()), Some(15));
    }

    #[tokio::test]
    async fn kill_reaps_the_process() {
        let child = tokio::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut guard = ChildGuard::new(child, "sleep");
        guard.kill().await;
        assert_eq!(guard.try_status().and_then(|s| s.signal()), Some(9));
    }

    #[test]
    fn random_hex_has_requested_length() {
        let a = random_hex(8);
        assert_eq!(a.len(), 16);
        assert_ne!(a, random_hex(8));
    }
}
