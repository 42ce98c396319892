//! `WatchEvents` delivers every status change exactly once, even when event
//! ids commit out of order (a transaction that took id N commits after the
//! one that took N+1).

use std::collections::HashSet;
use std::time::Duration;

use ferry_proto as proto;

use crate::stack::{Stack, WAIT};

#[tokio::test]
async fn watch_events_misses_no_event_whose_id_commits_late() {
    let mut s = Stack::new().await;
    let server = s.add_server(s.server_req("ev")).await;
    let watch = s.add_watch(server, "ev", "*").await;
    let file: i64 = sqlx::query_scalar(
        "INSERT INTO files (server_id, watch_id, path, size, mtime_unix) \
         VALUES ($1, $2, '/ev/a.csv', 1, 1700000000) RETURNING id",
    )
    .bind(server)
    .bind(watch)
    .fetch_one(s.db.pool())
    .await
    .unwrap();
    let mut stream = s
        .admin
        .watch_events(proto::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Give the subscription its starting point before the events are written.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let insert = "INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
                  VALUES ($1, 'new', 'new', 'test', $2) RETURNING id";
    let mut slow = s.db.pool().begin().await.unwrap();
    let early_id: i64 = sqlx::query_scalar(insert)
        .bind(file)
        .bind("takes its id first, commits last")
        .fetch_one(&mut *slow)
        .await
        .unwrap();
    let late_id: i64 = sqlx::query_scalar(insert)
        .bind(file)
        .bind("takes its id second, commits first")
        .fetch_one(s.db.pool())
        .await
        .unwrap();
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
