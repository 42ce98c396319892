//! Shared state of one coordinator process, and the Postgres `LISTEN/NOTIFY`
//! wake-ups that connect several coordinators.
//!
//! **Architecture invariant:** coordinators share nothing but Postgres. A
//! notification is only a hint to look again; every loop that waits on one
//! also re-reads on a timer, so a lost notification delays but never loses work.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::secrets::SecretBox;

/// Channel names used with `NOTIFY`.
pub(crate) mod channel {
    /// A `file_events` row was inserted (statement-level trigger).
    pub(crate) const FILE_EVENTS: &str = "ferry_file_events";
    /// A server or watch was added, changed or removed.
    pub(crate) const REGISTRY: &str = "ferry_registry";
    /// Files became due for transfer.
    pub(crate) const FILES_DUE: &str = "ferry_files_due";
}

#[derive(Debug)]
struct Signals {
    file_events: watch::Sender<u64>,
    registry: watch::Sender<u64>,
    files_due: watch::Sender<u64>,
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|v| *v = v.wrapping_add(1));
}

/// Cheap-to-clone handle on everything a request handler or loop needs.
#[derive(Clone, Debug)]
pub(crate) struct Coordinator {
    pub db: PgPool,
    pub secrets: SecretBox,
    /// This instance's id, recorded on the agents and leases it holds.
    pub id: String,
    signals: Arc<Signals>,
}

impl Coordinator {
    pub(crate) fn new(db: PgPool, secrets: SecretBox, id: String) -> Self {
        Coordinator {
            db,
            secrets,
            id,
            signals: Arc::new(Signals {
                file_events: watch::channel(0).0,
                registry: watch::channel(0).0,
                files_due: watch::channel(0).0,
            }),
        }
    }

    async fn notify(&self, channel: &str) {
        if let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(channel)
            .execute(&self.db)
            .await
        {
            tracing::warn!(channel, error = %e, "NOTIFY failed; peers will catch up on their next rescan");
        }
    }

    /// Tells every coordinator that servers or watches changed.
    pub(crate) async fn registry_changed(&self) {
        bump(&self.signals.registry);
        self.notify(channel::REGISTRY).await;
    }

    /// Tells every coordinator's scheduler that files became due.
    pub(crate) async fn files_due(&self) {
        bump(&self.signals.files_due);
        self.notify(channel::FILES_DUE).await;
    }

    /// Wakes this coordinator's scheduler only: capacity of an agent
    /// connected here freed. Its servers' transfers are routed to it, so no
    /// other coordinator has work to start; retries become due after their
    /// backoff, which the schedulers' timer covers. (A `NOTIFY` per result
    /// batch took a cluster-wide lock at every commit for nothing.)
    pub(crate) fn capacity_freed_here(&self) {
        bump(&self.signals.files_due);
    }

    pub(crate) fn subscribe_file_events(&self) -> watch::Receiver<u64> {
        self.signals.file_events.subscribe()
    }

    pub(crate) fn subscribe_registry(&self) -> watch::Receiver<u64> {
        self.signals.registry.subscribe()
    }

    pub(crate) fn subscribe_files_due(&self) -> watch::Receiver<u64> {
        self.signals.files_due.subscribe()
    }

    /// Forwards Postgres notifications to the local watch channels until cancelled.
    pub(crate) async fn run_listener(self, cancel: CancellationToken) {
        loop {
            if let Err(e) = self.listen_once(&cancel).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "LISTEN connection lost; reconnecting"
                );
            }
            // Anything may have been missed while disconnected: wake everyone.
            bump(&self.signals.file_events);
            bump(&self.signals.registry);
            bump(&self.signals.files_due);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn listen_once(&self, cancel: &CancellationToken) -> anyhow::Result<()> {
        let mut listener = PgListener::connect_with(&self.db).await?;
        listener
            .listen_all([channel::FILE_EVENTS, channel::REGISTRY, channel::FILES_DUE])
            .await?;
        loop {
            let n = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                n = listener.recv() => n?,
            };
            match n.channel() {
                channel::FILE_EVENTS => bump(&self.signals.file_events),
                channel::REGISTRY => bump(&self.signals.registry),
                channel::FILES_DUE => bump(&self.signals.files_due),
                _ => {}
            }
        }
    }
}
