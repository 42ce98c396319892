//! A site the coordinator cannot reach: sshd and the site's agent run in a
//! network namespace of their own ([`ferry_tests::Site`]); the coordinator,
//! S3 and RabbitMQ stay in the test's namespace. The host key is probed and a
//! file transferred although the coordinator has no route to the SFTP server:
//! everything that touches it goes through the agent.

use std::time::Duration;

use ferry_tests::{
    AgentOptions, AmqpQueue, Coordinator, S3Server, Site, Sshd, TcpProxy, TestDb, TestPki,
    eventually, unique_exchange,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::stack::WAIT;

const BUCKET: &str = "remote-site";

#[tokio::test]
async fn probe_and_transfer_through_an_agent_on_a_site_the_coordinator_cannot_reach() {
    let site = Site::create();
    let sshd = Sshd::start_in(&site).await;
    // The SFTP server listens on the site's loopback: from the coordinator's
    // namespace that address leads nowhere.
    let from_here = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(sshd.addr()),
    )
    .await;
    assert!(
        !matches!(from_here, Ok(Ok(_))),
        "the test namespace reached the site's sshd at {}",
        sshd.addr()
    );

    let db = TestDb::create().await;
    let pki = TestPki::new();
    let host_ip = site.host_ip().to_string();
    let certs = pki.coordinator_for(&[&host_ip]);
    let exchange = unique_exchange();
    let mut queue = AmqpQueue::declare(&exchange).await;
    let coord = Coordinator::start_with_env(
        &db,
        &pki,
        &[
            ("FERRY_TLS_CERT", certs.cert.to_str().unwrap()),
            ("FERRY_TLS_KEY", certs.key.to_str().unwrap()),
            ("FERRY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            ("FERRY_AMQP_EXCHANGE", exchange.as_str()),
            ("FERRY_AMQP_ROUTING_KEY", "ferry.{server}"),
        ],
    )
    .await;
    let s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    // What the site may reach of the test namespace: the coordinator and S3.
    let coord_door: TcpProxy = site.expose(coord.addr()).await;
    let s3_door: TcpProxy = site.expose(s3.addr()).await;

    let ctl = coord
        .ctl(&pki.admin("alice"))
        .env("SFTP_PASSWORD", sshd.password());
    let port = sshd.port().to_string();
    let probe_args = [
        "--json",
        "servers",
        "probe",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--site",
        "remote",
    ];
    let refused = ctl.run(&probe_args).await;
    assert!(
        !refused.success() && refused.stderr.contains("no agent of site \"remote\""),
        "probe without an agent of the site: {}",
        refused.stderr
    );

    let mut env = s3.env();
    for (k, v) in &mut env {
        if k == "AWS_ENDPOINT_URL" {
            *v = format!("http://{}", s3_door.addr());
        }
    }
    let agent = ferry_tests::Agent::start(
        "site-agent",
        &pki.agent_of("site-agent", "remote"),
        &[format!("https://{}", coord_door.addr())],
        AgentOptions {
            site: "remote".into(),
            check_site: true,
            capacity: 2,
            env,
            netns: Some(site.name().to_string()),
        },
    )
    .await;

    let probe: Value = eventually("a host-key probe through the site's agent", WAIT, || {
        let ctl = &ctl;
        let probe_args = &probe_args;
        async move {
            let out = ctl.run(probe_args).await;
            out.success()
                .then(|| serde_json::from_str(&out.stdout).unwrap())
        }
    })
    .await;
    assert_eq!(
        probe["fingerprint"],
        sshd.host_key_fingerprint(),
        "agent log:\n{}",
        agent.log_tail(30)
    );

    let added = ctl
        .json(&[
            "--json",
            "servers",
            "add",
            "far",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--user",
            sshd.user(),
            "--password-env",
            "SFTP_PASSWORD",
            "--trust-host-key",
            "--site",
            "remote",
        ])
        .await;
    assert_eq!(added["host_key_fingerprint"], sshd.host_key_fingerprint());
    sshd.mkdir("in");
    ctl.json(&[
        "--json",
        "watches",
        "add",
        "--server",
        "far",
        "--dir",
        &sshd.remote_path("in"),
        "--interval",
        "1",
        "--bucket",
        BUCKET,
    ])
    .await;

    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    sshd.write_file("in/report.csv", &bytes);
    eventually("the file processed", WAIT, || async {
        let st: Option<String> = sqlx::query_scalar("SELECT status FROM files")
            .fetch_optional(db.pool())
            .await
            .unwrap();
        (st.as_deref() == Some("processed")).then_some(())
    })
    .await;
    let key: String = sqlx::query_scalar("SELECT object_key FROM files")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let stored = s3.get_object(BUCKET, &key).await;
    assert_eq!(
        hex::encode(Sha256::digest(&stored)),
        hex::encode(Sha256::digest(&bytes)),
        "object s3://{BUCKET}/{key} differs from the source"
    );
    let message = queue
        .next_message(WAIT)
        .await
        .expect("an announcement of the stored file");
    let body: Value = serde_json::from_slice(&message.body).unwrap();
    assert_eq!(body["server"], "far");
    assert_eq!(body["key"], key.as_str());
    assert_eq!(body["sha256"], hex::encode(Sha256::digest(&bytes)));
    assert_eq!(message.routing_key, "ferry.far");
}
