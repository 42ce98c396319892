//! Post-actions (`delete`, `move:<dir>`) after a file is `processed`: sent to a
//! connected agent of the server's site; the agent's answer is recorded in
//! `files.post_action_result` ([`crate::results::record_post_action`]).
//!
//! **Invariants:** a post-action is only ever requested for a `processed` file,
//! that is, after the object is stored and its notification confirmed. The
//! agent it is sent to is recorded first (`files.post_action_agent`), and only
//! that agent's answer counts; a resend to another agent moves the record.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferry_common::domain::PostAction;
use ferry_proto::{self as proto, coordinator_message::Body};

use crate::agents::Session;
use crate::registry::{CONNECTION_COLUMNS, ConnectionRow};
use crate::state::Coordinator;

/// How long to wait for an agent's answer before asking again.
const RESEND_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, sqlx::FromRow)]
struct Due {
    file_id: i64,
    path: String,
    #[sqlx(try_from = "String")]
    post_action: PostAction,
    site: String,
    #[sqlx(flatten)]
    conn: ConnectionRow,
}

/// Requests already sent and not yet answered, by file id.
#[derive(Debug, Default)]
pub(crate) struct PostActions {
    sent: HashMap<i64, Instant>,
}

impl PostActions {
    /// Sends the due post-actions to agents of the right site. Returns how many.
    pub(crate) async fn dispatch(
        &mut self,
        coord: &Coordinator,
        sessions: &[Session],
    ) -> anyhow::Result<usize> {
        self.sent.retain(|_, at| at.elapsed() < RESEND_AFTER);
        let sites: Vec<String> = sessions.iter().map(|s| s.site.clone()).collect();
        if sites.is_empty() {
            return Ok(0);
        }
        let due = sqlx::query_as::<_, Due>(&format!(
            "SELECT f.id AS file_id, f.path, w.post_action, s.site, {CONNECTION_COLUMNS} \
             FROM files f JOIN watches w ON w.id = f.watch_id JOIN servers s ON s.id = f.server_id \
             WHERE f.status = 'processed' AND f.post_action_result IS NULL AND w.post_action <> 'keep' \
               AND s.deleted_at IS NULL AND s.site = ANY($1) ORDER BY f.id LIMIT 200"
        ))
        .bind(&sites)
        .fetch_all(&coord.db)
        .await?;
        let mut sent = 0;
        for d in due {
            if self.sent.contains_key(&d.file_id) {
                continue;
            }
            let Some(agent) = sessions
                .iter()
                .filter(|s| s.site == d.site && !s.is_draining())
                .min_by_key(|s| s.in_flight())
            else {
                continue;
            };
            if !record_recipient(coord, d.file_id, &agent.agent).await? {
                continue;
            }
            let req = proto::PostActionRequest {
                file_id: d.file_id,
                source: Some(d.conn.to_proto(&coord.secrets)?),
                path: d.path,
                action: Some((&d.post_action).into()),
            };
            if agent.send(Body::PostAction(req)).await {
                self.sent.insert(d.file_id, Instant::now());
                sent += 1;
            }
        }
        Ok(sent)
    }
}

/// Records that `file_id`'s post-action goes to `agent`, if it is still
/// pending; false if it no longer is (answered meanwhile).
async fn record_recipient(coord: &Coordinator, file_id: i64, agent: &str) -> anyhow::Result<bool> {
    let n = sqlx::query(
        "UPDATE files SET post_action_agent = $2 \
         WHERE id = $1 AND status = 'processed' AND post_action_result IS NULL",
    )
    .bind(file_id)
    .bind(agent)
    .execute(&coord.db)
    .await?
    .rows_affected();
    Ok(n == 1)
}
