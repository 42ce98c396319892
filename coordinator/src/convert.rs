//! Conversion of database rows to protocol messages: the only place in the
//! coordinator that builds `proto::*` values from domain data.

use chrono::{DateTime, Utc};
use ferry_common::domain::FileStatus;
use ferry_proto as proto;

use crate::files::{AgentRow, EventRow, FileRow};
use crate::registry::{ServerRow, WatchRow};
use crate::status::StatusRows;

pub(crate) fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn status(text: &str) -> i32 {
    text.parse::<FileStatus>()
        .map(ferry_proto::convert::status_to_wire)
        .unwrap_or(proto::FileStatus::Unspecified as i32)
}

pub(crate) fn server(row: &ServerRow) -> proto::Server {
    let lease_live = row.poll_lease_expires_at.is_some_and(|t| t > Utc::now());
    proto::Server {
        id: row.id,
        name: row.name.clone(),
        hostname: row.hostname.clone(),
        port: row.port as u32,
        username: row.username.clone(),
        auth_kind: match row.auth_kind.as_str() {
            "password" => proto::AuthKind::Password,
            _ => proto::AuthKind::PrivateKey,
        } as i32,
        has_passphrase: row.has_passphrase,
        host_key_fingerprint: row.host_key_fingerprint.clone(),
        site: row.site.clone(),
        max_sessions: row.max_sessions as u32,
        enabled: row.enabled,
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
        health: Some(proto::ServerHealth {
            poller_agent: if lease_live {
                row.poller_agent.clone().unwrap_or_default()
            } else {
                String::new()
            },
            last_poll_at: row.last_poll_at.map(timestamp),
            last_poll_files: row.last_poll_files.unwrap_or(0) as u64,
            last_error: row.last_poll_error.clone().unwrap_or_default(),
            last_poll_duration_ms: row
                .last_poll_duration_ms
                .and_then(|ms| u32::try_from(ms).ok())
                .unwrap_or(0),
        }),
    }
}

pub(crate) fn watch(row: &WatchRow) -> proto::Watch {
    proto::Watch {
        id: row.id,
        server_id: row.server_id,
        server_name: row.server_name.clone(),
        directory: row.directory.clone(),
        glob: row.glob.clone(),
        recursive: row.recursive,
        poll_interval_secs: row.poll_interval_secs as u32,
        min_age_secs: row.min_age_secs as u32,
        bucket: row.bucket.clone(),
        key_template: row.key_template.clone(),
        post_action: Some((&row.post_action).into()),
        enabled: row.enabled,
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
        baseline_pending: row.baseline_pending,
    }
}

pub(crate) fn file(row: &FileRow) -> proto::File {
    proto::File {
        id: row.id,
        server_id: row.server_id,
        server_name: row.server_name.clone(),
        watch_id: row.watch_id,
        path: row.path.clone(),
        size: row.size as u64,
        mtime_unix: row.mtime_unix,
        status: status(&row.status),
        attempts: row.attempts as u32,
        next_attempt_at: Some(timestamp(row.next_attempt_at)),
        last_error: row.last_error.clone().unwrap_or_default(),
        lease_owner: row.lease_owner.clone().unwrap_or_default(),
        lease_expires_at: row.lease_expires_at.map(timestamp),
        fencing_token: row.fencing_token as u64,
        bucket: row.bucket.clone().unwrap_or_default(),
        key: row.object_key.clone().unwrap_or_default(),
        etag: row.etag.clone().unwrap_or_default(),
        sha256: row.sha256.clone().unwrap_or_default(),
        discovered_at: Some(timestamp(row.discovered_at)),
        updated_at: Some(timestamp(row.updated_at)),
        post_action_result: row.post_action_result.clone().unwrap_or_default(),
        announcement: row.announcement.clone().unwrap_or_default(),
        announcement_attempts: row
            .announcement_attempts
            .map_or(0, |n| u32::try_from(n).unwrap_or(0)),
        announcement_error: row.announcement_error.clone().unwrap_or_default(),
        bytes_done: u64::try_from(row.bytes_done).unwrap_or(0),
    }
}

pub(crate) fn event(row: &EventRow) -> proto::FileEvent {
    proto::FileEvent {
        id: row.id,
        file_id: row.file_id,
        at: Some(timestamp(row.at)),
        from_status: row.from_status.as_deref().map(status).unwrap_or(0),
        to_status: status(&row.to_status),
        actor: row.actor.clone(),
        reason: row.reason.clone(),
        path: row.path.clone(),
        server_id: row.server_id,
        watch_id: row.watch_id,
        resume_token: String::new(),
    }
}

pub(crate) fn agent(row: &AgentRow) -> proto::Agent {
    proto::Agent {
        name: row.name.clone(),
        site: row.site.clone(),
        version: row.version.clone(),
        capacity: row.capacity as u32,
        connected: row.connected,
        coordinator: row.connected_coordinator.clone().unwrap_or_default(),
        connected_at: row.connected_at.map(timestamp),
        last_seen_at: row.last_seen_at.map(timestamp),
        in_flight: row.in_flight as u32,
        polled_servers: row.polled_servers.clone(),
        files_transferred: row.files_transferred as u64,
        bytes_transferred: row.bytes_transferred as u64,
        errors: row.errors as u64,
        draining: row.draining,
        bytes_per_sec: row.bytes_per_sec as u64,
        revoked_at: row.revoked_at.map(timestamp),
        revoked_by: row.revoked_by.clone().unwrap_or_default(),
        unavailable: row.unavailable.clone().unwrap_or_default(),
        id: row.id.clone(),
    }
}

/// The system summary; per server, counts come in lifecycle order.
pub(crate) fn system_status(rows: &StatusRows) -> proto::GetStatusResponse {
    let mut servers: Vec<proto::ServerStatus> = Vec::new();
    for row in &rows.servers {
        if servers.last().is_none_or(|s| s.server_id != row.server_id) {
            servers.push(proto::ServerStatus {
                server_id: row.server_id,
                server_name: row.server_name.clone(),
                counts: Vec::new(),
                last_poll_error: row.last_poll_error.clone().unwrap_or_default(),
                last_poll_at: row.last_poll_at.map(timestamp),
            });
        }
        if let (Some(server), Some(text)) = (servers.last_mut(), row.status.as_deref()) {
            server.counts.push(proto::StatusCount {
                status: status(text),
                count: u64::try_from(row.count).unwrap_or(0),
            });
        }
    }
    for server in &mut servers {
        server.counts.sort_by_key(|c| c.status);
    }
    let count = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
    proto::GetStatusResponse {
        servers,
        outbox: Some(proto::OutboxStatus {
            unpublished: u64::try_from(rows.outbox.unpublished).unwrap_or(0),
            parked: u64::try_from(rows.outbox.parked).unwrap_or(0),
            oldest_pending_at: rows.outbox.oldest_pending_at.map(timestamp),
        }),
        oldest_waiting: rows.oldest_waiting.as_ref().map(file),
        agents: Some(proto::AgentsStatus {
            connected: count(rows.agents.connected),
            total: count(rows.agents.total),
            in_flight: count(rows.agents.in_flight),
            capacity: count(rows.agents.capacity),
        }),
    }
}
