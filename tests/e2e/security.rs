//! mTLS and roles: who may call what, and certificates from an operator's own PKI.

use std::process::Command;

use ferry_proto::tls::TlsPaths;
use ferry_proto::{
    self as proto, admin_service_client::AdminServiceClient,
    agent_service_client::AgentServiceClient,
};
use ferry_tests::{CertFiles, Coordinator, TestDb, TestPki};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

async fn channel(
    coord: &Coordinator,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(coord.endpoint())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

fn client_tls(files: &CertFiles) -> ClientTlsConfig {
    TlsPaths {
        ca: files.ca.clone(),
        cert: files.cert.clone(),
        key: files.key.clone(),
    }
    .load()
    .unwrap()
    .client_config("127.0.0.1")
}

#[tokio::test]
async fn roles_are_enforced_and_strangers_refused() {
    let db = TestDb::create().await;
    let pki = TestPki::new();
    let coord = Coordinator::start(&db, &pki).await;

    // Agent certificate on the admin API.
    let mut as_agent =
        AdminServiceClient::new(channel(&coord, client_tls(&pki.agent("a1"))).await.unwrap());
    let err = as_agent
        .list_servers(proto::ListServersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());

    // Admin certificate on the agent stream.
    let mut as_admin = AgentServiceClient::new(
        channel(&coord, client_tls(&pki.admin("root")))
            .await
            .unwrap(),
    );
    let hello = proto::AgentMessage {
        body: Some(proto::agent_message::Body::Hello(proto::Hello {
            site: "default".into(),
            capacity: 1,
            ..Default::default()
        })),
    };
    let err = as_admin
        .connect(tokio_stream::iter(vec![hello]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());

    // No client certificate: the handshake or the first call fails.
    let ca_only = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca()).unwrap()))
        .domain_name("127.0.0.1");
    let outcome = match channel(&coord, ca_only).await {
        Ok(ch) => AdminServiceClient::new(ch)
            .list_servers(proto::ListServersRequest::default())
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(
        outcome.is_err(),
        "a caller without a client certificate was served"
    );

    // A certificate from another CA.
    let foreign = pki.foreign_admin("mallory");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca()).unwrap()))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(&foreign.cert).unwrap(),
            std::fs::read(&foreign.key).unwrap(),
        ))
        .domain_name("127.0.0.1");
    let outcome = match channel(&coord, tls).await {
        Ok(ch) => AdminServiceClient::new(ch)
            .list_servers(proto::ListServersRequest::default())
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(
        outcome.is_err(),
        "a certificate from a foreign CA was served"
    );

    // The legitimate admin still works.
    let mut admin = coord.admin_client(&pki.admin("alice")).await.unwrap();
    admin
        .list_servers(proto::ListServersRequest::default())
        .await
        .unwrap();
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Certificates made with plain `openssl` (an operator's own PKI) work for the
/// coordinator and for admins.
#[tokio::test]
async fn operator_made_openssl_certificates_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=ops-ca",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(d, &ca);
    for (name, ext) in [
        (
            "coord",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        ),
        (
            "ops",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://ferry/admin/ops\n",
        ),
    ] {
        std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
        let mut req = vec!["req"];
        req.extend(ec);
        let (key, csr) = (format!("{name}.key"), format!("{name}.csr"));
        req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=x"]);
        openssl(d, &req);
        let (pem, extfile) = (format!("{name}.pem"), format!("{name}.ext"));
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "30",
                "-extfile",
                &extfile,
            ],
        );
    }
    let files = |n: &str| CertFiles {
        ca: d.join("ca.pem"),
        cert: d.join(format!("{n}.pem")),
        key: d.join(format!("{n}.key")),
    };
    let db = TestDb::create().await;
    let pki = TestPki::new();
    let coord_files = files("coord");
    let coord = Coordinator::start_with_certs(&db, &pki, &coord_files).await;
    let mut admin = coord.admin_client(&files("ops")).await.unwrap();
    let servers = admin
        .list_servers(proto::ListServersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(servers.servers.is_empty());
}

/// grpcurl (no .proto files) lists the services through reflection over mTLS.
#[tokio::test]
async fn grpcurl_lists_services_via_reflection() {
    let db = TestDb::create().await;
    let pki = TestPki::new();
    let coord = Coordinator::start(&db, &pki).await;
    let admin = pki.admin("alice");
    let out = Command::new("grpcurl")
        .args([
            "-cacert",
            admin.ca.to_str().unwrap(),
            "-cert",
            admin.cert.to_str().unwrap(),
            "-key",
            admin.key.to_str().unwrap(),
            &coord.addr().to_string(),
            "list",
        ])
        .output()
        .expect("grpcurl on PATH (deploy/test-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcurl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for svc in [
        "ferry.v1.AdminService",
        "ferry.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            stdout.lines().any(|l| l.trim() == svc),
            "{svc} missing from:\n{stdout}"
        );
    }
    let out = Command::new("grpcurl")
        .args([
            "-cacert",
            admin.ca.to_str().unwrap(),
            "-cert",
            admin.cert.to_str().unwrap(),
            "-key",
            admin.key.to_str().unwrap(),
            "-d",
            "{}",
            &coord.addr().to_string(),
            "ferry.v1.AdminService/ListServers",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grpcurl call: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
