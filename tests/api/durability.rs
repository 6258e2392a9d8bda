//! A 200 means stored: exactly once, where the answer says; retries are duplicates, not copies;
//! an unreachable or full bus is a 503 with `Retry-After`, never a hang and never a 200.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn every_200_is_stored_exactly_once_where_it_says() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let t = token("agent-1");
    app.register("agent-1").await;
    let mut acks = Vec::new();
    for i in 0..20 {
        let (status, body) = app
            .post(
                "/orchestrator/events",
                Some(&t),
                &event("agent-1", &format!("evt-{i}")),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        acks.push((
            "ACC_EVENTS",
            body["seq"].as_u64().unwrap(),
            format!("evt-{i}"),
        ));
        let (status, body) = app
            .post(
                &format!("/orchestrator/tasks/task-{i}/callback"),
                Some(&t),
                &json!({"status": "succeeded", "result": i}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        acks.push((
            "ACC_TASKS",
            body["seq"].as_u64().unwrap(),
            format!("task-{i}"),
        ));
    }
    for (stream, seq, id) in &acks {
        let (subject, payload) = stored(&app.js, stream, *seq).await;
        match *stream {
            "ACC_EVENTS" => assert_eq!(payload["event_id"], id.as_str(), "{subject}"),
            _ => assert_eq!(payload["task_id"], id.as_str(), "{subject}"),
        }
    }
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 20);
    assert_eq!(count_stored(&app.js, "ACC_TASKS").await, 20);
}

#[tokio::test]
async fn the_same_event_id_twice_is_stored_once() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let t = token("agent-1");
    let (status, first) = app
        .post("/orchestrator/events", Some(&t), &event("agent-1", "evt-x"))
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["duplicate"], false);
    let (status, second) = app
        .post("/orchestrator/events", Some(&t), &event("agent-1", "evt-x"))
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["seq"], first["seq"]);
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 1);

    // Dedupe is per agent: another agent's event with the same id is its own event.
    let (status, other) = app
        .post(
            "/orchestrator/events",
            Some(&token("agent-2")),
            &event("agent-2", "evt-x"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{other}");
    assert_eq!(other["duplicate"], false);
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 2);
}

#[tokio::test]
async fn a_retried_register_or_callback_is_a_duplicate_not_a_copy() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let t = token("agent-1");
    let first = app.register("agent-1").await;
    let again = app.register("agent-1").await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["seq"], first["seq"]);

    let callback = json!({"status": "succeeded", "result": {"k": 1}});
    let (_, one) = app
        .post("/orchestrator/tasks/t-1/callback", Some(&t), &callback)
        .await;
    let (_, two) = app
        .post("/orchestrator/tasks/t-1/callback", Some(&t), &callback)
        .await;
    assert_eq!(one["duplicate"], false);
    assert_eq!(two["duplicate"], true);
    assert_eq!(count_stored(&app.js, "ACC_TASKS").await, 1);

    // A different result for the same task is a new report.
    let (_, three) = app
        .post(
            "/orchestrator/tasks/t-1/callback",
            Some(&t),
            &json!({"status": "failed"}),
        )
        .await;
    assert_eq!(three["duplicate"], false);
}

#[tokio::test]
async fn an_idempotency_key_makes_a_retried_heartbeat_a_duplicate() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-1").await;
    let send = |key: &'static str| {
        app.http
            .post(app.url("/orchestrator/heartbeat"))
            .bearer_auth(token("agent-1"))
            .header("idempotency-key", key)
            .json(&json!({"agent_id": "agent-1"}))
            .send()
    };
    let (_, first) = read(send("beat-1").await.unwrap()).await;
    let (_, retry) = read(send("beat-1").await.unwrap()).await;
    let (_, next) = read(send("beat-2").await.unwrap()).await;
    assert_eq!(first["duplicate"], false, "{first}");
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["seq"], first["seq"]);
    assert_eq!(next["duplicate"], false, "{next}");
    let (status, body) = read(send(" bad key ").await.unwrap()).await;
    assert_error(status, &body, 400, "INVALID_IDEMPOTENCY_KEY");
}

#[tokio::test]
async fn an_unreachable_bus_answers_503_within_the_bound_and_recovers_without_a_restart() {
    let mut nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--publish-timeout=1s"]).await;
    let t = token("agent-1");
    app.register("agent-1").await;
    nats.kill();

    for i in 0..3 {
        let started = Instant::now();
        let response = app
            .http
            .post(app.url("/orchestrator/events"))
            .bearer_auth(&t)
            .json(&event("agent-1", &format!("down-{i}")))
            .send()
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_millis(1500), "took {elapsed:?}");
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            Some("1")
        );
        let (status, body) = read(response).await;
        assert_error(status, &body, 503, "BUS_UNAVAILABLE");
    }
    let (status, body) = app.get("/health", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "degraded");
    let (status, _) = app.get("/health/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    nats.restart();
    let body = eventually(
        Duration::from_secs(15),
        "a 200 after NATS is back",
        || async {
            let (status, body) = app
                .post("/orchestrator/events", Some(&t), &event("agent-1", "after"))
                .await;
            (status == StatusCode::OK).then_some(body)
        },
    )
    .await;
    let (_, stored) = stored(&app.js, "ACC_EVENTS", body["seq"].as_u64().unwrap()).await;
    assert_eq!(stored["event_id"], "after");
    // Data from before the outage survived it.
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&t),
            &json!({"agent_id": "agent-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_full_stream_answers_503_stream_full_and_never_200() {
    let nats = NatsServer::start();
    // One agent fills it: its store quota (a 32nd of the stream by default) is lifted.
    let app = TestApp::spawn_with(
        &nats,
        &["--stream-max-bytes=64KiB", "--agent-store-quota=1GiB"],
    )
    .await;
    let t = token("agent-1");
    let mut stored_ok = 0;
    let mut refused = None;
    for i in 0..40 {
        let mut body = event("agent-1", &format!("big-{i}"));
        body["data"] = json!("x".repeat(8 * 1024));
        let (status, answer) = app.post("/orchestrator/events", Some(&t), &body).await;
        match status {
            StatusCode::OK => stored_ok += 1,
            _ => {
                refused = Some((status, answer));
                break;
            }
        }
    }
    let (status, answer) = refused.expect("a 64 KiB stream refuses 320 KiB of events");
    println!(
        "FAULT full stream: {stored_ok} events stored, then {status} {}",
        answer["error"]["code"]
    );
    assert_error(status, &answer, 503, "STREAM_FULL");
    assert!(stored_ok > 0 && stored_ok < 10, "{stored_ok} stored");
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, stored_ok);
    // The operator sees it: /health counts the refusal by its code.
    let (_, health) = app.get("/health", None).await;
    assert_eq!(health["refusals"]["stream_full"], 1, "{health}");
    assert_eq!(health["refusals"]["bus_unavailable"], 0, "{health}");
}
