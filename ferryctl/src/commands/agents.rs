//! `ferryctl agents`: the agents known to the coordinators and their health
//! (connection, drain, last heartbeat, load, rate, polled servers, counters),
//! `agents drain` to take one out of service and back, and `agents revoke` to
//! refuse a (leaked) agent certificate.

use ferry_proto::{Agent, DrainAgentRequest, ListAgentsRequest, RevokeAgentRequest};
use serde_json::{Value, json};

use crate::connect::{Admin, FULL_PAGE, all_pages};
use crate::output::{self, Table, outln};

pub(crate) async fn list(admin: &Admin, json: bool) -> anyhow::Result<()> {
    let agents = all_pages(|page_token| async move {
        let page = admin
            .call(admin.client().list_agents(ListAgentsRequest {
                page_size: FULL_PAGE,
                page_token,
            }))
            .await?;
        Ok((page.agents, page.next_page_token))
    })
    .await?;
    if json {
        return Ok(output::print_json(&Value::Array(
            agents.iter().map(agent_json).collect(),
        ))?);
    }
    let mut table = Table::new(&[
        "NAME",
        "SITE",
        "VERSION",
        "CONNECTED",
        "DRAINING",
        "REVOKED",
        "LAST-SEEN",
        "IN-FLIGHT",
        "RATE",
        "FILES",
        "BYTES",
        "ERRORS",
        "SERVERS",
        "UNAVAILABLE",
    ]);
    for a in &agents {
        let connected = match (a.connected, a.coordinator.is_empty()) {
            (true, false) => format!("yes ({})", a.coordinator),
            (true, true) => "yes".into(),
            (false, _) => "no".into(),
        };
        table.row(vec![
            a.name.clone(),
            output::or_dash(&a.site),
            output::or_dash(&a.version),
            connected,
            output::yes_no(a.draining),
            if a.revoked_at.is_some() {
                format!("yes ({})", output::or_dash(&a.revoked_by))
            } else {
                "no".into()
            },
            output::age(a.last_seen_at.as_ref()),
            format!("{}/{}", a.in_flight, a.capacity),
            format!("{}/s", output::size(a.bytes_per_sec)),
            a.files_transferred.to_string(),
            output::size(a.bytes_transferred),
            a.errors.to_string(),
            if a.polled_servers.is_empty() {
                "-".into()
            } else {
                a.polled_servers.join(",")
            },
            output::or_dash(&a.unavailable),
        ]);
    }
    Ok(table.print_or("no agents have connected yet")?)
}

pub(crate) async fn drain(admin: &Admin, req: DrainAgentRequest, json: bool) -> anyhow::Result<()> {
    let agent = admin.call(admin.client().drain_agent(req)).await?;
    if json {
        return Ok(output::print_json(&agent_json(&agent))?);
    }
    if agent.draining {
        outln!(
            "agent {} is draining: no new polls or transfers; {} running transfer(s) finish",
            agent.id,
            agent.in_flight
        )?;
    } else {
        outln!("agent {} takes work again", agent.id)?;
    }
    Ok(())
}

pub(crate) async fn revoke(
    admin: &Admin,
    req: RevokeAgentRequest,
    json: bool,
) -> anyhow::Result<()> {
    let agent = admin.call(admin.client().revoke_agent(req)).await?;
    if json {
        return Ok(output::print_json(&agent_json(&agent))?);
    }
    if agent.revoked_at.is_some() {
        outln!(
            "agent {} is revoked: its certificate is refused and its streams are closed",
            agent.id
        )?;
    } else {
        outln!("agent {} may connect again", agent.id)?;
    }
    Ok(())
}

/// JSON shape of an agent.
pub(crate) fn agent_json(a: &Agent) -> Value {
    json!({
        "id": a.id,
        "name": a.name,
        "site": a.site,
        "version": a.version,
        "capacity": a.capacity,
        "connected": a.connected,
        "coordinator": output::json_opt(&a.coordinator),
        "connected_at": output::json_time(a.connected_at.as_ref()),
        "last_seen_at": output::json_time(a.last_seen_at.as_ref()),
        "in_flight": a.in_flight,
        "polled_servers": a.polled_servers,
        "files_transferred": a.files_transferred,
        "bytes_transferred": a.bytes_transferred,
        "errors": a.errors,
        "draining": a.draining,
        "bytes_per_sec": a.bytes_per_sec,
        "revoked_at": output::json_time(a.revoked_at.as_ref()),
        "revoked_by": output::json_opt(&a.revoked_by),
        "unavailable": output::json_opt(&a.unavailable),
    })
}
