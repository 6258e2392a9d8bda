//! Workers: durable, explicit-ack JetStream consumers. [`consume`] is the loop every worker role
//! shares — pull a batch, handle each message, ack; on a transient failure, nak with backoff; on a
//! permanent one, or once `max_deliver` is spent, copy the message to the dead-letter stream with
//! the reason and terminate it so the consumer keeps going.

pub mod registry;

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::bus::{Publisher, subjects};
use crate::telemetry::{self, Cause};

/// A message whose handling fails on its fifth delivery is dead-lettered.
pub const DEAD_LETTER_AFTER: i64 = 5;

/// The server's bound on deliveries: above [`DEAD_LETTER_AFTER`], so that deliveries lost to a
/// worker that crashed mid-batch do not use up the attempts a message gets to be handled.
pub const MAX_DELIVER: i64 = 10;

/// Delay before a message that failed for the n-th time (1-based) is delivered again.
fn retry_delay(delivered: i64) -> Duration {
    const DELAYS_MS: [u64; 4] = [100, 500, 2_000, 5_000];
    let index = (delivered.max(1) as usize - 1).min(DELAYS_MS.len() - 1);
    Duration::from_millis(DELAYS_MS[index])
}

/// Why a handler did not finish a message: what it was doing, and the cause as the error's
/// source (logged, and kept in the dead-letter reason, as a chain).
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Might work later (bus hiccup, a CAS race, an agent not yet applied): redeliver.
    #[error("transient: {context}")]
    Transient {
        context: Cow<'static, str>,
        #[source]
        source: Option<Cause>,
    },
    /// Will never work (unreadable payload): dead-letter now.
    #[error("permanent: {context}")]
    Permanent {
        context: Cow<'static, str>,
        #[source]
        source: Option<Cause>,
    },
}

/// Anything that can be the cause of a failed message: an error, or a message of our own.
type Source = Box<dyn std::error::Error + Send + Sync>;

impl HandleError {
    /// Transient, with nothing under it.
    pub fn transient(context: impl Into<Cow<'static, str>>) -> Self {
        Self::Transient {
            context: context.into(),
            source: None,
        }
    }

    /// Transient, caused by `source`.
    pub fn transient_by(context: &'static str, source: impl Into<Source>) -> Self {
        Self::Transient {
            context: context.into(),
            source: Some(Arc::from(source.into())),
        }
    }

    /// Permanent, caused by `source`.
    pub fn permanent_by(context: &'static str, source: impl Into<Source>) -> Self {
        Self::Permanent {
            context: context.into(),
            source: Some(Arc::from(source.into())),
        }
    }
}

/// What a worker does with one message.
pub trait Handler: Send + Sync {
    fn handle(&self, message: &Message) -> impl Future<Output = Result<(), HandleError>> + Send;
}

/// Messages asked for per pull request.
const BATCH: usize = 64;
/// How long one pull request waits for messages before it ends on its own.
const BATCH_WAIT: Duration = Duration::from_millis(500);
/// How long past [`BATCH_WAIT`] a silent pull request is trusted before it is presumed lost.
const BATCH_GRACE: Duration = Duration::from_millis(500);

/// Runs `handler` over every message of `consumer` until `stop` fires.
///
/// Messages are pulled in bounded batches, and a batch is always handled to its end, even after
/// `stop`: its pull request expires by itself within [`BATCH_WAIT`], so when this returns no
/// request is left at the server that could deliver a message into a connection nobody reads,
/// and a replica taking over gets every unfinished message at once.
pub async fn consume<H: Handler>(
    consumer: PullConsumer,
    stream: &'static str,
    name: &'static str,
    publisher: Publisher,
    stop: CancellationToken,
    handler: H,
) {
    while !stop.is_cancelled() {
        let batch = consumer
            .batch()
            .max_messages(BATCH)
            .expires(BATCH_WAIT)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(consumer = name, error = %err, "cannot pull; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // The server ends the request after BATCH_WAIT; a request lost with a dropped connection
        // is given up a little after that (async-nats itself would wait 5 s more).
        let mut deadline = tokio::time::Instant::now() + BATCH_WAIT + BATCH_GRACE;
        while let Ok(Some(next)) = tokio::time::timeout_at(deadline, batch.next()).await {
            deadline = tokio::time::Instant::now() + BATCH_WAIT + BATCH_GRACE;
            match next {
                Ok(message) => process(&publisher, stream, name, &handler, message).await,
                Err(err) => {
                    tracing::warn!(consumer = name, error = %err, "pull interrupted");
                    break;
                }
            }
        }
    }
}

/// Handles one delivered message in its consumer span and settles it: ack, nak with backoff, or
/// dead-letter. [`consume`] calls it in stream order; the NATS door in its own order.
pub async fn process<H: Handler>(
    publisher: &Publisher,
    stream: &'static str,
    name: &'static str,
    handler: &H,
    message: Message,
) {
    let span = process_span(&message, stream, name);
    async {
        let outcome = handler.handle(&message).await;
        settle(publisher, stream, name, message, outcome).await;
    }
    .instrument(span)
    .await;
}

/// One consumer span per delivery, continuing the producer's trace from the message headers,
/// attributed by the OpenTelemetry messaging conventions.
fn process_span(message: &Message, stream: &str, consumer: &str) -> tracing::Span {
    let info = message.info().ok();
    let subject = message.subject.as_str();
    let family = subjects::family(subject);
    let message_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "nats.process",
        otel.name = %format!("process {family}"),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = %subject,
        messaging.message.id = %message_id,
        messaging.consumer.group.name = consumer,
        messaging.nats.stream = stream,
        messaging.nats.stream_sequence = info.as_ref().map_or(0, |i| i.stream_sequence),
        messaging.nats.redelivery_count = info.as_ref().map_or(0, |i| i.delivered - 1),
    );
    if let Some(headers) = &message.headers {
        let _ = span.set_parent(telemetry::extract(headers));
    }
    span
}

async fn settle(
    publisher: &Publisher,
    stream: &str,
    consumer: &str,
    message: Message,
    outcome: Result<(), HandleError>,
) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    let result = match outcome {
        Ok(()) => message.ack().await,
        Err(err @ HandleError::Transient { .. }) if delivered < DEAD_LETTER_AFTER => {
            tracing::Span::current().record("otel.status_code", "ERROR");
            let reason = telemetry::error_chain(&err);
            tracing::warn!(consumer, subject = %message.subject, delivered, reason, "handler failed; will retry");
            message
                .ack_with(AckKind::Nak(Some(retry_delay(delivered))))
                .await
        }
        Err(err) => {
            tracing::Span::current().record("otel.status_code", "ERROR");
            let reason = telemetry::error_chain(&err);
            tracing::error!(consumer, subject = %message.subject, delivered, reason, "dead-lettering message");
            if let Err(dead) = dead_letter(publisher, stream, consumer, &message, &reason).await {
                // Not stored anywhere yet: leave it to redelivery rather than drop it.
                tracing::error!(consumer, error = %dead, "cannot dead-letter; leaving for redelivery");
                return;
            }
            message.ack_with(AckKind::Term).await
        }
    };
    if let Err(err) = result {
        tracing::warn!(consumer, error = %err, "ack failed; the message will be redelivered");
    }
}

async fn dead_letter(
    publisher: &Publisher,
    stream: &str,
    consumer: &str,
    message: &Message,
    reason: &str,
) -> Result<(), crate::bus::PublishFailure> {
    let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
    let mut headers = HeaderMap::new();
    headers.insert(subjects::DEAD_LETTER_REASON, reason);
    headers.insert(subjects::DEAD_LETTER_SUBJECT, message.subject.as_str());
    headers.insert(subjects::DEAD_LETTER_SEQUENCE, seq.to_string().as_str());
    publisher
        .publish(
            subjects::dead_letter(stream, consumer),
            &format!("dead:{stream}:{consumer}:{seq}"),
            message.payload.clone(),
            Some(headers),
        )
        .await
        .map(|_| ())
}
