//! An agent that stops reading its stream must not stall the coordinator's
//! loops for every other agent: its queue fills, it is disconnected, and the
//! others carry on.

use std::time::Duration;

use ferry_proto as proto;
use ferry_tests::{AgentOptions, RogueAgent, S3Server, eventually};
use tonic::Code;

use crate::stack::{Stack, WAIT};

#[tokio::test]
async fn an_agent_that_stops_reading_does_not_stall_the_others() {
    let s3 = S3Server::start().await;
    s3.create_bucket("ferry-test").await;
    let mut s = Stack::with_coordinator_env(&[("FERRY_AGENT_SEND_QUEUE", "4")]).await;

    // A server of site "mute" with large poll assignments (40 watches with
    // long directory names: ~60 KB each), held by an agent that never reads.
    let mut req = s.server_req("big");
    req.site = "mute".into();
    let big = s.add_server(req).await;
    for i in 0..40 {
        let dir = format!("/w{i:02}/{}", vec!["d".repeat(200); 7].join("/"));
        s.admin
            .add_watch(proto::AddWatchRequest {
                server_id: big,
                directory: dir,
                poll_interval_secs: 60,
                bucket: "ferry-test".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let _mute = RogueAgent::connect_with_capacity(
        &s.coord.endpoint(),
        &s.pki.agent_of("mute", "mute"),
        "",
        0,
    )
    .await
    .expect("the mute agent connects");
    eventually("the mute agent polls big", WAIT, || async {
        let poller: Option<String> =
            sqlx::query_scalar("SELECT poller_agent FROM servers WHERE id = $1")
                .bind(big)
                .fetch_one(s.db.pool())
                .await
                .unwrap();
        (poller.as_deref() == Some("mute/mute")).then_some(())
    })
    .await;
    // Every change of the server re-sends its assignment to the mute agent,
    // which reads none of them: its HTTP/2 window and its queue fill up.
    for n in 0..16u32 {
        s.admin
            .update_server(proto::UpdateServerRequest {
                id: big,
                max_sessions: Some(2 + n % 2),
                ..Default::default()
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Another site's agent still gets its work.
    let mut req = s.server_req("other");
    req.site = "b".into();
    let other = s.add_server(req).await;
    s.add_watch(other, "b-in", "*").await;
    let _worker = s
        .agent_with(
            "worker",
            AgentOptions {
                site: "b".into(),
                env: s3.env(),
                ..Default::default()
            },
        )
        .await;
    s.sshd.write_file("b-in/report.csv", b"id\n1\n");
    eventually("the other site's file stored", WAIT, || async {
        let st: Option<String> =
            sqlx::query_scalar("SELECT status FROM files WHERE server_id = $1")
                .bind(other)
                .fetch_optional(s.db.pool())
                .await
                .unwrap();
        matches!(st.as_deref(), Some("uploaded" | "processed")).then_some(())
    })
    .await;

    // The mute agent was told why its stream ended, once it read again.
    let mut mute = _mute;
    let (_, end) = mute.collect(WAIT).await;
    let end = end.expect("the mute agent's stream was not closed");
    assert_eq!(end.code(), Code::ResourceExhausted, "{}", end.message());
}
