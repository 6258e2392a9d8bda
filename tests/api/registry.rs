//! The agent registry: status transitions and their messages, stale sweeps, degraded heartbeats,
//! agents pre-registered by configuration, several ingress replicas on one bus, and a registry
//! worker restarted while it works through a backlog.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

const AGENTS_STREAM: &str = "ACC_AGENTS";
const AGENTS_BUCKET: &str = "acc_agents";

/// `GET /orchestrator/agents` with the admin token: the listed agents.
async fn listed(app: &TestApp) -> Vec<Value> {
    let (status, body) = app.get("/orchestrator/agents", Some(&admin_token())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["agents"]
        .as_array()
        .expect("agents is an array")
        .clone()
}

/// Waits until the list shows `agent` with `status`, and returns its entry.
async fn wait_for_status(app: &TestApp, agent: &str, status: &str, within: Duration) -> Value {
    eventually(within, &format!("{agent} listed as {status}"), || async {
        listed(app)
            .await
            .into_iter()
            .find(|a| a["agent_id"] == agent && a["status"] == status)
    })
    .await
}

/// `POST /orchestrator/heartbeat` with the agent's own token and an optional `Idempotency-Key`.
async fn heartbeat(
    app: &TestApp,
    agent: &str,
    body: &Value,
    idempotency_key: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = app
        .http
        .post(app.url("/orchestrator/heartbeat"))
        .bearer_auth(token(agent))
        .json(body);
    if let Some(key) = idempotency_key {
        request = request.header("Idempotency-Key", key);
    }
    read(request.send().await.unwrap()).await
}

/// The stored status transitions of `agent`, oldest first, as `(from, to, reason)`; each message
/// is validated against its schema on the way.
async fn transitions(app: &TestApp, agent: &str) -> Vec<(Value, String, String)> {
    all_stored(
        &app.js,
        AGENTS_STREAM,
        &format!("acc.agents.status.{agent}"),
    )
    .await
    .into_iter()
    .map(|change| {
        assert_eq!(change["agent_id"], agent, "{change}");
        (
            change["from"].clone(),
            change["to"].as_str().unwrap().to_owned(),
            change["reason"].as_str().unwrap().to_owned(),
        )
    })
    .collect()
}

fn transition(from: Value, to: &str, reason: &str) -> (Value, String, String) {
    (from, to.to_owned(), reason.to_owned())
}

fn count_of(all: &[(Value, String, String)], wanted: &(Value, String, String)) -> usize {
    all.iter().filter(|t| *t == wanted).count()
}

/// How many values the agents bucket holds, history included, read fresh from the server.
async fn records_written(app: &TestApp) -> u64 {
    let stream = app
        .js
        .get_stream(format!("KV_{AGENTS_BUCKET}"))
        .await
        .unwrap();
    stream.cached_info().state.messages
}

#[tokio::test]
async fn register_then_heartbeat_never_404s_across_two_ingress_replicas() {
    let nats = NatsServer::start();
    let a = TestApp::spawn_with(&nats, &["--roles=ingress,registry"]).await;
    let b = TestApp::spawn_with(&nats, &["--roles=ingress"]).await;
    let started = Instant::now();
    for i in 0..1_000 {
        let agent = format!("agent-{i}");
        let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let (status, body) = first
            .post(
                "/orchestrator/register",
                Some(&token(&agent)),
                &registration(&agent),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "iteration {i}: register: {body}");
        let (status, body) = heartbeat(second, &agent, &json!({"agent_id": agent}), None).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "iteration {i}: heartbeat right after registering through the other replica: {body}"
        );
    }
    eprintln!(
        "1,000 register + heartbeat pairs in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_stale_agent_goes_offline_in_the_list_and_as_a_message() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &["--agent-stale-after=1s", "--agent-sweep-interval=200ms"],
    )
    .await;
    let registered = app.register("agent-1").await;
    let (_, stored_registration) =
        stored(&app.js, AGENTS_STREAM, registered["seq"].as_u64().unwrap()).await;
    let registered_at = stored_registration["received_at"].clone();

    let offline = wait_for_status(&app, "agent-1", "offline", Duration::from_secs(10)).await;
    assert_eq!(offline["last_seen"], registered_at, "{offline}");
    // Several more sweeps pass over the offline agent; none may announce it again.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let changes = all_stored(&app.js, AGENTS_STREAM, "acc.agents.status.agent-1").await;
    let summary: Vec<_> = changes
        .iter()
        .map(|c| (c["from"].clone(), c["to"].clone(), c["reason"].clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (Value::Null, json!("online"), json!("registered")),
            (json!("online"), json!("offline"), json!("stale")),
        ],
        "{changes:?}"
    );
    // The offline decision rests on the last heartbeat (here the registration), not the sweep time.
    assert_eq!(changes[0]["at"], registered_at);
    assert_eq!(changes[1]["at"], registered_at);

    let (status, body) = heartbeat(&app, "agent-1", &json!({"agent_id": "agent-1"}), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let online = wait_for_status(&app, "agent-1", "online", Duration::from_secs(5)).await;
    assert_eq!(online["last_seen"], body["timestamp"], "{online}");

    // Read before the agent can go stale a second time (1 s after this heartbeat).
    let all = transitions(&app, "agent-1").await;
    assert_eq!(
        &all[..3],
        [
            transition(Value::Null, "online", "registered"),
            transition(json!("online"), "offline", "stale"),
            transition(json!("offline"), "online", "heartbeat"),
        ],
        "{all:?}"
    );
    assert_eq!(
        count_of(&all, &transition(json!("offline"), "online", "heartbeat")),
        1,
        "{all:?}"
    );
}

#[tokio::test]
async fn a_degraded_heartbeat_marks_the_agent_degraded() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-1").await;
    wait_for_status(&app, "agent-1", "online", Duration::from_secs(5)).await;

    let (status, body) = heartbeat(
        &app,
        "agent-1",
        &json!({"agent_id": "agent-1", "status": "degraded", "details": {"reason": "disk"}}),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (subject, stored_heartbeat) =
        stored(&app.js, AGENTS_STREAM, body["seq"].as_u64().unwrap()).await;
    assert_eq!(subject, "acc.agents.heartbeat.agent-1");
    assert_eq!(stored_heartbeat["status"], "degraded");
    assert_eq!(stored_heartbeat["details"], json!({"reason": "disk"}));

    let degraded = wait_for_status(&app, "agent-1", "degraded", Duration::from_secs(5)).await;
    assert_eq!(degraded["last_seen"], body["timestamp"], "{degraded}");
    let (_, health) = app.get("/health", None).await;
    assert_eq!(
        health["agents"],
        json!({"total": 1, "online": 0, "offline": 0, "degraded": 1}),
        "{health}"
    );

    // A key, so this heartbeat cannot be taken for a repeat within the same second.
    let (status, body) = heartbeat(
        &app,
        "agent-1",
        &json!({"agent_id": "agent-1"}),
        Some("back-to-normal"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["duplicate"], false, "{body}");
    wait_for_status(&app, "agent-1", "online", Duration::from_secs(5)).await;
    let (_, health) = app.get("/health", None).await;
    assert_eq!(
        health["agents"],
        json!({"total": 1, "online": 1, "offline": 0, "degraded": 0}),
        "{health}"
    );

    assert_eq!(
        transitions(&app, "agent-1").await,
        [
            transition(Value::Null, "online", "registered"),
            transition(json!("online"), "degraded", "heartbeat"),
            transition(json!("degraded"), "online", "heartbeat"),
        ]
    );
}

#[tokio::test]
async fn the_registry_worker_restarted_mid_stream_loses_and_duplicates_nothing() {
    const AGENTS: usize = 200;
    let nats = NatsServer::start();
    let ingress = TestApp::spawn_with(&nats, &["--roles=ingress"]).await;
    let agents: Vec<String> = (0..AGENTS).map(|i| format!("agent-{i:03}")).collect();
    for agent in &agents {
        ingress.register(agent).await;
    }
    let bucket = ingress.js.get_key_value(AGENTS_BUCKET).await.unwrap();
    assert_eq!(records_written(&ingress).await, 0, "no registry ran yet");

    let first = TestApp::spawn_with(&nats, &["--roles=registry"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let applied_by_first = loop {
        let values = records_written(&ingress).await;
        if values > 0 {
            break values;
        }
        assert!(
            Instant::now() < deadline,
            "the first registry applied nothing"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    first.stop().await;
    let after_stop = records_written(&ingress).await;
    eprintln!(
        "first registry: {applied_by_first} records when stop was asked, {after_stop} after it stopped"
    );
    assert!(
        after_stop < AGENTS as u64,
        "the first registry finished the whole backlog before it was stopped; nothing was restarted mid-stream"
    );

    let second = TestApp::spawn_with(&nats, &["--roles=registry"]).await;
    let started = Instant::now();
    eventually(
        Duration::from_secs(15),
        "every agent listed online after the registry restarted",
        || async {
            let list = listed(&ingress).await;
            (list.len() == AGENTS && list.iter().all(|a| a["status"] == "online")).then_some(())
        },
    )
    .await;
    eprintln!(
        "second registry finished the backlog {:?} after it started",
        started.elapsed()
    );

    // Exactly one transition per agent: null -> online, because it registered.
    let changes = all_stored(&ingress.js, AGENTS_STREAM, "acc.agents.status.*").await;
    let mut per_agent: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for change in &changes {
        per_agent
            .entry(change["agent_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(change);
    }
    for agent in &agents {
        let seen = per_agent.get(agent).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(seen.len(), 1, "{agent}: {seen:?}");
        assert_eq!(seen[0]["from"], Value::Null, "{agent}: {seen:?}");
        assert_eq!(seen[0]["to"], "online", "{agent}: {seen:?}");
        assert_eq!(seen[0]["reason"], "registered", "{agent}: {seen:?}");
    }
    assert_eq!(changes.len(), AGENTS, "no transitions for other agents");

    // Each record holds what was registered, stamped with the registration's receive time.
    let registrations: HashMap<String, Value> =
        all_stored(&ingress.js, AGENTS_STREAM, "acc.agents.registered.*")
            .await
            .into_iter()
            .map(|r| (r["agent_id"].as_str().unwrap().to_owned(), r))
            .collect();
    assert_eq!(registrations.len(), AGENTS);
    for agent in &agents {
        let entry = bucket
            .get(agent)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{agent} is not in the bucket"));
        let record: Value = serde_json::from_slice(&entry).unwrap();
        assert_valid("agent_record.json", &record);
        let sent = registration(agent);
        let received_at = &registrations[agent]["received_at"];
        assert_eq!(record["agent_id"], agent.as_str(), "{record}");
        assert_eq!(record["name"], sent["name"], "{record}");
        assert_eq!(record["base_url"], sent["base_url"], "{record}");
        assert_eq!(record["capabilities"], sent["capabilities"], "{record}");
        assert_eq!(record["status"], "online", "{record}");
        assert_eq!(&record["registered_at"], received_at, "{record}");
        assert_eq!(&record["last_seen"], received_at, "{record}");
        assert_eq!(&record["status_at"], received_at, "{record}");
    }

    nothing_dead_lettered(&ingress, "the restart").await;
    second.stop().await;
}

#[tokio::test]
async fn registered_agents_from_configuration_are_known_at_start() {
    const PILOT: &str = r#"--registered-agents={"pilot":{"name":"Pilot","base_url":"https://pilot.example","capabilities":["a"]}}"#;
    // A short duplicate window, so that a second pre-registration after a restart would be
    // stored rather than hidden by dedupe.
    let flags = [PILOT, "--duplicate-window=1s"];
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &flags).await;

    // No registration call: configuration alone makes the agent known.
    let (status, body) = heartbeat(&app, "pilot", &json!({"agent_id": "pilot"}), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pilot = wait_for_status(&app, "pilot", "online", Duration::from_secs(5)).await;
    assert_eq!(pilot["name"], "Pilot", "{pilot}");
    assert_eq!(pilot["base_url"], "https://pilot.example", "{pilot}");
    assert_eq!(pilot["capabilities_count"], 1, "{pilot}");
    assert_eq!(pilot["last_seen"], body["timestamp"], "{pilot}");

    let preregistrations = all_stored(&app.js, AGENTS_STREAM, "acc.agents.registered.pilot").await;
    assert_eq!(preregistrations.len(), 1, "{preregistrations:?}");
    assert_eq!(preregistrations[0]["origin"], "config");
    assert_eq!(preregistrations[0]["capabilities"], json!(["a"]));

    // Past the duplicate window, restart with the same configuration.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    app.stop().await;
    let app = TestApp::spawn_with(&nats, &flags).await;
    // Once a heartbeat sent after the restart is applied, the restarted registry is past its
    // pre-registration step (it pre-registers before it consumes).
    let (status, body) = heartbeat(&app, "pilot", &json!({"agent_id": "pilot"}), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let timestamp = body["timestamp"].clone();
    eventually(
        Duration::from_secs(5),
        "the heartbeat after the restart applied",
        || async {
            listed(&app)
                .await
                .into_iter()
                .find(|a| a["agent_id"] == "pilot" && a["last_seen"] == timestamp)
        },
    )
    .await;

    let preregistrations = all_stored(&app.js, AGENTS_STREAM, "acc.agents.registered.pilot").await;
    assert_eq!(
        preregistrations.len(),
        1,
        "the restart pre-registered pilot again: {preregistrations:?}"
    );
    assert_eq!(
        transitions(&app, "pilot").await,
        [
            transition(Value::Null, "offline", "pre-registered"),
            transition(json!("offline"), "online", "heartbeat"),
        ]
    );
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_with_its_reason_and_the_registry_keeps_going() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    // Valid on the wire, impossible for the worker: not a registration.
    let ack = app
        .js
        .publish(
            "acc.agents.registered.poison",
            "{\"not\": \"a registration\"}".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    app.register("after-poison").await;
    wait_for_status(&app, "after-poison", "online", Duration::from_secs(10)).await;

    let dead = eventually(Duration::from_secs(10), "a dead letter", || async {
        let mut stream = app.js.get_stream("ACC_DEAD_LETTER").await.unwrap();
        (stream.info().await.unwrap().state.messages == 1).then_some(stream)
    })
    .await;
    let message = dead.get_raw_message(1).await.unwrap();
    assert_eq!(
        message.subject.as_str(),
        "acc.dead_letter.ACC_AGENTS.registry"
    );
    let reason = message
        .headers
        .get("Acc-Dead-Letter-Reason")
        .unwrap()
        .as_str();
    assert!(reason.contains("unreadable payload"), "{reason}");
    assert_eq!(
        message
            .headers
            .get("Acc-Dead-Letter-Sequence")
            .unwrap()
            .as_str(),
        ack.sequence.to_string()
    );
    assert_eq!(&message.payload[..], b"{\"not\": \"a registration\"}");
}

/// Issue 13, item 2: the stale sweep used to give up at the first agent record it could not
/// decode, so every agent after it stayed `online` without heartbeats. Now the bad record is
/// skipped (counted, logged once) and the others still go offline.
#[tokio::test]
async fn one_unreadable_agent_record_does_not_stop_offline_detection_for_the_others() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &["--agent-stale-after=1s", "--agent-sweep-interval=200ms"],
    )
    .await;
    let kv = app.js.get_key_value(AGENTS_BUCKET).await.unwrap();
    // Stored first, so every sweep meets it before the real agent.
    kv.put("agent-0", "not an agent record".into())
        .await
        .unwrap();
    app.register("agent-1").await;
    let started = Instant::now();
    wait_for_status(&app, "agent-1", "offline", Duration::from_secs(10)).await;
    println!(
        "unreadable record: agent-1 offline {:?} after registering (stale after 1 s)",
        started.elapsed()
    );
    assert!(
        listed(&app)
            .await
            .iter()
            .all(|a| a["agent_id"] != "agent-0")
    );
}

/// Issue 13, item 4: two heartbeats within one second used to dedupe even when the second one
/// changed `details` (or status), so the change was dropped. Now only an identical repeat is a
/// duplicate.
#[tokio::test]
async fn a_heartbeat_whose_details_changed_within_the_second_is_not_a_duplicate() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-1").await;
    let mut answers = Vec::new();
    for details in [
        json!({"load": 0.1}),
        json!({"load": 0.9}),
        json!({"load": 0.9}),
    ] {
        let body = json!({"agent_id": "agent-1", "status": "degraded", "details": details});
        let (status, answer) = heartbeat(&app, "agent-1", &body, None).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answers.push(answer);
    }
    let same_second = answers[0]["timestamp"].as_str().unwrap()[..19]
        == answers[2]["timestamp"].as_str().unwrap()[..19];
    assert_eq!(answers[1]["duplicate"], false, "{answers:?}");
    assert_ne!(answers[1]["seq"], answers[0]["seq"]);
    if same_second {
        assert_eq!(
            answers[2]["duplicate"], true,
            "an identical repeat: {answers:?}"
        );
    }
    let stored = all_stored(&app.js, AGENTS_STREAM, "acc.agents.heartbeat.agent-1").await;
    assert!(
        stored.iter().any(|h| h["details"] == json!({"load": 0.9})),
        "{stored:?}"
    );
}

/// Writes to the agents bucket so far, history and deletes included: the bucket stream's last
/// sequence, read fresh from the server.
async fn bucket_writes(app: &TestApp) -> u64 {
    let mut stream = app
        .js
        .get_stream(format!("KV_{AGENTS_BUCKET}"))
        .await
        .unwrap();
    stream.info().await.unwrap().state.last_sequence
}

/// Waits until the registry consumer has settled every message delivered to it.
async fn registry_drained(app: &TestApp) {
    eventually(
        Duration::from_secs(10),
        "the registry consumer drained",
        || async {
            let mut consumer = app
                .js
                .get_stream(AGENTS_STREAM)
                .await
                .unwrap()
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>("registry")
                .await
                .unwrap();
            let info = consumer.info().await.unwrap();
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
        },
    )
    .await;
}

/// The agent's `last_seen` as listed, or `None` while it is not listed.
async fn listed_last_seen(app: &TestApp, agent: &str) -> Option<String> {
    listed(app)
        .await
        .into_iter()
        .find(|a| a["agent_id"] == agent)
        .map(|a| a["last_seen"].as_str().unwrap().to_owned())
}

/// Sends `agent`'s first heartbeat and waits until the list shows its `last_seen`.
async fn first_heartbeat_listed(app: &TestApp, agent: &str) {
    let (status, first) = heartbeat(app, agent, &json!({"agent_id": agent}), Some("hb-0")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    eventually(
        Duration::from_secs(5),
        "the first heartbeat applied",
        || async {
            (listed_last_seen(app, agent).await.as_deref() == first["timestamp"].as_str())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn many_heartbeats_of_one_agent_within_the_window_cost_one_registry_write() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--heartbeat-coalesce=3s"]).await;
    app.register("agent-1").await;
    wait_for_status(&app, "agent-1", "online", Duration::from_secs(5)).await;
    // The first heartbeat after the registration is written at the next tick and opens the window.
    first_heartbeat_listed(&app, "agent-1").await;
    let before = bucket_writes(&app).await;
    let window_opened = Instant::now();

    let mut last = Value::Null;
    for i in 1..=20 {
        let key = format!("hb-{i}");
        let (status, body) =
            heartbeat(&app, "agent-1", &json!({"agent_id": "agent-1"}), Some(&key)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["duplicate"], false, "{body}");
        last = body;
    }
    registry_drained(&app).await;
    let held_for = window_opened.elapsed();
    assert!(
        held_for < Duration::from_secs(2),
        "the heartbeats took {held_for:?}, too long to be all within the 3 s window"
    );
    assert_eq!(
        bucket_writes(&app).await,
        before,
        "20 heartbeats within the window, all acknowledged, none written yet"
    );

    eventually(
        Duration::from_secs(6),
        "the newest heartbeat written",
        || async {
            (listed_last_seen(&app, "agent-1").await.as_deref() == last["timestamp"].as_str())
                .then_some(())
        },
    )
    .await;
    assert!(
        window_opened.elapsed() < Duration::from_secs(3) + Duration::from_millis(500),
        "the held heartbeat was written {:?} after the window opened",
        window_opened.elapsed()
    );
    assert_eq!(
        bucket_writes(&app).await,
        before + 1,
        "the 20 heartbeats cost one write"
    );
}

#[tokio::test]
async fn a_status_change_within_the_window_is_written_at_once() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--heartbeat-coalesce=10s"]).await;
    app.register("agent-1").await;
    wait_for_status(&app, "agent-1", "online", Duration::from_secs(5)).await;
    let (status, body) = heartbeat(
        &app,
        "agent-1",
        &json!({"agent_id": "agent-1"}),
        Some("hb-0"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    registry_drained(&app).await;

    let sent = Instant::now();
    let (status, body) = heartbeat(
        &app,
        "agent-1",
        &json!({"agent_id": "agent-1", "status": "degraded"}),
        Some("hb-1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let degraded = wait_for_status(&app, "agent-1", "degraded", Duration::from_secs(5)).await;
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "the change waited {:?} (the window is 10 s)",
        sent.elapsed()
    );
    assert_eq!(degraded["last_seen"], body["timestamp"], "{degraded}");
    assert_eq!(
        transitions(&app, "agent-1").await,
        [
            transition(Value::Null, "online", "registered"),
            transition(json!("online"), "degraded", "heartbeat"),
        ]
    );
}

#[tokio::test]
async fn last_seen_in_the_list_never_trails_the_newest_heartbeat_by_more_than_the_window() {
    const WINDOW: Duration = Duration::from_millis(500);
    // The KV write, the watch that carries it to the list, and the list request itself.
    const SLACK: Duration = Duration::from_millis(700);
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--heartbeat-coalesce=500ms"]).await;
    app.register("agent-1").await;
    wait_for_status(&app, "agent-1", "online", Duration::from_secs(5)).await;

    let time = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap();
    // (when answered, timestamp) of every heartbeat, newest last.
    let mut answered: Vec<(Instant, String)> = Vec::new();
    let mut checks = 0;
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(3) {
        i += 1;
        let key = format!("hb-{i}");
        let (status, body) =
            heartbeat(&app, "agent-1", &json!({"agent_id": "agent-1"}), Some(&key)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        answered.push((
            Instant::now(),
            body["timestamp"].as_str().unwrap().to_owned(),
        ));
        let asked = Instant::now();
        let seen = listed_last_seen(&app, "agent-1").await.unwrap();
        // Every heartbeat answered a window and the slack before the list was asked is in it.
        if let Some((_, due)) = answered
            .iter()
            .rev()
            .find(|(at, _)| *at + WINDOW + SLACK <= asked)
        {
            checks += 1;
            assert!(
                time(&seen) >= time(due),
                "listed last_seen {seen} is older than {due}, answered more than {:?} before",
                WINDOW + SLACK
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        checks > 10,
        "only {checks} checks: the heartbeats were too slow"
    );
    // After the last heartbeat, its own last_seen shows within the window.
    let (_, newest) = answered.last().unwrap().clone();
    let stopped = Instant::now();
    eventually(WINDOW + SLACK, "the newest heartbeat listed", || async {
        (listed_last_seen(&app, "agent-1").await.as_deref() == Some(newest.as_str())).then_some(())
    })
    .await;
    eprintln!(
        "{i} heartbeats, {checks} checks; the newest listed {:?} after the last answer",
        stopped.elapsed()
    );
}

/// The agent's record as stored in the bucket, and its revision.
async fn stored_record(app: &TestApp, agent: &str) -> (Value, u64) {
    let kv = app.js.get_key_value(AGENTS_BUCKET).await.unwrap();
    let entry = kv.entry(agent).await.unwrap().expect("the agent is stored");
    (
        serde_json::from_slice(&entry.value).unwrap(),
        entry.revision,
    )
}

/// A registration's status change is announced, then its `pending` mark is cleared by the
/// flusher's next tick (a second with this window) rather than by a write of its own. A registry
/// stopped before that tick writes the clears as it goes; the next one finds nothing to finish
/// and announces nothing twice.
#[tokio::test]
async fn announced_registrations_are_cleared_by_the_flusher_even_when_the_registry_stops_first() {
    let nats = NatsServer::start();
    let ingress = TestApp::spawn_with(&nats, &["--roles=ingress"]).await;
    let registry =
        TestApp::spawn_with(&nats, &["--roles=registry", "--heartbeat-coalesce=8s"]).await;
    let agents: Vec<String> = (0..10).map(|i| format!("clear-{i}")).collect();
    futures::future::join_all(agents.iter().map(|agent| ingress.register(agent))).await;
    registry_drained(&ingress).await;
    registry.stop().await;
    for agent in &agents {
        let (record, _) = stored_record(&ingress, agent).await;
        assert!(
            record.get("pending").is_none(),
            "{agent} left marked: {record}"
        );
        assert_eq!(record["status"], "online", "{record}");
    }
    let registry =
        TestApp::spawn_with(&nats, &["--roles=registry", "--heartbeat-coalesce=8s"]).await;
    for agent in &agents {
        let (status, body) = heartbeat(
            &ingress,
            agent,
            &json!({"agent_id": agent, "status": "online"}),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    registry_drained(&ingress).await;
    for agent in &agents {
        let changes = transitions(&ingress, agent).await;
        assert_eq!(
            changes,
            [transition(Value::Null, "online", "registered")],
            "{agent}: announced once"
        );
    }
    registry.stop().await;
}

/// The same clears while the registry runs: written at the flusher's next tick (a 1 s tick at
/// an 8 s window), not at the end of the window or at stop. Each agent's record is unmarked
/// within 3 s of its registration's announcement, and its change announced once.
#[tokio::test]
async fn announced_registrations_are_cleared_at_the_flushers_next_tick() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--heartbeat-coalesce=8s"]).await;
    let agents: Vec<String> = (0..10).map(|i| format!("tick-{i}")).collect();
    futures::future::join_all(agents.iter().map(|agent| app.register(agent))).await;
    registry_drained(&app).await;
    eventually(
        Duration::from_secs(3),
        "every announced registration cleared",
        || async {
            for agent in &agents {
                let (record, _) = stored_record(&app, agent).await;
                if record.get("pending").is_some() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    for agent in &agents {
        let changes = transitions(&app, agent).await;
        assert_eq!(
            changes,
            [transition(Value::Null, "online", "registered")],
            "{agent}: announced once"
        );
    }
    app.stop().await;
}

/// Issue 18, item 3: the registry writes a held heartbeat against the revision it wrote last,
/// with no read. When another replica wrote the record meanwhile, that write must not be lost:
/// the compare-and-set fails and the heartbeat is applied to the record read afresh.
#[tokio::test]
async fn a_record_written_by_another_replica_meanwhile_is_read_again_not_overwritten() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--heartbeat-coalesce=300ms"]).await;
    app.register("agent-1").await;
    first_heartbeat_listed(&app, "agent-1").await;
    registry_drained(&app).await;

    // Another writer (a second replica applying a re-registration) changes the record.
    let (mut record, revision) = stored_record(&app, "agent-1").await;
    record["name"] = json!("renamed elsewhere");
    let kv = app.js.get_key_value(AGENTS_BUCKET).await.unwrap();
    kv.update(
        "agent-1",
        serde_json::to_vec(&record).unwrap().into(),
        revision,
    )
    .await
    .unwrap();

    let (status, second) = heartbeat(
        &app,
        "agent-1",
        &json!({"agent_id": "agent-1"}),
        Some("hb-1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    eventually(
        Duration::from_secs(5),
        "the second heartbeat applied",
        || async {
            (listed_last_seen(&app, "agent-1").await.as_deref() == second["timestamp"].as_str())
                .then_some(())
        },
    )
    .await;
    let (record, _) = stored_record(&app, "agent-1").await;
    assert_eq!(
        record["name"], "renamed elsewhere",
        "the other writer's change survived: {record}"
    );
    assert_eq!(record["last_seen"], second["timestamp"], "{record}");
    assert_eq!(
        transitions(&app, "agent-1").await,
        [transition(Value::Null, "online", "registered")]
    );
}

/// Two registry replicas share the consumer, so both hold heartbeats of the same agents and
/// their batches conflict. Every agent must end with its newest heartbeat, one transition and
/// nothing dead-lettered.
#[tokio::test]
async fn two_registry_replicas_coalescing_the_same_agents_lose_no_heartbeat() {
    const AGENTS: usize = 20;
    let nats = NatsServer::start();
    let a = TestApp::spawn_with(&nats, &["--heartbeat-coalesce=200ms"]).await;
    let b = TestApp::spawn_with(&nats, &["--heartbeat-coalesce=200ms"]).await;
    let agents: Vec<String> = (0..AGENTS).map(|i| format!("agent-{i}")).collect();
    for agent in &agents {
        a.register(agent).await;
    }
    let mut newest = HashMap::new();
    for round in 0..10 {
        for (i, agent) in agents.iter().enumerate() {
            let app = if (round + i) % 2 == 0 { &a } else { &b };
            let key = format!("hb-{round}");
            let (status, body) =
                heartbeat(app, agent, &json!({"agent_id": agent}), Some(&key)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            newest.insert(
                agent.clone(),
                body["timestamp"].as_str().unwrap().to_owned(),
            );
        }
    }
    for agent in &agents {
        eventually(
            Duration::from_secs(5),
            &format!("{agent}'s newest heartbeat"),
            || async {
                let (record, _) = stored_record(&a, agent).await;
                (record["last_seen"].as_str() == newest.get(agent).map(String::as_str))
                    .then_some(())
            },
        )
        .await;
        assert_eq!(
            transitions(&a, agent).await,
            [transition(Value::Null, "online", "registered")]
        );
    }
    let mut dead = a.js.get_stream("ACC_DEAD_LETTER").await.unwrap();
    assert_eq!(
        dead.info().await.unwrap().state.messages,
        0,
        "nothing dead-lettered"
    );
}

/// Asserts that the dead-letter stream holds nothing, `after` naming what might have put a
/// message there.
async fn nothing_dead_lettered(app: &TestApp, after: &str) {
    let mut dead = app.js.get_stream("ACC_DEAD_LETTER").await.unwrap();
    assert_eq!(
        dead.info().await.unwrap().state.messages,
        0,
        "nothing was dead-lettered after {after}"
    );
}

/// The registry's durable consumer on the agents stream, as the server holds it.
async fn registry_consumer(app: &TestApp) -> async_nats::jetstream::consumer::Info {
    let mut consumer = app
        .js
        .get_stream(AGENTS_STREAM)
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("registry")
        .await
        .unwrap();
    consumer.info().await.unwrap().clone()
}

#[tokio::test]
async fn the_registry_consumer_takes_the_whole_agents_stream_and_settles_status_changes() {
    let nats = NatsServer::start();
    let ingress = TestApp::spawn_with(&nats, &["--roles=ingress"]).await;
    // A durable left by an older version, filtered on the two subjects the registry applies.
    ingress
        .js
        .get_stream(AGENTS_STREAM)
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("registry".into()),
            filter_subjects: vec![
                "acc.agents.registered.*".into(),
                "acc.agents.heartbeat.*".into(),
            ],
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    ingress.register("agent-1").await;

    let registry = TestApp::spawn_with(&nats, &["--roles=registry"]).await;
    wait_for_status(&ingress, "agent-1", "online", Duration::from_secs(5)).await;
    let (status, body) = heartbeat(
        &ingress,
        "agent-1",
        &json!({"agent_id": "agent-1", "status": "degraded"}),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for_status(&ingress, "agent-1", "degraded", Duration::from_secs(5)).await;
    // Registration, its status change, the heartbeat and its status change: all four settled.
    let info = eventually(
        Duration::from_secs(5),
        "the registry consumer settled all four messages",
        || async {
            let info = registry_consumer(&ingress).await;
            (info.ack_floor.stream_sequence >= 4
                && info.num_pending == 0
                && info.num_ack_pending == 0)
                .then_some(info)
        },
    )
    .await;
    assert!(
        info.config.filter_subjects.is_empty() && info.config.filter_subject.is_empty(),
        "the old durable was updated in place to take the whole stream: {:?} {:?}",
        info.config.filter_subject,
        info.config.filter_subjects
    );
    let changes = transitions(&ingress, "agent-1").await;
    assert_eq!(changes.len(), 2, "{changes:?}");
    nothing_dead_lettered(&ingress, "the status changes it took were acknowledged").await;
    registry.stop().await;
}

#[tokio::test]
async fn a_starting_registry_learns_the_stored_records_and_reads_none_per_heartbeat() {
    const AGENTS: usize = 20;
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--roles=ingress"]).await;
    let agents: Vec<String> = (0..AGENTS).map(|i| format!("agent-{i:02}")).collect();
    for agent in &agents {
        app.register(agent).await;
    }
    let first = TestApp::spawn_with(&nats, &["--roles=registry"]).await;
    for agent in &agents {
        wait_for_status(&app, agent, "online", Duration::from_secs(5)).await;
    }
    first.stop().await;

    // Every read of an agent record is a request to the server's JetStream API.
    let mut api = ApiRequests::watch(&nats).await;

    let second = TestApp::spawn_with(&nats, &["--roles=registry"]).await;
    let mut sent = HashMap::new();
    for agent in &agents {
        let (status, body) = heartbeat(&app, agent, &json!({"agent_id": agent}), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        sent.insert(
            agent.clone(),
            body["timestamp"].as_str().unwrap().to_owned(),
        );
    }
    for agent in &agents {
        eventually(
            Duration::from_secs(5),
            &format!("{agent}'s heartbeat written"),
            || async {
                (listed_last_seen(&app, agent).await.as_ref() == sent.get(agent)).then_some(())
            },
        )
        .await;
    }
    let seen = api.reads_of(AGENTS_BUCKET).await;
    assert!(
        seen.is_empty(),
        "{} reads of agent records for {AGENTS} first heartbeats: {seen:?}",
        seen.len()
    );
    second.stop().await;
}

/// Issue 18, item 4: a registration of an agent the registry knows no record of writes the
/// record with no read first. When the record exists after all (another replica wrote it since
/// this one started), the refused write is followed by a read and the registration applied to
/// the record read.
#[tokio::test]
async fn a_new_agent_is_registered_with_no_read_of_its_record_and_an_existing_one_is_read() {
    const AGENTS: usize = 10;
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--roles=ingress,registry"]).await;
    let mut api = ApiRequests::watch(&nats).await;
    let agents: Vec<String> = (0..AGENTS).map(|i| format!("agent-{i:02}")).collect();
    for agent in &agents {
        app.register(agent).await;
    }
    for agent in &agents {
        wait_for_status(&app, agent, "online", Duration::from_secs(5)).await;
    }
    registry_drained(&app).await;
    let seen = api.reads_of(AGENTS_BUCKET).await;
    assert!(
        seen.is_empty(),
        "{} reads of agent records for {AGENTS} new registrations: {seen:?}",
        seen.len()
    );
    for agent in &agents {
        assert_eq!(
            transitions(&app, agent).await,
            [transition(Value::Null, "online", "registered")]
        );
    }

    // A record this registry never wrote nor learnt: as if another replica created it.
    let (mut record, _) = stored_record(&app, "agent-00").await;
    record["agent_id"] = json!("agent-elsewhere");
    record["name"] = json!("written elsewhere");
    let kv = app.js.get_key_value(AGENTS_BUCKET).await.unwrap();
    kv.create(
        "agent-elsewhere",
        serde_json::to_vec(&record).unwrap().into(),
    )
    .await
    .unwrap();
    api.reads_of(AGENTS_BUCKET).await;
    let mut registration = registration("agent-elsewhere");
    registration["name"] = json!("registered here");
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token("agent-elsewhere")),
            &registration,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(
        Duration::from_secs(5),
        "the registration applied to the stored record",
        || async {
            // From the ingress's view, not the bucket: the test's own reads are not counted.
            listed(&app)
                .await
                .iter()
                .any(|a| a["agent_id"] == "agent-elsewhere" && a["name"] == "registered here")
                .then_some(())
        },
    )
    .await;
    let seen = api.reads_of(AGENTS_BUCKET).await;
    // The refused write is followed by one read, of the record the registration is applied to.
    assert_eq!(
        seen.len(),
        1,
        "the refused write was followed by a read: {seen:?}"
    );
    nothing_dead_lettered(&app, "the refused write was retried, not failed").await;
    app.stop().await;
}
