//! Watches added with "skip existing files" (`watches add --skip-existing`):
//! the first listing is a baseline recorded as `skipped` (no object, no
//! announcement, retryable on demand), later files flow; and at the protocol
//! level, ordinary discoveries wait for the baseline and a late baseline
//! records nothing.

use std::time::Duration;

use ferry_proto::{self as proto, agent_message::Body, coordinator_message::Body as CBody};
use ferry_tests::eventually;
use sqlx::PgPool;

use crate::flow::{BUCKET, flow};
use crate::stack::{Stack, WAIT};

async fn baseline_pending(db: &PgPool, watch_id: i64) -> bool {
    sqlx::query_scalar("SELECT baseline_pending FROM watches WHERE id = $1")
        .bind(watch_id)
        .fetch_one(db)
        .await
        .unwrap()
}

/// (path, status) of every row of the watch, by path.
async fn rows(db: &PgPool, watch_id: i64) -> Vec<(String, String)> {
    sqlx::query_as("SELECT path, status FROM files WHERE watch_id = $1 ORDER BY path, id")
        .bind(watch_id)
        .fetch_all(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn skip_existing_records_present_files_as_skipped_and_later_files_flow() {
    let mut f = flow().await;
    f.s.add_server(f.s.server_req("legacy")).await;
    f.s.sshd
        .write_file("drop/old1.csv", b"handled by the old script");
    f.s.sshd.write_file("drop/old2.csv", b"also handled");
    // Still being written when the baseline is taken: skipped in this
    // version, ingested once it settles with another size.
    f.s.sshd.write_file("drop/growing.csv", b"part one,");
    let ctl = f.s.coord.ctl(&f.s.pki.admin("alice"));
    let dir = f.s.sshd.remote_path("drop");
    let out = ctl
        .run(&[
            "watches",
            "add",
            "--server",
            "legacy",
            "--dir",
            &dir,
            "--bucket",
            BUCKET,
            "--interval",
            "1",
            "--skip-existing",
            "--json",
        ])
        .await;
    assert!(out.success(), "{}", out.stderr);
    let watch: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(watch["baseline_pending"], true, "{}", out.stdout);
    let watch_id = watch["id"].as_i64().unwrap();
    let db = f.s.db.pool().clone();

    let _agent = f.s.agent_with("a1", f.agent_opts(4)).await;
    eventually("the baseline to be recorded", WAIT, || async {
        (!baseline_pending(&db, watch_id).await).then_some(())
    })
    .await;
    let root = f.s.sshd.remote_path("");
    let path = |rel: &str| format!("{}/{rel}", root.trim_end_matches('/'));
    assert_eq!(
        rows(&db, watch_id).await,
        [
            (path("drop/growing.csv"), "skipped".to_string()),
            (path("drop/old1.csv"), "skipped".to_string()),
            (path("drop/old2.csv"), "skipped".to_string()),
        ]
    );
    let reason: String = sqlx::query_scalar(
        "SELECT e.reason FROM file_events e JOIN files f ON f.id = e.file_id \
         WHERE f.path = $1 AND e.to_status = 'skipped'",
    )
    .bind(path("drop/old1.csv"))
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(reason.contains("baseline"), "{reason}");

    // After the baseline: a new file, and the growing one settling.
    f.s.sshd
        .write_file("drop/new.csv", b"the first file after the switch");
    f.s.sshd.append_file("drop/growing.csv", b"part two\n");
    f.wait_status(2, "processed", WAIT).await;
    assert_eq!(
        f.stored("new.csv").await,
        b"the first file after the switch"
    );
    assert_eq!(f.stored("growing.csv").await, b"part one,part two\n");
    let msgs = f.messages(2).await;
    let mut announced: Vec<String> = msgs
        .iter()
        .map(|m| {
            let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
            body["path"].as_str().unwrap().to_string()
        })
        .collect();
    announced.sort();
    assert_eq!(
        announced,
        [path("drop/growing.csv"), path("drop/new.csv")],
        "skipped files are never announced"
    );
    let objects: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM files WHERE watch_id = $1 AND status = 'skipped' \
         AND object_key IS NULL",
    )
    .bind(watch_id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        objects, 3,
        "skipped rows keep no object and are not re-ingested"
    );

    // A blanket retry of the failures leaves the baseline alone ...
    let dry = ctl.run(&["files", "retry", "--dry-run", "--json"]).await;
    assert!(dry.success(), "{}", dry.stderr);
    let dry: serde_json::Value = serde_json::from_str(&dry.stdout).unwrap();
    assert_eq!(dry["requeued"], 0, "{dry}");
    // ... a named skipped file is taken on demand.
    let old1: i64 = sqlx::query_scalar("SELECT id FROM files WHERE path = $1")
        .bind(path("drop/old1.csv"))
        .fetch_one(&db)
        .await
        .unwrap();
    let out = ctl.run(&["files", "retry", &old1.to_string()]).await;
    assert!(out.success(), "{}", out.stderr);
    f.wait_status(3, "processed", WAIT).await;
    assert_eq!(f.stored("old1.csv").await, b"handled by the old script");
    let listed = ctl
        .run(&["files", "list", "--status", "skipped", "--json"])
        .await;
    assert!(listed.success(), "{}", listed.stderr);
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    let old2 = path("drop/old2.csv");
    let old_growing = path("drop/growing.csv");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed.contains(&old2.as_str()) && listed.contains(&old_growing.as_str()),
        "{listed:?}"
    );
}

fn entry(path: &str, size: u64) -> proto::RemoteEntry {
    proto::RemoteEntry {
        path: path.into(),
        size,
        mtime_unix: 1_700_000_000,
    }
}

/// Acknowledged discovery batch ids among `messages`.
fn acks(messages: &[CBody]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|m| match m {
            CBody::DiscoveryAck(a) => Some(a.batch_id),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn ordinary_discoveries_wait_for_the_baseline_and_a_late_baseline_records_nothing() {
    let mut s = Stack::new().await;
    let server_id = s.add_server(s.server_req("acme")).await;
    s.sshd.mkdir("in");
    let dir = s.sshd.remote_path("in");
    let watch_id = s
        .admin
        .add_watch(proto::AddWatchRequest {
            server_id,
            directory: dir.clone(),
            poll_interval_secs: 1,
            bucket: "baseline".into(),
            skip_existing: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let db = s.db.pool().clone();
    let (mut agent, spec) = s.rogue_poller("scout", watch_id).await;
    assert!(
        spec.baseline,
        "the assignment asks for a baseline: {spec:?}"
    );
    let batch = |id: u64, entries, baseline, complete| {
        Body::Discovery(proto::DiscoveryBatch {
            server_id,
            watch_id,
            entries,
            batch_id: id,
            baseline,
            baseline_complete: complete,
        })
    };
    let a = format!("{dir}/a.csv");
    let b = format!("{dir}/b.csv");
    let c = format!("{dir}/c.csv");
    let d = format!("{dir}/d.csv");

    // An ordinary batch before the baseline: not recorded, not acknowledged.
    agent.send(batch(1, vec![entry(&a, 1)], false, false)).await;
    agent.barrier(&db, "scout").await;
    assert!(rows(&db, watch_id).await.is_empty());
    // The baseline in two parts; only the last one ends it.
    agent.send(batch(2, vec![entry(&b, 2)], true, false)).await;
    agent.barrier(&db, "scout").await;
    assert!(baseline_pending(&db, watch_id).await);
    agent.send(batch(3, vec![entry(&c, 3)], true, true)).await;
    agent.barrier(&db, "scout").await;
    assert!(!baseline_pending(&db, watch_id).await);
    // The held batch again (as the agent resends it), now with b: a is new,
    // b keeps its skipped row. A late baseline records nothing.
    agent
        .send(batch(1, vec![entry(&a, 1), entry(&b, 2)], false, false))
        .await;
    agent.send(batch(4, vec![entry(&d, 4)], true, true)).await;
    agent.barrier(&db, "scout").await;
    assert_eq!(
        rows(&db, watch_id).await,
        [
            (a.clone(), "new".to_string()),
            (b.clone(), "skipped".to_string()),
            (c.clone(), "skipped".to_string()),
        ]
    );
    let (messages, end) = agent.collect(Duration::from_secs(1)).await;
    assert!(end.is_none(), "{end:?}");
    let mut acked = acks(&messages);
    acked.sort_unstable();
    // Batch 1 is acknowledged once: for its second delivery.
    assert_eq!(acked, [1, 2, 3, 4], "{messages:?}");
}
