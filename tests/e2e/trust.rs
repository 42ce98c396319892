//! The trust boundary around agents (README "Security"): an agent
//! certificate gets exactly its own site's work. Each test plays an attacker
//! holding one valid agent certificate ([`ferry_tests::RogueAgent`]).

use std::time::Duration;

use ferry_proto::coordinator_message::Body as CBody;
use ferry_tests::RogueAgent;
use tonic::Code;

use crate::stack::Stack;

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
