//! Everything an agent sends is bounded before it costs anything (README
//! "Security"): texts it supplies are stored and logged cut to 4 KiB and
//! escaped, messages over a per-message cap are refused with a status naming
//! the field, and a poll report counts only from the server's poller. Each
//! test plays an agent holding a valid certificate
//! ([`ferry_tests::RogueAgent`]).

use std::net::SocketAddr;
use std::time::Duration;

use ferry_proto::{self as proto, agent_message::Body, task_result::Outcome};
use ferry_tests::{RogueAgent, eventually, free_port};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::metrics::{scrape, sum};
use crate::stack::WAIT;
use crate::trust::{
    discover, entry, leased_file, poller, result, trust_stack, trust_stack_with, without_ansi,
};

/// Most bytes of a stored agent text (the coordinator's `STORED_TEXT_MAX`),
/// plus what the coordinator adds to it (e.g. ` (attempt 1, retry in 10s)`).
const STORED_TEXT_MAX: usize = 4096 + 128;

#[tokio::test]
async fn a_huge_failure_message_is_stored_cut_and_logged_escaped() {
    let mut t = trust_stack().await;
    let db = t.s.db.pool().clone();
    let mut events =
        t.s.admin
            .watch_events(proto::WatchEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
    let (victim, task) = leased_file(&t, "victim").await;
    // 4,100,000 bytes that try to forge a log line of their own.
    let forged = "\n2026-01-01T00:00:00Z  INFO ferry_coordinator: forged line";
    let mut message = format!("disk on fire{forged}");
    message.push_str(&"x".repeat(4_100_000 - message.len()));
    victim
        .send(result(
            &task,
            task.fencing_token,
            Outcome::Failure(proto::TaskFailure {
                kind: proto::FailureKind::Transient as i32,
                message,
            }),
        ))
        .await;
    victim.barrier(&db, "victim").await;

    let (status, last_error): (String, String) =
        sqlx::query_as("SELECT status, last_error FROM files WHERE id = $1")
            .bind(task.file_id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(status, "error");
    assert!(
        last_error.len() <= STORED_TEXT_MAX && last_error.starts_with("disk on fire"),
        "last_error of {} bytes stored",
        last_error.len()
    );
    assert!(
        last_error.contains(" bytes cut]"),
        "no cut marker: {}",
        &last_error[last_error.len().saturating_sub(80)..]
    );
    let longest_reason: i32 =
        sqlx::query_scalar("SELECT max(length(reason)) FROM file_events WHERE file_id = $1")
            .bind(task.file_id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(
        longest_reason as usize <= STORED_TEXT_MAX,
        "history reason of {longest_reason} chars"
    );

    // The file reads back through the API and the CLI ...
    let ctl = t.s.coord.ctl(&t.s.pki.admin("alice"));
    let shown = ctl.run(&["files", "show", &task.file_id.to_string()]).await;
    assert!(shown.success(), "files show failed: {}", shown.stderr);
    assert!(shown.stdout.contains("disk on fire"), "{}", shown.stdout);
    // ... and a WatchEvents client gets past the event: a later event of the
    // same file arrives after it.
    sqlx::query(
        "INSERT INTO file_events (file_id, from_status, to_status, actor, reason) \
         VALUES ($1, 'error', 'error', 'test', 'after the huge one')",
    )
    .bind(task.file_id)
    .execute(&db)
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("no event after the huge one within a minute")
            .expect("the event stream ended")
            .unwrap_or_else(|s| panic!("the event stream failed: {s}"));
        if event.reason == "after the huge one" {
            break;
        }
    }
    // The log line of the failure carries the text escaped: no line of the
    // coordinator's log starts with the forged text.
    let log = without_ansi(&t.s.coord.log_tail(400));
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "an agent's text forged a log line:\n{}",
        &log[..log.len().min(4000)]
    );
}

#[tokio::test]
async fn messages_over_a_cap_are_refused_with_a_status_naming_the_field() {
    let t = trust_stack().await;
    let db = t.s.db.pool().clone();
    let endpoint = t.s.coord.endpoint();

    // A hello claiming 5,000 running transfers is refused before any of
    // them costs a statement.
    let hello = proto::Hello {
        version: "rogue".into(),
        site: String::new(),
        capacity: 4,
        running_tasks: (0..5_000)
            .map(|i| proto::RunningTask {
                file_id: i,
                fencing_token: 1,
            })
            .collect(),
    };
    let err = RogueAgent::connect_with_hello(&endpoint, &t.s.pki.agent("greedy"), hello)
        .await
        .err()
        .expect("a hello with 5,000 running tasks was accepted");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("Hello.running_tasks") && err.message().contains("at most 4096"),
        "{}",
        err.message()
    );

    // A discovery batch of 10,001 entries from the poller ends its stream
    // with a status naming the field, and records nothing.
    let mut rogue = poller(&t, "flooder", 0).await;
    let entries = (0..10_001)
        .map(|i| entry(&format!("{}/f{i}.csv", t.dir), 1, 1_700_000_000))
        .collect();
    discover(&t, &rogue, entries).await;
    let (_, end) = rogue.collect(WAIT).await;
    let end = end.expect("the stream stayed open after an oversized batch");
    assert_eq!(end.code(), Code::InvalidArgument, "{}", end.message());
    assert!(
        end.message().contains("DiscoveryBatch.entries"),
        "{}",
        end.message()
    );
    let files: i64 = sqlx::query_scalar("SELECT count(*) FROM files")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(files, 0);
}

#[tokio::test]
async fn a_poll_report_counts_only_from_the_servers_poller() {
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let t = trust_stack_with(&[("FERRY_HTTP_LISTEN", &http.to_string())]).await;
    let db = t.s.db.pool().clone();
    let holder = poller(&t, "holder", 0).await;
    // Another agent of the site, which polls nothing, reports the server's
    // poll as failed.
    let other =
        RogueAgent::connect_with_capacity(&t.s.coord.endpoint(), &t.s.pki.agent("other"), "", 0)
            .await
            .expect("the other agent connects");
    for _ in 0..3 {
        other
            .send(Body::PollReport(proto::PollReport {
                server_id: t.server_id,
                ok: false,
                error: "forged: authentication failed".into(),
                duration_ms: 10,
                ..Default::default()
            }))
            .await;
    }
    other.barrier(&db, "other").await;
    holder.barrier(&db, "holder").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics = scrape(http).await;
    assert_eq!(
        sum(&metrics, "ferry_poll_errors_total{server=\"acme\"}"),
        0.0,
        "a report of an agent that does not poll the server was counted"
    );
    let last_error: Option<String> =
        sqlx::query_scalar("SELECT last_poll_error FROM servers WHERE id = $1")
            .bind(t.server_id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(
        last_error.as_deref().is_none_or(|e| !e.contains("forged")),
        "the server's health shows another agent's report: {last_error:?}"
    );
    let log = without_ansi(&t.s.coord.log_tail(400));
    assert!(
        !log.lines()
            .any(|l| l.contains("poll failed") && l.contains("forged")),
        "a report of an agent that does not poll the server was logged as a failed poll"
    );

    // The poller's own report counts.
    holder
        .send(Body::PollReport(proto::PollReport {
            server_id: t.server_id,
            ok: false,
            error: "really failed".into(),
            duration_ms: 10,
            ..Default::default()
        }))
        .await;
    holder.barrier(&db, "holder").await;
    eventually("the poller's failed poll counted", WAIT, || async {
        let metrics = scrape(http).await;
        (sum(&metrics, "ferry_poll_errors_total{server=\"acme\"}") == 1.0).then_some(())
    })
    .await;
}
