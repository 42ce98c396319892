//! The trust boundary around agents (README "Security"): an agent
//! certificate gets exactly its own site's work. Each test plays an attacker
//! holding one valid agent certificate ([`ferry_tests::RogueAgent`]).

use std::time::Duration;

use ferry_common::domain::PostAction;
use ferry_proto::{
    self as proto, agent_message::Body, coordinator_message::Body as CBody, task_result::Outcome,
};
use ferry_tests::{AmqpQueue, RogueAgent, amqp_url, unique_exchange};
use sqlx::PgPool;
use tonic::Code;

use crate::stack::{Stack, WAIT};

/// Server names in the poll assignments among `messages`.
fn assigned_servers(messages: &[CBody]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            CBody::PollAssignment(a) => a.server.as_ref().map(|s| s.name.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn an_agent_certificate_of_one_site_never_gets_another_sites_servers() {
    let mut s = Stack::new().await;
    let mut corp = s.server_req("corp-sftp");
    corp.site = "corp".into();
    let corp_id = s.add_server(corp).await;
    s.add_watch(corp_id, "corp", "*").await;
    let mut dmz = s.server_req("dmz-sftp");
    dmz.site = "dmz".into();
    let dmz_id = s.add_server(dmz).await;
    s.add_watch(dmz_id, "dmz", "*").await;

    let endpoint = s.coord.endpoint();
    let dmz_cert = s.pki.agent_of("mallory", "dmz");

    // Claiming another site in the hello is refused outright, naming both sites.
    let err = RogueAgent::connect(&endpoint, &dmz_cert, "corp")
        .await
        .err()
        .expect("a dmz certificate claiming site corp was accepted");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("\"dmz\"") && err.message().contains("\"corp\""),
        "{}",
        err.message()
    );
    // So is a certificate without a site (it stands for `default`).
    let err = RogueAgent::connect(&endpoint, &s.pki.agent("legacy"), "corp")
        .await
        .err()
        .expect("a site-less certificate claiming site corp was accepted");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());

    // Saying nothing about the site, the certificate's site decides: dmz's
    // server is assigned (with its credentials), corp's never.
    let mut rogue = RogueAgent::connect(&endpoint, &dmz_cert, "")
        .await
        .expect("the dmz agent connects");
    let (messages, end) = rogue.collect(Duration::from_secs(8)).await;
    let servers = assigned_servers(&messages);
    assert!(end.is_none(), "stream ended: {end:?}");
    assert!(
        servers.contains(&"dmz-sftp".to_string()),
        "the dmz agent was not given its own site's server: {servers:?}"
    );
    assert!(
        !servers.contains(&"corp-sftp".to_string()),
        "the dmz agent was given corp's server: {servers:?}"
    );
}

/// A stack whose coordinator publishes to a fresh AMQP exchange (so files can
/// become `processed` and get their post-action), with one server `acme`
/// (site `default`) and a watch on `in/*.csv` whose post-action is `delete`.
pub(crate) struct Trust {
    pub s: Stack,
    pub queue: AmqpQueue,
    pub server_id: i64,
    pub watch_id: i64,
    /// The watch's remote directory.
    pub dir: String,
}

pub(crate) async fn trust_stack() -> Trust {
    trust_stack_with(&[]).await
}

/// [`trust_stack`] with extra coordinator environment variables.
pub(crate) async fn trust_stack_with(extra: &[(&str, &str)]) -> Trust {
    let exchange = unique_exchange();
    let queue = AmqpQueue::declare(&exchange).await;
    let url = amqp_url();
    let mut env = vec![
        ("FERRY_AMQP_URL", url.as_str()),
        ("FERRY_AMQP_EXCHANGE", exchange.as_str()),
        ("FERRY_AMQP_ROUTING_KEY", "ferry.{server}"),
        ("FERRY_TASK_LEASE_SECS", "300"),
    ];
    env.extend_from_slice(extra);
    let mut s = Stack::with_coordinator_env(&env).await;
    let server_id = s.add_server(s.server_req("acme")).await;
    s.sshd.mkdir("in");
    let dir = s.sshd.remote_path("in");
    let watch_id = s
        .admin
        .add_watch(proto::AddWatchRequest {
            server_id,
            directory: dir.clone(),
            glob: "*.csv".into(),
            poll_interval_secs: 1,
            bucket: BUCKET.into(),
            key_template: "{server}/{dir}/{version}/{name}".into(),
            post_action: Some((&PostAction::Delete).into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    Trust {
        s,
        queue,
        server_id,
        watch_id,
        dir,
    }
}

const BUCKET: &str = "ferry-trust";

/// The file row as the trust tests compare it: status, lease owner, lease
/// expiry (as text, exact), fencing token, post-action result, history length.
pub(crate) type Snapshot = (
    String,
    Option<String>,
    Option<String>,
    i64,
    Option<String>,
    i64,
);

pub(crate) async fn snapshot(db: &PgPool, file_id: i64) -> Snapshot {
    sqlx::query_as(
        "SELECT status, lease_owner, lease_expires_at::text, fencing_token, post_action_result, \
                (SELECT count(*) FROM file_events WHERE file_id = f.id) \
         FROM files f WHERE id = $1",
    )
    .bind(file_id)
    .fetch_one(db)
    .await
    .unwrap()
}

/// Connects `name` (site `default`) and makes it the poll-lease holder: it
/// waits for its poll assignment of `server_id`.
pub(crate) async fn poller(t: &Trust, name: &str, capacity: u32) -> RogueAgent {
    let certs = t.s.pki.agent(name);
    let mut rogue = RogueAgent::connect_with_capacity(&t.s.coord.endpoint(), &certs, "", capacity)
        .await
        .expect("the rogue agent connects");
    let server_id = t.server_id;
    rogue
        .wait_for("poll assignment", WAIT, |m| match m {
            CBody::PollAssignment(a) => a
                .server
                .as_ref()
                .is_some_and(|s| s.server_id == server_id)
                .then_some(()),
            _ => None,
        })
        .await;
    rogue
}

pub(crate) fn entry(path: &str, size: u64, mtime_unix: i64) -> proto::RemoteEntry {
    proto::RemoteEntry {
        path: path.into(),
        size,
        mtime_unix,
    }
}

pub(crate) async fn discover(t: &Trust, rogue: &RogueAgent, entries: Vec<proto::RemoteEntry>) {
    rogue
        .send(Body::Discovery(proto::DiscoveryBatch {
            server_id: t.server_id,
            watch_id: t.watch_id,
            entries,
            batch_id: 1,
            ..Default::default()
        }))
        .await;
}

/// `name` (site `default`) polls the server, reports one file `a.csv` of
/// 10 bytes and, as the only agent with capacity, is assigned its transfer.
pub(crate) async fn leased_file(t: &Trust, name: &str) -> (RogueAgent, proto::TaskAssignment) {
    let mut rogue = poller(t, name, 4).await;
    discover(
        t,
        &rogue,
        vec![entry(&format!("{}/a.csv", t.dir), 10, 1_700_000_000)],
    )
    .await;
    let task = next_task(&mut rogue).await;
    (rogue, task)
}

pub(crate) async fn next_task(rogue: &mut RogueAgent) -> proto::TaskAssignment {
    rogue
        .wait_for("task assignment", WAIT, |m| match m {
            CBody::TaskAssignment(a) => Some(a.clone()),
            _ => None,
        })
        .await
}

pub(crate) fn result(task: &proto::TaskAssignment, token: u64, outcome: Outcome) -> Body {
    Body::TaskResult(proto::TaskResult {
        file_id: task.file_id,
        fencing_token: token,
        outcome: Some(outcome),
    })
}

pub(crate) fn success(bucket: &str, key: &str, size: u64) -> Outcome {
    Outcome::Success(proto::TaskSuccess {
        size,
        sha256: "ab".repeat(32),
        etag: "etag-1".into(),
        bucket: bucket.into(),
        key: key.into(),
        ..Default::default()
    })
}

pub(crate) fn failure(kind: proto::FailureKind) -> Outcome {
    Outcome::Failure(proto::TaskFailure {
        kind: kind as i32,
        message: "mallory says so".into(),
    })
}

#[tokio::test]
async fn another_agents_progress_results_and_post_action_results_change_nothing() {
    let t = trust_stack().await;
    let db = t.s.db.pool().clone();
    let endpoint = t.s.coord.endpoint();
    let (mut victim, task) = leased_file(&t, "victim").await;
    let before = snapshot(&db, task.file_id).await;
    assert_eq!(
        (before.0.as_str(), before.1.as_deref()),
        ("in_progress", Some("default/victim"))
    );

    // Mallory, another agent of the same site (capacity 0: no work of its
    // own), knows the file id and token, and guesses other tokens.
    let mallory_certs = t.s.pki.agent("mallory");
    let mallory = RogueAgent::connect_with_capacity(&endpoint, &mallory_certs, "", 0)
        .await
        .expect("mallory connects");
    let token = task.fencing_token;
    mallory
        .send(Body::TaskProgress(proto::TaskProgress {
            file_id: task.file_id,
            fencing_token: token,
            bytes_done: 5,
        }))
        .await;
    mallory
        .send(result(&task, token, failure(proto::FailureKind::Lost)))
        .await;
    for guess in 0..5 {
        mallory
            .send(result(&task, guess, failure(proto::FailureKind::Permanent)))
            .await;
    }
    mallory
        .send(result(&task, token, success(&task.bucket, &task.key, 10)))
        .await;
    mallory
        .send(Body::PostActionResult(proto::PostActionResult {
            file_id: task.file_id,
            ok: true,
            message: String::new(),
            refused: false,
        }))
        .await;
    mallory.barrier(&db, "mallory").await;
    assert_eq!(
        snapshot(&db, task.file_id).await,
        before,
        "another agent's progress or results changed the victim's file"
    );
    drop(mallory);

    // The victim's own result counts; the file is announced, `processed`,
    // and its post-action goes to the victim.
    victim
        .send(result(&task, token, success(&task.bucket, &task.key, 10)))
        .await;
    let file_id = task.file_id;
    victim
        .wait_for("post-action request", WAIT, |m| match m {
            CBody::PostAction(p) => (p.file_id == file_id).then_some(()),
            _ => None,
        })
        .await;
    let processed = snapshot(&db, file_id).await;
    assert_eq!(
        (processed.0.as_str(), processed.4.as_deref()),
        ("processed", None)
    );

    // Mallory's answer to a post-action it was never sent is not recorded.
    let mallory = RogueAgent::connect_with_capacity(&endpoint, &mallory_certs, "", 0)
        .await
        .expect("mallory reconnects");
    mallory
        .send(Body::PostActionResult(proto::PostActionResult {
            file_id,
            ok: true,
            message: String::new(),
            refused: false,
        }))
        .await;
    mallory.barrier(&db, "mallory").await;
    assert_eq!(
        snapshot(&db, file_id).await,
        processed,
        "a post-action result from an agent it was not sent to was recorded"
    );

    // The victim's answer is.
    victim
        .send(Body::PostActionResult(proto::PostActionResult {
            file_id,
            ok: true,
            message: String::new(),
            refused: false,
        }))
        .await;
    victim.barrier(&db, "victim").await;
    assert_eq!(snapshot(&db, file_id).await.4.as_deref(), Some("done"));
}

#[tokio::test]
async fn a_success_report_naming_another_location_is_a_failed_attempt_and_never_announced() {
    let mut t = trust_stack().await;
    let db = t.s.db.pool().clone();
    let mut rogue = poller(&t, "mallory", 4).await;
    discover(
        &t,
        &rogue,
        vec![
            entry(&format!("{}/a.csv", t.dir), 10, 1_700_000_000),
            entry(&format!("{}/b.csv", t.dir), 20, 1_700_000_000),
        ],
    )
    .await;
    let first = next_task(&mut rogue).await;
    let second = next_task(&mut rogue).await;
    let (a, b) = if first.path.ends_with("a.csv") {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(
        (a.bucket.as_str(), a.key.as_str()),
        (BUCKET, "acme/1700000000-10/a.csv")
    );

    // b: "stored" somewhere else entirely; a: stored where it was told.
    rogue
        .send(result(
            &b,
            b.fencing_token,
            success("evil-bucket", "stolen/b.csv", 20),
        ))
        .await;
    rogue
        .send(result(&a, a.fencing_token, success(&a.bucket, &a.key, 10)))
        .await;
    rogue.barrier(&db, "mallory").await;

    let (status, bucket, key, error): (String, Option<String>, Option<String>, Option<String>) =
        sqlx::query_as("SELECT status, bucket, object_key, last_error FROM files WHERE id = $1")
            .bind(b.file_id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), bucket, key),
        ("error", None, None),
        "a report naming another location became the file's location"
    );
    let error = error.unwrap_or_default();
    assert!(
        error.contains("evil-bucket")
            && error.contains("stolen/b.csv")
            && error.contains("acme/1700000000-20/b.csv"),
        "the error does not name the reported and the assigned location: {error}"
    );
    let outboxed: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE file_id = $1")
        .bind(b.file_id)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        outboxed, 0,
        "an announcement of the reported location was queued"
    );

    // The only announcement is a's, at its assigned location.
    let message = t.queue.next_message(WAIT).await.expect("a's announcement");
    let body = message.json();
    assert_eq!(body["file_id"], a.file_id);
    assert_eq!(
        (body["bucket"].as_str(), body["key"].as_str()),
        (Some(BUCKET), Some("acme/1700000000-10/a.csv"))
    );
    let more = t.queue.drain_for(Duration::from_secs(2)).await;
    assert!(
        more.iter()
            .all(|m| !String::from_utf8_lossy(&m.body).contains("evil-bucket")),
        "an announcement names the reported location"
    );
}

#[tokio::test]
async fn discovery_counts_only_inside_the_watch_and_only_from_the_poll_lease_holder() {
    let t = trust_stack().await;
    let db = t.s.db.pool().clone();
    let rogue = poller(&t, "mallory", 0).await;
    let dir = &t.dir;
    let ok_mtime = 1_700_000_000;
    discover(
        &t,
        &rogue,
        vec![
            entry("/etc/passwd.csv", 10, ok_mtime),
            entry(&format!("{dir}/notes.txt"), 10, ok_mtime),
            entry(&format!("{dir}/sub/deep.csv"), 10, ok_mtime),
            entry(&format!("{dir}-other/x.csv"), 10, ok_mtime),
            entry(&format!("{dir}/a\0b.csv"), 10, ok_mtime),
            entry(&format!("{dir}/../etc/x.csv"), 10, ok_mtime),
            entry(&format!("{dir}/huge.csv"), u64::MAX, ok_mtime),
            entry(&format!("{dir}/old.csv"), 10, -5),
            entry(&format!("{dir}/future.csv"), 10, i64::MAX),
            entry(&format!("{dir}/ok.csv"), 10, ok_mtime),
        ],
    )
    .await;
    rogue.barrier(&db, "mallory").await;

    // An agent without the poll lease reports a file of the same watch.
    let other =
        RogueAgent::connect_with_capacity(&t.s.coord.endpoint(), &t.s.pki.agent("eve"), "", 0)
            .await
            .expect("eve connects");
    discover(
        &t,
        &other,
        vec![entry(&format!("{dir}/eve.csv"), 10, ok_mtime)],
    )
    .await;
    other.barrier(&db, "eve").await;

    let paths: Vec<String> = sqlx::query_scalar("SELECT path FROM files ORDER BY path")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(paths, vec![format!("{dir}/ok.csv")]);
    let log = without_ansi(&t.s.coord.log_tail(400));
    assert!(
        log.lines().any(|l| l.contains("agent fault")
            && l.contains("agent=default/mallory")
            && l.contains("rejected=9")
            && l.contains("example=\"/etc/passwd.csv\"")),
        "the rejected entries are not logged as the agent's fault:\n{log}"
    );
}

/// `text` without ANSI colour sequences (`ESC [ ... m`).
pub(crate) fn without_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn the_same_agent_name_at_two_sites_is_two_agents() {
    let t = trust_stack().await;
    let db = t.s.db.pool().clone();
    let endpoint = t.s.coord.endpoint();
    // `agent-1` of the site `default` polls the server and runs its transfer.
    let (mut here, task) = leased_file(&t, "agent-1").await;
    let before = snapshot(&db, task.file_id).await;
    assert_eq!(before.1.as_deref(), Some("default/agent-1"));

    // `agent-1` of site-b, connected at the same time, is another agent:
    // neither stream closes the other ...
    let twin_certs = t.s.pki.agent_of("agent-1", "site-b");
    let mut twin = RogueAgent::connect_with_capacity(&endpoint, &twin_certs, "", 0)
        .await
        .expect("site-b's agent-1 connects");
    // ... and what it says about the other's transfer changes nothing.
    let token = task.fencing_token;
    twin.send(Body::TaskProgress(proto::TaskProgress {
        file_id: task.file_id,
        fencing_token: token,
        bytes_done: 5,
    }))
    .await;
    twin.send(result(&task, token, success(&task.bucket, &task.key, 10)))
        .await;
    twin.send(Body::PostActionResult(proto::PostActionResult {
        file_id: task.file_id,
        ok: true,
        message: String::new(),
        refused: false,
    }))
    .await;
    twin.barrier(&db, "site-b/agent-1").await;
    assert_eq!(
        snapshot(&db, task.file_id).await,
        before,
        "site-b's agent-1 changed the transfer leased to default's agent-1"
    );
    let (_, end) = here.collect(Duration::from_secs(6)).await;
    assert!(
        end.is_none(),
        "default/agent-1's stream was closed: {end:?}"
    );
    let (_, end) = twin.collect(Duration::from_secs(1)).await;
    assert!(end.is_none(), "site-b/agent-1's stream was closed: {end:?}");

    // Both are listed, each with its own site.
    let ctl = t.s.coord.ctl(&t.s.pki.admin("alice"));
    let listed = ctl.json(&["--json", "agents"]).await;
    let mut ids: Vec<(String, String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_string(),
                a["site"].as_str().unwrap().to_string(),
                a["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            ("default/agent-1".into(), "default".into(), "agent-1".into()),
            ("site-b/agent-1".into(), "site-b".into(), "agent-1".into()),
        ]
    );

    // A bare name that two sites have is refused as ambiguous; the site
    // names one, and revoking it leaves the other alone.
    for verb in ["revoke", "drain"] {
        let out = ctl.run(&["agents", verb, "agent-1"]).await;
        assert!(!out.success(), "agents {verb} agent-1 succeeded");
        assert!(
            out.stderr.contains("ambiguous") && out.stderr.contains("site-b"),
            "{}",
            out.stderr
        );
    }
    let out = ctl
        .json(&["--json", "agents", "revoke", "agent-1", "--site", "site-b"])
        .await;
    assert_eq!(out["id"], "site-b/agent-1");
    let (_, end) = twin.collect(WAIT).await;
    let end = end.expect("the revoked twin's stream stayed open");
    assert_eq!(end.code(), Code::PermissionDenied, "{}", end.message());
    let (_, end) = here.collect(Duration::from_secs(6)).await;
    assert!(
        end.is_none(),
        "revoking site-b's agent-1 closed default's: {end:?}"
    );
    assert_eq!(
        snapshot(&db, task.file_id).await.1.as_deref(),
        Some("default/agent-1")
    );
}
