//! Workers: durable, explicit-ack JetStream consumers. [`consume`] is the loop every worker role
//! shares — pull, handle one message, ack; on a transient failure, nak with backoff; on a
//! permanent one, or once `max_deliver` is spent, copy the message to the dead-letter stream with
//! the reason and terminate it so the consumer keeps going.

pub mod registry;

use std::future::Future;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::bus::{Publisher, subjects};

/// Deliveries before a message is dead-lettered.
pub const MAX_DELIVER: i64 = 5;

/// Delay before a message that failed for the n-th time (1-based) is delivered again.
fn retry_delay(delivered: i64) -> Duration {
    const DELAYS_MS: [u64; 4] = [100, 500, 2_000, 5_000];
    let index = (delivered.max(1) as usize - 1).min(DELAYS_MS.len() - 1);
    Duration::from_millis(DELAYS_MS[index])
}

/// Why a handler did not finish a message.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Might work later (bus hiccup, a CAS race, an agent not yet applied): redeliver.
    #[error("transient: {0}")]
    Transient(String),
    /// Will never work (unreadable payload): dead-letter now.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// What a worker does with one message.
pub trait Handler: Send + Sync {
    fn handle(&self, message: &Message) -> impl Future<Output = Result<(), HandleError>> + Send;
}

/// Runs `handler` over every message of `consumer` until `stop` fires. The current message is
/// always finished (acked, naked or dead-lettered) before returning.
pub async fn consume<H: Handler>(
    consumer: PullConsumer,
    stream: &'static str,
    name: &'static str,
    publisher: Publisher,
    stop: CancellationToken,
    handler: H,
) {
    loop {
        let messages = tokio::select! {
            () = stop.cancelled() => return,
            messages = consumer.messages() => messages,
        };
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(consumer = name, error = %err, "cannot pull; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::warn!(consumer = name, error = %err, "pull interrupted");
                    continue;
                }
                None => break,
            };
            let outcome = handler.handle(&message).await;
            settle(&publisher, stream, name, message, outcome).await;
        }
    }
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
        Err(HandleError::Transient(reason)) if delivered < MAX_DELIVER => {
            tracing::warn!(consumer, subject = %message.subject, delivered, reason, "handler failed; will retry");
            message
                .ack_with(AckKind::Nak(Some(retry_delay(delivered))))
                .await
        }
        Err(err) => {
            let reason = err.to_string();
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
