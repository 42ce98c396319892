//! Announcements the broker refuses: per-row retry state in Postgres, so
//! however many rows are unroutable, routable ones still go out; a row refused
//! too often is parked visibly until an admin retries the file. Files that end
//! `failed` are announced on their own routing key (unless turned off), and a
//! server name with dots stays one topic word.

use std::time::Duration;

use ferry_proto as proto;
use ferry_tests::{AgentOptions, AmqpQueue, S3Server, eventually, unique_exchange};
use serde_json::Value;

use crate::flow::{BUCKET, Flow, flow_with, post_action_of};
use crate::stack::{Stack, WAIT};

/// A watch of `server_id` on `rel` storing into `bucket`.
async fn watch_into(f: &mut Flow, server_id: i64, rel: &str, bucket: &str) -> i64 {
    f.s.sshd.mkdir(rel);
    f.s.admin
        .add_watch(proto::AddWatchRequest {
            server_id,
            directory: f.s.sshd.remote_path(rel),
            poll_interval_secs: 1,
            bucket: bucket.into(),
            key_template: "{server}/{dir}/{version}/{name}".into(),
            post_action: Some(post_action_of("keep")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

#[tokio::test]
async fn failed_files_are_announced_and_dotted_servers_stay_one_word() {
    let mut f = flow_with(&[
        ("FERRY_AMQP_ROUTING_KEY", "ferry.file.{server}"),
        ("FERRY_MAX_ATTEMPTS", "1"),
    ])
    .await;
    // Bound to one word after `ferry.file.`: stored files of any server only.
    let mut one_word = AmqpQueue::declare_bound(f.queue.exchange(), "ferry.file.*").await;
    let id = f.s.add_server(f.s.server_req("sftp.acme.com")).await;
    watch_into(&mut f, id, "ok", BUCKET).await;
    // No such bucket: a permanent failure, so the file ends `failed`.
    watch_into(&mut f, id, "bad", "no-such-bucket").await;
    f.s.sshd.write_file("ok/good.csv", b"1\n");
    f.s.sshd.write_file("bad/bad.csv", b"2\n");
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;

    f.wait_status(1, "processed", WAIT).await;
    f.wait_status(1, "failed", WAIT).await;
    let msgs = f.messages(2).await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let stored = msgs
        .iter()
        .find(|m| m.kind.as_deref() == Some("ferry.file.stored"));
    let stored = stored.expect("a stored announcement");
    assert_eq!(stored.routing_key, "ferry.file.sftp%2Eacme%2Ecom");
    assert_eq!(stored.json()["server"], "sftp.acme.com");

    let failed = msgs
        .iter()
        .find(|m| m.kind.as_deref() == Some("ferry.file.failed"));
    let failed = failed.expect("a failure announcement");
    assert_eq!(failed.routing_key, "ferry.file.failed.sftp%2Eacme%2Ecom");
    assert_eq!(failed.delivery_mode, Some(2));
    assert_eq!(failed.content_type.as_deref(), Some("application/json"));
    let body = failed.json();
    let (file_id, status) = f.statuses().await[&f.s.sshd.remote_path("bad/bad.csv")].clone();
    assert_eq!(
        status, "failed",
        "a failure announcement leaves the file failed"
    );
    assert_eq!(body["schema_version"], 1);
    assert_eq!(body["event"], "failed");
    assert_eq!(body["file_id"], file_id);
    assert_eq!(body["server"], "sftp.acme.com");
    assert_eq!(body["path"], f.s.sshd.remote_path("bad/bad.csv"));
    assert_eq!(body["size"], 2);
    assert_eq!(body["attempts"], 1);
    assert!(
        body["error"].as_str().unwrap().contains("NoSuchBucket"),
        "{body}"
    );
    let message_id = failed.message_id.clone().unwrap();
    let announcement_id: String =
        sqlx::query_scalar("SELECT announcement_id::text FROM files WHERE id = $1")
            .bind(file_id)
            .fetch_one(f.s.db.pool())
            .await
            .unwrap();
    assert!(
        message_id.starts_with(&format!("{announcement_id}-failed-")),
        "{message_id}"
    );
    // Its outbox row was written with the status change and is published.
    let (rows, published): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(published_at) FROM outbox WHERE file_id = $1")
            .bind(file_id)
            .fetch_one(f.s.db.pool())
            .await
            .unwrap();
    assert_eq!((rows, published), (1, 1));

    // `ferry.file.*` matched the stored file of the dotted server, and only it.
    let got = one_word.drain_for(Duration::from_secs(2)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].kind.as_deref(), Some("ferry.file.stored"));
}

#[tokio::test]
async fn failures_are_not_announced_when_turned_off() {
    let mut f = flow_with(&[
        ("FERRY_MAX_ATTEMPTS", "1"),
        ("FERRY_ANNOUNCE_FAILURES", "false"),
    ])
    .await;
    let id = f.s.add_server(f.s.server_req("quiet")).await;
    watch_into(&mut f, id, "bad", "no-such-bucket").await;
    f.s.sshd.write_file("bad/bad.csv", b"2\n");
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    f.wait_status(1, "failed", WAIT).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(f.s.db.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);
    assert!(f.queue.drain_for(Duration::from_secs(2)).await.is_empty());
}

#[tokio::test]
async fn unroutable_announcements_never_hold_back_routable_ones() {
    let s3 = S3Server::start().await;
    s3.create_bucket("ferry-test").await;
    let exchange = unique_exchange();
    // Only the server "good" has a queue: "ferry.bad" messages are unroutable.
    let mut queue = AmqpQueue::declare_bound(&exchange, "ferry.good").await;
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let mut s = Stack::with_coordinator_env(&[
        ("FERRY_AMQP_URL", url),
        ("FERRY_AMQP_EXCHANGE", exchange.as_str()),
        ("FERRY_AMQP_ROUTING_KEY", "ferry.{server}"),
        ("FERRY_AMQP_MAX_ATTEMPTS", "3"),
    ])
    .await;
    let bad = s.add_server(s.server_req("bad")).await;
    let bad_watch = s.add_watch(bad, "bad", "*").await;
    let good = s.add_server(s.server_req("good")).await;
    s.add_watch(good, "good", "*").await;

    // 1,500 stored files of "bad" waiting for their (unroutable) announcement,
    // all older than anything "good" will produce.
    sqlx::query(
        "WITH f AS ( \
            INSERT INTO files (server_id, watch_id, path, size, mtime_unix, status, bucket, \
                               object_key, etag, sha256, uploaded_at) \
            SELECT $1, $2, '/bad/f' || n, n, 1700000000, 'uploaded', 'ferry-test', 'bad/f' || n, \
                   'etag', repeat('0', 64), now() FROM generate_series(1, 1500) AS n \
            RETURNING id) \
         INSERT INTO outbox (file_id, payload) SELECT id, '{}'::jsonb FROM f",
    )
    .bind(bad)
    .bind(bad_watch)
    .execute(s.db.pool())
    .await
    .unwrap();

    let _agent = s
        .agent_with(
            "a1",
            AgentOptions {
                env: s3.env(),
                ..Default::default()
            },
        )
        .await;
    s.sshd.write_file("good/report.csv", b"id,amount\n1,2\n");
    let message = queue
        .next_message(WAIT)
        .await
        .expect("the routable announcement was never published");
    let body: Value = serde_json::from_slice(&message.body).unwrap();
    assert_eq!(body["server"], "good");
    eventually("the good file processed", WAIT, || async {
        let st: String = sqlx::query_scalar("SELECT status FROM files WHERE server_id = $1")
            .bind(good)
            .fetch_one(s.db.pool())
            .await
            .unwrap();
        (st == "processed").then_some(())
    })
    .await;

    // Refused rows carry their retry state; after 3 refusals they are parked.
    let refused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE attempts > 0 AND last_error IS NOT NULL",
    )
    .fetch_one(s.db.pool())
    .await
    .unwrap();
    assert!(refused > 0, "no refused row recorded its retry state");
    let parked: i64 = eventually("a refused announcement parked", WAIT, || async {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT file_id FROM outbox WHERE parked_at IS NOT NULL ORDER BY id LIMIT 1",
        )
        .fetch_optional(s.db.pool())
        .await
        .unwrap();
        id
    })
    .await;
    let ctl = s.coord.ctl(&s.pki.admin("alice"));
    let shown = ctl
        .json(&["--json", "files", "show", &parked.to_string()])
        .await;
    assert_eq!(shown["file"]["announcement"], "parked", "{shown}");
    assert_eq!(shown["file"]["announcement_attempts"], 3, "{shown}");
    assert!(
        shown["file"]["announcement_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{shown}"
    );
    // An admin retry offers it to the broker again.
    ctl.run(&["files", "retry", &parked.to_string()]).await;
    let (attempts, parked_at): (i32, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT attempts, parked_at FROM outbox WHERE file_id = $1")
            .bind(parked)
            .fetch_one(s.db.pool())
            .await
            .unwrap();
    assert!(
        parked_at.is_none() && attempts < 3,
        "retry left the announcement parked: attempts {attempts}"
    );
}
