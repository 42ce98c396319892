//! AMQP over TLS: HAProxy terminates TLS (a server certificate of its own test
//! CA, client certificates required) in front of the shared RabbitMQ. Files
//! flow and are announced over `amqps://` with `FERRY_AMQP_CA` and a client
//! certificate; a broker whose CA is not the configured one is refused and the
//! relay says why (log, `ferry.v1.Relay` health); a CA file that cannot be
//! read stops the coordinator's start with an error naming the variable.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ferry_tests::{ChildGuard, TestDb, TestPki, bin_path, eventually, free_port};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::flow::{Flow, flow_with, sha256_hex};
use crate::stack::WAIT;

/// HAProxy on a free loopback port: TLS with `pki`'s server certificate
/// (SANs `localhost`, `127.0.0.1`), client certificates of `pki`'s CA
/// required, forwarding to RabbitMQ on 127.0.0.1:5672.
struct TlsFront {
    addr: SocketAddr,
    _haproxy: ChildGuard,
}

impl TlsFront {
    async fn start(pki: &TestPki) -> TlsFront {
        let server = pki.coordinator();
        let dir = pki.dir();
        let combined = dir.join("haproxy-server.pem");
        let mut pem = std::fs::read(&server.cert).unwrap();
        pem.extend(std::fs::read(&server.key).unwrap());
        std::fs::write(&combined, pem).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n    maxconn 256\n\
                 defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\
                 frontend amqps\n    bind {addr} ssl crt {crt} ca-file {ca} verify required\n    default_backend rabbitmq\n\
                 backend rabbitmq\n    server rabbit 127.0.0.1:5672\n",
                crt = combined.display(),
                ca = pki.ca().display(),
            ),
        )
        .unwrap();
        let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("haproxy is not installed (deploy/test-deps.sh installs it)");
        let child = tokio::process::Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn haproxy");
        let mut guard = ChildGuard::new(child, "haproxy");
        guard
            .wait_for_port(addr, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        TlsFront {
            addr,
            _haproxy: guard,
        }
    }

    fn url(&self) -> String {
        format!("amqps://guest:guest@{}/%2f", self.addr)
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A flow whose coordinator publishes over amqps:// through `front`,
/// trusting `ca`, with a client certificate of `client_pki`.
async fn flow_over_tls(front: &TlsFront, ca: &Path, client_pki: &TestPki) -> Flow {
    let client = client_pki.admin("ferry-relay");
    let url = front.url();
    let (ca, cert, key) = (path(ca), path(&client.cert), path(&client.key));
    flow_with(&[
        ("FERRY_AMQP_URL", url.as_str()),
        ("FERRY_AMQP_CA", ca.as_str()),
        ("FERRY_AMQP_CERT", cert.as_str()),
        ("FERRY_AMQP_KEY", key.as_str()),
    ])
    .await
}

#[tokio::test]
async fn files_flow_and_are_announced_over_amqps() {
    let broker_pki = TestPki::new();
    let front = TlsFront::start(&broker_pki).await;
    let mut f = flow_over_tls(&front, broker_pki.ca(), &broker_pki).await;
    let id = f.s.add_server(f.s.server_req("tls")).await;
    f.watch(id, "tls", "keep").await;
    let bytes = b"id,amount\n1,42\n".to_vec();
    f.s.sshd.write_file("tls/report.csv", &bytes);
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;

    f.wait_status(1, "processed", WAIT).await;
    let msgs = f.messages(1).await;
    assert_eq!(msgs.len(), 1, "one announcement over amqps: {msgs:?}");
    let m = &msgs[0];
    assert_eq!(m.routing_key, "ferry.tls");
    assert_eq!(m.delivery_mode, Some(2));
    let body = m.json();
    assert_eq!(body["server"], "tls");
    assert_eq!(body["sha256"], sha256_hex(&bytes));
    assert_eq!(f.stored("report.csv").await, bytes);
}

#[tokio::test]
async fn a_broker_of_another_ca_is_refused_and_reported() {
    let broker_pki = TestPki::new();
    let front = TlsFront::start(&broker_pki).await;
    // The coordinator trusts only a CA that did not sign the broker's certificate.
    let other = TestPki::new();
    let mut f = flow_over_tls(&front, other.ca(), &broker_pki).await;
    let id = f.s.add_server(f.s.server_req("untrusted")).await;
    f.watch(id, "untrusted", "keep").await;
    f.s.sshd.write_file("untrusted/report.csv", b"x\n");
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;

    // Stored, but never announced: it waits in the outbox.
    f.wait_status(1, "uploaded", WAIT).await;
    let log = eventually("the relay logs the refused certificate", WAIT, || async {
        let log = std::fs::read_to_string(f.s.coord.log_path()).unwrap_or_default();
        (log.contains("AMQP broker unreachable") && log.contains("invalid peer certificate"))
            .then_some(log)
    })
    .await;
    assert!(
        log.contains(&format!("amqps://guest@{}", front.addr)),
        "{log}"
    );
    assert!(!log.contains("guest:guest"), "the password is never logged");
    let health = HealthClient::new(f.s.coord.channel(&f.s.pki.admin("alice")).await.unwrap());
    let relay = health
        .clone()
        .check(HealthCheckRequest {
            service: "ferry.v1.Relay".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(relay, ServingStatus::NotServing as i32);
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(f.s.db.pool())
            .await
            .unwrap();
    assert_eq!(unpublished, 1);
    assert!(f.queue.drain_for(Duration::from_secs(1)).await.is_empty());
    assert_eq!(f.statuses().await.values().next().unwrap().1, "uploaded");
}

#[tokio::test]
async fn an_unreadable_ca_file_stops_the_start_naming_the_variable() {
    let db = TestDb::create().await;
    let pki = TestPki::new();
    let certs = pki.coordinator();
    let missing = pki.dir().join("no-such-ca.pem");
    let out = tokio::process::Command::new(bin_path("ferry-coordinator"))
        .arg("serve")
        .env("FERRY_DATABASE_URL", db.url())
        .env("FERRY_LISTEN", "127.0.0.1:0")
        .env("FERRY_TLS_CA", &certs.ca)
        .env("FERRY_TLS_CERT", &certs.cert)
        .env("FERRY_TLS_KEY", &certs.key)
        .env("FERRY_SECRET_KEY_FILE", pki.secret_key_file())
        .env("FERRY_AMQP_URL", "amqps://guest:guest@localhost:5671/%2f")
        .env("FERRY_AMQP_CA", &missing)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("the coordinator did not exit")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("FERRY_AMQP_CA: cannot read {}", missing.display())),
        "{stderr}"
    );
}
