//! Everything that touches NATS: subject names, stream/KV provisioning, the embedded server,
//! the connection, and publish-and-ack with dedupe ids and a bounded wait; and the settings of
//! all of these ([`NatsTarget`], [`StreamSettings`], [`GroupCommitSettings`]).

pub mod batch;
pub mod embedded;
pub mod group;
pub mod provision;
mod settings;
pub mod subjects;
pub mod unreadable;

pub use settings::{
    Durability, EmbeddedSettings, GroupCommitMode, GroupCommitSettings, NatsAuth, NatsTarget,
    StreamSettings,
};

use std::borrow::Cow;
use std::error::Error as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectOptions, HeaderMap, ServerAddr};
use bytes::Bytes;
use serde::Serialize;

use crate::telemetry::Cause;
use group::{GroupCommit, GroupSettings};

/// Opens a client that reconnects forever with capped exponential backoff. Returns at once;
/// the connection may still be on its way (see [`wait_connected`]).
pub async fn connect(urls: &[String], auth: &NatsAuth) -> anyhow::Result<Client> {
    let addrs = urls
        .iter()
        .map(|u| u.parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("NATS_URL: cannot parse server address")?;
    let mut options = ConnectOptions::new()
        .name("auto-com-center")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => {
                    CONNECTIONS.send_modify(|n| *n += 1);
                    tracing::info!("connected to NATS");
                }
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    options = match auth {
        NatsAuth::None => options,
        NatsAuth::UserPassword(user, password) => {
            options.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::CredsFile(path) => options
            .credentials_file(path)
            .await
            .with_context(|| format!("NATS_CREDS: cannot read {}", path.display()))?,
    };
    options.connect(addrs).await.context("connecting to NATS")
}

/// Counts the connections made by every client [`connect`] opened in this process, so that
/// whatever must act on a reconnection waits for one ([`reconnected`]) rather than polling.
static CONNECTIONS: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(0));

/// Completes once `client` is connected again after its `connects` statistic read `since`.
/// Woken by the connection events of clients [`connect`] opened; for any other client it
/// looks every few seconds.
pub async fn reconnected(client: &Client, since: u64) {
    const UNSIGNALLED: Duration = Duration::from_secs(5);
    // The count moves before the event is delivered, the state a moment after it.
    const SETTLING: Duration = Duration::from_millis(50);
    let mut events = CONNECTIONS.subscribe();
    let statistics = client.statistics();
    loop {
        let connects = statistics
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        if connects != since && client.connection_state() == State::Connected {
            return;
        }
        let wait = if connects != since {
            SETTLING
        } else {
            UNSIGNALLED
        };
        tokio::select! {
            _ = events.changed() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// 0 ms, then 50 ms doubling to at most 2 s between attempts.
fn reconnect_delay(attempt: usize) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    let exp = attempt.min(10) as u32;
    Duration::from_millis(50u64.saturating_mul(2u64.pow(exp))).min(Duration::from_secs(2))
}

/// Waits until the client is connected, logging while it waits.
pub async fn wait_connected(client: &Client) {
    let mut waited = 0u32;
    // The state can read Connected a moment before the server's INFO is stored: wait for both,
    // or a caller reading `server_info()` gets the default, a max_payload of 0.
    while client.connection_state() != State::Connected || client.try_server_info().is_none() {
        if waited % 50 == 49 {
            tracing::warn!("still waiting for NATS");
        }
        waited += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where JetStream stored a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ack {
    pub stream: String,
    pub seq: u64,
    /// True when the dedupe id was already stored within the duplicate window.
    pub duplicate: bool,
}

/// Why a publish did not produce an ack. Each kind maps to one answer (see `contract`); the
/// cause is kept as the error's source, for the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishFailure {
    /// Not connected, timed out or no stream answered: try again later (503).
    #[error("the message bus is unavailable ({reason})")]
    Unavailable {
        reason: &'static str,
        #[source]
        cause: Option<Cause>,
    },
    /// Bigger than the server's max payload (413).
    #[error("message exceeds the bus's maximum payload")]
    TooLarge,
    /// The stream is at its limit and refuses new messages (`discard: new`) (503).
    #[error("the stream refused the message")]
    StreamFull(#[source] Cause),
    /// The subject no longer holds what the write was conditional on
    /// (`Nats-Expected-Last-Subject-Sequence`, [`expect_subject_empty`]): another write came
    /// first. Never an answer by itself: the caller reads what came first and decides.
    #[error("the subject holds a message the write did not expect")]
    Conflict(#[source] Cause),
    /// Any other refusal (500): a bug or a misconfigured server.
    #[error("the bus refused the message")]
    Rejected(#[source] Cause),
}

/// Headers that make a write conditional on its subject holding no message yet: the server
/// stores it only then, and otherwise answers [`PublishFailure::Conflict`]. The check and the
/// write are one step on the server, so of writes racing on one empty subject, from any
/// replica, exactly one is stored (a repeat of a stored dedupe id is still `duplicate`).
pub fn expect_subject_empty() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(EXPECTED_SUBJECT_SEQUENCE, "0");
    headers
}

/// The header that makes a write conditional on its subject's last sequence (0: none yet).
pub(crate) const EXPECTED_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";

/// True when `headers` make a write conditional on its subject's last sequence.
pub(crate) fn is_conditional(headers: &HeaderMap) -> bool {
    headers.get(EXPECTED_SUBJECT_SEQUENCE).is_some()
}

impl PublishFailure {
    /// Unavailable for a reason of our own (a timeout, no connection), with no deeper cause.
    pub fn unavailable(reason: &'static str) -> Self {
        Self::Unavailable {
            reason,
            cause: None,
        }
    }

    /// Unavailable because of `cause`.
    pub fn unavailable_by(
        reason: &'static str,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Unavailable {
            reason,
            cause: Some(Arc::from(cause.into())),
        }
    }
}

/// Publishes and waits for the JetStream acknowledgement, never longer than `timeout`.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    client: Client,
    timeout: Duration,
    /// Writers of the streams the ingress writes most, when group commit is on.
    groups: Vec<(&'static str, GroupCommit)>,
}

/// The streams whose writes go through group commit: what agents send, over HTTP or the door.
const GROUPED_STREAMS: [&str; 3] = [
    subjects::AGENTS_STREAM,
    subjects::TASKS_STREAM,
    subjects::EVENTS_STREAM,
];

impl Publisher {
    pub fn new(client: Client, timeout: Duration) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .max_ack_inflight(65_536)
            .build(client.clone());
        Self {
            js,
            client,
            timeout,
            groups: Vec::new(),
        }
    }

    /// Routes writes to the agent, task and event streams through group commit (see
    /// [`group`]). Starts one writer task per stream.
    pub fn with_group_commit(mut self, settings: GroupSettings) -> Self {
        self.groups = GROUPED_STREAMS
            .iter()
            .map(|&stream| {
                let writer = GroupCommit::start(
                    stream,
                    self.js.clone(),
                    self.client.clone(),
                    self.timeout,
                    settings,
                );
                (stream, writer)
            })
            .collect();
        self
    }

    /// The group-commit writer of `stream`, if group commit is on.
    pub fn group(&self, stream: &str) -> Option<&GroupCommit> {
        self.groups
            .iter()
            .find(|(name, _)| *name == stream)
            .map(|(_, writer)| writer)
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The bound on one write's acknowledgement, also used for reads made to decide a write.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Stores `payload` on `subject` with dedupe id `msg_id` and returns where it landed. The
    /// message carries the W3C trace context of a producer span, child of the current span.
    pub async fn publish(
        &self,
        subject: String,
        msg_id: &str,
        payload: Bytes,
        headers: Option<HeaderMap>,
    ) -> Result<Ack, PublishFailure> {
        let (span, stream, headers) = producer_span(&subject, msg_id, headers);
        // Not entered while the write is awaited: nothing in it logs, the message carries the
        // span's context already (above), and entering and leaving a span on every poll is
        // paid per request.
        let result = self.send(stream, subject, msg_id, payload, headers).await;
        record_ack(&span, &result);
        result
    }

    /// [`Self::publish`] in two halves: sends the message now and returns its acknowledgement
    /// to await later. Messages sent one after another this way (the previous call returned
    /// before the next began) are stored in that order, however their acknowledgements are
    /// awaited: they travel on one connection, which the server reads in order. Always an
    /// ordinary publish, never through group commit, whose writes of one stream run side by side.
    /// One [`Self::timeout`] covers both halves.
    pub async fn send_in_order(
        &self,
        subject: String,
        msg_id: &str,
        payload: Bytes,
        headers: Option<HeaderMap>,
    ) -> Result<Unacked, PublishFailure> {
        let (span, _, headers) = producer_span(&subject, msg_id, headers);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let sent = if self.client.connection_state() == State::Connected {
            let message = PublishMessage::build()
                .payload(payload)
                .headers(headers)
                .message_id(msg_id);
            tokio::time::timeout_at(deadline, self.js.send_publish(subject, message))
                .await
                .map_err(|_| PublishFailure::unavailable("no acknowledgement in time"))
                .and_then(|sent| sent.map_err(classify))
        } else {
            Err(PublishFailure::unavailable("not connected"))
        };
        match sent {
            Ok(ack) => Ok(Unacked {
                ack,
                span,
                deadline,
            }),
            Err(failure) => {
                span.record("otel.status_code", "ERROR");
                Err(failure)
            }
        }
    }

    async fn send(
        &self,
        stream: Option<&'static str>,
        subject: String,
        msg_id: &str,
        payload: Bytes,
        headers: HeaderMap,
    ) -> Result<Ack, PublishFailure> {
        if self.client.connection_state() != State::Connected {
            return Err(PublishFailure::unavailable("not connected"));
        }
        if let Some(writer) = stream.and_then(|s| self.group(s)) {
            return tokio::time::timeout(
                self.timeout,
                writer.publish(subject, msg_id, payload, headers),
            )
            .await
            .map_err(|_| PublishFailure::unavailable("no acknowledgement in time"))?;
        }
        let message = PublishMessage::build()
            .payload(payload)
            .headers(headers)
            .message_id(msg_id);
        let attempt = async {
            let ack = self.js.send_publish(subject, message).await?;
            ack.await
        };
        let ack = tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| PublishFailure::unavailable("no acknowledgement in time"))?
            .map_err(classify)?;
        Ok(Ack {
            stream: ack.stream,
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}

/// A message [`Publisher::send_in_order`] sent, whose acknowledgement is still to come.
pub struct Unacked {
    ack: jetstream::context::PublishAckFuture,
    span: tracing::Span,
    deadline: tokio::time::Instant,
}

impl Unacked {
    /// Where JetStream stored the message, or why it did not; never past the publish timeout
    /// counted from the send.
    pub async fn acked(self) -> Result<Ack, PublishFailure> {
        let result = ack_by(self.ack, self.deadline).await;
        record_ack(&self.span, &result);
        result
    }
}

/// The producer span of a publish on `subject` (named once per catalog entry; none when nothing
/// is exported), the stream the catalog gives it, and `headers` with the trace context in them.
fn producer_span(
    subject: &str,
    msg_id: &str,
    headers: Option<HeaderMap>,
) -> (tracing::Span, Option<&'static str>, HeaderMap) {
    // One catalog look-up per publish gives both the span name and the stream.
    let spec = subjects::CATALOG
        .iter()
        .position(|spec| subjects::matches(spec.subject, subject));
    let stream = spec.map(|i| subjects::CATALOG[i].stream);
    let mut headers = headers.unwrap_or_default();
    // Not exported (see `telemetry::exporting`): no producer span is made, only the headers
    // one would give the message; the consumer continues the same trace.
    if !crate::telemetry::exporting() {
        crate::telemetry::inject_child(&tracing::Span::current(), &mut headers);
        return (tracing::Span::none(), stream, headers);
    }
    let span = {
        let name = match spec {
            Some(i) => Cow::Borrowed(send_names()[i].as_str()),
            // Not in the catalog: rare, so the name may cost an allocation.
            None => Cow::Owned(format!("send {subject}")),
        };
        tracing::info_span!(
            "nats.publish",
            otel.name = &*name,
            otel.kind = "producer",
            otel.status_code = tracing::field::Empty,
            messaging.system = "nats",
            messaging.operation.type = "send",
            messaging.destination.name = subject,
            messaging.message.id = msg_id,
            messaging.nats.stream_sequence = tracing::field::Empty,
            messaging.nats.duplicate = tracing::field::Empty,
        )
    };
    crate::telemetry::inject(&span, &mut headers);
    (span, stream, headers)
}

/// Records on a producer span where its message landed, or that it failed.
fn record_ack(span: &tracing::Span, result: &Result<Ack, PublishFailure>) {
    match result {
        Ok(ack) => {
            span.record("messaging.nats.stream_sequence", ack.seq);
            if ack.duplicate {
                span.record("messaging.nats.duplicate", true);
            }
        }
        Err(_) => {
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// The producer span name of each [`subjects::CATALOG`] entry (`send <family>`), by index:
/// made once, so a publish allocates no name.
fn send_names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        subjects::CATALOG
            .iter()
            .map(|spec| format!("send {}", subjects::family(spec.subject)))
            .collect()
    })
}

/// Maps an async-nats publish error to what it means for the caller, by kind and server error
/// code, never by message text.
/// The acknowledgement of a sent publish, awaited until `deadline`.
async fn ack_by(
    ack: jetstream::context::PublishAckFuture,
    deadline: tokio::time::Instant,
) -> Result<Ack, PublishFailure> {
    tokio::time::timeout_at(deadline, ack.into_future())
        .await
        .map_err(|_| PublishFailure::unavailable("no acknowledgement in time"))
        .and_then(|acked| acked.map_err(classify))
        .map(|ack| Ack {
            stream: ack.stream,
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
}

fn classify(err: jetstream::context::PublishError) -> PublishFailure {
    let unavailable = match err.kind() {
        PublishErrorKind::TimedOut => Some("timed out"),
        PublishErrorKind::BrokenPipe => Some("connection lost"),
        PublishErrorKind::StreamNotFound => Some("no stream answered"),
        PublishErrorKind::MaxAckPending => Some("too many acknowledgements pending"),
        PublishErrorKind::MaxPayloadExceeded => return PublishFailure::TooLarge,
        PublishErrorKind::WrongLastSequence => return PublishFailure::Conflict(Arc::new(err)),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::Other => None,
    };
    if let Some(reason) = unavailable {
        return PublishFailure::unavailable_by(reason, err);
    }
    let code = err
        .source()
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(jetstream::Error::error_code);
    match code {
        Some(
            ErrorCode::STREAM_STORE_FAILED
            | ErrorCode::STORAGE_RESOURCES_EXCEEDED
            | ErrorCode::ACCOUNT_RESOURCES_EXCEEDED
            | ErrorCode::INSUFFICIENT_RESOURCES,
        ) => PublishFailure::StreamFull(Arc::new(err)),
        Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) => PublishFailure::TooLarge,
        // A replicated stream refuses a condition on a subject with a write still in flight:
        // another write came first all the same.
        Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT) => {
            PublishFailure::Conflict(Arc::new(err))
        }
        Some(ErrorCode::CLUSTER_NOT_AVAILABLE | ErrorCode::CLUSTER_NO_PEERS) => {
            PublishFailure::unavailable_by("no cluster quorum", err)
        }
        _ => PublishFailure::Rejected(Arc::new(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_catalog_entry_names_its_publishes_as_its_family() {
        for (i, spec) in subjects::CATALOG.iter().enumerate() {
            // A concrete subject under the pattern: every wildcard made one token.
            let subject = spec.subject.replace(['*', '>'], "agent-1");
            let found = subjects::CATALOG
                .iter()
                .position(|spec| subjects::matches(spec.subject, &subject))
                .expect("in the catalog");
            assert_eq!(
                send_names()[found],
                format!("send {}", subjects::family(&subject)),
                "{subject}"
            );
            assert_eq!(
                subjects::CATALOG[found].stream,
                spec.stream,
                "{subject} (entry {i})"
            );
        }
    }
}
