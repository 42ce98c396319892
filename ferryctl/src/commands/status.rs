//! `ferryctl status`: one screen about the whole system (`GetStatus`): file
//! counts by status per server, the announcement backlog, the file waiting
//! longest, agent load, and the servers whose last poll failed.

use chrono::Utc;
use ferry_common::domain::FileStatus;
use ferry_proto::{GetStatusRequest, GetStatusResponse, ServerStatus};
use serde_json::{Map, Value, json};

use crate::connect::Admin;
use crate::output::{self, Table, outln};

pub(crate) async fn run(admin: &Admin, json: bool) -> anyhow::Result<()> {
    let status = admin
        .call(admin.client().get_status(GetStatusRequest {}))
        .await?;
    if json {
        return Ok(output::print_json(&status_json(&status))?);
    }
    print(&status)
}

fn print(status: &GetStatusResponse) -> anyhow::Result<()> {
    let mut headers = vec!["SERVER"];
    headers.extend(FileStatus::ALL.map(|s| s.as_str()));
    headers.push("TOTAL");
    let mut table = Table::new(&headers);
    for server in &status.servers {
        let mut row = vec![server.server_name.clone()];
        row.extend(FileStatus::ALL.map(|s| count_of(server, s).to_string()));
        row.push(
            server
                .counts
                .iter()
                .map(|c| c.count)
                .sum::<u64>()
                .to_string(),
        );
        table.row(row);
    }
    table.print_or("no servers")?;
    outln!()?;
    let outbox = status.outbox.unwrap_or_default();
    let pending = outbox.unpublished.saturating_sub(outbox.parked);
    let mut backlog = format!(
        "{} unpublished ({} parked)",
        outbox.unpublished, outbox.parked
    );
    if pending > 0 {
        backlog.push_str(&format!(
            ", oldest pending since {}",
            output::age(outbox.oldest_pending_at.as_ref())
        ));
    }
    let waiting = status.oldest_waiting.as_ref().map_or_else(
        || "none".to_string(),
        |f| {
            format!(
                "file {} {} ({}, {}) discovered {}",
                f.id,
                f.path,
                output::status_name(f.status),
                f.server_name,
                output::age(f.discovered_at.as_ref())
            )
        },
    );
    let agents = status.agents.unwrap_or_default();
    let failing: Vec<String> = failing(status)
        .map(|s| format!("{}: {}", s.server_name, s.last_poll_error))
        .collect();
    output::print_fields(&[
        ("Announcements", backlog),
        ("Oldest waiting", output::clean(&waiting)),
        (
            "Agents",
            format!(
                "{}/{} connected, {}/{} transfers in flight",
                agents.connected, agents.total, agents.in_flight, agents.capacity
            ),
        ),
        (
            "Failing polls",
            if failing.is_empty() {
                "none".into()
            } else {
                output::clean(&failing.join("; "))
            },
        ),
    ])?;
    Ok(())
}

fn count_of(server: &ServerStatus, status: FileStatus) -> u64 {
    let wire = ferry_proto::convert::status_to_wire(status);
    server
        .counts
        .iter()
        .find(|c| c.status == wire)
        .map_or(0, |c| c.count)
}

/// Servers whose last poll failed.
fn failing(status: &GetStatusResponse) -> impl Iterator<Item = &ServerStatus> {
    status
        .servers
        .iter()
        .filter(|s| !s.last_poll_error.is_empty())
}

/// Seconds from `ts` to now (0 for future times); `null` when unset.
fn age_secs(ts: Option<&prost_types::Timestamp>) -> Value {
    output::time(ts).map_or(Value::Null, |t| {
        json!(Utc::now().signed_duration_since(t).num_seconds().max(0))
    })
}

/// JSON shape: `servers` (counts by status name, every status present),
/// `outbox`, `oldest_waiting` (or `null`), `agents`, `failing_servers`.
fn status_json(status: &GetStatusResponse) -> Value {
    let servers: Vec<Value> = status
        .servers
        .iter()
        .map(|s| {
            let counts: Map<String, Value> = FileStatus::ALL
                .into_iter()
                .map(|st| (st.as_str().to_string(), json!(count_of(s, st))))
                .collect();
            json!({
                "id": s.server_id,
                "name": s.server_name,
                "counts": counts,
                "total": s.counts.iter().map(|c| c.count).sum::<u64>(),
                "last_poll_at": output::json_time(s.last_poll_at.as_ref()),
                "last_poll_error": output::json_opt(&s.last_poll_error),
            })
        })
        .collect();
    let outbox = status.outbox.unwrap_or_default();
    let agents = status.agents.unwrap_or_default();
    json!({
        "servers": servers,
        "outbox": {
            "unpublished": outbox.unpublished,
            "parked": outbox.parked,
            "oldest_pending_at": output::json_time(outbox.oldest_pending_at.as_ref()),
            "oldest_pending_age_secs": age_secs(outbox.oldest_pending_at.as_ref()),
        },
        "oldest_waiting": status.oldest_waiting.as_ref().map_or(Value::Null, |f| json!({
            "id": f.id,
            "server_name": f.server_name,
            "path": f.path,
            "status": output::status_name(f.status),
            "discovered_at": output::json_time(f.discovered_at.as_ref()),
            "age_secs": age_secs(f.discovered_at.as_ref()),
        })),
        "agents": {
            "connected": agents.connected,
            "total": agents.total,
            "in_flight": agents.in_flight,
            "capacity": agents.capacity,
        },
        "failing_servers": failing(status)
            .map(|s| json!({ "name": s.server_name, "error": s.last_poll_error }))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::{FileStatus as P, StatusCount};

    #[test]
    fn json_counts_every_status_and_lists_failing_servers() {
        let status = GetStatusResponse {
            servers: vec![
                ServerStatus {
                    server_id: 1,
                    server_name: "a".into(),
                    counts: vec![
                        StatusCount {
                            status: P::New as i32,
                            count: 2,
                        },
                        StatusCount {
                            status: P::Failed as i32,
                            count: 1,
                        },
                    ],
                    last_poll_error: "connection refused".into(),
                    last_poll_at: None,
                },
                ServerStatus {
                    server_id: 2,
                    server_name: "b".into(),
                    ..ServerStatus::default()
                },
            ],
            ..GetStatusResponse::default()
        };
        let v = status_json(&status);
        assert_eq!(v["servers"][0]["counts"]["new"], 2);
        assert_eq!(v["servers"][0]["counts"]["failed"], 1);
        assert_eq!(v["servers"][0]["counts"]["processed"], 0);
        assert_eq!(v["servers"][0]["total"], 3);
        assert_eq!(v["servers"][1]["total"], 0);
        assert_eq!(
            v["failing_servers"],
            json!([{ "name": "a", "error": "connection refused" }])
        );
        assert_eq!(v["oldest_waiting"], Value::Null);
        assert_eq!(v["outbox"]["unpublished"], 0);
    }
}
