//! Alert rules: what is measured, for which endpoints or agents, above which thresholds, for how
//! long. Loaded from the JSON file named by `ALERT_RULES`; without one, the plan's table
//! (docs/architecture.md, Alert defaults) applies.
//!
//! A rule carries both severities: `warning` and `critical` thresholds (either may be absent).
//! Each severity of each matching endpoint or agent is one alert, labelled `alertname`,
//! `severity` and `endpoint` or `agent_id`; a firing `critical` inhibits the `warning` of the
//! same rule and labels. A condition is `value > threshold`.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::parse_duration;

/// What a rule measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Fleet p50 latency of an endpoint over the window, in milliseconds.
    LatencyP50Ms,
    /// Fleet p95 latency of an endpoint over the window, in milliseconds.
    LatencyP95Ms,
    /// Fleet p99 latency of an endpoint over the window, in milliseconds.
    LatencyP99Ms,
    /// Fleet server-side failures (5xx) per request over the window, a fraction (0.01 = 1 %).
    ErrorRate,
    /// Seconds since the last heartbeat of an agent the registry has marked `offline`; agents
    /// not offline have no value. With the default `AGENT_STALE_AFTER` of 5 min an agent turns
    /// offline 5 min after its last heartbeat (plus up to one sweep interval), so "offline for
    /// more than 5 min" is measured from the last heartbeat, not from the sweep.
    AgentOfflineSeconds,
    /// The fraction of a stream's `max_bytes` in use (0.8 = 80 %), from the fleet snapshot: an
    /// operator hears of a filling stream before it refuses writes with `STREAM_FULL`. Labelled
    /// `stream`; streams without a bound have no value.
    StreamUsedRatio,
    /// Tasks dead-lettered in the last 10 minutes (the acting dispatcher counts them): above 0,
    /// the dead-letter queue is growing.
    DeadLetteredRecently,
    /// Queued tasks of a capability that no online agent has, per capability (label
    /// `capability`): work waits and nobody can take it.
    QueuedWithoutOnlineAgent,
}

impl Metric {
    /// True for metrics selected by endpoint.
    pub fn per_endpoint(self) -> bool {
        matches!(
            self,
            Metric::LatencyP50Ms | Metric::LatencyP95Ms | Metric::LatencyP99Ms | Metric::ErrorRate
        )
    }

    /// True for the task metrics, read from the acting dispatcher's figures.
    pub fn of_tasks(self) -> bool {
        matches!(
            self,
            Metric::DeadLetteredRecently | Metric::QueuedWithoutOnlineAgent
        )
    }

    /// True when no sample means the condition cleared (an agent no longer offline has none);
    /// for the other metrics no sample is no data, which keeps an alert as it is.
    pub fn absent_means_clear(self) -> bool {
        matches!(self, Metric::AgentOfflineSeconds)
    }
}

/// Alert severity. Each has its own route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One rule as written in the rules file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The `alertname` label: letters, digits and `_`, starting with a letter.
    pub name: String,
    pub metric: Metric,
    /// Endpoints the rule watches (register, heartbeat, task_callback, task_status, events,
    /// agents); empty means all. Only for per-endpoint metrics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Agents the rule watches; empty means all. Only for `agent_offline_seconds`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical: Option<f64>,
    /// How long the condition must hold before the alert fires ("0s", "1m").
    #[serde(rename = "for", default = "zero")]
    pub hold: String,
    /// Fewest requests in the window for an endpoint to be judged (per-endpoint metrics); below
    /// it the endpoint's alerts keep their state (neither fire nor resolve).
    #[serde(default)]
    pub min_requests: u64,
    /// One line for people; `{endpoint}`, `{agent_id}`, `{capability}`, `{value}` and
    /// `{threshold}` are replaced.
    pub summary: String,
}

fn zero() -> String {
    "0s".to_owned()
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedRule {
    pub rule: Rule,
    pub hold: Duration,
}

impl CheckedRule {
    /// The thresholds that are set, critical first (so inhibition sees the critical first).
    pub fn thresholds(&self) -> Vec<(Severity, f64)> {
        let mut out = Vec::new();
        if let Some(t) = self.rule.critical {
            out.push((Severity::Critical, t));
        }
        if let Some(t) = self.rule.warning {
            out.push((Severity::Warning, t));
        }
        out
    }

    pub fn selects_endpoint(&self, endpoint: &str) -> bool {
        self.rule.endpoints.is_empty() || self.rule.endpoints.iter().any(|e| e == endpoint)
    }

    pub fn selects_agent(&self, agent: &str) -> bool {
        self.rule.agents.is_empty() || self.rule.agents.iter().any(|a| a == agent)
    }
}

/// The rules file: `{"rules": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub rules: Vec<Rule>,
}

/// The plan's alert table (docs/architecture.md, Alert defaults). Latency and error rate must hold for a minute, so a
/// single slow burst does not page; an offline agent is judged by the time since its last
/// heartbeat, which already spans minutes.
pub fn defaults() -> RuleFile {
    RuleFile {
        rules: vec![
            Rule {
                name: "EndpointLatencyP95High".into(),
                metric: Metric::LatencyP95Ms,
                endpoints: Vec::new(),
                agents: Vec::new(),
                warning: Some(100.0),
                critical: Some(120.0),
                hold: "1m".into(),
                min_requests: 1,
                summary: "p95 latency of {endpoint} is {value} ms (threshold {threshold} ms)"
                    .into(),
            },
            Rule {
                name: "EndpointErrorRateHigh".into(),
                metric: Metric::ErrorRate,
                endpoints: Vec::new(),
                agents: Vec::new(),
                warning: Some(0.005),
                critical: Some(0.01),
                hold: "1m".into(),
                min_requests: 1,
                summary: "server error rate of {endpoint} is {value} (threshold {threshold})"
                    .into(),
            },
            Rule {
                name: "AgentOffline".into(),
                metric: Metric::AgentOfflineSeconds,
                endpoints: Vec::new(),
                agents: Vec::new(),
                warning: Some(300.0),
                critical: Some(900.0),
                hold: "0s".into(),
                min_requests: 0,
                summary: "agent {agent_id} offline, last heartbeat {value} s ago (threshold {threshold} s)"
                    .into(),
            },
            Rule {
                name: "StreamNearlyFull".into(),
                metric: Metric::StreamUsedRatio,
                endpoints: Vec::new(),
                agents: Vec::new(),
                warning: Some(0.8),
                critical: Some(0.95),
                hold: "0s".into(),
                min_requests: 0,
                summary: "stream {stream} is {value} full (threshold {threshold}); at 1 it refuses writes"
                    .into(),
            },
            // Any task dead-lettered: someone should look at the DLQ (warning only; a flood
            // of them is critical).
            Rule {
                name: "TaskDeadLetterGrowing".into(),
                metric: Metric::DeadLetteredRecently,
                endpoints: Vec::new(),
                agents: Vec::new(),
                warning: Some(0.0),
                critical: Some(100.0),
                hold: "0s".into(),
                min_requests: 0,
                summary: "{value} tasks dead-lettered in the last 10 min (threshold {threshold})"
                    .into(),
            },
            // Tasks wait for a capability nobody online has: for five minutes, not a blip
            // while an agent restarts.
            Rule {
                name: "TaskCapabilityUnserved".into(),
                metric: Metric::QueuedWithoutOnlineAgent,
                endpoints: Vec::new(),
                agents: Vec::new(),
                warning: Some(0.0),
                critical: None,
                hold: "5m".into(),
                min_requests: 0,
                summary: "{value} tasks queued for capability {capability} and no online agent has it"
                    .into(),
            },
        ],
    }
}

/// Checks a rules file: unique valid names, at least one threshold, selectors that fit the
/// metric, a parseable `for`.
pub fn check(file: RuleFile) -> Result<Vec<CheckedRule>, String> {
    let mut checked: Vec<CheckedRule> = Vec::new();
    for rule in file.rules {
        let name = &rule.name;
        let valid_name = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(format!(
                "rule name {name:?} must be letters, digits and _, starting with a letter"
            ));
        }
        if checked.iter().any(|c| &c.rule.name == name) {
            return Err(format!("rule name {name:?} appears twice"));
        }
        if rule.warning.is_none() && rule.critical.is_none() {
            return Err(format!("rule {name}: set warning, critical or both"));
        }
        if [rule.warning, rule.critical]
            .iter()
            .flatten()
            .any(|t| !t.is_finite())
        {
            return Err(format!("rule {name}: thresholds must be finite numbers"));
        }
        if rule.metric != Metric::AgentOfflineSeconds && !rule.agents.is_empty() {
            return Err(format!(
                "rule {name}: agents selects agents, this metric is per endpoint"
            ));
        }
        if let Some(unknown) = rule.endpoints.iter().find(|e| {
            !crate::stats::Endpoint::ALL
                .iter()
                .any(|k| k.name() == e.as_str())
        }) {
            let known: Vec<&str> = crate::stats::Endpoint::ALL
                .iter()
                .map(|e| e.name())
                .collect();
            return Err(format!(
                "rule {name}: unknown endpoint {unknown:?} (known: {})",
                known.join(", ")
            ));
        }
        if rule.metric.of_tasks() && !rule.agents.is_empty() {
            return Err(format!(
                "rule {name}: agents selects agents, this metric is about tasks"
            ));
        }
        if !rule.metric.per_endpoint() && !rule.endpoints.is_empty() {
            return Err(format!(
                "rule {name}: endpoints selects endpoints, this metric is per agent"
            ));
        }
        let hold = if rule.hold.trim() == "0s" || rule.hold.trim() == "0" {
            Duration::ZERO
        } else {
            parse_duration(&rule.hold).map_err(|e| format!("rule {name}: for: {e}"))?
        };
        checked.push(CheckedRule { rule, hold });
    }
    Ok(checked)
}

/// Loads and checks the rules: the file at `path`, or the defaults.
pub fn load(path: Option<&std::path::Path>) -> Result<Vec<CheckedRule>, String> {
    let file = match path {
        None => defaults(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
    };
    check(file)
}

/// `value` as a literal inside a PromQL double-quoted regex matcher: regex metacharacters are
/// escaped, and every backslash doubled for the PromQL string.
fn regex_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push_str("\\\\");
        } else if c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A threshold as Prometheus and people read it.
fn number(value: f64) -> String {
    format!("{value}")
}

/// The same rules as a Prometheus alerting-rules file (YAML), over the metrics `/metrics`
/// exposes. Fleet gauges appear on every ingress replica, so expressions take the `max` over
/// replicas. `min_requests` becomes "some traffic in the window". With `agent_ids` (the
/// default of `METRICS_AGENT_IDS`) an agent rule is one alert per offline agent, labelled
/// `agent_id` like the built-in worker's; without, `/metrics` names no agent and the rule
/// watches the oldest offline agent of the fleet.
pub fn to_prometheus(rules: &[CheckedRule], agent_ids: bool) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("strings serialize");
    let mut out = String::from("groups:\n  - name: auto-com-center\n    rules:\n");
    for checked in rules {
        let rule = &checked.rule;
        let selector = |label: &str, values: &[String]| {
            if values.is_empty() {
                String::new()
            } else {
                let alternatives: Vec<String> = values.iter().map(|v| regex_escape(v)).collect();
                format!("{label}=~\"{}\"", alternatives.join("|"))
            }
        };
        for (severity, threshold) in checked.thresholds().into_iter().rev() {
            let endpoints = selector("endpoint", &rule.endpoints);
            let traffic = if rule.min_requests > 0 {
                let sel = if endpoints.is_empty() {
                    String::new()
                } else {
                    format!("{{{endpoints}}}")
                };
                format!(
                    " and on (endpoint) max by (endpoint) (acc_fleet_requests_per_second{sel}) > 0"
                )
            } else {
                String::new()
            };
            let with = |extra: &str| {
                let mut labels: Vec<String> = Vec::new();
                if !extra.is_empty() {
                    labels.push(extra.to_owned());
                }
                if !endpoints.is_empty() {
                    labels.push(endpoints.clone());
                }
                labels.join(",")
            };
            let expr = match rule.metric {
                Metric::LatencyP50Ms | Metric::LatencyP95Ms | Metric::LatencyP99Ms => {
                    let q = match rule.metric {
                        Metric::LatencyP50Ms => "0.5",
                        Metric::LatencyP95Ms => "0.95",
                        _ => "0.99",
                    };
                    // In milliseconds, like the rule, so `$value` and the threshold read alike.
                    format!(
                        "max by (endpoint) (acc_fleet_latency_seconds{{{}}}) * 1000 > {}{traffic}",
                        with(&format!("quantile=\"{q}\"")),
                        number(threshold)
                    )
                }
                Metric::ErrorRate => format!(
                    "max by (endpoint) (acc_fleet_error_rate{{{}}}) > {}{traffic}",
                    with(""),
                    number(threshold)
                )
                .replace("acc_fleet_error_rate{}", "acc_fleet_error_rate"),
                Metric::AgentOfflineSeconds if agent_ids => {
                    let agents = selector("agent_id", &rule.agents);
                    format!(
                        "time() - max by (agent_id) (acc_agent_offline_last_seen_timestamp_seconds{}) > {}",
                        if agents.is_empty() {
                            String::new()
                        } else {
                            format!("{{{agents}}}")
                        },
                        number(threshold)
                    )
                }
                // `/metrics` names no agent (METRICS_AGENT_IDS=false): the export watches the
                // oldest offline agent of the fleet; an `agents` selector cannot apply there.
                Metric::AgentOfflineSeconds => format!(
                    "time() - min(acc_agents_offline_oldest_last_seen_timestamp_seconds) > {}",
                    number(threshold)
                ),
                Metric::StreamUsedRatio => format!(
                    "max by (stream) (acc_stream_bytes / (acc_stream_max_bytes > 0)) > {}",
                    number(threshold)
                ),
                // Only the acting dispatcher exposes task figures; `increase` survives the
                // counter starting over on a takeover.
                Metric::DeadLetteredRecently => format!(
                    "sum(increase(acc_tasks_dead_lettered_total[10m])) > {}",
                    number(threshold)
                ),
                Metric::QueuedWithoutOnlineAgent => format!(
                    "max by (capability) (acc_tasks_unserved) > {}",
                    number(threshold)
                ),
            };
            let hold = if checked.hold.is_zero() {
                "0s".to_owned()
            } else {
                humantime::format_duration(checked.hold)
                    .to_string()
                    .replace(' ', "")
            };
            let summary = rule
                .summary
                .replace("{endpoint}", "{{ $labels.endpoint }}")
                .replace(
                    "{agent_id}",
                    if agent_ids {
                        "{{ $labels.agent_id }}"
                    } else {
                        "(the oldest offline)"
                    },
                )
                .replace("{stream}", "{{ $labels.stream }}")
                .replace("{capability}", "{{ $labels.capability }}")
                .replace("{value}", "{{ $value }}")
                .replace("{threshold}", &number(threshold));
            let _ = writeln!(out, "      - alert: {}", rule.name);
            let _ = writeln!(out, "        expr: {}", quote(&expr));
            let _ = writeln!(out, "        for: {hold}");
            let _ = writeln!(out, "        labels:");
            let _ = writeln!(out, "          severity: {}", severity.as_str());
            let _ = writeln!(out, "        annotations:");
            let _ = writeln!(out, "          summary: {}", quote(&summary));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_plans_table() {
        let rules = check(defaults()).unwrap();
        let find = |m| rules.iter().find(|r| r.rule.metric == m).unwrap();
        let latency = find(Metric::LatencyP95Ms);
        assert_eq!(
            (latency.rule.warning, latency.rule.critical),
            (Some(100.0), Some(120.0))
        );
        let errors = find(Metric::ErrorRate);
        assert_eq!(
            (errors.rule.warning, errors.rule.critical),
            (Some(0.005), Some(0.01))
        );
        let offline = find(Metric::AgentOfflineSeconds);
        assert_eq!(
            (offline.rule.warning, offline.rule.critical),
            (Some(300.0), Some(900.0))
        );
        let growing = find(Metric::DeadLetteredRecently);
        assert_eq!(growing.rule.warning, Some(0.0));
        let unserved = find(Metric::QueuedWithoutOnlineAgent);
        assert_eq!(
            (unserved.rule.warning, unserved.hold),
            (Some(0.0), Duration::from_secs(300))
        );
        let exported = to_prometheus(&rules, true);
        assert!(exported.contains("increase(acc_tasks_dead_lettered_total[10m])"));
        assert!(exported.contains("max by (capability) (acc_tasks_unserved) > 0"));
        assert!(exported.contains("{{ $labels.capability }}"));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        let mut file = defaults();
        file.rules[0].name = "bad name".into();
        assert!(check(file).unwrap_err().contains("bad name"));
        let mut file = defaults();
        file.rules[2].endpoints = vec!["register".into()];
        assert!(check(file).unwrap_err().contains("per agent"));
        let mut file = defaults();
        file.rules[1].hold = "soon".into();
        assert!(check(file).unwrap_err().contains("for"));
        let mut file = defaults();
        file.rules[1].warning = None;
        file.rules[1].critical = None;
        assert!(check(file).is_err());
    }

    #[test]
    fn a_misspelt_endpoint_is_refused_naming_the_rule() {
        let mut file = defaults();
        file.rules[0].endpoints = vec!["register".into(), "heartbaet".into()];
        let err = check(file).unwrap_err();
        assert!(err.contains("EndpointLatencyP95High"), "{err}");
        assert!(err.contains("heartbaet"), "{err}");
        let mut file = defaults();
        file.rules[0].endpoints = vec!["register".into(), "task_callback".into()];
        assert!(check(file).is_ok());
    }

    #[test]
    fn exported_selectors_match_names_literally() {
        assert_eq!(regex_escape("task_callback"), "task_callback");
        // In the PromQL string `\\.` is the regex `\.`: a literal dot.
        assert_eq!(regex_escape("a.b|c"), "a\\\\.b\\\\|c");
        assert_eq!(regex_escape("q\"x"), "q\\\"x");
    }
}
