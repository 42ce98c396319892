//! `WatchEvents` delivers every status change exactly once, even when event
//! ids commit out of order (a transaction that took id N commits after the
//! one that took N+1), and a stream resumed with an event's token continues
//! right after it; a write transaction left open in another database on
//! the same Postgres does not hold the stream back; `ferryctl files watch`
//! reconnects that way and shows the byte progress of running transfers.

use std::collections::HashSet;
use std::time::Duration;

use ferry_proto as proto;
use ferry_tests::{TestDb, signal};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

use crate::flow::{flow, sha256_hex};
use crate::stack::{Stack, WAIT};

#[tokio::test]
async fn watch_events_misses_no_event_whose_id_commits_late() {
    let (s, file, mut stream) = watching_all("ev").await;

    let mut slow = s.db.pool().begin().await.unwrap();
    let early_id = insert_event(&mut *slow, file, "takes its id first, commits last").await;
    let late_id = insert_event(s.db.pool(), file, "takes its id second, commits first").await;
    assert!(early_id < late_id);
    // The watcher sees the higher id first; then the lower one commits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    slow.commit().await.unwrap();

    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(seen.contains(&early_id) && seen.contains(&late_id)) {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        match next {
            Ok(Ok(Some(event))) => {
                assert!(seen.insert(event.id), "event {} delivered twice", event.id);
            }
            other => panic!(
                "WatchEvents stopped before delivering both events (seen {seen:?}, \
                 want {early_id} and {late_id}): {other:?}"
            ),
        }
    }
}

#[tokio::test]
async fn a_transaction_open_in_another_database_does_not_hold_events_back() {
    let (s, file, mut stream) = watching_all("other").await;

    // Another application on the same Postgres keeps a write transaction
    // open (it has a transaction id) for as long as this test runs.
    let other = TestDb::create().await;
    let mut elsewhere = other.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *elsewhere)
        .await
        .unwrap();
    let id = insert_event(s.db.pool(), file, "committed beside a foreign transaction").await;
    let got = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("the event delivered while the other database's transaction is open")
        .unwrap()
        .expect("an open stream");
    assert_eq!(got.id, id);
    elsewhere.rollback().await.unwrap();
}

/// A stack with a server and watch named `name`, one file row of it, and a
/// `WatchEvents` stream of all events that has taken its starting point.
async fn watching_all(name: &str) -> (Stack, i64, tonic::Streaming<proto::FileEvent>) {
    let mut s = Stack::new().await;
    let server = s.add_server(s.server_req(name)).await;
    let watch = s.add_watch(server, name, "*").await;
    let file = insert_file(&s, server, watch, &format!("/{name}/a.csv")).await;
    let stream = s
        .admin
        .watch_events(proto::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Give the subscription its starting point before the events are written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    (s, file, stream)
}

/// Inserts a `new` file row of `watch` at `path`; its id.
async fn insert_file(s: &Stack, server: i64, watch: i64, path: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO files (server_id, watch_id, path, size, mtime_unix) \
         VALUES ($1, $2, $3, 1, 1700000000) RETURNING id",
    )
    .bind(server)
    .bind(watch)
    .bind(path)
    .fetch_one(s.db.pool())
    .await
    .unwrap()
}

/// Inserts a history event of `file`; its id.
async fn insert_event<'c, E>(db: E, file: i64, reason: &str) -> i64
where
    E: sqlx::PgExecutor<'c>,
{
    sqlx::query_scalar(
        "INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
         VALUES ($1, 'new', 'new', 'test', $2) RETURNING id",
    )
    .bind(file)
    .bind(reason)
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_resumed_stream_continues_after_its_last_event_without_gap_or_repeat() {
    let mut s = Stack::new().await;
    let server = s.add_server(s.server_req("rs")).await;
    let watch = s.add_watch(server, "rs", "*").await;
    let file = insert_file(&s, server, watch, "/rs/a.csv").await;
    let filter = proto::WatchEventsRequest {
        server_id: server,
        ..Default::default()
    };
    let mut stream = s
        .admin
        .watch_events(filter.clone())
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let first = insert_event(s.db.pool(), file, "first").await;
    // A transaction that takes its id now and commits only after the
    // watcher has gone: the resumed stream must still deliver it.
    let mut slow = s.db.pool().begin().await.unwrap();
    let late = insert_event(&mut *slow, file, "commits while nobody watches").await;
    let second = insert_event(s.db.pool(), file, "second").await;
    let got = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the first event within the wait")
        .unwrap()
        .expect("an open stream");
    assert_eq!(got.id, first, "the one event below the open transaction");
    assert!(
        !got.resume_token.is_empty(),
        "live events carry a resume token"
    );
    drop(stream);

    slow.commit().await.unwrap();
    let third = insert_event(s.db.pool(), file, "third, while nobody watches").await;
    let mut resumed = s
        .admin
        .watch_events(proto::WatchEventsRequest {
            resume_token: got.resume_token.clone(),
            ..filter.clone()
        })
        .await
        .unwrap()
        .into_inner();
    let want: HashSet<i64> = [late, second, third].into();
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen != want {
        match tokio::time::timeout_at(deadline, resumed.message()).await {
            Ok(Ok(Some(event))) => {
                assert_ne!(event.id, first, "the event the token stands for came again");
                assert!(seen.insert(event.id), "event {} delivered twice", event.id);
                assert!(want.contains(&event.id), "unexpected event {event:?}");
            }
            other => panic!("resumed stream stopped with {seen:?} of {want:?}: {other:?}"),
        }
    }

    // A token is bound to its filter, and garbage is not a token.
    for (server_id, token) in [(0, got.resume_token.as_str()), (server, "garbage")] {
        let err = s
            .admin
            .watch_events(proto::WatchEventsRequest {
                server_id,
                resume_token: token.into(),
                ..Default::default()
            })
            .await
            .expect_err("a foreign or broken token is refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("resume_token"), "{err:?}");
    }
}

/// Deterministic bytes that do not compress to nothing.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
}

/// The next JSON line of `ferryctl files watch --json` that `want` accepts.
async fn next_json(
    lines: &mut Lines<BufReader<ChildStdout>>,
    what: &str,
    seen: &mut Vec<Value>,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => panic!("ferryctl printed no {what} (got {seen:#?}): {other:?}"),
        };
        let value: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ferryctl printed a line that is not JSON ({e}): {line}"));
        seen.push(value.clone());
        if want(&value) {
            return value;
        }
    }
}

#[tokio::test]
async fn files_watch_shows_transfer_progress_and_reconnects_without_losing_events() {
    let mut f = flow().await;
    let server = f.s.add_server(f.s.server_req("prog")).await;
    f.watch(server, "in", "keep").await;
    // A first file makes the agent check the bucket, so the big one's first
    // request to the store is its upload.
    f.s.sshd.write_file("in/warm.csv", b"warm");
    let _agent = f.s.agent_with("a1", f.agent_opts(1)).await;
    f.wait_status(1, "processed", WAIT).await;

    let ctl = f.s.coord.ctl(&f.s.pki.admin("alice"));
    let mut watch = ctl.spawn(&["--json", "files", "watch", "--server", "prog"]);
    let mut lines = BufReader::new(watch.stdout.take().expect("piped stdout")).lines();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The store stops answering: the transfer reads its first parts and waits.
    let s3 = f.s3.pid().expect("s3s-fs runs");
    signal(s3, "STOP");
    let bytes = pattern(40 << 20);
    f.s.sshd.write_file("in/big.bin", &bytes);
    let mut printed = Vec::new();
    let progress = next_json(&mut lines, "progress line for big.bin", &mut printed, |v| {
        v["type"] == "progress" && v["path"].as_str().is_some_and(|p| p.ends_with("/big.bin"))
    })
    .await;
    let done = progress["bytes_done"].as_u64().unwrap();
    assert!(done > 0 && done <= bytes.len() as u64, "{progress}");
    assert_eq!(
        progress["size"].as_u64(),
        Some(bytes.len() as u64),
        "{progress}"
    );
    assert_eq!(progress["agent"], "default/a1", "{progress}");
    let big = progress["file_id"].as_i64().unwrap();

    // The coordinator goes away under the stream and comes back.
    f.s.coord.restart().await;
    signal(s3, "CONT");
    next_json(
        &mut lines,
        "processed event for big.bin",
        &mut printed,
        |v| v["file_id"] == big && v["to_status"] == "processed",
    )
    .await;

    let shown: Vec<i64> = printed
        .iter()
        .filter(|v| v["file_id"] == big && v.get("type").is_none())
        .map(|v| v["id"].as_i64().unwrap())
        .collect();
    let history: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM file_events WHERE file_id = $1 ORDER BY id")
            .bind(big)
            .fetch_all(f.s.db.pool())
            .await
            .unwrap();
    assert_eq!(
        shown, history,
        "every event of big.bin shown once, in order"
    );
    assert_eq!(sha256_hex(&f.stored("big.bin").await), sha256_hex(&bytes));

    watch.kill().await.unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(
        watch.stderr.as_mut().expect("piped stderr"),
        &mut stderr,
    )
    .await
    .unwrap();
    assert!(stderr.contains("reconnecting"), "{stderr}");
    assert!(stderr.contains("reopened"), "{stderr}");
}
