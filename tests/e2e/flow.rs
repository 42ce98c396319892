//! The full flow most transfer tests share: a [`Stack`], an S3 server, and
//! an AMQP exchange the coordinator publishes to through a proxy the test can
//! cut, with helpers to watch directories, start agents and read outcomes.

use std::collections::HashMap;
use std::time::Duration;

use ferry_proto as proto;
use ferry_tests::{
    AgentOptions, AmqpMessage, AmqpQueue, S3Server, TcpProxy, eventually, unique_exchange,
};
use sha2::{Digest, Sha256};

use crate::stack::{Stack, WAIT};

/// The bucket every flow stores into (each flow has its own S3 server).
pub(crate) const BUCKET: &str = "ferry-e2e";

/// Stack + S3 + an AMQP exchange the coordinator publishes to (through a proxy).
pub(crate) struct Flow {
    pub s: Stack,
    pub s3: S3Server,
    pub queue: AmqpQueue,
    pub amqp_proxy: TcpProxy,
}

pub(crate) async fn flow() -> Flow {
    flow_with(&[]).await
}

/// Like [`flow`], with extra (or overriding) coordinator environment.
pub(crate) async fn flow_with(extra_env: &[(&str, &str)]) -> Flow {
    let s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    let exchange = unique_exchange();
    let queue = AmqpQueue::declare(&exchange).await;
    let amqp_proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = format!("amqp://guest:guest@{}/%2f", amqp_proxy.addr());
    let mut env = vec![
        ("FERRY_AMQP_URL", url.as_str()),
        ("FERRY_AMQP_EXCHANGE", exchange.as_str()),
        ("FERRY_AMQP_ROUTING_KEY", "ferry.{server}"),
        ("FERRY_TASK_LEASE_SECS", "6"),
        ("FERRY_RETRY_BASE_SECS", "1"),
        ("FERRY_RETRY_MAX_SECS", "3"),
    ];
    env.extend_from_slice(extra_env);
    let s = Stack::with_coordinator_env(&env).await;
    Flow {
        s,
        s3,
        queue,
        amqp_proxy,
    }
}

/// The wire post-action of its text form (`keep`, `delete`, `move:/dir`).
pub(crate) fn post_action_of(text: &str) -> proto::PostAction {
    (&text.parse::<ferry_common::domain::PostAction>().unwrap()).into()
}

impl Flow {
    pub(crate) fn agent_opts(&self, capacity: u32) -> AgentOptions {
        AgentOptions {
            capacity,
            env: self.s3.env(),
            ..Default::default()
        }
    }

    pub(crate) fn agent_opts_via(&self, capacity: u32, s3_endpoint: &str) -> AgentOptions {
        let mut env = self.s3.env();
        for (k, v) in &mut env {
            if k == "AWS_ENDPOINT_URL" {
                *v = s3_endpoint.to_string();
            }
        }
        AgentOptions {
            capacity,
            env,
            ..Default::default()
        }
    }

    pub(crate) async fn watch(&mut self, server_id: i64, rel: &str, post_action: &str) -> i64 {
        self.s.sshd.mkdir(rel);
        self.s
            .admin
            .add_watch(proto::AddWatchRequest {
                server_id,
                directory: self.s.sshd.remote_path(rel),
                poll_interval_secs: 1,
                bucket: BUCKET.into(),
                key_template: "{server}/{dir}/{version}/{name}".into(),
                post_action: Some(post_action_of(post_action)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .id
    }

    /// The stored object of the one file named `name` (keys name a version,
    /// so tests read the key the file row records).
    pub(crate) async fn stored(&self, name: &str) -> Vec<u8> {
        let key: String = sqlx::query_scalar(
            "SELECT object_key FROM files WHERE path LIKE '%/' || $1 AND object_key IS NOT NULL",
        )
        .bind(name)
        .fetch_one(self.s.db.pool())
        .await
        .unwrap();
        self.s3.get_object(BUCKET, &key).await
    }

    pub(crate) async fn statuses(&self) -> HashMap<String, (i64, String)> {
        let rows: Vec<(String, i64, String)> = sqlx::query_as("SELECT path, id, status FROM files")
            .fetch_all(self.s.db.pool())
            .await
            .unwrap();
        rows.into_iter().map(|(p, id, st)| (p, (id, st))).collect()
    }

    pub(crate) async fn wait_status(&self, n: usize, status: &str, timeout: Duration) {
        eventually(&format!("{n} files {status}"), timeout, || async {
            let count = self
                .statuses()
                .await
                .values()
                .filter(|(_, st)| st == status)
                .count();
            (count >= n).then_some(())
        })
        .await;
    }

    /// Messages until `n` distinct ones arrived (and 2 s more to catch duplicates).
    pub(crate) async fn messages(&mut self, n: usize) -> Vec<AmqpMessage> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        while got.len() < n && tokio::time::Instant::now() < deadline {
            if let Some(m) = self.queue.next_message(Duration::from_secs(1)).await {
                got.push(m);
            }
        }
        got.extend(self.queue.drain_for(Duration::from_secs(2)).await);
        got
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
