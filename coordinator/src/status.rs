//! The system summary behind `GetStatus` (`ferryctl status`): file counts by
//! status per server, the announcement backlog, agent load and poll health.
//! Read-only queries whose cost does not grow with `files`: the counts come
//! from `counts.rs` (kept by the writers), the oldest waiting file from the
//! index of due files.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::counts;
use crate::error::ApiResult;
use crate::files::{self, FileRow};

/// One server and how many of its files are in one status (`status` is
/// `None` for a server without files).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ServerCountRow {
    pub server_id: i64,
    pub server_name: String,
    pub last_poll_error: Option<String>,
    pub last_poll_at: Option<DateTime<Utc>>,
    pub status: Option<String>,
    pub count: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct OutboxRow {
    pub unpublished: i64,
    pub parked: i64,
    pub oldest_pending_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct AgentsRow {
    pub connected: i64,
    pub total: i64,
    pub in_flight: i64,
    pub capacity: i64,
}

/// Everything `GetStatus` answers, as rows.
#[derive(Debug, Clone)]
pub(crate) struct StatusRows {
    /// In server id order, one row per (server, status).
    pub servers: Vec<ServerCountRow>,
    pub outbox: OutboxRow,
    pub oldest_waiting: Option<FileRow>,
    pub agents: AgentsRow,
}

pub(crate) async fn status(db: &PgPool) -> ApiResult<StatusRows> {
    let servers = sqlx::query_as::<_, ServerCountRow>(&format!(
        "SELECT s.id AS server_id, s.name AS server_name, s.last_poll_error, s.last_poll_at, \
                c.status, COALESCE(c.n, 0) AS count \
         FROM servers s LEFT JOIN ({}) c ON c.server_id = s.id \
         WHERE s.deleted_at IS NULL ORDER BY s.id, c.status",
        counts::CURRENT
    ))
    .fetch_all(db)
    .await?;
    let outbox = sqlx::query_as::<_, OutboxRow>(
        "SELECT count(*) AS unpublished, count(parked_at) AS parked, \
                min(created_at) FILTER (WHERE parked_at IS NULL) AS oldest_pending_at \
         FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(db)
    .await?;
    let agents = sqlx::query_as::<_, AgentsRow>(
        "SELECT count(*) FILTER (WHERE connected) AS connected, count(*) AS total, \
                COALESCE(sum(in_flight) FILTER (WHERE connected), 0)::BIGINT AS in_flight, \
                COALESCE(sum(capacity) FILTER (WHERE connected), 0)::BIGINT AS capacity \
         FROM agents WHERE revoked_at IS NULL",
    )
    .fetch_one(db)
    .await?;
    Ok(StatusRows {
        servers,
        outbox,
        oldest_waiting: files::oldest_waiting(db).await?,
        agents,
    })
}
