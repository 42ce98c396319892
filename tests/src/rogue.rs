//! A hand-driven agent for trust tests: speaks `AgentService.Connect`
//! directly (the generated client, not the real agent) with a valid agent
//! certificate, sends whatever the test tells it to and records what the
//! coordinator sends back, as an attacker holding a leaked certificate would.

use std::time::Duration;

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
    /// and sends a hello claiming `site`. `Err` is the coordinator's refusal.
    pub async fn connect(
        endpoint: &str,
        certs: &CertFiles,
        site: &str,
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
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"));
        let (tx, rx) = mpsc::channel(64);
        tx.send(proto::AgentMessage {
            body: Some(Body::Hello(proto::Hello {
                version: "rogue".into(),
                site: site.into(),
                capacity: 4,
                running_tasks: Vec::new(),
            })),
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
}
