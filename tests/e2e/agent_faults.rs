//! A fault of the agent itself is not a fault of the file: an agent whose S3
//! credentials are refused pauses itself (visible in `ferryctl agents`), the
//! file gets its attempt back and stays retryable, and another agent stores it.

use ferry_tests::eventually;

use crate::flow::{flow, sha256_hex};
use crate::stack::WAIT;

#[tokio::test]
async fn refused_s3_credentials_pause_the_agent_and_cost_the_file_no_attempt() {
    let mut f = flow().await;
    let server = f.s.add_server(f.s.server_req("cred")).await;
    f.watch(server, "in", "keep").await;
    let mut wrong = f.agent_opts(2);
    for (k, v) in &mut wrong.env {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = "not-the-secret-of-this-store".into();
        }
    }
    let _bad = f.s.agent_with("bad", wrong).await;
    f.s.sshd.write_file("in/a.csv", b"first file");

    // The refusal sends the file back to `error` without counting the attempt.
    let (attempts, error) = eventually("a.csv back in error", WAIT, || async {
        sqlx::query_as::<_, (i32, Option<String>)>(
            "SELECT attempts, last_error FROM files WHERE path LIKE '%/a.csv' AND status = 'error'",
        )
        .fetch_optional(f.s.db.pool())
        .await
        .unwrap()
    })
    .await;
    let error = error.unwrap_or_default();
    assert_eq!(attempts, 0, "the agent's fault costs no attempt: {error}");
    assert!(error.contains("SignatureDoesNotMatch"), "{error}");
    let reason: String = sqlx::query_scalar(
        "SELECT e.reason FROM file_events e JOIN files f ON f.id = e.file_id \
         WHERE f.path LIKE '%/a.csv' AND e.to_status = 'error' ORDER BY e.id LIMIT 1",
    )
    .fetch_one(f.s.db.pool())
    .await
    .unwrap();
    assert!(reason.contains("attempt not counted"), "{reason}");

    // The agent says why it takes no transfers.
    let ctl = f.s.coord.ctl(&f.s.pki.admin("alice"));
    let why = eventually("the agent reported unavailable", WAIT, || async {
        let agents = ctl.json(&["--json", "agents"]).await;
        agents
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["name"] == "bad")
            .and_then(|a| a["unavailable"].as_str().map(str::to_owned))
            .filter(|why| !why.is_empty())
    })
    .await;
    assert!(why.contains("S3"), "{why}");
    assert!(why.contains("takes no transfers"), "{why}");

    // More files arrive; an agent with working credentials stores them all.
    f.s.sshd.write_file("in/b.csv", b"second file");
    f.s.sshd.write_file("in/c.csv", b"third file");
    let _good = f.s.agent_with("good", f.agent_opts(2)).await;
    f.wait_status(3, "processed", WAIT).await;
    let rows: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT path, status, attempts FROM files ORDER BY path")
            .fetch_all(f.s.db.pool())
            .await
            .unwrap();
    for (path, status, attempts) in &rows {
        assert_eq!(status, "processed", "{path}");
        // Only the successful attempt counts, whatever the paused agent took.
        assert_eq!(*attempts, 1, "{path}: {rows:?}");
    }
    for (name, body) in [
        ("a.csv", &b"first file"[..]),
        ("b.csv", b"second file"),
        ("c.csv", b"third file"),
    ] {
        assert_eq!(
            sha256_hex(&f.stored(name).await),
            sha256_hex(body),
            "{name}"
        );
    }
}
