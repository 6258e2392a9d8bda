//! Push delivery of tasks (DESIGN.md §6.1, Delivery), long-poll claims over the NATS door, and
//! the task metrics and alert rules — real HTTP receivers on loopback, a real nats-server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::routing::post;
use axum::{Json, Router};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::tasks::task;

use crate::helpers::*;

/// One request a push receiver got: its path, its bearer token and its body.
#[derive(Debug)]
struct Pushed {
    path: String,
    token: String,
    body: Value,
}

/// A push receiver on loopback: answers 500 to the first `refuse` task pushes, 200 after, and
/// hands every request to the test.
struct Receiver {
    url: String,
    requests: mpsc::UnboundedReceiver<Pushed>,
}

#[derive(Clone)]
struct ReceiverState {
    refuse: usize,
    pushes: Arc<AtomicUsize>,
    seen: mpsc::UnboundedSender<Pushed>,
}

fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned()
}

async fn take_task(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> AxumStatus {
    let n = state.pushes.fetch_add(1, Ordering::SeqCst);
    let _ = state.seen.send(Pushed {
        path: "/tasks".into(),
        token: bearer(&headers),
        body,
    });
    if n < state.refuse {
        AxumStatus::INTERNAL_SERVER_ERROR
    } else {
        AxumStatus::OK
    }
}

async fn take_cancel(
    State(state): State<ReceiverState>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> AxumStatus {
    let _ = state.seen.send(Pushed {
        path: format!("/tasks/{task_id}/cancel"),
        token: bearer(&headers),
        body,
    });
    AxumStatus::OK
}

impl Receiver {
    async fn start(refuse: usize) -> Self {
        let (seen, requests) = mpsc::unbounded_channel();
        let state = ReceiverState {
            refuse,
            pushes: Arc::default(),
            seen,
        };
        let app = Router::new()
            .route("/tasks", post(take_task))
            .route("/tasks/{task_id}/cancel", post(take_cancel))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, requests }
    }

    async fn next(&mut self) -> Pushed {
        tokio::time::timeout(Duration::from_secs(15), self.requests.recv())
            .await
            .expect("the receiver gets a request within 15 s")
            .expect("the receiver runs")
    }
}

const ALLOW_LOOPBACK: &str = "--push-allowed-urls=http://127.0.0.1:";

fn submitter() -> String {
    auto_com_center::auth::mint(
        &secret(),
        &auto_com_center::domain::AgentId::parse("client-1").unwrap(),
        "orchestrator.submit",
        Duration::from_secs(3600),
    )
}

async fn submit(app: &TestApp, body: Value) -> String {
    let (status, answer) = app
        .post("/orchestrator/tasks", Some(&submitter()), &body)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    answer["task_id"].as_str().unwrap().to_owned()
}

async fn wait_online(app: &TestApp, agent: &str) {
    eventually(Duration::from_secs(10), "the agent online", || async {
        let (_, agents) = app.get("/orchestrator/agents", Some(&admin_token())).await;
        agents["agents"]
            .as_array()?
            .iter()
            .any(|a| a["agent_id"] == agent && a["status"] == "online")
            .then_some(())
    })
    .await;
}

/// Registers `agent` over HTTP for push to `base_url`; returns the answer.
async fn register_push(app: &TestApp, agent: &str, base_url: &str) -> (StatusCode, Value) {
    let body = json!({
        "agent_id": agent,
        "name": "pushed worker",
        "base_url": base_url,
        "capabilities": ["echo"],
        "dispatch": "push",
    });
    app.post("/orchestrator/register", Some(&token(agent)), &body)
        .await
}

#[tokio::test]
async fn a_push_the_receiver_refuses_once_is_retried_and_the_task_succeeds_on_attempt_2() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &[
            ALLOW_LOOPBACK,
            "--push-timeout=2s",
            "--push-callback-url=http://bridge.example/",
        ],
    )
    .await;
    let mut receiver = Receiver::start(1).await;
    let (status, body) = register_push(&app, "pusher", &receiver.url).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_online(&app, "pusher").await;
    let task_id = submit(
        &app,
        json!({"capability": "echo", "input": {"n": 7},
               "backoff": {"initial": "100ms", "max": "200ms"}}),
    )
    .await;

    let first = receiver.next().await;
    assert_eq!(first.path, "/tasks");
    assert_eq!(first.body["attempt"], 1, "{:?}", first.body);
    let second = receiver.next().await;
    assert_eq!(second.body["task_id"], task_id.as_str());
    assert_eq!(second.body["attempt"], 2);
    assert_eq!(second.body["capability"], "echo");
    assert_eq!(second.body["input"], json!({"n": 7}));
    assert!(second.body["lease_expires_at"].is_string());
    let callback_url = format!("http://bridge.example/orchestrator/tasks/{task_id}/callback");
    assert_eq!(second.body["callback_url"], callback_url.as_str());

    // The token minted for the receiver speaks for that agent and may call back.
    let path = callback_url.trim_start_matches("http://bridge.example");
    let (status, body) = app
        .post(
            path,
            Some(&second.token),
            &json!({"status": "succeeded", "result": {"echo": 7}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let view = task(&app, &task_id).await;
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(view["attempt"], 2);
    assert_eq!(view["result"], json!({"echo": 7}));
    let attempts = view["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["outcome"], "failed", "{view}");
    assert!(
        attempts[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("500"),
        "{view}"
    );
    assert_eq!(
        (
            attempts[1]["agent_id"].clone(),
            attempts[1]["outcome"].clone()
        ),
        (json!("pusher"), json!("succeeded"))
    );
    // Submit → dispatched is measured once per task (the first attempt).
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("acc_task_dispatch_latency_seconds_count 1"),
        "{metrics}"
    );
    assert!(metrics.contains("acc_task_dispatch_latency_seconds_bucket{le=\"+Inf\"} 1"));
}

#[tokio::test]
async fn push_to_a_base_url_outside_push_allowed_urls_is_refused_at_registration() {
    let nats = NatsServer::start();
    // By default no URL is allowed.
    let closed = TestApp::spawn(&nats).await;
    let (status, body) = register_push(&closed, "pusher", "http://127.0.0.1:9").await;
    assert_error(status, &body, 400, "PUSH_URL_NOT_ALLOWED");
    closed.stop().await;

    let app = TestApp::spawn_with(&nats, &[ALLOW_LOOPBACK]).await;
    for outside in [
        "https://elsewhere.example/agent",
        "http://127.0.0.2:8080",
        "https://127.0.0.1:8080",
    ] {
        let (status, body) = register_push(&app, "pusher", outside).await;
        assert_error(status, &body, 400, "PUSH_URL_NOT_ALLOWED");
    }
    let (status, body) = register_push(&app, "pusher", "http://127.0.0.1:8080/agent").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The same URL for a pull agent is fine: nobody calls it.
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token("puller")),
            &json!({"agent_id": "puller", "name": "p", "base_url": "https://elsewhere.example",
                    "capabilities": ["echo"], "dispatch": "pull"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token("odd")),
            &json!({"agent_id": "odd", "name": "p", "base_url": "https://elsewhere.example",
                    "capabilities": ["echo"], "dispatch": "sideways"}),
        )
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
}

#[tokio::test]
async fn cancelling_a_task_a_push_receiver_holds_tells_the_receiver() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &[ALLOW_LOOPBACK]).await;
    let mut receiver = Receiver::start(0).await;
    let (status, body) = register_push(&app, "pusher", &format!("{}/", receiver.url)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_online(&app, "pusher").await;
    let task_id = submit(&app, json!({"capability": "echo", "timeout": "60s"})).await;
    let pushed = receiver.next().await;
    assert_eq!(pushed.body["task_id"], task_id.as_str());
    let (status, body) = app
        .post(
            &format!("/orchestrator/tasks/{task_id}/cancel"),
            Some(&submitter()),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let told = receiver.next().await;
    assert_eq!(told.path, format!("/tasks/{task_id}/cancel"));
    assert_eq!(told.body["status"], "cancelled");
    assert!(!told.token.is_empty());
    // The receiver's late success is refused: the task stays cancelled.
    let (status, body) = app
        .post(
            &format!("/orchestrator/tasks/{task_id}/callback"),
            Some(&pushed.token),
            &json!({"status": "succeeded"}),
        )
        .await;
    assert_error(status, &body, 409, "TASK_FINISHED");
    assert_eq!(task(&app, &task_id).await["status"], "cancelled");
}

#[tokio::test]
async fn an_agent_registered_for_push_on_the_nats_door_gets_its_tasks_and_cancels_in_its_namespace()
{
    use futures::StreamExt as _;
    let nats = NatsServer::start();
    // No URL allowed: push over NATS never calls base_url.
    let app = TestApp::spawn(&nats).await;
    let agent = NatsAgent::connect(&nats.url(), "nats-pusher").await;
    let mut pushed = agent
        .client
        .subscribe("acc.reply.nats-pusher.tasks.>")
        .await
        .unwrap();
    agent.client.flush().await.unwrap();
    let (status, body) = agent
        .call(
            "acc.in.register",
            &json!({"agent_id": "nats-pusher", "name": "n", "base_url": "https://n.example",
                    "capabilities": ["echo"], "dispatch": "push", "max_concurrent_tasks": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_online(&app, "nats-pusher").await;
    let stored = all_stored(&app.js, "ACC_AGENTS", "acc.agents.registered.nats-pusher").await;
    let registration = stored.last().expect("the registration is stored");
    assert_matches_schema("acc.agents.registered.nats-pusher", registration);
    assert_eq!(
        (
            registration["dispatch"].clone(),
            registration["push_over"].clone()
        ),
        (json!("push"), json!("nats")),
        "{registration}"
    );

    let first = submit(&app, json!({"capability": "echo", "input": "a"})).await;
    let second = submit(&app, json!({"capability": "echo", "input": "b"})).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(Duration::from_secs(10), pushed.next())
            .await
            .expect("a pushed task within 10 s")
            .unwrap();
        assert_eq!(message.subject.as_str(), "acc.reply.nats-pusher.tasks.push");
        let auth = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Authorization"));
        assert!(auth.is_some_and(|v| v.as_str().starts_with("Bearer ")));
        let body: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(body["attempt"], 1);
        got.push(body["task_id"].as_str().unwrap().to_owned());
    }
    got.sort();
    let mut want = vec![first.clone(), second.clone()];
    want.sort();
    assert_eq!(got, want);

    let (status, body) = agent
        .call(
            &format!("acc.in.task_result.{first}"),
            &json!({"status": "succeeded", "result": "done"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app
        .post(
            &format!("/orchestrator/tasks/{second}/cancel"),
            Some(&submitter()),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let message = tokio::time::timeout(Duration::from_secs(10), pushed.next())
        .await
        .expect("the cancel within 10 s")
        .unwrap();
    assert_eq!(
        message.subject.as_str(),
        "acc.reply.nats-pusher.tasks.cancel"
    );
    let body: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(body["task_id"], second.as_str());
    assert_eq!(task(&app, &first).await["status"], "succeeded");
}

#[tokio::test]
async fn a_claim_with_wait_over_the_nats_door_gets_a_task_submitted_300ms_later_while_the_door_serves_others()
 {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token("waiter")),
            &json!({"agent_id": "waiter", "name": "w", "base_url": "https://w.example",
                    "capabilities": ["later"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_online(&app, "waiter").await;
    let worker = NatsAgent::connect(&nats.url(), "waiter").await;
    let started = Instant::now();
    let claim = tokio::spawn(async move {
        let answer = worker
            .call_with(
                "acc.in.task_claim",
                Some(&token("waiter")),
                serde_json::to_vec(&json!({"wait": "10s"})).unwrap(),
                &[],
                Duration::from_secs(15),
            )
            .await;
        (answer, Instant::now())
    });
    // While the claim waits, the door goes on admitting other messages.
    let other = NatsAgent::connect(&nats.url(), "other").await;
    let (status, body) = other.call("acc.in.register", &registration("other")).await;
    assert_eq!(status, 200, "{body}");
    let other_answered = Instant::now();
    tokio::time::sleep(Duration::from_millis(300).saturating_sub(started.elapsed())).await;
    let task_id = submit(&app, json!({"capability": "later"})).await;
    let (answer, claimed_at) = claim.await.unwrap();
    let (status, body) = answer.expect("the door answers the claim");
    assert_eq!(status, 200, "{body}");
    let tasks = body["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{body}");
    assert_eq!(tasks[0]["task_id"], task_id.as_str());
    assert!(claimed_at - started >= Duration::from_millis(300));
    assert!(
        other_answered < claimed_at,
        "the door answered another agent while the claim waited"
    );
}

#[tokio::test]
async fn the_task_metrics_and_rules_fire_for_an_unserved_capability_and_a_growing_dlq() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.json");
    // The default task rules, but without their `for` so the test need not wait 5 minutes.
    let rules = json!({"rules": [
        {"name": "TaskCapabilityUnserved", "metric": "queued_without_online_agent",
         "warning": 0, "for": "0s", "summary": "{value} queued for {capability}"},
        {"name": "TaskDeadLetterGrowing", "metric": "dead_lettered_recently",
         "warning": 0, "for": "0s", "summary": "{value} dead-lettered"},
    ]});
    std::fs::write(&path, serde_json::to_vec(&rules).unwrap()).unwrap();
    let rules_flag = format!("--alert-rules={}", path.display());
    let app = TestApp::spawn_with(
        &nats,
        &[
            &rules_flag,
            "--alert-eval-interval=100ms",
            "--alert-lease-ttl=1s",
        ],
    )
    .await;
    let task_id = submit(
        &app,
        json!({"capability": "nobody-has-it", "max_attempts": 1}),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the unserved capability on /metrics",
        || async {
            app.metrics_text()
                .await
                .contains("acc_tasks_unserved{capability=\"nobody-has-it\"} 1")
                .then_some(())
        },
    )
    .await;
    let active = |rule: &'static str| {
        let app = &app;
        async move {
            let (_, body) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
            body["active"]
                .as_array()?
                .iter()
                .find(|a| a["labels"]["alertname"] == rule && a["phase"] == "firing")
                .cloned()
        }
    };
    let alert = eventually(Duration::from_secs(10), "the unserved alert firing", || {
        active("TaskCapabilityUnserved")
    })
    .await;
    assert_eq!(alert["labels"]["capability"], "nobody-has-it", "{alert}");

    // An agent with the capability comes online: the alert resolves; it takes the task and
    // fails it for good, and the DLQ grows.
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token("rescuer")),
            &json!({"agent_id": "rescuer", "name": "r", "base_url": "https://r.example",
                    "capabilities": ["nobody-has-it"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_online(&app, "rescuer").await;
    eventually(
        Duration::from_secs(10),
        "the unserved alert resolved",
        || async {
            active("TaskCapabilityUnserved")
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    let (status, body) = app
        .post(
            "/orchestrator/tasks/claim",
            Some(&token("rescuer")),
            &json!({"wait": "5s"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tasks"][0]["task_id"], task_id.as_str(), "{body}");
    let (status, body) = app
        .post(
            &format!("/orchestrator/tasks/{task_id}/callback"),
            Some(&token("rescuer")),
            &json!({"status": "failed", "error": {"message": "cannot", "retryable": false}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let alert = eventually(Duration::from_secs(10), "the DLQ alert firing", || {
        active("TaskDeadLetterGrowing")
    })
    .await;
    assert_eq!(alert["value"], 1.0, "{alert}");
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("acc_tasks_dead_lettered_total 1"),
        "{metrics}"
    );
}
