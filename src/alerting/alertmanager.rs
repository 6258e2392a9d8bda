//! Alertmanager as Prometheus feeds it: after each evaluation the acting replica POSTs its
//! firing and recently resolved alerts to every `ALERTMANAGER_URL` at `/api/v2/alerts`, so
//! Alertmanager's own routing, grouping, inhibition and silences apply.
//!
//! The rules Prometheus follows, and so do we:
//! - A firing alert is sent when it fires and again every `ALERTMANAGER_RESEND_INTERVAL`
//!   while it fires, each time with `endsAt` a few intervals ahead: should the bridge stop
//!   sending, Alertmanager resolves the alert by itself once that time has passed.
//! - A resolved alert is sent at once with `endsAt` = the moment it resolved, and re-sent at
//!   the same interval for [`RESOLVED_RETENTION`], so an Alertmanager that missed it still
//!   learns of the resolution.
//! - Pending alerts are not sent. Every firing alert is sent, whatever the built-in routes make
//!   of it: an inhibited WARN or a silenced alert is Alertmanager's to mute (ship
//!   `deploy/alertmanager/alertmanager.yml`'s `inhibit_rules` to get the built-in inhibition).
//!
//! Each Alertmanager is fed on its own, in the background, one POST at a time (a slow one never
//! holds up evaluation or the others), in batches of [`MAX_BATCH`]. What was sent is kept per
//! Alertmanager in memory only: a failed POST makes its alerts due again at the next
//! evaluation, and a replica that takes over sends everything once (Alertmanager merges a
//! repeat of an alert it has into the one it has).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::engine::{AlertState, Phase};
use super::routes::redacted;

/// The path Alertmanager takes alerts on, appended to each `ALERTMANAGER_URL`.
pub const ALERTS_PATH: &str = "api/v2/alerts";
/// Alerts per POST (Prometheus sends at most 64 at a time as well).
pub const MAX_BATCH: usize = 64;
/// How long a resolved alert is still sent (Prometheus keeps sending them for 15 minutes).
pub const RESOLVED_RETENTION: Duration = Duration::from_secs(15 * 60);
/// A firing alert's `endsAt` is this many resend intervals (or evaluation intervals, whichever
/// is longer) ahead, as in Prometheus: a few lost POSTs do not resolve it.
const ENDS_AT_INTERVALS: u32 = 4;
/// Longest wait for one Alertmanager's answer.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// An alert in Alertmanager's `postableAlert` shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PostableAlert {
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
    pub starts_at: String,
    pub ends_at: String,
    #[serde(rename = "generatorURL", skip_serializing_if = "String::is_empty")]
    pub generator_url: String,
}

/// What was last sent of one alert to one Alertmanager.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sent {
    at: DateTime<Utc>,
    /// The episode it belongs to: a new episode is sent at once.
    active_since: DateTime<Utc>,
    resolved: bool,
}

/// One Alertmanager and what it was sent.
struct Target {
    url: url::Url,
    sent: Arc<Mutex<HashMap<String, Sent>>>,
    /// A POST to it is under way: the next one waits for a later evaluation.
    busy: Arc<AtomicBool>,
}

/// Feeds the configured Alertmanagers.
pub struct Alertmanagers {
    http: reqwest::Client,
    targets: Vec<Target>,
    resend: Duration,
    /// How far ahead a firing alert's `endsAt` is.
    lifetime: Duration,
    generator_url: String,
    /// POSTs still running, so a graceful stop can wait for them.
    deliveries: tokio_util::task::TaskTracker,
}

impl Alertmanagers {
    /// `urls` are the alerts endpoints (see [`alerts_endpoint`]).
    pub fn new(
        urls: &[url::Url],
        resend: Duration,
        eval_interval: Duration,
        external_url: &str,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            http,
            targets: urls
                .iter()
                .map(|url| Target {
                    url: url.clone(),
                    sent: Arc::default(),
                    busy: Arc::default(),
                })
                .collect(),
            resend,
            lifetime: resend.max(eval_interval) * ENDS_AT_INTERVALS,
            generator_url: generator_url(external_url),
            deliveries: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Forgets what was sent (the lease was lost): the next acting period sends everything.
    pub fn forget(&self) {
        for target in &self.targets {
            target
                .sent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }

    /// Sends each Alertmanager what is due of `alerts` at `now`, in the background.
    pub fn push<'a>(&self, alerts: impl IntoIterator<Item = &'a AlertState>, now: DateTime<Utc>) {
        if self.targets.is_empty() {
            return;
        }
        let alerts: Vec<&AlertState> = alerts.into_iter().collect();
        for target in &self.targets {
            if target.busy.swap(true, Ordering::AcqRel) {
                continue;
            }
            let due = {
                let mut sent = target.sent.lock().unwrap_or_else(|e| e.into_inner());
                sent.retain(|id, _| alerts.iter().any(|a| &a.id == id));
                let mut due: Vec<(String, Option<Sent>, Sent, PostableAlert)> = Vec::new();
                for alert in &alerts {
                    let previous = sent.get(&alert.id).copied();
                    let Some(body) = self.due(alert, previous, now) else {
                        continue;
                    };
                    let mark = Sent {
                        at: now,
                        active_since: alert.active_since,
                        resolved: alert.phase == Phase::Resolved,
                    };
                    sent.insert(alert.id.clone(), mark);
                    due.push((alert.id.clone(), previous, mark, body));
                }
                due
            };
            if due.is_empty() {
                target.busy.store(false, Ordering::Release);
                continue;
            }
            let (http, url) = (self.http.clone(), target.url.clone());
            let (sent, busy) = (target.sent.clone(), target.busy.clone());
            self.deliveries.spawn(async move {
                for batch in due.chunks(MAX_BATCH) {
                    let bodies: Vec<&PostableAlert> = batch.iter().map(|d| &d.3).collect();
                    if let Err(reason) = post(&http, &url, &bodies).await {
                        tracing::warn!(
                            alertmanager = %redacted(&url), alerts = bodies.len(), reason,
                            "alerts not delivered to Alertmanager; due again next evaluation"
                        );
                        // Undo the marks of what did not go out (unless a later push
                        // changed them since).
                        let mut sent = sent.lock().unwrap_or_else(|e| e.into_inner());
                        for (id, previous, mark, _) in batch {
                            if sent.get(id) == Some(mark) {
                                match previous {
                                    Some(previous) => sent.insert(id.clone(), *previous),
                                    None => sent.remove(id),
                                };
                            }
                        }
                    }
                }
                busy.store(false, Ordering::Release);
            });
        }
    }

    /// Waits for the POSTs still running (graceful stop); no new ones start.
    pub async fn finish_deliveries(&self) {
        self.deliveries.close();
        self.deliveries.wait().await;
    }

    /// The body to send of `alert` now, or `None` when nothing is due.
    fn due(
        &self,
        alert: &AlertState,
        previous: Option<Sent>,
        now: DateTime<Utc>,
    ) -> Option<PostableAlert> {
        let resolved = match alert.phase {
            Phase::Pending => return None,
            Phase::Firing => false,
            Phase::Resolved => true,
        };
        if resolved
            && alert
                .resolved_at
                .is_none_or(|at| age(now, at) > RESOLVED_RETENTION)
        {
            return None;
        }
        let changed =
            previous.is_none_or(|p| p.active_since != alert.active_since || p.resolved != resolved);
        if !changed && previous.is_some_and(|p| age(now, p.at) < self.resend) {
            return None;
        }
        Some(postable(alert, now, self.lifetime, &self.generator_url))
    }
}

fn age(now: DateTime<Utc>, then: DateTime<Utc>) -> Duration {
    (now - then).to_std().unwrap_or(Duration::ZERO)
}

/// The link Alertmanager shows as the alert's source: the bridge's alert list, when
/// `ALERT_EXTERNAL_URL` is set.
fn generator_url(external_url: &str) -> String {
    if external_url.is_empty() {
        String::new()
    } else {
        format!("{}/orchestrator/alerts", external_url.trim_end_matches('/'))
    }
}

/// `alert` as Alertmanager takes it at `now`: a firing alert ends `lifetime` from now unless
/// re-sent, a resolved one ended when it resolved. `startsAt` is when it fired, as in the
/// webhook body.
pub fn postable(
    alert: &AlertState,
    now: DateTime<Utc>,
    lifetime: Duration,
    generator_url: &str,
) -> PostableAlert {
    let stamp = |at: DateTime<Utc>| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let ends_at = match (alert.phase, alert.resolved_at) {
        (Phase::Resolved, Some(at)) => at,
        _ => now + chrono::Duration::from_std(lifetime).unwrap_or(chrono::Duration::hours(1)),
    };
    PostableAlert {
        labels: alert.labels.clone(),
        annotations: alert.annotations.clone(),
        starts_at: stamp(alert.fired_at.unwrap_or(alert.active_since)),
        ends_at: stamp(ends_at),
        generator_url: generator_url.to_owned(),
    }
}

/// One POST of `alerts`; the reason when Alertmanager did not take them.
async fn post(
    http: &reqwest::Client,
    url: &url::Url,
    alerts: &[&PostableAlert],
) -> Result<(), String> {
    let response = http
        .post(url.clone())
        .json(alerts)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    // Alertmanager's reason for a 400 is short and names no secret.
    let text = response.text().await.unwrap_or_default();
    let reason: String = text.chars().take(200).collect();
    Err(format!("status {}: {}", status.as_u16(), reason.trim()))
}

/// The alerts endpoint of an Alertmanager given by its base URL (`http://am:9093`, or with a
/// path prefix, `http://host/alertmanager`): `<base>/api/v2/alerts`. A URL that already ends
/// in `/api/v2/alerts` is kept.
pub fn alerts_endpoint(base: &url::Url) -> url::Url {
    let mut url = base.clone();
    let path = url.path().trim_end_matches('/').to_owned();
    if !path.ends_with(&format!("/{ALERTS_PATH}")) {
        url.set_path(&format!("{path}/{ALERTS_PATH}"));
    }
    url
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::alerting::rules::Severity;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn alert(phase: Phase) -> AlertState {
        AlertState {
            id: "a1".into(),
            rule: "AgentOffline".into(),
            severity: Severity::Warning,
            labels: BTreeMap::from([
                ("alertname".into(), "AgentOffline".into()),
                ("agent_id".into(), "pilot".into()),
                ("severity".into(), "warning".into()),
            ]),
            annotations: BTreeMap::from([("summary".into(), "agent pilot offline".into())]),
            phase,
            value: 400.0,
            threshold: 300.0,
            active_since: at(0),
            fired_at: Some(at(0)),
            resolved_at: (phase == Phase::Resolved).then(|| at(100)),
            notified_firing_at: None,
            firing_notifications: 0,
            notified_resolved: false,
            escalated_at: None,
            notified_escalation_resolved: false,
        }
    }

    fn sender() -> Alertmanagers {
        Alertmanagers::new(
            &[],
            Duration::from_secs(60),
            Duration::from_secs(10),
            "https://acc.example.com/",
        )
    }

    fn sent(at_: DateTime<Utc>, resolved: bool) -> Option<Sent> {
        Some(Sent {
            at: at_,
            active_since: at(0),
            resolved,
        })
    }

    #[test]
    fn a_firing_alert_is_sent_at_once_then_every_resend_interval_with_ends_at_ahead() {
        let am = sender();
        let firing = alert(Phase::Firing);
        let body = am.due(&firing, None, at(10)).expect("first send");
        assert_eq!(body.starts_at, "2027-01-15T08:00:00.000Z");
        // Four resend intervals ahead.
        assert_eq!(body.ends_at, "2027-01-15T08:04:10.000Z");
        assert_eq!(
            body.generator_url,
            "https://acc.example.com/orchestrator/alerts"
        );
        assert!(am.due(&firing, sent(at(10), false), at(69)).is_none());
        assert!(am.due(&firing, sent(at(10), false), at(70)).is_some());
    }

    #[test]
    fn a_resolution_is_sent_at_once_with_its_ends_at_and_repeated_only_for_a_while() {
        let am = sender();
        let resolved = alert(Phase::Resolved);
        let body = am
            .due(&resolved, sent(at(90), false), at(100))
            .expect("resolution not held back by the resend interval");
        assert_eq!(body.ends_at, "2027-01-15T08:01:40.000Z");
        assert!(am.due(&resolved, sent(at(100), true), at(120)).is_none());
        assert!(am.due(&resolved, sent(at(100), true), at(160)).is_some());
        let later = at(100 + RESOLVED_RETENTION.as_secs() as i64 + 1);
        assert!(am.due(&resolved, sent(at(100), true), later).is_none());
        assert!(
            am.due(&resolved, None, later).is_none(),
            "an old resolution is not news"
        );
    }

    #[test]
    fn pending_alerts_are_not_sent_and_a_new_episode_is_sent_at_once() {
        let am = sender();
        assert!(am.due(&alert(Phase::Pending), None, at(10)).is_none());
        let mut again = alert(Phase::Firing);
        again.active_since = at(200);
        assert!(am.due(&again, sent(at(190), true), at(200)).is_some());
    }

    #[test]
    fn the_alerts_path_is_appended_to_the_base_url_once() {
        for (base, want) in [
            ("http://am:9093", "http://am:9093/api/v2/alerts"),
            ("http://am:9093/", "http://am:9093/api/v2/alerts"),
            (
                "https://h/alertmanager/",
                "https://h/alertmanager/api/v2/alerts",
            ),
            (
                "http://am:9093/api/v2/alerts",
                "http://am:9093/api/v2/alerts",
            ),
        ] {
            let url = url::Url::parse(base).unwrap();
            assert_eq!(alerts_endpoint(&url).as_str(), want, "{base}");
        }
    }

    #[test]
    fn the_body_has_alertmanagers_field_names_and_no_empty_generator_url() {
        let body = postable(&alert(Phase::Firing), at(10), Duration::from_secs(240), "");
        let json = serde_json::to_value(&body).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["annotations", "endsAt", "labels", "startsAt"]);
    }
}
