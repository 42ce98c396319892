//! Checks that the harness's real components come up and behave: sshd serves
//! its generated host key and accepts the test logins, s3s-fs stores objects,
//! RabbitMQ routes to the per-test queue, and Postgres gives an empty database.

use std::process::Stdio;
use std::time::Duration;

use ferry_tests::*;
use sha2::{Digest, Sha256};
use tokio::process::Command;

#[tokio::test]
async fn sshd_serves_generated_host_keys() {
    let sshd = Sshd::start().await;
    for key in sshd.host_keys() {
        let kind = key.algorithm.trim_start_matches("ssh-");
        let out = Command::new("ssh-keyscan")
            .args([
                "-T",
                "5",
                "-t",
                kind,
                "-p",
                &sshd.port().to_string(),
                "127.0.0.1",
            ])
            .output()
            .await
            .expect("run ssh-keyscan");
        let scanned = String::from_utf8_lossy(&out.stdout);
        // "[127.0.0.1]:PORT ssh-ed25519 AAAA..."
        let offered = scanned
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let mut f = l.split_whitespace().skip(1);
                Some(format!("{} {}", f.next()?, f.next()?))
            })
            .unwrap_or_else(|| panic!("ssh-keyscan -t {kind} found no key: {scanned}"));
        assert_eq!(offered, key.public_key, "{} host key", key.algorithm);

        // ssh-keygen -lf - prints the fingerprint of the scanned key.
        let mut keygen = Command::new("ssh-keygen")
            .args(["-lf", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run ssh-keygen");
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = keygen.stdin.take().unwrap();
            stdin.write_all(scanned.as_bytes()).await.unwrap();
        }
        let listing = keygen.wait_with_output().await.unwrap();
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(
            listing.contains(&key.fingerprint),
            "fingerprint {} not in {listing}",
            key.fingerprint
        );
    }
    assert_eq!(
        sshd.host_key_fingerprint(),
        sshd.host_key("ssh-ed25519").fingerprint
    );
}

/// Key login with the system `sftp` client in batch mode, listing a file
/// written through the harness.
#[tokio::test]
async fn sshd_accepts_key_login_and_serves_sftp() {
    let sshd = Sshd::start().await;
    sshd.write_file("in/a.txt", b"hello");
    let key = sshd.dir().join("client_ed25519");
    let known_hosts = sshd.dir().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "[127.0.0.1]:{} {}\n",
            sshd.port(),
            sshd.host_key("ssh-ed25519").public_key
        ),
    )
    .unwrap();
    let mut sftp = Command::new("sftp")
        .arg("-b")
        .arg("-")
        .arg("-i")
        .arg(&key)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args(["-P", &sshd.port().to_string()])
        .arg(format!("{}@127.0.0.1", sshd.user()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sftp");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = sftp.stdin.take().unwrap();
        stdin
            .write_all(format!("ls -l {}\n", sshd.remote_path("in")).as_bytes())
            .await
            .unwrap();
    }
    let out = sftp.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("a.txt"),
        "sftp failed: {}\nstdout: {stdout}\nstderr: {}\nsshd log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        sshd.log_tail(30)
    );
    assert!(
        stdout.contains("ferrytest"),
        "file not owned by ferrytest: {stdout}"
    );
}

/// Password login with the system `ssh` client (the password comes from an
/// askpass script; no sshpass needed).
#[tokio::test]
async fn sshd_accepts_password_login() {
    use std::os::unix::fs::PermissionsExt;
    let sshd = Sshd::start().await;
    let askpass = sshd.dir().join("askpass.sh");
    std::fs::write(&askpass, format!("#!/bin/sh\necho '{}'\n", sshd.password())).unwrap();
    std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o755)).unwrap();
    let known_hosts = sshd.dir().join("known_hosts_pw");
    std::fs::write(
        &known_hosts,
        format!(
            "[127.0.0.1]:{} {}\n",
            sshd.port(),
            sshd.host_key("ssh-rsa").public_key
        ),
    )
    .unwrap();
    let out = Command::new("ssh")
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "HostKeyAlgorithms=rsa-sha2-512,rsa-sha2-256",
        ])
        .args([
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "PubkeyAuthentication=no",
        ])
        .args(["-o", "NumberOfPasswordPrompts=1", "-o", "ConnectTimeout=5"])
        .args(["-p", &sshd.port().to_string()])
        .arg(format!("{}@127.0.0.1", sshd.user()))
        .arg("id -un")
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run ssh");
    assert!(
        out.status.success(),
        "ssh password login failed: {}\nstderr: {}\nsshd log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        sshd.log_tail(30)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ferrytest");
}

#[tokio::test]
async fn s3_server_stores_and_returns_objects() {
    let s3 = S3Server::start().await;
    s3.create_bucket("smoke").await;
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    s3.put_object("smoke", "dir/object.bin", body.clone()).await;
    let back = s3.get_object("smoke", "dir/object.bin").await;
    assert_eq!(Sha256::digest(&back), Sha256::digest(&body));
    assert_eq!(
        s3.list_keys("smoke").await,
        vec!["dir/object.bin".to_string()]
    );
    assert!(
        s3.try_get_object("smoke", "missing")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn amqp_queue_receives_published_message() {
    let mut queue = AmqpQueue::declare(&unique_exchange()).await;
    assert!(
        queue
            .next_message(Duration::from_millis(200))
            .await
            .is_none()
    );
    queue
        .publish("files.ready", "file-42", br#"{"ok":true}"#)
        .await;
    let message = queue
        .next_message(Duration::from_secs(5))
        .await
        .expect("published message arrives");
    assert_eq!(message.message_id.as_deref(), Some("file-42"));
    assert_eq!(message.routing_key, "files.ready");
    assert_eq!(message.delivery_mode, Some(2));
    assert_eq!(message.json()["ok"], true);
    assert!(queue.drain_for(Duration::from_millis(200)).await.is_empty());
}

#[tokio::test]
async fn test_db_is_empty_and_queryable() {
    let db = TestDb::create().await;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(one, 1);
    let current: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(current, db.name());
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(tables, 0);
}

#[tokio::test]
async fn test_pki_issues_certificates_for_roles() {
    let pki = TestPki::new();
    let admin = pki.admin("alice");
    let agent = pki.agent("a1");
    let foreign = pki.foreign_admin("mallory");
    for files in [&pki.coordinator(), &admin, &agent, &foreign] {
        files.tls_paths().load().expect("PEM files load");
    }
    assert_eq!(foreign.ca, admin.ca);
    let key = std::fs::read_to_string(pki.secret_key_file()).unwrap();
    assert_eq!(key.trim().len(), 64);
    assert!(key.trim().chars().all(|c| c.is_ascii_hexdigit()));
}

#[tokio::test]
async fn sshd_session_count_follows_open_connections() {
    let sshd = Sshd::start().await;
    let wait_for = |n: usize| {
        let sshd = &sshd;
        async move {
            for _ in 0..100 {
                if sshd.session_count() == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("session_count stayed {} (wanted {n})", sshd.session_count());
        }
    };
    wait_for(0).await;
    let a = tokio::net::TcpStream::connect(sshd.addr()).await.unwrap();
    let b = tokio::net::TcpStream::connect(sshd.addr()).await.unwrap();
    wait_for(2).await;
    drop((a, b));
    wait_for(0).await;
}
