//! The real `ferry-agent` binary, connected to one or more test coordinators
//! with an agent certificate of the test PKI; killable, SIGTERM-able, restartable.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;

use crate::certs::CertFiles;
use crate::util::{ChildGuard, LogDir, bin_path, log_tail};

/// A running (or deliberately stopped) agent process.
#[derive(Debug)]
pub struct Agent {
    name: String,
    dir: LogDir,
    env: Vec<(String, String)>,
    child: Option<ChildGuard>,
    log: PathBuf,
    netns: Option<String>,
}

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The site of the agent's certificate.
    pub site: String,
    /// Whether the agent is also started with `FERRY_SITE` = `site` (the
    /// optional consistency check); false: unset, the certificate decides.
    pub check_site: bool,
    pub capacity: u32,
    /// Extra environment (e.g. the `AWS_*` variables of an S3 server).
    pub env: Vec<(String, String)>,
    /// Network namespace to run in (see [`crate::Site`]); `None`: the test's own.
    pub netns: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            site: "default".into(),
            check_site: true,
            capacity: 4,
            env: Vec::new(),
            netns: None,
        }
    }
}

impl Agent {
    /// Starts `ferry-agent` named by `certs` (its SAN), talking to `endpoints`.
    pub async fn start(
        name: &str,
        certs: &CertFiles,
        endpoints: &[String],
        opts: AgentOptions,
    ) -> Self {
        let dir = LogDir::new("agent").unwrap_or_else(|e| panic!("{e:#}"));
        let mut env: Vec<(String, String)> = vec![
            ("FERRY_COORDINATORS".into(), endpoints.join(",")),
            ("FERRY_TLS_CA".into(), certs.ca.display().to_string()),
            ("FERRY_TLS_CERT".into(), certs.cert.display().to_string()),
            ("FERRY_TLS_KEY".into(), certs.key.display().to_string()),
            ("FERRY_CAPACITY".into(), opts.capacity.to_string()),
            ("RUST_LOG".into(), "info,ferry_agent=debug".into()),
        ];
        if opts.check_site {
            env.push(("FERRY_SITE".into(), opts.site.clone()));
        }
        let netns = opts.netns.clone();
        env.extend(opts.env);
        let log = dir.path().join(format!("agent-{name}.log"));
        let mut agent = Agent {
            name: name.to_string(),
            dir,
            env,
            child: None,
            log,
            netns,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let bin = bin_path("ferry-agent");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str()]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = command
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        self.child = Some(ChildGuard::new(child, format!("ferry-agent {}", self.name)));
    }

    /// Process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// SIGKILL and wait.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await;
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("agent is not running");
        child.terminate().unwrap_or_else(|e| panic!("{e:#}"));
        let status = child
            .wait_timeout(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Kills the agent if running and starts it again with the same settings.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn();
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Polls `check` every 200 ms until it returns `Some`, or panics after `timeout`
/// with `what` (and whatever `context` says about the state at that moment).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
