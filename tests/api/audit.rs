//! The audit trail: every admin write and every refused credential on `ACC_AUDIT`, which nobody
//! can delete from or purge; read by `GET /orchestrator/audit` and streamed by
//! `/orchestrator/audit/stream`; and the admin streams of agent status changes.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

async fn audit(app: &TestApp, query: &str) -> Value {
    let (status, body) = app
        .get(&format!("/orchestrator/audit{query}"), Some(&admin_token()))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn every_admin_write_is_in_the_audit_trail_with_who_and_what() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (status, created) = app
        .post(
            "/orchestrator/silences",
            Some(&admin_token()),
            &json!({ "matchers": { "alertname": "AgentOffline" }, "duration": "1h" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let silence = created["silence"]["id"].as_str().unwrap().to_owned();
    let response = app
        .http
        .delete(app.url(&format!("/orchestrator/silences/{silence}")))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let records = admin_records(&app).await;
    let actions: Vec<(&str, &str)> = records.iter().map(action_and_target).collect();
    assert_eq!(
        actions,
        [
            ("silence.create", silence.as_str()),
            ("silence.expire", silence.as_str())
        ]
    );
    for record in &records {
        assert_eq!(record["actor"], "operator");
        assert_matches_schema("acc.audit.admin", &record_without_seq(record));
    }
}

#[tokio::test]
async fn an_alert_ack_an_admin_task_cancel_and_a_dlq_replay_are_in_the_audit_trail() {
    use crate::alerting::{flags, offline_rule, rules_file};
    use crate::tasks::{claim, register_worker, scoped_token};
    let nats = NatsServer::start();
    let (_dir, rules) = rules_file(json!([offline_rule(0.5, None)]));
    let app = TestApp::spawn_with(
        &nats,
        &flags(&[
            "--agent-stale-after=300ms",
            "--agent-sweep-interval=100ms",
            &rules,
        ]),
    )
    .await;
    let post = |path: String, token: String, body: Value| {
        let app = &app;
        async move {
            let (status, answer) = app.post(&path, Some(&token), &body).await;
            assert!(status.is_success(), "{path}: {status} {answer}");
            answer
        }
    };

    // An alert, acknowledged: a silent agent goes offline.
    app.register("silent").await;
    let alert = eventually(Duration::from_secs(10), "the alert to fire", || async {
        let (_, body) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
        body["active"]
            .as_array()?
            .iter()
            .find(|a| a["phase"] == "firing")
            .map(|a| a["id"].as_str().unwrap().to_owned())
    })
    .await;
    post(
        format!("/orchestrator/alerts/{alert}/ack"),
        admin_token(),
        json!({}),
    )
    .await;

    // A queued task, cancelled by the operator.
    let submitter = scoped_token("client-1", "orchestrator.submit");
    let submit = |task_id: &str, capability: &str| {
        post(
            "/orchestrator/tasks".into(),
            submitter.clone(),
            json!({ "task_id": task_id, "capability": capability }),
        )
    };
    submit("t-cancelled", "nobody-does-this").await;
    post(
        "/orchestrator/tasks/t-cancelled/cancel".into(),
        admin_token(),
        json!({}),
    )
    .await;
    // A submitter cancelling its own task is not an admin write.
    submit("t-own", "nobody-does-this").await;
    post(
        "/orchestrator/tasks/t-own/cancel".into(),
        submitter.clone(),
        json!({}),
    )
    .await;

    // A dead-lettered task, replayed.
    register_worker(&app, "strict", &["c"], 1).await;
    submit("t-dead", "c").await;
    claim(&app, "strict", json!({ "wait": "5s" })).await;
    let failed = post(
        "/orchestrator/tasks/t-dead/callback".into(),
        token("strict"),
        json!({ "status": "failed", "error": { "message": "bad input", "retryable": false } }),
    )
    .await;
    assert_eq!(failed["status"], "dead_lettered", "{failed}");
    post(
        "/orchestrator/dlq/t-dead/replay".into(),
        admin_token(),
        json!({}),
    )
    .await;

    let records = admin_records(&app).await;
    let actions: Vec<(&str, &str)> = records.iter().map(action_and_target).collect();
    assert_eq!(
        actions,
        [
            ("alert.ack", alert.as_str()),
            ("task.cancel", "t-cancelled"),
            ("dlq.replay", "t-dead"),
        ]
    );
    for record in &records {
        assert_eq!(record["actor"], "operator");
        assert!(record["at"].is_string(), "{record}");
        assert_matches_schema("acc.audit.admin", &record_without_seq(record));
    }
}

/// Every admin record of the trail, oldest first.
async fn admin_records(app: &TestApp) -> Vec<Value> {
    let body = audit(app, "?kind=admin").await;
    body["records"].as_array().unwrap().clone()
}

fn action_and_target(record: &Value) -> (&str, &str) {
    (
        record["action"].as_str().unwrap(),
        record["target"].as_str().unwrap(),
    )
}

/// `seq` is where the record is stored, added by the listing, not part of the record.
fn record_without_seq(record: &Value) -> Value {
    let mut record = record.clone();
    record.as_object_mut().unwrap().remove("seq");
    record
}

#[tokio::test]
async fn refused_credentials_are_recorded_by_address_and_code_never_the_token() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJhZ2VudF9pZCI6Im1hbGxvcnkifQ.c2VjcmV0LXRva2VuLXZhbHVl";
    let (status, _) = app.get("/orchestrator/agents", Some(forged)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A valid token without the admin scope.
    let (status, _) = app
        .get("/orchestrator/agents", Some(&token("agent-a")))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // No token at all is not a refused credential.
    let (status, _) = app.get("/orchestrator/agents", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let body = eventually(Duration::from_secs(5), "two credential records", || async {
        let body = audit(&app, "?kind=credential").await;
        (body["count"] == 2).then_some(body)
    })
    .await;
    let codes: Vec<&str> = body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["INVALID_TOKEN", "INSUFFICIENT_SCOPE"]);
    let text = body.to_string();
    assert!(
        text.contains("127.0.0.1"),
        "the address is recorded: {text}"
    );
    assert!(text.contains("GET /orchestrator/agents"), "{text}");
    assert!(
        !text.contains("c2VjcmV0LXRva2VuLXZhbHVl"),
        "never the token: {text}"
    );
}

#[tokio::test]
async fn garbage_tokens_on_the_nats_door_are_recorded_as_many_as_its_rejection_limit_allows() {
    let nats = NatsServer::start();
    let app = TestApp::start(settings(
        Some(&nats.url()),
        &["--door-reject-burst=5", "--door-reject-interval=1h"],
    ))
    .await;
    let flood = NatsAgent::connect(&nats.url(), "flood").await;
    let garbage = "eyJhbGciOiJIUzI1NiJ9.eyJhZ2VudF9pZCI6ImZsb29kIn0.Z2FyYmFnZS1zaWduYXR1cmU";
    let sent = 60;
    for _ in 0..sent {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Authorization", format!("Bearer {garbage}").as_str());
        flood
            .publish("acc.in.heartbeat", headers, b"{}".to_vec())
            .await
            .expect_err("the door's intake refuses a token that does not verify");
    }
    eventually(
        Duration::from_secs(20),
        "the door handled the flood",
        || async { (count_stored(&app.js, "ACC_REJECTED").await == sent).then_some(()) },
    )
    .await;
    // A token that verifies but lacks the scope, from a caller with its own budget: recorded
    // with the caller. Its answer comes after its record was handed off, so the flood's records
    // were handed off before it.
    let quiet = NatsAgent::connect(&nats.url(), "quiet").await;
    let (status, answer) = quiet
        .call("acc.in.task_submit", &json!({ "capability": "x" }))
        .await;
    assert_eq!(status, 403, "{answer}");

    let body = eventually(Duration::from_secs(10), "the caller's record", || async {
        let body = audit(&app, "?kind=credential").await;
        body["records"]
            .as_array()?
            .iter()
            .any(|r| r["actor"] == "quiet")
            .then_some(body)
    })
    .await;
    let records = body["records"].as_array().unwrap();
    let flood_records: Vec<&Value> = records.iter().filter(|r| r["actor"].is_null()).collect();
    assert_eq!(
        flood_records.len(),
        5,
        "the rejection budget bounds the records: {records:?}"
    );
    for record in &flood_records {
        assert_eq!(record["code"], "INVALID_TOKEN");
        assert_eq!(record["action"], "NATS acc.in.heartbeat");
        assert_matches_schema("acc.audit.credential", &record_without_seq(record));
    }
    let scoped = records.iter().find(|r| r["actor"] == "quiet").unwrap();
    assert_eq!(scoped["code"], "INSUFFICIENT_SCOPE");
    assert_eq!(scoped["action"], "NATS acc.in.task_submit");
    let text = body.to_string();
    assert!(
        !text.contains("Z2FyYmFnZS1zaWduYXR1cmU"),
        "never the token: {text}"
    );
}

#[tokio::test]
async fn the_audit_trail_denies_delete_and_purge_and_pages_with_a_cursor() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    for _ in 0..3 {
        let (status, _) = app
            .post(
                "/orchestrator/silences",
                Some(&admin_token()),
                &json!({ "matchers": { "severity": "warning" }, "duration": "5m" }),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let first = audit(&app, "?limit=2").await;
    assert_eq!(first["count"], 2);
    let cursor = first["next_cursor"].as_u64().expect("a next page");
    let second = audit(&app, &format!("?limit=2&cursor={cursor}")).await;
    assert_eq!(second["count"], 1);
    assert!(second.get("next_cursor").is_none(), "{second}");

    let stream = app.js.get_stream("ACC_AUDIT").await.unwrap();
    let seq = first["records"][0]["seq"].as_u64().unwrap();
    assert!(
        stream.delete_message(seq).await.is_err(),
        "delete is refused"
    );
    assert!(stream.purge().await.is_err(), "purge is refused");
    assert_eq!(audit(&app, "").await["count"], 3, "all records still there");

    let (status, body) = app
        .get("/orchestrator/audit", Some(&token("agent-a")))
        .await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
    let (status, body) = app
        .get("/orchestrator/audit?limit=0", Some(&admin_token()))
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
    let (status, body) = app
        .get("/orchestrator/audit?colour=red", Some(&admin_token()))
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
}

#[tokio::test]
async fn admins_can_follow_agent_status_changes_and_the_audit_trail_as_streams() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    for route in ["agents", "alerts", "audit"] {
        let response = app
            .http
            .get(app.url(&format!("/orchestrator/{route}/stream")))
            .bearer_auth(token("agent-a"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{route}");
    }
    app.register("agent-s").await;
    let response = app
        .http
        .get(app.url("/orchestrator/agents/stream?from_seq=1"))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = read_until(response, "\"agent_id\":\"agent-s\"").await;
    assert!(text.contains("id: "), "{text}");
}

/// Reads a streaming body until it contains `needle` (or 10 s pass).
async fn read_until(response: reqwest::Response, needle: &str) -> String {
    use futures::StreamExt as _;
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !text.contains(needle) {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => panic!("{needle} did not arrive: {text}"),
        }
    }
    text
}
