//! Runs the real `ferryctl` binary against a coordinator with a given client
//! certificate, capturing exit status, stdout and stderr.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::certs::CertFiles;
use crate::util::bin_path;

const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// What one `ferryctl` invocation produced.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    /// Exit code; -1 if killed by a signal.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// `ferryctl` with `FERRY_ENDPOINT` and `FERRY_TLS_*` set.
#[derive(Debug, Clone)]
pub struct Ctl {
    bin: PathBuf,
    env: Vec<(String, String)>,
}

impl Ctl {
    pub fn new(endpoint: impl Into<String>, certs: &CertFiles) -> Self {
        let env = vec![
            ("FERRY_ENDPOINT".to_string(), endpoint.into()),
            ("FERRY_TLS_CA".to_string(), certs.ca.display().to_string()),
            (
                "FERRY_TLS_CERT".to_string(),
                certs.cert.display().to_string(),
            ),
            ("FERRY_TLS_KEY".to_string(), certs.key.display().to_string()),
        ];
        Self {
            bin: bin_path("ferryctl"),
            env,
        }
    }

    /// Adds (or replaces) an environment variable for every run.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// Runs `ferryctl <args>`; panics only if it cannot be run or hangs (60 s).
    pub async fn run(&self, args: &[&str]) -> CtlOutput {
        let child = self.spawn(args);
        let output = tokio::time::timeout(CTL_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("ferryctl {args:?} did not finish within {CTL_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("wait for ferryctl {args:?}: {e}"));
        CtlOutput {
            status: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Starts a long-running `ferryctl <args>` (e.g. `files watch`) with
    /// stdout and stderr piped; killed when the child is dropped.
    pub fn spawn(&self, args: &[&str]) -> tokio::process::Child {
        Command::new(&self.bin)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", self.bin.display()))
    }

    /// Runs `ferryctl <args>` and parses stdout as JSON; panics (showing
    /// stderr) if the exit code is not 0 or stdout is not JSON.
    pub async fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args).await;
        if !out.success() {
            panic!(
                "ferryctl {args:?} exited with {}\nstderr:\n{}\nstdout:\n{}",
                out.status, out.stderr, out.stdout
            );
        }
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ferryctl {args:?} printed no JSON ({e}):\n{}\nstderr:\n{}",
                out.stdout, out.stderr
            )
        })
    }
}
