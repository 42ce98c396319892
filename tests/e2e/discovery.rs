//! Agents end to end: real sshd, coordinator and agent binaries. Files on the
//! SFTP server become `new` rows exactly once; health and failover are visible.

use std::time::Duration;

use ferry_proto::{self as proto, add_server_request::Auth, agent_message::Body};
use ferry_tests::{AgentOptions, TestDb, eventually};

use crate::stack::{Stack, WAIT};

async fn wait_files(stack: &Stack, n: i64) {
    eventually(&format!("{n} file rows"), WAIT, || async {
        (stack.file_count().await >= n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn password_and_key_logins_discover_files_once() {
    let mut s = Stack::new().await;
    let pw = s.add_server(s.server_req("pw")).await;
    let mut key_req = s.server_req("key");
    key_req.auth = Some(Auth::PrivateKey(proto::PrivateKey {
        pem: s.sshd.client_key_rsa_pem().to_string(),
        passphrase: String::new(),
    }));
    let key = s.add_server(key_req).await;
    let mut enc_req = s.server_req("enc");
    let (pem, pass) = s.sshd.client_key_encrypted();
    enc_req.auth = Some(Auth::PrivateKey(proto::PrivateKey {
        pem: pem.to_string(),
        passphrase: pass.to_string(),
    }));
    let enc = s.add_server(enc_req).await;
    s.sshd.write_file("a/one.csv", b"1,2,3\n");
    s.sshd.write_file("a/skip.txt", b"not matched");
    s.sshd.write_file("b/two.csv", b"4,5,6\n");
    s.sshd.write_file("c/deep/three.csv", b"7\n");
    s.add_watch(pw, "a", "*.csv").await;
    s.add_watch(key, "b", "*.csv").await;
    let w3 = s.add_watch(enc, "c", "*.csv").await;
    s.admin
        .update_watch(proto::UpdateWatchRequest {
            id: w3,
            recursive: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let _agent = s.agent("a1", "default").await;
    wait_files(&s, 3).await;
    s.wait_polls(pw, 2).await;
    let files = s.files().await;
    let paths: Vec<&str> = files.iter().map(|(p, ..)| p.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            s.sshd.remote_path("a/one.csv"),
            s.sshd.remote_path("b/two.csv"),
            s.sshd.remote_path("c/deep/three.csv"),
        ]
    );
    assert!(
        files
            .iter()
            .all(|(_, size, status)| *size > 0 && status == "new")
    );
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM file_events WHERE to_status = 'new' AND actor = 'agent:default/a1'",
    )
    .fetch_one(s.db.pool())
    .await
    .unwrap();
    assert_eq!(events, 3);
    for id in [pw, key, enc] {
        let h = s.server(id).await.health.unwrap();
        assert_eq!(h.poller_agent, "default/a1");
        assert_eq!(h.last_error, "", "server {id}");
    }
}

#[tokio::test]
async fn growing_file_is_reported_once_after_it_stops_changing() {
    let mut s = Stack::new().await;
    let id = s.add_server(s.server_req("grow")).await;
    s.add_watch(id, "in", "*").await;
    let _agent = s.agent("a1", "default").await;
    s.wait_polls(id, 1).await;
    s.sshd.write_file("in/big.bin", b"part1");
    for i in 0..4 {
        s.wait_polls(id, 1).await;
        assert_eq!(
            s.file_count().await,
            0,
            "reported while still growing (round {i})"
        );
        s.sshd
            .append_file("in/big.bin", format!("-part{}", i + 2).as_bytes());
        // mtime has one-second resolution: make every step visible.
        s.sshd.set_mtime(
            "in/big.bin",
            std::time::SystemTime::now() + Duration::from_secs(i + 1),
        );
    }
    wait_files(&s, 1).await;
    s.wait_polls(id, 3).await;
    let files = s.files().await;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].1 as usize, "part1-part2-part3-part4-part5".len());
}

#[tokio::test]
async fn host_key_mismatch_and_wrong_password_are_visible() {
    let mut s = Stack::new().await;
    let mut bad_key = s.server_req("badkey");
    bad_key.host_key_fingerprint = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU".into();
    let bad_key = s.add_server(bad_key).await;
    let mut bad_pw = s.server_req("badpw");
    bad_pw.auth = Some(Auth::Password(proto::Password {
        password: "wrong-password".into(),
    }));
    let bad_pw = s.add_server(bad_pw).await;
    s.sshd.write_file("x/file.csv", b"data");
    s.add_watch(bad_key, "x", "*").await;
    s.add_watch(bad_pw, "x", "*").await;
    let _agent = s.agent("a1", "default").await;
    s.wait_polls(bad_key, 2).await;
    s.wait_polls(bad_pw, 1).await;
    let err = s.server(bad_key).await.health.unwrap().last_error;
    assert!(err.contains("host key mismatch"), "{err}");
    let err = s.server(bad_pw).await.health.unwrap().last_error;
    assert!(err.contains("authentication failed"), "{err}");
    assert_eq!(
        s.file_count().await,
        0,
        "nothing may be read from an unverified server"
    );
    // ferryctl shows the same.
    let out = s
        .coord
        .ctl(&s.pki.admin("alice"))
        .run(&["servers", "list"])
        .await;
    assert!(out.success(), "{}", out.stderr);
    assert!(out.stdout.contains("host key mismatch"), "{}", out.stdout);
    assert!(
        out.stdout.contains("authentication failed"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn ten_thousand_files_become_exactly_ten_thousand_rows() {
    let mut s = Stack::new().await;
    let id = s.add_server(s.server_req("many")).await;
    s.sshd.mkdir("many");
    for i in 0..10_000 {
        s.sshd.write_file(&format!("many/f{i:05}.dat"), b"x");
    }
    let watch = s.add_watch(id, "many", "*.dat").await;
    let mut agent = s.agent("a1", "default").await;
    wait_files(&s, 10_000).await;
    s.wait_polls(id, 3).await;
    assert_eq!(s.file_count().await, 10_000);
    agent.restart().await;
    s.wait_poller(id, "agent back as poller", |p| p == "default/a1")
        .await;
    s.wait_polls(id, 3).await;
    assert_eq!(s.file_count().await, 10_000);
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT path) FROM files WHERE watch_id = $1")
            .bind(watch)
            .fetch_one(s.db.pool())
            .await
            .unwrap();
    assert_eq!(distinct, 10_000);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM file_events")
        .fetch_one(s.db.pool())
        .await
        .unwrap();
    assert_eq!(events, 10_000, "one history row per file");
}

#[tokio::test]
async fn replaced_file_is_a_new_version_and_removed_server_stops_polling() {
    let mut s = Stack::new().await;
    let id = s.add_server(s.server_req("rm")).await;
    s.add_watch(id, "in", "*").await;
    s.sshd.write_file("in/a.csv", b"v1");
    let _agent = s.agent("a1", "default").await;
    wait_files(&s, 1).await;
    s.sshd.write_file("in/a.csv", b"version-2");
    s.sshd.set_mtime(
        "in/a.csv",
        std::time::SystemTime::now() + Duration::from_secs(5),
    );
    wait_files(&s, 2).await;
    let sizes: Vec<i64> = s.files().await.iter().map(|f| f.1).collect();
    assert_eq!(sizes, vec![2, 9]);

    s.admin
        .remove_server(proto::RemoveServerRequest { id })
        .await
        .unwrap();
    let last_poll = |db: &TestDb| {
        let pool = db.pool().clone();
        async move {
            sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
                "SELECT last_poll_at FROM servers WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    // Give the revocation a moment, then no poll may happen any more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = last_poll(&s.db).await;
    s.sshd.write_file("in/b.csv", b"after removal");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        last_poll(&s.db).await,
        before,
        "the removed server was polled again"
    );
    assert_eq!(s.file_count().await, 2);
}

#[tokio::test]
async fn poll_moves_to_the_other_agent_of_the_site_and_never_to_another_site() {
    let mut s = Stack::new().await;
    let mut req = s.server_req("site-a-srv");
    req.site = "site-a".into();
    let id = s.add_server(req).await;
    s.add_watch(id, "in", "*").await;
    let _stranger = s.agent("b1", "site-b").await;
    let mut a1 = s.agent("a1", "site-a").await;
    let mut a2 = s.agent("a2", "site-a").await;
    let first = s.wait_poller(id, "a poller", |p| !p.is_empty()).await;
    assert!(
        first == "site-a/a1" || first == "site-a/a2",
        "polled by {first}"
    );
    s.sshd.write_file("in/1.csv", b"one");
    wait_files(&s, 1).await;
    if first == "site-a/a1" {
        a1.kill().await
    } else {
        a2.kill().await
    }
    let second = s
        .wait_poller(id, "the other agent takes over", |p| {
            !p.is_empty() && p != first
        })
        .await;
    assert_ne!(second, "site-b/b1");
    s.sshd.write_file("in/2.csv", b"two");
    wait_files(&s, 2).await;
    let actors: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT actor FROM file_events ORDER BY actor")
            .fetch_all(s.db.pool())
            .await
            .unwrap();
    assert!(
        !actors.contains(&"agent:site-b/b1".to_string()),
        "site-b agent reported files: {actors:?}"
    );
    let agents = s
        .admin
        .list_agents(proto::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    let b1 = agents.iter().find(|a| a.name == "b1").expect("b1 listed");
    assert!(b1.connected && b1.polled_servers.is_empty());
    assert_eq!(b1.site, "site-b");
}

#[tokio::test]
async fn agent_survives_a_coordinator_restart() {
    let mut s = Stack::new().await;
    let id = s.add_server(s.server_req("restart")).await;
    s.add_watch(id, "in", "*").await;
    let _agent = s.agent("a1", "default").await;
    s.sshd.write_file("in/before.csv", b"1");
    wait_files(&s, 1).await;
    s.coord.restart().await;
    s.admin = s.coord.admin_client(&s.pki.admin("alice")).await.unwrap();
    s.sshd.write_file("in/after.csv", b"2");
    wait_files(&s, 2).await;
    assert_eq!(s.file_count().await, 2);
    let agents = s
        .admin
        .list_agents(proto::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert!(agents[0].connected);
}

#[tokio::test]
async fn a_file_row_lost_after_discovery_comes_back_with_the_periodic_resync() {
    let mut s = Stack::new().await;
    let server = s.add_server(s.server_req("resync")).await;
    s.add_watch(server, "resync", "*").await;
    let opts = AgentOptions {
        capacity: 0,
        env: vec![("FERRY_DISCOVERY_RESYNC_SECS".into(), "2".into())],
        ..Default::default()
    };
    let _agent = s.agent_with("a1", opts).await;
    s.sshd.write_file("resync/a.csv", b"a");
    wait_files(&s, 1).await;

    // A resync of files the coordinator has writes nothing.
    let events = |s: &Stack| {
        let db = s.db.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM file_events")
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    let before = events(&s).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        events(&s).await,
        before,
        "resyncs of known files wrote events"
    );

    // The row goes missing after the agent's report was acknowledged (the
    // agent will not report the unchanged file as news again): the next
    // resync brings it back.
    sqlx::query("DELETE FROM file_events")
        .execute(s.db.pool())
        .await
        .unwrap();
    sqlx::query("DELETE FROM files")
        .execute(s.db.pool())
        .await
        .unwrap();
    wait_files(&s, 1).await;
    let path: String = sqlx::query_scalar("SELECT path FROM files")
        .fetch_one(s.db.pool())
        .await
        .unwrap();
    assert!(path.ends_with("/resync/a.csv"), "{path}");
}

/// The coordinator records consecutive ordinary discovery batches of one
/// stream concurrently, yet a message sent after them (here the heartbeat
/// of `barrier`) takes effect only once they are recorded: apart from such a
/// run of batches, a stream's messages take effect in the order sent.
#[tokio::test]
async fn a_message_sent_after_discovery_batches_takes_effect_after_them() {
    let mut s = Stack::new().await;
    let server_id = s.add_server(s.server_req("acme")).await;
    let watch_id = s.add_watch(server_id, "in", "*").await;
    let dir = s.sshd.remote_path("in");
    let db = s.db.pool().clone();
    let (agent, _) = s.rogue_poller("scout", watch_id).await;
    const BATCHES: u64 = 4;
    const ENTRIES: u64 = 5_000;
    for batch in 1..=BATCHES {
        let entries = (0..ENTRIES)
            .map(|i| proto::RemoteEntry {
                path: format!("{dir}/f-{batch}-{i:05}.csv"),
                size: i + 1,
                mtime_unix: 1_700_000_000,
            })
            .collect();
        agent
            .send(Body::Discovery(proto::DiscoveryBatch {
                server_id,
                watch_id,
                entries,
                batch_id: batch,
                baseline: false,
                baseline_complete: false,
            }))
            .await;
    }
    agent.barrier(&db, "scout").await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM files WHERE watch_id = $1")
        .bind(watch_id)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        rows,
        (BATCHES * ENTRIES) as i64,
        "the heartbeat sent after the discovery batches took effect before they were recorded"
    );
}
