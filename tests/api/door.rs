//! The NATS door: the same admission as HTTP. The contract table runs through both doors and
//! must give the same answers and store the same messages; refusals over NATS reach no verified
//! subject and are recorded; the door resumes after a restart without losing or repeating a
//! message; agent NATS users are confined to the inbound subjects and their own replies.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

/// The verified streams: nothing refused may ever appear here.
const VERIFIED: [&str; 3] = ["ACC_AGENTS", "ACC_TASKS", "ACC_EVENTS"];

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signed(secret: &str, agent: &str, exp: u64) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"agent_id": agent, "aud": "auto-com-center", "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[derive(Debug, Clone, Copy)]
enum Tok {
    Of(&'static str),
    Missing,
    Forged,
    Expired,
}

impl Tok {
    fn value(self) -> Option<String> {
        match self {
            Tok::Of(agent) => Some(token(agent)),
            Tok::Missing => None,
            Tok::Forged => Some(signed(
                "another-secret-0123456789-0123456789-xyz",
                "agent-1",
                now() + 600,
            )),
            Tok::Expired => Some(signed(SECRET, "agent-1", now() - 3600)),
        }
    }
}

/// One request of the contract table, sent the same way through either door.
struct Step {
    /// `register`, `heartbeat`, `event` or `task/<task_id>`.
    call: &'static str,
    token: Tok,
    body: String,
    idempotency_key: Option<&'static str>,
    want_status: u16,
    want_code: &'static str,
}

fn step(call: &'static str, token: Tok, body: Value, status: u16, code: &'static str) -> Step {
    Step {
        call,
        token,
        body: body.to_string(),
        idempotency_key: None,
        want_status: status,
        want_code: code,
    }
}

fn contract_table() -> Vec<Step> {
    let a = Tok::Of("agent-1");
    let mut nameless = registration("agent-1");
    nameless.as_object_mut().unwrap().remove("name");
    let mut dotted = registration("agent-1");
    dotted["agent_id"] = json!("agent.1");
    let mut foreign_source = event("agent-1", "evt-2");
    foreign_source["source"] = json!("agent-2");
    let mut bad_time = event("agent-1", "evt-3");
    bad_time["time"] = json!("yesterday");
    let mut table = vec![
        step("register", a, registration("agent-1"), 200, ""),
        step("register", a, registration("agent-1"), 200, ""),
        Step {
            idempotency_key: Some("hb-1"),
            ..step("heartbeat", a, json!({"agent_id": "agent-1"}), 200, "")
        },
        step(
            "heartbeat",
            a,
            json!({"agent_id": "agent-1", "status": "degraded", "details": {"load": 0.9}}),
            200,
            "",
        ),
        step(
            "heartbeat",
            Tok::Of("agent-2"),
            json!({"agent_id": "agent-2"}),
            404,
            "AGENT_NOT_FOUND",
        ),
        step("heartbeat", a, json!({}), 400, "MISSING_AGENT_ID"),
        step(
            "heartbeat",
            a,
            json!({"agent_id": "agent-1", "status": "sleepy"}),
            400,
            "INVALID_PAYLOAD",
        ),
        step("register", a, nameless, 400, "INVALID_PAYLOAD"),
        step("register", a, dotted, 400, "INVALID_PAYLOAD"),
        step(
            "register",
            a,
            registration("agent-2"),
            403,
            "IDENTITY_MISMATCH",
        ),
        step("event", a, event("agent-1", "evt-1"), 200, ""),
        step("event", a, event("agent-1", "evt-1"), 200, ""),
        step("event", a, foreign_source, 403, "IDENTITY_MISMATCH"),
        step("event", a, bad_time, 400, "INVALID_PAYLOAD"),
        step(
            "task/task-9",
            a,
            json!({"status": "succeeded", "result": {"answer": 42}, "trace_id": "trace-7"}),
            200,
            "",
        ),
        step(
            "task/task-9",
            a,
            json!({"status": "done", "task_id": "other"}),
            400,
            "INVALID_PAYLOAD",
        ),
        step(
            "task/task-9",
            a,
            json!({"status": "done", "agent_id": "agent-2"}),
            403,
            "IDENTITY_MISMATCH",
        ),
        step(
            "task/t@sk",
            a,
            json!({"status": "done"}),
            400,
            "INVALID_PAYLOAD",
        ),
        Step {
            idempotency_key: Some("not visible"),
            ..step(
                "register",
                a,
                registration("agent-1"),
                400,
                "INVALID_IDEMPOTENCY_KEY",
            )
        },
        Step {
            body: "[1,2]".into(),
            ..step("register", a, json!(null), 400, "INVALID_JSON")
        },
        Step {
            body: "{".into(),
            ..step("register", a, json!(null), 400, "INVALID_JSON")
        },
    ];
    for (token, code) in [
        (Tok::Missing, "MISSING_TOKEN"),
        (Tok::Forged, "INVALID_TOKEN"),
        (Tok::Expired, "TOKEN_EXPIRED"),
    ] {
        table.push(step("event", token, event("agent-1", "evt-9"), 401, code));
    }
    table
}

async fn via_http(app: &TestApp, step: &Step) -> (u16, Value) {
    let path = match step.call {
        "register" => "/orchestrator/register".to_owned(),
        "heartbeat" => "/orchestrator/heartbeat".to_owned(),
        "event" => "/orchestrator/events".to_owned(),
        task => format!(
            "/orchestrator/tasks/{}/callback",
            task.strip_prefix("task/").unwrap()
        ),
    };
    let mut request = app
        .http
        .post(app.url(&path))
        .header("content-type", "application/json")
        .body(step.body.clone());
    if let Some(token) = step.token.value() {
        request = request.bearer_auth(token);
    }
    if let Some(key) = step.idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let (status, body) = read(request.send().await.unwrap()).await;
    (status.as_u16(), body)
}

fn inbound_subject(call: &str) -> String {
    match call {
        "register" => "acc.in.register".to_owned(),
        "heartbeat" => "acc.in.heartbeat".to_owned(),
        "event" => "acc.in.event".to_owned(),
        task => format!("acc.in.task_result.{}", task.strip_prefix("task/").unwrap()),
    }
}

/// Sends a step through the NATS door as the agent its token names (whose reply namespace the
/// door answers in); `None` when the door did not answer (it answers only authenticated callers).
async fn via_nats(agents: &[NatsAgent], step: &Step) -> Option<(u16, Value)> {
    let agent = match step.token {
        Tok::Of(name) => agents.iter().find(|a| a.agent == name).unwrap(),
        _ => &agents[0],
    };
    let extra: Vec<(&str, &str)> = step
        .idempotency_key
        .map(|key| ("Idempotency-Key", key))
        .into_iter()
        .collect();
    let wait = if step.want_status == 401 {
        Duration::from_millis(700)
    } else {
        Duration::from_secs(10)
    };
    agent
        .call_with(
            &inbound_subject(step.call),
            step.token.value().as_deref(),
            step.body.clone().into_bytes(),
            &extra,
            wait,
        )
        .await
}

/// An answer without what differs between two runs of the same request (time, trace).
fn comparable(mut answer: Value) -> Value {
    if let Some(map) = answer.as_object_mut() {
        map.remove("timestamp");
        map.remove("trace_id");
    }
    answer
}

/// Every message of `stream`: subject, dedupe id (a heartbeat's only when the client sent an
/// Idempotency-Key) and payload without server timestamps.
async fn stored_messages(js: &async_nats::jetstream::Context, stream: &str) -> Vec<Value> {
    let stream_name = stream;
    let mut stream = js.get_stream(stream_name).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in 1..=state.last_sequence {
        let message = stream.get_raw_message(seq).await.unwrap();
        let (subject, mut payload) = stored(js, stream_name, seq).await;
        payload.as_object_mut().unwrap().remove("received_at");
        let msg_id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned());
        let msg_id = if subject.starts_with("acc.agents.heartbeat.") && msg_id.is_some() {
            // Without a client key, HTTP derives it from the second, NATS from the inbound
            // sequence; with one, both doors must use it.
            msg_id.filter(|id| id.contains(":key:") && !id.contains(":key:nats-in-"))
        } else {
            msg_id
        };
        out.push(json!({"seq": seq, "subject": subject, "msg_id": msg_id, "payload": payload}));
    }
    out
}

#[tokio::test]
async fn the_contract_is_the_same_through_both_doors() {
    // Two bridges on two servers get the same requests, one over HTTP, one over NATS. Without
    // the registry, nothing else writes the streams, so even the sequences must agree.
    let (http_nats, door_nats) = (NatsServer::start(), NatsServer::start());
    let http_app = TestApp::spawn_with(&http_nats, &["--roles=ingress,door"]).await;
    let door_app = TestApp::spawn_with(&door_nats, &["--roles=ingress,door"]).await;
    let agents = [
        NatsAgent::connect(&door_nats.url(), "agent-1").await,
        NatsAgent::connect(&door_nats.url(), "agent-2").await,
    ];

    let table = contract_table();
    let mut refused_unauthenticated = Vec::new();
    for (n, step) in table.iter().enumerate() {
        let (status, over_http) = via_http(&http_app, step).await;
        let what = format!("step {n} ({} {})", step.call, step.body);
        assert_eq!(status, step.want_status, "{what}: {over_http}");
        if step.want_status != 200 {
            assert_eq!(over_http["error"]["code"], step.want_code, "{what}");
        }
        let over_nats = via_nats(&agents, step).await;
        if step.want_status == 401 {
            assert!(
                over_nats.is_none(),
                "{what}: the door answered an unauthenticated caller: {over_nats:?}"
            );
            refused_unauthenticated.push(step.want_code);
            continue;
        }
        let (status, over_nats) = over_nats.unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(status, step.want_status, "{what}: {over_nats}");
        assert_eq!(comparable(over_nats), comparable(over_http), "{what}");
    }

    for stream in VERIFIED {
        let (h, n) = (
            stored_messages(&http_app.js, stream).await,
            stored_messages(&door_app.js, stream).await,
        );
        assert!(!h.is_empty(), "{stream} holds the admitted messages");
        assert_eq!(n, h, "{stream} differs between the doors");
    }

    // Every refusal over NATS is on record with its code, in the order sent.
    let refused: Vec<&Step> = table.iter().filter(|s| s.want_status != 200).collect();
    let records = eventually(Duration::from_secs(5), "every refusal recorded", || async {
        let records = rejections(&door_app.js).await;
        (records.len() == refused.len()).then_some(records)
    })
    .await;
    for (step, record) in refused.iter().zip(&records) {
        assert_eq!(record.headers["Acc-Rejected-Code"], step.want_code);
        assert_eq!(
            record.headers["Acc-Rejected-Status"],
            step.want_status.to_string()
        );
        assert_eq!(record.subject, format!("acc.rejected.{}", step.want_code));
        // The intake keeps no body of a message whose token did not verify.
        let kept = if step.want_status == 401 {
            &b""[..]
        } else {
            step.body.as_bytes()
        };
        assert_eq!(record.payload, kept);
    }
    assert_eq!(
        refused_unauthenticated,
        ["MISSING_TOKEN", "INVALID_TOKEN", "TOKEN_EXPIRED"]
    );
}

#[tokio::test]
async fn refused_messages_reach_no_verified_subject_and_are_recorded_with_reason_and_caller() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let agent = NatsAgent::connect(&nats.url(), "agent-1").await;
    let forged = Tok::Forged.value().unwrap();
    let cases: Vec<(&str, Option<String>, Value, &str)> = vec![
        (
            "acc.in.register",
            Some(forged.clone()),
            registration("agent-1"),
            "INVALID_TOKEN",
        ),
        (
            "acc.in.event",
            None,
            event("agent-1", "evt-1"),
            "MISSING_TOKEN",
        ),
        (
            "acc.in.register",
            Some(token("agent-1")),
            json!({"agent_id": "agent-1"}),
            "INVALID_PAYLOAD",
        ),
        (
            "acc.in.event",
            Some(token("agent-1")),
            event("agent-2", "evt-2"),
            "IDENTITY_MISMATCH",
        ),
        (
            "acc.in.heartbeat",
            Some(token("agent-1")),
            json!({"agent_id": "agent-1"}),
            "AGENT_NOT_FOUND",
        ),
    ];
    let mut sent = Vec::new();
    for (subject, token, body, _) in &cases {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert("Authorization", format!("Bearer {token}").as_str());
        }
        // A token that does not verify is refused by the intake: never stored in ACC_INBOUND.
        let ack = agent
            .publish(subject, headers, serde_json::to_vec(body).unwrap())
            .await;
        sent.push(ack.ok().map(|ack| ack.sequence));
    }
    assert!(sent[0].is_none() && sent[1].is_none(), "{sent:?}");
    let records = eventually(Duration::from_secs(10), "five rejections", || async {
        let records = rejections(&app.js).await;
        (records.len() == cases.len()).then_some(records)
    })
    .await;
    // The door serves callers in turn, so records of different callers come in any order; each
    // case has a code of its own.
    let record_of = |code: &str| {
        records
            .iter()
            .find(|r| r.headers["Acc-Rejected-Code"] == code)
            .unwrap_or_else(|| panic!("no {code} record"))
    };
    for ((subject, _, body, code), seq) in cases.iter().zip(&sent) {
        let record = record_of(code);
        assert_eq!(record.headers["Acc-Rejected-Subject"], *subject);
        assert_eq!(
            record.headers.get("Acc-Rejected-Sequence"),
            seq.map(|s| s.to_string()).as_ref()
        );
        assert!(!record.headers["Acc-Rejected-Reason"].is_empty());
        // The intake records an unauthenticated message without its body.
        let kept = match seq {
            Some(_) => serde_json::to_vec(body).unwrap(),
            None => Vec::new(),
        };
        assert_eq!(record.payload, kept, "{code}");
        assert!(
            !record.headers.contains_key("Authorization"),
            "a rejection record never keeps the token"
        );
        // The caller is named only when the token proved who it is.
        match *code {
            "INVALID_TOKEN" | "MISSING_TOKEN" => {
                assert!(!record.headers.contains_key("Acc-Rejected-Caller"))
            }
            _ => assert_eq!(record.headers["Acc-Rejected-Caller"], "agent-1"),
        }
    }
    let forged = record_of("INVALID_TOKEN");
    assert!(
        forged.headers["Acc-Rejected-Reason"].contains("invalid signature"),
        "{:?}",
        forged.headers
    );
    for stream in VERIFIED {
        assert_eq!(count_stored(&app.js, stream).await, 0, "{stream}");
    }
    // Counted, and visible to operators on /health.
    let (_, health) = app.get("/health", None).await;
    for (_, _, _, code) in &cases {
        assert_eq!(health["door"]["rejected"][*code], 1, "{health}");
    }
    assert_eq!(health["door"]["admitted"], 0, "{health}");
}

#[tokio::test]
async fn the_door_answers_only_inside_the_callers_own_reply_namespace() {
    use futures::StreamExt as _;
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let observer = nats.client().await;
    let mut b_inbox = observer.subscribe("acc.reply.agent-b.>").await.unwrap();
    observer.flush().await.unwrap();

    let a = NatsAgent::connect(&nats.url(), "agent-a").await;
    let mut headers = HeaderMap::new();
    headers.insert(
        "Authorization",
        format!("Bearer {}", token("agent-a")).as_str(),
    );
    headers.insert("Acc-Reply-To", "acc.reply.agent-b.stolen");
    a.send(
        "acc.in.event",
        headers,
        serde_json::to_vec(&event("agent-a", "evt-1")).unwrap(),
    )
    .await;
    let records = eventually(Duration::from_secs(5), "the rejection", || async {
        let records = rejections(&app.js).await;
        (!records.is_empty()).then_some(records)
    })
    .await;
    assert_eq!(records[0].headers["Acc-Rejected-Code"], "INVALID_REPLY_TO");
    assert_eq!(records[0].headers["Acc-Rejected-Caller"], "agent-a");
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 0);
    let leaked = tokio::time::timeout(Duration::from_millis(500), b_inbox.next()).await;
    assert!(
        leaked.is_err(),
        "the door published into agent-b's namespace"
    );

    // Inside its own namespace, the same message is admitted and answered.
    let (status, answer) = a.call("acc.in.event", &event("agent-a", "evt-1")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["event_id"], "evt-1");
}

#[tokio::test]
async fn a_caller_that_keeps_sending_rejected_messages_is_rate_limited() {
    let nats = NatsServer::start();
    let app = TestApp::start(settings(
        Some(&nats.url()),
        &["--door-reject-burst=3", "--door-reject-interval=1h"],
    ))
    .await;
    let noisy = NatsAgent::connect(&nats.url(), "noisy").await;
    for _ in 0..3 {
        let (status, answer) = noisy.call("acc.in.register", &json!({})).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "INVALID_PAYLOAD");
    }
    // The budget is spent: even a valid message is refused, and not stored.
    let (status, answer) = noisy.call("acc.in.event", &event("noisy", "evt-1")).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["code"], "RATE_LIMITED");
    assert_eq!(answer["success"], false);
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 0);
    let records = rejections(&app.js).await;
    let last = records.last().unwrap();
    assert_eq!(last.subject, "acc.rejected.RATE_LIMITED");
    assert_eq!(last.headers["Acc-Rejected-Caller"], "noisy");
    let (_, health) = app.get("/health", None).await;
    assert_eq!(health["door"]["rejected"]["RATE_LIMITED"], 1, "{health}");

    // Another caller has its own budget.
    let quiet = NatsAgent::connect(&nats.url(), "quiet").await;
    let (status, answer) = quiet.call("acc.in.event", &event("quiet", "evt-1")).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn the_same_event_through_both_doors_is_stored_once() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let agent = NatsAgent::connect(&nats.url(), "agent-1").await;
    let (status, over_http) = app
        .post(
            "/orchestrator/events",
            Some(&token("agent-1")),
            &event("agent-1", "evt-x"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{over_http}");
    let (status, over_nats) = agent.call("acc.in.event", &event("agent-1", "evt-x")).await;
    assert_eq!(status, 200, "{over_nats}");
    assert_eq!(over_nats["duplicate"], true);
    assert_eq!(over_nats["seq"], over_http["seq"]);

    // The other way round, with a registration.
    let (status, first) = agent
        .call("acc.in.register", &registration("agent-1"))
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["duplicate"], false);
    let second = app.register("agent-1").await;
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["seq"], first["seq"]);

    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 1);
    let registrations = all_stored(&app.js, "ACC_AGENTS", "acc.agents.registered.>").await;
    assert_eq!(registrations.len(), 1);
}

#[tokio::test]
async fn the_door_stopped_mid_stream_and_restarted_admits_every_message_exactly_once() {
    let nats = NatsServer::start();
    let flags = ["--roles=door"];
    let app = TestApp::spawn_with(&nats, &flags).await;
    let agent = NatsAgent::connect(&nats.url(), "agent-1").await;
    let mut headers = HeaderMap::new();
    headers.insert(
        "Authorization",
        format!("Bearer {}", token("agent-1")).as_str(),
    );
    agent
        .send(
            "acc.in.register",
            headers.clone(),
            serde_json::to_vec(&registration("agent-1")).unwrap(),
        )
        .await;

    // A burst the door is still working through when it is stopped…
    const BEFORE: usize = 300;
    const WHILE_STOPPED: usize = 50;
    let send_batch = |range: std::ops::Range<usize>| {
        let (agent, headers) = (&agent, headers.clone());
        async move {
            let mut acks = Vec::new();
            for i in range {
                let (subject, body) = if i % 3 == 0 {
                    ("acc.in.heartbeat", json!({"agent_id": "agent-1"}))
                } else {
                    ("acc.in.event", event("agent-1", &format!("evt-{i}")))
                };
                let ack = agent
                    .js
                    .publish_with_headers(
                        subject,
                        headers.clone(),
                        serde_json::to_vec(&body).unwrap().into(),
                    )
                    .await
                    .unwrap();
                acks.push(ack);
            }
            for ack in acks {
                ack.await.expect("captured by ACC_INBOUND");
            }
        }
    };
    send_batch(0..BEFORE).await;
    eventually(Duration::from_secs(10), "the door at work", || async {
        (count_stored(&app.js, "ACC_EVENTS").await > 0).then_some(())
    })
    .await;
    app.stop().await;
    let js = async_nats::jetstream::new(nats.client().await);
    let admitted_before_restart = count_stored(&js, "ACC_EVENTS").await;

    // …a publish while no door runs is refused "no responders" (not lost silently), so the
    // agent sends those again once a door is back…
    let refused = agent
        .js
        .publish_with_headers("acc.in.event", headers.clone(), "{}".into())
        .await
        .unwrap()
        .await
        .expect_err("no intake runs");
    assert_eq!(
        refused.kind(),
        async_nats::jetstream::context::PublishErrorKind::StreamNotFound
    );

    // …and a new door finishes the lot.
    let app = TestApp::spawn_with(&nats, &flags).await;
    for i in BEFORE..BEFORE + WHILE_STOPPED {
        let (subject, body) = if i % 3 == 0 {
            ("acc.in.heartbeat", json!({"agent_id": "agent-1"}))
        } else {
            ("acc.in.event", event("agent-1", &format!("evt-{i}")))
        };
        // Retried while the new door's intake is not yet subscribed.
        agent
            .send(subject, headers.clone(), serde_json::to_vec(&body).unwrap())
            .await;
    }
    let total = BEFORE + WHILE_STOPPED;
    let events_sent = (0..total).filter(|i| i % 3 != 0).count() as u64;
    let heartbeats_sent = (0..total).filter(|i| i % 3 == 0).count();
    eventually(Duration::from_secs(30), "every event admitted", || async {
        (count_stored(&app.js, "ACC_EVENTS").await >= events_sent).then_some(())
    })
    .await;
    let heartbeats = eventually(Duration::from_secs(30), "every heartbeat", || async {
        let stored = all_stored(&app.js, "ACC_AGENTS", "acc.agents.heartbeat.>").await;
        (stored.len() >= heartbeats_sent).then_some(stored)
    })
    .await;
    // Let any straggler land before counting exactly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        admitted_before_restart < events_sent,
        "the stop came mid-stream ({admitted_before_restart} of {events_sent} admitted)"
    );
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, events_sent);
    let events = all_stored(&app.js, "ACC_EVENTS", "acc.events.>").await;
    let ids: std::collections::BTreeSet<String> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len() as u64, events_sent, "no event stored twice");
    let heartbeats_now = all_stored(&app.js, "ACC_AGENTS", "acc.agents.heartbeat.>").await;
    assert_eq!(heartbeats_now.len(), heartbeats.len());
    assert_eq!(heartbeats_now.len(), heartbeats_sent, "no heartbeat twice");
    assert!(rejections(&app.js).await.is_empty());
}

#[tokio::test]
async fn an_agent_user_cannot_publish_on_a_verified_subject_or_read_another_agents_replies() {
    use futures::StreamExt as _;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let app = TestApp::start(embedded_with_agents(&data, port)).await;
    let (a, a_errors) = connect_agent(&data, port, "agent-a").await;
    let (b, _) = connect_agent(&data, port, "agent-b").await;

    // Through the door, agent-a's calls work and are answered.
    let (status, answer) = a.call("acc.in.register", &registration("agent-a")).await;
    assert_eq!(status, 200, "{answer}");

    // Straight onto a verified subject: refused by the server, nothing stored.
    let forged = serde_json::to_vec(&event("agent-a", "evt-forged")).unwrap();
    let attempt =
        a.js.publish("acc.events.agent-a", forged.clone().into())
            .await
            .unwrap();
    let stored = tokio::time::timeout(Duration::from_secs(2), attempt).await;
    assert!(
        !matches!(stored, Ok(Ok(_))),
        "JetStream acknowledged a forged verified message"
    );
    a.client
        .publish("acc.agents.registered.agent-b", forged.into())
        .await
        .unwrap();
    a.client.flush().await.unwrap();
    eventually(Duration::from_secs(5), "a publish violation", || async {
        a_errors
            .any("permissions violation for publish")
            .then_some(())
    })
    .await;
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 0);
    let registrations = all_stored(&app.js, "ACC_AGENTS", "acc.agents.registered.>").await;
    assert_eq!(registrations.len(), 1, "only agent-a's own, via the door");

    // Eavesdropping on agent-b's replies: refused, and nothing arrives.
    let mut spy = a.client.subscribe("acc.reply.agent-b.>").await.unwrap();
    a.client.flush().await.unwrap();
    eventually(Duration::from_secs(5), "a subscribe violation", || async {
        a_errors
            .any("permissions violation for subscription")
            .then_some(())
    })
    .await;
    let (status, answer) = b.call("acc.in.register", &registration("agent-b")).await;
    assert_eq!(status, 200, "{answer}");
    let leaked = tokio::time::timeout(Duration::from_millis(500), spy.next()).await;
    assert!(
        !matches!(leaked, Ok(Some(_))),
        "agent-a read agent-b's answer"
    );
    app.stop().await;
}

#[tokio::test]
async fn agent_passwords_survive_a_restart_of_the_embedded_server() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let app = TestApp::start(embedded_with_agents(&data, port)).await;
    let file = data.path().join("nats-agents/agent-a.password");
    let before = std::fs::read_to_string(&file).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    app.stop().await;
    let app = TestApp::start(embedded_with_agents(&data, port)).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
    let (a, _) = connect_agent(&data, port, "agent-a").await;
    let (status, _) = a.call("acc.in.register", &registration("agent-a")).await;
    assert_eq!(status, 200);
    let config = std::fs::read_to_string(data.path().join("nats-server.conf")).unwrap();
    let users: BTreeMap<&str, bool> = ["acc-bridge", "agent-a", "agent-b"]
        .into_iter()
        .map(|u| (u, config.contains(&format!("user: \"{u}\""))))
        .collect();
    assert!(users.values().all(|present| *present), "{users:?}");
    app.stop().await;
}

/// Issue 13, items 3 and 9: `ACC_INBOUND`'s dedupe window was shared by all agents, so agent-a
/// could send agent-b's `Nats-Msg-Id` first and agent-b's real event was dropped as a duplicate,
/// never answered and never stored (until the fix, within 100 ms: the server's shortest window).
/// The door's intake now stores every message with its id scoped to the authenticated agent, so
/// agent-a's squat, published first and immediately, takes nothing from agent-b.
#[tokio::test]
async fn one_agent_cannot_preempt_another_agents_nats_msg_id() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let a = NatsAgent::connect(&nats.url(), "agent-a").await;
    let b = NatsAgent::connect(&nats.url(), "agent-b").await;
    let started = std::time::Instant::now();
    let (squat, _) = acked_with_msg_id(&a, "acc.in.event", &event("agent-a", "evt-a"), "b-1").await;
    let squat = squat.expect("agent-a's publish is stored");
    let (real, answer) =
        acked_with_msg_id(&b, "acc.in.event", &event("agent-b", "evt-b"), "b-1").await;
    let gap = started.elapsed();
    let real = real.expect("agent-b's publish is stored");
    println!("agent-b published its id {gap:?} after agent-a squatted it");
    assert!(
        !real.duplicate,
        "agent-b's publish was taken as agent-a's duplicate"
    );
    assert_ne!(real.sequence, squat.sequence);
    let (status, answer) = answer.expect("agent-b's event is answered, not dropped");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["duplicate"], false, "{answer}");
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 2);
    // ACC_INBOUND deduped on ids scoped to each agent; neither agent's id reached it as sent.
    let window = stream_config(&app.js, "ACC_INBOUND").await.duplicate_window;
    assert_eq!(
        window,
        Duration::from_secs(120),
        "the normal window, per agent"
    );

    // An agent's own retry with the same id, past the old 100 ms, is one message: JetStream says
    // `duplicate` (the answer went to the first publish's reply subject) and nothing is stored.
    app.register("agent-a").await;
    let beat = json!({"agent_id": "agent-a"});
    let (first, answer) = acked_with_msg_id(&a, "acc.in.heartbeat", &beat, "a-hb-1").await;
    let first = first.unwrap();
    assert_eq!(answer.unwrap().0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = count_stored(&app.js, "ACC_AGENTS").await;
    let (retry, _) = acked_with_msg_id(&a, "acc.in.heartbeat", &beat, "a-hb-1").await;
    let retry = retry.unwrap();
    assert!(!first.duplicate);
    assert!(retry.duplicate, "{retry:?}");
    assert_eq!(retry.sequence, first.sequence);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count_stored(&app.js, "ACC_AGENTS").await, stored);
}

/// Publishes `body` on `subject` as `agent`, with its own token, `Acc-Reply-To` and
/// `Nats-Msg-Id: msg_id`: the PubAck, and the door's answer when one came within 5 s.
async fn acked_with_msg_id(
    agent: &NatsAgent,
    subject: &str,
    body: &Value,
    msg_id: &str,
) -> (
    Result<
        async_nats::jetstream::publish::PublishAck,
        async_nats::jetstream::context::PublishError,
    >,
    Option<DoorAnswer>,
) {
    agent
        .call_acked(
            subject,
            Some(&token(&agent.agent)),
            serde_json::to_vec(body).unwrap(),
            &[("Nats-Msg-Id", msg_id)],
            Duration::from_secs(5),
        )
        .await
}

async fn stream_config(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> async_nats::jetstream::stream::Config {
    let mut stream = js.get_stream(name).await.unwrap();
    stream.info().await.unwrap().config.clone()
}

/// The intake refuses a message whose token does not verify before anything stores it: the
/// publisher gets an error naming the code, `ACC_INBOUND` never holds it, and the refusal is
/// counted and recorded without the body.
#[tokio::test]
async fn an_unauthenticated_publish_never_reaches_acc_inbound() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let attacker = NatsAgent::connect(&nats.url(), "agent-1").await;
    let body = serde_json::to_vec(&event("agent-1", "evt-1")).unwrap();
    for (token, code) in [
        (Tok::Missing, "MISSING_TOKEN"),
        (Tok::Forged, "INVALID_TOKEN"),
        (Tok::Expired, "TOKEN_EXPIRED"),
    ] {
        let mut headers = HeaderMap::new();
        if let Some(token) = token.value() {
            headers.insert("Authorization", format!("Bearer {token}").as_str());
        }
        headers.insert("Nats-Msg-Id", "squat-1");
        let refused = attacker
            .publish("acc.in.event", headers, body.clone())
            .await
            .expect_err("an unauthenticated publish is refused");
        assert!(refused.to_string().contains(code), "{code}: {refused}");
    }
    let inbound = app
        .js
        .get_stream("ACC_INBOUND")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone();
    assert_eq!(inbound.last_sequence, 0, "ACC_INBOUND never stored one");
    let records = rejections(&app.js).await;
    let codes: Vec<&str> = records
        .iter()
        .map(|r| r.headers["Acc-Rejected-Code"].as_str())
        .collect();
    assert_eq!(codes, ["MISSING_TOKEN", "INVALID_TOKEN", "TOKEN_EXPIRED"]);
    for record in &records {
        assert!(record.payload.is_empty(), "{record:?}");
        assert!(!record.headers.contains_key("Acc-Rejected-Sequence"));
    }
    let (_, health) = app.get("/health", None).await;
    assert_eq!(health["door"]["rejected"]["MISSING_TOKEN"], 1, "{health}");
    // A valid agent's publish with the id the attacker tried is not a duplicate of anything.
    let (ack, answer) = acked_with_msg_id(
        &attacker,
        "acc.in.event",
        &event("agent-1", "evt-1"),
        "squat-1",
    )
    .await;
    assert!(!ack.unwrap().duplicate);
    assert_eq!(answer.unwrap().0, 200);
}

/// With no door running, nothing captures a publish: the agent gets "no responders" at once,
/// as from any request/reply service that is down, and retries.
#[tokio::test]
async fn with_no_door_running_a_publish_gets_no_responders() {
    let nats = NatsServer::start();
    let _app = TestApp::spawn_with(&nats, &["--roles=ingress"]).await;
    let agent = NatsAgent::connect(&nats.url(), "agent-1").await;
    let mut headers = HeaderMap::new();
    headers.insert(
        "Authorization",
        format!("Bearer {}", token("agent-1")).as_str(),
    );
    let started = std::time::Instant::now();
    let refused = agent
        .js
        .publish_with_headers("acc.in.event", headers, "{}".into())
        .await
        .unwrap()
        .await
        .expect_err("nobody stores it");
    assert_eq!(
        refused.kind(),
        async_nats::jetstream::context::PublishErrorKind::StreamNotFound,
        "{refused}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// Issue 13, item 8: the NATS door had no rate limit for valid messages, so one agent could have
/// thousands of events admitted in a burst. Valid messages now count against the same per-agent
/// bucket as HTTP requests; past it they are refused `RATE_LIMITED` and recorded.
#[tokio::test]
async fn valid_messages_on_the_nats_door_count_against_the_agents_rate() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &["--rate-limit-per-agent=1", "--rate-limit-burst=10"],
    )
    .await;
    let flooder = NatsAgent::connect(&nats.url(), "agent-a").await;
    let sent = 100;
    for i in 0..sent {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Authorization",
            format!("Bearer {}", token("agent-a")).as_str(),
        );
        let body = serde_json::to_vec(&event("agent-a", &format!("flood-{i}"))).unwrap();
        flooder.send("acc.in.event", headers, body).await;
    }
    let (stored, limited) =
        eventually(Duration::from_secs(30), "every message handled", || async {
            let stored = count_stored(&app.js, "ACC_EVENTS").await;
            let limited = rejections(&app.js)
                .await
                .iter()
                .filter(|r| {
                    r.headers.get("Acc-Rejected-Code").map(String::as_str) == Some("RATE_LIMITED")
                })
                .count() as u64;
            (stored + limited == sent).then_some((stored, limited))
        })
        .await;
    println!("NATS door flood: {sent} valid events, {stored} admitted, {limited} refused 429");
    assert!(
        stored <= 20,
        "{stored} of {sent} admitted past a burst of 10 at 1/s"
    );
    // Another agent is not limited by the flooder's bucket.
    let other = NatsAgent::connect(&nats.url(), "agent-b").await;
    let (status, answer) = other
        .call("acc.in.event", &event("agent-b", "calm-1"))
        .await;
    assert_eq!(status, 200, "{answer}");
}

/// Issue 13, residual of row 13: the intake stored each message from a task of its own, so
/// publishes an agent sent without waiting for each PubAck could be stored in another order.
/// Two agents now pipeline 500 events each at the same moment: every agent's PubAcks rise in
/// the order it sent, and so do its events as the door admitted them into `ACC_EVENTS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_pipelined_publishes_are_stored_in_the_order_it_sent_them() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &["--rate-limit-per-agent=100000", "--rate-limit-burst=100000"],
    )
    .await;
    let sent = 500;
    let mut senders = Vec::new();
    for name in ["agent-a", "agent-b"] {
        let agent = NatsAgent::connect(&nats.url(), name).await;
        // Once this is answered, the intake is subscribed.
        let (status, answer) = agent
            .call("acc.in.event", &event(name, &format!("{name}-first")))
            .await;
        assert_eq!(status, 200, "{answer}");
        senders.push(tokio::spawn(async move {
            let mut headers = HeaderMap::new();
            headers.insert(
                "Authorization",
                format!("Bearer {}", token(&agent.agent)).as_str(),
            );
            let mut acks = Vec::with_capacity(sent);
            for i in 0..sent {
                let body = serde_json::to_vec(&event(&agent.agent, &format!("{name}-{i}")));
                let ack = agent
                    .js
                    .publish_with_headers("acc.in.event", headers.clone(), body.unwrap().into())
                    .await
                    .expect("sent");
                acks.push(ack);
            }
            let mut sequences = Vec::with_capacity(sent);
            for ack in acks {
                sequences.push(ack.await.expect("stored").sequence);
            }
            (name, sequences)
        }));
    }
    for sender in senders {
        let (name, sequences) = sender.await.unwrap();
        let out_of_order = sequences.windows(2).filter(|w| w[0] >= w[1]).count();
        println!("{name}: {out_of_order} of {sent} PubAcks below the one before");
        assert_eq!(
            out_of_order, 0,
            "{name}'s ACC_INBOUND sequences: {sequences:?}"
        );
    }

    let events = eventually(Duration::from_secs(30), "every event admitted", || async {
        let events = stored_event_ids(&app.js).await;
        (events.len() == 2 * (sent + 1)).then_some(events)
    })
    .await;
    for name in ["agent-a", "agent-b"] {
        let admitted: Vec<&str> = events
            .iter()
            .filter(|(source, id)| source == name && !id.ends_with("-first"))
            .map(|(_, id)| id.as_str())
            .collect();
        let expected: Vec<String> = (0..sent).map(|i| format!("{name}-{i}")).collect();
        assert_eq!(admitted, expected, "{name}'s events in ACC_EVENTS");
    }
    app.stop().await;
}

/// `(source, event_id)` of every event in `ACC_EVENTS`, in stream order.
async fn stored_event_ids(js: &async_nats::jetstream::Context) -> Vec<(String, String)> {
    let stream = js.get_stream("ACC_EVENTS").await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.unwrap();
        let event: Value = serde_json::from_slice(&message.payload).unwrap();
        let field = |name: &str| event[name].as_str().unwrap_or_default().to_owned();
        out.push((field("source"), field("event_id")));
    }
    out
}

/// The same with an opaque token whose introspection takes 300 ms: every message carrying it
/// waits for that one answer, then they are stored in the order the agent sent them (on the
/// code before, they all woke at once and were stored in any order). Meanwhile another agent's
/// JWT message is answered: a slow token holds up only the messages that carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_for_a_slow_introspection_are_stored_in_the_order_sent() {
    let introspection = slow_introspection_server("agent-o", Duration::from_millis(300)).await;
    let nats = NatsServer::start();
    let url = format!("--introspection-url=http://{introspection}/introspect");
    let app = TestApp::spawn_with(
        &nats,
        &[
            "--auth-mode=both",
            &url,
            "--introspection-client-id=auto-com-center",
            "--introspection-client-secret=not-a-secret",
            "--introspection-timeout=5s",
            "--rate-limit-per-agent=100000",
            "--rate-limit-burst=100000",
        ],
    )
    .await;
    let opaque = NatsAgent::connect(&nats.url(), "agent-o").await;
    let other = NatsAgent::connect(&nats.url(), "agent-b").await;
    // The intake is subscribed once a JWT message is answered.
    let (status, answer) = other
        .call("acc.in.event", &event("agent-b", "b-first"))
        .await;
    assert_eq!(status, 200, "{answer}");

    let sent = 300;
    let mut headers = HeaderMap::new();
    headers.insert("Authorization", "Bearer opaque-token-of-agent-o");
    let started = std::time::Instant::now();
    let mut acks = Vec::with_capacity(sent);
    for i in 0..sent {
        let body = serde_json::to_vec(&event("agent-o", &format!("o-{i}"))).unwrap();
        let ack = opaque
            .js
            .publish_with_headers("acc.in.event", headers.clone(), body.into())
            .await
            .expect("sent");
        acks.push(ack);
    }
    let (status, answer) = other
        .call("acc.in.event", &event("agent-b", "b-meanwhile"))
        .await;
    let other_waited = started.elapsed();
    assert_eq!(status, 200, "{answer}");
    let mut sequences = Vec::with_capacity(sent);
    for ack in acks {
        sequences.push(ack.await.expect("stored").sequence);
    }
    let waited = started.elapsed();
    let out_of_order = sequences.windows(2).filter(|w| w[0] >= w[1]).count();
    println!(
        "opaque token: {out_of_order} of {sent} PubAcks below the one before, all stored after \
         {waited:?}; the JWT agent answered after {other_waited:?}"
    );
    assert!(
        waited >= Duration::from_millis(300),
        "the introspection was slow"
    );
    assert!(
        other_waited < Duration::from_millis(300),
        "the other agent waited for agent-o's token: {other_waited:?}"
    );
    assert_eq!(
        out_of_order, 0,
        "agent-o's ACC_INBOUND sequences: {sequences:?}"
    );
    app.stop().await;
}

/// An RFC 7662 endpoint that answers every token as `agent`'s (scope `orchestrator.events`)
/// after `delay`. Returns its address.
async fn slow_introspection_server(agent: &'static str, delay: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = move || async move {
        tokio::time::sleep(delay).await;
        axum::Json(json!({
            "active": true,
            "agent_id": agent,
            "scope": "orchestrator.events",
            "exp": now() + 600,
        }))
    };
    let router = axum::Router::new().route("/introspect", axum::routing::post(answer));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}
