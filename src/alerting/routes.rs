//! Where notifications go. Every notification is logged and stored on `acc.alerts.<route>`
//! (stream `ACC_ALERTS`); the route's webhooks then get the same body by POST, in
//! Alertmanager's webhook format (version 4) so existing receivers work. Webhook deliveries
//! retry with exponential backoff, a bounded number of times, in the background: a slow
//! receiver never holds up evaluation. The background deliveries are tracked: a graceful stop
//! waits for them (within `SHUTDOWN_TIMEOUT`, after which they are abandoned). They live in
//! memory only; the bus copy is the durable record.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use super::AlertingSettings;
use super::engine::{Notification, Phase};
use crate::bus::{PublishFailure, Publisher, subjects};

/// Attempts per webhook delivery.
const WEBHOOK_ATTEMPTS: u32 = 5;
/// Wait before the second attempt; doubles after each.
const WEBHOOK_FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait for one webhook answer.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Alertmanager's "zero time": the `endsAt` of an alert still firing.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Sends notifications to the bus, the log and the webhooks of their route.
#[derive(Clone)]
pub struct Notifier {
    publisher: Publisher,
    http: reqwest::Client,
    webhooks: BTreeMap<&'static str, Vec<url::Url>>,
    external_url: String,
    /// Webhook deliveries still running, so a graceful stop can wait for them.
    deliveries: tokio_util::task::TaskTracker,
}

impl Notifier {
    pub fn new(publisher: Publisher, settings: &AlertingSettings) -> Self {
        let webhooks = BTreeMap::from([
            ("warning", settings.webhooks_warning.clone()),
            ("critical", settings.webhooks_critical.clone()),
            ("escalation", settings.webhooks_escalation.clone()),
        ]);
        let http = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            publisher,
            http,
            webhooks,
            external_url: settings.external_url.clone(),
            deliveries: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Waits for the webhook deliveries still running (graceful stop); no new ones start.
    pub async fn finish_deliveries(&self) {
        self.deliveries.close();
        if !self.deliveries.is_empty() {
            tracing::info!(
                pending = self.deliveries.len(),
                "waiting for alert webhook deliveries"
            );
        }
        self.deliveries.wait().await;
    }

    /// Logs, stores on the bus, then hands webhook deliveries to the background. `Err` when the
    /// bus did not take it: nothing was sent, and the caller keeps it owed.
    pub async fn send(&self, notification: &Notification) -> Result<(), PublishFailure> {
        let body = payload(notification, &self.external_url);
        let alert = &notification.alert;
        let status = status(notification);
        let summary = alert
            .annotations
            .get("summary")
            .cloned()
            .unwrap_or_default();
        match (status, alert.severity) {
            ("firing", super::rules::Severity::Critical) => tracing::error!(
                alert_id = %alert.id, alertname = %alert.rule, route = notification.route.as_str(),
                status, summary, "alert"
            ),
            _ => tracing::warn!(
                alert_id = %alert.id, alertname = %alert.rule, route = notification.route.as_str(),
                status, summary, "alert"
            ),
        }
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        self.publisher
            .publish(
                subjects::alert(notification.route.as_str()),
                &notification.key,
                bytes.clone(),
                None,
            )
            .await?;
        for url in self
            .webhooks
            .get(notification.route.as_str())
            .into_iter()
            .flatten()
        {
            let (http, url, bytes) = (self.http.clone(), url.clone(), bytes.clone());
            self.deliveries
                .spawn(async move { deliver(http, url, bytes).await });
        }
        Ok(())
    }
}

fn status(notification: &Notification) -> &'static str {
    if notification.alert.phase == Phase::Resolved {
        "resolved"
    } else {
        "firing"
    }
}

/// The part of a webhook URL fit for logs: paths and queries of webhook URLs often carry
/// tokens (Slack, Teams, PagerDuty), so only the scheme, host and port are shown.
pub fn redacted(url: &url::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}/…", url.scheme()),
        (Some(host), None) => format!("{}://{host}/…", url.scheme()),
        _ => format!("{}://…", url.scheme()),
    }
}

/// POSTs `body` to `url`, retrying 5xx, 429 and connection failures with backoff.
async fn deliver(http: reqwest::Client, url: url::Url, body: Bytes) {
    let shown = redacted(&url);
    let mut backoff = WEBHOOK_FIRST_BACKOFF;
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let result = http
            .post(url.clone())
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let retry = match result {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => {
                let code = response.status();
                tracing::warn!(url = %shown, status = code.as_u16(), attempt, "alert webhook refused");
                code.is_server_error() || code == reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            Err(err) => {
                tracing::warn!(url = %shown, error = %err.without_url(), attempt, "alert webhook unreachable");
                true
            }
        };
        if !retry || attempt == WEBHOOK_ATTEMPTS {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    tracing::error!(url = %shown, "alert webhook delivery abandoned");
}

/// The `groupKey` of a notification. Each notification carries one alert, so its group is that
/// alert: the key is Alertmanager's `<route>:<group labels>` with the root route (`{}`) and every
/// label of the alert (the labels that make its fingerprint), written as Alertmanager writes a
/// label set: `{}:{agent_id="a", alertname="AgentOffline", severity="warning"}`. Two alerts of one
/// rule (say, the register and the heartbeat endpoint) never share a key.
pub fn group_key(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{}}:{{{}}}", pairs.join(", "))
}

/// The Alertmanager webhook body (version 4) for one notification.
pub fn payload(notification: &Notification, external_url: &str) -> Value {
    let alert = &notification.alert;
    let status = status(notification);
    let ends_at = match (status, alert.resolved_at) {
        ("resolved", Some(at)) => at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        _ => ZERO_TIME.to_owned(),
    };
    let starts_at = alert
        .fired_at
        .unwrap_or(alert.active_since)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let receiver = notification.route.as_str();
    json!({
        "version": "4",
        "groupKey": group_key(&alert.labels),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": alert.labels,
        "commonLabels": alert.labels,
        "commonAnnotations": alert.annotations,
        "externalURL": external_url,
        "alerts": [{
            "status": status,
            "labels": alert.labels,
            "annotations": alert.annotations,
            "startsAt": starts_at,
            "endsAt": ends_at,
            "generatorURL": if external_url.is_empty() {
                String::new()
            } else {
                format!("{}/orchestrator/alerts", external_url.trim_end_matches('/'))
            },
            "fingerprint": alert.id,
        }],
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_group_key_names_every_label_of_the_one_alert_it_groups() {
        let register = labels(&[
            ("alertname", "HighLatency"),
            ("endpoint", "register"),
            ("severity", "warning"),
        ]);
        let mut heartbeat = register.clone();
        heartbeat.insert("endpoint".into(), "heartbeat".into());
        assert_eq!(
            super::group_key(&register),
            r#"{}:{alertname="HighLatency", endpoint="register", severity="warning"}"#
        );
        assert_ne!(super::group_key(&register), super::group_key(&heartbeat));
    }

    #[test]
    fn logged_webhook_urls_keep_no_path_or_query() {
        let url =
            url::Url::parse("https://hooks.example.com/services/T0/B0/secret?token=x").unwrap();
        assert_eq!(super::redacted(&url), "https://hooks.example.com/…");
        let url = url::Url::parse("http://127.0.0.1:9000/hook").unwrap();
        assert_eq!(super::redacted(&url), "http://127.0.0.1:9000/…");
    }
}
