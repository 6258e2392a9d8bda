//! The plan's "sample failure handling report", as tests: an agent going silent, high latency,
//! an error-rate spike, escalation, two alerting replicas; plus the admin alert API and the
//! Prometheus rules export. Short thresholds and intervals keep each test to a few seconds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::helpers::*;

/// A webhook receiver: a real HTTP server that records every notification it accepted. The
/// first `fail_first` deliveries are answered 503, so the sender has to retry.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(fail_first));
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post({
                let got = got.clone();
                move |axum::Json(body): axum::Json<Value>| {
                    let (got, failures) = (got.clone(), failures.clone());
                    async move {
                        let mut left = failures.lock().unwrap();
                        if *left > 0 {
                            *left -= 1;
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        got.lock().unwrap().push(body);
                        axum::http::StatusCode::OK
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url: format!("http://{addr}/hook"),
            got,
        }
    }

    fn all(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }

    /// `(severity, status, subject)` of each notification, `subject` being the `agent_id` or
    /// `endpoint` label; every body is checked against the notification schema.
    fn seen(&self) -> Vec<(String, String, String)> {
        self.all()
            .iter()
            .map(|body| {
                assert_valid("alert_notification.json", body);
                let labels = &body["alerts"][0]["labels"];
                let subject = labels["agent_id"]
                    .as_str()
                    .or(labels["endpoint"].as_str())
                    .unwrap_or_default();
                (
                    labels["severity"].as_str().unwrap().to_owned(),
                    body["status"].as_str().unwrap().to_owned(),
                    subject.to_owned(),
                )
            })
            .collect()
    }

    fn count(&self, severity: &str, status: &str, subject: &str) -> usize {
        self.seen()
            .iter()
            .filter(|(sev, st, sub)| sev == severity && st == status && sub == subject)
            .count()
    }

    async fn wait_for(&self, severity: &str, status: &str, subject: &str, within: Duration) {
        eventually(
            within,
            &format!("{severity} {status} for {subject} at the webhook"),
            || async { (self.count(severity, status, subject) > 0).then_some(()) },
        )
        .await;
    }
}

/// Writes a rules file and returns its directory (keep it alive) and the flag naming it.
pub(crate) fn rules_file(rules: Value) -> (TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&json!({ "rules": rules })).unwrap(),
    )
    .unwrap();
    let flag = format!("--alert-rules={}", path.display());
    (dir, flag)
}

/// Fast intervals for every alerting test.
pub(crate) const FAST: &[&str] = &[
    "--metrics-snapshot-interval=200ms",
    "--metrics-window=2s",
    "--alert-eval-interval=100ms",
    "--alert-lease-ttl=1s",
    "--alert-repeat-interval=1h",
];

pub(crate) fn flags<'a>(extra: &'a [&'a str]) -> Vec<&'a str> {
    FAST.iter().chain(extra.iter()).copied().collect()
}

pub(crate) async fn heartbeat(app: &TestApp, agent: &str) {
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&token(agent)),
            &json!({ "agent_id": agent }),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
}

/// Heartbeats `agent` every 200 ms until the returned handle is dropped (aborted).
fn keep_alive(app: &TestApp, agent: &str) -> tokio::task::JoinHandle<()> {
    let (http, url, agent) = (
        app.http.clone(),
        app.url("/orchestrator/heartbeat"),
        agent.to_owned(),
    );
    tokio::spawn(async move {
        loop {
            let _ = http
                .post(&url)
                .bearer_auth(token(&agent))
                .json(&json!({ "agent_id": agent }))
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

pub(crate) fn offline_rule(warning: f64, critical: Option<f64>) -> Value {
    let mut rule = json!({
        "name": "AgentOffline",
        "metric": "agent_offline_seconds",
        "warning": warning,
        "for": "0s",
        "summary": "agent {agent_id} silent for {value} s",
    });
    if let Some(critical) = critical {
        rule["critical"] = critical.into();
    }
    rule
}

#[tokio::test]
async fn a_silent_agent_warns_then_goes_critical_then_resolves_once_each_at_the_webhook() {
    let nats = NatsServer::start();
    // The receiver refuses the first two deliveries: the sender's retries must get them through.
    let hook = Receiver::start(2).await;
    let (_dir, rules) = rules_file(json!([offline_rule(1.5, Some(3.0))]));
    let warning = format!("--alert-webhooks-warning={}", hook.url);
    let critical = format!("--alert-webhooks-critical={}", hook.url);
    let app = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--agent-stale-after=1s",
            "--agent-sweep-interval=100ms",
            &rules,
            &warning,
            &critical,
        ]),
    )
    .await;
    app.register("quiet").await;
    let registered = tokio::time::Instant::now();

    hook.wait_for("warning", "firing", "quiet", Duration::from_secs(10))
        .await;
    assert!(
        registered.elapsed() >= Duration::from_millis(1500),
        "WARN only after the first threshold"
    );
    assert_eq!(
        hook.count("critical", "firing", "quiet"),
        0,
        "not yet critical"
    );
    hook.wait_for("critical", "firing", "quiet", Duration::from_secs(10))
        .await;
    assert!(
        registered.elapsed() >= Duration::from_secs(3),
        "CRITICAL only after the second threshold"
    );

    // The agent heartbeats again (and keeps doing so): both alerts resolve.
    heartbeat(&app, "quiet").await;
    let _alive = keep_alive(&app, "quiet");
    hook.wait_for("warning", "resolved", "quiet", Duration::from_secs(10))
        .await;
    hook.wait_for("critical", "resolved", "quiet", Duration::from_secs(10))
        .await;
    // More evaluations pass: nothing is sent twice.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut seen = hook.seen();
    seen.sort();
    let want = |sev: &str, st: &str| (sev.to_owned(), st.to_owned(), "quiet".to_owned());
    assert_eq!(
        seen,
        [
            want("critical", "firing"),
            want("critical", "resolved"),
            want("warning", "firing"),
            want("warning", "resolved"),
        ]
    );
    // Alertmanager's webhook format.
    let first = &hook.all()[0];
    assert_eq!(first["version"], "4");
    assert_eq!(first["alerts"][0]["labels"]["alertname"], "AgentOffline");
    assert_eq!(first["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    // One alert per notification, so the group is that alert: every label, in the key too.
    assert_eq!(first["groupLabels"], first["alerts"][0]["labels"]);
    let severity = first["alerts"][0]["labels"]["severity"].as_str().unwrap();
    assert_eq!(
        first["groupKey"],
        format!(r#"{{}}:{{agent_id="quiet", alertname="AgentOffline", severity="{severity}"}}"#)
    );
    // The same notifications are on the bus, one message each, valid against the schema.
    let on_bus = all_stored(&app.js, "ACC_ALERTS", "acc.alerts.>").await;
    assert_eq!(on_bus.len(), 4, "{on_bus:?}");
    // And the admin API lists both alerts as recent (resolved).
    let (status, body) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(body["recent"].as_array().unwrap().len(), 2, "{body}");
}

/// A TCP link to the nats-server that, while `slow` is set, holds every chunk the app sends
/// for `delay` before passing it on: each request that waits for a JetStream ack is slower by
/// about that much. The injected cause of a latency alert, removable while traffic goes on.
struct SlowLink {
    url: String,
    slow: Arc<std::sync::atomic::AtomicBool>,
}

impl SlowLink {
    async fn start(nats: &NatsServer, delay: Duration) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let upstream = nats.url().trim_start_matches("nats://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let slow = Arc::new(AtomicBool::new(false));
        let flag = slow.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (mut from_app, mut to_app) = inbound.into_split();
                let (mut from_nats, mut to_nats) = outbound.into_split();
                let flag = flag.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_app.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if flag.load(Ordering::Relaxed) {
                            tokio::time::sleep(delay).await;
                        }
                        if to_nats.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_nats, &mut to_app).await;
                });
            }
        });
        Self {
            url: format!("nats://{addr}"),
            slow,
        }
    }

    fn set_slow(&self, slow: bool) {
        self.slow.store(slow, std::sync::atomic::Ordering::Relaxed);
    }
}

#[tokio::test]
async fn p95_above_the_threshold_fires_under_real_traffic_and_resolves_once_the_slowness_is_gone() {
    let nats = NatsServer::start();
    let hook = Receiver::start(0).await;
    // Normal requests take a few ms; with the link slowed by 150 ms they exceed 50 ms.
    let (_dir, rules) = rules_file(json!([{
        "name": "EndpointLatencyP95High",
        "metric": "latency_p95_ms",
        "warning": 50.0,
        "for": "300ms",
        "min_requests": 5,
        "summary": "p95 of {endpoint} is {value} ms",
    }]));
    let warning = format!("--alert-webhooks-warning={}", hook.url);
    // The ingress talks to NATS through the slow link; the workers talk to it directly, so
    // the slowness is only in the requests the alert measures.
    let link = SlowLink::start(&nats, Duration::from_millis(150)).await;
    let ingress = TestApp::start(settings(
        Some(&link.url),
        &flags(&["--roles=ingress,registry"]),
    ))
    .await;
    let _workers = TestApp::spawn_with(
        &nats,
        &flags(&["--roles=metrics,alerting", &rules, &warning]),
    )
    .await;
    link.set_slow(true);
    // One slow registration: below `min_requests`, so never judged (the rule selects every
    // endpoint, register included).
    ingress.register("busy").await;
    let traffic = {
        let (http, url) = (ingress.http.clone(), ingress.url("/orchestrator/events"));
        tokio::spawn(async move {
            for n in 0.. {
                let _ = http
                    .post(&url)
                    .bearer_auth(token("busy"))
                    .json(&event("busy", &format!("ev-{n}")))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    hook.wait_for("warning", "firing", "events", Duration::from_secs(15))
        .await;
    let firing = &hook.all()[0];
    assert_eq!(
        firing["alerts"][0]["labels"]["alertname"],
        "EndpointLatencyP95High"
    );

    // Remove the cause while traffic goes on: fast requests fill the window (2 s) and the
    // alert resolves.
    link.set_slow(false);
    hook.wait_for("warning", "resolved", "events", Duration::from_secs(15))
        .await;
    traffic.abort();
    assert_eq!(hook.count("warning", "firing", "events"), 1);
    assert_eq!(hook.count("warning", "resolved", "events"), 1);
    assert_eq!(
        hook.count("warning", "firing", "register"),
        0,
        "a slow endpoint below min_requests is not judged: {:?}",
        hook.seen()
    );
}

#[tokio::test]
async fn endpoint_alerts_stay_firing_while_traffic_stops() {
    let nats = NatsServer::start();
    let hook = Receiver::start(0).await;
    // A threshold every real request exceeds.
    let (_dir, rules) = rules_file(json!([{
        "name": "EndpointLatencyP95High",
        "metric": "latency_p95_ms",
        "endpoints": ["events"],
        "warning": 0.01,
        "for": "0s",
        "min_requests": 5,
        "summary": "p95 of {endpoint} is {value} ms",
    }]));
    let warning = format!("--alert-webhooks-warning={}", hook.url);
    let app = TestApp::spawn_with(&nats, &flags(&[&rules, &warning])).await;
    app.register("busy").await;
    for n in 0..10 {
        let (status, body) = app
            .post(
                "/orchestrator/events",
                Some(&token("busy")),
                &event("busy", &format!("ev-{n}")),
            )
            .await;
        assert_eq!(status.as_u16(), 200, "{body}");
    }
    hook.wait_for("warning", "firing", "events", Duration::from_secs(10))
        .await;
    // No more traffic: the window (2 s) empties; no data is not a resolution.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        hook.count("warning", "resolved", "events"),
        0,
        "{:?}",
        hook.seen()
    );
    let (_, listed) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
    assert!(
        listed["active"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["labels"]["endpoint"] == "events"),
        "{listed}"
    );
}

#[tokio::test]
async fn without_a_metrics_worker_the_alerting_worker_merges_the_snapshots_itself() {
    let nats = NatsServer::start();
    let hook = Receiver::start(0).await;
    let (_dir, rules) = rules_file(json!([{
        "name": "EndpointLatencyP95High",
        "metric": "latency_p95_ms",
        "endpoints": ["register"],
        "warning": 0.01,
        "for": "0s",
        "summary": "p95 of {endpoint} is {value} ms",
    }]));
    let warning = format!("--alert-webhooks-warning={}", hook.url);
    let app = TestApp::spawn_with(
        &nats,
        &flags(&["--roles=ingress,registry,alerting", &rules, &warning]),
    )
    .await;
    app.register("solo").await;
    hook.wait_for("warning", "firing", "register", Duration::from_secs(10))
        .await;
    let stream = app.js.get_stream("ACC_METRICS").await.unwrap();
    assert!(
        stream
            .get_last_raw_message_by_subject("acc.metrics.fleet")
            .await
            .is_err(),
        "no fleet figures were published"
    );
}

#[tokio::test]
async fn a_burst_of_server_errors_fires_the_error_rate_alert_at_critical() {
    let nats = NatsServer::start();
    let hook = Receiver::start(0).await;
    let (_dir, rules) = rules_file(json!([{
        "name": "EndpointErrorRateHigh",
        "metric": "error_rate",
        "warning": 0.005,
        "critical": 0.01,
        "for": "0s",
        "min_requests": 5,
        "summary": "error rate of {endpoint} is {value}",
    }]));
    let warning = format!("--alert-webhooks-warning={}", hook.url);
    let critical = format!("--alert-webhooks-critical={}", hook.url);
    let app = TestApp::spawn_with(&nats, &flags(&[&rules, &warning, &critical])).await;
    app.register("burst").await;
    for n in 0..20 {
        let (status, body) = app
            .post(
                "/orchestrator/events",
                Some(&token("burst")),
                &event("burst", &format!("ok-{n}")),
            )
            .await;
        assert_eq!(status.as_u16(), 200, "{body}");
    }
    // The cause: the events stream is full (discard new), so the bus refuses every new event.
    let mut stream = app.js.get_stream("ACC_EVENTS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_messages = 20;
    app.js.update_stream(config).await.unwrap();
    for n in 0..10 {
        let (status, _) = app
            .post(
                "/orchestrator/events",
                Some(&token("burst")),
                &event("burst", &format!("fail-{n}")),
            )
            .await;
        assert!(status.is_server_error(), "{status}");
    }
    hook.wait_for("critical", "firing", "events", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 10 failures in 30 requests is above 1 %: CRITICAL, which inhibits the WARN of the same
    // endpoint; other endpoints without server errors stay quiet.
    assert_eq!(
        hook.count("warning", "firing", "events"),
        0,
        "{:?}",
        hook.seen()
    );
    assert_eq!(hook.count("critical", "firing", "events"), 1);
    assert_eq!(hook.seen().len(), 1, "{:?}", hook.seen());
    let body = &hook.all()[0];
    assert!(
        body["alerts"][0]["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("events"),
        "{body}"
    );
}

#[tokio::test]
async fn an_unacknowledged_critical_escalates_after_the_delay_and_an_acknowledged_one_does_not() {
    let nats = NatsServer::start();
    let critical_hook = Receiver::start(0).await;
    let escalation_hook = Receiver::start(0).await;
    let (_dir, rules) = rules_file(json!([{
        "name": "AgentOffline",
        "metric": "agent_offline_seconds",
        "critical": 1.0,
        "for": "0s",
        "summary": "agent {agent_id} silent",
    }]));
    let critical = format!("--alert-webhooks-critical={}", critical_hook.url);
    let escalation = format!("--alert-webhooks-escalation={}", escalation_hook.url);
    let app = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--agent-stale-after=500ms",
            "--agent-sweep-interval=100ms",
            "--alert-escalate-after=2s",
            &rules,
            &critical,
            &escalation,
        ]),
    )
    .await;
    app.register("ignored").await;
    app.register("handled").await;
    critical_hook
        .wait_for("critical", "firing", "handled", Duration::from_secs(10))
        .await;
    let fired = tokio::time::Instant::now();
    // The operator acknowledges the alert of "handled" at once.
    let (status, body) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let id = body["active"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["agent_id"] == "handled")
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .expect("the alert is listed as active");
    let (status, body) = app
        .post(
            &format!("/orchestrator/alerts/{id}/ack"),
            Some(&admin_token()),
            &json!({}),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(body["acknowledged"]["acked_by"], "operator");

    escalation_hook
        .wait_for("critical", "firing", "ignored", Duration::from_secs(10))
        .await;
    // The escalation came ALERT_ESCALATE_AFTER (2 s) after the alert fired, by the worker's
    // own record of both moments.
    let (_, listed) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
    let ignored = listed["active"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["agent_id"] == "ignored")
        .cloned()
        .expect("listed");
    let at = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(ignored[field].as_str().unwrap()).unwrap()
    };
    let waited = (at("escalated_at") - at("fired_at")).to_std().unwrap();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
        "escalated {waited:?} after firing: {ignored} (test saw it {:?} after the first firing)",
        fired.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(escalation_hook.count("critical", "firing", "handled"), 0);
    assert_eq!(escalation_hook.count("critical", "firing", "ignored"), 1);
    assert_eq!(escalation_hook.all()[0]["receiver"], "escalation");
    // The acknowledgement shows in the list.
    let (_, body) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
    let handled = body["active"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(handled["acknowledged"]["acked_by"], "operator", "{handled}");
}

/// The holder written in the lease key, if any.
async fn lease_holder(app: &TestApp) -> Option<String> {
    let kv = app.js.get_key_value("acc_alerting").await.ok()?;
    let value = kv.get("lease").await.ok()??;
    let record: Value = serde_json::from_slice(&value).ok()?;
    record["holder"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn two_alerting_replicas_send_each_transition_once_and_a_takeover_does_not_resend() {
    let nats = NatsServer::start();
    let hook = Receiver::start(0).await;
    let (_dir, rules) = rules_file(json!([offline_rule(1.0, None)]));
    let warning = format!("--alert-webhooks-warning={}", hook.url);
    let core = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--roles=ingress,registry,metrics",
            "--agent-stale-after=500ms",
            "--agent-sweep-interval=100ms",
            &rules,
        ]),
    )
    .await;
    let alerting_flags = ["--roles=alerting", rules.as_str(), warning.as_str()];
    let alerting = flags(&alerting_flags);
    let first = TestApp::spawn_with(&nats, &alerting).await;
    let first_holder = eventually(Duration::from_secs(5), "the first replica's lease", || {
        lease_holder(&core)
    })
    .await;
    let second = TestApp::spawn_with(&nats, &alerting).await;

    core.register("flaky").await;
    hook.wait_for("warning", "firing", "flaky", Duration::from_secs(10))
        .await;
    // Both replicas evaluate on the same figures for a while: still one notification.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        hook.count("warning", "firing", "flaky"),
        1,
        "{:?}",
        hook.seen()
    );

    // The active replica stops; the standby takes the lease over.
    assert_eq!(
        lease_holder(&core).await.as_deref(),
        Some(first_holder.as_str())
    );
    first.stop().await;
    eventually(
        Duration::from_secs(5),
        "the standby to take over",
        || async {
            lease_holder(&core)
                .await
                .filter(|holder| holder != &first_holder)
        },
    )
    .await;
    // The new holder evaluates the still-firing alert several times without re-sending it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        hook.count("warning", "firing", "flaky"),
        1,
        "{:?}",
        hook.seen()
    );

    heartbeat(&core, "flaky").await;
    let _alive = keep_alive(&core, "flaky");
    hook.wait_for("warning", "resolved", "flaky", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hook.count("warning", "firing", "flaky"),
        1,
        "{:?}",
        hook.seen()
    );
    assert_eq!(
        hook.count("warning", "resolved", "flaky"),
        1,
        "{:?}",
        hook.seen()
    );
    second.stop().await;
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_killed_active_replica_is_replaced_after_the_lease_ttl_without_duplicates() {
    let nats = NatsServer::start();
    let hook = Receiver::start(0).await;
    let (_dir, rules) = rules_file(json!([offline_rule(1.0, None)]));
    let warning = format!("--alert-webhooks-warning={}", hook.url);
    let core = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--roles=ingress,registry,metrics",
            "--agent-stale-after=500ms",
            "--agent-sweep-interval=100ms",
            &rules,
        ]),
    )
    .await;
    // The first alerting replica is a process of its own, so that it can be killed with SIGKILL:
    // no graceful release of the lease.
    let mut command = binary();
    command
        .arg("serve")
        .args(flags(&[
            "--roles=alerting",
            &rules,
            &warning,
            "--log-level=error",
        ]))
        .env("SHARED_SECRET", SECRET)
        .env("NATS_URL", nats.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut killed = KillOnDrop(command.spawn().expect("spawn the binary"));
    let first_holder = eventually(Duration::from_secs(10), "the process's lease", || {
        lease_holder(&core)
    })
    .await;
    let second = TestApp::spawn_with(&nats, &flags(&["--roles=alerting", &rules, &warning])).await;

    core.register("doomed").await;
    hook.wait_for("warning", "firing", "doomed", Duration::from_secs(10))
        .await;
    assert_eq!(
        lease_holder(&core).await.as_deref(),
        Some(first_holder.as_str())
    );
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    let killed_at = tokio::time::Instant::now();
    eventually(
        Duration::from_secs(5),
        "the standby to take over",
        || async {
            lease_holder(&core)
                .await
                .filter(|holder| holder != &first_holder)
        },
    )
    .await;
    assert!(
        killed_at.elapsed() <= Duration::from_secs(4),
        "taken over soon after the lease TTL (1 s) ran out, not at some later time"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        hook.count("warning", "firing", "doomed"),
        1,
        "{:?}",
        hook.seen()
    );

    heartbeat(&core, "doomed").await;
    let _alive = keep_alive(&core, "doomed");
    hook.wait_for("warning", "resolved", "doomed", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hook.count("warning", "firing", "doomed"),
        1,
        "{:?}",
        hook.seen()
    );
    assert_eq!(
        hook.count("warning", "resolved", "doomed"),
        1,
        "{:?}",
        hook.seen()
    );
    second.stop().await;
}

#[tokio::test]
async fn alert_routes_need_the_admin_scope_and_silences_can_be_created_listed_and_expired() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (status, body) = app
        .get("/orchestrator/alerts", Some(&token("agent-1")))
        .await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
    let (status, body) = app.get("/orchestrator/silences", None).await;
    assert_error(status, &body, 401, "MISSING_TOKEN");
    let (status, body) = app
        .post(
            "/orchestrator/alerts/0123456789abcdef/ack",
            Some(&admin_token()),
            &json!({}),
        )
        .await;
    assert_error(status, &body, 404, "ALERT_NOT_FOUND");
    let (status, body) = app
        .post(
            "/orchestrator/alerts/not-an-id/ack",
            Some(&admin_token()),
            &json!({}),
        )
        .await;
    assert_error(status, &body, 404, "ALERT_NOT_FOUND");

    let (status, body) = app
        .post(
            "/orchestrator/silences",
            Some(&admin_token()),
            &json!({"matchers": {}, "duration": "1h"}),
        )
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
    let (status, body) = app
        .post(
            "/orchestrator/silences",
            Some(&admin_token()),
            &json!({"matchers": {"agent_id": "pilot"}, "duration": "soon"}),
        )
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
    let (status, body) = app
        .post(
            "/orchestrator/silences",
            Some(&admin_token()),
            &json!({"matchers": {"agent_id": "pilot"}, "duration": "1h", "comment": "maintenance"}),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let id = body["silence"]["id"].as_str().unwrap().to_owned();

    // Every write needs the admin scope: an agent's token is refused (403), no token is 401.
    let silence = json!({"matchers": {"agent_id": "pilot"}, "duration": "1h"});
    let writes = [
        (
            "POST",
            "/orchestrator/alerts/0123456789abcdef/ack".to_owned(),
        ),
        ("POST", "/orchestrator/silences".to_owned()),
        ("DELETE", format!("/orchestrator/silences/{id}")),
    ];
    for (method, path) in &writes {
        for (caller, want_status, want_code) in [
            (Some(token("agent-1")), 403, "INSUFFICIENT_SCOPE"),
            (None, 401, "MISSING_TOKEN"),
        ] {
            let mut request = match *method {
                "POST" => app.http.post(app.url(path)).json(&silence),
                _ => app.http.delete(app.url(path)),
            };
            if let Some(caller) = &caller {
                request = request.bearer_auth(caller);
            }
            let (status, body) = read(request.send().await.unwrap()).await;
            assert_error(status, &body, want_status, want_code);
        }
    }

    let (_, listed) = app
        .get("/orchestrator/silences", Some(&admin_token()))
        .await;
    assert_eq!(listed["count"], 1, "{listed}");
    assert_eq!(
        listed["silences"][0]["active"], true,
        "the refused DELETEs left it: {listed}"
    );
    assert_eq!(listed["silences"][0]["active"], true);
    assert_eq!(listed["silences"][0]["created_by"], "operator");

    let response = app
        .http
        .delete(app.url(&format!("/orchestrator/silences/{id}")))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let (_, listed) = app
        .get("/orchestrator/silences", Some(&admin_token()))
        .await;
    assert_eq!(listed["silences"][0]["active"], false, "{listed}");

    let (status, body) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(body["active"], json!([]));
}

#[tokio::test]
async fn a_silence_holds_back_notifications_until_it_is_expired() {
    let nats = NatsServer::start();
    let hook = Receiver::start(0).await;
    let (_dir, rules) = rules_file(json!([offline_rule(0.5, None)]));
    let warning = format!("--alert-webhooks-warning={}", hook.url);
    let app = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--agent-stale-after=300ms",
            "--agent-sweep-interval=100ms",
            &rules,
            &warning,
        ]),
    )
    .await;
    let (status, body) = app
        .post(
            "/orchestrator/silences",
            Some(&admin_token()),
            &json!({"matchers": {"agent_id": "muted"}, "duration": "1h"}),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let id = body["silence"]["id"].as_str().unwrap().to_owned();
    app.register("muted").await;
    // Firing (listed as active) but silenced.
    eventually(Duration::from_secs(10), "the alert to fire", || async {
        let (_, body) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
        body["active"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["phase"] == "firing")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(hook.all().is_empty(), "{:?}", hook.seen());
    // Expired: the firing alert is notified.
    let response = app
        .http
        .delete(app.url(&format!("/orchestrator/silences/{id}")))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    hook.wait_for("warning", "firing", "muted", Duration::from_secs(5))
        .await;
}

/// Metric names in a PromQL expression (our families all start with `acc_`).
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("acc_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn alert_rules_print_as_a_prometheus_rules_file_over_metrics_that_metrics_exposes() {
    let finished = run_to_end(
        binary().args(["alert-rules", "--format", "prometheus"]),
        Duration::from_secs(10),
    );
    assert!(finished.status.success(), "{}", finished.stderr);
    let parsed: serde_yaml::Value = serde_yaml::from_str(&finished.stdout)
        .unwrap_or_else(|e| panic!("not YAML ({e}):\n{}", finished.stdout));
    let groups = parsed["groups"].as_sequence().expect("groups");
    assert_eq!(groups.len(), 1);
    assert!(groups[0]["name"].as_str().is_some());
    let rules = groups[0]["rules"].as_sequence().expect("rules");
    // The plan's table and a nearly full stream: four conditions, each at WARN and CRITICAL;
    // and the task rules: the DLQ growing (WARN and CRITICAL), a capability nobody online
    // serves (WARN).
    assert_eq!(rules.len(), 11, "{}", finished.stdout);

    // What a running bridge exposes, once the metrics worker published fleet figures.
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &flags(&[])).await;
    let exposed = eventually(
        Duration::from_secs(10),
        "fleet metrics on /metrics",
        || async {
            let text = app.metrics_text().await;
            text.contains("acc_fleet_replicas").then_some(text)
        },
    )
    .await;
    assert!(
        promql_parser::parser::parse("max by (endpoint) (acc_fleet_error_rate > ").is_err(),
        "the parser refuses broken PromQL"
    );
    let mut severities = Vec::new();
    for rule in rules {
        let alert = rule["alert"].as_str().expect("alert");
        let expr = rule["expr"].as_str().expect("expr");
        let hold = rule["for"].as_str().expect("for");
        assert!(
            hold.ends_with('s') || hold.ends_with('m'),
            "{alert}: for {hold}"
        );
        let severity = rule["labels"]["severity"].as_str().expect("severity");
        severities.push(severity.to_owned());
        assert!(rule["annotations"]["summary"].as_str().is_some(), "{alert}");
        promql_parser::parser::parse(expr)
            .unwrap_or_else(|e| panic!("{alert}: not valid PromQL: {e}\n{expr}"));
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{alert}: {expr}");
        for name in names {
            assert!(
                exposed.contains(&format!("# TYPE {name} ")),
                "{alert}: {name} is not exposed by /metrics"
            );
        }
    }
    // `--format json` prints a rules file ALERT_RULES reads back to the same rules.
    let json = run_to_end(
        binary().args(["alert-rules", "--format", "json"]),
        Duration::from_secs(10),
    );
    assert!(json.status.success(), "{}", json.stderr);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.json");
    std::fs::write(&path, &json.stdout).unwrap();
    let again = run_to_end(
        binary()
            .args(["alert-rules", "--format", "prometheus"])
            .env("ALERT_RULES", &path),
        Duration::from_secs(10),
    );
    assert!(again.status.success(), "{}", again.stderr);
    assert_eq!(again.stdout, finished.stdout);
    // A broken rules file is refused with a one-line reason.
    std::fs::write(
        &path,
        r#"{"rules":[{"name":"x y","metric":"error_rate","warning":1,"summary":""}]}"#,
    )
    .unwrap();
    let refused = run_to_end(
        binary()
            .args(["alert-rules", "--format", "prometheus"])
            .env("ALERT_RULES", &path),
        Duration::from_secs(10),
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        refused.stderr.contains("invalid ALERT_RULES"),
        "{}",
        refused.stderr
    );

    severities.sort();
    assert_eq!(
        severities,
        [
            "critical", "critical", "critical", "critical", "critical", "warning", "warning",
            "warning", "warning", "warning", "warning"
        ]
    );
    let thresholds: Vec<&str> = rules.iter().map(|r| r["expr"].as_str().unwrap()).collect();
    assert!(
        thresholds
            .iter()
            .any(|e| e.contains("* 1000 > 100 ") && e.contains("quantile=\"0.95\"")),
        "{thresholds:?}"
    );
    assert!(
        thresholds.iter().any(|e| e.contains("* 1000 > 120 ")),
        "{thresholds:?}"
    );
    assert!(
        thresholds
            .iter()
            .any(|e| e.contains("acc_fleet_error_rate") && e.contains("> 0.005")),
        "{thresholds:?}"
    );
    assert!(
        thresholds.iter().any(|e| e.contains("> 900")),
        "{thresholds:?}"
    );
}

#[tokio::test]
async fn a_graceful_stop_waits_for_webhook_retries_still_running() {
    let nats = NatsServer::start();
    // Two refusals: the delivery succeeds on the third attempt, ~600 ms after the first.
    let hook = Receiver::start(2).await;
    let (_dir, rules) = rules_file(json!([offline_rule(0.5, None)]));
    let warning = format!("--alert-webhooks-warning={}", hook.url);
    let app = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--agent-stale-after=300ms",
            "--agent-sweep-interval=100ms",
            &rules,
            &warning,
        ]),
    )
    .await;
    app.register("leaving").await;
    // The notification is on the bus: its webhook delivery has started and is being refused.
    let js = app.js.clone();
    eventually(Duration::from_secs(10), "the alert on the bus", || async {
        (!all_stored(&js, "ACC_ALERTS", "acc.alerts.>")
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(hook.all().len(), 0, "not delivered yet");
    app.stop().await;
    assert_eq!(
        hook.count("warning", "firing", "leaving"),
        1,
        "the stop waited for the retry: {:?}",
        hook.seen()
    );
}

#[tokio::test]
async fn a_notification_the_bus_refused_is_delivered_once_after_the_bus_recovers() {
    let nats = NatsServer::start();
    let hook = Receiver::start(0).await;
    // AgentOffline fires in its first round (for: 0s): the case the old rollback lost.
    let (_dir, rules) = rules_file(json!([offline_rule(0.5, None)]));
    let warning = format!("--alert-webhooks-warning={}", hook.url);
    let app = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--agent-stale-after=300ms",
            "--agent-sweep-interval=100ms",
            &rules,
            &warning,
        ]),
    )
    .await;
    // The route fails: no stream takes acc.alerts.*, so every alert publish is refused.
    let mut stream = app.js.get_stream("ACC_ALERTS").await.unwrap();
    let original = stream.info().await.unwrap().config.clone();
    let mut broken = original.clone();
    broken.subjects = vec!["acc.alerts-disabled.>".to_owned()];
    app.js.update_stream(broken).await.unwrap();

    app.register("unlucky").await;
    let (_, listed) = eventually(Duration::from_secs(10), "the alert firing", || async {
        let (status, body) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
        body["active"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["phase"] == "firing"))
            .then_some((status, body))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(hook.all().is_empty(), "nothing could be sent: {listed}");

    // The bus recovers: the owed notification goes out, once.
    app.js.update_stream(original).await.unwrap();
    hook.wait_for("warning", "firing", "unlucky", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        hook.count("warning", "firing", "unlucky"),
        1,
        "{:?}",
        hook.seen()
    );
    let on_bus = all_stored(&app.js, "ACC_ALERTS", "acc.alerts.>").await;
    assert_eq!(on_bus.len(), 1, "{on_bus:?}");
}
