//! A Postgres outage longer than the task lease, mid-transfer: no file lost,
//! no attempt consumed by the outage, the result sent during it delivered
//! afterwards, one announcement.

use std::time::Duration;

use ferry_tests::{AgentOptions, AmqpQueue, S3Server, TcpProxy, eventually, unique_exchange};
use sha2::{Digest, Sha256};

use crate::stack::{Stack, WAIT};

/// A stack whose coordinator reaches Postgres through a proxy the test can
/// cut (the test itself reads the database directly).
async fn stack_with_cuttable_database(env: &[(&str, &str)]) -> (Stack, TcpProxy) {
    let pg_proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut s = Stack::new().await;
    let url =
        s.db.url()
            .replacen("127.0.0.1:5432", &pg_proxy.addr().to_string(), 1);
    let mut all = vec![("FERRY_DATABASE_URL", url.as_str())];
    all.extend_from_slice(env);
    s.coord = ferry_tests::Coordinator::start_with_env(&s.db, &s.pki, &all).await;
    s.admin = s.coord.admin_client(&s.pki.admin("alice")).await.unwrap();
    (s, pg_proxy)
}

#[tokio::test]
async fn a_discovery_batch_that_hit_a_database_outage_is_sent_again() {
    let (mut s, pg_proxy) = stack_with_cuttable_database(&[]).await;
    let id = s.add_server(s.server_req("disc")).await;
    s.add_watch(id, "disc", "*").await;
    let _agent = s.agent("poller", "default").await;
    s.wait_polls(id, 1).await;

    // The files become stable and are reported while the coordinator cannot
    // write them down.
    pg_proxy.cut();
    for n in 0..3 {
        s.sshd.write_file(&format!("disc/f{n}.csv"), b"x\n");
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    pg_proxy.heal();

    eventually("all three files recorded", WAIT, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM files WHERE server_id = $1")
            .bind(id)
            .fetch_one(s.db.pool())
            .await
            .unwrap();
        (n == 3).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_database_outage_longer_than_the_lease_costs_no_attempt_and_loses_no_result() {
    let s3 = S3Server::start().await;
    s3.create_bucket("ferry-test").await;
    let exchange = unique_exchange();
    let mut queue = AmqpQueue::declare(&exchange).await;
    let (mut s, pg_proxy) = stack_with_cuttable_database(&[
        ("FERRY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ("FERRY_AMQP_EXCHANGE", exchange.as_str()),
        ("FERRY_TASK_LEASE_SECS", "10"),
    ])
    .await;
    let id = s.add_server(s.server_req("pg")).await;
    s.add_watch(id, "pg", "*").await;
    let _agent = s
        .agent_with(
            "a1",
            AgentOptions {
                env: s3.env(),
                ..Default::default()
            },
        )
        .await;
    let bytes: Vec<u8> = (0..(200u32 << 20)).map(|i| (i % 253) as u8).collect();
    s.sshd.write_file("pg/big.bin", &bytes);
    eventually("the transfer running", WAIT, || async {
        let st: Option<String> = sqlx::query_scalar("SELECT status FROM files")
            .fetch_optional(s.db.pool())
            .await
            .unwrap();
        (st.as_deref() == Some("in_progress")).then_some(())
    })
    .await;

    // Postgres is gone for two leases: progress cannot be recorded, the
    // transfer finishes meanwhile and its result cannot be applied.
    pg_proxy.cut();
    tokio::time::sleep(Duration::from_secs(22)).await;
    pg_proxy.heal();

    eventually("the file processed", WAIT * 2, || async {
        let st: String = sqlx::query_scalar("SELECT status FROM files")
            .fetch_one(s.db.pool())
            .await
            .unwrap();
        (st == "processed").then_some(())
    })
    .await;
    let (attempts, key): (i32, String) = sqlx::query_as("SELECT attempts, object_key FROM files")
        .fetch_one(s.db.pool())
        .await
        .unwrap();
    let history: Vec<(String, String)> =
        sqlx::query_as("SELECT to_status, reason FROM file_events ORDER BY id")
            .fetch_all(s.db.pool())
            .await
            .unwrap();
    assert_eq!(attempts, 1, "the outage consumed an attempt: {history:?}");
    assert!(
        !history
            .iter()
            .any(|(st, _)| st == "error" || st == "failed"),
        "{history:?}"
    );
    let stored = s3.get_object("ferry-test", &key).await;
    assert_eq!(
        hex::encode(Sha256::digest(&stored)),
        hex::encode(Sha256::digest(&bytes))
    );
    let first = queue.next_message(WAIT).await.expect("one announcement");
    let body: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(body["key"], key.as_str());
    let more = queue.drain_for(Duration::from_secs(3)).await;
    assert!(more.is_empty(), "announced more than once: {}", more.len());
}
