//! Reading an SFTP server's host key for pinning (`--trust-host-key`,
//! `ProbeHostKey`) through a connected agent of the server's site.
//!
//! **Architecture invariant:** the coordinator never opens an SSH connection.
//! SFTP servers may be reachable only from their site, so the probe is a
//! `HostKeyProbeRequest` on an agent's stream, matched to its
//! `HostKeyProbeResult` by request id here.

use ferry_common::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto as proto;
use tokio::sync::oneshot;
use uuid::Uuid;

/// How long an agent may take to answer a probe (its own SSH timeout is 10 s).
pub(crate) const PROBE_ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// A host key as presented by the server.
#[derive(Debug, Clone)]
pub(crate) struct ProbedKey {
    pub(crate) fingerprint: String,
    pub(crate) algorithm: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    #[error(
        "no agent of site {site:?} is connected to this coordinator, and only an agent of that \
         site can read the SSH host key of {host}:{port}; start one, or pin the key with \
         --host-key SHA256:..."
    )]
    NoAgent {
        site: String,
        host: String,
        port: u16,
    },
    #[error(
        "agent {agent} (site {site:?}) cannot read the SSH host key of {host}:{port}: {message}"
    )]
    Failed {
        agent: String,
        site: String,
        host: String,
        port: u16,
        message: String,
    },
    #[error("agent {agent} did not answer the host-key probe of {host}:{port} within {secs} s")]
    NoAnswer {
        agent: String,
        host: String,
        port: u16,
        secs: u64,
    },
}

/// A probe waiting for its answer: who was asked, and where the answer goes.
type Waiting = (String, oneshot::Sender<proto::HostKeyProbeResult>);

/// Probes waiting for their agent's answer, by request id. An answer counts
/// only from the agent the probe was sent to.
#[derive(Debug, Clone, Default)]
pub(crate) struct PendingProbes(Arc<Mutex<HashMap<String, Waiting>>>);

impl PendingProbes {
    /// A new request id for a probe sent to `agent`, and the receiver of its answer.
    pub(crate) fn register(
        &self,
        agent: &str,
    ) -> (String, oneshot::Receiver<proto::HostKeyProbeResult>) {
        let id = Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        lock(&self.0).insert(id.clone(), (agent.to_string(), tx));
        (id, rx)
    }

    /// Hands `agent`'s answer to the waiting caller; false if nobody waits
    /// for this id from this agent (unknown id, another agent's probe, or the
    /// caller gave up).
    pub(crate) fn resolve(&self, agent: &str, result: proto::HostKeyProbeResult) -> bool {
        let mut pending = lock(&self.0);
        if pending
            .get(&result.request_id)
            .map(|(asked, _)| asked.as_str())
            != Some(agent)
        {
            return false;
        }
        match pending.remove(&result.request_id) {
            Some((_, tx)) => tx.send(result).is_ok(),
            None => false,
        }
    }

    pub(crate) fn forget(&self, request_id: &str) {
        lock(&self.0).remove(request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_reach_their_own_request_only() {
        let pending = PendingProbes::default();
        let (a, mut rx_a) = pending.register("site-agent");
        let (b, _rx_b) = pending.register("site-agent");
        assert!(!pending.resolve(
            "site-agent",
            proto::HostKeyProbeResult {
                request_id: "unknown".into(),
                ..Default::default()
            }
        ));
        // Another agent cannot answer, even knowing the id.
        assert!(!pending.resolve(
            "mallory",
            proto::HostKeyProbeResult {
                request_id: a.clone(),
                fingerprint: "SHA256:forged".into(),
                ..Default::default()
            }
        ));
        assert!(pending.resolve(
            "site-agent",
            proto::HostKeyProbeResult {
                request_id: a.clone(),
                fingerprint: "SHA256:x".into(),
                ..Default::default()
            }
        ));
        assert_eq!(rx_a.try_recv().unwrap().fingerprint, "SHA256:x");
        // An answer counts once.
        assert!(!pending.resolve(
            "site-agent",
            proto::HostKeyProbeResult {
                request_id: a,
                ..Default::default()
            }
        ));
        pending.forget(&b);
        assert!(!pending.resolve(
            "site-agent",
            proto::HostKeyProbeResult {
                request_id: b,
                ..Default::default()
            }
        ));
    }
}
