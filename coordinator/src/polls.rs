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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_proto as proto;
use sqlx::PgPool;
use tokio::sync::mpsc;

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
               OR poller_agent IN (SELECT id FROM agents WHERE draining OR revoked_at IS NOT NULL) \
               OR site IS DISTINCT FROM (SELECT a.site FROM agents a WHERE a.id = poller_agent))",
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
              AND NOT EXISTS (SELECT 1 FROM agents WHERE id = $2 AND (draining OR revoked_at IS NOT NULL)) \
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
           AND s.site = (SELECT a.site FROM agents a WHERE a.id = $1) \
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

/// A poll report of an agent, as received.
pub(crate) type Report = (String, proto::PollReport);

/// Records agents' poll reports in batches: one `UPDATE` of the `servers`
/// rows per batch, at most about four a second, instead of one commit per
/// poll (1,000 servers polled every 2 s were 500 commits a second while
/// idle). A report waits at most [`GATHER`] plus one write; the first after
/// a quiet spell is written at once.
#[derive(Debug, Clone)]
pub(crate) struct ReportRecorder {
    tx: mpsc::Sender<Report>,
}

/// How long reports gather after a batch is written.
const GATHER: Duration = Duration::from_millis(250);

impl ReportRecorder {
    /// Starts the recording task; it ends when every handle is dropped.
    pub(crate) fn start(db: PgPool) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(record_loop(db, rx));
        ReportRecorder { tx }
    }

    /// Queues `report` of `agent` for the next batch.
    pub(crate) async fn record(&self, agent: &str, report: proto::PollReport) {
        // Fails only when the recorder is gone (shutting down).
        let _ = self.tx.send((agent.to_string(), report)).await;
    }
}

async fn record_loop(db: PgPool, mut rx: mpsc::Receiver<Report>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 4096).await > 0 {
        let latest = latest_per_server(std::mem::take(&mut batch));
        if let Err(e) = record_reports(&db, &latest).await {
            // Informational only (last poll time, count, error, duration):
            // the servers' next polls report again.
            tracing::warn!(reports = latest.len(), error = %e, "recording poll reports failed");
        }
        tokio::time::sleep(GATHER).await;
    }
}

/// The last report of each server by each agent in `reports` (pure;
/// arrival order). Per agent, because a lease that moved leaves the old
/// holder's last report in the batch too; only the holder's counts.
fn latest_per_server(reports: Vec<Report>) -> Vec<Report> {
    let mut at: HashMap<(i64, String), usize> = HashMap::new();
    let mut out: Vec<Report> = Vec::with_capacity(reports.len());
    for report in reports {
        let key = (report.1.server_id, report.0.clone());
        match at.get(&key) {
            Some(&i) => out[i] = report,
            None => {
                at.insert(key, out.len());
                out.push(report);
            }
        }
    }
    out
}

/// Records the outcome of each poll whose agent still holds the server, in
/// one statement (one report per server).
async fn record_reports(db: &PgPool, reports: &[Report]) -> ApiResult<()> {
    sqlx::query(
        "UPDATE servers s SET last_poll_at = now(), last_poll_files = r.files, \
                last_poll_error = r.error, last_poll_duration_ms = r.ms \
         FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::int4[]) \
              AS r(agent, id, files, error, ms) \
         WHERE s.id = r.id AND s.poller_agent = r.agent",
    )
    .bind(reports.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>())
    .bind(reports.iter().map(|(_, r)| r.server_id).collect::<Vec<_>>())
    .bind(
        reports
            .iter()
            .map(|(_, r)| r.files_seen as i64)
            .collect::<Vec<_>>(),
    )
    .bind(
        reports
            .iter()
            .map(|(_, r)| (!r.ok).then_some(r.error.as_str()))
            .collect::<Vec<_>>(),
    )
    .bind(
        reports
            .iter()
            .map(|(_, r)| r.duration_ms as i32)
            .collect::<Vec<_>>(),
    )
    .execute(db)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(agent: &str, server_id: i64, files_seen: u64) -> Report {
        (
            agent.to_string(),
            proto::PollReport {
                server_id,
                files_seen,
                ok: true,
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_batch_keeps_each_servers_last_report_by_each_agent_in_arrival_order() {
        let got = latest_per_server(vec![
            report("a1", 1, 10),
            report("a1", 2, 20),
            report("a1", 1, 11),
            report("a2", 3, 30),
            report("a1", 2, 21),
            // The lease of server 1 moved to a2: its report is kept too.
            report("a2", 1, 12),
        ]);
        let seen: Vec<(&str, i64, u64)> = got
            .iter()
            .map(|(a, r)| (a.as_str(), r.server_id, r.files_seen))
            .collect();
        assert_eq!(
            seen,
            vec![("a1", 1, 11), ("a1", 2, 21), ("a2", 3, 30), ("a2", 1, 12)]
        );
    }
}
