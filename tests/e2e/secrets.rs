//! Secrets end to end: sealed credentials are bound to their server row (a row
//! changed with plain SQL gets no credential sent and says why; rows sealed the
//! old way are re-sealed at start), `--help` never echoes secret env values,
//! and a full run at `RUST_LOG=trace` logs no secret (at the time of writing
//! no dependency printed one: lapin's trace shows the AMQP user, never the
//! password; russh, h2, tonic, sqlx and the AWS SDK show none).

use std::path::Path;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use ferry_proto as proto;
use ferry_tests::{AgentOptions, AmqpQueue, Coordinator, S3Server, bin_path, eventually};
use ferry_tests::{random_hex, unique_exchange};

use crate::stack::{Stack, WAIT};

const MISMATCH: &str = "does not match its connection fields: was the row changed outside ferry?";

async fn poll_error(s: &mut Stack, id: i64) -> Option<String> {
    s.server(id)
        .await
        .health
        .map(|h| h.last_error)
        .filter(|e| !e.is_empty())
}

async fn sealed(s: &Stack, id: i64) -> (Vec<u8>, i16) {
    sqlx::query_as("SELECT secret_ciphertext, secret_format FROM servers WHERE id=$1")
        .bind(id)
        .fetch_one(s.db.pool())
        .await
        .unwrap()
}

/// Simulates an attacker with write access to the database: the server is
/// repointed to the attacker's sshd (hostname, port and host-key pin), and
/// another server gets a copy of the first one's sealed credential. No agent
/// is sent the credential, and both servers show why.
#[tokio::test]
async fn repointed_row_gets_no_credential_and_shows_why() {
    let mut s = Stack::new().await;
    let victim = s.add_server(s.server_req("victim")).await;
    s.add_watch(victim, "in", "*").await;
    let mut other_req = s.server_req("other");
    other_req.username = "somebody-else".into();
    let other = s.add_server(other_req).await;
    let _agent = s.agent("a1", "default").await;
    s.wait_polls(victim, 1).await;
    assert_eq!(poll_error(&mut s, victim).await, None);

    // The attacker's host: an sshd that would accept the real password.
    let attacker = ferry_tests::Sshd::start().await;
    sqlx::query(
        "UPDATE servers SET hostname='127.0.0.1', port=$2, host_key_fingerprint=$3, \
         updated_at=now() WHERE id=$1",
    )
    .bind(victim)
    .bind(i32::from(attacker.port()))
    .bind(attacker.host_key_fingerprint())
    .execute(s.db.pool())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE servers o SET secret_ciphertext = v.secret_ciphertext, updated_at = now() \
         FROM servers v WHERE o.id = $1 AND v.id = $2",
    )
    .bind(other)
    .bind(victim)
    .execute(s.db.pool())
    .await
    .unwrap();

    for (id, name) in [(victim, "victim"), (other, "other")] {
        let error = eventually(&format!("{name} shows its credential error"), WAIT, || {
            let mut s2 = s.admin.clone();
            async move {
                let h = s2
                    .get_server(proto::GetServerRequest {
                        id,
                        name: String::new(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .health?;
                h.last_error.contains(MISMATCH).then_some(h.last_error)
            }
        })
        .await;
        assert!(error.contains(&format!("server \"{name}\"")), "{error}");
    }
    // The error was recorded after the assignment was withdrawn, so a login
    // at the attacker's host would have happened by now.
    // (The harness's readiness probe connects once and closes before the SSH
    // handshake; a login attempt would log "Accepted" or "Failed".)
    let attacker_log = std::fs::read_to_string(attacker.log_path()).unwrap_or_default();
    assert!(
        !attacker_log.contains("Accepted") && !attacker_log.contains("Failed"),
        "an agent tried to log in at the repointed host:\n{attacker_log}"
    );
    assert!(
        std::fs::read_to_string(s.coord.log_path())
            .unwrap()
            .contains(MISMATCH),
        "the coordinator logs the error"
    );
    // Changing the server through ferry with a new credential repairs it.
    s.admin
        .update_server(proto::UpdateServerRequest {
            id: victim,
            hostname: Some("127.0.0.1".into()),
            port: Some(u32::from(s.sshd.port())),
            host_key_fingerprint: Some(s.sshd.host_key_fingerprint().into()),
            auth: Some(proto::update_server_request::Auth::Password(
                proto::Password {
                    password: s.sshd.password().into(),
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    eventually("the repaired server polls cleanly", WAIT, || {
        let mut admin = s.admin.clone();
        async move {
            let h = admin
                .get_server(proto::GetServerRequest {
                    id: victim,
                    name: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .health?;
            h.last_error.is_empty().then_some(())
        }
    })
    .await;
}

/// A server row as the code before migration 0005 wrote it (nonce ||
/// AES-GCM ciphertext, no associated data) is re-sealed bound to its row when
/// a coordinator starts, once, and keeps working.
#[tokio::test]
async fn legacy_sealed_row_is_resealed_at_start_and_keeps_working() {
    let mut s = Stack::new().await;
    let id = s.add_server(s.server_req("old")).await;
    let legacy = legacy_seal(
        s.pki.secret_key_file(),
        &format!(r#"{{"Password":"{}"}}"#, s.sshd.password()),
    );
    sqlx::query("UPDATE servers SET secret_ciphertext=$2, secret_format=1 WHERE id=$1")
        .bind(id)
        .bind(&legacy)
        .execute(s.db.pool())
        .await
        .unwrap();

    s.coord.restart().await;
    let (resealed, format) = sealed(&s, id).await;
    assert_eq!(format, 2, "re-sealed at start");
    assert_eq!(resealed[0], 2, "format byte of a bound credential");
    assert_ne!(resealed, legacy);
    // Idempotent: another coordinator starting changes nothing.
    let second = Coordinator::start(&s.db, &s.pki).await;
    assert_eq!(sealed(&s, id).await, (resealed, 2));
    drop(second);

    s.admin = s.coord.admin_client(&s.pki.admin("alice")).await.unwrap();
    s.add_watch(id, "in", "*").await;
    s.sshd.write_file("in/a.csv", b"a");
    let _agent = s.agent("a1", "default").await;
    s.wait_polls(id, 1).await;
    assert_eq!(poll_error(&mut s, id).await, None);
    eventually("the file is discovered", WAIT, || async {
        (s.file_count().await == 1).then_some(())
    })
    .await;
}

/// `nonce || ciphertext+tag` of `json` without associated data: the pre-0005 format.
fn legacy_seal(key_file: &Path, json: &str) -> Vec<u8> {
    let key = hex::decode(std::fs::read_to_string(key_file).unwrap().trim()).unwrap();
    let cipher = Aes256Gcm::new_from_slice(&key).unwrap();
    let nonce: [u8; 12] = rand::random();
    let mut out = nonce.to_vec();
    out.extend(
        cipher
            .encrypt(Nonce::from_slice(&nonce), json.as_bytes())
            .unwrap(),
    );
    out
}

/// `--help` shows which variables a flag reads, never their values when they
/// can hold a password.
#[tokio::test]
async fn help_never_prints_secret_env_values() {
    let db_password = format!("db-pw-{}", random_hex(6));
    let amqp_password = format!("amqp-pw-{}", random_hex(6));
    let env = [
        (
            "FERRY_DATABASE_URL",
            format!("postgres://ferry:{db_password}@db.example:5432/ferry"),
        ),
        (
            "FERRY_AMQP_URL",
            format!("amqp://ferry:{amqp_password}@mq.example:5672/%2f"),
        ),
    ];
    for args in [
        &["serve", "--help"][..],
        &["migrate", "--help"][..],
        &["help", "serve"][..],
    ] {
        let out = tokio::process::Command::new(bin_path("ferry-coordinator"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("FERRY_DATABASE_URL"), "{args:?}: {text}");
        for secret in [&db_password, &amqp_password] {
            assert!(
                !text.contains(secret.as_str()),
                "{args:?} prints {secret}:\n{text}"
            );
        }
    }
}

/// A RabbitMQ user of its own with a recognizable password, removed on drop.
struct AmqpUser {
    name: String,
    password: String,
}

impl AmqpUser {
    async fn create() -> AmqpUser {
        let user = AmqpUser {
            name: format!("ferry-t-{}", random_hex(4)),
            password: format!("amqp-pw-{}", random_hex(8)),
        };
        rabbitmqctl(&["add_user", &user.name, &user.password]).await;
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]).await;
        user
    }
}

impl Drop for AmqpUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run rabbitmqctl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Re-encrypts the sshd's passphrase-protected client key (same key, so it
/// stays authorized) under a recognizable passphrase; returns (pem, passphrase).
async fn key_with_passphrase(s: &Stack) -> (String, String) {
    let (pem, old) = s.sshd.client_key_encrypted();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, pem).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let passphrase = format!("pass-{}", random_hex(8));
    let out = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-p", "-P", old, "-N", &passphrase, "-f"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (std::fs::read_to_string(&path).unwrap(), passphrase)
}

/// Every file under `dir`, concatenated (logs of one process).
fn read_logs(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            out.push_str(&String::from_utf8_lossy(
                &std::fs::read(entry.path()).unwrap(),
            ));
        }
    }
    out
}

/// A full run with `RUST_LOG=trace` on coordinator and agent: a password
/// server and a key+passphrase server, files stored in S3 and announced. No
/// log of ferry holds an SFTP password, key body, passphrase, the database or
/// AMQP password, or the secret key.
#[tokio::test]
async fn trace_logs_carry_no_secret() {
    let s3 = S3Server::start().await;
    s3.create_bucket("ferry-secrets").await;
    let exchange = unique_exchange();
    let mut queue = AmqpQueue::declare(&exchange).await;
    let amqp = AmqpUser::create().await;
    let amqp_url = format!("amqp://{}:{}@127.0.0.1:5672/%2f", amqp.name, amqp.password);
    let db_password = format!("db-pw-{}", random_hex(8));
    // Postgres trusts loopback, so the password is accepted and never asked for:
    // it is there to be looked for in the logs.
    let db = ferry_tests::TestDb::create().await;
    let db_url = db.url().replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{db_password}@"),
        1,
    );
    assert_ne!(db_url, db.url(), "test database URL shape: {}", db.url());
    let pki = ferry_tests::TestPki::new();
    let coord = Coordinator::start_with_env(
        &db,
        &pki,
        &[
            ("FERRY_DATABASE_URL", db_url.as_str()),
            ("FERRY_AMQP_URL", amqp_url.as_str()),
            ("FERRY_AMQP_EXCHANGE", exchange.as_str()),
            ("RUST_LOG", "trace"),
        ],
    )
    .await;
    let sshd = ferry_tests::Sshd::start().await;
    let admin = coord.admin_client(&pki.admin("alice")).await.unwrap();
    let mut s = Stack {
        db,
        pki,
        coord,
        sshd,
        admin,
    };
    let (pem, passphrase) = key_with_passphrase(&s).await;

    let by_password = s.add_server(s.server_req("pw")).await;
    let mut key_req = s.server_req("key");
    key_req.auth = Some(proto::add_server_request::Auth::PrivateKey(
        proto::PrivateKey {
            pem: pem.clone(),
            passphrase: passphrase.clone(),
        },
    ));
    let by_key = s.add_server(key_req).await;
    for (id, rel) in [(by_password, "pw"), (by_key, "key")] {
        s.sshd.mkdir(rel);
        s.admin
            .add_watch(proto::AddWatchRequest {
                server_id: id,
                directory: s.sshd.remote_path(rel),
                poll_interval_secs: 1,
                bucket: "ferry-secrets".into(),
                key_template: "{server}/{dir}/{version}/{name}".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        s.sshd
            .write_file(&format!("{rel}/data.csv"), rel.as_bytes());
    }
    let mut env = s3.env();
    env.push(("RUST_LOG".into(), "trace".into()));
    let agent = s
        .agent_with(
            "a1",
            AgentOptions {
                capacity: 2,
                env,
                ..Default::default()
            },
        )
        .await;
    let mut announced = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while announced.len() < 2 && tokio::time::Instant::now() < deadline {
        if let Some(m) = queue.next_message(Duration::from_secs(1)).await {
            announced.push(m.json()["server"].as_str().unwrap_or_default().to_string());
        }
    }
    announced.sort();
    assert_eq!(announced, ["key", "pw"], "both files announced");
    assert_eq!(
        s3.list_keys("ferry-secrets").await.len(),
        2,
        "both files stored"
    );

    let secret_key = std::fs::read_to_string(s.pki.secret_key_file()).unwrap();
    let mut secrets: Vec<(&str, String)> = vec![
        ("SFTP password", s.sshd.password().to_string()),
        ("passphrase", passphrase.clone()),
        ("database password", db_password.clone()),
        ("AMQP password", amqp.password.clone()),
        ("secret key", secret_key.trim().to_string()),
        ("S3 secret access key", s3.secret_key().to_string()),
    ];
    // Every full base64 line of the private key's body.
    for line in pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 40)
    {
        secrets.push(("private key body", line.to_string()));
    }
    for (who, logs) in [
        ("coordinator", read_logs(s.coord.dir())),
        ("agent", read_logs(agent.dir())),
    ] {
        assert!(logs.contains("TRACE"), "{who} logs at trace level");
        for (what, secret) in &secrets {
            if let Some(at) = logs.find(secret.as_str()) {
                let line_start = logs[..at].rfind('\n').map_or(0, |i| i + 1);
                let line_end = logs[at..].find('\n').map_or(logs.len(), |i| at + i);
                panic!(
                    "the {who} log holds the {what}:\n{}",
                    &logs[line_start..line_end.min(line_start + 2000)]
                );
            }
        }
    }
}
