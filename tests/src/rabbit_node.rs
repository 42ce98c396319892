//! A RabbitMQ node owned by one test (Debian's `rabbitmq-server`, its own
//! node name, AMQP and distribution ports, config, mnesia and log dirs in a
//! temp dir), so it can be stopped and started again mid-flow without
//! touching the shared broker other tests use. Modelled on
//! [`crate::PgCluster`].
//!
//! Pitfalls this avoids (each makes the node die at boot while the start
//! script still exits 0, because it ends with `wait $pid || true`):
//! - `/etc/rabbitmq/rabbitmq.conf` pins `listeners.tcp.local = 127.0.0.1:5672`,
//!   which the shared broker holds (`eaddrinuse`) whatever
//!   `RABBITMQ_NODE_PORT` says: the node gets its own `RABBITMQ_CONFIG_FILE`
//!   (and an empty `RABBITMQ_CONF_ENV_FILE` instead of
//!   `/etc/rabbitmq/rabbitmq-env.conf`, which names the shared node);
//! - the distribution port defaults to the AMQP port + 20000 (25672 for the
//!   shared broker): `RABBITMQ_DIST_PORT` is a free port of its own;
//! - `/usr/sbin/rabbitmq-server` switches to the `rabbitmq` user (and its
//!   home and Erlang cookie) when run as root: the node runs
//!   `/usr/lib/rabbitmq/bin/rabbitmq-server` in the foreground with `HOME` in
//!   the temp dir (the cookie is created there).
//!
//! That script stays as a signal proxy in front of the Erlang VM (`beam.smp`,
//! its child); [`RabbitNode::stop`] sends SIGTERM to the VM itself (a clean
//! RabbitMQ shutdown: durable exchanges, queues and persistent messages
//! survive) and waits for it to exit.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::process::Command;

use crate::amqp::AmqpMessage;
use crate::util::{ChildGuard, LogDir, log_tail, random_hex, signal, stable_port};

const SCRIPT: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// Boot takes about 10 s on a busy 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A test-owned RabbitMQ node; killed on drop. See the module docs.
#[derive(Debug)]
pub struct RabbitNode {
    dir: LogDir,
    node: String,
    port: u16,
    dist_port: u16,
    log: PathBuf,
    /// The start script (the VM is its child).
    server: Option<ChildGuard>,
}

impl RabbitNode {
    /// Prepares and starts a node; panics (with its log) if it does not boot.
    pub async fn start() -> RabbitNode {
        let mut node = Self::init().unwrap_or_else(|e| panic!("prepare a RabbitMQ node: {e:#}"));
        node.start_server().await;
        node
    }

    fn init() -> anyhow::Result<RabbitNode> {
        let dir = LogDir::new("rabbitmq")?;
        // Both are bound again at every start: outside the ephemeral range.
        let port = stable_port();
        let mut dist_port = stable_port();
        while dist_port == port {
            dist_port = stable_port();
        }
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
        }
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\n\
                 loopback_users = none\n"
            ),
        )?;
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "")?;
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n")?;
        Ok(RabbitNode {
            log: dir.path().join("rabbitmq.log"),
            node: format!("ferry-test-{}@localhost", random_hex(4)),
            port,
            dist_port,
            dir,
            server: None,
        })
    }

    /// Starts the node (same name, ports and data as before) and waits until
    /// it accepts AMQP connections.
    pub async fn start_server(&mut self) {
        assert!(self.server.is_none(), "RabbitMQ node already running");
        if let Err(e) = self.try_start().await {
            panic!(
                "start test RabbitMQ node {} on port {}: {e:#}\nlog {}:\n{}",
                self.node,
                self.port,
                self.log.display(),
                self.log_tail(40)
            );
        }
    }

    async fn try_start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let d = self.dir.path();
        let child = Command::new(SCRIPT)
            .env("HOME", d.join("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_LOGS", "-")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RABBITMQ_ALLOW_INPUT")
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {SCRIPT}"))?;
        let mut guard = ChildGuard::new(child, "rabbitmq-server");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = guard.try_status() {
                anyhow::bail!("{SCRIPT} exited with {status} before accepting AMQP connections");
            }
            if let Ok(Ok(conn)) = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(&self.url(), ConnectionProperties::default()),
            )
            .await
            {
                let _ = conn.close(200, "ready".into()).await;
                self.server = Some(guard);
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.server = Some(guard);
                self.kill();
                anyhow::bail!("no AMQP connection within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops the node cleanly (SIGTERM to the Erlang VM) and waits until it
    /// has exited.
    pub async fn stop(&mut self) {
        let mut server = self.server.take().expect("RabbitMQ node is not running");
        let script = server.id().expect("start script pid");
        let vm = children(script);
        if vm.is_empty() {
            panic!(
                "no Erlang VM under the RabbitMQ start script {script}; log:\n{}",
                self.log_tail(30)
            );
        }
        for pid in &vm {
            signal(*pid, "TERM");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while vm.iter().any(|pid| alive(*pid)) {
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} still running {STOP_TIMEOUT:?} after SIGTERM; log:\n{}",
                self.node,
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The script exits once its VM has.
        let _ = server.wait_timeout(Duration::from_secs(10)).await;
    }

    /// SIGKILLs the VM and the start script (no clean shutdown).
    fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            if let Some(script) = server.id() {
                for pid in children(script) {
                    let _ = std::process::Command::new("/bin/kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
            drop(server);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Declares `exchange` (durable topic, as the relay declares it) and a
    /// durable queue `queue` bound to it with `#`: both survive a restart of
    /// the node, and so do the persistent messages waiting in the queue.
    pub async fn declare_queue(&self, exchange: &str, queue: &str) {
        let declare = async {
            let conn = Connection::connect(&self.url(), ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            crate::amqp::declare_exchange(&ch, exchange).await?;
            ch.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            ch.queue_bind(
                queue.into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            let _ = conn.close(200, "declared".into()).await;
            lapin::Result::Ok(())
        };
        declare
            .await
            .unwrap_or_else(|e| panic!("declare {exchange} and {queue} on {}: {e}", self.node));
    }

    /// Consumes (and acknowledges) the messages of `queue` until none arrives
    /// for `quiet`. `Err` if the node cannot be reached (e.g. it is stopped).
    pub async fn take_messages(
        &self,
        queue: &str,
        quiet: Duration,
    ) -> anyhow::Result<Vec<AmqpMessage>> {
        let conn = Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .with_context(|| format!("connect to {}", self.node))?;
        let ch = conn.create_channel().await?;
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "ferry-tests".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consume {queue}"))?;
        let mut got = Vec::new();
        while let Ok(Some(delivery)) = tokio::time::timeout(quiet, consumer.next()).await {
            let delivery = delivery.with_context(|| format!("consumer of {queue}"))?;
            delivery.ack(BasicAckOptions::default()).await?;
            got.push(AmqpMessage::of(delivery));
        }
        let _ = ch.close(200, "done".into()).await;
        let _ = conn.close(200, "done".into()).await;
        Ok(got)
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The pids whose parent is `parent` (from `/proc/*/stat`).
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces and parens.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// Whether `pid` still runs (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = stat[stat.rfind(')')? + 1..].to_string();
            after.split_whitespace().next().map(|s| s != "Z")
        })
        .unwrap_or(false)
}
