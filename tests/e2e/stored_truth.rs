//! What is announced is what is stored: producers that keep mtime (`cp -p`,
//! `rsync -a`) can write different bytes with the same size and mtime, so
//! (path, size, mtime) does not name the bytes. Whatever they do, every
//! announcement's sha256 and size describe the bytes at its key, an
//! announced object is never overwritten, a second version's bytes are
//! stored under a key of their own (or the file fails visibly and stays on
//! its server), and the object metadata keeps the announcement id however
//! long the path is.

use std::time::{Duration, SystemTime};

use ferry_tests::{AmqpMessage, eventually};

use crate::flow::{BUCKET, Flow, flow, sha256_hex};
use crate::stack::WAIT;

/// `len` bytes that differ for each `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

impl Flow {
    /// (id, status, post_action_result, object_key) of every row, in id order.
    async fn versions(&self) -> Vec<(i64, String, Option<String>, Option<String>)> {
        sqlx::query_as("SELECT id, status, post_action_result, object_key FROM files ORDER BY id")
            .fetch_all(self.s.db.pool())
            .await
            .unwrap()
    }

    /// Checks every announcement against the bucket: the object at its key
    /// has exactly its size and sha256.
    async fn assert_announcements_true(&self, msgs: &[AmqpMessage]) {
        for m in msgs {
            let body = m.json();
            let key = body["key"].as_str().expect("announcement names a key");
            assert_eq!(body["bucket"].as_str(), Some(BUCKET), "{body}");
            let stored = self.s3.get_object(BUCKET, key).await;
            assert_eq!(
                body["sha256"].as_str(),
                Some(sha256_hex(&stored).as_str()),
                "announcement {} names sha256 {} but {key} holds other bytes",
                m.message_id.as_deref().unwrap_or("?"),
                body["sha256"]
            );
            assert_eq!(body["size"].as_u64(), Some(stored.len() as u64), "{body}");
        }
    }
}

/// A file is stored, announced and deleted; different bytes of the same
/// size are written with the same mtime. Afterwards the first object is
/// unchanged, every announcement is true, and the second version's bytes
/// are in the bucket under a key of their own (or the file failed visibly
/// and is still on the server).
async fn same_size_and_mtime_other_bytes(len: usize) {
    let mut f = flow().await;
    let id = f.s.add_server(f.s.server_req("keep-mtime")).await;
    f.watch(id, "in", "delete").await;
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let v1 = pattern(len, 1);
    let v2 = pattern(len, 2);
    assert_ne!(v1, v2);
    f.s.sshd.write_file("in/a.bin", &v1);
    f.s.sshd.set_mtime("in/a.bin", mtime);
    eventually("v1 stored, announced and deleted", WAIT, || async {
        let rows = f.versions().await;
        (rows.len() == 1 && rows[0].2.as_deref() == Some("done")).then_some(())
    })
    .await;
    let v1_key = f.versions().await[0].3.clone().expect("v1 has a key");
    assert!(!f.s.sshd.exists("in/a.bin"));

    // `cp -p`: other bytes, same size, same mtime.
    f.s.sshd.write_file("in/a.bin", &v2);
    f.s.sshd.set_mtime("in/a.bin", mtime);
    eventually(
        "v2 processed (post-action answered) or failed",
        WAIT,
        || async {
            let rows = f.versions().await;
            (rows.len() == 2
                && (rows[1].1 == "failed" || (rows[1].1 == "processed" && rows[1].2.is_some())))
            .then_some(())
        },
    )
    .await;
    let rows = f.versions().await;
    assert_eq!(
        rows[1].1, "processed",
        "the feed keeps flowing: v2 goes to a key of its own: {rows:?}"
    );
    let announced = if rows[1].1 == "processed" { 2 } else { 1 };
    let msgs = f.messages(announced).await;
    assert_eq!(msgs.len(), announced, "{msgs:?}");
    f.assert_announcements_true(&msgs).await;
    assert_eq!(
        f.s3.get_object(BUCKET, &v1_key).await,
        v1,
        "the object announced for v1 was overwritten"
    );
    if rows[1].1 == "processed" {
        let v2_key = rows[1].3.clone().expect("v2 has a key");
        assert_ne!(v2_key, v1_key, "v2 has a key of its own");
        assert_eq!(f.s3.get_object(BUCKET, &v2_key).await, v2);
        assert_eq!(rows[1].2.as_deref(), Some("done"), "{rows:?}");
        assert!(!f.s.sshd.exists("in/a.bin"));
    } else {
        assert_eq!(
            f.s.sshd.read_file("in/a.bin"),
            v2,
            "a version that was not stored must stay on its server: {rows:?}"
        );
    }
}

#[tokio::test]
async fn a_multipart_rewrite_with_the_same_mtime_gets_its_own_key() {
    same_size_and_mtime_other_bytes(9 * 1024 * 1024).await;
}

#[tokio::test]
async fn a_small_rewrite_with_the_same_mtime_never_overwrites_the_announced_object() {
    same_size_and_mtime_other_bytes(1024).await;
}

/// A watch directory of long non-ASCII segments: the encoded path fills
/// nearly all of the 2 KiB user-metadata budget, which used to crowd out
/// the announcement id.
#[tokio::test]
async fn a_long_non_ascii_path_keeps_the_announcement_id_on_the_object() {
    let mut f = flow().await;
    let server = "lp";
    let id = f.s.add_server(f.s.server_req(server)).await;
    // Percent-encoded, each "é" is six bytes of metadata value.
    let encoded_len = |p: &str| {
        p.bytes()
            .map(|b| {
                if (0x20..0x7f).contains(&b) && b != b'%' {
                    1
                } else {
                    3
                }
            })
            .sum::<usize>()
    };
    let name = "a.csv";
    let target = 1900 - server.len();
    let mut rel = "in".to_owned();
    loop {
        let path = f.s.sshd.remote_path(&format!("{rel}/{name}"));
        let left = target - encoded_len(&path);
        if left == 0 {
            break;
        }
        let segment = if left > 700 {
            "é".repeat(120)
        } else if left > 6 {
            format!(
                "{}{}",
                "é".repeat((left - 1) / 6),
                "x".repeat((left - 1) % 6)
            )
        } else {
            "x".repeat(left - 1)
        };
        rel = format!("{rel}/{segment}");
    }
    let path = f.s.sshd.remote_path(&format!("{rel}/{name}"));
    assert_eq!(encoded_len(&path), target);
    f.watch(id, &rel, "keep").await;
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    f.s.sshd.write_file(&format!("{rel}/{name}"), b"long path");
    f.wait_status(1, "processed", WAIT).await;
    let (key, announcement_id): (String, String) =
        sqlx::query_as("SELECT object_key, announcement_id::text FROM files")
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
    let metadata = head.metadata().cloned().unwrap_or_default();
    assert_eq!(
        metadata.get("ferry-announcement-id"),
        Some(&announcement_id),
        "object metadata: {metadata:?}"
    );
    assert_eq!(
        metadata.get("ferry-sha256").map(String::as_str),
        Some(sha256_hex(b"long path").as_str()),
        "{metadata:?}"
    );
    let msgs = f.messages(1).await;
    f.assert_announcements_true(&msgs).await;
}
