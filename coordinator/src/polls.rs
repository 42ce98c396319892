//! Poll leases: every enabled server is polled by exactly one connected agent
//! of its site. The lease lives in `servers.poller_*`, is renewed by the
//! coordinator holding the agent's stream, and expires if that coordinator dies.
//!
//! **Architecture invariants:** a lease is taken only with a conditional UPDATE
//! on an unleased or expired row, so two coordinators never both assign a
//! server; a lease (and with it the server's credentials) is only ever held by
//! an agent of the server's current site — a site change releases it at once
//! (`registry::update_server`), `renew` drops any that disagree, and `desired`
//! never assigns across sites.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_proto as proto;
use sqlx::PgPool;

use crate::error::ApiResult;
use crate::registry::{self, CONNECTION_COLUMNS, ConnectionRow};
use crate::secrets::SecretBox;

/// How long a poll lease lives without renewal.
pub(crate) const LEASE: Duration = Duration::from_secs(15);

/// Renews the leases of `agents` held through this coordinator and drops leases
/// on servers that were disabled or removed or moved to another site, and
/// those of drained or revoked agents (so the other agents of the site take
/// them over).
pub(crate) async fn renew(db: &PgPool, coordinator: &str, agents: &[String]) -> ApiResult<()> {
    sqlx::query(
        "UPDATE servers SET poll_lease_expires_at = now() + make_interval(secs => $3) \
         WHERE poller_coordinator = $1 AND poller_agent = ANY($2) AND enabled AND deleted_at IS NULL",
    )
    .bind(coordinator)
    .bind(agents)
    .bind(LEASE.as_secs_f64())
    .execute(db)
    .await?;
    sqlx::query(
        "UPDATE servers SET poller_agent = NULL, poller_coordinator = NULL, poll_lease_expires_at = NULL \
         WHERE poller_agent IS NOT NULL AND (NOT enabled OR deleted_at IS NOT NULL \
               OR poller_agent IN (SELECT name FROM agents WHERE draining OR revoked_at IS NOT NULL) \
               OR site IS DISTINCT FROM (SELECT a.site FROM agents a WHERE a.name = poller_agent))",
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Releases every lease of `agent` held through this coordinator (agent gone).
pub(crate) async fn release_agent(db: &PgPool, coordinator: &str, agent: &str) -> ApiResult<()> {
    sqlx::query(
        "UPDATE servers SET poller_agent = NULL, poller_coordinator = NULL, poll_lease_expires_at = NULL \
         WHERE poller_agent = $1 AND poller_coordinator = $2",
    )
    .bind(agent)
    .bind(coordinator)
    .execute(db)
    .await?;
    Ok(())
}

/// Takes free servers of `site` for `agent` while the agent has fewer than
/// `fair_share` and is not drained. Free: unleased, expired, or leased to this same agent through
/// another coordinator (the agent has one stream at a time, so after it
/// reconnected elsewhere that lease is stale). Returns how many were taken.
pub(crate) async fn claim(
    db: &PgPool,
    coordinator: &str,
    agent: &str,
    site: &str,
    fair_share: i64,
) -> ApiResult<u64> {
    let taken = sqlx::query(
        "WITH mine AS (SELECT count(*) AS n FROM servers WHERE poller_agent = $2 AND poller_coordinator = $1 \
                      AND poll_lease_expires_at > now() AND deleted_at IS NULL), \
         free AS ( \
            SELECT id FROM servers \
            WHERE site = $3 AND enabled AND deleted_at IS NULL \
              AND NOT EXISTS (SELECT 1 FROM agents WHERE name = $2 AND (draining OR revoked_at IS NOT NULL)) \
              AND (poller_agent IS NULL OR poll_lease_expires_at < now() \
                   OR (poller_agent = $2 AND poller_coordinator <> $1)) \
            ORDER BY id \
            LIMIT GREATEST(0, $4 - (SELECT n FROM mine)) \
            FOR UPDATE SKIP LOCKED) \
         UPDATE servers s SET poller_agent = $2, poller_coordinator = $1, \
                poll_lease_expires_at = now() + make_interval(secs => $5) \
         FROM free WHERE s.id = free.id",
    )
    .bind(coordinator)
    .bind(agent)
    .bind(site)
    .bind(fair_share)
    .bind(LEASE.as_secs_f64())
    .execute(db)
    .await?
    .rows_affected();
    Ok(taken)
}

/// Fair share of servers per agent on a site: ceil(live servers / connected,
/// undrained agents).
pub(crate) async fn fair_share(db: &PgPool, site: &str) -> ApiResult<i64> {
    let (servers, agents): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM servers WHERE site = $1 AND enabled AND deleted_at IS NULL), \
                (SELECT count(*) FROM agents WHERE site = $1 AND connected AND NOT draining AND revoked_at IS NULL \
                   AND last_seen_at > now() - interval '30 seconds')",
    )
    .bind(site)
    .fetch_one(db)
    .await?;
    Ok(if agents == 0 {
        servers
    } else {
        (servers + agents - 1) / agents
    })
}

#[derive(Debug, sqlx::FromRow)]
struct AssignedRow {
    #[sqlx(flatten)]
    conn: ConnectionRow,
    updated_at: DateTime<Utc>,
    watch_id: Option<i64>,
    directory: Option<String>,
    glob: Option<String>,
    recursive: Option<bool>,
    poll_interval_secs: Option<i32>,
    min_age_secs: Option<i32>,
    baseline_pending: Option<bool>,
}

/// The poll assignments `agent` should have now, by server id, each with a
/// version string that changes whenever the server or one of its watches does.
pub(crate) async fn desired(
    db: &PgPool,
    secrets: &SecretBox,
    coordinator: &str,
    agent: &str,
) -> ApiResult<BTreeMap<i64, (String, proto::PollAssignment)>> {
    let rows = sqlx::query_as::<_, AssignedRow>(&format!(
        "SELECT {CONNECTION_COLUMNS}, s.updated_at, \
                w.id AS watch_id, w.directory, w.glob, w.recursive, w.poll_interval_secs, w.min_age_secs, \
                w.baseline_pending \
         FROM servers s LEFT JOIN watches w \
           ON w.server_id = s.id AND w.enabled AND w.deleted_at IS NULL \
         WHERE s.poller_agent = $1 AND s.poller_coordinator = $2 AND s.enabled AND s.deleted_at IS NULL \
           AND s.site = (SELECT a.site FROM agents a WHERE a.name = $1) \
         ORDER BY s.id, w.id"
    ))
    .bind(agent)
    .bind(coordinator)
    .fetch_all(db)
    .await?;
    let mut out: BTreeMap<i64, (String, proto::PollAssignment)> = BTreeMap::new();
    let mut skipped = BTreeSet::new();
    for row in rows {
        let server_id = row.conn.server_id;
        if skipped.contains(&server_id) {
            continue;
        }
        let entry = match out.get_mut(&server_id) {
            Some(e) => e,
            None => {
                let conn = match row.conn.connection(secrets) {
                    Ok(conn) => conn,
                    // Not this server's credential any more: it is not
                    // polled (an old assignment is revoked) and says why.
                    Err(e) => {
                        if registry::record_credential_error(db, &e).await? {
                            tracing::error!(error = %e, "server not assigned");
                        }
                        skipped.insert(server_id);
                        continue;
                    }
                };
                let version = format!("s{}", row.updated_at.timestamp_micros());
                out.entry(server_id).or_insert((
                    version,
                    proto::PollAssignment {
                        server: Some(conn),
                        watches: Vec::new(),
                    },
                ))
            }
        };
        if let (
            Some(id),
            Some(directory),
            Some(glob),
            Some(recursive),
            Some(interval),
            Some(min_age),
        ) = (
            row.watch_id,
            row.directory,
            row.glob,
            row.recursive,
            row.poll_interval_secs,
            row.min_age_secs,
        ) {
            let spec = proto::WatchSpec {
                watch_id: id,
                directory,
                glob,
                recursive,
                poll_interval_secs: interval as u32,
                min_age_secs: min_age as u32,
                // Not part of the version: clearing it must not restart a
                // poller that already sent its baseline.
                baseline: row.baseline_pending.unwrap_or(false),
            };
            entry.0.push_str(&format!(
                ";w{}:{}:{}:{}:{}:{}",
                spec.watch_id,
                spec.directory,
                spec.glob,
                spec.recursive,
                spec.poll_interval_secs,
                spec.min_age_secs
            ));
            entry.1.watches.push(spec);
        }
    }
    Ok(out)
}

/// Records the outcome of a poll, if `agent` still holds the server.
pub(crate) async fn record_report(
    db: &PgPool,
    agent: &str,
    report: &proto::PollReport,
) -> ApiResult<()> {
    sqlx::query(
        "UPDATE servers SET last_poll_at = now(), last_poll_files = $3, last_poll_error = $4, \
                last_poll_duration_ms = $5 \
         WHERE id = $1 AND poller_agent = $2",
    )
    .bind(report.server_id)
    .bind(agent)
    .bind(report.files_seen as i64)
    .bind((!report.ok).then_some(report.error.as_str()))
    .bind(report.duration_ms as i32)
    .execute(db)
    .await?;
    Ok(())
}
