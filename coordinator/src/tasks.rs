//! Background loops of a coordinator, each closing a gap between intent in
//! Postgres and what agents were told:
//! - the poll reconciler closes streams that are superseded or revoked, then
//!   renews and claims poll leases and sends assignments;
//! - the scheduler hands due files to agents and reaps expired task leases,
//!   telling a reaped transfer's agent to stop (`TaskCancellation`);
//! - the post-action dispatcher asks agents to delete or move processed files.

use ferry_common::sync::lock;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_proto as proto;
use ferry_proto::coordinator_message::Body;
use tokio_util::sync::CancellationToken;

use crate::agents::{AgentStreams, Session};
use crate::post_actions::PostActions;
use crate::scheduler::Reaped;
use crate::state::Coordinator;
use crate::{polls, scheduler};

/// Rescan period: the truth when notifications are lost.
const RESCAN: Duration = Duration::from_secs(3);

pub(crate) async fn run_background(
    coord: Coordinator,
    agents: AgentStreams,
    cancel: CancellationToken,
) {
    tokio::join!(
        poll_loop(coord.clone(), agents.clone(), cancel.clone()),
        schedule_loop(coord, agents, cancel),
    );
}

async fn poll_loop(coord: Coordinator, agents: AgentStreams, cancel: CancellationToken) {
    let mut registry = coord.subscribe_registry();
    let mut agents_changed = agents.changed.subscribe();
    loop {
        // Superseded and revoked streams go first, so they get no assignments.
        if let Err(e) = agents.sweep().await {
            tracing::warn!(error = %e, "agent stream sweep failed; retrying");
        }
        if let Err(e) = reconcile_polls(&coord, &agents).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "poll reconciliation failed; retrying"
            );
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = registry.changed() => {}
            _ = agents_changed.changed() => {}
            _ = tokio::time::sleep(RESCAN) => {}
        }
    }
}

async fn schedule_loop(coord: Coordinator, agents: AgentStreams, cancel: CancellationToken) {
    let mut due = coord.subscribe_files_due();
    let mut agents_changed = agents.changed.subscribe();
    let mut post_actions = PostActions::default();
    let lease = agents.settings.lease;
    // Agents renew their leases through Postgres; while this coordinator
    // could not reach it (or before it ran), renewals may have been lost, so
    // leases are reaped only after one full lease period of a working
    // database: a transfer that kept running through an outage is not
    // taken away for want of renewals nobody could record.
    let mut reap_from = Instant::now() + lease;
    loop {
        let sessions = agents.snapshot();
        if Instant::now() >= reap_from {
            match scheduler::reap_expired(&coord.db, &coord.id, &agents.settings.retry, lease).await
            {
                Ok(reaped) if reaped.is_empty() => {}
                Ok(reaped) => {
                    crate::metrics::leases_expired(&reaped);
                    tracing::warn!(
                        files = reaped.len(),
                        "requeued transfers whose lease expired"
                    );
                    cancel_reaped(&agents, reaped).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease reaper failed");
                    reap_from = Instant::now() + lease;
                }
            }
        }
        let mut by_site: BTreeMap<String, Vec<Session>> = BTreeMap::new();
        for s in sessions.iter().cloned() {
            by_site.entry(s.site.clone()).or_default().push(s);
        }
        for (site, members) in &by_site {
            if let Err(e) = scheduler::schedule_site(
                &coord.db,
                &coord.secrets,
                &coord.id,
                site,
                members,
                agents.settings.lease,
                &agents.settings.retry,
            )
            .await
            {
                tracing::warn!(site = %site, error = format!("{e:#}"), "scheduling failed");
                if e.chain()
                    .any(|c| c.is::<sqlx::Error>() || c.is::<crate::error::StoreError>())
                {
                    reap_from = reap_from.max(Instant::now() + lease);
                }
            }
        }
        if let Err(e) = post_actions.dispatch(&coord, &sessions).await {
            tracing::warn!(error = format!("{e:#}"), "post-action dispatch failed");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = due.changed() => {}
            _ = agents_changed.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Tells the old owners of reaped transfers that hold a stream here to stop,
/// so a late agent does not keep uploading; its late result would be stale
/// anyway. Owners connected elsewhere, or gone, are not told.
async fn cancel_reaped(agents: &AgentStreams, reaped: Vec<Reaped>) {
    for r in reaped {
        let Some(session) = r.owner.as_deref().and_then(|owner| agents.session(owner)) else {
            continue;
        };
        session.task_finished(r.file_id);
        // Its lease ran out while its stream is open: it stopped reporting,
        // so it gets no new work until it is heard from again.
        session.mark_silent();
        let sent = session
            .send(Body::TaskCancellation(proto::TaskCancellation {
                file_id: r.file_id,
                reason: r.reason,
            }))
            .await;
        if sent {
            tracing::info!(agent = %session.agent, file = r.file_id, status = %r.to, "transfer cancelled after its lease expired");
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
        let sent = lock(&s.sent_polls);
        let to_revoke: Vec<i64> = sent
            .keys()
            .copied()
            .filter(|id| !desired.contains_key(id))
            .collect();
        let to_send: Vec<(i64, String, proto::PollAssignment)> = desired
            .into_iter()
            .filter(|(id, (version, _))| sent.get(id) != Some(version))
            .map(|(id, (version, a))| (id, version, a))
            .collect();
        (to_send, to_revoke)
    };
    for id in to_revoke {
        if s.send(Body::PollRevocation(proto::PollRevocation {
            server_id: id,
            reason: "no longer assigned".into(),
        }))
        .await
        {
            lock(&s.sent_polls).remove(&id);
            tracing::info!(agent = %s.agent, server = id, "poll revoked");
        }
    }
    for (id, version, assignment) in to_send {
        let watches = assignment.watches.len();
        if s.send(Body::PollAssignment(assignment)).await {
            lock(&s.sent_polls).insert(id, version);
            tracing::info!(agent = %s.agent, server = id, watches, "poll assigned");
        }
    }
    Ok(())
}
