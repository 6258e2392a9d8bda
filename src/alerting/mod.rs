//! The alerting worker: evaluates the rules every `ALERT_EVAL_INTERVAL` on the fleet figures
//! (from the metrics worker on `acc.metrics.fleet`; when none is fresh, it merges the ingress
//! snapshots itself, the same way) and the agents bucket, and sends what the state machine owes
//! to the routes.
//!
//! - [`rules`]: the rules file, the plan's defaults, the Prometheus export.
//! - [`engine`]: pending → firing → resolved, dedupe, repeat, inhibition, silences, escalation.
//! - [`routes`]: the bus, the log, webhooks in Alertmanager's format.
//! - [`alertmanager`]: every firing and resolved alert to Alertmanager's API, as Prometheus
//!   sends them.
//! - [`lease`]: one acting replica at a time.
//! - [`store`]: alert states, acknowledgements and silences in the `acc_alerting` bucket.
//! - [`AlertingSettings`]: the rules, the intervals, the webhooks.
//!
//! Order per notification: send (the bus first), and only once the bus acknowledged it note
//! it as sent ([`Engine::confirm`]); then store. A failed send stays owed and goes out at the
//! next evaluation under the same dedupe id. A replica that takes over loads the stored states
//! and so does not re-send; a crash between sending and storing can repeat a notification (the
//! bus copy is deduplicated even then, a webhook may see it twice). Webhook retries live in
//! memory only; the copy on `ACC_ALERTS` is the durable record. Past the lease's local
//! deadline nothing is sent or stored ([`lease::Fence`]).

pub mod alertmanager;
pub mod engine;
pub use crate::lease;
pub mod routes;
pub mod rules;
pub mod store;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::kv::Store;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::bus::{Publisher, subjects};
use crate::metrics::STALE_AFTER_INTERVALS;
use crate::metrics::snapshot::{FleetEndpoint, FleetSnapshot, merge};
use crate::metrics::tasks::{SNAPSHOT_KEY, SNAPSHOT_STALE, TaskSnapshot};
use crate::metrics::worker::{AgentRecords, replica_snapshots};
use alertmanager::Alertmanagers;
use engine::{Engine, Notification, Outcome, Policy, Sample};
use lease::Lease;
use routes::Notifier;
use rules::{CheckedRule, Metric};

/// The alerting worker's configuration.
#[derive(Clone)]
pub struct AlertingSettings {
    /// The checked rules.
    pub rules: Vec<CheckedRule>,
    /// How often the acting replica evaluates the rules.
    pub eval_interval: Duration,
    /// A firing alert is notified again after this long.
    pub repeat_interval: Duration,
    /// A firing CRITICAL not acknowledged within this long is escalated.
    pub escalate_after: Duration,
    /// Lifetime of the alerting lease.
    pub lease_ttl: Duration,
    /// Webhooks for WARN notifications.
    pub webhooks_warning: Vec<url::Url>,
    /// Webhooks for CRITICAL notifications.
    pub webhooks_critical: Vec<url::Url>,
    /// Webhooks for escalations.
    pub webhooks_escalation: Vec<url::Url>,
    /// Public URL of the bridge, for links in notifications.
    pub external_url: String,
    /// Alertmanagers' alerts endpoints (`<ALERTMANAGER_URL>/api/v2/alerts`), fed every firing
    /// and recently resolved alert.
    pub alertmanagers: Vec<url::Url>,
    /// A firing alert is sent to the Alertmanagers again after this long.
    pub alertmanager_resend: Duration,
}

impl std::fmt::Debug for AlertingSettings {
    /// Webhook URLs may carry tokens: only their number is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertingSettings")
            .field("rules", &self.rules.len())
            .field("eval_interval", &self.eval_interval)
            .field("repeat_interval", &self.repeat_interval)
            .field("escalate_after", &self.escalate_after)
            .field("lease_ttl", &self.lease_ttl)
            .field("webhooks_warning", &self.webhooks_warning.len())
            .field("webhooks_critical", &self.webhooks_critical.len())
            .field("webhooks_escalation", &self.webhooks_escalation.len())
            .field("external_url", &self.external_url)
            .field("alertmanagers", &self.alertmanagers.len())
            .field("alertmanager_resend", &self.alertmanager_resend)
            .finish()
    }
}

/// Runs the alerting role until `stop`.
pub async fn run(
    publisher: Publisher,
    agents: AgentRecords,
    settings: AlertingSettings,
    snapshot_interval: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let js = publisher.jetstream().clone();
    let kv = js
        .get_key_value(subjects::ALERTING_BUCKET)
        .await
        .context("opening the alerting bucket")?;
    let notifier = Notifier::new(publisher.clone(), &settings);
    let alertmanagers = Alertmanagers::new(
        &settings.alertmanagers,
        settings.alertmanager_resend,
        settings.eval_interval,
        &settings.external_url,
    );
    let mut lease = Lease::new(
        kv.clone(),
        lease::KEY,
        "alerting",
        crate::metrics::instance_id(),
        settings.lease_ttl,
    );
    let policy = Policy {
        repeat_interval: settings.repeat_interval,
        escalate_after: settings.escalate_after,
    };
    let tick = settings.eval_interval.min(settings.lease_ttl / 3);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut engine: Option<Engine> = None;
    let mut next_eval = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                lease.release().await;
                // Bounded by SHUTDOWN_TIMEOUT: the app aborts the role past it.
                notifier.finish_deliveries().await;
                alertmanagers.finish_deliveries().await;
                return Ok(());
            }
            _ = ticker.tick() => {}
        }
        if !lease.acquire().await {
            if engine.take().is_some() {
                alertmanagers.forget();
            }
            continue;
        }
        if engine.is_none() {
            match store::alerts(&kv).await {
                Ok(states) => engine = Some(Engine::from_states(states)),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot load alert states; retrying");
                    continue;
                }
            }
            next_eval = tokio::time::Instant::now();
        }
        if tokio::time::Instant::now() < next_eval {
            continue;
        }
        next_eval = tokio::time::Instant::now() + settings.eval_interval;
        let Some(acting) = engine.as_mut() else {
            continue;
        };
        if let Err(err) = evaluate(
            acting,
            &settings.rules,
            &js,
            &agents,
            &kv,
            &notifier,
            &lease,
            policy,
            snapshot_interval,
        )
        .await
        {
            tracing::warn!(error = ?err, "alert evaluation failed; next interval");
            if !lease.acting() {
                // Possibly sent without storing: reload the stored states when acting again.
                engine = None;
                alertmanagers.forget();
                continue;
            }
        }
        // What Alertmanager is owed of the alerts as they are now (fenced like the routes).
        if let Some(acting) = engine.as_ref().filter(|_| lease.acting()) {
            alertmanagers.push(acting.alerts.values(), Utc::now());
        }
    }
}

/// One evaluation: gather samples, run the engine, send, store.
#[allow(clippy::too_many_arguments)]
async fn evaluate(
    engine: &mut Engine,
    rules: &[CheckedRule],
    js: &async_nats::jetstream::Context,
    agents: &AgentRecords,
    kv: &Store,
    notifier: &Notifier,
    lease: &Lease,
    policy: Policy,
    snapshot_interval: Duration,
) -> anyhow::Result<()> {
    let fresh = snapshot_interval * STALE_AFTER_INTERVALS;
    let fleet = latest_fleet(js, fresh).await;
    let streams = stream_samples(rules, fleet.as_ref());
    let endpoints = match fleet {
        Some(fleet) => Some(fleet.endpoints),
        // No metrics worker publishing: merge the replicas' snapshots here, the same way.
        None => replica_snapshots(js, fresh)
            .await
            .ok()
            .filter(|snapshots| !snapshots.is_empty())
            .map(|snapshots| merge(&snapshots)),
    };
    let mut samples = endpoint_samples(rules, endpoints.as_ref());
    samples.extend(agent_samples(rules, agents).await?);
    samples.extend(streams);
    let tasks = task_snapshot(js).await;
    samples.extend(task_samples(rules, tasks.as_ref(), engine));
    let acks = store::acks(kv).await?;
    let silences = store::silences(kv).await?;
    let now = Utc::now();
    let mut outcome = engine.evaluate(rules, &samples, &acks, &silences, policy, now);
    dispatch(engine, &mut outcome, &mut { notifier }, || lease.acting()).await;
    // Fencing: past the lease's local deadline another replica may act; store nothing.
    let fenced = || anyhow::anyhow!("alerting lease deadline passed; not storing until renewed");
    for alert in &outcome.changed {
        anyhow::ensure!(lease.acting(), fenced());
        store::put_alert(kv, alert).await?;
    }
    for id in &outcome.removed {
        anyhow::ensure!(lease.acting(), fenced());
        store::delete_alert(kv, id).await?;
    }
    // Silences that ended long ago are only clutter.
    for silence in &silences {
        if (now - silence.ends_at)
            .to_std()
            .is_ok_and(|ago| ago > engine::RECENT)
        {
            store::delete_silence(kv, &silence.id).await?;
        }
    }
    Ok(())
}

/// Where [`dispatch`] sends notifications: the [`Notifier`], or a test's stand-in.
pub trait Sink {
    type Error: std::fmt::Display;
    fn send(
        &mut self,
        notification: &Notification,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send;
}

impl Sink for &Notifier {
    type Error = crate::bus::PublishFailure;
    fn send(
        &mut self,
        notification: &Notification,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send {
        Notifier::send(self, notification)
    }
}

/// Sends each notification of `outcome` through `send` and notes in the engine only those
/// that went out, adding their new state to what must be stored. A failed send stays owed, so
/// the next evaluation sends it again (with the same key); the others are not repeated.
/// Stops sending once `acting` says the lease's local deadline has passed. Returns how many
/// were sent.
pub async fn dispatch(
    engine: &mut Engine,
    outcome: &mut Outcome,
    sink: &mut impl Sink,
    acting: impl Fn() -> bool,
) -> usize {
    let mut sent = 0;
    for notification in &outcome.notifications {
        if !acting() {
            tracing::warn!("alerting lease deadline passed; sending nothing until renewed");
            break;
        }
        match sink.send(notification).await {
            Ok(()) => {
                sent += 1;
                if let Some(alert) = engine.confirm(notification) {
                    outcome.changed.retain(|c| c.id != alert.id);
                    outcome.changed.push(alert);
                }
            }
            Err(err) => tracing::warn!(
                error = %err, alert_id = %notification.alert.id,
                "notification not sent; owed again next evaluation"
            ),
        }
    }
    sent
}

/// The last fleet snapshot, when younger than `max_age`.
async fn latest_fleet(
    js: &async_nats::jetstream::Context,
    max_age: Duration,
) -> Option<FleetSnapshot> {
    let stream = js.get_stream(subjects::METRICS_STREAM).await.ok()?;
    let message = stream
        .get_last_raw_message_by_subject(subjects::FLEET_METRICS)
        .await
        .ok()?;
    let fleet: FleetSnapshot = serde_json::from_slice(&message.payload).ok()?;
    // The server's stamp, not the producer's `generated_at`.
    (crate::metrics::stored_age(&message) <= max_age).then_some(fleet)
}

/// Samples of the per-endpoint rules. Endpoints with less traffic than a rule's
/// `min_requests` (at least one request) get no sample, nor does any endpoint when the figures
/// could not be read (`None`): no data is not "fast", so the engine keeps those endpoints'
/// alerts as they are (neither fires nor resolves them).
pub fn endpoint_samples(
    rules: &[CheckedRule],
    endpoints: Option<&BTreeMap<String, FleetEndpoint>>,
) -> Vec<Sample> {
    let Some(endpoints) = endpoints else {
        return Vec::new();
    };
    let mut samples = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        if !rule.rule.metric.per_endpoint() {
            continue;
        }
        for (endpoint, figures) in endpoints {
            if !rule.selects_endpoint(endpoint) || figures.requests < rule.rule.min_requests.max(1)
            {
                continue;
            }
            let value = match rule.rule.metric {
                Metric::LatencyP50Ms => figures.p50_ms,
                Metric::LatencyP95Ms => figures.p95_ms,
                Metric::LatencyP99Ms => figures.p99_ms,
                Metric::ErrorRate => figures.error_rate,
                Metric::AgentOfflineSeconds
                | Metric::StreamUsedRatio
                | Metric::DeadLetteredRecently
                | Metric::QueuedWithoutOnlineAgent => continue,
            };
            samples.push(Sample {
                rule: index,
                labels: BTreeMap::from([("endpoint".to_owned(), endpoint.clone())]),
                value,
            });
        }
    }
    samples
}

/// Samples of the stream rules: each bounded stream's bytes over its `max_bytes`, from the fleet
/// snapshot. None without a fresh snapshot (no data: the alerts keep their state).
pub fn stream_samples(rules: &[CheckedRule], fleet: Option<&FleetSnapshot>) -> Vec<Sample> {
    let Some(fleet) = fleet else {
        return Vec::new();
    };
    let mut samples = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        if rule.rule.metric != Metric::StreamUsedRatio {
            continue;
        }
        for (stream, figures) in &fleet.bus.streams {
            if figures.max_bytes <= 0 {
                continue;
            }
            samples.push(Sample {
                rule: index,
                labels: BTreeMap::from([("stream".to_owned(), stream.clone())]),
                value: figures.bytes as f64 / figures.max_bytes as f64,
            });
        }
    }
    samples
}

/// The acting dispatcher's figures from the tasks bucket, unless missing or stale (no dispatcher
/// acts): then the task rules get no sample and their alerts stay as they are.
async fn task_snapshot(js: &async_nats::jetstream::Context) -> Option<TaskSnapshot> {
    let bucket = js.get_key_value(subjects::TASKS_BUCKET).await.ok()?;
    let value = bucket.get(SNAPSHOT_KEY).await.ok()??;
    let snapshot: TaskSnapshot = serde_json::from_slice(&value).ok()?;
    let age = (Utc::now() - snapshot.at).to_std().unwrap_or_default();
    (age <= SNAPSHOT_STALE).then_some(snapshot)
}

/// Samples of the task rules from the dispatcher's `snapshot`. A capability an alert was
/// raised for that is no longer unserved gets a zero sample, so the alert clears; without a
/// snapshot there are none (no data).
pub fn task_samples(
    rules: &[CheckedRule],
    snapshot: Option<&TaskSnapshot>,
    engine: &Engine,
) -> Vec<Sample> {
    let Some(snapshot) = snapshot else {
        return Vec::new();
    };
    let mut samples = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        match rule.rule.metric {
            Metric::DeadLetteredRecently => samples.push(Sample {
                rule: index,
                labels: BTreeMap::new(),
                value: snapshot.dead_lettered_recently as f64,
            }),
            Metric::QueuedWithoutOnlineAgent => {
                let mut capabilities: BTreeMap<String, f64> = snapshot
                    .unserved
                    .iter()
                    .map(|(capability, count)| (capability.clone(), *count as f64))
                    .collect();
                for alert in engine.alerts.values().filter(|a| a.rule == rule.rule.name) {
                    if let Some(capability) = alert.labels.get("capability") {
                        capabilities.entry(capability.clone()).or_insert(0.0);
                    }
                }
                for (capability, value) in capabilities {
                    samples.push(Sample {
                        rule: index,
                        labels: BTreeMap::from([("capability".to_owned(), capability)]),
                        value,
                    });
                }
            }
            _ => {}
        }
    }
    samples
}

/// Samples of the agent rules, from the replica's view of the agents bucket: seconds since the
/// last heartbeat of each agent the registry marked offline.
async fn agent_samples(
    rules: &[CheckedRule],
    agents: &AgentRecords,
) -> anyhow::Result<Vec<Sample>> {
    if rules
        .iter()
        .all(|r| r.rule.metric != Metric::AgentOfflineSeconds)
    {
        return Ok(Vec::new());
    }
    let records = agents.read().await?;
    let now = Utc::now();
    let mut samples = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        if rule.rule.metric != Metric::AgentOfflineSeconds {
            continue;
        }
        for record in &records {
            let agent = record.agent_id.as_str();
            if record.status != crate::domain::AgentStatus::Offline || !rule.selects_agent(agent) {
                continue;
            }
            let silent = (now - record.last_seen).to_std().unwrap_or_default();
            samples.push(Sample {
                rule: index,
                labels: BTreeMap::from([("agent_id".to_owned(), agent.to_owned())]),
                value: silent.as_secs_f64(),
            });
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::alerting::rules::{RuleFile, check, defaults};

    #[tokio::test]
    async fn a_notification_that_failed_to_send_is_delivered_exactly_once_after_recovery() {
        // The plan's defaults: AgentOffline fires in its first round (for: 0s).
        let rules = check(RuleFile {
            rules: defaults()
                .rules
                .into_iter()
                .filter(|r| r.name == "AgentOffline")
                .collect(),
        })
        .unwrap();
        let offline = vec![Sample {
            rule: 0,
            labels: BTreeMap::from([("agent_id".to_owned(), "agent-1".to_owned())]),
            value: 400.0,
        }];
        let policy = Policy {
            repeat_interval: Duration::from_secs(3600),
            escalate_after: Duration::from_secs(3600),
        };
        let mut engine = Engine::default();
        struct Flaky {
            up: bool,
            delivered: Vec<String>,
        }
        impl Sink for Flaky {
            type Error = &'static str;
            fn send(
                &mut self,
                n: &Notification,
            ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send {
                let result = if self.up {
                    self.delivered.push(n.key.clone());
                    Ok(())
                } else {
                    Err("bus down")
                };
                std::future::ready(result)
            }
        }
        let mut sink = Flaky {
            up: false,
            delivered: Vec::new(),
        };
        let start = Utc::now();
        for round in 0..4 {
            let now = start + chrono::Duration::seconds(round * 10);
            let mut outcome = engine.evaluate(&rules, &offline, &HashMap::new(), &[], policy, now);
            dispatch(&mut engine, &mut outcome, &mut sink, || true).await;
            // Stored state: what a replica taking over would load.
            engine = Engine::from_states(engine.alerts.values().cloned());
            sink.up = round >= 1;
        }
        assert_eq!(
            sink.delivered.len(),
            1,
            "exactly once: {:?}",
            sink.delivered
        );
    }
}
