//! Streams and KV buckets, created or updated idempotently at start with explicit settings:
//! file storage, `discard: new` with bounded size and age (a full stream refuses writes rather
//! than dropping old ones), a duplicate window for dedupe, limits retention.
//!
//! Every replica computes the same configuration from the same settings, so several replicas
//! starting at once converge: whoever creates first wins and the others' update is a no-op.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::Context;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};

use super::StreamSettings;
use super::subjects::{self, AGENTS_BUCKET, ALERTING_BUCKET, LIMITS_BUCKET, TASKS_BUCKET};

/// The streams the bridge owns.
pub const STREAMS: &[&str] = &[
    subjects::AGENTS_STREAM,
    subjects::TASKS_STREAM,
    subjects::SUBMISSIONS_STREAM,
    subjects::EVENTS_STREAM,
    subjects::DEAD_LETTER_STREAM,
    subjects::INBOUND_STREAM,
    subjects::REJECTED_STREAM,
    subjects::METRICS_STREAM,
    subjects::ALERTS_STREAM,
    subjects::AUDIT_STREAM,
];

/// Metric snapshots matter for minutes: only the last few per subject are kept.
const METRICS_PER_SUBJECT: i64 = 10;

/// The configuration of one of our streams.
pub fn stream_config(name: &str, settings: &StreamSettings) -> stream::Config {
    let mut config = base_stream_config(name, settings);
    if name == subjects::METRICS_STREAM {
        // Old snapshots are worthless: per subject only the last few stay (the per-subject
        // limit drops the oldest even with `discard: new`), so the stream stays small.
        config.max_messages_per_subject = METRICS_PER_SUBJECT;
    }
    if name == subjects::EVENTS_STREAM {
        config.max_age = settings.events_max_age;
    }
    if name == subjects::AUDIT_STREAM {
        // Nobody rewrites the audit trail: records leave only by age.
        config.max_age = settings.audit_max_age;
        config.deny_purge = true;
    }
    if name == subjects::INBOUND_STREAM {
        // Only the door's intake publishes here, with dedupe ids scoped to the authenticated
        // agent, so the normal duplicate window applies per agent. The stream stores each
        // message on the subject the agent published on.
        config.subjects = vec![subjects::INBOUND_CAPTURE.to_owned()];
        config.subject_transform = Some(stream::SubjectTransform {
            source: subjects::INBOUND_CAPTURE.to_owned(),
            destination: subjects::INBOUND_ALL.to_owned(),
        });
        // Holds only what the door has not handled yet: a message leaves once the door acks it.
        config.retention = RetentionPolicy::WorkQueue;
    }
    if name == subjects::SUBMISSIONS_STREAM {
        // One submission per task id for the life of the stream: a second message on the
        // subject is refused (not stored over the first), so a task id is never reused; the
        // duplicate window answers an identical retry as a duplicate before the limit applies.
        config.max_messages_per_subject = 1;
        config.discard_new_per_subject = true;
    }
    config
}

fn base_stream_config(name: &str, settings: &StreamSettings) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        description: Some("owned by auto-com-center".to_owned()),
        subjects: subjects::subjects_of(name),
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::New,
        max_bytes: settings.max_bytes,
        max_age: settings.max_age,
        max_messages: -1,
        max_messages_per_subject: -1,
        duplicate_window: settings.duplicate_window,
        num_replicas: settings.replicas,
        // Reads of the last message per subject (task state, registration lookups) go to the
        // leader, so they see every acknowledged write.
        allow_direct: false,
        deny_delete: true,
        deny_purge: false,
        // Group commit writes concurrent requests as one atomic batch (nats-server 2.12+;
        // older servers ignore the field, and the bridge then publishes one by one).
        allow_atomic_publish: true,
        ..Default::default()
    }
}

pub fn agents_bucket_config(settings: &StreamSettings) -> kv::Config {
    kv::Config {
        bucket: AGENTS_BUCKET.to_owned(),
        description: "agent registry view, maintained by the registry worker".to_owned(),
        history: 5,
        storage: StorageType::File,
        num_replicas: settings.replicas,
        max_bytes: settings.max_bytes,
        ..Default::default()
    }
}

/// The alerting worker's bucket: one writer at a time (the lease holder) for alert states, the
/// admin API for acknowledgements and silences.
pub fn alerting_bucket_config(settings: &StreamSettings) -> kv::Config {
    kv::Config {
        bucket: ALERTING_BUCKET.to_owned(),
        description: "alerting lease, alert states, acknowledgements, silences".to_owned(),
        history: 1,
        storage: StorageType::File,
        num_replicas: settings.replicas,
        max_bytes: settings.max_bytes.min(64 << 20),
        ..Default::default()
    }
}

/// The dispatcher's bucket: one record per task and the dispatcher lease, written by the acting
/// dispatcher only (compare-and-set on the revision).
pub fn tasks_bucket_config(settings: &StreamSettings) -> kv::Config {
    kv::Config {
        bucket: TASKS_BUCKET.to_owned(),
        description: "task records and the dispatcher lease, written by the dispatcher".to_owned(),
        history: 1,
        storage: StorageType::File,
        num_replicas: settings.replicas,
        max_bytes: settings.max_bytes,
        ..Default::default()
    }
}

/// Admission's per-agent accounting, written by every replica with create and compare-and-set:
/// store quotas. A key lives as long as the messages it counts (`max_age`).
pub fn limits_bucket_config(settings: &StreamSettings) -> kv::Config {
    kv::Config {
        bucket: LIMITS_BUCKET.to_owned(),
        description: "store quota of each agent (admission)".to_owned(),
        history: 1,
        max_age: settings.max_age,
        storage: StorageType::File,
        num_replicas: settings.replicas,
        max_bytes: settings.max_bytes,
        ..Default::default()
    }
}

/// Creates or updates every stream and bucket. Retries briefly when another replica races us.
pub async fn provision(js: &Context, settings: &StreamSettings) -> anyhow::Result<()> {
    for name in STREAMS {
        let mut config = stream_config(name, settings);
        // The server cannot change a stream's retention to or from work-queue: a stream made
        // before keeps its own (see docs/operations.md for switching it).
        if let Ok(existing) = js.get_stream(name).await {
            let current = existing.cached_info().config.retention;
            if current != config.retention {
                tracing::warn!(
                    stream = name,
                    "the stream keeps the retention it was made with ({current:?}, not {:?}); \
                     drain and delete it to switch",
                    config.retention
                );
                config.retention = current;
            }
        }
        retry(|| async {
            js.create_or_update_stream(config.clone())
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        })
        .await
        .with_context(|| format!("creating or updating stream {name}"))?;
    }
    let buckets = [
        agents_bucket_config(settings),
        alerting_bucket_config(settings),
        tasks_bucket_config(settings),
        limits_bucket_config(settings),
    ];
    for config in buckets {
        let name = config.bucket.clone();
        retry(|| async {
            js.create_or_update_key_value(config.clone())
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        })
        .await
        .with_context(|| format!("creating or updating KV bucket {name}"))?;
    }
    // The registry writes many agents' records in one atomic batch, the dispatcher a turn's
    // task records. A bucket's config has no field for it, and updating the bucket clears it:
    // set it on the bucket's stream after.
    for bucket in [AGENTS_BUCKET, TASKS_BUCKET] {
        let name = format!("KV_{bucket}");
        retry(|| async {
            let mut stream = js.get_stream(&name).await?;
            let mut config = stream.info().await?.config.clone();
            if !config.allow_atomic_publish {
                config.allow_atomic_publish = true;
                js.update_stream(config).await?;
            }
            Ok(())
        })
        .await
        .with_context(|| format!("allowing atomic batches on {name}"))?;
    }
    Ok(())
}

/// True when every stream and bucket exists (for `/health/ready`).
pub async fn present(js: &Context) -> bool {
    for name in STREAMS {
        if js.get_stream_no_info(name).await.is_err() {
            return false;
        }
    }
    js.get_key_value(AGENTS_BUCKET).await.is_ok()
        && js.get_key_value(ALERTING_BUCKET).await.is_ok()
        && js.get_key_value(TASKS_BUCKET).await.is_ok()
        && js.get_key_value(LIMITS_BUCKET).await.is_ok()
}

async fn retry<F, Fut>(mut attempt: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut last = None;
    for n in 0..5u32 {
        match attempt().await {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::debug!(error = %err, attempt = n, "provisioning attempt failed, retrying");
                last = Some(err);
                tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(n))).await;
            }
        }
    }
    Err(last.expect("at least one attempt"))
}
