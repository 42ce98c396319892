//! The outbox relay: publishes committed `outbox` rows to AMQP and marks them.
//!
//! A row is written in the same transaction that sets its file `uploaded`
//! ([`crate::transitions`]); its payload is an
//! [`ferry_common::announcement::Announcement`]. The relay locks a batch of unpublished rows (`FOR UPDATE SKIP LOCKED`, so two
//! coordinators never publish the same row at once), publishes each one
//! (persistent, `mandatory`, publisher confirms), and in the same transaction
//! marks the confirmed rows published and moves their files `uploaded` ->
//! `processed` (the `Announced` event, applied by [`crate::transitions`]).
//! A NACK or a returned (unroutable) message only bumps the row's retry state
//! in Postgres (`attempts`, `last_error`, `next_attempt_at` with backoff; after
//! [`RelayConfig::max_attempts`] the row is parked until an admin retries it,
//! see [`after_refusal`]); rows are offered in `next_attempt_at` order, so
//! refused rows never hold back routable ones. A broken connection rolls the
//! whole batch back and reconnects with backoff.
//!
//! Rows of files that ended `failed` or `lost` (payload `event` = `failed` /
//! `lost`, a [`ferry_common::announcement::FailureAnnouncement`]) go out with
//! the routing key [`RelayConfig::failure_routing_key`] and their own AMQP
//! `type`; their confirm only marks the row published (the file stays where
//! it is). Routing keys escape the server name as one topic word
//! ([`ferry_common::announcement::routing_key`]).
//!
//! **Architecture invariant:** a row is marked published only after the broker
//! confirmed it and did not return it. A crash between the confirm and the
//! commit re-publishes the row later: delivery is at least once, and
//! `message_id` = the file row's `announcement_id` (a UUID per file version,
//! never reused, not even after a database restore rewinds the id sequence)
//! lets consumers deduplicate.
//!
//! `amqps://` URLs are served by [`BrokerTls`]: the broker's certificate is
//! verified against `FERRY_AMQP_CA` when set, else against the system roots,
//! with the optional client certificate `FERRY_AMQP_CERT` + `FERRY_AMQP_KEY`
//! (rustls with the aws-lc-rs provider). Which of those apply is decided by
//! the pure [`tls_plan`]; bad files fail the coordinator's start, naming the
//! variable.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ferry_common::announcement::{Failure, Properties, routing_key};
use ferry_common::backoff::Backoff;
use ferry_common::lifecycle::{Event, RetryPolicy};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::tcp::{AMQPUriTcpExt, RustlsConnector};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::StoreError;
use crate::state::Coordinator;
use crate::transitions::{self, Change};

/// Where and how the relay publishes.
#[derive(Debug, Clone)]
pub(crate) struct RelayConfig {
    /// Broker URL, `amqp://user:pass@host:5672/vhost` or `amqps://...`.
    pub amqp_url: String,
    /// TLS of an `amqps://` URL; `None` for `amqp://`.
    pub tls: Option<BrokerTls>,
    /// Durable topic exchange, declared on connect.
    pub exchange: String,
    /// Routing key template of stored files; `{server}` is replaced by the
    /// server's name (escaped), `{event}` by `stored`.
    pub routing_key: String,
    /// Routing key template of files that ended `failed` / `lost`; `{event}`
    /// is replaced by `failed` or `lost`.
    pub failure_routing_key: String,
    /// Rows published per transaction.
    pub batch: i64,
    /// The retry policy the lifecycle table is applied with.
    pub retry: RetryPolicy,
    /// Broker refusals (NACK / unroutable) of one row before it is parked.
    pub max_attempts: u32,
}

/// Header carrying the outbox row id, used to match returned messages to rows.
pub(crate) const OUTBOX_ID_HEADER: &str = "ferry-outbox-id";

/// Re-read the outbox this often even without a wake-up.
const IDLE_POLL: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound on waiting for one batch's confirms; a broker that does not
/// answer in time is treated as gone.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
const DB_RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
/// Per-row delay before a NACKed or returned row is offered again.
const ROW_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

/// What happens to an outbox row after the broker refused it for the
/// `attempts`-th time.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Refusal {
    /// Offer it again after this delay.
    RetryIn(Duration),
    /// Stop offering it until an admin retries the file.
    Park,
}

/// The retry decision for a refused row (pure; `jitter` in 0..1).
fn after_refusal(attempts: u32, max_attempts: u32, jitter: f64) -> Refusal {
    if attempts >= max_attempts.max(1) {
        Refusal::Park
    } else {
        Refusal::RetryIn(ROW_RETRY.delay_with(attempts.saturating_sub(1), jitter))
    }
}

/// Whether this coordinator's relay holds a working broker connection,
/// reported apart from readiness (gRPC health service `ferry.v1.Relay`,
/// `/metrics` `ferry_broker_connected`): a coordinator without its broker
/// still serves agents, and announcements wait in the outbox.
#[derive(Debug, Clone, Default)]
pub(crate) struct BrokerState(Arc<AtomicBool>);

impl BrokerState {
    pub(crate) fn connected(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn set(&self, up: bool) {
        self.0.store(up, Ordering::SeqCst);
        crate::metrics::BROKER_CONNECTED.set(&[], i64::from(up));
    }
}

/// Publishes the outbox until `cancel` fires. Never returns early: broker and
/// database outages are logged and retried.
pub(crate) async fn run(
    coord: Coordinator,
    cfg: RelayConfig,
    broker: BrokerState,
    cancel: CancellationToken,
) {
    let mut wake = coord.subscribe_file_events();
    let mut outage = false;
    let mut attempt = 0u32;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            c = connect(&cfg, &coord.id) => c,
        };
        let (connection, channel) = match connected {
            Ok(c) => c,
            Err(e) => {
                broker.set(false);
                if outage {
                    tracing::debug!(error = format!("{e:#}"), "AMQP broker still unreachable");
                } else {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "AMQP broker unreachable; announcements wait in the outbox"
                    );
                    outage = true;
                }
                let delay = RECONNECT.delay(attempt);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        if outage {
            tracing::info!(exchange = %cfg.exchange, "AMQP broker reachable again; relaying the outbox");
        } else {
            tracing::info!(exchange = %cfg.exchange, "outbox relay connected to AMQP");
        }
        attempt = 0;
        broker.set(true);

        let pumped = pump(&coord, &cfg, &channel, &mut wake, &cancel).await;
        broker.set(false);
        match pumped {
            Ok(()) => {
                let _ = channel.close(200, "shutdown".into()).await;
                let _ = connection.close(200, "shutdown".into()).await;
                return;
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "AMQP publish failed; batch rolled back, reconnecting"
                );
                outage = true;
                // Dropping the connection closes it; the next loop reconnects.
                drop(channel);
                drop(connection);
            }
        }
    }
}

/// The TLS files named by `FERRY_AMQP_CA`, `FERRY_AMQP_CERT`, `FERRY_AMQP_KEY`.
#[derive(Debug, Clone, Default)]
pub(crate) struct BrokerTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Whom an `amqps://` connection trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Roots {
    /// The system trust store.
    System,
    /// Only the certificates of `FERRY_AMQP_CA`.
    CaFile,
}

/// What the broker settings ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsPlan {
    Plain,
    Tls { roots: Roots, client_cert: bool },
}

/// Decides from the URL scheme and the variables set what TLS to use (pure);
/// a combination that cannot be meant is an error naming the variables.
fn tls_plan(tls_url: bool, ca: bool, cert: bool, key: bool) -> Result<TlsPlan, String> {
    if !tls_url {
        let set: Vec<&str> = [
            (ca, "FERRY_AMQP_CA"),
            (cert, "FERRY_AMQP_CERT"),
            (key, "FERRY_AMQP_KEY"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
        if set.is_empty() {
            return Ok(TlsPlan::Plain);
        }
        return Err(format!(
            "{} set, but FERRY_AMQP_URL is not an amqps:// URL",
            set.join(" and ") + if set.len() == 1 { " is" } else { " are" }
        ));
    }
    match (cert, key) {
        (true, false) => Err(
            "FERRY_AMQP_CERT is set without FERRY_AMQP_KEY (the client certificate's private key)"
                .into(),
        ),
        (false, true) => {
            Err("FERRY_AMQP_KEY is set without FERRY_AMQP_CERT (the client certificate)".into())
        }
        _ => Ok(TlsPlan::Tls {
            roots: if ca { Roots::CaFile } else { Roots::System },
            client_cert: cert,
        }),
    }
}

/// The rustls client configuration of `amqps://` connections.
#[derive(Clone)]
pub(crate) struct BrokerTls(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerTls")
    }
}

impl BrokerTls {
    /// Reads the TLS files `url` needs: `None` for an `amqp://` URL. Every
    /// error names the variable whose file is wrong.
    pub(crate) fn load(url: &str, files: &BrokerTlsFiles) -> anyhow::Result<Option<Self>> {
        // The parse error never echoes the URL (it may hold a password).
        let uri: AMQPUri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("FERRY_AMQP_URL is not a valid AMQP URL: {e}"))?;
        let plan = tls_plan(
            uri.scheme == AMQPScheme::AMQPS,
            files.ca.is_some(),
            files.cert.is_some(),
            files.key.is_some(),
        )
        .map_err(anyhow::Error::msg)?;
        let TlsPlan::Tls { roots, client_cert } = plan else {
            return Ok(None);
        };
        let mut store = rustls::RootCertStore::empty();
        match (roots, &files.ca) {
            (Roots::CaFile, Some(ca)) => {
                for (n, cert) in read_certs("FERRY_AMQP_CA", ca)?.into_iter().enumerate() {
                    store.add(cert).map_err(|e| {
                        anyhow::anyhow!(
                            "FERRY_AMQP_CA: certificate {} in {} is not a usable CA certificate: {e}",
                            n + 1,
                            ca.display()
                        )
                    })?;
                }
            }
            _ => {
                let native = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(native.certs);
                anyhow::ensure!(
                    !store.is_empty(),
                    "no system root certificates found for the amqps:// broker; set FERRY_AMQP_CA to its CA certificate (PEM)"
                );
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions for the AMQP broker")?
            .with_root_certificates(store);
        let config = match (client_cert, &files.cert, &files.key) {
            (true, Some(cert), Some(key)) => {
                let chain = read_certs("FERRY_AMQP_CERT", cert)?;
                let key_der = {
                    use rustls::pki_types::pem::PemObject;
                    rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
                        anyhow::anyhow!(
                            "FERRY_AMQP_KEY: no usable PEM private key in {}: {e}",
                            key.display()
                        )
                    })?
                };
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    anyhow::anyhow!(
                        "FERRY_AMQP_CERT / FERRY_AMQP_KEY: the key does not fit the certificate: {e}"
                    )
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(BrokerTls(Arc::new(config))))
    }
}

/// The PEM certificates of `path`, at least one; errors name `var`.
fn read_certs(
    var: &str,
    path: &Path,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("{var}: cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{var}: {} is not valid PEM: {e}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{var}: {} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

/// Opens the AMQP connection of `cfg`, over TLS for `amqps://`.
async fn open(cfg: &RelayConfig, props: ConnectionProperties) -> anyhow::Result<Connection> {
    let uri: AMQPUri = cfg
        .amqp_url
        .parse()
        .map_err(|e| anyhow::anyhow!("FERRY_AMQP_URL is not a valid AMQP URL: {e}"))?;
    let Some(tls) = &cfg.tls else {
        return Ok(Connection::connect_uri(uri, props).await?);
    };
    anyhow::ensure!(
        uri.scheme == AMQPScheme::AMQPS,
        "TLS settings for an amqp:// URL"
    );
    let connector = RustlsConnector::from(tls.0.clone());
    let runtime = lapin::runtime::default_runtime()?;
    let connection = Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            // TCP as for amqp://, then the handshake with ferry's own config.
            let mut plain = uri.clone();
            plain.scheme = AMQPScheme::AMQP;
            let stream = plain.connect_async(&runtime).await?;
            Ok(stream.into_rustls(&connector, &uri.authority.host).await?)
        },
        props,
    )
    .await?;
    Ok(connection)
}

/// Opens a connection and a confirm-mode channel, and declares the exchange.
async fn connect(cfg: &RelayConfig, coordinator_id: &str) -> anyhow::Result<(Connection, Channel)> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("ferry-coordinator {coordinator_id} relay").into());
    let connection = tokio::time::timeout(CONNECT_TIMEOUT, open(cfg, props))
        .await
        .context("connect to AMQP broker: timed out")?
        .with_context(|| {
            format!(
                "connect to AMQP broker at {}",
                crate::urls::redact(&cfg.amqp_url)
            )
        })?;
    let channel = connection
        .create_channel()
        .await
        .context("open AMQP channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enable publisher confirms")?;
    channel
        .exchange_declare(
            cfg.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declare exchange {}", cfg.exchange))?;
    Ok((connection, channel))
}

/// Why a round stopped: the caller reconnects on the one and waits on the other.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("broker: {0:#}")]
    Broker(anyhow::Error),
    #[error("{0}")]
    Db(#[from] StoreError),
}

impl From<sqlx::Error> for RoundError {
    fn from(e: sqlx::Error) -> Self {
        RoundError::Db(StoreError::Db(e))
    }
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    selected: usize,
    published: usize,
    failed: usize,
}

/// Runs rounds on one channel until cancelled (`Ok`) or the broker fails (`Err`).
async fn pump(
    coord: &Coordinator,
    cfg: &RelayConfig,
    channel: &Channel,
    wake: &mut watch::Receiver<u64>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let mut db_attempt = 0u32;
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        if !channel.status().connected() {
            anyhow::bail!("AMQP channel closed");
        }
        // Changes from here on wake the next idle wait.
        wake.borrow_and_update();
        // A round is not interrupted by `cancel`: it is bounded by
        // CONFIRM_TIMEOUT, and finishing it avoids re-publishing the batch.
        let idle = match round(coord, cfg, channel).await {
            Ok(r) => {
                db_attempt = 0;
                if r.failed > 0 {
                    tracing::debug!(failed = r.failed, "outbox rows not confirmed; will retry");
                }
                // A full batch with progress suggests more rows are waiting.
                !(r.published > 0 && i64::try_from(r.selected).is_ok_and(|n| n >= cfg.batch))
            }
            Err(RoundError::Broker(e)) => return Err(e),
            Err(RoundError::Db(e)) => {
                tracing::warn!(error = %e, "outbox relay database error; retrying");
                let delay = DB_RETRY.delay(db_attempt);
                db_attempt = db_attempt.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        if idle {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = wake.changed() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }
}

/// One row selected for publishing.
#[derive(Debug, sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    file_id: i64,
    payload: serde_json::Value,
    server: String,
    announcement_id: String,
    /// The payload's `event`: `failed` / `lost`, or `None` for a stored file.
    event: Option<String>,
    /// The file version has a post-action (`delete` / `move:`), due once
    /// it is `processed`.
    post_action: bool,
}

impl OutboxRow {
    /// The failure this row announces; `None`: a stored file.
    fn failure(&self) -> Option<Failure> {
        self.event.as_deref().and_then(Failure::of_status)
    }
}

/// Publishes one batch inside one transaction; see the module docs.
async fn round(
    coord: &Coordinator,
    cfg: &RelayConfig,
    channel: &Channel,
) -> Result<Round, RoundError> {
    let mut tx = crate::db::begin_batch(&coord.db).await?;
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "SELECT o.id, o.file_id, o.payload, s.name AS server, o.payload->>'event' AS event, \
                f.announcement_id::text AS announcement_id, f.post_action <> 'keep' AS post_action \
         FROM outbox o JOIN files f ON f.id = o.file_id JOIN servers s ON s.id = f.server_id \
         WHERE o.published_at IS NULL AND o.parked_at IS NULL AND o.next_attempt_at <= now() \
         ORDER BY o.next_attempt_at, o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED",
    )
    .bind(cfg.batch.max(1))
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(Round::default());
    }

    let failures = publish_batch(cfg, channel, &rows)
        .await
        .map_err(RoundError::Broker)?;

    let published: Vec<i64> = rows
        .iter()
        .filter(|r| !failures.contains_key(&r.id))
        .map(|r| r.id)
        .collect();
    // A failure announcement's file stays `failed` / `lost`.
    let processing: Vec<&OutboxRow> = rows
        .iter()
        .filter(|r| !failures.contains_key(&r.id) && r.failure().is_none())
        .collect();
    let published_files: Vec<i64> = processing.iter().map(|r| r.file_id).collect();
    let mut processed = 0usize;
    if !published.is_empty() {
        sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(&published)
            .execute(&mut *tx)
            .await?;
    }
    if !published_files.is_empty() {
        let changes: Vec<Change> = published_files
            .iter()
            .map(|&id| Change::new(id, Event::Announced))
            .collect();
        let actor = format!("coordinator:{}", coord.id);
        let moved = transitions::apply(&mut tx, &actor, &cfg.retry, &changes).await?;
        processed = moved
            .iter()
            .filter(|a| a.outcome.moved_to().is_some())
            .count();
    }
    if !failures.is_empty() {
        let (ids, errors): (Vec<i64>, Vec<String>) =
            failures.iter().map(|(id, e)| (*id, e.clone())).unzip();
        let attempts: Vec<i32> = sqlx::query_scalar(
            "SELECT o.attempts FROM unnest($1::bigint[]) WITH ORDINALITY AS f(id, n) \
             JOIN outbox o ON o.id = f.id ORDER BY f.n",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut delays = Vec::with_capacity(ids.len());
        let mut park = Vec::with_capacity(ids.len());
        for ((id, error), before) in ids.iter().zip(&errors).zip(&attempts) {
            let attempts = u32::try_from(*before).unwrap_or(0).saturating_add(1);
            match after_refusal(attempts, cfg.max_attempts, rand::random::<f64>()) {
                Refusal::RetryIn(delay) => {
                    // Loud on the first refusal and now and then after, not on every retry.
                    if attempts <= 1 || attempts % 20 == 0 {
                        tracing::warn!(outbox_id = id, attempts, error = %error, retry_in = ?delay, "announcement not accepted by the broker; will retry");
                    } else {
                        tracing::debug!(outbox_id = id, attempts, error = %error, retry_in = ?delay, "announcement not accepted by the broker; will retry");
                    }
                    delays.push(delay.as_secs_f64());
                    park.push(false);
                }
                Refusal::Park => {
                    tracing::warn!(outbox_id = id, attempts, error = %error, "announcement refused too often; parked until an admin retries the file");
                    delays.push(0.0);
                    park.push(true);
                }
            }
        }
        sqlx::query(
            "UPDATE outbox o SET attempts = o.attempts + 1, last_error = f.error, \
                    next_attempt_at = now() + make_interval(secs => f.delay), \
                    parked_at = CASE WHEN f.park THEN now() END \
             FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[]) AS f(id, error, delay, park) \
             WHERE o.id = f.id",
        )
        .bind(&ids)
        .bind(&errors)
        .bind(&delays)
        .bind(&park)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    crate::metrics::ANNOUNCEMENTS.add(&["published"], published.len() as u64);

    if processed > 0 && processing.iter().any(|r| r.post_action) {
        // Post-actions are due: wake the scheduler loops (of every
        // coordinator: the poller may be connected elsewhere), which
        // dispatch them. Files that keep their source need no wake-up,
        // and a NOTIFY per round took Postgres's notify lock for nothing.
        coord.files_due().await;
    }
    Ok(Round {
        selected: rows.len(),
        published: published.len(),
        failed: failures.len(),
    })
}

/// The payload with the row's announcement id: rows written before the id
/// existed lack it in the body, and the body always names the `message_id`.
fn with_announcement_id(payload: &serde_json::Value, id: &str) -> serde_json::Value {
    let mut payload = payload.clone();
    if let Some(body) = payload.as_object_mut() {
        body.entry("announcement_id")
            .or_insert_with(|| serde_json::Value::String(id.to_string()));
    }
    payload
}

/// Publishes every row, then awaits every confirm. Returns the rows the
/// broker NACKed or returned, with the reason; `Err` means the channel is
/// unusable and nothing may be marked.
async fn publish_batch(
    cfg: &RelayConfig,
    channel: &Channel,
    rows: &[OutboxRow],
) -> anyhow::Result<HashMap<i64, String>> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut pending = Vec::with_capacity(rows.len());
    for row in rows {
        let body = match row.failure() {
            None => serde_json::to_vec(&with_announcement_id(&row.payload, &row.announcement_id)),
            Some(_) => serde_json::to_vec(&row.payload),
        }
        .context("encode outbox payload")?;
        let mut headers = FieldTable::default();
        headers.insert(OUTBOX_ID_HEADER.into(), AMQPValue::LongLongInt(row.id));
        // From the row's kind, without decoding the body: rows written by an
        // older version go out as they were stored.
        let (announced, key) = match row.failure() {
            None => (
                Properties::for_announcement(&row.announcement_id),
                routing_key(&cfg.routing_key, &row.server, "stored"),
            ),
            Some(failure) => (
                Properties::for_failure(&row.announcement_id, failure, row.id),
                routing_key(&cfg.failure_routing_key, &row.server, failure.as_str()),
            ),
        };
        let properties = BasicProperties::default()
            .with_delivery_mode(announced.delivery_mode)
            .with_content_type(announced.content_type.into())
            .with_message_id(announced.message_id.into())
            .with_timestamp(timestamp)
            .with_type(announced.kind.into())
            .with_headers(headers);
        let confirm = channel
            .basic_publish(
                cfg.exchange.as_str().into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                properties,
            )
            .await
            .with_context(|| format!("publish outbox row {}", row.id))?;
        pending.push((row.id, confirm));
    }

    // lapin hands a returned message to whichever confirm resolves next, not
    // to the publish it belongs to; so returns are matched to rows by header,
    // and NACKs (which lapin matches by delivery tag) by position.
    let confirmations = tokio::time::timeout(CONFIRM_TIMEOUT, async {
        let mut out = Vec::with_capacity(pending.len());
        for (id, confirm) in pending {
            out.push((id, confirm.await));
        }
        out
    })
    .await
    .context("publisher confirms timed out")?;

    let mut failures = HashMap::new();
    let mut returned = Vec::new();
    for (id, confirmation) in confirmations {
        match confirmation.with_context(|| format!("confirm of outbox row {id}"))? {
            Confirmation::Ack(message) => returned.extend(message),
            Confirmation::Nack(message) => {
                crate::metrics::ANNOUNCEMENTS.inc(&["nacked"]);
                returned.extend(message);
                failures.insert(id, "negatively acknowledged by the broker".to_string());
            }
            Confirmation::NotRequested => {
                anyhow::bail!("channel is not in confirm mode");
            }
        }
    }
    let batch: HashSet<i64> = rows.iter().map(|r| r.id).collect();
    for message in returned {
        let id = message
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(outbox_id);
        let reason = format!(
            "returned by the broker: {} {} (exchange {:?}, routing key {:?})",
            message.reply_code,
            message.reply_text.as_str(),
            cfg.exchange,
            message.delivery.routing_key.as_str(),
        );
        match id {
            Some(id) if batch.contains(&id) => {
                crate::metrics::ANNOUNCEMENTS.inc(&["returned"]);
                failures.insert(id, reason);
            }
            _ => {
                // Cannot happen while every publish carries the header; if
                // it does, the row it belonged to cannot be told apart.
                anyhow::bail!("broker returned a message not from this batch: {reason}");
            }
        }
    }
    Ok(failures)
}

/// The outbox id a published message carries in its headers.
fn outbox_id(headers: &FieldTable) -> Option<i64> {
    headers
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == OUTBOX_ID_HEADER)
        .and_then(|(_, v)| match v {
            AMQPValue::LongLongInt(id) => Some(*id),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_payload_gets_the_row_announcement_id_and_a_new_one_keeps_its_own() {
        let old = serde_json::json!({"schema_version": 1, "file_id": 7});
        assert_eq!(with_announcement_id(&old, "u-1")["announcement_id"], "u-1");
        let new = serde_json::json!({"announcement_id": "u-2", "file_id": 7});
        assert_eq!(with_announcement_id(&new, "u-1"), new);
    }

    #[test]
    fn tls_settings_follow_the_url_scheme() {
        assert_eq!(tls_plan(false, false, false, false), Ok(TlsPlan::Plain));
        assert_eq!(
            tls_plan(true, false, false, false),
            Ok(TlsPlan::Tls {
                roots: Roots::System,
                client_cert: false
            })
        );
        assert_eq!(
            tls_plan(true, true, true, true),
            Ok(TlsPlan::Tls {
                roots: Roots::CaFile,
                client_cert: true
            })
        );
        assert_eq!(
            tls_plan(false, true, false, false),
            Err("FERRY_AMQP_CA is set, but FERRY_AMQP_URL is not an amqps:// URL".into())
        );
        assert_eq!(
            tls_plan(false, false, true, true),
            Err(
                "FERRY_AMQP_CERT and FERRY_AMQP_KEY are set, but FERRY_AMQP_URL is not an amqps:// URL"
                    .into()
            )
        );
        let half = tls_plan(true, true, true, false).unwrap_err();
        assert!(
            half.starts_with("FERRY_AMQP_CERT is set without FERRY_AMQP_KEY"),
            "{half}"
        );
        let half = tls_plan(true, false, false, true).unwrap_err();
        assert!(
            half.starts_with("FERRY_AMQP_KEY is set without FERRY_AMQP_CERT"),
            "{half}"
        );
    }

    #[test]
    fn bad_tls_files_name_their_variable() {
        let dir = std::env::temp_dir().join(format!("ferry-relay-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let url = "amqps://u:p@broker.example:5671/%2f";
        let missing = BrokerTlsFiles {
            ca: Some(dir.join("missing.pem")),
            ..Default::default()
        };
        let err = format!("{:#}", BrokerTls::load(url, &missing).unwrap_err());
        assert!(err.starts_with("FERRY_AMQP_CA: cannot read"), "{err}");
        let no_cert = BrokerTlsFiles {
            ca: Some(empty.clone()),
            ..Default::default()
        };
        let err = format!("{:#}", BrokerTls::load(url, &no_cert).unwrap_err());
        assert!(
            err.contains("FERRY_AMQP_CA") && err.contains("holds no PEM certificate"),
            "{err}"
        );
        // A plain URL needs no TLS, and a bad URL never echoes its password.
        assert!(
            BrokerTls::load("amqp://u:p@h:5672/%2f", &BrokerTlsFiles::default())
                .unwrap()
                .is_none()
        );
        let err = format!(
            "{:#}",
            BrokerTls::load("http://u:secret@h/", &BrokerTlsFiles::default()).unwrap_err()
        );
        assert!(
            err.starts_with("FERRY_AMQP_URL") && !err.contains("secret"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refused_rows_back_off_then_park() {
        assert_eq!(
            after_refusal(1, 5, 0.0),
            Refusal::RetryIn(Duration::from_millis(500))
        );
        assert_eq!(
            after_refusal(1, 5, 1.0),
            Refusal::RetryIn(Duration::from_secs(1))
        );
        assert_eq!(
            after_refusal(4, 5, 1.0),
            Refusal::RetryIn(Duration::from_secs(8))
        );
        assert_eq!(after_refusal(5, 5, 0.5), Refusal::Park);
        assert_eq!(after_refusal(9, 5, 0.5), Refusal::Park);
        // The delay is capped.
        assert_eq!(
            after_refusal(30, 100, 1.0),
            Refusal::RetryIn(Duration::from_secs(300))
        );
    }

    #[test]
    fn reads_outbox_id_header() {
        let mut h = FieldTable::default();
        assert_eq!(outbox_id(&h), None);
        h.insert(OUTBOX_ID_HEADER.into(), AMQPValue::LongLongInt(42));
        assert_eq!(outbox_id(&h), Some(42));
    }
}
