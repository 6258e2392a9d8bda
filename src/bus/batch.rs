//! Atomic batches (ADR-50, nats-server 2.12+, a stream with `allow_atomic_publish`): many
//! messages, one server write. The server stores all of them or none, and answers once, on the
//! commit (the last message, sent as a request). With `fsync` durability that is one fsync for
//! up to [`SERVER_MAX_BATCH`] messages instead of one per message.
//!
//! Two users share this module: the ingress's group commit ([`super::group`]) writes stream
//! messages with [`commit`], and the workers write KV records with [`write_records`] (the
//! registry's coalesced heartbeats, the dispatcher's turns), each record compare-and-set on its
//! revision (`Nats-Expected-Last-Subject-Sequence`; 0 is create-only). One stale revision makes
//! the server refuse the whole batch.
//!
//! The outcome is one of three, and callers branch on it:
//! - stored: message `i` of a batch of `n` whose commit is acknowledged at `seq` is at
//!   `seq - n + 1 + i`;
//! - [`BatchError::NotStored`]: the server refused the batch (a stale revision, a repeated
//!   message id, a stream that takes no batches), so nothing of it is stored and its messages
//!   may be written again one by one, each getting its own answer;
//! - [`BatchError::Unknown`]: no answer in time, a connection that failed while sending, or an
//!   answer that does not match the batch: it may or may not be stored.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use serde::Deserialize;

/// The server's limit on messages in one atomic batch (`jetstream.limits.batch.max_msgs`).
pub const SERVER_MAX_BATCH: usize = 1000;

const BATCH_ID: &str = "Nats-Batch-Id";
const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
const BATCH_COMMIT: &str = "Nats-Batch-Commit";
/// A KV compare-and-set is a publish expecting the key's last revision (0: no revision yet).
use super::EXPECTED_SUBJECT_SEQUENCE as EXPECTED_REVISION;

/// How a batch was not (or maybe not) stored.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Nothing of the batch is stored: the server refused it with JetStream error `code`
    /// (10071: a revision is stale; 10201: a message id repeats), or it was refused here before
    /// anything was sent (`code` 0). Its messages may be written again one by one.
    #[error("atomic batch not stored (error {code}): {description}")]
    NotStored { code: u64, description: String },
    /// The batch may or may not be stored: no answer in time, the connection failed while it
    /// was sent, or the answer does not match the batch.
    #[error("atomic batch outcome unknown: {what}")]
    Unknown {
        what: &'static str,
        #[source]
        source: Option<async_nats::Error>,
    },
}

impl BatchError {
    fn unknown(what: &'static str) -> Self {
        Self::Unknown { what, source: None }
    }

    fn unknown_by(what: &'static str, source: impl Into<async_nats::Error>) -> Self {
        Self::Unknown {
            what,
            source: Some(source.into()),
        }
    }

    fn refused_here(description: &str) -> Self {
        Self::NotStored {
            code: 0,
            description: description.to_owned(),
        }
    }
}

/// One message of a batch.
pub struct Message {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// A committed batch: `count` messages stored in `stream` from sequence `first` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub stream: String,
    pub first: u64,
    pub count: u64,
}

impl Committed {
    /// The stream sequence of message `i` of the batch.
    pub fn seq(&self, i: usize) -> u64 {
        self.first + i as u64
    }
}

/// A process-unique batch id: batches of two bridge processes never share one, and no two
/// batches of this process do.
pub fn next_id() -> String {
    static PREFIX: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| format!("acc-{:016x}", rand::random::<u64>()));
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed) + 1)
}

/// Sends `messages` as one atomic batch and waits up to `timeout` for the commit's answer.
pub async fn commit<I>(
    client: &Client,
    messages: I,
    timeout: Duration,
) -> Result<Committed, BatchError>
where
    I: IntoIterator<Item = Message>,
    I::IntoIter: ExactSizeIterator,
{
    let messages = messages.into_iter();
    let n = messages.len();
    if n == 0 || n > SERVER_MAX_BATCH {
        return Err(BatchError::refused_here(
            "a batch holds 1 to 1,000 messages",
        ));
    }
    let id = next_id();
    let mut commit = None;
    for (i, message) in messages.into_iter().enumerate() {
        let Message {
            subject,
            mut headers,
            payload,
        } = message;
        headers.insert(BATCH_ID, id.as_str());
        headers.insert(BATCH_SEQUENCE, (i + 1).to_string().as_str());
        if i + 1 == n {
            headers.insert(BATCH_COMMIT, "1");
            commit = Some(client.request_with_headers(subject, headers, payload));
        } else if let Err(err) = client.publish_with_headers(subject, headers, payload).await {
            // Without its commit the server stores nothing and drops the partial batch; but a
            // client that cannot send may have sent part of it, so say "unknown", as a commit
            // that went unanswered.
            return Err(BatchError::unknown_by(
                "a message of the batch not sent",
                err,
            ));
        }
    }
    let commit = commit.expect("a batch has a last message");
    let reply = match tokio::time::timeout(timeout, commit).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(err)) if err.kind() == async_nats::RequestErrorKind::NoResponders => {
            // Nobody took the commit: no stream listens on the subject.
            return Err(BatchError::refused_here(
                "no stream took the batch's commit",
            ));
        }
        Ok(Err(err)) => return Err(BatchError::unknown_by("the batch commit failed", err)),
        Err(_) => return Err(BatchError::unknown("no answer to the batch commit in time")),
    };
    settle(&reply.payload, n)
}

/// Reads the server's answer to the commit of a batch of `n` messages.
fn settle(answer: &[u8], n: usize) -> Result<Committed, BatchError> {
    let ack: BatchAck = serde_json::from_slice(answer)
        .map_err(|err| BatchError::unknown_by("unreadable answer to the batch commit", err))?;
    if let Some(error) = ack.error {
        return Err(BatchError::NotStored {
            code: error.err_code,
            description: error.description,
        });
    }
    let n = n as u64;
    if ack.count != n || ack.seq < n {
        // Stored, but we cannot tell where.
        tracing::error!(
            stream = %ack.stream,
            sent = n,
            count = ack.count,
            "atomic batch answer does not match the batch"
        );
        return Err(BatchError::unknown(
            "the answer to the batch commit does not match the batch",
        ));
    }
    Ok(Committed {
        stream: ack.stream,
        first: ack.seq - n + 1,
        count: n,
    })
}

/// One record of a KV batch.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: String,
    pub value: Bytes,
    /// The revision it replaces (compare-and-set), or `None` to create it: the batch is then
    /// refused if the key has any revision (create-only, as `Store::create` for a key never
    /// written; a deleted key is refused too, and written one by one after).
    pub revision: Option<u64>,
}

/// Writes `records` (at most [`SERVER_MAX_BATCH`], each key once) to `store` as one atomic
/// batch, each compare-and-set on its revision, and returns each one's new revision.
pub async fn write_records(
    client: &Client,
    store: &Store,
    records: &[Record],
    timeout: Duration,
) -> Result<Vec<u64>, BatchError> {
    if store.use_jetstream_prefix {
        // The put subject then starts with the context's API prefix, which the store does not
        // expose: such a bucket's records go one by one.
        return Err(BatchError::refused_here(
            "the bucket is reached through a JetStream API prefix",
        ));
    }
    let messages: Vec<_> = records
        .iter()
        .map(|record| {
            let mut headers = HeaderMap::new();
            headers.insert(
                EXPECTED_REVISION,
                record.revision.unwrap_or(0).to_string().as_str(),
            );
            Message {
                subject: key_subject(&store.prefix, store.put_prefix.as_deref(), &record.key),
                headers,
                payload: record.value.clone(),
            }
        })
        .collect();
    let committed = commit(client, messages, timeout).await?;
    Ok((0..records.len()).map(|i| committed.seq(i)).collect())
}

/// Where a record of a bucket is put: under its put prefix (a mirror's origin, a JetStream
/// domain) when it has one.
fn key_subject(prefix: &str, put_prefix: Option<&str>, key: &str) -> String {
    format!("{}{key}", put_prefix.unwrap_or(prefix))
}

/// The server's answer to a batch commit: a pub ack with `batch` and `count`, or an error.
#[derive(Debug, Deserialize)]
struct BatchAck {
    #[serde(default)]
    error: Option<BatchAckError>,
    #[serde(default)]
    stream: String,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: u64,
}

#[derive(Debug, Deserialize)]
struct BatchAckError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_batch_places_each_message_from_the_commit_sequence() {
        let committed = settle(br#"{"stream":"S","seq":40,"batch":"x","count":8}"#, 8).unwrap();
        assert_eq!(
            committed,
            Committed {
                stream: "S".into(),
                first: 33,
                count: 8
            }
        );
        assert_eq!((committed.seq(0), committed.seq(7)), (33, 40));
    }

    #[test]
    fn a_refused_batch_is_not_stored_with_the_server_code() {
        let refused = settle(
            br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 7"},"stream":"S","seq":0}"#,
            3,
        );
        match refused {
            Err(BatchError::NotStored { code, description }) => {
                assert_eq!(code, 10071);
                assert_eq!(description, "wrong last sequence: 7");
            }
            other => panic!("expected NotStored, got {other:?}"),
        }
    }

    #[test]
    fn an_answer_that_does_not_match_the_batch_is_unknown() {
        for answer in [
            &br#"{"stream":"S","seq":40,"count":7}"#[..],
            br#"{"stream":"S","seq":2,"count":8}"#,
            br#"not json"#,
        ] {
            assert!(
                matches!(settle(answer, 8), Err(BatchError::Unknown { .. })),
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[test]
    fn a_record_is_put_under_the_put_prefix_when_the_bucket_has_one() {
        assert_eq!(key_subject("$KV.b.", None, "k-1"), "$KV.b.k-1");
        assert_eq!(
            key_subject("$KV.b.", Some("$JS.hub.API.$KV.b."), "k-1"),
            "$JS.hub.API.$KV.b.k-1"
        );
    }

    #[test]
    fn batch_ids_are_unique_within_the_process() {
        let (a, b) = (next_id(), next_id());
        assert_ne!(a, b);
        assert_eq!(a.rsplit_once('-').unwrap().0, b.rsplit_once('-').unwrap().0);
    }
}
