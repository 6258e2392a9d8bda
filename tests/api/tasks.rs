//! Tasks (DESIGN.md §6.1): submit, claim, callbacks, leases, retry with backoff, the
//! dead-letter queue, cancel, and a dispatcher restart — over real HTTP, against a real
//! nats-server.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

fn submitter_token() -> String {
    scoped_token("client-1", "orchestrator.submit")
}

pub(crate) fn scoped_token(agent: &str, scope: &str) -> String {
    auto_com_center::auth::mint(
        &secret(),
        &auto_com_center::domain::AgentId::parse(agent).unwrap(),
        scope,
        Duration::from_secs(3600),
    )
}

/// Registers `agent` with `capabilities` and waits until the registry shows it online.
pub(crate) async fn register_worker(app: &TestApp, agent: &str, capabilities: &[&str], slots: u32) {
    let body = json!({
        "agent_id": agent,
        "name": format!("Worker {agent}"),
        "base_url": format!("https://{agent}.example.com"),
        "capabilities": capabilities,
        "max_concurrent_tasks": slots,
    });
    let (status, answer) = app
        .post("/orchestrator/register", Some(&token(agent)), &body)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
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

async fn submit(app: &TestApp, body: Value) -> (StatusCode, Value) {
    app.post("/orchestrator/tasks", Some(&submitter_token()), &body)
        .await
}

async fn submit_ok(app: &TestApp, body: Value) -> String {
    let (status, answer) = submit(app, body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    answer["task_id"].as_str().unwrap().to_owned()
}

pub(crate) async fn claim(app: &TestApp, agent: &str, body: Value) -> Vec<Value> {
    let (status, answer) = app
        .post("/orchestrator/tasks/claim", Some(&token(agent)), &body)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["success"], true, "{answer}");
    answer["tasks"].as_array().unwrap().clone()
}

async fn callback(app: &TestApp, agent: &str, task_id: &str, body: Value) -> (StatusCode, Value) {
    app.post(
        &format!("/orchestrator/tasks/{task_id}/callback"),
        Some(&token(agent)),
        &body,
    )
    .await
}

/// The task's record as an admin reads it.
pub(crate) async fn task(app: &TestApp, task_id: &str) -> Value {
    let (status, body) = app
        .get(
            &format!("/orchestrator/tasks/{task_id}"),
            Some(&admin_token()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn a_submitted_task_is_claimed_by_a_capable_agent_and_its_success_is_stored() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "worker-1", &["summarize"], 1).await;
    let (status, answer) = submit(
        &app,
        json!({"task_id": "t-1", "capability": "summarize", "input": {"text": "hi"}, "priority": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["status"], "queued");
    assert_eq!(answer["duplicate"], false);
    assert_eq!(answer["stream"], "ACC_TASK_SUBMISSIONS");
    let (_, submission) = stored(
        &app.js,
        "ACC_TASK_SUBMISSIONS",
        answer["seq"].as_u64().unwrap(),
    )
    .await;
    assert_eq!(submission["submitted_by"], "client-1");

    let tasks = claim(&app, "worker-1", json!({"wait": "5s"})).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["task_id"], "t-1");
    assert_eq!(tasks[0]["input"], json!({"text": "hi"}));
    assert_eq!(tasks[0]["attempt"], 1);
    assert_eq!(tasks[0]["priority"], 2);
    assert!(tasks[0]["lease_expires_at"].is_string());

    let (status, body) = callback(&app, "worker-1", "t-1", json!({"status": "running"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = callback(
        &app,
        "worker-1",
        "t-1",
        json!({"status": "succeeded", "result": {"summary": "hello"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["message"], "Result received");
    assert_eq!(body["duplicate"], false);
    let (status, again) = callback(
        &app,
        "worker-1",
        "t-1",
        json!({"status": "succeeded", "result": {"summary": "hello"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["duplicate"], true);

    let view = task(&app, "t-1").await;
    assert_eq!(view["status"], "succeeded");
    assert_eq!(view["result"], json!({"summary": "hello"}));
    assert_eq!(view["submitted_by"], "client-1");
    assert_eq!(view["attempts"][0]["agent_id"], "worker-1");
    assert_eq!(view["attempts"][0]["outcome"], "succeeded");
    let (status, seen) = app
        .get("/orchestrator/tasks/t-1", Some(&token("worker-1")))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the agent that held it may read it: {seen}"
    );
    let (status, body) = app
        .get("/orchestrator/tasks/t-1", Some(&token("stranger")))
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");

    let bucket = app.js.get_key_value("acc_tasks").await.unwrap();
    let record: Value = serde_json::from_slice(&bucket.get("t-1").await.unwrap().unwrap()).unwrap();
    assert_valid("task_record.json", &record);
}

#[tokio::test]
async fn a_repeated_submission_is_a_duplicate_and_another_body_with_the_same_id_is_409() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let body = json!({"task_id": "same", "capability": "c", "input": [1, 2]});
    let (status, first) = submit(&app, body.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, second) = submit(&app, body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{second}");
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["seq"], first["seq"]);
    let (status, conflict) = submit(
        &app,
        json!({"task_id": "same", "capability": "c", "input": [3]}),
    )
    .await;
    assert_error(status, &conflict, 409, "TASK_ID_CONFLICT");
    assert_eq!(count_stored(&app.js, "ACC_TASK_SUBMISSIONS").await, 1);
    let (status, generated) = submit(&app, json!({"capability": "c"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{generated}");
    assert_ne!(generated["task_id"], "same");
}

#[tokio::test]
async fn a_duplicate_past_the_duplicate_window_is_still_a_duplicate_and_a_conflict_still_409() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--duplicate-window=1s"]).await;
    let body = json!({"task_id": "late", "capability": "c"});
    let (_, first) = submit(&app, body.clone()).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, again) = submit(&app, body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(
        (again["duplicate"].clone(), again["seq"].clone()),
        (json!(true), first["seq"].clone())
    );
    let (status, conflict) = submit(&app, json!({"task_id": "late", "capability": "d"})).await;
    assert_error(status, &conflict, 409, "TASK_ID_CONFLICT");
}

#[tokio::test]
async fn submitting_needs_the_submit_scope_and_a_valid_body() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (status, body) = app
        .post(
            "/orchestrator/tasks",
            Some(&token("agent-1")),
            &json!({"capability": "c"}),
        )
        .await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
    let (status, body) = app
        .post(
            "/orchestrator/tasks",
            Some(&admin_token()),
            &json!({"capability": "c"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "an admin may submit: {body}");
    let (status, body) = submit(&app, json!({"capability": "c", "priority": 9})).await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
    assert!(
        body["error"]["details"]
            .as_str()
            .unwrap()
            .contains("priority")
    );
    let (status, body) = app
        .post(
            "/orchestrator/tasks/claim",
            Some(&scoped_token("agent-1", "orchestrator.submit")),
            &json!({}),
        )
        .await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
}

#[tokio::test]
async fn a_claim_for_a_capability_nobody_submitted_returns_an_empty_list_after_wait() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "idle", &["nothing-to-do"], 1).await;
    submit_ok(&app, json!({"capability": "something-else"})).await;
    let started = Instant::now();
    let tasks = claim(&app, "idle", json!({"wait": "700ms"})).await;
    let waited = started.elapsed();
    assert!(tasks.is_empty(), "{tasks:?}");
    assert!(
        waited >= Duration::from_millis(650),
        "answered after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
}

#[tokio::test]
async fn an_agent_that_claims_right_after_registering_gets_a_waiting_task() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let id = submit_ok(&app, json!({"capability": "fresh"})).await;
    let body = json!({
        "agent_id": "newcomer",
        "name": "Newcomer",
        "base_url": "https://newcomer.example.com",
        "capabilities": ["fresh"],
    });
    let (status, answer) = app
        .post("/orchestrator/register", Some(&token("newcomer")), &body)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let tasks = claim(&app, "newcomer", json!({"wait": "5s"})).await;
    assert_eq!(tasks[0]["task_id"], id.as_str());
    let (status, body) = app
        .post(
            "/orchestrator/tasks/claim",
            Some(&token("never-registered")),
            &json!({}),
        )
        .await;
    assert_error(status, &body, 404, "AGENT_NOT_FOUND");
}

#[tokio::test]
async fn an_agent_never_receives_a_task_for_a_capability_it_did_not_register() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "translator", &["translate"], 10).await;
    register_worker(&app, "painter", &["paint"], 10).await;
    let paint = submit_ok(&app, json!({"capability": "paint"})).await;
    let translate = submit_ok(&app, json!({"capability": "translate"})).await;
    // Asking for a capability it did not register changes nothing.
    let tasks = claim(
        &app,
        "translator",
        json!({"capabilities": ["paint", "translate"], "max": 10, "wait": "2s"}),
    )
    .await;
    let ids: Vec<&str> = tasks
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [translate.as_str()]);
    let tasks = claim(&app, "translator", json!({"max": 10, "wait": "300ms"})).await;
    assert!(tasks.is_empty(), "{tasks:?}");
    let tasks = claim(&app, "painter", json!({"max": 10, "wait": "2s"})).await;
    assert_eq!(tasks[0]["task_id"], paint.as_str());
}

#[tokio::test]
async fn an_agent_holds_at_most_max_concurrent_tasks_at_once() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "pair", &["c"], 2).await;
    for _ in 0..3 {
        submit_ok(&app, json!({"capability": "c"})).await;
    }
    let mut held = Vec::new();
    while held.len() < 2 {
        held.extend(claim(&app, "pair", json!({"max": 10, "wait": "2s"})).await);
    }
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(
        claim(&app, "pair", json!({"max": 10, "wait": "300ms"}))
            .await
            .is_empty()
    );
    let first = held[0]["task_id"].as_str().unwrap();
    let (status, body) = callback(&app, "pair", first, json!({"status": "succeeded"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        claim(&app, "pair", json!({"max": 10, "wait": "2s"}))
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn a_retryable_failure_is_retried_after_a_backoff_within_its_bounds() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "flaky", &["c"], 1).await;
    let id = submit_ok(
        &app,
        json!({"capability": "c", "backoff": {"initial": "400ms", "max": "400ms", "multiplier": 1}}),
    )
    .await;
    assert_eq!(claim(&app, "flaky", json!({"wait": "5s"})).await.len(), 1);
    let (status, body) = callback(
        &app,
        "flaky",
        &id,
        json!({"status": "failed", "error": {"message": "try again"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "retrying");
    let failed_at = Instant::now();
    let tasks = claim(&app, "flaky", json!({"wait": "5s"})).await;
    let waited = failed_at.elapsed();
    assert_eq!(tasks[0]["attempt"], 2, "{tasks:?}");
    assert!(
        waited < Duration::from_millis(400 + 600),
        "retried after {waited:?}"
    );
    let view = task(&app, &id).await;
    let ended =
        chrono::DateTime::parse_from_rfc3339(view["attempts"][0]["ended_at"].as_str().unwrap())
            .unwrap();
    let second =
        chrono::DateTime::parse_from_rfc3339(view["attempts"][1]["started_at"].as_str().unwrap())
            .unwrap();
    let backoff = (second - ended).num_milliseconds();
    assert!(
        (0..=400 + 200).contains(&backoff),
        "backoff of {backoff} ms"
    );
    assert_eq!(view["attempts"][0]["outcome"], "failed");
    assert_eq!(view["attempts"][0]["error"]["message"], "try again");
}

#[tokio::test]
async fn the_third_failure_of_a_three_attempt_task_dead_letters_it_and_replay_then_succeeds() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "unlucky", &["c"], 1).await;
    let id = submit_ok(
        &app,
        json!({"capability": "c", "max_attempts": 3, "backoff": {"initial": "50ms", "max": "100ms"}}),
    )
    .await;
    for attempt in 1..=3 {
        let tasks = claim(&app, "unlucky", json!({"wait": "5s"})).await;
        assert_eq!(tasks[0]["attempt"], attempt, "{tasks:?}");
        let (status, body) = callback(
            &app,
            "unlucky",
            &id,
            json!({"status": "failed", "error": {"message": format!("failure {attempt}")}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let view = task(&app, &id).await;
    assert_eq!(view["status"], "dead_lettered");
    assert_eq!(view["attempts"].as_array().unwrap().len(), 3);
    assert!(
        view["reason"].as_str().unwrap().contains("all 3 attempts"),
        "{view}"
    );

    let text = app.metrics_text().await;
    assert!(text.contains("acc_tasks_dead_lettered 1\n"), "{text}");
    assert!(
        text.contains("acc_task_attempts_total{outcome=\"failed\"} 3\n"),
        "{text}"
    );

    let (status, dlq) = app.get("/orchestrator/dlq", Some(&admin_token())).await;
    assert_eq!(status, StatusCode::OK, "{dlq}");
    assert_eq!(dlq["count"], 1);
    assert_eq!(dlq["tasks"][0]["task_id"], id.as_str());
    assert_eq!(dlq["tasks"][0]["attempts"].as_array().unwrap().len(), 3);
    let (status, body) = app.get("/orchestrator/dlq", Some(&token("unlucky"))).await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");

    let replay = format!("/orchestrator/dlq/{id}/replay");
    let (status, body) = app.post(&replay, Some(&admin_token()), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, again) = app.post(&replay, Some(&admin_token()), &json!({})).await;
    assert_error(status, &again, 409, "TASK_NOT_DEAD_LETTERED");
    let tasks = claim(&app, "unlucky", json!({"wait": "5s"})).await;
    assert_eq!(tasks[0]["attempt"], 4);
    let (status, body) = callback(
        &app,
        "unlucky",
        &id,
        json!({"status": "succeeded", "result": 7}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let view = task(&app, &id).await;
    assert_eq!(
        (view["status"].clone(), view["result"].clone()),
        (json!("succeeded"), json!(7))
    );
    let replays = all_stored(&app.js, "ACC_TASKS", "acc.tasks.replayed.>").await;
    assert_eq!(replays.len(), 1);
    assert_eq!(replays[0]["replayed_by"], "operator");
    let (_, dlq) = app.get("/orchestrator/dlq", Some(&admin_token())).await;
    assert_eq!(dlq["count"], 0);
    // Both replays (the refused second one too) are in the audit trail, recorded beforehand.
    let (_, audit) = app
        .get(
            "/orchestrator/audit?action=dlq.replay",
            Some(&admin_token()),
        )
        .await;
    assert_eq!(audit["count"], 2, "{audit}");
    assert_eq!(audit["records"][0]["target"], id.as_str());
    assert_eq!(audit["records"][0]["actor"], "operator");
}

#[tokio::test]
async fn a_retry_goes_to_an_agent_that_has_not_failed_the_task() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "first", &["c"], 1).await;
    register_worker(&app, "second", &["c"], 1).await;
    let id = submit_ok(
        &app,
        json!({"capability": "c", "backoff": {"initial": "50ms", "max": "50ms"}}),
    )
    .await;
    let tasks = claim(&app, "first", json!({"wait": "5s"})).await;
    assert_eq!(tasks[0]["attempt"], 1);
    let failed = json!({"status": "failed", "error": {"message": "no"}});
    let (status, body) = callback(&app, "first", &id, failed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(Duration::from_secs(5), "the task queued again", || async {
        (task(&app, &id).await["status"] == "queued").then_some(())
    })
    .await;
    assert!(
        claim(&app, "first", json!({"wait": "300ms"}))
            .await
            .is_empty(),
        "an online agent that has not failed it can take it"
    );
    let tasks = claim(&app, "second", json!({"wait": "5s"})).await;
    assert_eq!(tasks[0]["attempt"], 2);
}

#[tokio::test]
async fn a_failure_that_is_not_retryable_dead_letters_the_task_at_once() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "strict", &["c"], 1).await;
    let id = submit_ok(&app, json!({"capability": "c"})).await;
    claim(&app, "strict", json!({"wait": "5s"})).await;
    let (status, body) = callback(
        &app,
        "strict",
        &id,
        json!({"status": "failed", "error": {"message": "bad input", "retryable": false}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "dead_lettered");
}

#[tokio::test]
async fn a_silent_agent_loses_its_lease_to_another_and_its_late_success_is_a_stale_attempt() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "sleepy", &["c"], 1).await;
    register_worker(&app, "eager", &["c"], 1).await;
    let id = submit_ok(
        &app,
        json!({"capability": "c", "timeout": "1s", "backoff": {"initial": "50ms", "max": "50ms"}}),
    )
    .await;
    let tasks = claim(&app, "sleepy", json!({"wait": "5s"})).await;
    assert_eq!(tasks[0]["attempt"], 1);
    // The other agent waits; it gets attempt 2 once the first lease has expired.
    let tasks = claim(&app, "eager", json!({"wait": "10s"})).await;
    assert_eq!(tasks[0]["task_id"], id.as_str());
    assert_eq!(tasks[0]["attempt"], 2);
    let (status, body) = callback(
        &app,
        "sleepy",
        &id,
        json!({"status": "succeeded", "result": "mine"}),
    )
    .await;
    assert_error(status, &body, 409, "STALE_ATTEMPT");
    let (status, body) = callback(
        &app,
        "eager",
        &id,
        json!({"status": "succeeded", "result": "theirs"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = callback(
        &app,
        "sleepy",
        &id,
        json!({"status": "succeeded", "result": "mine"}),
    )
    .await;
    assert_error(status, &body, 409, "STALE_ATTEMPT");
    let view = task(&app, &id).await;
    assert_eq!(view["result"], "theirs");
    assert_eq!(view["attempts"][0]["outcome"], "expired");
    assert_eq!(view["attempts"][1]["agent_id"], "eager");
}

#[tokio::test]
async fn cancel_of_a_queued_and_of_a_running_task_succeeds_and_of_a_finished_one_is_409() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "busy", &["run"], 1).await;
    let queued = submit_ok(&app, json!({"capability": "nobody-does-this"})).await;
    let cancel = |id: &str| format!("/orchestrator/tasks/{id}/cancel");
    let (status, body) = app
        .post(&cancel(&queued), Some(&token("stranger")), &json!({}))
        .await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
    let (status, body) = app
        .post(
            &cancel(&queued),
            Some(&scoped_token("stranger", "orchestrator.submit")),
            &json!({}),
        )
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = app
        .post(&cancel(&queued), Some(&submitter_token()), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(task(&app, &queued).await["status"], "cancelled");

    let running = submit_ok(&app, json!({"capability": "run"})).await;
    claim(&app, "busy", json!({"wait": "5s"})).await;
    let (status, _) = callback(&app, "busy", &running, json!({"status": "running"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app
        .post(&cancel(&running), Some(&admin_token()), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let view = task(&app, &running).await;
    assert_eq!(view["attempts"][0]["outcome"], "cancelled");
    let (status, body) = callback(&app, "busy", &running, json!({"status": "succeeded"})).await;
    assert_error(status, &body, 409, "TASK_FINISHED");

    let (status, body) = app
        .post(&cancel(&running), Some(&admin_token()), &json!({}))
        .await;
    assert_error(status, &body, 409, "TASK_FINISHED");
    let (status, body) = app
        .post(&cancel("never-submitted"), Some(&admin_token()), &json!({}))
        .await;
    assert_error(status, &body, 404, "TASK_NOT_FOUND");
}

#[tokio::test]
async fn the_list_filters_by_status_and_a_submitter_sees_only_its_own() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let mine = submit_ok(&app, json!({"task_id": "a-mine", "capability": "x"})).await;
    let (status, _) = app
        .post(
            "/orchestrator/tasks",
            Some(&scoped_token("client-2", "orchestrator.submit")),
            &json!({"task_id": "b-theirs", "capability": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    app.post(
        &format!("/orchestrator/tasks/{mine}/cancel"),
        Some(&submitter_token()),
        &json!({}),
    )
    .await;
    let all = eventually(Duration::from_secs(5), "both tasks listed", || async {
        let (_, all) = app.get("/orchestrator/tasks", Some(&admin_token())).await;
        (all["count"] == 2).then_some(all)
    })
    .await;
    assert_eq!(all["tasks"][0]["task_id"], "a-mine");
    let (_, page) = app
        .get("/orchestrator/tasks?limit=1", Some(&admin_token()))
        .await;
    assert_eq!(page["next_cursor"], "a-mine");
    let (_, next) = app
        .get(
            "/orchestrator/tasks?limit=1&cursor=a-mine",
            Some(&admin_token()),
        )
        .await;
    assert_eq!(next["tasks"][0]["task_id"], "b-theirs");
    let (_, cancelled) = app
        .get("/orchestrator/tasks?status=cancelled", Some(&admin_token()))
        .await;
    assert_eq!(cancelled["count"], 1);
    let (_, own) = app
        .get("/orchestrator/tasks", Some(&submitter_token()))
        .await;
    assert_eq!(own["count"], 1);
    assert_eq!(own["tasks"][0]["task_id"], "a-mine");
    let (status, body) = app
        .get("/orchestrator/tasks?status=lost", Some(&admin_token()))
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
}

#[tokio::test]
async fn metrics_show_the_queue_depth_by_capability_and_priority() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    submit_ok(&app, json!({"capability": "wait-here", "priority": 1})).await;
    submit_ok(&app, json!({"capability": "wait-here", "priority": 1})).await;
    eventually(
        Duration::from_secs(5),
        "the queue depth on /metrics",
        || async {
            let text = app.metrics_text().await;
            text.contains("acc_tasks_queued{capability=\"wait-here\",priority=\"1\"} 2\n")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_dispatcher_restart_loses_no_queued_task() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "survivor", &["c"], 10).await;
    let mut submitted = Vec::new();
    for n in 0..5 {
        submitted.push(
            submit_ok(
                &app,
                json!({"task_id": format!("keep-{n}"), "capability": "c"}),
            )
            .await,
        );
    }
    app.stop().await;
    let app = TestApp::spawn(&nats).await;
    let mut claimed: Vec<String> = claim_until(&app, "survivor", submitted.len(), "2s")
        .await
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_owned())
        .collect();
    claimed.sort();
    assert_eq!(claimed, submitted);
}

/// Claims as `agent` until `want` tasks came or 20 s passed, retrying while no dispatcher acts
/// yet (503, as `Retry-After` says).
pub(crate) async fn claim_until(app: &TestApp, agent: &str, want: usize, wait: &str) -> Vec<Value> {
    let mut claimed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while claimed.len() < want && Instant::now() < deadline {
        let (status, answer) = app
            .post(
                "/orchestrator/tasks/claim",
                Some(&token(agent)),
                &json!({"max": 10, "wait": wait}),
            )
            .await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{answer}");
        claimed.extend(answer["tasks"].as_array().unwrap().iter().cloned());
    }
    claimed
}

#[tokio::test]
async fn a_claim_with_no_dispatcher_acting_is_503_with_retry_after() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--roles=ingress,registry"]).await;
    register_worker(&app, "alone", &["c"], 1).await;
    let response = app
        .http
        .post(app.url("/orchestrator/tasks/claim"))
        .bearer_auth(token("alone"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = read(response).await;
    assert_error(status, &body, 503, "BUS_UNAVAILABLE");
    let (status, body) = submit(&app, json!({"capability": "c"})).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "submissions need no dispatcher: {body}"
    );
}

#[tokio::test]
async fn a_callback_for_a_task_the_orchestrator_never_queued_keeps_the_gate_one_behaviour() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-1").await;
    let (status, body) = callback(
        &app,
        "agent-1",
        "external-7",
        json!({"status": "completed"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stream"], "ACC_TASKS");
    let (status, body) = app
        .get("/orchestrator/tasks/external-7", Some(&token("agent-1")))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "completed");
}

#[tokio::test]
async fn over_the_nats_door_a_task_is_submitted_claimed_and_reported_like_over_http() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "nats-worker", &["door-work"], 1).await;
    let client = NatsAgent::connect(&nats.url(), "client-1").await;
    let (status, answer) = client
        .call_with(
            "acc.in.task_submit",
            Some(&submitter_token()),
            serde_json::to_vec(&json!({"task_id": "by-nats", "capability": "door-work"})).unwrap(),
            &[],
            Duration::from_secs(10),
        )
        .await
        .expect("the door answers the submission");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["task_id"], "by-nats");
    assert_eq!(answer["stream"], "ACC_TASK_SUBMISSIONS");

    let worker = NatsAgent::connect(&nats.url(), "nats-worker").await;
    let tasks = eventually(Duration::from_secs(10), "the task claimed", || async {
        let (status, answer) = worker
            .call("acc.in.task_claim", &json!({"wait": "5s"}))
            .await;
        assert_eq!(status, 200, "{answer}");
        let tasks = answer["tasks"].as_array().unwrap().clone();
        (!tasks.is_empty()).then_some(tasks)
    })
    .await;
    assert_eq!(tasks[0]["task_id"], "by-nats");
    let (status, answer) = worker
        .call(
            "acc.in.task_result.by-nats",
            &json!({"status": "succeeded", "result": "ok"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = NatsAgent::connect(&nats.url(), "intruder")
        .await
        .call(
            "acc.in.task_result.by-nats",
            &json!({"status": "succeeded"}),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (409, json!("STALE_ATTEMPT"))
    );
    let view = task(&app, "by-nats").await;
    assert_eq!(
        (view["status"].clone(), view["result"].clone()),
        (json!("succeeded"), json!("ok"))
    );
    // Nothing of it went to the Gate-1 results.
    assert!(
        all_stored(&app.js, "ACC_TASKS", "acc.tasks.result.>")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_degraded_agent_gets_a_task_only_when_no_online_agent_has_the_capability() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "healthy", &["shared"], 1).await;
    register_worker(&app, "limping", &["shared", "rare"], 1).await;
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&token("limping")),
            &json!({"agent_id": "limping", "status": "degraded"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(Duration::from_secs(10), "the agent degraded", || async {
        let (_, agents) = app.get("/orchestrator/agents", Some(&admin_token())).await;
        agents["agents"]
            .as_array()?
            .iter()
            .any(|a| a["agent_id"] == "limping" && a["status"] == "degraded")
            .then_some(())
    })
    .await;
    let shared = submit_ok(&app, json!({"capability": "shared"})).await;
    assert!(
        claim(&app, "limping", json!({"wait": "300ms"}))
            .await
            .is_empty()
    );
    let rare = submit_ok(&app, json!({"capability": "rare"})).await;
    let tasks = claim(&app, "limping", json!({"wait": "5s"})).await;
    assert_eq!(tasks[0]["task_id"], rare.as_str());
    let tasks = claim(&app, "healthy", json!({"wait": "5s"})).await;
    assert_eq!(tasks[0]["task_id"], shared.as_str());
}

#[tokio::test]
async fn with_two_replicas_one_dispatches_and_the_other_takes_over_without_losing_or_doubling_a_task()
 {
    let nats = NatsServer::start();
    let first = TestApp::spawn(&nats).await;
    let second = TestApp::spawn(&nats).await;
    register_worker(&first, "steady", &["c"], 10).await;
    eventually(
        Duration::from_secs(10),
        "the agent in both views",
        || async {
            let (_, agents) = second
                .get("/orchestrator/agents", Some(&admin_token()))
                .await;
            agents["agents"]
                .as_array()?
                .iter()
                .any(|a| a["agent_id"] == "steady")
                .then_some(())
        },
    )
    .await;
    let mut submitted = Vec::new();
    for n in 0..4 {
        submitted.push(
            submit_ok(
                &second,
                json!({"task_id": format!("r-{n}"), "capability": "c"}),
            )
            .await,
        );
    }
    let mut claimed: Vec<String> = claim(&first, "steady", json!({"wait": "5s"}))
        .await
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(claimed.len(), 1);
    first.stop().await;
    for task in claim_until(&second, "steady", submitted.len() - claimed.len(), "1s").await {
        assert_eq!(task["attempt"], 1, "no task is leased twice: {task}");
        claimed.push(task["task_id"].as_str().unwrap().to_owned());
    }
    claimed.sort();
    assert_eq!(claimed, submitted);
    assert!(
        claim(&second, "steady", json!({"max": 10, "wait": "300ms"}))
            .await
            .is_empty()
    );
}

/// The dispatcher writes many records at once; a task is still leased once and its success
/// stored once, however many agents claim at the same moment.
#[tokio::test]
async fn many_concurrent_claims_never_lease_one_task_twice() {
    const TASKS: usize = 120;
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let agents: Vec<String> = (0..8).map(|i| format!("crowd-{i}")).collect();
    for agent in &agents {
        register_worker(&app, agent, &["crowd"], 4).await;
    }
    let submitted: Vec<String> = futures::future::join_all(
        (0..TASKS).map(|_| submit_ok(&app, json!({"capability": "crowd"}))),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let work = |agent: String| {
        let app = &app;
        async move {
            let mut leased = Vec::new();
            while Instant::now() < deadline {
                let tasks = claim(app, &agent, json!({"max": 4, "wait": "300ms"})).await;
                if tasks.is_empty() && !leased.is_empty() {
                    break;
                }
                let done = tasks.iter().map(|t| {
                    let id = t["task_id"].as_str().unwrap().to_owned();
                    let agent = agent.clone();
                    async move {
                        let body = json!({"status": "succeeded", "result": agent});
                        let (status, answer) = callback(app, &agent, &id, body).await;
                        assert_eq!(status, StatusCode::OK, "{answer}");
                        assert_eq!(answer["duplicate"], false, "{answer}");
                    }
                });
                futures::future::join_all(done).await;
                leased.extend(tasks.into_iter().map(|t| {
                    assert_eq!(t["attempt"], 1, "{t}");
                    (t["task_id"].as_str().unwrap().to_owned(), agent.clone())
                }));
            }
            leased
        }
    };
    let leased: Vec<(String, String)> = futures::future::join_all(agents.iter().cloned().map(work))
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut ids: Vec<&str> = leased.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    let claimed = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), claimed, "a task was leased twice");
    assert_eq!(claimed, TASKS, "every task is leased once");
    for (id, agent) in &leased {
        let view = task(&app, id).await;
        assert_eq!(view["status"], "succeeded", "{view}");
        assert_eq!(view["attempts"].as_array().unwrap().len(), 1, "{view}");
        assert_eq!(view["result"], agent.as_str(), "{view}");
    }
    assert!(submitted.iter().all(|id| ids.contains(&id.as_str())));
}

/// Callbacks sent around the moment their lease runs out: each task ends in exactly one
/// terminal state, the one its agent was told — a `succeeded` answered 200 is the stored result,
/// one answered 409 left the task expired.
#[tokio::test]
async fn callbacks_racing_a_lease_expiry_are_either_stored_or_stale_never_both() {
    const TASKS: usize = 20;
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "racer", &["race"], TASKS as u32).await;
    for _ in 0..TASKS {
        submit_ok(
            &app,
            json!({"capability": "race", "timeout": "1s", "max_attempts": 1}),
        )
        .await;
    }
    let mut held = Vec::new();
    while held.len() < TASKS {
        held.extend(claim(&app, "racer", json!({"max": TASKS, "wait": "2s"})).await);
    }
    // One callback every 20 ms from 200 ms before the lease's end to 200 ms after it.
    let race = held.iter().enumerate().map(|(i, t)| {
        let app = &app;
        async move {
            let id = t["task_id"].as_str().unwrap().to_owned();
            let expires: chrono::DateTime<chrono::Utc> =
                t["lease_expires_at"].as_str().unwrap().parse().unwrap();
            let at = expires - chrono::Duration::milliseconds(200)
                + chrono::Duration::milliseconds(20 * i as i64);
            if let Ok(wait) = (at - chrono::Utc::now()).to_std() {
                tokio::time::sleep(wait).await;
            }
            let body = json!({"status": "succeeded", "result": i});
            let (status, answer) = callback(app, "racer", &id, body).await;
            (id, i, status, answer)
        }
    });
    let mut stored = 0;
    for (id, i, status, answer) in futures::future::join_all(race).await {
        let view = eventually(Duration::from_secs(10), "a terminal state", || async {
            let view = task(&app, &id).await;
            (view["status"] != "dispatched" && view["status"] != "running").then_some(view)
        })
        .await;
        let attempts = view["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "{view}");
        if status == StatusCode::OK {
            stored += 1;
            assert_eq!(answer["status"], "succeeded", "{answer}");
            assert_eq!(view["status"], "succeeded", "{view}");
            assert_eq!(view["result"], i, "{view}");
            assert_eq!(attempts[0]["outcome"], "succeeded", "{view}");
        } else {
            assert_error(status, &answer, 409, "STALE_ATTEMPT");
            assert_eq!(view["status"], "dead_lettered", "{view}");
            assert_eq!(attempts[0]["outcome"], "expired", "{view}");
            assert!(view.get("result").is_none_or(Value::is_null), "{view}");
        }
    }
    // The early ones landed before their lease ran out.
    assert!(stored >= 1, "no callback was in time");
}

/// The statuses `watch` sees `task_id`'s record stored with, up to and including `last`.
async fn statuses_stored(
    watch: &mut async_nats::jetstream::kv::Watch,
    task_id: &str,
    last: &str,
) -> Vec<String> {
    use futures::StreamExt as _;
    let mut statuses = Vec::new();
    while statuses.last().is_none_or(|s| s != last) {
        let entry = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("the record is written within 5 s")
            .unwrap()
            .unwrap();
        if entry.key == task_id {
            let record: Value = serde_json::from_slice(&entry.value).unwrap();
            statuses.push(record["status"].as_str().unwrap().to_owned());
        }
    }
    statuses
}

#[tokio::test]
async fn a_task_submitted_while_a_claim_waits_is_stored_dispatched_in_one_write() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "waiter", &["at-once"], 1).await;
    let bucket = app.js.get_key_value("acc_tasks").await.unwrap();
    let mut watch = bucket.watch_all().await.unwrap();
    // Nobody waits: the record is created queued, then leased by the claim.
    submit_ok(&app, json!({"task_id": "t-early", "capability": "at-once"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks = claim(&app, "waiter", json!({"wait": "5s"})).await;
    assert_eq!(tasks[0]["task_id"], "t-early");
    let (status, body) = callback(&app, "waiter", "t-early", json!({"status": "succeeded"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        statuses_stored(&mut watch, "t-early", "succeeded").await,
        ["queued", "dispatched", "succeeded"]
    );

    // A claim waits: the submission's record is created with the claim's attempt.
    let (tasks, _) = tokio::join!(claim(&app, "waiter", json!({"wait": "5s"})), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        submit_ok(&app, json!({"task_id": "t-late", "capability": "at-once"})).await
    });
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["task_id"], "t-late");
    assert_eq!(tasks[0]["attempt"], 1);
    let (status, body) = callback(&app, "waiter", "t-late", json!({"status": "succeeded"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        statuses_stored(&mut watch, "t-late", "succeeded").await,
        ["dispatched", "succeeded"]
    );
    let view = task(&app, "t-late").await;
    assert_eq!(view["attempts"][0]["agent_id"], "waiter");
    assert_eq!(view["attempts"][0]["outcome"], "succeeded");
}

/// Submits `ids` one at a time and waits until each record is stored `queued` (and the
/// dispatcher has taken it in), so that one claim can then lease them all in one turn.
async fn queue_tasks(app: &TestApp, ids: &[String], capability: &str) {
    for id in ids {
        submit_ok(app, json!({"task_id": id, "capability": capability})).await;
    }
    for id in ids {
        eventually(Duration::from_secs(10), "the task queued", || async {
            (task(app, id).await["status"] == "queued").then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// The value of one series of `/metrics` (`name{labels}`), if it is there.
async fn metric(app: &TestApp, series: &str) -> Option<f64> {
    let text = app.metrics_text().await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn a_claim_of_many_tasks_is_stored_as_one_atomic_batch() {
    const TASKS: usize = 40;
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "bulk", &["bulk"], TASKS as u32).await;
    let ids: Vec<String> = (0..TASKS).map(|i| format!("bulk-{i}")).collect();
    queue_tasks(&app, &ids, "bulk").await;

    let tasks = claim(&app, "bulk", json!({"max": TASKS})).await;
    assert_eq!(tasks.len(), TASKS, "{tasks:?}");

    // Every leased record was stored by one commit: one batch id, consecutive revisions.
    let bucket = app.js.get_key_value("acc_tasks").await.unwrap();
    let stream = app.js.get_stream("KV_acc_tasks").await.unwrap();
    let mut revisions = Vec::new();
    let mut batches = std::collections::BTreeSet::new();
    for t in &tasks {
        let id = t["task_id"].as_str().unwrap();
        let entry = bucket.entry(id).await.unwrap().unwrap();
        let record: Value = serde_json::from_slice(&entry.value).unwrap();
        assert_eq!(record["status"], "dispatched", "{record}");
        let message = stream.get_raw_message(entry.revision).await.unwrap();
        let batch = message.headers.get("Nats-Batch-Id").map(|v| v.to_string());
        batches.insert(batch);
        revisions.push(entry.revision);
    }
    assert_eq!(batches.len(), 1, "the claim's records came in {batches:?}");
    assert!(
        batches.first().unwrap().is_some(),
        "the claim's records were not written as an atomic batch"
    );
    revisions.sort_unstable();
    assert_eq!(
        revisions.last().unwrap() - revisions[0] + 1,
        TASKS as u64,
        "{revisions:?}"
    );
    let committed = r#"acc_task_record_batches_total{outcome="committed"}"#;
    assert_eq!(metric(&app, committed).await, Some(1.0));
    assert_eq!(
        metric(&app, "acc_task_batched_records_total").await,
        Some(TASKS as f64)
    );
}

#[tokio::test]
async fn a_batch_refused_for_one_stale_record_is_written_one_by_one_and_each_claim_told_what_was_stored()
 {
    const TASKS: usize = 20;
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "picky", &["stale"], TASKS as u32).await;
    let ids: Vec<String> = (0..TASKS).map(|i| format!("stale-{i}")).collect();
    queue_tasks(&app, &ids, "stale").await;
    // Another writer rewrites one record behind the dispatcher's back: the revision the
    // dispatcher holds for it is stale, so a batch holding it is refused as a whole.
    let bucket = app.js.get_key_value("acc_tasks").await.unwrap();
    let entry = bucket.entry("stale-7").await.unwrap().unwrap();
    bucket
        .update("stale-7", entry.value.clone(), entry.revision)
        .await
        .unwrap();

    let tasks = claim(&app, "picky", json!({"max": TASKS})).await;
    let leased: Vec<&str> = tasks
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(leased.len(), TASKS - 1, "{leased:?}");
    assert!(!leased.contains(&"stale-7"), "{leased:?}");
    // What the agent was told is what is stored: each of those is dispatched to it.
    for id in &leased {
        let view = task(&app, id).await;
        assert_eq!(view["status"], "dispatched", "{view}");
        assert_eq!(view["attempts"][0]["agent_id"], "picky", "{view}");
    }
    let refused = r#"acc_task_record_batches_total{outcome="refused"}"#;
    assert_eq!(metric(&app, refused).await, Some(1.0));
    // The record that lost was read afresh and is leased by the next claim.
    assert_eq!(task(&app, "stale-7").await["status"], "queued");
    let next = claim(&app, "picky", json!({"max": TASKS, "wait": "2s"})).await;
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0]["task_id"], "stale-7");
}
