//! Property-based tests of admission through the real HTTP door: any body — arbitrary JSON,
//! a valid body with fields replaced by arbitrary values or removed, or arbitrary bytes — is
//! either a 200 whose stored message matches its schema where the answer says, or a 4xx with the
//! JSON envelope. Never a 5xx, never a panic.

use std::sync::atomic::{AtomicU32, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

use crate::helpers::*;

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,24}".prop_map(Value::from),
        "[a-z0-9_-]{1,12}".prop_map(Value::from),
        prop_oneof![
            Just("agent-1"),
            Just("agent-2"),
            Just("online"),
            Just("degraded"),
            Just("2026-11-28T10:00:00Z"),
            Just("https://a.example"),
            Just("a.b.>"),
            Just(""),
            Just(" "),
            Just("\u{0}"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "agent_id",
    "name",
    "base_url",
    "capabilities",
    "status",
    "details",
    "result",
    "error",
    "trace_id",
    "task_id",
    "event_id",
    "type",
    "source",
    "data",
    "time",
    "reported_by",
];

fn valid(route: usize) -> Value {
    match route {
        0 => registration("agent-1"),
        1 => json!({"agent_id": "agent-1", "status": "online", "details": {"load": 1}}),
        2 => json!({"status": "succeeded", "result": {"k": 1}, "trace_id": "abc"}),
        _ => event("agent-1", "evt-1"),
    }
}

/// A body: arbitrary bytes, an arbitrary JSON value, or a valid body with some fields set to
/// arbitrary values and some removed.
fn arb_body(route: usize) -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec(
        (prop::sample::select(FIELDS), prop::option::of(arb_json())),
        0..4,
    );
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64),
        2 => arb_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        5 => edits.prop_map(move |edits| {
            let mut body: Map<String, Value> = valid(route).as_object().unwrap().clone();
            for (field, value) in edits {
                match value {
                    Some(value) => body.insert(field.to_owned(), value),
                    None => body.remove(field),
                };
            }
            serde_json::to_vec(&body).unwrap()
        }),
    ]
}

fn path(route: usize, task_id: &str) -> String {
    match route {
        0 => "/orchestrator/register".to_owned(),
        1 => "/orchestrator/heartbeat".to_owned(),
        2 => format!("/orchestrator/tasks/{task_id}/callback"),
        _ => "/orchestrator/events".to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_body_is_a_stored_valid_message_or_a_4xx_never_a_5xx() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--rate-limit-per-agent=0"]).await;
    app.register("agent-1").await;
    let handle = tokio::runtime::Handle::current();
    let t = token("agent-1");
    let (stored_ok, refused) = (AtomicU32::new(0), AtomicU32::new(0));
    for route in 0..4 {
        let mut runner = TestRunner::new(Config {
            cases: 160,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (arb_body(route), "[A-Za-z0-9_%.~-]{1,16}");
        let result = runner.run(&strategy, |(body, task_id)| {
            let url = app.url(&path(route, &task_id));
            let outcome = tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let response = app
                        .http
                        .post(&url)
                        .bearer_auth(&t)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    let status = response.status();
                    let text = response.text().await.unwrap();
                    let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if status.is_success() {
                        let stream = answer["stream"].as_str().unwrap_or_default().to_owned();
                        let seq = answer["seq"].as_u64().unwrap_or_default();
                        // Validates the stored message against its JSON Schema.
                        stored(&app.js, &stream, seq).await;
                    }
                    (status, answer)
                })
            });
            let (status, answer) = outcome;
            prop_assert!(
                status.as_u16() == 200 || status.is_client_error(),
                "status {status} for {:?}: {answer}",
                String::from_utf8_lossy(&body)
            );
            if status.is_client_error() {
                prop_assert_eq!(&answer["success"], &json!(false), "{}", answer);
                prop_assert!(answer["error"]["code"].is_string(), "{}", answer);
                refused.fetch_add(1, Ordering::Relaxed);
            } else {
                prop_assert_eq!(&answer["success"], &json!(true), "{}", answer);
                stored_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), TestCaseError>(())
        });
        if let Err(failure) = result {
            panic!("route {}: {failure}", path(route, "t"));
        }
    }
    let (stored_ok, refused) = (stored_ok.into_inner(), refused.into_inner());
    println!(
        "admission properties: {} cases, {stored_ok} stored and valid, {refused} refused with \
         a 4xx, 0 5xx",
        stored_ok + refused
    );
    assert!(stored_ok > 0 && refused > 0, "both outcomes were exercised");
}
