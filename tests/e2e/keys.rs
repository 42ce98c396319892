//! Object keys never silently replace an announced object: a replaced file
//! lands beside its earlier version, and watches whose keys or trees could
//! collide (overlapping watches, move targets inside a watched tree, templates
//! without `{version}` or `{dir}`) are rejected at the API with the field named.

use std::time::{Duration, SystemTime};

use ferry_proto as proto;
use ferry_tests::{AgentOptions, AmqpQueue, S3Server, amqp_url, eventually, unique_exchange};
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic_types::StatusExt;

use crate::stack::{Stack, WAIT};

const BUCKET: &str = "ferry-test";

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn processed(s: &Stack) -> usize {
    s.files()
        .await
        .iter()
        .filter(|(_, _, st)| st == "processed")
        .count()
}

#[tokio::test]
async fn a_replaced_file_lands_beside_its_first_version_with_the_default_template() {
    let s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    let exchange = unique_exchange();
    let mut queue = AmqpQueue::declare(&exchange).await;
    let url = amqp_url();
    let mut s = Stack::with_coordinator_env(&[
        ("FERRY_AMQP_URL", url.as_str()),
        ("FERRY_AMQP_EXCHANGE", exchange.as_str()),
        ("FERRY_AMQP_ROUTING_KEY", "ferry.{server}"),
    ])
    .await;
    let id = s.add_server(s.server_req("replaced")).await;
    s.add_watch(id, "in", "").await;
    let _agent = s
        .agent_with(
            "a1",
            AgentOptions {
                capacity: 2,
                env: s3.env(),
                ..Default::default()
            },
        )
        .await;

    let v1 = b"version one".to_vec();
    s.sshd.write_file("in/report.csv", &v1);
    s.sshd.set_mtime(
        "in/report.csv",
        SystemTime::now() - Duration::from_secs(3600),
    );
    eventually("v1 processed", WAIT, || async {
        (processed(&s).await >= 1).then_some(())
    })
    .await;
    let v2 = b"version two, longer".to_vec();
    s.sshd.write_file("in/report.csv", &v2);
    s.sshd.set_mtime(
        "in/report.csv",
        SystemTime::now() - Duration::from_secs(1800),
    );
    eventually("v2 processed", WAIT, || async {
        (processed(&s).await >= 2).then_some(())
    })
    .await;

    let mut msgs = Vec::new();
    while msgs.len() < 2 {
        let m = queue
            .next_message(WAIT)
            .await
            .expect("one announcement per version");
        msgs.push(m.json());
    }
    let keys: Vec<String> = msgs
        .iter()
        .map(|b| b["key"].as_str().unwrap().to_string())
        .collect();
    assert_ne!(keys[0], keys[1], "each version has its own key");
    let mut listed = s3.list_keys(BUCKET).await;
    listed.sort();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(listed, want, "both versions are in the bucket");
    let mut shas: Vec<String> = Vec::new();
    for body in &msgs {
        let key = body["key"].as_str().unwrap();
        assert!(key.ends_with("/report.csv"), "{key} keeps the file name");
        let stored = s3.get_object(BUCKET, key).await;
        assert_eq!(
            sha256_hex(&stored),
            body["sha256"].as_str().unwrap(),
            "the object at {key} is the one announced"
        );
        shas.push(sha256_hex(&stored));
    }
    shas.sort();
    let mut expected = vec![sha256_hex(&v1), sha256_hex(&v2)];
    expected.sort();
    assert_eq!(shas, expected);
}

/// INVALID_ARGUMENT naming `field` in the message and the BadRequest detail.
fn assert_bad_request(err: &tonic::Status, field: &str) {
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains(field),
        "message {:?} should name {field}",
        err.message()
    );
    let details = err
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest details on {:?}", err.message()));
    let fields: Vec<&str> = details
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, vec![field], "violations of {:?}", err.message());
}

fn move_to(directory: &str) -> proto::PostAction {
    proto::PostAction {
        action: Some(proto::post_action::Action::MoveTo(
            proto::post_action::MoveTo {
                directory: directory.into(),
            },
        )),
    }
}

async fn watch_count(s: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM watches")
        .fetch_one(s.db.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn watches_that_could_collide_are_rejected_with_the_field_named() {
    let mut s = Stack::new().await;
    let id = s.add_server(s.server_req("collide")).await;
    let other = s.add_server(s.server_req("elsewhere")).await;
    let base = proto::AddWatchRequest {
        server_id: id,
        directory: "/data/in".into(),
        glob: "*.csv".into(),
        recursive: true,
        bucket: BUCKET.into(),
        ..Default::default()
    };
    let first = s.admin.add_watch(base.clone()).await.unwrap().into_inner();
    assert!(first.key_template.contains("{version}"), "{first:?}");

    type Edit = Box<dyn Fn(&mut proto::AddWatchRequest)>;
    let cases: Vec<(&str, Edit)> = vec![
        // The same directory again, and one inside the recursive tree.
        ("directory", Box::new(|_| {})),
        (
            "directory",
            Box::new(|r| {
                r.directory = "/data/in/sub".into();
                r.recursive = false;
            }),
        ),
        // A recursive watch above the existing one.
        ("directory", Box::new(|r| r.directory = "/data".into())),
        // Files moved into a watched tree would be ingested again.
        (
            "post_action",
            Box::new(|r| {
                r.directory = "/data/out".into();
                r.post_action = Some(move_to("/data/in/done"));
            }),
        ),
        (
            "post_action",
            Box::new(|r| {
                r.directory = "/data/out".into();
                r.post_action = Some(move_to("/data/out/archive"));
            }),
        ),
        // Keys: a/x.csv and b/x.csv, or two versions, on one key.
        (
            "key_template",
            Box::new(|r| {
                r.directory = "/data/out".into();
                r.key_template = "{server}/{version}/{name}".into();
            }),
        ),
        (
            "key_template",
            Box::new(|r| {
                r.directory = "/data/out".into();
                r.key_template = "{server}/{path}".into();
            }),
        ),
    ];
    for (field, edit) in &cases {
        let mut req = base.clone();
        edit(&mut req);
        let err = s
            .admin
            .add_watch(req.clone())
            .await
            .expect_err(&format!("{req:?} must be rejected"));
        assert_bad_request(&err, field);
    }
    assert_eq!(watch_count(&s).await, 1, "nothing written");

    // Disjoint globs in one directory, other servers and sibling trees are fine.
    for req in [
        proto::AddWatchRequest {
            glob: "*.xml".into(),
            ..base.clone()
        },
        proto::AddWatchRequest {
            server_id: other,
            ..base.clone()
        },
        proto::AddWatchRequest {
            directory: "/data/out".into(),
            post_action: Some(move_to("/data/archive")),
            ..base.clone()
        },
    ] {
        s.admin.add_watch(req).await.unwrap();
    }

    // An update is checked against the server's other watches too.
    let err = s
        .admin
        .update_watch(proto::UpdateWatchRequest {
            id: first.id,
            directory: Some("/data/out".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_request(&err, "directory");
    let err = s
        .admin
        .update_watch(proto::UpdateWatchRequest {
            id: first.id,
            key_template: Some("{name}/{version}".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_request(&err, "key_template");
    let (dir, template): (String, String) =
        sqlx::query_as("SELECT directory, key_template FROM watches WHERE id = $1")
            .bind(first.id)
            .fetch_one(s.db.pool())
            .await
            .unwrap();
    assert_eq!((dir.as_str(), template), ("/data/in", first.key_template));
    // The watch itself is not an overlap of its own update.
    s.admin
        .update_watch(proto::UpdateWatchRequest {
            id: first.id,
            poll_interval_secs: Some(5),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn migration_0009_gives_stored_templates_a_version_and_keeps_the_file_name() {
    let mut s = Stack::new().await;
    let id = s.add_server(s.server_req("legacy")).await;
    let legacy = [
        (
            "/a",
            false,
            "{server}/{path}",
            "{server}/{dir}/{version}/{name}",
        ),
        (
            "/b",
            true,
            "in/{date}/{name}",
            "in/{date}/{dir}/{version}/{name}",
        ),
        (
            "/c",
            true,
            "{server}/{dir}/{name}",
            "{server}/{dir}/{version}/{name}",
        ),
        (
            "/d",
            false,
            "x/{watch}/{version}/{name}",
            "x/{watch}/{version}/{name}",
        ),
    ];
    for (dir, recursive, template, _) in legacy {
        // Written as an older release stored them, bypassing today's checks.
        sqlx::query(
            "INSERT INTO watches (server_id, directory, recursive, bucket, key_template) \
             VALUES ($1, $2, $3, 'bucket-1', $4)",
        )
        .bind(id)
        .bind(dir)
        .bind(recursive)
        .bind(template)
        .execute(s.db.pool())
        .await
        .unwrap();
    }
    sqlx::raw_sql(include_str!("../../migrations/0009_key_versions.sql"))
        .execute(s.db.pool())
        .await
        .unwrap();
    for (dir, recursive, _, want) in legacy {
        let got: String =
            sqlx::query_scalar("SELECT key_template FROM watches WHERE directory = $1")
                .bind(dir)
                .fetch_one(s.db.pool())
                .await
                .unwrap();
        assert_eq!(got, want, "{dir}");
        ferry_common::keys::check_template(&got, recursive).unwrap();
    }
}
