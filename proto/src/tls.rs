//! mTLS helpers: loading PEM files, building tonic TLS configs, and reading a
//! caller's role from its client certificate's SAN URI.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use ferry_common::domain::Role;

/// Installs aws-lc-rs as the process-wide rustls provider. Call first thing in `main`:
/// it keeps rustls from panicking if any dependency ever enables a second provider.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Paths of a CA bundle, a certificate and its key.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The PEM contents of [`TlsPaths`].
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("read {what} {}", path.display()))?;
    if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
        anyhow::bail!("{what} {} is not a PEM file", path.display());
    }
    Ok(bytes)
}

impl TlsPaths {
    pub fn load(&self) -> anyhow::Result<TlsMaterial> {
        Ok(TlsMaterial {
            ca_pem: read(&self.ca, "CA certificate")?,
            cert_pem: read(&self.cert, "certificate")?,
            key_pem: read(&self.key, "private key")?,
        })
    }
}

impl TlsMaterial {
    /// Server side: present our certificate and require a client certificate
    /// chaining to the CA (no certificate, or another CA's, fails the handshake).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client side: trust the CA, present our certificate, and check the server's
    /// name against `domain` (the host part of the endpoint).
    pub fn client_config(&self, domain: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(domain.trim_start_matches('[').trim_end_matches(']'))
    }
}

/// Every ferry role named by the certificate's SAN URIs.
pub fn roles_of_certificate(der: &[u8]) -> Vec<Role> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Role::from_uri(uri),
            _ => None,
        })
        .collect()
}

/// The role of the peer of a gRPC request (its leaf certificate), if any.
pub fn peer_role<T>(request: &tonic::Request<T>) -> Option<Role> {
    let certs = request.peer_certs()?;
    let leaf = certs.first()?;
    let roles = roles_of_certificate(leaf.as_ref());
    // A certificate naming several roles is ambiguous: grant nothing.
    match roles.as_slice() {
        [only] => Some(only.clone()),
        _ => None,
    }
}

/// Host part of an `https://host:port` endpoint, for TLS name checks.
pub fn endpoint_host(endpoint: &str) -> anyhow::Result<String> {
    let uri: tonic::codegen::http::Uri = endpoint.parse().with_context(|| {
        format!("endpoint {endpoint:?} is not a URI (expected https://host:port)")
    })?;
    uri.host()
        .map(str::to_string)
        .with_context(|| format!("endpoint {endpoint:?} has no host"))
}
