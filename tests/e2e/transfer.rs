//! Transfers end to end: real sshd, S3 server (s3s-fs), RabbitMQ, Postgres and
//! binaries. Files land byte-identical, are announced once, and survive
//! S3/AMQP outages and a killed agent; post-actions and max_sessions hold, and
//! a poll shares a server's connection with a running transfer.

use std::collections::HashMap;
use std::time::Duration;

use ferry_proto as proto;
use ferry_tests::cluster::content;
use ferry_tests::{TcpProxy, eventually, signal};

use crate::stack::WAIT;

use crate::flow::{BUCKET, Flow, flow, sha256_hex};

#[tokio::test]
async fn fifty_files_land_byte_identical_with_one_message_each() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("bulk")).await;
    f.watch(id, "bulk", "keep").await;
    let mut expected: HashMap<String, String> = HashMap::new();
    let mut sizes: Vec<usize> = vec![
        0,
        0,
        1,
        7,
        4096,
        65_535,
        65_536,
        261_121,
        1 << 20,
        5 << 20,
        (9 << 20) + 3,
        20 << 20,
    ];
    while sizes.len() < 49 {
        sizes.push((sizes.len() * 7919) % 300_000);
    }
    // One file over 1 GiB: multipart, and it crosses SSH re-keying (RekeyLimit 256M).
    sizes.push((1 << 30) + 12_345);
    for (i, size) in sizes.iter().enumerate() {
        let bytes = content(i as u64, *size);
        let rel = format!("bulk/f{i:02}.bin");
        f.s.sshd.write_file(&rel, &bytes);
        expected.insert(f.s.sshd.remote_path(&rel), sha256_hex(&bytes));
    }
    let _agent = f.s.agent_with("a1", f.agent_opts(4)).await;
    f.wait_status(50, "processed", Duration::from_secs(600))
        .await;
    let msgs = f.messages(50).await;
    assert_eq!(msgs.len(), 50, "exactly one message per file");
    let mut ids: Vec<String> = msgs
        .iter()
        .map(|m| m.message_id.clone().unwrap_or_default())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50, "message ids are distinct announcement ids");
    for m in &msgs {
        assert_eq!(m.delivery_mode, Some(2), "persistent");
        assert_eq!(m.routing_key, "ferry.bulk");
        let body = m.json();
        let key = body["key"].as_str().unwrap().to_string();
        let path = body["path"].as_str().unwrap();
        let name = path.rsplit('/').next().unwrap();
        assert!(
            key.starts_with("bulk/") && key.ends_with(&format!("/{name}")),
            "{key} names the server and keeps the file name"
        );
        let want = &expected[path];
        assert_eq!(body["sha256"].as_str().unwrap(), want, "{key}");
        assert_eq!(body["bucket"], BUCKET);
        assert_eq!(body["server"], "bulk");
        assert_eq!(body["announcement_id"].as_str(), m.message_id.as_deref());
        for field in [
            "watch_id",
            "path",
            "size",
            "mtime",
            "etag",
            "discovered_at",
            "uploaded_at",
        ] {
            assert!(!body[field].is_null(), "message lacks {field}: {body}");
        }
        let stored = f.s3.get_object(BUCKET, &key).await;
        assert_eq!(stored.len() as u64, body["size"].as_u64().unwrap());
        assert_eq!(
            &sha256_hex(&stored),
            want,
            "bytes in the bucket differ for {key}"
        );
    }
    // History: new -> in_progress -> uploaded -> processed for each file.
    let history: Vec<(String,)> = sqlx::query_as(
        "SELECT string_agg(to_status, ',' ORDER BY id) FROM file_events GROUP BY file_id",
    )
    .fetch_all(f.s.db.pool())
    .await
    .unwrap();
    assert!(
        history
            .iter()
            .all(|(h,)| h == "new,in_progress,uploaded,processed"),
        "{history:?}"
    );
}

#[tokio::test]
async fn vanished_file_becomes_lost_and_retry_requeues_it() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("lost")).await;
    f.watch(id, "in", "keep").await;
    f.s.sshd.write_file("in/gone.csv", b"soon gone");
    // Capacity 0: the agent discovers but takes no transfers.
    let mut scout = f.s.agent_with("a1", f.agent_opts(0)).await;
    f.wait_status(1, "new", WAIT).await;
    scout.kill().await;
    f.s.sshd.remove_file("in/gone.csv");
    let _agent = f.s.agent_with("a2", f.agent_opts(2)).await;
    f.wait_status(1, "lost", WAIT).await;
    let (file_id, _) = f.statuses().await[&f.s.sshd.remote_path("in/gone.csv")].clone();
    let detail =
        f.s.admin
            .get_file(proto::GetFileRequest { id: file_id })
            .await
            .unwrap()
            .into_inner();
    assert!(
        detail.file.unwrap().last_error.contains("vanished"),
        "lost reason recorded"
    );
    // Announced as lost (FERRY_ANNOUNCE_FAILURES defaults to on), never as stored.
    let messages = f.queue.drain_for(Duration::from_secs(2)).await;
    let kinds: Vec<Option<&str>> = messages.iter().map(|m| m.kind.as_deref()).collect();
    assert_eq!(kinds, [Some("ferry.file.lost")], "{messages:?}");
    assert_eq!(messages[0].routing_key, "ferry.file.lost.lost");
    // Put the same version back (same bytes and mtime) and retry it through ferryctl.
    let mtime: i64 = sqlx::query_scalar("SELECT mtime_unix FROM files WHERE id = $1")
        .bind(file_id)
        .fetch_one(f.s.db.pool())
        .await
        .unwrap();
    f.s.sshd.write_file("in/gone.csv", b"soon gone");
    f.s.sshd.set_mtime(
        "in/gone.csv",
        std::time::UNIX_EPOCH + Duration::from_secs(mtime as u64),
    );
    let ctl = f.s.coord.ctl(&f.s.pki.admin("alice"));
    let out = ctl.run(&["files", "retry", &file_id.to_string()]).await;
    assert!(out.success(), "{}", out.stderr);
    assert!(out.stdout.contains('1'), "{}", out.stdout);
    f.wait_status(1, "processed", WAIT).await;
    assert_eq!(f.stored("gone.csv").await, b"soon gone");
    let show = ctl.run(&["files", "show", &file_id.to_string()]).await;
    assert!(
        show.success() && show.stdout.contains("manual retry"),
        "{}",
        show.stdout
    );
}

#[tokio::test]
async fn s3_outage_leaves_files_in_error_and_they_land_when_it_returns() {
    let mut f = flow().await;
    let s3_proxy = TcpProxy::start(f.s3.addr()).await;
    s3_proxy.cut();
    let id = f.s.add_server(f.s.server_req("s3down")).await;
    f.watch(id, "in", "keep").await;
    let bytes = content(7, 3 << 20);
    f.s.sshd.write_file("in/data.bin", &bytes);
    let endpoint = format!("http://{}", s3_proxy.addr());
    let _agent = f.s.agent_with("a1", f.agent_opts_via(2, &endpoint)).await;
    eventually("an error with attempts", WAIT, || async {
        let (attempts, status): (i32, String) =
            sqlx::query_as("SELECT attempts, status FROM files")
                .fetch_optional(f.s.db.pool())
                .await
                .unwrap()?;
        (attempts >= 1 && status == "error").then_some(())
    })
    .await;
    s3_proxy.heal();
    f.wait_status(1, "processed", WAIT).await;
    let stored = f.stored("data.bin").await;
    assert_eq!(sha256_hex(&stored), sha256_hex(&bytes));
    assert_eq!(f.messages(1).await.len(), 1);
}

#[tokio::test]
async fn amqp_cut_mid_run_delivers_every_message_after_it_heals() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("mq")).await;
    f.watch(id, "in", "keep").await;
    let _agent = f.s.agent_with("a1", f.agent_opts(4)).await;
    f.s.sshd.write_file("in/first.csv", b"before the cut");
    f.wait_status(1, "processed", WAIT).await;
    f.amqp_proxy.cut();
    for i in 0..10 {
        f.s.sshd
            .write_file(&format!("in/during-{i}.csv"), format!("row {i}").as_bytes());
    }
    // Uploads go on while the broker is unreachable; the outbox fills.
    f.wait_status(10, "uploaded", WAIT).await;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(f.s.db.pool())
        .await
        .unwrap();
    assert_eq!(pending, 10);
    f.amqp_proxy.heal();
    f.wait_status(11, "processed", WAIT).await;
    let msgs = f.messages(11).await;
    let mut ids: Vec<String> = msgs.iter().filter_map(|m| m.message_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 11, "every file announced");
    assert!(msgs.len() >= 11, "at-least-once");
}

#[tokio::test]
async fn killed_agent_task_is_reassigned_after_its_lease() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("kill")).await;
    f.watch(id, "in", "keep").await;
    let bytes = content(42, 300 << 20);
    f.s.sshd.write_file("in/big.bin", &bytes);
    let mut a1 = f.s.agent_with("a1", f.agent_opts(2)).await;
    f.wait_status(1, "in_progress", WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a1.kill().await;
    let _a2 = f.s.agent_with("a2", f.agent_opts(2)).await;
    f.wait_status(1, "processed", Duration::from_secs(180))
        .await;
    let stored = f.stored("big.bin").await;
    assert_eq!(sha256_hex(&stored), sha256_hex(&bytes), "object complete");
    let history: Vec<(String, String)> =
        sqlx::query_as("SELECT to_status, reason FROM file_events ORDER BY id")
            .fetch_all(f.s.db.pool())
            .await
            .unwrap();
    let processed = history.iter().filter(|(st, _)| st == "processed").count();
    assert_eq!(processed, 1, "{history:?}");
    assert!(
        history.iter().any(|(_, r)| r.contains("lease expired")),
        "{history:?}"
    );
    assert_eq!(f.messages(1).await.len(), 1, "announced once");
}

#[tokio::test]
async fn post_actions_delete_and_move_on_the_sftp_server() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("post")).await;
    f.watch(id, "del", "delete").await;
    let archive = f.s.sshd.remote_path("archive");
    f.watch(id, "mv", &format!("move:{archive}")).await;
    f.s.sshd.write_file("del/a.csv", b"delete me");
    f.s.sshd.write_file("mv/b.csv", b"move me");
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    f.wait_status(2, "processed", WAIT).await;
    wait_post_actions_done(&f, 2).await;
    assert!(
        !f.s.sshd.root().join("del/a.csv").exists(),
        "deleted after processing"
    );
    assert!(!f.s.sshd.root().join("mv/b.csv").exists(), "moved away");
    assert_eq!(
        std::fs::read(f.s.sshd.root().join("archive/b.csv")).unwrap(),
        b"move me"
    );
    assert_eq!(f.stored("a.csv").await, b"delete me");
}

#[tokio::test]
async fn max_sessions_bounds_every_ssh_connection_of_a_server() {
    let mut f = flow().await;
    let mut req = f.s.server_req("limited");
    req.max_sessions = 2;
    let id = f.s.add_server(req).await;
    f.watch(id, "in", "delete").await;
    for i in 0..12 {
        f.s.sshd
            .write_file(&format!("in/f{i}.bin"), &content(i, 2 << 20));
    }
    // Count the SSH connections sshd holds (polls, transfers, post-actions,
    // idle pooled sessions alike) every 20 ms until the run is over.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        let count = f.s.sshd.session_counter();
        tokio::spawn(async move {
            let mut max = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(count());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            max
        })
    };
    let _a1 = f.s.agent_with("a1", f.agent_opts(8)).await;
    let _a2 = f.s.agent_with("a2", f.agent_opts(8)).await;
    f.wait_status(12, "processed", Duration::from_secs(180))
        .await;
    wait_post_actions_done(&f, 12).await;
    // A few more polls of the now empty directory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let connections = sampler.await.unwrap();
    for i in 0..12 {
        assert!(
            !f.s.sshd.exists(&format!("in/f{i}.bin")),
            "f{i} not deleted"
        );
    }
    assert_eq!(f.stored("f3.bin").await, content(3, 2 << 20));
    assert!(
        (1..=2).contains(&connections),
        "{connections} SSH connections at once to a server with max_sessions 2"
    );
}

#[tokio::test]
async fn a_poll_shares_the_one_connection_with_a_stalled_transfer() {
    // max_sessions 1: the large transfer holds the server's only connection
    // while S3 is frozen; the poll rides on the same connection (SFTP
    // multiplexes requests), so a new file is still discovered.
    let mut f = flow().await;
    let mut req = f.s.server_req("one");
    req.max_sessions = 1;
    let id = f.s.add_server(req).await;
    f.watch(id, "in", "keep").await;
    let big = content(11, 300 << 20);
    f.s.sshd.write_file("in/big.bin", &big);
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    f.wait_status(1, "in_progress", WAIT).await;
    let s3 = f.s3.pid().expect("s3s-fs running");
    signal(s3, "STOP");
    f.s.sshd
        .write_file("in/small.csv", b"found while big.bin was stuck");
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let st = f.statuses().await;
            let big_status = st
                .iter()
                .find(|(p, _)| p.ends_with("/big.bin"))
                .map(|(_, (_, s))| s.clone());
            if st.keys().any(|p| p.ends_with("/small.csv")) {
                break big_status;
            }
            if big_status.as_deref() != Some("in_progress") {
                break big_status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    signal(s3, "CONT");
    assert_eq!(
        seen.expect("small.csv discovered or big.bin left in_progress within the wait")
            .as_deref(),
        Some("in_progress"),
        "small.csv must be discovered while big.bin's transfer holds the only connection"
    );
    f.wait_status(2, "processed", Duration::from_secs(180))
        .await;
    assert_eq!(sha256_hex(&f.stored("big.bin").await), sha256_hex(&big));
    assert_eq!(
        f.stored("small.csv").await,
        b"found while big.bin was stuck"
    );
}

#[tokio::test]
async fn sigterm_lets_the_running_transfer_finish_before_exiting() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("drain")).await;
    f.watch(id, "in", "keep").await;
    let bytes = content(9, 200 << 20);
    f.s.sshd.write_file("in/big.bin", &bytes);
    let mut opts = f.agent_opts(2);
    // Room for a slow machine: the test is about finishing, not about speed.
    opts.env.push(("FERRY_DRAIN_TIMEOUT".into(), "110".into()));
    let mut agent = f.s.agent_with("a1", opts).await;
    f.wait_status(1, "in_progress", WAIT).await;
    let status = agent
        .terminate(Duration::from_secs(120))
        .await
        .expect("agent exits after draining");
    assert!(status.success(), "{status:?}");
    // The result went out before the agent exited: no lease had to expire.
    let st: String = sqlx::query_scalar("SELECT status FROM files")
        .fetch_one(f.s.db.pool())
        .await
        .unwrap();
    assert!(
        st == "uploaded" || st == "processed",
        "status after drain: {st}"
    );
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM file_events ORDER BY id")
        .fetch_all(f.s.db.pool())
        .await
        .unwrap();
    assert!(
        !reasons.iter().any(|r| r.contains("lease expired")),
        "{reasons:?}"
    );
    f.wait_status(1, "processed", WAIT).await;
    assert_eq!(sha256_hex(&f.stored("big.bin").await), sha256_hex(&bytes));
}

#[tokio::test]
async fn a_silent_agent_is_told_to_stop_when_its_lease_is_reaped() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("stop")).await;
    f.watch(id, "in", "keep").await;
    let bytes = content(7, 300 << 20);
    f.s.sshd.write_file("in/big.bin", &bytes);
    let a1 = f.s.agent_with("a1", f.agent_opts(1)).await;
    f.wait_status(1, "in_progress", WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Frozen mid-transfer: no progress, so the 6 s lease expires, while the
    // stream stays open (HTTP/2 keepalive gives up only after 30 s).
    let pid = a1.pid().unwrap();
    signal(pid, "STOP");
    let _a2 = f.s.agent_with("a2", f.agent_opts(4)).await;
    let reaped = eventually("lease reaped", WAIT, || async {
        let reasons: Vec<String> =
            sqlx::query_scalar("SELECT reason FROM file_events WHERE reason LIKE 'lease expired%'")
                .fetch_all(f.s.db.pool())
                .await
                .unwrap();
        reasons.into_iter().next()
    })
    .await;
    signal(pid, "CONT");
    assert_eq!(reaped, "lease expired: agent default/a1 stopped reporting");
    eventually("a1 cancels its transfer", WAIT, || async {
        let log = std::fs::read_to_string(a1.log_path()).unwrap_or_default();
        log.contains("transfer cancelled").then_some(())
    })
    .await;
    f.wait_status(1, "processed", Duration::from_secs(180))
        .await;
    let stored = f.stored("big.bin").await;
    assert_eq!(sha256_hex(&stored), sha256_hex(&bytes), "object complete");
    let history: Vec<(String, String, String)> =
        sqlx::query_as("SELECT to_status, actor, reason FROM file_events ORDER BY id")
            .fetch_all(f.s.db.pool())
            .await
            .unwrap();
    assert!(
        !history
            .iter()
            .any(|(st, actor, _)| actor == "agent:default/a1" && st != "new"),
        "only a1's discovery is in the history; its late result must not count: {history:?}"
    );
    assert!(
        history
            .iter()
            .any(|(st, actor, _)| st == "uploaded" && actor == "agent:default/a2"),
        "{history:?}"
    );
    let msgs = f.messages(1).await;
    assert_eq!(msgs.len(), 1, "announced once");
    let body: ferry_common::announcement::Announcement =
        serde_json::from_slice(&msgs[0].body).unwrap();
    assert_eq!(body.schema_version, 1);
    assert!(
        body.key.starts_with("stop/") && body.key.ends_with("/big.bin"),
        "{}",
        body.key
    );
    assert_eq!(body.sha256, sha256_hex(&bytes));
    assert_eq!(
        msgs[0].message_id.as_deref(),
        Some(body.announcement_id.as_str())
    );
}

#[tokio::test]
async fn a_file_not_yet_readable_is_retried_not_failed() {
    use std::os::unix::fs::PermissionsExt;

    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("perm")).await;
    f.watch(id, "perm", "keep").await;
    // A producer that writes first and makes the file readable afterwards:
    // the SFTP login cannot read it yet (permission denied).
    let path = f.s.sshd.write_file("perm/late.csv", b"id\n1\n");
    std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    f.wait_status(1, "error", WAIT).await;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    f.wait_status(1, "processed", WAIT).await;
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM files")
        .fetch_one(f.s.db.pool())
        .await
        .unwrap();
    assert!(attempts >= 2, "attempts {attempts}");
}

#[tokio::test]
async fn objects_carry_the_content_type_of_their_extension_and_ferry_metadata() {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("types")).await;
    f.watch(id, "ct", "keep").await;
    let files = [
        ("a.csv", 10, "text/csv"),
        ("b.json", 10, "application/json"),
        ("c.bin", 10, "application/octet-stream"),
        // Multipart (over one part), same rule.
        ("big.csv", 20 << 20, "text/csv"),
    ];
    for (i, (name, size, _)) in files.iter().enumerate() {
        f.s.sshd
            .write_file(&format!("ct/{name}"), &content(i as u64, *size));
    }
    let _agent = f.s.agent_with("a1", f.agent_opts(4)).await;
    f.wait_status(files.len(), "processed", WAIT).await;
    for (name, size, want) in files {
        let (key, sha): (String, String) =
            sqlx::query_as("SELECT object_key, sha256 FROM files WHERE path LIKE '%/' || $1")
                .bind(name)
                .fetch_one(f.s.db.pool())
                .await
                .unwrap();
        let head =
            f.s3.client()
                .head_object()
                .bucket(BUCKET)
                .key(&key)
                .send()
                .await
                .unwrap();
        assert_eq!(head.content_type(), Some(want), "{name}");
        let meta = head.metadata().cloned().unwrap_or_default();
        assert_eq!(
            meta.get("ferry-server").map(String::as_str),
            Some("types"),
            "{name}: {meta:?}"
        );
        if size < (8 << 20) {
            // Single-request uploads carry the sha256 the agent computed.
            assert_eq!(meta.get("ferry-sha256"), Some(&sha), "{name}: {meta:?}");
        }
    }
}

/// Waits until `n` files have their post-action done.
async fn wait_post_actions_done(f: &Flow, n: i64) {
    eventually("post-actions done", WAIT, || async {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM files WHERE post_action_result = 'done'")
                .fetch_one(f.s.db.pool())
                .await
                .unwrap();
        (done == n).then_some(())
    })
    .await;
}
