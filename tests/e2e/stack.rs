//! The stack most end-to-end tests share: a fresh database, PKI, a real
//! coordinator and sshd, an admin client, and helpers to register servers and
//! watches and to start agents.

use std::time::Duration;

use ferry_proto::{
    self as proto, admin_service_client::AdminServiceClient, coordinator_message::Body as CBody,
};
use ferry_tests::{
    Agent, AgentOptions, Coordinator, RogueAgent, Sshd, TestDb, TestPki, eventually,
};
use tonic::transport::Channel;

pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// A coordinator, an sshd and an admin client.
pub(crate) struct Stack {
    pub db: TestDb,
    pub pki: TestPki,
    pub coord: Coordinator,
    pub sshd: Sshd,
    pub admin: AdminServiceClient<Channel>,
}

impl Stack {
    pub(crate) async fn new() -> Stack {
        Stack::with_coordinator_env(&[]).await
    }

    /// Like [`Stack::new`], with extra coordinator environment variables.
    pub(crate) async fn with_coordinator_env(env: &[(&str, &str)]) -> Stack {
        let db = TestDb::create().await;
        let pki = TestPki::new();
        let coord = Coordinator::start_with_env(&db, &pki, env).await;
        let sshd = Sshd::start().await;
        let admin = coord.admin_client(&pki.admin("alice")).await.unwrap();
        Stack {
            db,
            pki,
            coord,
            sshd,
            admin,
        }
    }

    pub(crate) fn server_req(&self, name: &str) -> proto::AddServerRequest {
        proto::AddServerRequest {
            name: name.into(),
            hostname: "127.0.0.1".into(),
            port: u32::from(self.sshd.port()),
            username: self.sshd.user().into(),
            auth: Some(proto::add_server_request::Auth::Password(proto::Password {
                password: self.sshd.password().into(),
            })),
            host_key_fingerprint: self.sshd.host_key_fingerprint().into(),
            ..Default::default()
        }
    }

    pub(crate) async fn add_server(&mut self, req: proto::AddServerRequest) -> i64 {
        self.admin.add_server(req).await.unwrap().into_inner().id
    }

    /// A watch on `rel` (under the sshd data root), polled every second.
    pub(crate) async fn add_watch(&mut self, server_id: i64, rel: &str, glob: &str) -> i64 {
        self.sshd.mkdir(rel);
        self.admin
            .add_watch(proto::AddWatchRequest {
                server_id,
                directory: self.sshd.remote_path(rel),
                glob: glob.into(),
                poll_interval_secs: 1,
                bucket: "ferry-test".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .id
    }

    /// A protocol-level agent `name` of capacity 0 (it takes no transfers)
    /// once it was given the poll of `watch_id`, and the watch as assigned.
    pub(crate) async fn rogue_poller(
        &self,
        name: &str,
        watch_id: i64,
    ) -> (RogueAgent, proto::WatchSpec) {
        let mut agent =
            RogueAgent::connect_with_capacity(&self.coord.endpoint(), &self.pki.agent(name), "", 0)
                .await
                .expect("the agent connects");
        let spec = agent
            .wait_for("poll assignment", WAIT, |m| match m {
                CBody::PollAssignment(a) => {
                    a.watches.iter().find(|w| w.watch_id == watch_id).cloned()
                }
                _ => None,
            })
            .await;
        (agent, spec)
    }

    /// A discovery-only agent (capacity 0: it polls but takes no transfers).
    pub(crate) async fn agent(&self, name: &str, site: &str) -> Agent {
        let opts = AgentOptions {
            site: site.into(),
            capacity: 0,
            ..Default::default()
        };
        self.agent_with(name, opts).await
    }

    pub(crate) async fn agent_with(&self, name: &str, opts: AgentOptions) -> Agent {
        let certs = self.pki.agent_of(name, &opts.site);
        Agent::start(name, &certs, &[self.coord.endpoint()], opts).await
    }

    /// (path, size, status) of every file row, by path.
    pub(crate) async fn files(&self) -> Vec<(String, i64, String)> {
        sqlx::query_as("SELECT path, size, status FROM files ORDER BY path, size")
            .fetch_all(self.db.pool())
            .await
            .unwrap()
    }

    pub(crate) async fn file_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM files")
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }

    pub(crate) async fn server(&mut self, id: i64) -> proto::Server {
        self.admin
            .get_server(proto::GetServerRequest {
                id,
                name: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until the server reports `n` more completed polls than now.
    pub(crate) async fn wait_polls(&mut self, id: i64, n: u32) {
        for _ in 0..n {
            let before = self.server(id).await.health.and_then(|h| h.last_poll_at);
            let admin = self.admin.clone();
            eventually("another poll", WAIT, || {
                let mut admin = admin.clone();
                async move {
                    let s = admin
                        .get_server(proto::GetServerRequest {
                            id,
                            name: String::new(),
                        })
                        .await
                        .ok()?
                        .into_inner();
                    let at = s.health?.last_poll_at;
                    (at.is_some() && at != before).then_some(())
                }
            })
            .await;
        }
    }

    /// Waits until the server's current poller satisfies `ok`; returns its
    /// identity (`site/name`).
    pub(crate) async fn wait_poller(
        &self,
        id: i64,
        what: &str,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let ok = &ok;
        eventually(what, WAIT, || {
            let mut admin = self.admin.clone();
            async move {
                let req = proto::GetServerRequest {
                    id,
                    name: String::new(),
                };
                let p = admin
                    .get_server(req)
                    .await
                    .ok()?
                    .into_inner()
                    .health?
                    .poller_agent;
                ok(&p).then_some(p)
            }
        })
        .await
    }
}

/// The file counts the coordinators keep without reading `files` (`/metrics`,
/// `GetStatus`) equal a count of every row, by server and status.
pub(crate) async fn assert_counts_exact(db: &sqlx::PgPool) {
    let kept: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT server_id, status, sum(n)::BIGINT FROM ( \
             SELECT server_id, status, n FROM file_counts \
             UNION ALL SELECT server_id, status, n FROM file_count_deltas) c \
         GROUP BY server_id, status HAVING sum(n) <> 0 ORDER BY server_id, status",
    )
    .fetch_all(db)
    .await
    .unwrap();
    let counted: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT server_id, status, count(*) FROM files GROUP BY server_id, status \
         ORDER BY server_id, status",
    )
    .fetch_all(db)
    .await
    .unwrap();
    assert_eq!(kept, counted, "kept file counts differ from the rows");
}
