//! A private view of the shared RabbitMQ (127.0.0.1:5672, or
//! `FERRY_TEST_AMQP_URL`): a per-test durable topic exchange and an exclusive,
//! auto-delete queue bound to it with `#`, consumed with auto-ack.
//! Tests are isolated by unique exchange names ([`unique_exchange`]).

use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};

use crate::util::random_hex;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// `FERRY_TEST_AMQP_URL` or [`DEFAULT_AMQP_URL`].
pub fn amqp_url() -> String {
    std::env::var("FERRY_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_string())
}

/// A fresh exchange name, `ferry-test-<hex>`.
pub fn unique_exchange() -> String {
    format!("ferry-test-{}", random_hex(6))
}

/// One message taken from the queue.
#[derive(Debug, Clone)]
pub struct AmqpMessage {
    /// The `message_id` property (ferry sets it to the file version's announcement id).
    pub message_id: Option<String>,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// 2 = persistent.
    pub delivery_mode: Option<u8>,
    pub content_type: Option<String>,
    /// The `type` property (`ferry.file.stored`, `ferry.file.failed`, ...).
    pub kind: Option<String>,
    pub redelivered: bool,
}

impl AmqpMessage {
    /// The parts of a delivery the tests look at.
    pub fn of(delivery: lapin::message::Delivery) -> AmqpMessage {
        let props = &delivery.properties;
        AmqpMessage {
            message_id: props.message_id().as_ref().map(|s| s.as_str().to_string()),
            routing_key: delivery.routing_key.as_str().to_string(),
            delivery_mode: *props.delivery_mode(),
            content_type: props
                .content_type()
                .as_ref()
                .map(|s| s.as_str().to_string()),
            kind: props.kind().as_ref().map(|s| s.as_str().to_string()),
            redelivered: delivery.redelivered,
            body: delivery.data,
        }
    }
}

impl AmqpMessage {
    /// The body parsed as JSON; panics if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "AMQP message body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A queue bound with `#` to a durable topic exchange; see the module docs.
pub struct AmqpQueue {
    url: String,
    exchange: String,
    queue: String,
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
}

impl std::fmt::Debug for AmqpQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpQueue")
            .field("exchange", &self.exchange)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl AmqpQueue {
    /// Declares `exchange` (durable topic) and a queue bound to it, and starts
    /// consuming. Panics if RabbitMQ is unreachable.
    pub async fn declare(exchange: &str) -> Self {
        Self::declare_bound(exchange, "#").await
    }

    /// Like [`AmqpQueue::declare`], with the queue bound by `binding_key` only:
    /// messages with other routing keys are unroutable (returned under `mandatory`).
    pub async fn declare_bound(exchange: &str, binding_key: &str) -> Self {
        Self::try_declare(exchange, binding_key)
            .await
            .unwrap_or_else(|e| panic!("declare AMQP exchange {exchange} and test queue: {e:#}"))
    }

    async fn try_declare(exchange: &str, binding_key: &str) -> anyhow::Result<Self> {
        let url = amqp_url();
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .with_context(|| {
                format!("connect to RabbitMQ at {url} (is it running? see deploy/test-deps.sh)")
            })?;
        let channel = connection.create_channel().await.context("open channel")?;
        declare_exchange(&channel, exchange)
            .await
            .context("declare exchange")?;
        let queue = format!("ferry-test-q-{}", random_hex(6));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declare queue")?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("bind queue")?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "ferry-tests".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .context("consume queue")?;
        Ok(Self {
            url,
            exchange: exchange.to_string(),
            queue,
            connection,
            channel,
            consumer,
        })
    }

    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The broker URL (for the coordinator's configuration).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The next message, or `None` after `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Option<AmqpMessage> {
        let delivery = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .ok()??;
        let delivery = delivery.unwrap_or_else(|e| panic!("AMQP consumer on {}: {e}", self.queue));
        Some(AmqpMessage::of(delivery))
    }

    /// Every message that arrives within `duration`.
    pub async fn drain_for(&mut self, duration: Duration) -> Vec<AmqpMessage> {
        let deadline = tokio::time::Instant::now() + duration;
        let mut messages = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return messages;
            }
            match self.next_message(left).await {
                Some(message) => messages.push(message),
                None => return messages,
            }
        }
    }

    /// Publishes a persistent message to the exchange and waits for the
    /// broker's confirm (for tests of the harness and of consumers).
    pub async fn publish(&self, routing_key: &str, message_id: &str, body: &[u8]) {
        let channel = self
            .connection
            .create_channel()
            .await
            .unwrap_or_else(|e| panic!("open AMQP publish channel: {e}"));
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap_or_else(|e| panic!("enable publisher confirms: {e}"));
        let confirm = channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                BasicProperties::default()
                    .with_message_id(message_id.into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap_or_else(|e| panic!("publish to {}: {e}", self.exchange))
            .await
            .unwrap_or_else(|e| panic!("confirm of publish to {}: {e}", self.exchange));
        assert!(
            matches!(confirm, Confirmation::Ack(None)),
            "publish to {} not acked cleanly: {confirm:?}",
            self.exchange
        );
        let _ = channel.close(200, "done".into()).await;
    }

    /// Closes the channel and connection (the queue goes away with them).
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

impl Drop for AmqpQueue {
    fn drop(&mut self) {
        // Best effort, on a thread with its own runtime (the test's runtime may
        // be shutting down): remove the per-test exchange so they do not pile up.
        let url = self.url.clone();
        let exchange = self.exchange.clone();
        let (done_tx, done_rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("delete-test-exchange".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                let _ = rt.block_on(async {
                    let connection =
                        Connection::connect(&url, ConnectionProperties::default()).await?;
                    let channel = connection.create_channel().await?;
                    channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await?;
                    let _ = connection.close(200, "done".into()).await;
                    lapin::Result::Ok(())
                });
                let _ = done_tx.send(());
            });
        if spawned.is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// Declares `exchange` as the relay does: a durable topic exchange.
pub(crate) async fn declare_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}
