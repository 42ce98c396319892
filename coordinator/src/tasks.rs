//! Background loops of a coordinator. The reconciler closes the gap between
//! intent in Postgres (servers, watches, leases) and what each connected agent
//! was told: it renews and claims poll leases and sends assignments and revocations.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_common::proto::coordinator_message::Body;
use ferry_common::proto::{self};
use tokio_util::sync::CancellationToken;

use crate::agents::{AgentStreams, Session};
use crate::polls;
use crate::state::Coordinator;

/// Rescan period: the truth when notifications are lost.
const RESCAN: Duration = Duration::from_secs(3);

pub async fn run_background(coord: Coordinator, agents: AgentStreams, cancel: CancellationToken) {
    let mut registry = coord.subscribe_registry();
    loop {
        if let Err(e) = reconcile_polls(&coord, &agents).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "poll reconciliation failed; retrying"
            );
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = registry.changed() => {}
            _ = agents.changed.notified() => {}
            _ = tokio::time::sleep(RESCAN) => {}
        }
    }
}

async fn reconcile_polls(coord: &Coordinator, agents: &AgentStreams) -> anyhow::Result<()> {
    let sessions = agents.snapshot();
    let names: Vec<String> = sessions.iter().map(|s| s.agent.clone()).collect();
    polls::renew(&coord.db, &coord.id, &names).await?;
    let mut by_site: BTreeMap<&str, Vec<&Session>> = BTreeMap::new();
    for s in &sessions {
        by_site.entry(s.site.as_str()).or_default().push(s);
    }
    for (site, members) in by_site {
        let share = polls::fair_share(&coord.db, site).await?;
        for s in members {
            polls::claim(&coord.db, &coord.id, &s.agent, site, share).await?;
        }
    }
    for s in &sessions {
        push_assignments(coord, s).await?;
    }
    Ok(())
}

/// Sends `s` the assignments it lacks or has in an old version, and revokes
/// the ones it no longer holds.
async fn push_assignments(coord: &Coordinator, s: &Session) -> anyhow::Result<()> {
    let desired = polls::desired(&coord.db, &coord.secrets, &coord.id, &s.agent).await?;
    let (to_send, to_revoke) = {
        let sent = s.sent_polls.lock().expect("sent_polls lock");
        let to_send: Vec<(i64, String, proto::PollAssignment)> = desired
            .into_iter()
            .filter(|(id, (version, _))| sent.get(id) != Some(version))
            .map(|(id, (version, a))| (id, version, a))
            .collect();
        let desired_ids: Vec<i64> = to_send.iter().map(|(id, ..)| *id).collect();
        let to_revoke: Vec<i64> = sent
            .keys()
            .copied()
            .filter(|id| !desired_ids.contains(id))
            .collect();
        (to_send, to_revoke)
    };
    // Servers still desired but unchanged are neither sent nor revoked.
    let still_held = polls::desired(&coord.db, &coord.secrets, &coord.id, &s.agent).await?;
    for id in to_revoke {
        if still_held.contains_key(&id) {
            continue;
        }
        if s.send(Body::PollRevocation(proto::PollRevocation {
            server_id: id,
            reason: "no longer assigned".into(),
        }))
        .await
        {
            s.sent_polls.lock().expect("sent_polls lock").remove(&id);
            tracing::info!(agent = %s.agent, server = id, "poll revoked");
        }
    }
    for (id, version, assignment) in to_send {
        let watches = assignment.watches.len();
        if s.send(Body::PollAssignment(assignment)).await {
            s.sent_polls
                .lock()
                .expect("sent_polls lock")
                .insert(id, version);
            tracing::info!(agent = %s.agent, server = id, watches, "poll assigned");
        }
    }
    Ok(())
}
