//! The operator console, end to end in a real headless Chromium (Debian's `chromium`, driven by
//! Playwright from `tests/console/`, installed by scripts/test) against the real bridge started
//! here: sign-in refusals, agents turning offline and back live, a task moving to succeeded, a
//! dead-lettered task replayed and a task cancelled from the page, an alert acknowledged, a live
//! event tail that resumes without loss or repeat, the latency chart, and every view at 390 px.
//! The browser script's steps are in `tests/console/e2e.mjs`; screenshots of each view are
//! written to `target/console-screenshots/` (not committed).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::helpers::*;

fn console_tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console")
}

/// Where the run's screenshots go: beside the build, never in the source tree's tracked files.
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("console-screenshots")
}

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

/// An admin token whose `exp` has passed.
fn expired_admin_token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({
            "agent_id": "operator",
            "aud": "auto-com-center",
            "exp": now - 600,
            "iat": now - 4200,
            "scope": "orchestrator.admin",
        }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn an_operator_runs_the_fleet_from_the_console_in_headless_chromium() {
    let dir = console_tests_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir() && Path::new(&chromium()).exists(),
        "the console test needs Chromium and playwright-core: run scripts/test, or \
         `scripts/lib.sh`'s ensure_console_deps (apt-get install chromium; npm ci in tests/console)"
    );
    let nats = NatsServer::start();
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = rules_dir.path().join("rules.json");
    std::fs::write(
        &rules,
        serde_json::to_vec(&json!({ "rules": [{
            "name": "AgentOffline",
            "metric": "agent_offline_seconds",
            "warning": 1,
            "for": "0s",
            "summary": "agent {agent_id} silent for {value} s",
        }]}))
        .unwrap(),
    )
    .unwrap();
    let rules_flag = format!("--alert-rules={}", rules.display());
    let app = TestApp::spawn_with(
        &nats,
        &[
            "--agent-stale-after=5s",
            "--agent-sweep-interval=200ms",
            "--metrics-snapshot-interval=500ms",
            "--alert-eval-interval=200ms",
            "--alert-lease-ttl=1s",
            &rules_flag,
        ],
    )
    .await;
    let agent = "console-agent";
    let shots = screenshot_dir();
    // Only this run's pictures: a failure.png from an earlier run would mislead.
    let _ = std::fs::remove_dir_all(&shots);

    let run = tokio::process::Command::new("node")
        .arg(dir.join("e2e.mjs"))
        .current_dir(&dir)
        .env("BASE_URL", format!("http://{}", app.addr))
        .env("ADMIN_TOKEN", admin_token())
        .env("AGENT_ID", agent)
        .env("AGENT_TOKEN", token(agent))
        .env("EXPIRED_TOKEN", expired_admin_token())
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", chromium())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser run ends within 3 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the console's browser steps failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all steps passed"), "{stdout}");
    for view in ["agents", "tasks", "alerts", "events", "latency"] {
        for name in [view.to_owned(), format!("{view}-390")] {
            let file = shots.join(format!("{name}.png"));
            let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            assert!(
                size > 1000,
                "a screenshot {} of the {view} view",
                file.display()
            );
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_content_security_policy_and_needs_no_token() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let response = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let policy = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(directive), "{path}: {policy}");
        }
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["referrer-policy"], "no-referrer");
    }
    // The data behind the page still needs the admin token.
    let (status, body) = app.get("/orchestrator/agents", None).await;
    assert_error(status, &body, 401, "MISSING_TOKEN");
    app.stop().await;
}
