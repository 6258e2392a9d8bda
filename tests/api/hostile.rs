//! Hostile bodies get a clear 4xx with the JSON envelope and change nothing: oversize bodies are
//! refused without being read to the end, a message the bus would refuse as too large is a 413
//! (not a 500), and malformed, mistyped, deeply nested, huge or non-UTF-8 JSON is a 400.
//! Unknown fields are ignored and not stored (the policy in docs/api.md, Request bodies).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::*;

/// Sends `head` and then `body_bytes` of `body` in 64 KiB pieces, stopping early if the server
/// answers first. Returns the status line and how many body bytes were sent.
async fn raw_post(app: &TestApp, head: &str, body_len: usize) -> (String, usize) {
    let socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut reader, mut socket) = socket.into_split();
    socket.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    let mut sent = 0;
    let mut answer = vec![0u8; 4096];
    while sent < body_len {
        tokio::select! {
            read = reader.read(&mut answer) => {
                let n = read.unwrap();
                let text = String::from_utf8_lossy(&answer[..n]).to_string();
                return (text.lines().next().unwrap_or("").to_owned(), sent);
            }
            written = socket.write_all(&chunk[..chunk.len().min(body_len - sent)]) => {
                if written.is_err() {
                    break;
                }
                sent += chunk.len().min(body_len - sent);
            }
        }
    }
    let n = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&answer[..n]).to_string();
    (text.lines().next().unwrap_or("").to_owned(), sent)
}

#[tokio::test]
async fn a_10_mb_body_is_413_before_it_is_read() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let t = token("agent-1");
    let ten_mb = 10 * 1024 * 1024;

    // Declared length: refused from the headers; we stop sending as soon as the answer comes.
    let head = format!(
        "POST /orchestrator/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n\
         content-type: application/json\r\ncontent-length: {ten_mb}\r\n\r\n"
    );
    let started = Instant::now();
    let (status_line, sent) = raw_post(&app, &head, ten_mb).await;
    println!(
        "10 MB with content-length: {status_line:?} after {sent} body bytes, {:?}",
        started.elapsed()
    );
    assert!(status_line.contains(" 413 "), "{status_line}");
    // What was "sent" includes what the kernel's socket buffers took; the answer came first.
    assert!(sent < ten_mb, "the server waited for the whole body");

    // Chunked, no declared length: cut off at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..160).map(|_| Ok(vec![b' '; 64 * 1024])).collect();
    let response = app
        .http
        .post(app.url("/orchestrator/events"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_error(status, &body, 413, "PAYLOAD_TOO_LARGE");
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 0);
}

#[tokio::test]
async fn a_body_just_over_the_nats_max_payload_is_413_not_500() {
    // The default server max_payload is 1 MiB; the largest body limit it allows is 1 MiB less
    // the bridge's envelope room.
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--body-limit=1008KiB"]).await;
    let t = token("agent-1");
    let mut over = event("agent-1", "over");
    over["data"] = json!("x".repeat(1024 * 1024 + 1));
    let (status, body) = app.post("/orchestrator/events", Some(&t), &over).await;
    assert_error(status, &body, 413, "PAYLOAD_TOO_LARGE");

    // When the bus itself refuses the size (a stream's max_msg_size, below the body limit),
    // the answer is still 413, from the bus's error code.
    let mut stream = app.js.get_stream("ACC_EVENTS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = 4096;
    app.js.update_stream(&config).await.unwrap();
    let mut bigger = event("agent-1", "bigger-than-the-stream-allows");
    bigger["data"] = json!("x".repeat(8 * 1024));
    let (status, body) = app.post("/orchestrator/events", Some(&t), &bigger).await;
    assert_error(status, &body, 413, "PAYLOAD_TOO_LARGE");
    let (status, body) = app
        .post("/orchestrator/events", Some(&t), &event("agent-1", "small"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 1);
}

async fn post_raw(app: &TestApp, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let response = app
        .http
        .post(app.url(path))
        .bearer_auth(token("agent-1"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    read(response).await
}

#[tokio::test]
async fn malformed_mistyped_nested_and_non_utf8_bodies_are_400_and_store_nothing() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    // No registration first: the heartbeat cases must be refused for their shape alone.

    let deep = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            "/orchestrator/register",
            br#"{"agent_id": "agent-1", "name": "#.to_vec(),
            "INVALID_JSON",
        ),
        (
            "trailing garbage",
            "/orchestrator/register",
            br#"{"agent_id": "agent-1"} {}"#.to_vec(),
            "INVALID_JSON",
        ),
        (
            "invalid UTF-8 in a string",
            "/orchestrator/register",
            b"{\"agent_id\": \"agent-1\", \"name\": \"\xff\xfe\"}".to_vec(),
            "INVALID_JSON",
        ),
        (
            "invalid UTF-8 outside strings",
            "/orchestrator/events",
            b"\xc3\x28{}".to_vec(),
            "INVALID_JSON",
        ),
        (
            "a lone surrogate escape",
            "/orchestrator/register",
            br#"{"agent_id": "agent-1", "name": "\ud800"}"#.to_vec(),
            "INVALID_JSON",
        ),
        (
            "nesting 10,000 deep",
            "/orchestrator/events",
            format!(
                r#"{{"event_id":"e","type":"t","source":"agent-1","time":"2026-01-01T00:00:00Z","data":{}}}"#,
                deep(10_000)
            )
            .into_bytes(),
            "INVALID_JSON",
        ),
        (
            "nesting 129 deep",
            "/orchestrator/tasks/t-1/callback",
            format!(r#"{{"status":"done","result":{}}}"#, deep(129)).into_bytes(),
            "INVALID_JSON",
        ),
        (
            "a number too large",
            "/orchestrator/heartbeat",
            br#"{"agent_id": "agent-1", "details": 1e999}"#.to_vec(),
            "INVALID_JSON",
        ),
        (
            "agent_id a number",
            "/orchestrator/register",
            br#"{"agent_id": 1, "name": "n", "base_url": "https://x.example", "capabilities": []}"#
                .to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "capabilities a string",
            "/orchestrator/register",
            br#"{"agent_id": "agent-1", "name": "n", "base_url": "https://x.example", "capabilities": "all"}"#
                .to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "capabilities of objects",
            "/orchestrator/register",
            br#"{"agent_id": "agent-1", "name": "n", "base_url": "https://x.example", "capabilities": [{}]}"#
                .to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "name an array",
            "/orchestrator/register",
            br#"{"agent_id": "agent-1", "name": ["n"], "base_url": "https://x.example", "capabilities": []}"#
                .to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "base_url not a URL",
            "/orchestrator/register",
            br#"{"agent_id": "agent-1", "name": "n", "base_url": "javascript:alert(1)", "capabilities": []}"#
                .to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "status a number",
            "/orchestrator/heartbeat",
            br#"{"agent_id": "agent-1", "status": 3}"#.to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "time not a timestamp",
            "/orchestrator/events",
            br#"{"event_id":"e","type":"t","source":"agent-1","time":"yesterday","data":1}"#
                .to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "event_id an object",
            "/orchestrator/events",
            br#"{"event_id":{},"type":"t","source":"agent-1","time":"2026-01-01T00:00:00Z","data":1}"#
                .to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "task status with a dot",
            "/orchestrator/tasks/t-1/callback",
            br#"{"status":"done.>"}"#.to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "a 200 KB name",
            "/orchestrator/register",
            serde_json::to_vec(&json!({
                "agent_id": "agent-1", "name": "n".repeat(200 * 1024),
                "base_url": "https://x.example", "capabilities": [],
            }))
            .unwrap(),
            "INVALID_PAYLOAD",
        ),
        (
            "50,000 capabilities",
            "/orchestrator/register",
            serde_json::to_vec(&json!({
                "agent_id": "agent-1", "name": "n", "base_url": "https://x.example",
                "capabilities": vec!["c"; 50_000],
            }))
            .unwrap(),
            "INVALID_PAYLOAD",
        ),
    ];
    for (name, path, body, code) in cases {
        let (status, answer) = post_raw(&app, path, body).await;
        assert_eq!(status.as_u16(), 400, "{name}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{name}: {answer}");
        assert_eq!(answer["success"], false, "{name}: {answer}");
    }
    assert_eq!(count_stored(&app.js, "ACC_AGENTS").await, 0);
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 0);
    assert_eq!(count_stored(&app.js, "ACC_TASKS").await, 0);
}

#[tokio::test]
async fn million_element_arrays_and_megabyte_strings_are_refused_with_a_4xx() {
    // A server and body limit big enough that these reach the JSON parser and the validation.
    let nats = NatsServer::start_with_config("max_payload: 8MB\n");
    let app = TestApp::spawn_with(&nats, &["--body-limit=6MiB"]).await;
    let t = token("agent-1");
    let million: Vec<u8> = vec![0; 1_000_000];
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&t),
            &json!({"agent_id": "agent-1", "name": "n", "base_url": "https://x.example",
                    "capabilities": million}),
        )
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&t),
            &json!({"agent_id": "agent-1", "name": "n".repeat(3 * 1024 * 1024),
                    "base_url": "https://x.example", "capabilities": []}),
        )
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
    let (status, body) = app
        .post(
            "/orchestrator/events",
            Some(&t),
            &json!({"event_id": "x".repeat(3 * 1024 * 1024), "type": "t", "source": "agent-1",
                    "time": "2026-01-01T00:00:00Z", "data": 1}),
        )
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
    let (status, body) = app
        .post(
            "/orchestrator/tasks/t-1/callback",
            Some(&t),
            &json!({"status": "s".repeat(3 * 1024 * 1024)}),
        )
        .await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
    // Above the body limit the same shapes are a 413, read no further than the limit.
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&t),
            &json!({"agent_id": "agent-1", "name": "n", "base_url": "https://x.example",
                    "capabilities": vec!["cap"; 1_500_000]}),
        )
        .await;
    assert_error(status, &body, 413, "PAYLOAD_TOO_LARGE");
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 0);
    assert_eq!(count_stored(&app.js, "ACC_TASKS").await, 0);
    // `data` of an event is the agent's own payload: stored as sent when within the limit.
    let mut big_data = event("agent-1", "big-data");
    big_data["data"] = json!(vec![0u8; 1_000_000]);
    let (status, body) = app.post("/orchestrator/events", Some(&t), &big_data).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, stored_event) = stored(&app.js, "ACC_EVENTS", body["seq"].as_u64().unwrap()).await;
    assert_eq!(stored_event["data"].as_array().unwrap().len(), 1_000_000);
}

#[tokio::test]
async fn unknown_fields_are_ignored_and_not_stored() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let t = token("agent-1");
    let mut body = registration("agent-1");
    body["evil"] = json!({"$where": "1"});
    body["__proto__"] = json!({"admin": true});
    let (status, answer) = app.post("/orchestrator/register", Some(&t), &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, stored_registration) =
        stored(&app.js, "ACC_AGENTS", answer["seq"].as_u64().unwrap()).await;
    let text = stored_registration.to_string();
    assert!(
        !text.contains("evil") && !text.contains("__proto__"),
        "{text}"
    );
}
