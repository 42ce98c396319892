//! Announcements the broker refuses: per-row retry state in Postgres, so
//! however many rows are unroutable, routable ones still go out; a row refused
//! too often is parked visibly until an admin retries the file.

use ferry_tests::{AgentOptions, AmqpQueue, S3Server, eventually, unique_exchange};
use serde_json::Value;

use crate::stack::{Stack, WAIT};

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
