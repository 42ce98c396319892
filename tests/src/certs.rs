//! A throw-away PKI per test: a CA, the coordinator's server certificate,
//! agent and admin client certificates, an admin certificate from a foreign CA,
//! and the coordinator's credential-encryption key, all as files in a temp dir.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_common::domain::Role;
use ferry_proto::tls::TlsPaths;
use ferryctl::pki::{PemPair, Subject, create_ca, issue};

use crate::util::{LogDir, random_hex};

/// Paths of a CA bundle, a certificate and its private key (all PEM).
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// The same paths as [`TlsPaths`], for `ferry_proto::tls`.
    pub fn tls_paths(&self) -> TlsPaths {
        TlsPaths {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// The test CA and the files issued from it.
#[derive(Debug)]
pub struct TestPki {
    dir: LogDir,
    ca: PemPair,
    ca_path: PathBuf,
    coordinator: CertFiles,
    secret_key: PathBuf,
}

impl TestPki {
    /// Creates the CA, the coordinator certificate (SANs `localhost` and
    /// `127.0.0.1`) and the secret key file.
    pub fn new() -> Self {
        Self::try_new().unwrap_or_else(|e| panic!("create test PKI: {e:#}"))
    }

    fn try_new() -> anyhow::Result<Self> {
        let dir = LogDir::new("pki")?;
        let ca = create_ca("ferry test CA").context("create test CA")?;
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca.cert_pem).context("write ca.pem")?;

        let coordinator = issue(
            &ca,
            &Subject::Coordinator {
                name: "ferry-coordinator".into(),
                hosts: vec!["localhost".into(), "127.0.0.1".into()],
            },
        )
        .context("issue coordinator certificate")?;
        let coordinator = write_pair(dir.path(), "coordinator", &coordinator, &ca_path)?;

        let secret_key = dir.path().join("secret.key");
        std::fs::write(&secret_key, format!("{}\n", random_hex(32))).context("write secret.key")?;

        Ok(Self {
            dir,
            ca,
            ca_path,
            coordinator,
            secret_key,
        })
    }

    /// Directory holding all files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate.
    pub fn ca(&self) -> &Path {
        &self.ca_path
    }

    /// The coordinator's server certificate.
    pub fn coordinator(&self) -> CertFiles {
        self.coordinator.clone()
    }

    /// Another coordinator server certificate, valid for `hosts` (names or
    /// IP addresses) besides `localhost` and `127.0.0.1`.
    pub fn coordinator_for(&self, hosts: &[&str]) -> CertFiles {
        let mut all = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        all.extend(hosts.iter().map(|h| h.to_string()));
        let pair = issue(
            &self.ca,
            &Subject::Coordinator {
                name: "ferry-coordinator".into(),
                hosts: all,
            },
        )
        .unwrap_or_else(|e| panic!("issue coordinator certificate for {hosts:?}: {e:#}"));
        write_pair(
            self.dir.path(),
            &format!("coordinator-{}", random_hex(4)),
            &pair,
            &self.ca_path,
        )
        .unwrap_or_else(|e| panic!("write coordinator certificate: {e:#}"))
    }

    /// A client certificate with SAN `spiffe://ferry/admin/<name>`.
    pub fn admin(&self, name: &str) -> CertFiles {
        self.client(Role::Admin(name.into()), &format!("admin-{name}"))
    }

    /// An agent certificate of the site `default`.
    pub fn agent(&self, name: &str) -> CertFiles {
        self.agent_of(name, ferry_common::domain::DEFAULT_SITE)
    }

    /// A client certificate with SAN `spiffe://ferry/agent/<site>/<name>`.
    pub fn agent_of(&self, name: &str, site: &str) -> CertFiles {
        self.client(Role::agent(name, site), &format!("agent-{site}-{name}"))
    }

    /// An admin certificate issued by a different CA. `ca` is still the real
    /// test CA, so the client trusts the coordinator and only the client
    /// certificate is foreign.
    pub fn foreign_admin(&self, name: &str) -> CertFiles {
        let foreign_ca = create_ca("foreign CA").expect("create foreign CA");
        let pair = issue(&foreign_ca, &Subject::Client(Role::Admin(name.into())))
            .expect("issue foreign admin certificate");
        write_pair(
            self.dir.path(),
            &format!("foreign-admin-{name}"),
            &pair,
            &self.ca_path,
        )
        .expect("write foreign admin certificate")
    }

    /// A file with 64 hex characters (32 random bytes), for `FERRY_SECRET_KEY_FILE`.
    pub fn secret_key_file(&self) -> &Path {
        &self.secret_key
    }

    fn client(&self, role: Role, stem: &str) -> CertFiles {
        let pair = issue(&self.ca, &Subject::Client(role.clone()))
            .unwrap_or_else(|e| panic!("issue client certificate for {role:?}: {e:#}"));
        write_pair(self.dir.path(), stem, &pair, &self.ca_path)
            .unwrap_or_else(|e| panic!("write client certificate for {role:?}: {e:#}"))
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

fn write_pair(dir: &Path, stem: &str, pair: &PemPair, ca: &Path) -> anyhow::Result<CertFiles> {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, &pair.cert_pem).with_context(|| format!("write {}", cert.display()))?;
    std::fs::write(&key, &pair.key_pem).with_context(|| format!("write {}", key.display()))?;
    Ok(CertFiles {
        ca: ca.to_path_buf(),
        cert,
        key,
    })
}
