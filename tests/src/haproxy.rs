//! HAProxy (Debian `haproxy`) as the L4 balancer in front of test
//! coordinators, run from the checked-in `deploy/haproxy/haproxy.cfg`.
//!
//! [`render`] (pure) keeps that file's `defaults` and `backend coordinators`
//! settings as deployed (mode tcp, the `/readyz` HTTP check, check timing,
//! `on-marked-down shutdown-sessions`, redispatch) and replaces only what
//! names the deployment: the bind address, the server lines (gRPC port +
//! `check port` = the coordinator's `FERRY_HTTP_LISTEN`), the docker DNS
//! resolver, and the balancer's own health frontend (replaced by a stats
//! socket the tests read server states from).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tonic::transport::Channel;

use crate::certs::CertFiles;
use crate::util::{ChildGuard, LogDir, free_port, log_tail, workspace_root};

/// The checked-in configuration the harness starts from.
pub const DEPLOYED_CONFIG: &str = "deploy/haproxy/haproxy.cfg";
/// The backend of the checked-in configuration that holds the coordinators.
const BACKEND: &str = "coordinators";
/// The gRPC frontend of the checked-in configuration.
const FRONTEND: &str = "ferry_grpc";

/// One coordinator behind the balancer.
#[derive(Debug, Clone)]
pub struct Backend {
    /// The server name in HAProxy (and its stats).
    pub name: String,
    /// The coordinator's gRPC (mTLS) address.
    pub grpc: SocketAddr,
    /// The coordinator's `FERRY_HTTP_LISTEN` address (health checks).
    pub http: SocketAddr,
}

/// A running HAProxy.
#[derive(Debug)]
pub struct HaProxy {
    dir: LogDir,
    child: ChildGuard,
    addr: SocketAddr,
    socket: PathBuf,
    log: PathBuf,
}

impl HaProxy {
    /// Starts HAProxy on a free loopback port in front of `backends` and
    /// waits until it listens. Panics (with the log tail) if it does not.
    pub async fn start(backends: &[Backend]) -> HaProxy {
        Self::try_start(backends)
            .await
            .unwrap_or_else(|e| panic!("start haproxy: {e:#}"))
    }

    async fn try_start(backends: &[Backend]) -> anyhow::Result<HaProxy> {
        let template_path = workspace_root().join(DEPLOYED_CONFIG);
        let template = std::fs::read_to_string(&template_path)
            .with_context(|| format!("read {}", template_path.display()))?;
        let dir = LogDir::new("haproxy")?;
        let socket = dir.path().join("admin.sock");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = render(&template, addr, backends, &socket)?;
        let config_path = dir.path().join("haproxy.cfg");
        std::fs::write(&config_path, &config)
            .with_context(|| format!("write {}", config_path.display()))?;
        let log = dir.path().join("haproxy.log");
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().context("clone log handle")?;
        let bin = haproxy_bin();
        let child = Command::new(&bin)
            // -db: foreground, no daemon; -W would add a master process.
            .args(["-db", "-f"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "spawn {} (Debian package haproxy; deploy/test-deps.sh installs it)",
                    bin.display()
                )
            })?;
        let mut child = ChildGuard::new(child, "haproxy");
        if let Err(e) = child.wait_for_port(addr, Duration::from_secs(20)).await {
            anyhow::bail!("{e:#}\nlog {}:\n{}", log.display(), log_tail(&log, 30));
        }
        Ok(HaProxy {
            dir,
            child,
            addr,
            socket,
            log,
        })
    }

    /// `https://127.0.0.1:PORT`: what agents and admins connect to (the
    /// coordinators' certificates carry a 127.0.0.1 IP SAN).
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An mTLS channel through the balancer presenting `certs`.
    pub async fn channel(&self, certs: &CertFiles) -> anyhow::Result<Channel> {
        crate::coordinator::mtls_channel(&self.endpoint(), certs, "haproxy").await
    }

    /// Per server of the coordinators backend: its stats (`show stat`).
    pub async fn servers(&self) -> anyhow::Result<Vec<ServerStat>> {
        let text = self.command("show stat").await?;
        Ok(parse_stat(&text, BACKEND))
    }

    /// The stats of the server `name`.
    pub async fn server(&self, name: &str) -> anyhow::Result<ServerStat> {
        self.servers()
            .await?
            .into_iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no server {name} in haproxy's stats"))
    }

    /// Waits until HAProxy's health check reports `name` with a status
    /// starting with `status` (`UP`, `DOWN`); panics after `timeout`.
    pub async fn wait_status(&self, name: &str, status: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let seen = self.server(name).await;
            if let Ok(s) = &seen
                && s.status.starts_with(status)
            {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "haproxy server {name} not {status} within {timeout:?} (last: {seen:?})\nlog {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One command on the admin socket; its whole answer.
    async fn command(&self, command: &str) -> anyhow::Result<String> {
        let mut stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("connect to {}", self.socket.display()))?;
        stream
            .write_all(format!("{command}\n").as_bytes())
            .await
            .context("write to the haproxy socket")?;
        let mut out = String::new();
        stream
            .read_to_string(&mut out)
            .await
            .context("read the haproxy socket")?;
        Ok(out)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILLs HAProxy.
    pub async fn kill(&mut self) {
        self.child.kill().await;
    }
}

/// A server of the coordinators backend as HAProxy's stats show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    pub name: String,
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (coming up), `MAINT`...
    pub status: String,
    /// Sessions now.
    pub current: u64,
    /// Sessions since start: grows by one per connection sent to it.
    pub total: u64,
}

/// The server rows of `backend` in a `show stat` CSV.
fn parse_stat(csv: &str, backend: &str) -> Vec<ServerStat> {
    let mut lines = csv.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let index = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(st), Some(scur), Some(stot)) = (
        index("pxname"),
        index("svname"),
        index("status"),
        index("scur"),
        index("stot"),
    ) else {
        return Vec::new();
    };
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.get(px) == Some(&backend) && f.get(sv).is_some_and(|s| *s != "BACKEND"))
        .map(|f| ServerStat {
            name: f[sv].to_string(),
            status: f.get(st).unwrap_or(&"").to_string(),
            current: f.get(scur).and_then(|v| v.parse().ok()).unwrap_or(0),
            total: f.get(stot).and_then(|v| v.parse().ok()).unwrap_or(0),
        })
        .collect()
}

/// The test configuration from the deployed one: see the module docs.
/// Fails if the deployed file lacks what the tests rely on.
pub fn render(
    deployed: &str,
    listen: SocketAddr,
    backends: &[Backend],
    socket: &Path,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut section: Option<(String, String)> = None;
    let mut saw_backend = false;
    let mut saw_frontend = false;
    for line in deployed.lines() {
        let words: Vec<&str> = line
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let starts_section = matches!(
            words.first().copied(),
            Some("global" | "defaults" | "frontend" | "backend" | "listen" | "resolvers")
        ) && !line.starts_with(char::is_whitespace);
        if starts_section {
            let kind = words[0].to_string();
            let name = words.get(1).unwrap_or(&"").to_string();
            section = Some((kind.clone(), name.clone()));
            match (kind.as_str(), name.as_str()) {
                ("resolvers", _) => continue,
                ("frontend", n) if n != FRONTEND => continue,
                ("backend", n) if n != BACKEND => continue,
                ("global", _) => {
                    out.push_str("global\n");
                    out.push_str(&format!(
                        "    stats socket {} mode 600 level admin\n",
                        socket.display()
                    ));
                    continue;
                }
                ("backend", _) => {
                    saw_backend = true;
                    out.push_str(line);
                    out.push('\n');
                    for b in backends {
                        out.push_str(&format!(
                            "    server {} {} check port {}\n",
                            b.name,
                            b.grpc,
                            b.http.port()
                        ));
                    }
                    continue;
                }
                ("frontend", _) => saw_frontend = true,
                _ => {}
            }
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let Some((kind, name)) = &section else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        match (kind.as_str(), name.as_str(), words.first().copied()) {
            ("resolvers", ..) => {}
            ("frontend", n, _) if n != FRONTEND => {}
            ("backend", n, _) if n != BACKEND => {}
            // The global section of the deployment (logging to the
            // container's stdout) is kept; the stats socket was added above.
            ("frontend", _, Some("bind")) => {
                out.push_str(&format!("    bind {listen}\n"));
            }
            ("backend", _, Some("server")) => {}
            ("backend", _, Some("default-server")) => {
                out.push_str(&default_server(&words));
                out.push('\n');
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    anyhow::ensure!(
        saw_backend && saw_frontend,
        "{DEPLOYED_CONFIG} has no `frontend {FRONTEND}` / `backend {BACKEND}`"
    );
    anyhow::ensure!(
        out.contains("option httpchk") && out.contains("/readyz"),
        "{DEPLOYED_CONFIG} does not check the coordinators' /readyz"
    );
    Ok(out)
}

/// `default-server` without what names the deployment (the docker resolver,
/// address resolution at start, the compose check port: each server line
/// gets its own).
fn default_server(words: &[&str]) -> String {
    let mut kept = Vec::new();
    let mut i = 0;
    while i < words.len() {
        match words[i] {
            "resolvers" | "init-addr" | "port" => i += 2,
            w => {
                kept.push(w);
                i += 1;
            }
        }
    }
    format!("    {}", kept.join(" "))
}

/// `haproxy` on PATH or in /usr/sbin (not on a plain user's PATH).
fn haproxy_bin() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/haproxy");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("haproxy")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> Vec<Backend> {
        vec![
            Backend {
                name: "c1".into(),
                grpc: "127.0.0.1:7001".parse().unwrap(),
                http: "127.0.0.1:8001".parse().unwrap(),
            },
            Backend {
                name: "c2".into(),
                grpc: "127.0.0.1:7002".parse().unwrap(),
                http: "127.0.0.1:8002".parse().unwrap(),
            },
        ]
    }

    #[test]
    fn the_deployed_config_renders_with_test_addresses_and_its_own_settings() {
        let deployed = std::fs::read_to_string(workspace_root().join(DEPLOYED_CONFIG)).unwrap();
        let out = render(
            &deployed,
            "127.0.0.1:9000".parse().unwrap(),
            &backends(),
            Path::new("/tmp/x.sock"),
        )
        .unwrap();
        assert!(out.contains("    bind 127.0.0.1:9000\n"), "{out}");
        assert!(
            out.contains("    server c1 127.0.0.1:7001 check port 8001\n"),
            "{out}"
        );
        assert!(
            out.contains("    server c2 127.0.0.1:7002 check port 8002\n"),
            "{out}"
        );
        assert!(out.contains("stats socket /tmp/x.sock"), "{out}");
        for kept in [
            "mode tcp",
            "option httpchk",
            "on-marked-down shutdown-sessions",
            "option redispatch",
            "balance leastconn",
        ] {
            assert!(out.contains(kept), "{kept} kept: {out}");
        }
        // Comments may still name the deployment; directives may not.
        let directives: Vec<&str> = out
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .collect();
        let directives = directives.join("\n");
        for gone in [
            "resolvers",
            "init-addr",
            "coordinator-1",
            "8404",
            ":7443",
            "port 8080",
        ] {
            assert!(!directives.contains(gone), "{gone} dropped: {out}");
        }
    }

    #[test]
    fn a_config_without_readiness_checks_is_refused() {
        let plain = "defaults\n    mode tcp\nfrontend ferry_grpc\n    bind :1\n    default_backend coordinators\nbackend coordinators\n    server a a:1 check\n";
        let err = render(
            plain,
            "127.0.0.1:9000".parse().unwrap(),
            &backends(),
            Path::new("/tmp/x.sock"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/readyz"), "{err}");
    }

    #[test]
    fn stat_rows_of_the_backend_servers() {
        let csv = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status\n\
                   ferry_grpc,FRONTEND,,,1,2,4096,5,0,0,0,0,0,,,,,OPEN\n\
                   coordinators,c1,0,0,1,1,,3,0,0,,0,,0,0,0,0,UP\n\
                   coordinators,c2,0,0,0,1,,2,0,0,,0,,0,0,0,0,DOWN\n\
                   coordinators,BACKEND,0,0,1,2,,5,0,0,0,0,,0,0,0,0,UP\n";
        assert_eq!(
            parse_stat(csv, "coordinators"),
            vec![
                ServerStat {
                    name: "c1".into(),
                    status: "UP".into(),
                    current: 1,
                    total: 3
                },
                ServerStat {
                    name: "c2".into(),
                    status: "DOWN".into(),
                    current: 0,
                    total: 2
                },
            ]
        );
    }
}
