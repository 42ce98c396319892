//! A hand-driven agent for trust tests: speaks `AgentService.Connect`
//! directly (the generated client, not the real agent) with a valid agent
//! certificate, sends whatever the test tells it to and records what the
//! coordinator sends back, as an attacker holding a leaked certificate would.

use std::time::Duration;

use sqlx::PgPool;

use ferry_proto::agent_service_client::AgentServiceClient;
use ferry_proto::tls::TlsPaths;
use ferry_proto::{self as proto, agent_message::Body, coordinator_message::Body as CBody};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::certs::CertFiles;

/// One open agent stream driven by the test.
pub struct RogueAgent {
    tx: mpsc::Sender<proto::AgentMessage>,
    inbound: tonic::Streaming<proto::CoordinatorMessage>,
}

impl RogueAgent {
    /// Opens a stream to `endpoint` (`https://127.0.0.1:PORT`) with `certs`
    /// and sends a hello claiming `site` (capacity 4). `Err` is the
    /// coordinator's refusal.
    pub async fn connect(
        endpoint: &str,
        certs: &CertFiles,
        site: &str,
    ) -> Result<RogueAgent, tonic::Status> {
        Self::connect_with_capacity(endpoint, certs, site, 4).await
    }

    /// Like [`RogueAgent::connect`] with the transfer `capacity` the hello
    /// announces: 0 takes no tasks; the only agent of a site with capacity > 0
    /// gets every task of that site.
    pub async fn connect_with_capacity(
        endpoint: &str,
        certs: &CertFiles,
        site: &str,
        capacity: u32,
    ) -> Result<RogueAgent, tonic::Status> {
        let hello = proto::Hello {
            version: "rogue".into(),
            site: site.into(),
            capacity,
            running_tasks: Vec::new(),
        };
        Self::connect_with_hello(endpoint, certs, hello).await
    }

    /// Opens a stream whose first message is `hello`, whatever it says.
    pub async fn connect_with_hello(
        endpoint: &str,
        certs: &CertFiles,
        hello: proto::Hello,
    ) -> Result<RogueAgent, tonic::Status> {
        let tls = TlsPaths {
            ca: certs.ca.clone(),
            cert: certs.cert.clone(),
            key: certs.key.clone(),
        }
        .load()
        .unwrap_or_else(|e| panic!("load rogue agent certificates: {e:#}"))
        .client_config("127.0.0.1");
        let channel = Channel::from_shared(endpoint.to_string())
            .unwrap_or_else(|e| panic!("endpoint {endpoint}: {e}"))
            .tls_config(tls)
            .unwrap_or_else(|e| panic!("TLS config: {e}"))
            // The HTTP/2 minimum (64 KiB) instead of hyper's megabytes: a
            // rogue that stops reading backs the coordinator up quickly.
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"));
        let (tx, rx) = mpsc::channel(64);
        tx.send(proto::AgentMessage {
            body: Some(Body::Hello(hello)),
        })
        .await
        .unwrap_or_else(|_| panic!("queue hello"));
        let inbound = AgentServiceClient::new(channel)
            .connect(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(RogueAgent { tx, inbound })
    }

    /// Sends one message on the stream.
    pub async fn send(&self, body: Body) {
        self.tx
            .send(proto::AgentMessage { body: Some(body) })
            .await
            .unwrap_or_else(|_| panic!("rogue agent stream closed"));
    }

    /// Everything the coordinator sends within `window` (the stream may also
    /// end earlier, with the returned status).
    pub async fn collect(&mut self, window: Duration) -> (Vec<CBody>, Option<tonic::Status>) {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, self.inbound.message()).await {
                Err(_) => return (got, None),
                Ok(Ok(Some(proto::CoordinatorMessage { body: Some(b) }))) => got.push(b),
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => return (got, Some(tonic::Status::ok("stream ended"))),
                Ok(Err(status)) => return (got, Some(status)),
            }
        }
    }

    /// Reads the stream until `pick` accepts a message (others are dropped);
    /// panics naming `what` if none comes within `timeout` or the stream ends.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(&CBody) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.inbound.message()).await {
                Err(_) => panic!("rogue agent: no {what} within {timeout:?}"),
                Ok(Ok(Some(proto::CoordinatorMessage { body: Some(b) }))) => {
                    if let Some(t) = pick(&b) {
                        return t;
                    }
                }
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => panic!("rogue agent: stream ended while waiting for {what}"),
                Ok(Err(status)) => {
                    panic!("rogue agent: stream failed waiting for {what}: {status}")
                }
            }
        }
    }

    /// Waits until the coordinator handled everything sent so far: the
    /// coordinator handles one stream's messages in order, so once a heartbeat
    /// sent last is recorded (`agents.errors` = a fresh marker for `name`,
    /// this stream's agent: its identity `site/name`, or a name of the site
    /// `default`), every earlier message was handled.
    pub async fn barrier(&self, db: &PgPool, name: &str) {
        let marker = u64::from(next_marker());
        self.send(Body::Heartbeat(proto::Heartbeat {
            errors: marker,
            ..Default::default()
        }))
        .await;
        crate::eventually(
            "the rogue agent's messages to be handled",
            Duration::from_secs(30),
            || async {
                let errors: Option<i64> = sqlx::query_scalar(
                    "SELECT errors FROM agents \
                     WHERE site || '/' || name = $1 OR (site = 'default' AND name = $1)",
                )
                .bind(name)
                .fetch_optional(db)
                .await
                .ok()
                .flatten();
                (errors == Some(marker as i64)).then_some(())
            },
        )
        .await;
    }
}

/// A heartbeat marker unlikely to repeat within a test.
fn next_marker() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1_000_000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
