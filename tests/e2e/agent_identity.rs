//! One agent name, one live stream, across coordinators; and revocation of an
//! agent certificate. The attacker holds a valid agent certificate
//! ([`ferry_tests::RogueAgent`]); the coordinators share one database.

use std::time::Duration;

use ferry_tests::{AgentOptions, Coordinator, RogueAgent, eventually};
use serde_json::Value;
use tonic::Code;

use crate::stack::{Stack, WAIT};

#[tokio::test]
async fn a_second_stream_with_the_same_agent_name_closes_the_first_on_any_coordinator() {
    let s = Stack::new().await;
    let other = Coordinator::start(&s.db, &s.pki).await;
    let cert = s.pki.agent("twin");

    // Same coordinator: the newer stream wins at once.
    let mut first = RogueAgent::connect(&s.coord.endpoint(), &cert, "")
        .await
        .expect("first stream");
    let mut second = RogueAgent::connect(&s.coord.endpoint(), &cert, "")
        .await
        .expect("second stream");
    let (_, end) = first.collect(WAIT).await;
    let end = end.expect("the older stream was not closed");
    assert_eq!(end.code(), Code::Aborted, "{}", end.message());
    assert!(end.message().contains("newer stream"), "{}", end.message());

    // Another coordinator: the older stream is closed by its own coordinator
    // (which learns from the database), without the agent saying anything.
    let mut third = RogueAgent::connect(&other.endpoint(), &cert, "")
        .await
        .expect("third stream, on the other coordinator");
    let (_, end) = second.collect(WAIT).await;
    let end = end.expect("the stream on the first coordinator was not closed");
    assert_eq!(end.code(), Code::Aborted, "{}", end.message());
    assert!(end.message().contains("newer stream"), "{}", end.message());
    // The newest stays up.
    let (_, end) = third.collect(Duration::from_secs(5)).await;
    assert!(end.is_none(), "the newest stream ended: {end:?}");
}

#[tokio::test]
async fn a_revoked_agent_is_cut_off_everywhere_and_its_servers_move_on() {
    let mut s = Stack::new().await;
    let other = Coordinator::start(&s.db, &s.pki).await;
    let id = s.add_server(s.server_req("rev")).await;
    s.add_watch(id, "rev", "*").await;
    let ctl = s.coord.ctl(&s.pki.admin("alice"));

    // The agent to revoke holds its stream on the *other* coordinator.
    let mut leaked = RogueAgent::connect(&other.endpoint(), &s.pki.agent("leaked"), "")
        .await
        .expect("leaked agent connects");
    let (messages, _) = leaked.collect(Duration::from_secs(5)).await;
    assert!(
        messages
            .iter()
            .any(|m| matches!(m, ferry_proto::coordinator_message::Body::PollAssignment(_))),
        "the only agent of the site got no poll assignment: {messages:?}"
    );

    let out = ctl.json(&["--json", "agents", "revoke", "leaked"]).await;
    assert!(!out["revoked_at"].is_null(), "{out}");
    assert_eq!(out["revoked_by"], "admin:alice");

    // Its live stream on the other coordinator is closed within seconds.
    let (_, end) = leaked.collect(WAIT).await;
    let end = end.expect("the revoked agent's stream stayed open");
    assert_eq!(end.code(), Code::PermissionDenied, "{}", end.message());
    assert!(end.message().contains("revoked"), "{}", end.message());
    // Connecting again is refused, on either coordinator.
    for endpoint in [s.coord.endpoint(), other.endpoint()] {
        let err = RogueAgent::connect(&endpoint, &s.pki.agent("leaked"), "")
            .await
            .err()
            .expect("a revoked agent connected again");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    }
    // Its server goes to another agent of the site.
    let _spare = s.agent("spare", "default").await;
    eventually("the server polled by the spare agent", WAIT, || async {
        let poller: Option<String> =
            sqlx::query_scalar("SELECT poller_agent FROM servers WHERE id = $1")
                .bind(id)
                .fetch_one(s.db.pool())
                .await
                .unwrap();
        (poller.as_deref() == Some("default/spare")).then_some(())
    })
    .await;
    let listed = ctl.json(&["--json", "agents"]).await;
    let leaked_row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "leaked")
        .cloned()
        .unwrap_or(Value::Null);
    assert!(!leaked_row["revoked_at"].is_null(), "{listed}");

    // An agent that never connected can be revoked ahead of time, named
    // with its site (a bare name names no known agent); undo lifts it.
    let bare = ctl.run(&["agents", "revoke", "stolen"]).await;
    assert!(!bare.success());
    assert!(bare.stderr.contains("SITE/stolen"), "{}", bare.stderr);
    ctl.json(&["--json", "agents", "revoke", "default/stolen"])
        .await;
    let err = RogueAgent::connect(&s.coord.endpoint(), &s.pki.agent("stolen"), "")
        .await
        .err()
        .expect("a pre-emptively revoked agent connected");
    assert_eq!(err.code(), Code::PermissionDenied);
    ctl.json(&["--json", "agents", "revoke", "stolen", "--undo"])
        .await;
    RogueAgent::connect(&s.coord.endpoint(), &s.pki.agent("stolen"), "")
        .await
        .expect("connects again after the revocation was lifted");
}

#[tokio::test]
async fn moving_a_server_to_another_site_revokes_the_old_sites_poll_lease_at_once() {
    use ferry_proto::coordinator_message::Body as CBody;

    let mut s = Stack::new().await;
    let mut req = s.server_req("mover");
    req.site = "old".into();
    let id = s.add_server(req).await;
    s.add_watch(id, "mover", "*").await;
    let mut old = RogueAgent::connect(&s.coord.endpoint(), &s.pki.agent_of("old-agent", "old"), "")
        .await
        .expect("old site's agent connects");
    let (messages, _) = old.collect(Duration::from_secs(5)).await;
    assert!(
        messages
            .iter()
            .any(|m| matches!(m, CBody::PollAssignment(_))),
        "the old site's agent was not assigned the server: {messages:?}"
    );

    s.admin
        .update_server(ferry_proto::UpdateServerRequest {
            id,
            site: Some("new".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let poller: Option<String> =
        sqlx::query_scalar("SELECT poller_agent FROM servers WHERE id = $1")
            .bind(id)
            .fetch_one(s.db.pool())
            .await
            .unwrap();
    assert_eq!(
        poller, None,
        "the old site's agent still holds the poll lease"
    );
    // The old agent is told to stop and never gets the server (or its
    // credentials) again.
    let (messages, _) = old.collect(Duration::from_secs(8)).await;
    assert!(
        messages
            .iter()
            .any(|m| matches!(m, CBody::PollRevocation(r) if r.server_id == id)),
        "no revocation after the site change: {messages:?}"
    );
    assert!(
        !messages
            .iter()
            .any(|m| matches!(m, CBody::PollAssignment(_))),
        "the old site's agent got an assignment after the site change: {messages:?}"
    );
}

#[tokio::test]
async fn an_agent_started_without_ferry_site_serves_its_certificates_site() {
    let mut s = Stack::new().await;
    let mut req = s.server_req("corp-sftp");
    req.site = "corp".into();
    let id = s.add_server(req).await;
    s.add_watch(id, "corp", "*").await;
    // The real agent binary with a certificate of site corp and no FERRY_SITE.
    let _agent = s
        .agent_with(
            "a1",
            AgentOptions {
                site: "corp".into(),
                check_site: false,
                capacity: 0,
                ..Default::default()
            },
        )
        .await;
    s.wait_poller(id, "the corp agent polls its site's server", |p| {
        p == "corp/a1"
    })
    .await;
}
