//! The bridge feeding a real Alertmanager (Debian's `prometheus-alertmanager`, installed by
//! `scripts/lib.sh`'s `ensure_prometheus_tools`), started per test on loopback with the shipped
//! `deploy/alertmanager/alertmanager.yml`, and read back through its own API
//! (`GET /api/v2/alerts`): alerts arrive, are kept alive by re-sending, resolve by `endsAt`, and
//! the shipped `inhibit_rules` mute a WARN under its CRITICAL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::alerting::{flags, heartbeat, offline_rule, rules_file};
use crate::helpers::*;

/// A program from `$var`, or the first of `names` on PATH.
pub(crate) fn program(var: &str, names: &[&str]) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{} not found: run `source scripts/lib.sh && ensure_prometheus_tools` \
                 (scripts/test does), or set {var}",
                names[0]
            )
        })
}

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/alertmanager/alertmanager.yml")
}

/// A real Alertmanager of our own on loopback, killed on drop (its store is a temporary
/// directory). Clustering is off: one instance.
struct Alertmanager {
    child: Child,
    url: String,
    http: reqwest::Client,
    _store: TempDir,
}

impl Alertmanager {
    async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    async fn start_on(port: u16) -> Self {
        let store = tempfile::tempdir().unwrap();
        let child = Command::new(program(
            "ALERTMANAGER_BIN",
            &["prometheus-alertmanager", "alertmanager"],
        ))
        .arg(format!("--config.file={}", shipped_config().display()))
        .arg(format!("--storage.path={}", store.path().display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start Alertmanager");
        let mut am = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _store: store,
        };
        let ready = format!("{}/-/ready", am.url);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                am.child.try_wait().unwrap().is_none(),
                "Alertmanager exited at start-up"
            );
            if let Ok(answer) = am.http.get(&ready).send().await {
                if answer.status().is_success() {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Alertmanager not ready within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        am
    }

    /// Every alert Alertmanager holds and has not seen resolved (its default listing:
    /// active, silenced and inhibited).
    async fn alerts(&self) -> Vec<Value> {
        let answer = self
            .http
            .get(format!("{}/api/v2/alerts", self.url))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
        answer.json::<Vec<Value>>().await.unwrap()
    }

    /// The alert of `agent` at `severity`, once Alertmanager has processed it.
    async fn alert(&self, agent: &str, severity: &str) -> Option<Value> {
        self.alerts().await.into_iter().find(|a| {
            a["labels"]["agent_id"] == agent
                && a["labels"]["severity"] == severity
                && a["status"]["state"] != "unprocessed"
        })
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn instant(alert: &Value, field: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(alert[field].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

#[test]
fn the_shipped_alertmanager_config_is_valid() {
    let finished = run_to_end(
        Command::new(program("AMTOOL_BIN", &["amtool"]))
            .arg("check-config")
            .arg(shipped_config()),
        Duration::from_secs(20),
    );
    assert!(
        finished.status.success(),
        "{}{}",
        finished.stdout,
        finished.stderr
    );
    assert!(
        finished.stdout.contains("1 inhibit rules"),
        "{}",
        finished.stdout
    );
}

#[tokio::test]
async fn alerts_reach_alertmanager_the_critical_inhibits_the_warning_and_both_resolve_by_ends_at() {
    let am = Alertmanager::start().await;
    let nats = NatsServer::start();
    let (_dir, rules) = rules_file(json!([offline_rule(1.0, Some(2.5))]));
    let target = format!("--alertmanager-url={}", am.url);
    let app = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--agent-stale-after=1s",
            "--agent-sweep-interval=100ms",
            "--alert-external-url=http://acc.example.com/",
            &rules,
            &target,
        ]),
    )
    .await;
    app.register("quiet").await;

    let warning = eventually(Duration::from_secs(15), "the WARN at Alertmanager", || {
        am.alert("quiet", "warning")
    })
    .await;
    assert_eq!(warning["status"]["state"], "active", "{warning}");
    assert_eq!(warning["labels"]["alertname"], "AgentOffline");
    assert_eq!(
        warning["generatorURL"],
        "http://acc.example.com/orchestrator/alerts"
    );
    let summary = warning["annotations"]["summary"].as_str().unwrap();
    assert!(summary.starts_with("agent quiet silent for "), "{summary}");
    // Firing: ends four resend intervals (1 minute by default) ahead unless re-sent.
    let ahead = instant(&warning, "endsAt") - Utc::now();
    assert!(ahead > chrono::Duration::minutes(3), "endsAt {ahead} ahead");

    // The CRITICAL fires; the shipped inhibit rule mutes the WARN of the same rule and agent.
    let (critical, warning) = eventually(
        Duration::from_secs(15),
        "the CRITICAL active and the WARN inhibited by it",
        || async {
            let critical = am.alert("quiet", "critical").await?;
            let warning = am.alert("quiet", "warning").await?;
            (critical["status"]["state"] == "active" && warning["status"]["state"] == "suppressed")
                .then_some((critical, warning))
        },
    )
    .await;
    assert_eq!(
        warning["status"]["inhibitedBy"],
        json!([critical["fingerprint"]]),
        "{warning}"
    );
    assert_eq!(critical["status"]["inhibitedBy"], json!([]), "{critical}");

    // A heartbeat resolves both: Alertmanager drops them from its list long before the
    // endsAt of the firing alerts (minutes ahead), so it was told by the resolution's endsAt.
    heartbeat(&app, "quiet").await;
    let back = tokio::time::Instant::now();
    eventually(Duration::from_secs(10), "both alerts resolved", || async {
        let left = am.alerts().await;
        (!left.iter().any(|a| a["labels"]["agent_id"] == "quiet")).then_some(())
    })
    .await;
    assert!(back.elapsed() < Duration::from_secs(10));
    app.stop().await;
}

#[tokio::test]
async fn a_firing_alert_is_resent_so_alertmanager_keeps_it_past_its_first_ends_at() {
    let am = Alertmanager::start().await;
    let nats = NatsServer::start();
    let (_dir, rules) = rules_file(json!([offline_rule(0.5, None)]));
    let target = format!("--alertmanager-url={}", am.url);
    // endsAt is 4 × 500 ms ahead: without re-sending, Alertmanager resolves it after 2 s.
    let app = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--agent-stale-after=1s",
            "--agent-sweep-interval=100ms",
            "--alertmanager-resend-interval=500ms",
            &rules,
            &target,
        ]),
    )
    .await;
    app.register("quiet").await;
    let first = eventually(Duration::from_secs(15), "the WARN at Alertmanager", || {
        am.alert("quiet", "warning")
    })
    .await;
    let first_end = instant(&first, "endsAt");
    assert!(first_end - Utc::now() < chrono::Duration::seconds(3));
    // Poll until well past the first endsAt: the alert must stay active all along, with an
    // endsAt that moves on.
    let later = eventually(
        Duration::from_secs(10),
        "the alert alive past its first endsAt",
        || async {
            let alert = am.alert("quiet", "warning").await;
            let alert = alert.expect("the alert left Alertmanager while still firing");
            assert_eq!(alert["status"]["state"], "active", "{alert}");
            (Utc::now() > first_end + chrono::Duration::seconds(1)).then_some(alert)
        },
    )
    .await;
    assert!(instant(&later, "endsAt") > first_end, "{later}");
    assert_eq!(
        later["startsAt"], first["startsAt"],
        "one alert, kept alive"
    );
    app.stop().await;
}

#[tokio::test]
async fn alerts_owed_while_alertmanager_was_down_arrive_once_it_is_up() {
    let nats = NatsServer::start();
    let port = free_port();
    let (_dir, rules) = rules_file(json!([offline_rule(0.5, None)]));
    let target = format!("--alertmanager-url=http://127.0.0.1:{port}");
    // A resend interval far longer than the test: only the failed POST's retry can deliver it.
    let app = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--agent-stale-after=1s",
            "--agent-sweep-interval=100ms",
            "--alertmanager-resend-interval=1h",
            &rules,
            &target,
        ]),
    )
    .await;
    app.register("quiet").await;
    // The alert fires (the admin API shows it) while nothing listens on the port.
    eventually(Duration::from_secs(15), "the alert firing", || async {
        let (_, body) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
        body["active"]
            .as_array()?
            .iter()
            .any(|a| a["phase"] == "firing")
            .then_some(())
    })
    .await;
    let am = Alertmanager::start_on(port).await;
    let alert = eventually(Duration::from_secs(15), "the WARN at Alertmanager", || {
        am.alert("quiet", "warning")
    })
    .await;
    assert_eq!(alert["status"]["state"], "active", "{alert}");
    app.stop().await;
}
