//! A ferry cluster for the HA tests: N coordinators (each
//! with `FERRY_HTTP_LISTEN`, id `c1`, `c2`, ...) behind [`HaProxy`] started
//! from the deployed config, agents connected through the balancer, an sshd,
//! an S3 server and an AMQP queue; SFTP, S3 and AMQP are reached through
//! [`TcpProxy`]s a test can cut.
//!
//! Outcomes are read from Postgres ([`Cluster::files`]) and the queue; the
//! pure check of a run ([`Tally::of`]) counts lost files and duplicate or
//! conflicting announcements.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use ferry_proto::{self as proto, admin_service_client::AdminServiceClient};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use crate::agent::{Agent, AgentOptions};
use crate::amqp::{AmqpMessage, AmqpQueue, unique_exchange};
use crate::certs::TestPki;
use crate::coordinator::Coordinator;
use crate::haproxy::{Backend, HaProxy};
use crate::postgres::TestDb;
use crate::proxy::TcpProxy;
use crate::s3::S3Server;
use crate::sshd::Sshd;
use crate::util::free_port;

/// The bucket every cluster stores into (each cluster has its own S3 server).
pub const BUCKET: &str = "ferry-ha";

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub coordinators: usize,
    /// Extra coordinator environment (overrides the defaults).
    pub coordinator_env: Vec<(String, String)>,
    /// The database the coordinators and the test use instead of the
    /// per-test database on the shared server (e.g. a [`crate::PgCluster`]'s).
    pub database_url: Option<String>,
    /// The broker the coordinators publish to (through the AMQP proxy)
    /// instead of the shared one; the cluster's queue stays on the shared
    /// broker and then gets nothing.
    pub amqp_target: Option<SocketAddr>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            coordinators: 2,
            coordinator_env: Vec::new(),
            database_url: None,
            amqp_target: None,
        }
    }
}

/// See the module docs.
pub struct Cluster {
    /// The per-test database on the shared server (unused by the cluster
    /// when [`ClusterOptions::database_url`] is set).
    pub db: TestDb,
    /// A pool on the database the coordinators use.
    pub pool: PgPool,
    pub database_url: String,
    pub pki: TestPki,
    pub sshd: Sshd,
    pub s3: S3Server,
    pub queue: AmqpQueue,
    pub coordinators: Vec<Coordinator>,
    /// `FERRY_HTTP_LISTEN` of each coordinator.
    pub http: Vec<SocketAddr>,
    pub lb: HaProxy,
    pub admin: AdminServiceClient<Channel>,
    pub agents: Vec<Agent>,
    pub sftp_proxy: TcpProxy,
    pub s3_proxy: TcpProxy,
    pub amqp_proxy: TcpProxy,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("database_url", &self.database_url)
            .field("lb", &self.lb.addr())
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

impl Drop for Cluster {
    /// A failing test shows what the coordinators and agents logged last
    /// (their temp dirs, with the whole logs, are kept and named too).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, c) in self.coordinators.iter().enumerate() {
            eprintln!(
                "---- coordinator {} ({}):\n{}",
                coordinator_name(i),
                c.log_path().display(),
                c.log_tail(60)
            );
        }
        for a in &self.agents {
            eprintln!(
                "---- agent ({}):\n{}",
                a.log_path().display(),
                a.log_tail(30)
            );
        }
    }
}

/// The name of coordinator `i` (its `FERRY_COORDINATOR_ID` and HAProxy server name).
pub fn coordinator_name(i: usize) -> String {
    format!("c{}", i + 1)
}

impl Cluster {
    /// Starts everything and waits until HAProxy sees every coordinator UP.
    pub async fn start(opts: ClusterOptions) -> Cluster {
        crate::init();
        let db = TestDb::create().await;
        let database_url = opts
            .database_url
            .clone()
            .unwrap_or_else(|| db.url().to_string());
        let pool = if opts.database_url.is_some() {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(30))
                .connect_lazy(&database_url)
                .unwrap_or_else(|e| panic!("pool on {database_url}: {e}"))
        } else {
            db.pool().clone()
        };
        let pki = TestPki::new();
        let sshd = Sshd::start().await;
        let s3 = S3Server::start().await;
        s3.create_bucket(BUCKET).await;
        let exchange = unique_exchange();
        let queue = AmqpQueue::declare(&exchange).await;
        let sftp_proxy = TcpProxy::start(sshd.addr()).await;
        let s3_proxy = TcpProxy::start(s3.addr()).await;
        let amqp_proxy = TcpProxy::start(
            opts.amqp_target
                .unwrap_or_else(|| "127.0.0.1:5672".parse().unwrap()),
        )
        .await;
        let amqp = format!("amqp://guest:guest@{}/%2f", amqp_proxy.addr());

        let mut coordinators = Vec::new();
        let mut http = Vec::new();
        let mut backends = Vec::new();
        for i in 0..opts.coordinators {
            let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let name = coordinator_name(i);
            let mut env: Vec<(String, String)> = [
                ("FERRY_DATABASE_URL", database_url.as_str()),
                ("FERRY_HTTP_LISTEN", &listen.to_string()),
                ("FERRY_COORDINATOR_ID", &name),
                ("FERRY_AMQP_URL", &amqp),
                ("FERRY_AMQP_EXCHANGE", &exchange),
                ("FERRY_AMQP_ROUTING_KEY", "ferry.{server}"),
                ("FERRY_TASK_LEASE_SECS", "10"),
                ("FERRY_RETRY_BASE_SECS", "1"),
                ("FERRY_RETRY_MAX_SECS", "3"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            for (k, v) in &opts.coordinator_env {
                env.retain(|(key, _)| key != k);
                env.push((k.clone(), v.clone()));
            }
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let coordinator = Coordinator::start_with_env(&db, &pki, &env).await;
            backends.push(Backend {
                name: name.clone(),
                grpc: coordinator.addr(),
                http: listen,
            });
            coordinators.push(coordinator);
            http.push(listen);
        }
        let lb = HaProxy::start(&backends).await;
        for b in &backends {
            lb.wait_status(&b.name, "UP", Duration::from_secs(60)).await;
        }
        let admin = AdminServiceClient::new(
            lb.channel(&pki.admin("alice"))
                .await
                .unwrap_or_else(|e| panic!("{e:#}")),
        );
        Cluster {
            db,
            pool,
            database_url,
            pki,
            sshd,
            s3,
            queue,
            coordinators,
            http,
            lb,
            admin,
            agents: Vec::new(),
            sftp_proxy,
            s3_proxy,
            amqp_proxy,
        }
    }

    /// Registers the server `name` (reached through the SFTP proxy) with a
    /// watch on the directory `name`, polled every second; returns the server id.
    pub async fn watch(&mut self, name: &str) -> i64 {
        self.sshd.mkdir(name);
        let server = self
            .admin
            .add_server(proto::AddServerRequest {
                name: name.into(),
                hostname: "127.0.0.1".into(),
                port: u32::from(self.sftp_proxy.addr().port()),
                username: self.sshd.user().into(),
                auth: Some(proto::add_server_request::Auth::Password(proto::Password {
                    password: self.sshd.password().into(),
                })),
                host_key_fingerprint: self.sshd.host_key_fingerprint().into(),
                max_sessions: 8,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("add server {name}: {e}"))
            .into_inner()
            .id;
        self.admin
            .add_watch(proto::AddWatchRequest {
                server_id: server,
                directory: self.sshd.remote_path(name),
                poll_interval_secs: 1,
                bucket: BUCKET.into(),
                key_template: "{server}/{dir}/{version}/{name}".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("add watch {name}: {e}"));
        server
    }

    /// Starts an agent connected through the balancer, storing through the S3 proxy.
    pub async fn start_agent(&mut self, name: &str, capacity: u32) {
        let mut env = self.s3.env();
        for (k, v) in &mut env {
            if k == "AWS_ENDPOINT_URL" {
                *v = format!("http://{}", self.s3_proxy.addr());
            }
        }
        let agent = Agent::start(
            name,
            &self.pki.agent_of(name, "default"),
            &[self.lb.endpoint()],
            AgentOptions {
                capacity,
                env,
                ..Default::default()
            },
        )
        .await;
        self.agents.push(agent);
    }

    /// Every file row, by id.
    pub async fn files(&self) -> anyhow::Result<Vec<FileRow>> {
        Ok(sqlx::query_as(
            "SELECT id, path, size, mtime_unix, status, attempts, announcement_id::text AS announcement_id, \
                    object_key, lease_owner, \
                    (SELECT EXTRACT(EPOCH FROM (max(e.at) - f.discovered_at))::float8 \
                     FROM file_events e WHERE e.file_id = f.id AND e.to_status = 'processed') AS latency_secs \
             FROM files f ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// `(agent, connected, coordinator id, seconds since it connected)` per agent row.
    pub async fn agent_sessions(&self) -> anyhow::Result<Vec<AgentSession>> {
        Ok(sqlx::query_as(
            "SELECT id AS name, connected, connected_coordinator, \
                    EXTRACT(EPOCH FROM (now() - connected_at))::float8 AS connected_secs \
             FROM agents ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// The status code of `GET /readyz` on coordinator `i`; `None` if nothing answers.
    pub async fn readyz(&self, i: usize) -> Option<u16> {
        http_get(self.http[i], "/readyz").await.map(|(s, _)| s)
    }

    /// Messages until no new one arrives for `quiet`, or `timeout` passed.
    pub async fn collect_messages(&mut self, quiet: Duration) -> Vec<AmqpMessage> {
        let mut got = Vec::new();
        while let Some(m) = self.queue.next_message(quiet).await {
            got.push(m);
        }
        got
    }
}

/// A file row as the HA checks read it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FileRow {
    pub id: i64,
    pub path: String,
    pub size: i64,
    pub mtime_unix: i64,
    pub status: String,
    pub attempts: i32,
    pub announcement_id: String,
    pub object_key: Option<String>,
    pub lease_owner: Option<String>,
    /// Discovery (the row's insert) to `processed`, if it got there.
    pub latency_secs: Option<f64>,
}

/// An agent row as the HA checks read it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AgentSession {
    /// The agent's identity, `site/name` (as `files.lease_owner` names it).
    pub name: String,
    pub connected: bool,
    pub connected_coordinator: Option<String>,
    pub connected_secs: Option<f64>,
}

/// What a run delivered, from the file rows and the messages (pure).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub files: usize,
    pub processed: usize,
    pub failed: usize,
    /// Files whose version is neither processed nor failed, or processed
    /// without any message.
    pub lost: Vec<String>,
    pub messages: usize,
    /// Messages beyond the first per `message_id`.
    pub duplicates: usize,
    /// `message_id`s carried by messages naming different file versions
    /// (path, size, mtime) or different bytes (sha256).
    pub conflicting_ids: Vec<String>,
    /// Messages whose body's `announcement_id` is not their `message_id`.
    pub mismatched_bodies: usize,
}

/// `files N processed N failed N lost N messages N duplicates N`.
impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "files {} processed {} failed {} lost {} messages {} duplicates {}",
            self.files,
            self.processed,
            self.failed,
            self.lost.len(),
            self.messages,
            self.duplicates
        )
    }
}

impl Tally {
    pub fn of(files: &[FileRow], messages: &[AmqpMessage]) -> Tally {
        let mut by_id: HashMap<String, Vec<(String, i64, String, String)>> = HashMap::new();
        let mut mismatched = 0;
        for m in messages {
            let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap_or_default();
            let id = m.message_id.clone().unwrap_or_default();
            if body["announcement_id"].as_str() != Some(id.as_str()) {
                mismatched += 1;
            }
            let version = (
                body["path"].as_str().unwrap_or_default().to_string(),
                body["size"].as_i64().unwrap_or(-1),
                body["mtime"].as_str().unwrap_or_default().to_string(),
                body["sha256"].as_str().unwrap_or_default().to_string(),
            );
            by_id.entry(id).or_default().push(version);
        }
        let mut conflicting: Vec<String> = by_id
            .iter()
            .filter(|(_, versions)| versions.iter().any(|v| *v != versions[0]))
            .map(|(id, _)| id.clone())
            .collect();
        conflicting.sort();
        let lost = files
            .iter()
            .filter(|f| match f.status.as_str() {
                "processed" => !by_id.contains_key(&f.announcement_id),
                "failed" => false,
                _ => true,
            })
            .map(|f| format!("{} ({}, {})", f.path, f.status, f.announcement_id))
            .collect();
        Tally {
            files: files.len(),
            processed: files.iter().filter(|f| f.status == "processed").count(),
            failed: files.iter().filter(|f| f.status == "failed").count(),
            lost,
            messages: messages.len(),
            duplicates: messages.len() - by_id.len(),
            conflicting_ids: conflicting,
            mismatched_bodies: mismatched,
        }
    }
}

/// Percentile `p` (0..=100) of `values` (nearest rank); `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Deterministic test content: `size` bytes derived from `seed` (xorshift).
pub fn content(seed: u64, size: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// `(status, body)` of `GET path` on a plain-HTTP probe port; `None` if
/// nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// sha256 (hex) of every stored object of `files`, by path, read from S3.
pub async fn stored_digests(s3: &S3Server, files: &[FileRow]) -> BTreeMap<String, String> {
    use sha2::{Digest, Sha256};
    let mut out = BTreeMap::new();
    for f in files {
        if let Some(key) = &f.object_key {
            let bytes = s3.get_object(BUCKET, key).await;
            out.insert(f.path.clone(), hex::encode(Sha256::digest(&bytes)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: &str, status: &str, id: &str) -> FileRow {
        FileRow {
            id: 1,
            path: path.into(),
            size: 1,
            mtime_unix: 0,
            status: status.into(),
            attempts: 1,
            announcement_id: id.into(),
            object_key: None,
            lease_owner: None,
            latency_secs: None,
        }
    }

    fn message(id: &str, path: &str) -> AmqpMessage {
        AmqpMessage {
            message_id: Some(id.into()),
            routing_key: "r".into(),
            body: serde_json::to_vec(&serde_json::json!({
                "announcement_id": id, "path": path, "size": 1, "mtime": "t"
            }))
            .unwrap(),
            delivery_mode: Some(2),
            content_type: None,
            kind: Some("ferry.file.stored".into()),
            redelivered: false,
        }
    }

    #[test]
    fn tally_counts_lost_duplicates_and_conflicts() {
        let files = [
            row("/a", "processed", "u1"),
            row("/b", "processed", "u2"),
            row("/c", "in_progress", "u3"),
            row("/d", "failed", "u4"),
        ];
        let msgs = [
            message("u1", "/a"),
            message("u1", "/a"),
            message("u5", "/x"),
            message("u5", "/y"),
        ];
        let t = Tally::of(&files, &msgs);
        assert_eq!((t.files, t.processed, t.failed), (4, 2, 1));
        assert_eq!(t.lost.len(), 2, "{:?}", t.lost); // /b never announced, /c not done
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.conflicting_ids, vec!["u5".to_string()]);
        assert_eq!(t.mismatched_bodies, 0);
    }

    #[test]
    fn the_same_message_id_with_other_bytes_conflicts() {
        let with_sha = |sha: &str| {
            let mut m = message("u1", "/a");
            let mut body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
            body["sha256"] = sha.into();
            m.body = serde_json::to_vec(&body).unwrap();
            m
        };
        let files = [row("/a", "processed", "u1")];
        let same = Tally::of(&files, &[with_sha("aa"), with_sha("aa")]);
        assert_eq!((same.duplicates, same.conflicting_ids.len()), (1, 0));
        let other = Tally::of(&files, &[with_sha("aa"), with_sha("bb")]);
        assert_eq!(other.conflicting_ids, vec!["u1".to_string()]);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
