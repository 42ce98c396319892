//! Reading an SFTP server's host key for pinning (`--trust-host-key`, `ProbeHostKey`).
//! The SSH code is the agent's (`ferry_agent::sftp`); this is the coordinator's seam.

use std::time::Duration;

/// A host key as presented by the server.
#[derive(Debug, Clone)]
pub struct ProbedKey {
    pub fingerprint: String,
    pub algorithm: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read the SSH host key of {host}:{port}: {message}")]
pub struct ProbeError {
    host: String,
    port: u16,
    message: String,
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn probe(host: &str, port: u16) -> Result<ProbedKey, ProbeError> {
    match ferry_agent::sftp::probe_host_key(host, port, PROBE_TIMEOUT).await {
        Ok((fingerprint, algorithm)) => Ok(ProbedKey {
            fingerprint,
            algorithm,
        }),
        Err(e) => Err(ProbeError {
            host: host.to_string(),
            port,
            message: e.to_string(),
        }),
    }
}
