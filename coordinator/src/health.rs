//! What this coordinator tells load balancers and orchestrators about itself:
//! `/healthz` and `/readyz` on `FERRY_HTTP_LISTEN`, and `grpc.health.v1` on
//! the gRPC port, from one [`Readiness`].
//!
//! **Invariant:** ready means Postgres answers now and the coordinator is not
//! draining; gRPC health says NOT_SERVING exactly when `/readyz` fails
//! (checked every [`CHECK_EVERY`], and at once when the drain starts). A
//! coordinator without a broker is still ready: announcements wait in the
//! outbox. From SIGTERM until the process exits `/readyz` answers 503
//! `not ready: draining` (the HTTP listener outlives the drain, see
//! [`ferry_proto::http::serve`]), so a balancer sees "not ready" rather than
//! a refused connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use ferry_common::sync::lock;
use ferry_proto::http::{ProbeFuture, Probes};
use ferry_proto::{
    admin_service_server::AdminServiceServer, agent_service_server::AgentServiceServer,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;

use crate::admin::Admin;
use crate::agents::AgentStreams;
use crate::relay::BrokerState;

/// How often gRPC health follows readiness.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The coordinator's readiness, shared by the HTTP probes and gRPC health.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    db: OnceLock<PgPool>,
    /// Why the database is not connected yet (while starting).
    waiting: Mutex<Option<String>>,
    stopping: AtomicBool,
}

impl Readiness {
    /// Records why Postgres cannot be used yet (startup retries).
    pub(crate) fn waiting_for_database(&self, why: String) {
        *lock(&self.waiting) = Some(why);
    }

    pub(crate) fn connected(&self, db: PgPool) {
        let _ = self.db.set(db);
        *lock(&self.waiting) = None;
    }

    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// `Ok` when ready; otherwise why not.
    pub(crate) async fn check(&self) -> Result<(), String> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ferry_proto::http::DRAINING.into());
        }
        let Some(db) = self.db.get() else {
            return Err(lock(&self.waiting)
                .clone()
                .unwrap_or_else(|| "connecting to Postgres".into()));
        };
        match tokio::time::timeout(PING_TIMEOUT, sqlx::query("SELECT 1").execute(db)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("Postgres unreachable: {e}")),
            Err(_) => Err(format!("Postgres did not answer within {PING_TIMEOUT:?}")),
        }
    }
}

impl Probes for Readiness {
    fn ready(&self) -> ProbeFuture<'_, Result<(), String>> {
        Box::pin(self.check())
    }

    fn metrics(&self) -> ProbeFuture<'_, Option<Result<String, String>>> {
        Box::pin(async move {
            let Some(db) = self.db.get() else {
                return Some(Err("not connected to Postgres yet".into()));
            };
            Some(
                crate::status::status(db)
                    .await
                    .map(|rows| crate::metrics::render(&rows, chrono::Utc::now()))
                    .map_err(|e| e.to_string()),
            )
        })
    }
}

/// The gRPC health service name of the relay's broker connection.
pub(crate) const RELAY_SERVICE: &str = "ferry.v1.Relay";

/// Keeps gRPC health in step with readiness (and, under [`RELAY_SERVICE`],
/// with the broker connection when a broker is configured) until `drain`
/// fires, then reports NOT_SERVING.
pub(crate) async fn follow(
    readiness: std::sync::Arc<Readiness>,
    reporter: HealthReporter,
    broker: Option<BrokerState>,
    drain: CancellationToken,
) {
    let mut last: Option<bool> = None;
    let mut last_broker: Option<bool> = None;
    loop {
        if let Some(broker) = &broker {
            let up = broker.connected();
            if last_broker != Some(up) {
                let status = if up {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(RELAY_SERVICE, status).await;
                last_broker = Some(up);
            }
        }
        let result = readiness.check().await;
        let serving = result.is_ok();
        if last != Some(serving) {
            match &result {
                Ok(()) => tracing::info!("ready: gRPC health SERVING"),
                Err(why) => tracing::warn!(reason = %why, "not ready: gRPC health NOT_SERVING"),
            }
            set(&reporter, serving).await;
            last = Some(serving);
        }
        tokio::select! {
            _ = drain.cancelled() => break,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
    readiness.stopping();
    tracing::info!("draining: gRPC health NOT_SERVING, /readyz 503 until exit");
    set(&reporter, false).await;
    if broker.is_some() {
        reporter
            .set_service_status(RELAY_SERVICE, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

async fn set(reporter: &HealthReporter, serving: bool) {
    if serving {
        reporter.set_serving::<AdminServiceServer<Admin>>().await;
        reporter
            .set_serving::<AgentServiceServer<AgentStreams>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
    } else {
        reporter
            .set_not_serving::<AdminServiceServer<Admin>>()
            .await;
        reporter
            .set_not_serving::<AgentServiceServer<AgentStreams>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    }
}
