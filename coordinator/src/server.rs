//! Wires the gRPC server: mTLS, role interceptors, admin and agent services,
//! health and reflection; runs until a drain (SIGTERM) has run its delay.

use anyhow::Context;
use ferry_proto::tls::TlsPaths;
use ferry_proto::{
    FILE_DESCRIPTOR_SET, admin_service_server::AdminServiceServer,
    agent_service_server::AgentServiceServer,
};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::admin::Admin;
use std::time::Duration;

use ferry_common::backoff::Backoff;

use std::sync::Arc;

use crate::agents::{AgentStreams, TaskSettings};
use crate::auth::{require_admin, require_agent};
use crate::config::ServeArgs;
use crate::health::{self, Readiness};
use crate::relay::{self, BrokerState, BrokerTls, BrokerTlsFiles, RelayConfig};
use crate::secrets::SecretBox;
use crate::state::Coordinator;
use crate::{db, registry, tasks};
use ferry_common::lifecycle::RetryPolicy;

fn default_coordinator_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "coordinator".into());
    format!("{host}-{}", std::process::id())
}

/// Connects to Postgres, applies migrations and re-seals legacy credentials,
/// retrying with backoff until it works or `cancel` fires (`None`).
async fn wait_for_database(
    args: &ServeArgs,
    secrets: &SecretBox,
    readiness: &Readiness,
    cancel: &CancellationToken,
) -> Option<sqlx::PgPool> {
    const RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut attempt = 0u32;
    loop {
        match prepare_database(args, secrets).await {
            Ok(pool) => {
                if attempt > 0 {
                    tracing::info!("Postgres reachable; starting");
                }
                return Some(pool);
            }
            Err(e) => {
                let why = format!("{e:#}");
                if attempt == 0 {
                    tracing::warn!(error = %why, "Postgres not usable yet; waiting for it");
                } else {
                    tracing::debug!(error = %why, "Postgres still not usable");
                }
                readiness.waiting_for_database(why);
            }
        }
        let delay = RETRY.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn prepare_database(args: &ServeArgs, secrets: &SecretBox) -> anyhow::Result<sqlx::PgPool> {
    let pool = db::connect(
        &args.database.database_url,
        args.database.database_max_connections,
    )
    .await?;
    db::migrate(&pool).await?;
    let resealed = registry::reseal_legacy(&pool, secrets)
        .await
        .context("re-seal credentials stored without their row binding")?;
    if resealed != Default::default() {
        tracing::info!(
            resealed = resealed.resealed,
            failed = resealed.failed,
            "re-sealed credentials bound to their server rows"
        );
    }
    Ok(pool)
}

/// Runs `ferry-coordinator serve` until the drain that `drain` starts
/// (SIGTERM) has lasted `FERRY_DRAIN_DELAY_SECS`; see [`stop_after_drain`].
pub(crate) async fn serve(args: ServeArgs, drain: CancellationToken) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    tokio::spawn(stop_after_drain(
        drain.clone(),
        Duration::from_secs(args.drain_delay_secs),
        cancel.clone(),
    ));
    let tls = TlsPaths {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    }
    .load()?;
    let secrets = SecretBox::from_key_file(&args.secret_key_file)?;
    // Broker TLS files are checked at start: a wrong one fails here, named.
    let broker_tls = match &args.amqp_url {
        Some(url) => BrokerTls::load(
            url,
            &BrokerTlsFiles {
                ca: args.amqp_ca.clone(),
                cert: args.amqp_cert.clone(),
                key: args.amqp_key.clone(),
            },
        )?,
        None => None,
    };
    let readiness = Arc::new(Readiness::default());
    if let Some(addr) = args.http_listen {
        let bound = ferry_proto::http::serve(addr, readiness.clone(), drain.clone()).await?;
        tracing::info!(%bound, "serving /healthz, /readyz and /metrics over plain HTTP");
        println!("ferry-coordinator http on {bound}");
    }
    // Without Postgres there is nothing to serve: wait for it (readiness says
    // why) instead of exiting, so a coordinator may start before its database.
    let Some(pool) = wait_for_database(&args, &secrets, &readiness, &cancel).await else {
        return Ok(());
    };
    readiness.connected(pool.clone());
    let id = args
        .coordinator_id
        .clone()
        .unwrap_or_else(default_coordinator_id);
    let coord = Coordinator::new(pool, secrets, id.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("build reflection v1")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("build reflection v1alpha")?;

    let settings = TaskSettings {
        lease: Duration::from_secs(args.task_lease_secs.max(5)),
        retry: RetryPolicy {
            max_attempts: args.max_attempts.clamp(1, 1000) as i32,
            backoff: Backoff::new(
                Duration::from_secs(args.retry_base_secs),
                Duration::from_secs(args.retry_max_secs),
            ),
        },
        send_queue: args.agent_send_queue.clamp(1, 1 << 20),
    };
    let agents = AgentStreams::new(coord.clone(), settings, cancel.clone());
    let agent_service = InterceptedService::new(
        AgentServiceServer::new(agents.clone())
            .max_decoding_message_size(ferry_proto::AGENT_STREAM_MAX_MESSAGE)
            .max_encoding_message_size(ferry_proto::AGENT_STREAM_MAX_MESSAGE),
        require_agent,
    );
    let admin = AdminServiceServer::with_interceptor(
        Admin {
            coord: coord.clone(),
            agents: agents.clone(),
        },
        require_admin,
    );

    let incoming = TcpIncoming::bind(args.listen)
        .with_context(|| format!("listen on {}", args.listen))?
        .with_nodelay(Some(true));
    let bound = incoming.local_addr().context("local address")?;

    let mut background = tokio::task::JoinSet::new();
    let broker = BrokerState::default();
    background.spawn(health::follow(
        readiness.clone(),
        health,
        args.amqp_url.as_ref().map(|_| broker.clone()),
        drain.clone(),
    ));
    background.spawn(coord.clone().run_listener(cancel.clone()));
    background.spawn(tasks::run_background(
        coord.clone(),
        agents.clone(),
        cancel.clone(),
    ));
    background.spawn(crate::counts::run(coord.db.clone(), cancel.clone()));
    background.spawn(crate::retention::run(
        coord.db.clone(),
        crate::retention::Retention {
            keep: (args.retention_days > 0).then(|| {
                std::time::Duration::from_secs(args.retention_days.saturating_mul(86_400))
            }),
            every: std::time::Duration::from_secs(args.retention_interval_secs.max(1)),
        },
        cancel.clone(),
    ));
    // Without a broker nothing would ever publish them.
    crate::transitions::announce_failures(args.announce_failures && args.amqp_url.is_some());
    match &args.amqp_url {
        Some(url) => {
            let relay = RelayConfig {
                amqp_url: url.clone(),
                tls: broker_tls,
                exchange: args.amqp_exchange.clone(),
                routing_key: args.amqp_routing_key.clone(),
                failure_routing_key: args.amqp_failure_routing_key.clone(),
                batch: args.amqp_batch.clamp(1, 10_000),
                retry: settings.retry,
                max_attempts: args.amqp_max_attempts.max(1),
            };
            background.spawn(relay::run(coord.clone(), relay, broker, cancel.clone()));
        }
        None => tracing::warn!("FERRY_AMQP_URL is not set: stored files will not be announced"),
    }

    tracing::info!(%bound, coordinator = %id, "serving");
    println!("ferry-coordinator listening on {bound}");

    let shutdown = cancel.clone();
    let result = Server::builder()
        .tls_config(tls.server_config())
        .context("TLS configuration")?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .add_service(agent_service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .context("gRPC server");
    cancel.cancel();
    while background.join_next().await.is_some() {}
    agents.shutdown().await;
    tracing::info!("stopped");
    result
}

/// The drain: once `drain` fires, readiness fails at once (see
/// [`health::follow`] and [`ferry_proto::http::serve`]) while gRPC, agents,
/// scheduling and the relay go on for `delay`, so a balancer checking
/// `/readyz` marks this coordinator down and sends new connections elsewhere
/// before its listener closes; then `cancel` stops everything.
async fn stop_after_drain(drain: CancellationToken, delay: Duration, cancel: CancellationToken) {
    drain.cancelled().await;
    tracing::info!(
        delay_secs = delay.as_secs(),
        "draining: not ready; closing the gRPC listener after the drain delay"
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = cancel.cancelled() => {}
    }
    cancel.cancel();
}
