//! Development PKI: a CA and the coordinator, agent and admin certificates that
//! `ferryctl certs` and the test harness issue. Production operators bring their
//! own PKI; only the SAN URI convention of [`ferry_common::domain::Role`] matters.

use std::net::IpAddr;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use ferry_common::domain::Role;

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a certificate is for.
#[derive(Debug, Clone)]
pub enum Subject {
    /// Server certificate for a coordinator, valid for these DNS names / IPs.
    Coordinator { name: String, hosts: Vec<String> },
    /// Client certificate with SAN `spiffe://ferry/agent/<name>` or `.../admin/<name>`.
    Client(Role),
}

/// Creates a self-signed CA.
pub fn create_ca(common_name: &str) -> anyhow::Result<PemPair> {
    let key = KeyPair::generate().context("generate CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = params.self_signed(&key).context("self-sign CA")?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a leaf certificate signed by `ca`.
pub fn issue(ca: &PemPair, subject: &Subject) -> anyhow::Result<PemPair> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).context("parse CA private key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).context("parse CA certificate")?;
    let key = KeyPair::generate().context("generate key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("parameters")?;
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    match subject {
        Subject::Coordinator { name, hosts } => {
            params
                .distinguished_name
                .push(DnType::CommonName, name.as_str());
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            for host in hosts {
                let san = match host.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        host.as_str()
                            .try_into()
                            .with_context(|| format!("DNS name {host:?}"))?,
                    ),
                };
                params.subject_alt_names.push(san);
            }
        }
        Subject::Client(role) => {
            params
                .distinguished_name
                .push(DnType::CommonName, role.name());
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.subject_alt_names.push(SanType::URI(
                role.uri().as_str().try_into().context("SAN URI")?,
            ));
        }
    }
    let cert = params
        .signed_by(&key, &issuer)
        .context("sign certificate")?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_client_certificate_carries_role_uri() {
        let ca = create_ca("test CA").unwrap();
        let agent = issue(&ca, &Subject::Client(Role::agent("a1", "dmz"))).unwrap();
        let der = rustls_pemfile::certs(&mut agent.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            ferry_proto::tls::roles_of_certificate(&der),
            vec![Role::agent("a1", "dmz")]
        );
    }
}
