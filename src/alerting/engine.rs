//! The alert state machine, free of I/O so it can be tested with explicit clocks.
//!
//! Each alert (rule × severity × endpoint-or-agent) is `pending` while its condition holds for
//! less than the rule's `for`, `firing` after, and `resolved` once the condition stops (a pending
//! alert whose condition stops is simply forgotten). [`Engine::evaluate`] returns the
//! notifications owed: one per transition (firing, resolved), a repeat every
//! `repeat_interval` while firing, and an escalation when a critical alert has fired for
//! `escalate_after` without an acknowledgement. A firing critical inhibits the warning of the
//! same rule and labels; a matching silence suppresses notifications until it expires. What
//! was notified is part of the state, which the worker stores in KV, so a replica taking over
//! continues without re-sending.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::rules::{CheckedRule, Severity};

/// Resolved alerts stay listed (GET /orchestrator/alerts "recent") this long.
pub const RECENT: Duration = Duration::from_secs(24 * 3600);

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pending,
    Firing,
    Resolved,
}

/// One alert and what was sent about it. Stored as `alert.<id>` in the alerting bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    /// Hash of rule, severity and labels: stable across evaluations and replicas.
    pub id: String,
    pub rule: String,
    pub severity: Severity,
    /// `alertname`, `severity`, and `endpoint` or `agent_id`.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub phase: Phase,
    /// The last measured value, and the threshold it is compared with.
    pub value: f64,
    pub threshold: f64,
    /// When the condition started to hold (start of this episode).
    pub active_since: DateTime<Utc>,
    pub fired_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// When a firing notification was last sent in this episode.
    pub notified_firing_at: Option<DateTime<Utc>>,
    /// Firing notifications sent in this episode (first and repeats).
    pub firing_notifications: u32,
    pub notified_resolved: bool,
    /// When the escalation route was notified in this episode.
    pub escalated_at: Option<DateTime<Utc>>,
    /// The escalation route was told of the resolution. Reset when the alert resolves; states
    /// stored before this field existed sent both resolutions together, hence the default.
    #[serde(default = "stored_before_the_field")]
    pub notified_escalation_resolved: bool,
}

fn stored_before_the_field() -> bool {
    true
}

/// The route a notification goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Warning,
    Critical,
    Escalation,
}

impl Route {
    pub fn of(severity: Severity) -> Self {
        match severity {
            Severity::Warning => Route::Warning,
            Severity::Critical => Route::Critical,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Warning => "warning",
            Route::Critical => "critical",
            Route::Escalation => "escalation",
        }
    }
}

/// A notification owed, with the alert as it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub route: Route,
    pub alert: AlertState,
    /// A stable id for this notification (dedupe id on the bus); a retry of an unsent
    /// notification gets the same key.
    pub key: String,
    /// What [`Engine::confirm`] notes once it was sent.
    pub effect: Effect,
    /// The firing notification's number in its episode (first = 1; 0 for resolved).
    pub count: u32,
}

/// What a sent notification changes in its alert's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Effect {
    Firing { at: DateTime<Utc> },
    Escalated { at: DateTime<Utc> },
    Resolved,
    EscalationResolved,
}

/// A measured value for one rule and label set.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Index into the rules.
    pub rule: usize,
    /// `endpoint` or `agent_id` (without `alertname` and `severity`).
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A silence: notifications of alerts whose labels include every matcher are suppressed
/// between `starts_at` and `ends_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub matchers: BTreeMap<String, String>,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub created_by: String,
    #[serde(default)]
    pub comment: String,
}

impl Silence {
    pub fn active(&self, now: DateTime<Utc>) -> bool {
        self.starts_at <= now && now < self.ends_at
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matchers.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// An acknowledgement of an alert, stored as `ack.<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub alert_id: String,
    pub acked_by: String,
    pub acked_at: DateTime<Utc>,
}

/// Timing of notifications.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub repeat_interval: Duration,
    pub escalate_after: Duration,
}

/// What one evaluation produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub notifications: Vec<Notification>,
    /// Alerts whose stored state must be written.
    pub changed: Vec<AlertState>,
    /// Alert ids whose stored state must be deleted.
    pub removed: Vec<String>,
}

/// The id of an alert: rule, severity and labels.
pub fn fingerprint(rule: &str, severity: Severity, labels: &BTreeMap<String, String>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(rule.as_bytes());
    hasher.update([0]);
    hasher.update(severity.as_str().as_bytes());
    for (k, v) in labels {
        hasher.update([0]);
        hasher.update(k.as_bytes());
        hasher.update([1]);
        hasher.update(v.as_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}

fn since(now: DateTime<Utc>, then: DateTime<Utc>) -> Duration {
    (now - then).to_std().unwrap_or(Duration::ZERO)
}

/// An alert whose condition holds: id, rule index, severity, threshold, value, labels.
type Holding = (String, usize, Severity, f64, f64, BTreeMap<String, String>);

/// Every alert the acting replica knows.
#[derive(Debug, Default)]
pub struct Engine {
    pub alerts: HashMap<String, AlertState>,
}

impl Engine {
    /// Starts from stored states (a replica taking over).
    pub fn from_states(states: impl IntoIterator<Item = AlertState>) -> Self {
        Self {
            alerts: states.into_iter().map(|s| (s.id.clone(), s)).collect(),
        }
    }

    /// One evaluation at `now`.
    pub fn evaluate(
        &mut self,
        rules: &[CheckedRule],
        samples: &[Sample],
        acks: &HashMap<String, Ack>,
        silences: &[Silence],
        policy: Policy,
        now: DateTime<Utc>,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        // Which alerts' conditions hold now, with their value; criticals first.
        let mut holding: Vec<Holding> = Vec::new();
        // Every alert a sample spoke about, holding or not.
        let mut judged = std::collections::HashSet::new();
        for sample in samples {
            let Some(rule) = rules.get(sample.rule) else {
                continue;
            };
            for (severity, threshold) in rule.thresholds() {
                let mut labels = sample.labels.clone();
                labels.insert("alertname".into(), rule.rule.name.clone());
                labels.insert("severity".into(), severity.as_str().into());
                let id = fingerprint(&rule.rule.name, severity, &labels);
                judged.insert(id.clone());
                if sample.value > threshold {
                    holding.push((id, sample.rule, severity, threshold, sample.value, labels));
                } else if let Some(alert) = self.alerts.get_mut(&id) {
                    alert.value = sample.value;
                }
            }
        }
        let holding_ids: std::collections::HashSet<String> =
            holding.iter().map(|h| h.0.clone()).collect();

        // Conditions that hold: start, continue or fire.
        for (id, rule_index, severity, threshold, value, labels) in holding {
            let rule = &rules[rule_index];
            let is_new = !self.alerts.contains_key(&id);
            let alert = self.alerts.entry(id.clone()).or_insert_with(|| AlertState {
                id: id.clone(),
                rule: rule.rule.name.clone(),
                severity,
                labels: labels.clone(),
                annotations: BTreeMap::new(),
                phase: Phase::Pending,
                value,
                threshold,
                active_since: now,
                fired_at: None,
                resolved_at: None,
                notified_firing_at: None,
                firing_notifications: 0,
                notified_resolved: false,
                escalated_at: None,
                notified_escalation_resolved: false,
            });
            if alert.phase == Phase::Resolved {
                // A new episode of the same alert.
                *alert = AlertState {
                    phase: Phase::Pending,
                    active_since: now,
                    fired_at: None,
                    resolved_at: None,
                    notified_firing_at: None,
                    firing_notifications: 0,
                    notified_resolved: false,
                    escalated_at: None,
                    notified_escalation_resolved: false,
                    ..alert.clone()
                };
                outcome.changed.push(alert.clone());
            }
            let moved = alert.value != value;
            alert.value = value;
            alert.threshold = threshold;
            alert.annotations = annotations(rule, &labels, value, threshold);
            if alert.phase == Phase::Pending && since(now, alert.active_since) >= rule.hold {
                alert.phase = Phase::Firing;
                alert.fired_at = Some(now);
                outcome.changed.push(alert.clone());
            } else if is_new || moved {
                // Stored at once (a replica taking over keeps the start of the `for` period),
                // and again when the value moved, so the admin list shows the current value.
                outcome.changed.retain(|c| c.id != id);
                outcome.changed.push(alert.clone());
            }
        }

        // Conditions that stopped: pending alerts are forgotten, firing ones resolve. An
        // endpoint or task alert without a sample this round (figures unreadable, or too
        // little traffic) is not judged: missing data keeps it as it is. An agent alert without
        // a sample means the agent is no longer offline.
        let mut forget = Vec::new();
        for (id, alert) in self.alerts.iter_mut() {
            if holding_ids.contains(id) {
                continue;
            }
            let unjudged = alert.phase != Phase::Resolved
                && !judged.contains(id)
                && rules
                    .iter()
                    .find(|r| r.rule.name == alert.rule)
                    .is_some_and(|r| !r.rule.metric.absent_means_clear());
            if unjudged {
                continue;
            }
            match alert.phase {
                Phase::Pending => forget.push(id.clone()),
                Phase::Firing => {
                    alert.phase = Phase::Resolved;
                    alert.resolved_at = Some(now);
                    alert.notified_escalation_resolved = false;
                    outcome.changed.push(alert.clone());
                }
                Phase::Resolved => {
                    if alert.resolved_at.is_some_and(|at| since(now, at) > RECENT) {
                        forget.push(id.clone());
                    }
                }
            }
        }
        for id in forget {
            self.alerts.remove(&id);
            outcome.changed.retain(|c| c.id != id);
            outcome.removed.push(id);
        }

        // Notifications, criticals first so that inhibition sees them. Nothing is marked as
        // sent here: the caller sends each notification and calls [`Engine::confirm`] only when
        // it went out, so a failed send stays owed for the next evaluation.
        let mut ids: Vec<String> = self.alerts.keys().cloned().collect();
        ids.sort_by_key(|id| {
            let a = &self.alerts[id];
            (std::cmp::Reverse(a.severity), a.id.clone())
        });
        for id in ids {
            let alert = &self.alerts[&id];
            let inhibited =
                alert.severity == Severity::Warning && self.critical_sibling_firing(alert);
            let silenced = silences
                .iter()
                .any(|s| s.active(now) && s.matches(&alert.labels));
            let acked = acks
                .get(&alert.id)
                .is_some_and(|ack| ack.acked_at >= alert.active_since);
            match alert.phase {
                Phase::Firing if !silenced && !inhibited => {
                    let due = match alert.notified_firing_at {
                        None => true,
                        Some(at) => since(now, at) >= policy.repeat_interval,
                    };
                    if due {
                        outcome.notifications.push(notification(
                            Route::of(alert.severity),
                            alert,
                            Effect::Firing { at: now },
                        ));
                    }
                    let escalate = alert.severity == Severity::Critical
                        && !acked
                        && alert.escalated_at.is_none()
                        && alert
                            .fired_at
                            .is_some_and(|at| since(now, at) >= policy.escalate_after);
                    if escalate {
                        outcome.notifications.push(notification(
                            Route::Escalation,
                            alert,
                            Effect::Escalated { at: now },
                        ));
                    }
                }
                Phase::Resolved if alert.notified_firing_at.is_some() => {
                    if !alert.notified_resolved {
                        outcome.notifications.push(notification(
                            Route::of(alert.severity),
                            alert,
                            Effect::Resolved,
                        ));
                    }
                    if alert.escalated_at.is_some() && !alert.notified_escalation_resolved {
                        outcome.notifications.push(notification(
                            Route::Escalation,
                            alert,
                            Effect::EscalationResolved,
                        ));
                    }
                }
                _ => {}
            }
        }
        outcome
    }

    /// Notes that `notification` was sent: call it only after a successful send. Returns the
    /// alert's new state, to be stored, or `None` when the alert has moved on since (forgotten,
    /// or a new episode), in which case nothing is noted.
    pub fn confirm(&mut self, notification: &Notification) -> Option<AlertState> {
        let alert = self.alerts.get_mut(&notification.alert.id)?;
        if alert.active_since != notification.alert.active_since {
            return None;
        }
        match notification.effect {
            Effect::Firing { at } => {
                alert.notified_firing_at = Some(at);
                alert.firing_notifications = alert.firing_notifications.max(notification.count);
            }
            Effect::Escalated { at } => alert.escalated_at = Some(at),
            Effect::Resolved => alert.notified_resolved = true,
            Effect::EscalationResolved => alert.notified_escalation_resolved = true,
        }
        Some(alert.clone())
    }

    /// True when the critical alert of the same rule and labels is firing.
    fn critical_sibling_firing(&self, warning: &AlertState) -> bool {
        let mut labels = warning.labels.clone();
        labels.insert("severity".into(), Severity::Critical.as_str().into());
        let id = fingerprint(&warning.rule, Severity::Critical, &labels);
        self.alerts
            .get(&id)
            .is_some_and(|critical| critical.phase == Phase::Firing)
    }
}

fn notification(route: Route, alert: &AlertState, effect: Effect) -> Notification {
    let (status, n) = match effect {
        Effect::Firing { .. } => ("firing", alert.firing_notifications + 1),
        Effect::Escalated { .. } => ("firing", alert.firing_notifications),
        Effect::Resolved | Effect::EscalationResolved => ("resolved", 0),
    };
    Notification {
        route,
        alert: alert.clone(),
        key: format!(
            "alert:{}:{}:{}:{}:{n}",
            alert.id,
            status,
            alert.active_since.timestamp_millis(),
            route.as_str()
        ),
        effect,
        count: n,
    }
}

fn annotations(
    rule: &CheckedRule,
    labels: &BTreeMap<String, String>,
    value: f64,
    threshold: f64,
) -> BTreeMap<String, String> {
    let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let summary = rule
        .rule
        .summary
        .replace("{endpoint}", &label("endpoint"))
        .replace("{agent_id}", &label("agent_id"))
        .replace("{stream}", &label("stream"))
        .replace("{capability}", &label("capability"))
        .replace("{value}", &format!("{value:.4}"))
        .replace("{threshold}", &format!("{threshold}"));
    BTreeMap::from([
        ("summary".to_owned(), summary),
        (
            "description".to_owned(),
            format!(
                "{:?} is {value:.4}, above the {} threshold {threshold}",
                rule.rule.metric,
                labels.get("severity").map_or("", String::as_str)
            ),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerting::rules::{Metric, Rule, RuleFile, check};

    fn rules(hold: &str) -> Vec<CheckedRule> {
        check(RuleFile {
            rules: vec![Rule {
                name: "Slow".into(),
                metric: Metric::LatencyP95Ms,
                endpoints: vec![],
                agents: vec![],
                warning: Some(10.0),
                critical: Some(20.0),
                hold: hold.into(),
                min_requests: 0,
                summary: "slow {endpoint}".into(),
            }],
        })
        .unwrap()
    }

    fn sample(value: f64) -> Vec<Sample> {
        vec![Sample {
            rule: 0,
            labels: BTreeMap::from([("endpoint".into(), "register".into())]),
            value,
        }]
    }

    const POLICY: Policy = Policy {
        repeat_interval: Duration::from_secs(3600),
        escalate_after: Duration::from_secs(600),
    };

    /// One evaluation whose notifications all went out.
    fn run(
        engine: &mut Engine,
        rules: &[CheckedRule],
        samples: &[Sample],
        acks: &HashMap<String, Ack>,
        silences: &[Silence],
        policy: Policy,
        now: DateTime<Utc>,
    ) -> Outcome {
        let mut out = engine.evaluate(rules, samples, acks, silences, policy, now);
        for n in out.notifications.clone() {
            let alert = engine.confirm(&n).expect("alert still there");
            out.changed.retain(|c| c.id != alert.id);
            out.changed.push(alert);
        }
        out
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn sent(outcome: &Outcome) -> Vec<(Route, String, String)> {
        outcome
            .notifications
            .iter()
            .map(|n| {
                let status = if n.alert.phase == Phase::Resolved {
                    "resolved"
                } else {
                    "firing"
                };
                (
                    n.route,
                    n.alert.severity.as_str().to_owned(),
                    status.to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn pending_then_firing_then_resolved_one_notification_each() {
        let rules = rules("30s");
        let mut engine = Engine::default();
        let none = HashMap::new();
        let out = run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(0),
        );
        assert!(out.notifications.is_empty(), "pending does not notify");
        let out = run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(10),
        );
        assert!(out.notifications.is_empty());
        let out = run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(30),
        );
        assert_eq!(
            sent(&out),
            [(Route::Warning, "warning".into(), "firing".into())]
        );
        let out = run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(40),
        );
        assert!(out.notifications.is_empty(), "no duplicate while firing");
        let out = run(
            &mut engine,
            &rules,
            &sample(5.0),
            &none,
            &[],
            POLICY,
            at(50),
        );
        assert_eq!(
            sent(&out),
            [(Route::Warning, "warning".into(), "resolved".into())]
        );
        let out = run(
            &mut engine,
            &rules,
            &sample(5.0),
            &none,
            &[],
            POLICY,
            at(60),
        );
        assert!(out.notifications.is_empty());
    }

    #[test]
    fn a_pending_alert_that_clears_never_notifies() {
        let rules = rules("30s");
        let mut engine = Engine::default();
        let none = HashMap::new();
        run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(0),
        );
        let out = run(
            &mut engine,
            &rules,
            &sample(1.0),
            &none,
            &[],
            POLICY,
            at(10),
        );
        assert!(out.notifications.is_empty());
        assert_eq!(out.removed.len(), 1);
        assert!(engine.alerts.is_empty());
    }

    #[test]
    fn critical_inhibits_warning_and_repeats_after_the_interval() {
        let rules = rules("0s");
        let policy = Policy {
            escalate_after: Duration::from_secs(86_400),
            ..POLICY
        };
        let mut engine = Engine::default();
        let none = HashMap::new();
        let out = run(
            &mut engine,
            &rules,
            &sample(25.0),
            &none,
            &[],
            policy,
            at(0),
        );
        assert_eq!(
            sent(&out),
            [(Route::Critical, "critical".into(), "firing".into())]
        );
        let out = run(
            &mut engine,
            &rules,
            &sample(25.0),
            &none,
            &[],
            policy,
            at(3600),
        );
        assert_eq!(
            sent(&out),
            [(Route::Critical, "critical".into(), "firing".into())]
        );
        // Falls below critical: the critical resolves and the warning, no longer inhibited, fires.
        let out = run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            policy,
            at(3601),
        );
        let mut got = sent(&out);
        got.sort_by_key(|g| g.1.clone());
        assert_eq!(
            got,
            [
                (Route::Critical, "critical".into(), "resolved".into()),
                (Route::Warning, "warning".into(), "firing".into())
            ]
        );
    }

    #[test]
    fn escalation_only_without_an_ack() {
        let rules = rules("0s");
        let policy = Policy {
            escalate_after: Duration::from_secs(60),
            ..POLICY
        };
        let none = HashMap::new();
        let mut engine = Engine::default();
        run(
            &mut engine,
            &rules,
            &sample(25.0),
            &none,
            &[],
            policy,
            at(0),
        );
        let out = run(
            &mut engine,
            &rules,
            &sample(25.0),
            &none,
            &[],
            policy,
            at(59),
        );
        assert!(out.notifications.is_empty());
        let out = run(
            &mut engine,
            &rules,
            &sample(25.0),
            &none,
            &[],
            policy,
            at(60),
        );
        assert_eq!(
            sent(&out),
            [(Route::Escalation, "critical".into(), "firing".into())]
        );

        let mut engine = Engine::default();
        run(
            &mut engine,
            &rules,
            &sample(25.0),
            &none,
            &[],
            policy,
            at(0),
        );
        let id = engine
            .alerts
            .values()
            .find(|a| a.severity == Severity::Critical)
            .unwrap()
            .id
            .clone();
        let acks = HashMap::from([(
            id.clone(),
            Ack {
                alert_id: id,
                acked_by: "operator".into(),
                acked_at: at(30),
            },
        )]);
        let out = run(
            &mut engine,
            &rules,
            &sample(25.0),
            &acks,
            &[],
            policy,
            at(120),
        );
        assert!(out.notifications.is_empty(), "acknowledged: no escalation");
    }

    #[test]
    fn a_silence_suppresses_until_it_expires() {
        let rules = rules("0s");
        let none = HashMap::new();
        let silence = Silence {
            id: "s".into(),
            matchers: BTreeMap::from([("endpoint".into(), "register".into())]),
            starts_at: at(0),
            ends_at: at(100),
            created_by: "operator".into(),
            comment: String::new(),
        };
        let mut engine = Engine::default();
        let out = run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            std::slice::from_ref(&silence),
            POLICY,
            at(0),
        );
        assert!(out.notifications.is_empty());
        let out = run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            std::slice::from_ref(&silence),
            POLICY,
            at(100),
        );
        assert_eq!(
            sent(&out),
            [(Route::Warning, "warning".into(), "firing".into())]
        );
    }

    #[test]
    fn a_replica_taking_over_from_stored_states_does_not_resend() {
        let rules = rules("0s");
        let none = HashMap::new();
        let mut first = Engine::default();
        let out = run(&mut first, &rules, &sample(15.0), &none, &[], POLICY, at(0));
        assert_eq!(out.notifications.len(), 1);
        let mut second = Engine::from_states(out.changed);
        let out = run(
            &mut second,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(10),
        );
        assert!(out.notifications.is_empty());
        let out = run(
            &mut second,
            &rules,
            &sample(1.0),
            &none,
            &[],
            POLICY,
            at(20),
        );
        assert_eq!(
            sent(&out),
            [(Route::Warning, "warning".into(), "resolved".into())]
        );
    }

    #[test]
    fn an_unconfirmed_notification_stays_owed_and_keeps_its_key() {
        let rules = rules("0s");
        let none = HashMap::new();
        let mut engine = Engine::default();
        // A brand-new alert fires in its first round (for: 0s); the send fails.
        let failed = engine.evaluate(&rules, &sample(15.0), &none, &[], POLICY, at(0));
        assert_eq!(failed.notifications.len(), 1);
        let again = run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(10),
        );
        assert_eq!(
            again.notifications.len(),
            1,
            "still owed after a failed send"
        );
        assert_eq!(again.notifications[0].key, failed.notifications[0].key);
        let out = run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(20),
        );
        assert!(out.notifications.is_empty(), "sent once, not again");
    }

    #[test]
    fn of_two_notifications_only_the_unconfirmed_one_is_owed_again() {
        let rules = rules("0s");
        let policy = Policy {
            escalate_after: Duration::from_secs(0),
            ..POLICY
        };
        let none = HashMap::new();
        let mut engine = Engine::default();
        let out = engine.evaluate(&rules, &sample(25.0), &none, &[], policy, at(0));
        assert_eq!(
            sent(&out),
            [
                (Route::Critical, "critical".into(), "firing".into()),
                (Route::Escalation, "critical".into(), "firing".into())
            ]
        );
        // The critical route went out, the escalation did not.
        engine.confirm(&out.notifications[0]).unwrap();
        let out = run(
            &mut engine,
            &rules,
            &sample(25.0),
            &none,
            &[],
            policy,
            at(10),
        );
        assert_eq!(
            sent(&out),
            [(Route::Escalation, "critical".into(), "firing".into())]
        );
    }

    #[test]
    fn a_refiring_alert_owes_its_new_episode_even_if_the_first_send_fails() {
        let rules = rules("0s");
        let none = HashMap::new();
        let mut engine = Engine::default();
        run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(0),
        );
        run(
            &mut engine,
            &rules,
            &sample(1.0),
            &none,
            &[],
            POLICY,
            at(10),
        );
        // Fires again while stored as resolved; this send fails.
        let failed = engine.evaluate(&rules, &sample(15.0), &none, &[], POLICY, at(20));
        assert_eq!(failed.notifications.len(), 1);
        let out = run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(30),
        );
        assert_eq!(
            sent(&out),
            [(Route::Warning, "warning".into(), "firing".into())]
        );
    }

    #[test]
    fn missing_endpoint_figures_neither_resolve_nor_fire() {
        let rules = rules("0s");
        let none = HashMap::new();
        let mut engine = Engine::default();
        run(
            &mut engine,
            &rules,
            &sample(15.0),
            &none,
            &[],
            POLICY,
            at(0),
        );
        // No figures (bus hiccup, or below min_requests): no sample at all.
        let out = run(&mut engine, &rules, &[], &none, &[], POLICY, at(10));
        assert!(out.notifications.is_empty(), "no data is not resolved");
        assert!(
            engine.alerts.values().all(|a| a.phase == Phase::Firing),
            "still firing"
        );
        let out = run(
            &mut engine,
            &rules,
            &sample(1.0),
            &none,
            &[],
            POLICY,
            at(20),
        );
        assert_eq!(
            sent(&out),
            [(Route::Warning, "warning".into(), "resolved".into())]
        );
    }

    #[test]
    fn an_escalated_alert_tells_the_escalation_route_it_resolved_once() {
        let rules = rules("0s");
        let policy = Policy {
            escalate_after: Duration::from_secs(0),
            ..POLICY
        };
        let none = HashMap::new();
        let mut engine = Engine::default();
        run(
            &mut engine,
            &rules,
            &sample(25.0),
            &none,
            &[],
            policy,
            at(0),
        );
        // Resolves; the escalation's copy fails to send.
        let out = engine.evaluate(&rules, &sample(1.0), &none, &[], policy, at(10));
        let critical = out
            .notifications
            .iter()
            .find(|n| n.route == Route::Critical)
            .unwrap();
        engine.confirm(critical).unwrap();
        let out = run(
            &mut engine,
            &rules,
            &sample(1.0),
            &none,
            &[],
            policy,
            at(20),
        );
        assert_eq!(
            sent(&out),
            [(Route::Escalation, "critical".into(), "resolved".into())]
        );
        let out = run(
            &mut engine,
            &rules,
            &sample(1.0),
            &none,
            &[],
            policy,
            at(30),
        );
        assert!(out.notifications.is_empty());
    }
}
