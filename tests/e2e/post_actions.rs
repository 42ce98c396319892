//! Post-actions act on the stored *version*, never on whatever the path holds
//! now: a rewritten file survives its older version's delete, the action is
//! the one in force when the version was discovered, failures retry with
//! backoff and then stay visibly failed until an admin retries them, and a
//! version ferry deleted that is re-sent unchanged is a new version.

use std::time::{Duration, SystemTime};

use ferry_proto as proto;
use ferry_tests::{AmqpMessage, TcpProxy, eventually};

use crate::stack::WAIT;

use crate::flow::{BUCKET, Flow, flow, flow_with, post_action_of, sha256_hex};

/// Row-level views the post-action tests read.
impl Flow {
    /// (id, status, post_action_result) of every row, in id order.
    async fn rows(&self) -> Vec<(i64, String, Option<String>)> {
        sqlx::query_as("SELECT id, status, post_action_result FROM files ORDER BY id")
            .fetch_all(self.s.db.pool())
            .await
            .unwrap()
    }

    async fn wait_rows(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&[(i64, String, Option<String>)]) -> bool,
    ) {
        eventually(what, timeout, || async {
            let rows = self.rows().await;
            ok(&rows).then_some(())
        })
        .await;
    }

    /// Puts `in/a.csv` back (`rsync -a`: same bytes, same mtime), waits
    /// for that second version to be processed and deleted, and checks both
    /// versions were announced under their own message ids.
    async fn resend_and_expect_a_second_version(&mut self, bytes: &[u8], mtime: SystemTime) {
        self.s.sshd.write_file("in/a.csv", bytes);
        self.s.sshd.set_mtime("in/a.csv", mtime);
        self.wait_rows("second copy ingested and deleted", WAIT, |r| {
            r.len() == 2 && r[1].1 == "processed" && r[1].2.as_deref() == Some("done")
        })
        .await;
        assert!(!self.s.sshd.exists("in/a.csv"));
        let msgs = self.messages(2).await;
        let ids: std::collections::BTreeSet<String> =
            msgs.iter().filter_map(|m| m.message_id.clone()).collect();
        assert_eq!(ids.len(), 2, "announced once per version: {msgs:?}");
    }

    async fn history(&self, file_id: i64) -> Vec<String> {
        sqlx::query_scalar("SELECT reason FROM file_events WHERE file_id = $1 ORDER BY id")
            .bind(file_id)
            .fetch_all(self.s.db.pool())
            .await
            .unwrap()
    }
}

fn announced_sha256s(msgs: &[AmqpMessage]) -> Vec<String> {
    let mut shas: Vec<String> = msgs
        .iter()
        .filter_map(|m| m.json()["sha256"].as_str().map(str::to_owned))
        .collect();
    shas.sort();
    shas.dedup();
    shas
}

#[tokio::test]
async fn a_rewritten_file_survives_the_delete_of_its_older_version() {
    let mut f = flow_with(&[("FERRY_MAX_ATTEMPTS", "50")]).await;
    let s3_proxy = TcpProxy::start(f.s3.addr()).await;
    let id = f.s.add_server(f.s.server_req("rw")).await;
    f.watch(id, "out", "delete").await;
    let s3_url = format!("http://{}", s3_proxy.addr());
    let _agent = f.s.agent_with("a1", f.agent_opts_via(2, &s3_url)).await;
    // v1 is stored, but its announcement (and so its post-action) waits.
    f.amqp_proxy.cut();
    let v1 = b"v1 of the report".to_vec();
    f.s.sshd.write_file("out/report.csv", &v1);
    f.wait_rows("v1 uploaded", WAIT, |r| {
        r.len() == 1 && r[0].1 == "uploaded"
    })
    .await;
    // The producer rewrites the file; v2 cannot be stored yet.
    s3_proxy.cut();
    let v2 = b"v2 of the report, longer".to_vec();
    f.s.sshd.write_file("out/report.csv", &v2);
    f.s.sshd.set_mtime(
        "out/report.csv",
        SystemTime::now() - Duration::from_secs(120),
    );
    f.wait_rows("v2 discovered", WAIT, |r| r.len() == 2).await;
    // v1 is announced, then its post-action runs while the path holds v2.
    f.amqp_proxy.heal();
    f.wait_rows("v1 post-action answered", WAIT, |r| {
        r[0].1 == "processed" && r[0].2.is_some()
    })
    .await;
    let rows = f.rows().await;
    assert_ne!(rows[1].1, "processed", "v2 not ingested yet: {rows:?}");
    assert!(
        f.s.sshd.exists("out/report.csv"),
        "v2 was never ingested and must stay on the server: {rows:?}"
    );
    assert_eq!(f.s.sshd.read_file("out/report.csv"), v2);
    let v1_result = rows[0].2.clone().unwrap();
    assert!(v1_result.contains("changed since stored"), "{v1_result}");
    let history = f.history(rows[0].0).await;
    assert!(
        history.iter().any(|r| r.contains("changed since stored")),
        "{history:?}"
    );
    // v2 is ingested once S3 is back, and then deleted by its own post-action.
    s3_proxy.heal();
    f.wait_rows("v2 processed and deleted", WAIT, |r| {
        r[1].1 == "processed" && r[1].2.as_deref() == Some("done")
    })
    .await;
    assert!(!f.s.sshd.exists("out/report.csv"));
    let v2_key: String =
        sqlx::query_scalar("SELECT object_key FROM files ORDER BY id DESC LIMIT 1")
            .fetch_one(f.s.db.pool())
            .await
            .unwrap();
    assert_eq!(f.s3.get_object(BUCKET, &v2_key).await, v2);
    let shas = announced_sha256s(&f.messages(2).await);
    let mut want = vec![sha256_hex(&v1), sha256_hex(&v2)];
    want.sort();
    assert_eq!(shas, want, "both versions announced");
    crate::stack::assert_counts_exact(f.s.db.pool()).await;
}

#[tokio::test]
async fn changing_a_watch_from_keep_to_delete_spares_processed_files() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("kd")).await;
    let watch = f.watch(id, "in", "keep").await;
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    f.s.sshd.write_file("in/old.csv", b"kept");
    f.wait_rows("old processed", WAIT, |r| {
        r.len() == 1 && r[0].1 == "processed"
    })
    .await;
    f.s.admin
        .update_watch(proto::UpdateWatchRequest {
            id: watch,
            post_action: Some(post_action_of("delete")),
            ..Default::default()
        })
        .await
        .unwrap();
    f.s.sshd.write_file("in/new.csv", b"deleted after ingest");
    f.wait_rows("new processed and deleted", WAIT, |r| {
        r.len() == 2 && r[1].2.as_deref() == Some("done")
    })
    .await;
    assert!(!f.s.sshd.exists("in/new.csv"));
    // A few dispatch rounds later the old file is still there, untouched.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(f.s.sshd.exists("in/old.csv"), "kept under the old setting");
    assert_eq!(f.rows().await[0].2, None);
}

#[tokio::test]
async fn a_failed_move_is_retried_and_completes_after_the_outage() {
    let mut f = flow_with(&[("FERRY_MAX_ATTEMPTS", "50")]).await;
    let id = f.s.add_server(f.s.server_req("mv")).await;
    // The archive directory cannot be created: a file is in its way.
    f.s.sshd.write_file("archive", b"in the way");
    let archive = f.s.sshd.remote_path("archive");
    f.watch(id, "in", &format!("move:{archive}")).await;
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    f.s.sshd.write_file("in/a.csv", b"move me later");
    f.wait_rows("processed", WAIT, |r| r.len() == 1 && r[0].1 == "processed")
        .await;
    let file_id = f.rows().await[0].0;
    eventually("two failed post-action attempts", WAIT, || async {
        let failures = f
            .history(file_id)
            .await
            .iter()
            .filter(|r| r.contains("post-action") && r.contains("archive"))
            .count();
        (failures >= 2).then_some(())
    })
    .await;
    std::fs::remove_file(f.s.sshd.root().join("archive")).unwrap();
    f.wait_rows("moved", WAIT, |r| r[0].2.as_deref() == Some("done"))
        .await;
    assert!(!f.s.sshd.exists("in/a.csv"));
    assert_eq!(f.s.sshd.read_file("archive/a.csv"), b"move me later");
}

#[tokio::test]
async fn an_exhausted_post_action_stays_failed_until_an_admin_retries_it() {
    let mut f = flow_with(&[("FERRY_MAX_ATTEMPTS", "2")]).await;
    let id = f.s.add_server(f.s.server_req("ex")).await;
    f.s.sshd.write_file("archive", b"in the way");
    let archive = f.s.sshd.remote_path("archive");
    f.watch(id, "in", &format!("move:{archive}")).await;
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    f.s.sshd.write_file("in/a.csv", b"move me");
    f.wait_rows("post-action failed for good", WAIT, |r| {
        r.len() == 1
            && r[0]
                .2
                .as_deref()
                .is_some_and(|t| t.starts_with("failed after 2 attempts"))
    })
    .await;
    let file_id = f.rows().await[0].0;
    let ctl = f.s.coord.ctl(&f.s.pki.admin("alice"));
    let shown = ctl.run(&["files", "show", &file_id.to_string()]).await;
    assert!(shown.success(), "{}", shown.stderr);
    assert!(
        shown.stdout.contains("failed after 2 attempts"),
        "{}",
        shown.stdout
    );
    // Nothing more happens on its own.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(f.s.sshd.exists("in/a.csv"));
    std::fs::remove_file(f.s.sshd.root().join("archive")).unwrap();
    let retried = ctl.run(&["files", "retry", &file_id.to_string()]).await;
    assert!(retried.success(), "{}", retried.stderr);
    f.wait_rows("moved after the admin retry", WAIT, |r| {
        r[0].2.as_deref() == Some("done")
    })
    .await;
    assert_eq!(f.s.sshd.read_file("archive/a.csv"), b"move me");
    let history = f.history(file_id).await;
    assert!(
        history.iter().any(|r| r.contains("post-action re-armed")),
        "{history:?}"
    );
}

#[tokio::test]
async fn a_file_resent_after_ferry_deleted_it_is_a_new_version() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("rs")).await;
    f.watch(id, "in", "delete").await;
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let bytes = b"the same bytes twice".to_vec();
    f.s.sshd.write_file("in/a.csv", &bytes);
    f.s.sshd.set_mtime("in/a.csv", mtime);
    f.wait_rows("first copy deleted", WAIT, |r| {
        r.len() == 1 && r[0].2.as_deref() == Some("done")
    })
    .await;
    assert!(!f.s.sshd.exists("in/a.csv"));
    // Some time later (a poll saw the directory empty), `rsync -a` sends it
    // again: same bytes, same mtime.
    eventually("a poll without the file", WAIT, || async {
        let files: Option<i64> = sqlx::query_scalar("SELECT last_poll_files FROM servers")
            .fetch_one(f.s.db.pool())
            .await
            .unwrap();
        (files == Some(0)).then_some(())
    })
    .await;
    f.resend_and_expect_a_second_version(&bytes, mtime).await;
    let versions: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT path, size, mtime_unix FROM files ORDER BY id")
            .fetch_all(f.s.db.pool())
            .await
            .unwrap();
    assert_eq!(versions[0], versions[1], "the same identity twice");
}

#[tokio::test]
async fn a_file_resent_right_after_ferry_deleted_it_is_a_new_version() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("rs2")).await;
    let watch = f.watch(id, "in", "delete").await;
    // Polls 3 s apart, so the file is back long before a poll could see the
    // directory empty.
    f.s.admin
        .update_watch(proto::UpdateWatchRequest {
            id: watch,
            poll_interval_secs: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let bytes = b"sent, deleted, sent again".to_vec();
    f.s.sshd.write_file("in/a.csv", &bytes);
    f.s.sshd.set_mtime("in/a.csv", mtime);
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    // The moment ferry deletes it, `rsync -a` puts it back: same bytes, same mtime.
    eventually("ferry deleting the first copy", WAIT, || async {
        (!f.s.sshd.exists("in/a.csv")).then_some(())
    })
    .await;
    f.resend_and_expect_a_second_version(&bytes, mtime).await;
}
