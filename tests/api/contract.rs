//! The HTTP contract: every route's success body and every error code, with the JSON envelope.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn register_returns_the_plans_body_and_where_it_was_stored() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let body = app.register("agent-1").await;
    assert_eq!(body["success"], true);
    assert_eq!(body["agent_id"], "agent-1");
    assert_eq!(body["message"], "Agent registered successfully");
    assert_eq!(body["stream"], "ACC_AGENTS");
    assert_eq!(body["duplicate"], false);
    let seq = body["seq"].as_u64().unwrap();
    let (subject, stored) = stored(&app.js, "ACC_AGENTS", seq).await;
    assert_eq!(subject, "acc.agents.registered.agent-1");
    assert_eq!(stored["name"], "Agent agent-1");
    assert_eq!(stored["capabilities"], json!(["test.capability", "other"]));
    assert_eq!(stored["origin"], "agent");
}

#[tokio::test]
async fn heartbeat_returns_the_plans_body() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-1").await;
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&token("agent-1")),
            &json!({"agent_id": "agent-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["message"], "Heartbeat received");
    let timestamp = body["timestamp"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
        "{timestamp}"
    );
    let (subject, stored) = stored(&app.js, "ACC_AGENTS", body["seq"].as_u64().unwrap()).await;
    assert_eq!(subject, "acc.agents.heartbeat.agent-1");
    assert_eq!(stored["status"], "online");
}

#[tokio::test]
async fn task_callback_is_stored_and_readable_by_its_reporter_and_admins_only() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let callback = json!({"status": "succeeded", "result": {"answer": 42}, "trace_id": "trace-7"});
    let (status, body) = app
        .post(
            "/orchestrator/tasks/task-9/callback",
            Some(&token("worker-a")),
            &callback,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["task_id"], "task-9");
    assert_eq!(body["message"], "Result received");
    assert_eq!(body["stream"], "ACC_TASKS");
    let (subject, stored) = stored(&app.js, "ACC_TASKS", body["seq"].as_u64().unwrap()).await;
    assert_eq!(subject, "acc.tasks.result.task-9");
    assert_eq!(stored["reported_by"], "worker-a");
    assert_eq!(stored["result"]["answer"], 42);

    for reader in [token("worker-a"), admin_token()] {
        let (status, read) = app.get("/orchestrator/tasks/task-9", Some(&reader)).await;
        assert_eq!(status, StatusCode::OK, "{read}");
        assert_eq!(read["status"], "succeeded");
        assert_eq!(read["result"]["answer"], 42);
        assert_eq!(read["reported_trace_id"], "trace-7");
    }
    let (status, read) = app
        .get("/orchestrator/tasks/task-9", Some(&token("worker-b")))
        .await;
    assert_error(status, &read, 403, "FORBIDDEN");
    let (status, read) = app
        .get("/orchestrator/tasks/unknown-task", Some(&token("worker-a")))
        .await;
    assert_error(status, &read, 404, "TASK_NOT_FOUND");

    // A later report supersedes the earlier one.
    let (status, _) = app
        .post(
            "/orchestrator/tasks/task-9/callback",
            Some(&token("worker-a")),
            &json!({"status": "failed", "error": "disk full"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, read) = app
        .get("/orchestrator/tasks/task-9", Some(&token("worker-a")))
        .await;
    assert_eq!(read["status"], "failed");
    assert_eq!(read["error"], "disk full");
}

#[tokio::test]
async fn event_is_stored_with_the_emitter_stamped() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (status, body) = app
        .post(
            "/orchestrator/events",
            Some(&token("agent-1")),
            &event("agent-1", "evt-1"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["event_id"], "evt-1");
    assert_eq!(body["message"], "Event received");
    assert_eq!(body["duplicate"], false);
    let (subject, stored) = stored(&app.js, "ACC_EVENTS", body["seq"].as_u64().unwrap()).await;
    assert_eq!(subject, "acc.events.agent-1");
    assert_eq!(stored["type"], "test.event");
    assert_eq!(stored["emitted_by"], "agent-1");
    assert_eq!(stored["data"], json!({"n": 1}));
}

#[tokio::test]
async fn agents_list_needs_the_admin_scope_and_shows_the_registry() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-1").await;
    app.register("agent-2").await;

    let (status, body) = app.get("/orchestrator/agents", None).await;
    assert_error(status, &body, 401, "MISSING_TOKEN");
    let (status, body) = app
        .get("/orchestrator/agents", Some(&token("agent-1")))
        .await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");

    let body = eventually(
        std::time::Duration::from_secs(5),
        "both agents listed",
        || async {
            let (status, body) = app.get("/orchestrator/agents", Some(&admin_token())).await;
            assert_eq!(status, StatusCode::OK);
            (body["count"] == 2).then_some(body)
        },
    )
    .await;
    assert_eq!(body["success"], true);
    let first = &body["agents"][0];
    assert_eq!(first["agent_id"], "agent-1");
    assert_eq!(first["name"], "Agent agent-1");
    assert_eq!(first["status"], "online");
    assert_eq!(first["capabilities_count"], 2);
    assert!(first["last_seen"].is_string());
}

#[tokio::test]
async fn health_reports_the_plans_fields_with_real_figures() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-1").await;
    let (status, _) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&token("agent-1")),
            &json!({"agent_id": "agent-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let body = eventually(
        std::time::Duration::from_secs(5),
        "agent counted",
        || async {
            let (status, body) = app.get("/health", None).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            (body["agents"]["total"] == 1).then_some(body)
        },
    )
    .await;
    assert_eq!(body["status"], "healthy");
    assert!(body["timestamp"].is_string());
    assert!(body["uptime"].as_f64().unwrap() > 0.0);
    assert_eq!(body["agents"]["online"], 1);
    assert_eq!(body["agents"]["offline"], 0);
    let orchestrator = &body["orchestrator"];
    assert!(
        orchestrator["p95_latency_register"].as_f64().unwrap() > 0.0,
        "{body}"
    );
    assert!(
        orchestrator["p95_latency_heartbeat"].as_f64().unwrap() > 0.0,
        "{body}"
    );
    assert_eq!(orchestrator["error_rate_register"], 0.0);
    assert_eq!(orchestrator["error_rate_heartbeat"], 0.0);

    let (status, body) = app.get("/health/live", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.get("/health/ready", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["streams_present"], true);
}

#[tokio::test]
async fn heartbeat_errors_have_the_plans_codes() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let t = token("agent-1");
    let (status, body) = app
        .post("/orchestrator/heartbeat", Some(&t), &json!({}))
        .await;
    assert_error(status, &body, 400, "MISSING_AGENT_ID");
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&t),
            &json!({"agent_id": ""}),
        )
        .await;
    assert_error(status, &body, 400, "MISSING_AGENT_ID");
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&t),
            &json!({"agent_id": "agent-1"}),
        )
        .await;
    assert_error(status, &body, 404, "AGENT_NOT_FOUND");
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&t),
            &json!({"agent_id": "agent-1", "status": "sleepy"}),
        )
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
}

#[tokio::test]
async fn invalid_payloads_are_refused_with_400_and_details() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let t = token("agent-1");
    let registrations = [
        json!({"name": "x", "base_url": "https://x.example", "capabilities": []}),
        json!({"agent_id": "agent-1", "base_url": "https://x.example", "capabilities": []}),
        json!({"agent_id": "agent-1", "name": "x", "base_url": "not a url", "capabilities": []}),
        json!({"agent_id": "agent-1", "name": "x", "base_url": "https://x.example"}),
        json!({"agent_id": "agent-1", "name": "x", "base_url": "https://x.example", "capabilities": [7]}),
        json!({"agent_id": 5, "name": "x", "base_url": "https://x.example", "capabilities": []}),
    ];
    for body in registrations {
        let (status, answer) = app.post("/orchestrator/register", Some(&t), &body).await;
        assert_error(status, &answer, 400, "INVALID_PAYLOAD");
        assert!(answer["error"]["details"].is_string(), "{answer}");
    }
    let events = [
        json!({"type": "t", "source": "agent-1", "data": {}, "time": "2026-11-28T10:00:00Z"}),
        json!({"event_id": "e", "source": "agent-1", "data": {}, "time": "2026-11-28T10:00:00Z"}),
        json!({"event_id": "e", "type": "t", "source": "agent-1", "time": "2026-11-28T10:00:00Z"}),
        json!({"event_id": "e", "type": "t", "source": "agent-1", "data": {}, "time": "yesterday"}),
        json!({"event_id": "e e", "type": "t", "source": "agent-1", "data": {}, "time": "2026-11-28T10:00:00Z"}),
    ];
    for body in events {
        let (status, answer) = app.post("/orchestrator/events", Some(&t), &body).await;
        assert_error(status, &answer, 400, "INVALID_PAYLOAD");
    }
    let callbacks = [
        json!({}),
        json!({"status": 3}),
        json!({"status": "done", "task_id": "another-task"}),
    ];
    for body in callbacks {
        let (status, answer) = app
            .post("/orchestrator/tasks/task-1/callback", Some(&t), &body)
            .await;
        assert_error(status, &answer, 400, "INVALID_PAYLOAD");
    }
}

#[tokio::test]
async fn ids_unsafe_as_subject_tokens_are_refused() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let t = token("agent-1");
    for bad in ["agent.1", "agent-*", "agent->", "a b"] {
        let mut body = registration("agent-1");
        body["agent_id"] = json!(bad);
        let (status, answer) = app.post("/orchestrator/register", Some(&t), &body).await;
        assert_error(status, &answer, 400, "INVALID_PAYLOAD");
    }
    for bad in ["task.1", "task%2A", "task%3E", "task%20x"] {
        let (status, answer) = app
            .post(
                &format!("/orchestrator/tasks/{bad}/callback"),
                Some(&t),
                &json!({"status": "done"}),
            )
            .await;
        assert_error(status, &answer, 400, "INVALID_PAYLOAD");
    }
    let mut body = event("agent-1", "e1");
    body["source"] = json!("agent.*");
    let (status, answer) = app.post("/orchestrator/events", Some(&t), &body).await;
    assert_error(status, &answer, 400, "INVALID_PAYLOAD");
}

#[tokio::test]
async fn a_token_cannot_act_for_another_agent() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-b").await;
    let a = token("agent-a");
    let (status, body) = app
        .post("/orchestrator/register", Some(&a), &registration("agent-b"))
        .await;
    assert_error(status, &body, 403, "IDENTITY_MISMATCH");
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&a),
            &json!({"agent_id": "agent-b"}),
        )
        .await;
    assert_error(status, &body, 403, "IDENTITY_MISMATCH");
    let (status, body) = app
        .post("/orchestrator/events", Some(&a), &event("agent-b", "e1"))
        .await;
    assert_error(status, &body, 403, "IDENTITY_MISMATCH");
    let (status, body) = app
        .post(
            "/orchestrator/tasks/t1/callback",
            Some(&a),
            &json!({"status": "done", "agent_id": "agent-b"}),
        )
        .await;
    assert_error(status, &body, 403, "IDENTITY_MISMATCH");
}

#[tokio::test]
async fn server_owned_fields_in_a_body_are_ignored() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let mut body = registration("agent-1");
    body["status"] = json!("offline");
    body["last_seen"] = json!("1999-01-01T00:00:00Z");
    body["registered_at"] = json!("1999-01-01T00:00:00Z");
    let (status, answer) = app
        .post("/orchestrator/register", Some(&token("agent-1")), &body)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, message) = stored(&app.js, "ACC_AGENTS", answer["seq"].as_u64().unwrap()).await;
    assert!(
        message.get("status").is_none() && message.get("last_seen").is_none(),
        "{message}"
    );
    let agents = eventually(
        std::time::Duration::from_secs(5),
        "agent listed",
        || async {
            let (_, body) = app.get("/orchestrator/agents", Some(&admin_token())).await;
            (body["count"] == 1).then_some(body)
        },
    )
    .await;
    let agent = &agents["agents"][0];
    assert_eq!(agent["status"], "online");
    assert!(
        !agent["last_seen"].as_str().unwrap().starts_with("1999"),
        "{agent}"
    );
    assert!(
        !agent["registered_at"].as_str().unwrap().starts_with("1999"),
        "{agent}"
    );

    let mut event_body = event("agent-1", "e-owned");
    event_body["emitted_by"] = json!("someone-else");
    event_body["received_at"] = json!("1999-01-01T00:00:00Z");
    let (status, answer) = app
        .post("/orchestrator/events", Some(&token("agent-1")), &event_body)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, stored) = stored(&app.js, "ACC_EVENTS", answer["seq"].as_u64().unwrap()).await;
    assert_eq!(stored["emitted_by"], "agent-1");
    assert!(!stored["received_at"].as_str().unwrap().starts_with("1999"));
}

#[tokio::test]
async fn transport_errors_use_the_json_envelope() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--body-limit=2KiB"]).await;
    let t = token("agent-1");

    let (status, body) = app.get("/no/such/route", None).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let response = app
        .http
        .delete(app.url("/orchestrator/register"))
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_error(status, &body, 405, "METHOD_NOT_ALLOWED");
    let response = app
        .http
        .get(app.url("/orchestrator/register"))
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_error(status, &body, 405, "METHOD_NOT_ALLOWED");

    let response = app
        .http
        .post(app.url("/orchestrator/register"))
        .bearer_auth(&t)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_error(status, &body, 415, "UNSUPPORTED_MEDIA_TYPE");

    for malformed in ["{", "not json", "[1,2]", "\"string\"", ""] {
        let response = app
            .http
            .post(app.url("/orchestrator/register"))
            .bearer_auth(&t)
            .header("content-type", "application/json")
            .body(malformed)
            .send()
            .await
            .unwrap();
        let (status, body) = read(response).await;
        assert_error(status, &body, 400, "INVALID_JSON");
    }

    let mut big = registration("agent-1");
    big["name"] = json!("x".repeat(4096));
    let (status, body) = app.post("/orchestrator/register", Some(&t), &big).await;
    assert_error(status, &body, 413, "PAYLOAD_TOO_LARGE");

    // A body without Content-Length (chunked) is cut off at the limit too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b' '; 1024])).collect();
    let response = app
        .http
        .post(app.url("/orchestrator/register"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_error(status, &body, 413, "PAYLOAD_TOO_LARGE");
}

#[tokio::test]
async fn the_default_body_limit_is_256_kib() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let t = token("agent-1");
    let mut under = event("agent-1", "under");
    under["data"] = json!("x".repeat(250 * 1024));
    let (status, body) = app.post("/orchestrator/events", Some(&t), &under).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut over = event("agent-1", "over");
    over["data"] = json!("x".repeat(257 * 1024));
    let (status, body) = app.post("/orchestrator/events", Some(&t), &over).await;
    assert_error(status, &body, 413, "PAYLOAD_TOO_LARGE");
}
