//! The Prometheus side checked with Prometheus's own tool (`promtool`, Debian's `prometheus`,
//! installed by `scripts/lib.sh`'s `ensure_prometheus_tools`): a real scrape of `/metrics`
//! passes `promtool check metrics`, the exported rules pass `promtool check rules`, and
//! `promtool test rules` fires the exported `AgentOffline` rule per agent, with its `agent_id`.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::alerting::{flags, offline_rule, rules_file};
use crate::alertmanager::program;
use crate::helpers::*;

fn promtool() -> Command {
    Command::new(program("PROMTOOL_BIN", &["promtool"]))
}

/// Runs promtool with `input` on stdin; its exit status and everything it printed.
fn promtool_with_input(args: &[&str], input: &str) -> (bool, String) {
    let mut child = promtool()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

/// `auto-com-center alert-rules --format prometheus` with `env`, written into `dir`.
fn exported_rules(dir: &Path, env: &[(&str, &str)]) -> std::path::PathBuf {
    let mut command = binary();
    command.args(["alert-rules", "--format", "prometheus"]);
    for (name, value) in env {
        command.env(name, value);
    }
    let finished = run_to_end(&mut command, Duration::from_secs(10));
    assert!(finished.status.success(), "{}", finished.stderr);
    let path = dir.join("acc-rules.yml");
    std::fs::write(&path, &finished.stdout).unwrap();
    path
}

#[tokio::test]
async fn a_real_scrape_of_metrics_passes_promtool_check_metrics() {
    let nats = NatsServer::start();
    let (_dir, rules) = rules_file(json!([offline_rule(0.5, Some(60.0))]));
    let app = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--agent-stale-after=1s",
            "--agent-sweep-interval=100ms",
            &rules,
        ]),
    )
    .await;
    // Traffic on the HTTP door, an agent gone offline, and a refusal at the NATS door, so the
    // scrape has every family with samples.
    app.register("quiet").await;
    let (status, _) = app.get("/orchestrator/agents", Some(&token("quiet"))).await;
    assert_eq!(status.as_u16(), 403);
    let door = NatsAgent::connect(&nats.url(), "intruder").await;
    let answer = door
        .call_with(
            "acc.in.heartbeat",
            Some("not-a-token"),
            serde_json::to_vec(&json!({"agent_id": "intruder"})).unwrap(),
            &[],
            Duration::from_millis(300),
        )
        .await;
    assert!(answer.is_none(), "an unverified caller gets no answer");
    let text = eventually(
        Duration::from_secs(15),
        "fleet figures, the offline agent and the door's refusal on /metrics",
        || async {
            let text = app.metrics_text().await;
            (text.contains("acc_fleet_replicas ")
                && text
                    .contains("acc_agent_offline_last_seen_timestamp_seconds{agent_id=\"quiet\"}")
                && text.contains("acc_door_rejected_total{code=\"INVALID_TOKEN\"} 1")
                && text
                    .contains("acc_fleet_latency_seconds{endpoint=\"register\",quantile=\"0.95\"}"))
            .then_some(text)
        },
    )
    .await;
    assert!(text.contains("# TYPE acc_fleet_latency_seconds summary"));
    assert!(text.contains("# TYPE acc_http_window_latency_seconds summary"));
    assert!(text.contains("acc_door_admitted_total "), "{text}");

    let (ok, printed) = promtool_with_input(&["check", "metrics"], &text);
    assert!(
        ok && printed.trim().is_empty(),
        "promtool: {printed}\n{text}"
    );
    // The check can fail: a gauge with a `quantile` label is what it refused before.
    let broken =
        "# HELP x_seconds Latency.\n# TYPE x_seconds gauge\nx_seconds{quantile=\"0.5\"} 1\n";
    let (ok, printed) = promtool_with_input(&["check", "metrics"], broken);
    assert!(!ok && printed.contains("quantile"), "{printed}");
    app.stop().await;
}

#[test]
fn the_exported_rules_pass_promtool_check_rules_with_and_without_agent_ids() {
    let dir = tempfile::tempdir().unwrap();
    let selecting = dir.path().join("rules.json");
    std::fs::write(
        &selecting,
        json!({"rules": [
            {"name": "AgentOffline", "metric": "agent_offline_seconds", "agents": ["pilot", "a.b"],
             "warning": 300, "for": "0s", "summary": "agent {agent_id} offline"},
            {"name": "Slow", "metric": "latency_p99_ms", "endpoints": ["register"],
             "critical": 250, "for": "2m", "min_requests": 5, "summary": "{endpoint} slow"}
        ]})
        .to_string(),
    )
    .unwrap();
    let selecting = selecting.to_str().unwrap();
    for env in [
        vec![],
        vec![("METRICS_AGENT_IDS", "false")],
        vec![("ALERT_RULES", selecting)],
    ] {
        let path = exported_rules(dir.path(), &env);
        let finished = run_to_end(
            promtool().arg("check").arg("rules").arg(&path),
            Duration::from_secs(20),
        );
        assert!(
            finished.status.success() && finished.stdout.contains("SUCCESS"),
            "{env:?}: {}{}\n{}",
            finished.stdout,
            finished.stderr,
            std::fs::read_to_string(&path).unwrap()
        );
    }
}

#[test]
fn promtool_fires_the_exported_agent_offline_rule_per_agent_with_its_agent_id() {
    let dir = tempfile::tempdir().unwrap();
    exported_rules(dir.path(), &[]);
    // Two replicas scrape the same fleet figures; `pilot` last beat at t=0, `other` at t=8m.
    let test = r#"
rule_files: [acc-rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'acc_agent_offline_last_seen_timestamp_seconds{agent_id="pilot",instance="ingress-1"}'
        values: '0x20'
      - series: 'acc_agent_offline_last_seen_timestamp_seconds{agent_id="pilot",instance="ingress-2"}'
        values: '0x20'
      - series: 'acc_agent_offline_last_seen_timestamp_seconds{agent_id="other",instance="ingress-1"}'
        values: '_x8 480x12'
    alert_rule_test:
      - eval_time: 10m
        alertname: AgentOffline
        exp_alerts:
          - exp_labels: {severity: warning, agent_id: pilot}
            exp_annotations:
              summary: "agent pilot offline, last heartbeat 600 s ago (threshold 300 s)"
      - eval_time: 16m
        alertname: AgentOffline
        exp_alerts:
          - exp_labels: {severity: critical, agent_id: pilot}
            exp_annotations:
              summary: "agent pilot offline, last heartbeat 960 s ago (threshold 900 s)"
          - exp_labels: {severity: warning, agent_id: pilot}
            exp_annotations:
              summary: "agent pilot offline, last heartbeat 960 s ago (threshold 300 s)"
          - exp_labels: {severity: warning, agent_id: other}
            exp_annotations:
              summary: "agent other offline, last heartbeat 480 s ago (threshold 300 s)"
"#;
    let path = dir.path().join("acc-rules.test.yml");
    std::fs::write(&path, test).unwrap();
    let finished = run_to_end(
        promtool().arg("test").arg("rules").arg(&path),
        Duration::from_secs(20),
    );
    assert!(
        finished.status.success(),
        "{}{}",
        finished.stdout,
        finished.stderr
    );
}
