//! Attacks beyond the token table (see `auth.rs`): no agent acts as another on any route, admin
//! routes need the admin scope, and floods are limited — per agent (429 with `Retry-After`), per
//! source address for failed authentication, and globally by a cap on requests in flight (503
//! `OVERLOADED`, never an unbounded queue). A flooding agent does not slow the others down.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn no_route_lets_one_agent_act_as_another() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-b").await;
    app.register("agent-a").await;
    let a = token("agent-a");
    let b = token("agent-b");

    let attempts = [
        ("/orchestrator/register", registration("agent-b")),
        ("/orchestrator/heartbeat", json!({"agent_id": "agent-b"})),
        (
            "/orchestrator/heartbeat",
            json!({"agent_id": "agent-b", "status": "degraded"}),
        ),
        ("/orchestrator/events", event("agent-b", "e-1")),
        (
            "/orchestrator/tasks/t-1/callback",
            json!({"status": "done", "agent_id": "agent-b"}),
        ),
    ];
    for (path, body) in &attempts {
        let (status, answer) = app.post(path, Some(&a), body).await;
        assert_error(status, &answer, 403, "IDENTITY_MISMATCH");
    }
    // Server-owned fields naming B are not taken from the body.
    let (status, answer) = app
        .post(
            "/orchestrator/tasks/t-2/callback",
            Some(&a),
            &json!({"status": "done", "reported_by": "agent-b", "emitted_by": "agent-b"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, stored_result) = stored(&app.js, "ACC_TASKS", answer["seq"].as_u64().unwrap()).await;
    assert_eq!(stored_result["reported_by"], "agent-a");

    // B's task result is B's to read (and an admin's), not A's.
    let (status, answer) = app
        .post(
            "/orchestrator/tasks/t-b/callback",
            Some(&b),
            &json!({"status": "done", "result": "secret"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = app.get("/orchestrator/tasks/t-b", Some(&a)).await;
    assert_error(status, &answer, 403, "FORBIDDEN");
    assert!(!answer.to_string().contains("secret"), "{answer}");
    let (status, _) = app.get("/orchestrator/tasks/t-b", Some(&b)).await;
    assert_eq!(status, StatusCode::OK);

    // The same Idempotency-Key from A does not suppress B's heartbeat: keys are per agent.
    let beat = |t: String, agent: &'static str| {
        app.http
            .post(app.url("/orchestrator/heartbeat"))
            .bearer_auth(t)
            .header("idempotency-key", "shared-key")
            .json(&json!({"agent_id": agent}))
            .send()
    };
    let (_, first) = read(beat(a.clone(), "agent-a").await.unwrap()).await;
    let (_, second) = read(beat(b.clone(), "agent-b").await.unwrap()).await;
    assert_eq!(first["duplicate"], false, "{first}");
    assert_eq!(second["duplicate"], false, "{second}");
    assert_ne!(first["seq"], second["seq"]);

    // Nothing A tried was stored as B: B's only records are its registration, its task and beat.
    let as_b = all_stored(&app.js, "ACC_AGENTS", "acc.agents.*.agent-b").await;
    assert!(
        as_b.iter()
            .all(|m| m["agent_id"] == "agent-b" && m.get("status") != Some(&json!("degraded"))),
        "{as_b:?}"
    );
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 0);
}

#[tokio::test]
async fn admin_routes_need_the_admin_scope() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (status, body) = app.get("/orchestrator/agents", None).await;
    assert_error(status, &body, 401, "MISSING_TOKEN");
    let (status, body) = app
        .get("/orchestrator/agents", Some(&token("agent-a")))
        .await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
    // A scope that merely contains the admin scope's name is not the admin scope.
    let sneaky = auto_com_center::auth::mint(
        &secret(),
        &auto_com_center::domain::AgentId::parse("agent-a").unwrap(),
        "orchestrator.admin.not orchestrator.adminx",
        Duration::from_secs(600),
    );
    let (status, body) = app.get("/orchestrator/agents", Some(&sneaky)).await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
    let (status, body) = app.get("/orchestrator/agents", Some(&admin_token())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn an_agent_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let nats = NatsServer::start();
    let app =
        TestApp::spawn_with(&nats, &["--rate-limit-per-agent=2", "--rate-limit-burst=5"]).await;
    let a = token("agent-a");
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..12 {
        let response = app
            .http
            .post(app.url("/orchestrator/events"))
            .bearer_auth(&a)
            .json(&event("agent-a", &format!("e-{i}")))
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u32>().unwrap());
            let (status, body) = read(response).await;
            assert_error(status, &body, 429, "RATE_LIMITED");
            statuses.push(429);
        } else {
            statuses.push(response.status().as_u16());
        }
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    println!("per-agent limit: 12 requests, {ok} ok, {limited} limited");
    assert!((5..=6).contains(&ok), "{statuses:?}");
    assert_eq!(ok + limited, 12, "{statuses:?}");
    assert!(
        retry_after.is_some_and(|s| s >= 1),
        "429 carries Retry-After"
    );
    // Only the refused requests' events are missing: every 200 was stored.
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, ok as u64);
    // Another agent is not affected.
    let (status, body) = app
        .post(
            "/orchestrator/events",
            Some(&token("agent-b")),
            &event("agent-b", "b-1"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The bucket refills.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body) = app
        .post("/orchestrator/events", Some(&a), &event("agent-a", "later"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
/// Issue 13, item 5: a valid token used to get 429 behind an address where someone else kept
/// sending bad ones (one garbage token a second from a shared NAT locked every agent out). Now
/// the address's failure bucket refuses only tokens that do not verify.
async fn an_address_that_keeps_failing_authentication_is_refused_but_a_valid_token_behind_it_is_not()
 {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &["--auth-failure-burst=5", "--auth-failure-interval=1m"],
    )
    .await;
    // Requests without a token do not count: they cannot be guessing anything.
    for _ in 0..10 {
        let (status, body) = app.get("/orchestrator/agents", None).await;
        assert_error(status, &body, 401, "MISSING_TOKEN");
    }
    for i in 0..5 {
        let (status, body) = app
            .get("/orchestrator/agents", Some(&format!("forged.{i}.token")))
            .await;
        assert_error(status, &body, 401, "INVALID_TOKEN");
    }
    let response = app
        .http
        .get(app.url("/orchestrator/agents"))
        .bearer_auth("forged.again.token")
        .send()
        .await
        .unwrap();
    let retry_after: u32 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let (status, body) = read(response).await;
    assert_error(status, &body, 429, "RATE_LIMITED");
    // While blocked, a valid token from the same address is served: the block is on guessing.
    for _ in 0..3 {
        let (status, body) = app.get("/orchestrator/agents", Some(&admin_token())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // The guesser stays blocked between the valid requests.
        let (status, body) = app
            .get("/orchestrator/agents", Some("forged.still.token"))
            .await;
        assert_error(status, &body, 429, "RATE_LIMITED");
    }
    // Health probes are not behind authentication.
    let (status, _) = app.get("/health/live", None).await;
    assert_eq!(status, StatusCode::OK);
}

/// Opens a POST whose body never finishes (raw TCP: headers and half the declared body): the
/// request holds its in-flight slot until the socket is dropped.
async fn stalled_request(app: &TestApp) -> tokio::net::TcpStream {
    stalled_request_with(app, Some(&token("agent-a"))).await
}

/// [`stalled_request`] with `bearer` as the token (none when `None`).
async fn stalled_request_with(app: &TestApp, bearer: Option<&str>) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let authorization = bearer
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST /orchestrator/register HTTP/1.1\r\nhost: {}\r\n{authorization}\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"agent_id\":",
        app.addr,
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.flush().await.unwrap();
    socket
}

/// The status line of the answer on `socket`, if one comes within `within`.
async fn status_line(socket: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut buffer = vec![0u8; 1024];
    let n = tokio::time::timeout(within, socket.read(&mut buffer))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
    text.lines().next().map(str::to_owned)
}

/// Issue 13, item 4 (slow clients): the body was read before the token was checked, while the
/// request held one of `MAX_IN_FLIGHT` slots, so requests without a valid token trickling their
/// bodies made valid agents get 503 `OVERLOADED`. Now they are refused 401 from their headers,
/// before any body is read, and hold nothing.
#[tokio::test]
async fn slow_bodies_without_a_valid_token_are_refused_from_the_headers_and_hold_no_slot() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--max-in-flight=5"]).await;
    let mut slow = Vec::new();
    for i in 0..20 {
        let forged = format!("forged.{i}.token");
        let bearer = (i % 2 == 0).then_some(forged.as_str());
        slow.push(stalled_request_with(&app, bearer).await);
    }
    let started = Instant::now();
    for socket in &mut slow {
        let line = status_line(socket, Duration::from_secs(5)).await;
        assert!(
            line.as_deref().is_some_and(|l| l.contains(" 401 ")),
            "a half-sent body without a valid token is answered 401 at once: {line:?}"
        );
    }
    println!(
        "20 stalled bodies without a valid token: all answered 401 within {:?}",
        started.elapsed()
    );
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token("agent-b")),
            &registration("agent-b"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(slow);
}

/// Issue 13, item 4: the 413 on `Content-Length` waited for the body when there was no
/// `traceparent`, and `Expect: 100-continue` got a 100 for a 10 GB body. Now the declared size
/// is refused before anything else.
#[tokio::test]
async fn an_oversized_content_length_is_refused_413_before_any_body_is_read() {
    use tokio::io::AsyncWriteExt as _;
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /orchestrator/register HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 10000000000\r\n\
         expect: 100-continue\r\n\r\n",
        token("agent-a")
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let line = status_line(&mut socket, Duration::from_secs(5)).await;
    assert!(
        line.as_deref().is_some_and(|l| l.contains(" 413 ")),
        "{line:?}"
    );
}

#[tokio::test]
async fn past_the_in_flight_cap_requests_are_shed_with_503_not_queued() {
    let nats = NatsServer::start();
    // Each agent may hold all three (the per-agent cap is tried on its own, below).
    let app =
        TestApp::spawn_with(&nats, &["--max-in-flight=3", "--max-in-flight-per-agent=3"]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(stalled_request(&app).await);
    }
    let t = token("agent-b");
    // Give the three stalled requests time to take their slots.
    let shed = eventually(Duration::from_secs(5), "a shed request", || async {
        let started = Instant::now();
        let response = app
            .http
            .post(app.url("/orchestrator/events"))
            .bearer_auth(&t)
            .json(&event("agent-b", "shed"))
            .send()
            .await
            .unwrap();
        (response.status() == StatusCode::SERVICE_UNAVAILABLE)
            .then(|| (response, started.elapsed()))
    })
    .await;
    let (response, elapsed) = shed;
    assert!(
        elapsed < Duration::from_millis(500),
        "shed at once, took {elapsed:?}"
    );
    assert_eq!(response.headers()["retry-after"], "1");
    let (status, body) = read(response).await;
    assert_error(status, &body, 503, "OVERLOADED");
    // Health is still answered.
    let (status, _) = app.get("/health/live", None).await;
    assert_eq!(status, StatusCode::OK);
    // Freed slots serve again.
    drop(held);
    let body = eventually(
        Duration::from_secs(5),
        "a 200 after the slots free",
        || async {
            let (status, body) = app
                .post("/orchestrator/events", Some(&t), &event("agent-b", "after"))
                .await;
            (status == StatusCode::OK).then_some(body)
        },
    )
    .await;
    assert_eq!(body["success"], true);
}

fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

/// `n` events from `agent`, one every 25 ms (40 a second, under its limit); their latencies.
async fn measure(app: &TestApp, agent: &str, prefix: &str, n: usize) -> Vec<Duration> {
    let t = token(agent);
    let mut latencies = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    for i in 0..n {
        tick.tick().await;
        let started = Instant::now();
        let (status, body) = app
            .post(
                "/orchestrator/events",
                Some(&t),
                &event(agent, &format!("{prefix}-{i}")),
            )
            .await;
        latencies.push(started.elapsed());
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    latencies
}

/// A flooding agent: two loops of 500 requests a second each, until `stop`. Returns the counts
/// (accepted, refused with 429) when stopped.
fn flood(
    app: &TestApp,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<(u64, u64)> {
    let (http, url) = (app.http.clone(), app.url("/orchestrator/events"));
    tokio::spawn(async move {
        let mut loops = tokio::task::JoinSet::new();
        for f in 0..2 {
            let (http, url, stop) = (http.clone(), url.clone(), stop.clone());
            loops.spawn(async move {
                let t = token("flooder");
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let (mut accepted, mut refused) = (0u64, 0u64);
                let mut i = 0u64;
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let status = http
                        .post(&url)
                        .bearer_auth(&t)
                        .json(&event(
                            "flooder",
                            &format!("f{f}-{i}-{}", rand::random::<u32>()),
                        ))
                        .send()
                        .await
                        .unwrap()
                        .status();
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        refused += 1;
                    } else {
                        accepted += 1;
                    }
                    i += 1;
                }
                (accepted, refused)
            });
        }
        let mut total = (0, 0);
        while let Some(counts) = loops.join_next().await {
            let (a, r) = counts.unwrap();
            total = (total.0 + a, total.1 + r);
        }
        total
    })
}

#[tokio::test]
async fn a_flooding_agent_does_not_raise_other_agents_p99() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &[
            "--rate-limit-per-agent=50",
            "--rate-limit-burst=50",
            "--durability=interval",
        ],
    )
    .await;
    // Warm up connections and code paths.
    measure(&app, "quiet", "warm", 20).await;
    // Alternate quiet and flooded rounds, so that whatever else the machine is doing weighs on
    // both samples alike.
    let (mut baseline, mut flooded) = (Vec::new(), Vec::new());
    let (mut flood_ok, mut flood_limited) = (0, 0);
    let mut rises = Vec::new();
    for round in 0..ROUNDS {
        let mut base = measure(&app, "quiet", &format!("base{round}"), 40).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let flooder = flood(&app, stop.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut under = measure(&app, "quiet", &format!("flood{round}"), 40).await;
        stop.cancel();
        let (ok, limited) = flooder.await.unwrap();
        flood_ok += ok;
        flood_limited += limited;
        let (base_p99, under_p99) = (p99(&mut base), p99(&mut under));
        rises.push((under_p99.saturating_sub(base_p99), base_p99));
        baseline.extend(base);
        flooded.extend(under);
    }
    let (base, under) = (p99(&mut baseline), p99(&mut flooded));
    println!(
        "flood: quiet agent p99 {base:?} alone, {under:?} while a flooder sent {} requests \
         ({flood_ok} accepted, {flood_limited} refused 429); per round (rise, quiet p99): {rises:?}",
        flood_ok + flood_limited
    );
    assert!(flood_limited > flood_ok, "the flooder was limited");
    // "A few milliseconds": at most 10 ms more on a quiet machine. The flooder's refused requests
    // never touch the bus but cost CPU (so does the flooding client, in this process), so on a
    // machine already busy with other work the allowance is the quiet p99 itself. Read per
    // round, quiet and flooded side by side, and judged by the median round: one stall of the
    // test machine during one round (a p99 of 40 requests is their slowest) does not decide
    // it, and a flood that raises the quiet agent's latency does so in most rounds.
    rises.sort();
    let (rise, quiet) = rises[ROUNDS / 2];
    let allowance = Duration::from_millis(10).max(quiet);
    assert!(
        rise <= allowance,
        "the median round's p99 rose by {rise:?} under flood (quiet p99 {quiet:?}); \
         pooled: {base:?} alone, {under:?} under flood"
    );
}

/// Quiet and flooded rounds of [`a_flooding_agent_does_not_raise_other_agents_p99`].
const ROUNDS: usize = 7;

/// Issue 13, item 1. An agent's NATS user publishes on an inbound subject with a protected
/// subject as the NATS reply subject. Before the account split, JetStream's acknowledgement
/// (`{"stream":"ACC_INBOUND","seq":N}`) was published there, in the bridge's account, and stored
/// by the stream of that subject: another agent's KV record, a task result, an event, another
/// agent's answers. Now the acknowledgement goes to the subject in the agent's own account.
#[tokio::test]
async fn an_agent_naming_a_protected_subject_as_its_nats_reply_stores_nothing_there() {
    use futures::StreamExt as _;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let app = TestApp::start(embedded_with_agents(&data, port)).await;
    let (a, _) = connect_agent(&data, port, "agent-a").await;
    let (b, _) = connect_agent(&data, port, "agent-b").await;
    let (status, answer) = b.call("acc.in.register", &registration("agent-b")).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = app
        .post(
            "/orchestrator/tasks/t-b/callback",
            Some(&token("agent-b")),
            &json!({"status": "done", "result": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let kv = app.js.get_key_value("acc_agents").await.unwrap();
    eventually(Duration::from_secs(10), "agent-b's record", || async {
        kv.get("agent-b").await.unwrap()
    })
    .await;
    let mut b_replies = b.client.subscribe("acc.reply.agent-b.>").await.unwrap();
    b.client.flush().await.unwrap();

    let protected = [
        "$KV.acc_agents.agent-b",
        "acc.tasks.result.t-b",
        "acc.events.agent-b",
        "acc.reply.agent-b.x",
    ];
    // Without a token (refused by the door's intake) and with agent-a's own (stored): either
    // way the intake's answer goes back into agent-a's account only.
    let mut signed = async_nats::HeaderMap::new();
    signed.insert(
        "Authorization",
        format!("Bearer {}", token("agent-a")).as_str(),
    );
    for reply in protected {
        for headers in [async_nats::HeaderMap::new(), signed.clone()] {
            a.client
                .publish_with_reply_and_headers("acc.in.event", reply, headers, "{}".into())
                .await
                .unwrap();
        }
    }
    a.client.flush().await.unwrap();
    // The agent's own JetStream publishes are still acknowledged to it.
    a.send("acc.in.event", signed.clone(), b"{}".to_vec()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let ack_marker = "ACC_INBOUND";
    for stream in ["KV_acc_agents", "ACC_TASKS", "ACC_EVENTS", "ACC_AGENTS"] {
        let planted: Vec<String> = raw_messages(&app.js, stream)
            .await
            .into_iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .filter(|payload| payload.contains(ack_marker))
            .collect();
        assert!(planted.is_empty(), "{stream} stores {planted:?}");
    }
    let leaked = tokio::time::timeout(Duration::from_millis(300), b_replies.next()).await;
    assert!(
        !matches!(leaked, Ok(Some(_))),
        "an acknowledgement reached agent-b's replies"
    );
    let record: Value = serde_json::from_slice(&kv.get("agent-b").await.unwrap().unwrap()).unwrap();
    assert_eq!(record["agent_id"], "agent-b", "{record}");
    let (status, body) = app
        .get("/orchestrator/tasks/t-b", Some(&token("agent-b")))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}

/// One unauthenticated POST to `/orchestrator/register` whose body trickles in over `delay`;
/// returns the status line.
async fn slow_unauthenticated_register(app: &TestApp, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = registration("agent-x").to_string();
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /orchestrator/register HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let (first, rest) = body.split_at(body.len() / 2);
    socket.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(delay).await;
    socket.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let _ = socket.read_to_string(&mut answer).await;
    answer.lines().next().unwrap_or_default().to_owned()
}

/// Issue 13, item 6: refusals before admission used to count toward the plan's p95 latency,
/// timed from before the body was read, so 20 slow requests without a token set `/health` to
/// degraded (503) for its whole window. Now only admitted requests count; the refusals have
/// their own counters.
#[tokio::test]
async fn slow_unauthenticated_requests_do_not_turn_health_to_503() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-1").await;
    let slow: Vec<_> = (0..20)
        .map(|_| slow_unauthenticated_register(&app, Duration::from_millis(400)))
        .collect();
    for status_line in futures::future::join_all(slow).await {
        assert!(status_line.contains(" 401 "), "{status_line}");
    }
    let (status, health) = app.get("/health", None).await;
    println!(
        "20 slow unauthenticated registers (400 ms each): /health {status}, register p95 {} ms",
        health["orchestrator"]["p95_latency_register"]
    );
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(health["refusals"]["missing_token"], 20, "{health}");
    assert!(
        app.metrics_text()
            .await
            .contains("acc_http_responses_total{endpoint=\"register\",code=\"401\"} 20"),
        "401s are still counted on /metrics"
    );
}

/// A connection from `source` (a loopback address of its own, so the per-address cap applies to
/// it and not to the test's valid agent) that sends half a request's headers, then one more
/// header line every 250 ms, as a slowloris does. Returns when it connected and how long the
/// server kept it open, or `None` if it was still open after `give_up`.
async fn slowloris(
    target: std::net::SocketAddr,
    source: std::net::IpAddr,
    give_up: Duration,
) -> Option<(Instant, Duration)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let mut stream = socket.connect(target).await.ok()?;
    let connected = Instant::now();
    if stream
        .write_all(b"POST /orchestrator/register HTTP/1.1\r\nhost: x\r\n")
        .await
        .is_err()
    {
        return Some((connected, connected.elapsed()));
    }
    let mut buffer = [0u8; 512];
    while connected.elapsed() < give_up {
        // Any answer (a byte, the end of the stream, a reset) means the server is done with it.
        match tokio::time::timeout(Duration::from_millis(250), stream.read(&mut buffer)).await {
            Ok(_) => return Some((connected, connected.elapsed())),
            Err(_) => {
                if stream.write_all(b"x-slow: 1\r\n").await.is_err() {
                    return Some((connected, connected.elapsed()));
                }
            }
        }
    }
    None
}

/// Issue 13, item 4 (slow clients): idle connections and half-sent headers stayed open past
/// 75 s and one address could open as many as it liked. Now a connection must send its headers
/// within `HEADER_READ_TIMEOUT` (which also closes idle keep-alive connections), a body must
/// arrive within `BODY_READ_TIMEOUT` (408), and one address holds at most
/// `MAX_CONNECTIONS_PER_ADDRESS` connections. A valid agent is served throughout 1,000 slow
/// unauthenticated connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_are_closed_and_capped_per_address_while_a_valid_agent_is_served() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &[
            "--header-read-timeout=3s",
            "--body-read-timeout=1s",
            "--max-connections-per-address=100",
        ],
    )
    .await;
    app.register("agent-a").await;
    let quiet_before = p99(&mut measure(&app, "agent-a", "before", 100).await);

    // 1,000 slowloris connections from 127.0.0.2, while agent-a (from 127.0.0.1) sends events.
    let attacker: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let give_up = Duration::from_secs(10);
    let slow: Vec<_> = (0..1_000)
        .map(|_| tokio::spawn(slowloris(app.addr, attacker, give_up)))
        .collect();
    let mut during = measure(&app, "agent-a", "during", 100).await;
    let quiet_during = p99(&mut during);
    let mut closed_at = Vec::new();
    for handle in slow {
        closed_at.push(handle.await.unwrap());
    }
    let still_open = closed_at.iter().filter(|c| c.is_none()).count();
    let closed: Vec<(Instant, Duration)> = closed_at.into_iter().flatten().collect();
    let at_once = closed
        .iter()
        .filter(|(_, open)| *open < Duration::from_millis(500))
        .count();
    let held = closed.len() - at_once;
    let longest = closed.iter().map(|(_, open)| *open).max().unwrap();
    println!(
        "1,000 slowloris connections (HEADER_READ_TIMEOUT=3s, MAX_CONNECTIONS_PER_ADDRESS=100): \
         {at_once} closed within 0.5 s of connecting (over the cap), {held} held until the header \
         timeout, the longest {longest:?}; {still_open} still open after {give_up:?}; agent-a's \
         event p99 {quiet_before:?} before, {quiet_during:?} during"
    );
    assert_eq!(still_open, 0, "every half-sent header is closed");
    assert!(held <= 100, "at most the cap held: {held}");
    assert!(at_once >= 900, "past the cap, closed at once: {at_once}");
    assert!(
        longest < Duration::from_secs(5),
        "closed by the header timeout: {longest:?}"
    );

    // An idle keep-alive connection after a complete request is closed by the same timer.
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let idle_since = Instant::now();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match idle.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(end.is_ok(), "an idle keep-alive connection is closed");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    println!(
        "idle keep-alive connection closed after {:?}",
        idle_since.elapsed()
    );

    // A valid agent's body that stops halfway: 408 at the body timeout, nothing stored.
    let mut half = stalled_request(&app).await;
    let line = status_line(&mut half, Duration::from_secs(5)).await;
    assert!(
        line.as_deref().is_some_and(|l| l.contains(" 408 ")),
        "a body that stops arriving is 408: {line:?}"
    );
    assert!(quiet_during < Duration::from_secs(1), "{quiet_during:?}");
    app.stop().await;
}

/// Issue 13, item 6: any agent could overwrite a result another agent reported for a task the
/// orchestrator never queued; the owner then got 403 on its own task. Now a task id belongs to
/// its first reporter: another agent's report is refused as its read is, and nothing is stored.
#[tokio::test]
async fn an_agent_cannot_overwrite_another_agents_task_result() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (a, b) = (token("agent-a"), token("agent-b"));
    let path = "/orchestrator/tasks/t-owned/callback";
    let (status, first) = app
        .post(
            path,
            Some(&a),
            &json!({"status": "done", "result": "a-secret"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");

    let (status, overwrite) = app
        .post(
            path,
            Some(&b),
            &json!({"status": "done", "result": "b-forged"}),
        )
        .await;
    assert_error(status, &overwrite, 403, "FORBIDDEN");
    assert!(!overwrite.to_string().contains("a-secret"), "{overwrite}");
    // B's refused report and B's refused read say the same thing.
    let (status, read_by_b) = app.get("/orchestrator/tasks/t-owned", Some(&b)).await;
    assert_error(status, &read_by_b, 403, "FORBIDDEN");
    assert_eq!(overwrite["error"], read_by_b["error"]);

    let (status, read) = app.get("/orchestrator/tasks/t-owned", Some(&a)).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["result"], "a-secret");
    assert_eq!(read["reported_by"], "agent-a");
    let stored = all_stored(&app.js, "ACC_TASKS", "acc.tasks.result.t-owned").await;
    assert_eq!(stored.len(), 1, "{stored:?}");

    // The owner may still report again; B's own task ids are B's.
    let (status, again) = app
        .post(
            path,
            Some(&a),
            &json!({"status": "failed", "error": "later"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    let (status, own) = app
        .post(
            "/orchestrator/tasks/t-of-b/callback",
            Some(&b),
            &json!({"status": "done"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{own}");
    println!(
        "agent-b's report on agent-a's task: {} {}; agent-a's result intact, 1 message stored",
        overwrite["error"]["code"], overwrite["error"]["message"]
    );
}

/// Messages of `stream` stored so far.
async fn stored_count(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// Issue 13, item 8: the NATS door handled messages in stream order, so one agent's 5,000
/// queued events delayed another agent's answer by seconds. Now the door pulls ahead and serves
/// callers in turn: the other agent is answered while the flood is still being worked off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agents_backlog_on_the_nats_door_does_not_delay_another_agents_answer() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let flooder = NatsAgent::connect(&nats.url(), "agent-a").await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Authorization",
        format!("Bearer {}", token("agent-a")).as_str(),
    );
    // 5,000 events published back to back, acknowledgements awaited together.
    let sent = 5_000u64;
    let mut acks = Vec::with_capacity(sent as usize);
    for i in 0..sent {
        let body = serde_json::to_vec(&event("agent-a", &format!("flood-{i}"))).unwrap();
        let ack = flooder
            .js
            .publish_with_headers("acc.in.event", headers.clone(), body.into())
            .await
            .unwrap();
        acks.push(ack);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let other = NatsAgent::connect(&nats.url(), "agent-b").await;
    let started = Instant::now();
    let (status, answer) = other
        .call("acc.in.event", &event("agent-b", "calm-1"))
        .await;
    let waited = started.elapsed();
    assert_eq!(status, 200, "{answer}");
    // What of the flood the door had handled when agent-b got its answer (admitted or refused).
    let handled =
        stored_count(&app.js, "ACC_EVENTS").await + stored_count(&app.js, "ACC_REJECTED").await - 1;
    println!(
        "NATS door: agent-b answered {waited:?} after 5,000 queued events of agent-a, with \
         {handled} of them handled by then"
    );
    assert!(
        handled < sent,
        "agent-b was answered before the flood was worked off"
    );
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    let handled = eventually(Duration::from_secs(60), "the flood handled", || async {
        let handled = stored_count(&app.js, "ACC_EVENTS").await
            + stored_count(&app.js, "ACC_REJECTED").await
            - 1;
        (handled == sent).then_some(handled)
    })
    .await;
    assert_eq!(handled, sent);
}

/// One agent sends 50 KB events back to back until refused; returns how many were stored, the
/// refusal, how long it took, and what another agent's 50 KB event then got.
async fn fill(app: &TestApp) -> (usize, Value, Duration, StatusCode) {
    let a = token("agent-a");
    let started = Instant::now();
    let mut body = event("agent-a", "x");
    body["data"] = json!("x".repeat(50_000));
    for i in 0..1_000 {
        body["event_id"] = json!(format!("big-{i}"));
        let (status, answer) = app.post("/orchestrator/events", Some(&a), &body).await;
        if status != StatusCode::OK {
            let mut theirs = event("agent-b", "b-1");
            theirs["data"] = body["data"].clone();
            let (other, _) = app
                .post("/orchestrator/events", Some(&token("agent-b")), &theirs)
                .await;
            return (i, answer, started.elapsed(), other);
        }
    }
    panic!("1,000 events of 50 KB were all stored");
}

/// Issue 13, item 3: one agent's large events filled a stream, and every other agent then got
/// 503 `STREAM_FULL`. Now each agent may store `AGENT_STORE_QUOTA` bytes per `STREAM_MAX_AGE`
/// (a 32nd of the stream by default): past it the agent gets 429 `QUOTA_EXCEEDED`, and others
/// are served. Heartbeat `details` are bounded, and `ACC_INBOUND` keeps only what the door has
/// not handled.
#[tokio::test]
async fn one_agent_cannot_fill_a_stream_for_the_others() {
    // Without a quota (one as large as the stream), as before.
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &["--stream-max-bytes=4MiB", "--agent-store-quota=1GiB"],
    )
    .await;
    let (stored, refusal, took, other) = fill(&app).await;
    println!(
        "no quota: agent-a filled ACC_EVENTS (4 MiB) with {stored} events of 50 KB in {took:?}; \
         then {} for agent-a and {other} for agent-b",
        refusal["error"]["code"]
    );
    assert_eq!(refusal["error"]["code"], "STREAM_FULL", "{refusal}");
    assert_eq!(other, StatusCode::SERVICE_UNAVAILABLE);
    app.stop().await;

    // With the default quota, a 32nd of the stream.
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--stream-max-bytes=4MiB"]).await;
    let (stored, refusal, _, other) = fill(&app).await;
    let bytes = app
        .js
        .get_stream("ACC_EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .bytes;
    println!(
        "default quota (128 KiB per 7 days): agent-a stored {stored} events ({bytes} bytes, \
         {:.1}% of the stream), then {}; agent-b {other}",
        bytes as f64 * 100.0 / f64::from(4u32 << 20),
        refusal["error"]["code"],
    );
    assert_error(
        StatusCode::TOO_MANY_REQUESTS,
        &refusal,
        429,
        "QUOTA_EXCEEDED",
    );
    assert_eq!(other, StatusCode::OK);
    assert!(bytes < 4 << 20 >> 4, "{bytes}");

    // Heartbeat details are bounded like every other field.
    app.register("agent-c").await;
    let (status, answer) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&token("agent-c")),
            &json!({"agent_id": "agent-c", "details": {"note": "x".repeat(5_000)}}),
        )
        .await;
    assert_error(status, &answer, 400, "INVALID_PAYLOAD");
    assert!(answer.to_string().contains("details"), "{answer}");

    // The inbound stream keeps nothing the door has handled.
    let agent = NatsAgent::connect(&nats.url(), "agent-c").await;
    for i in 0..20 {
        let (status, _) = agent
            .call("acc.in.event", &event("agent-c", &format!("in-{i}")))
            .await;
        assert_eq!(status, 200);
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Authorization", "Bearer forged");
    // Refused by the door's intake: never stored in ACC_INBOUND at all.
    agent
        .publish("acc.in.event", headers, vec![b'x'; 500_000])
        .await
        .expect_err("a publish without a valid token is refused");
    let left = eventually(Duration::from_secs(10), "ACC_INBOUND drained", || async {
        let left = stored_count(&app.js, "ACC_INBOUND").await;
        (left == 0).then_some(left)
    })
    .await;
    println!("ACC_INBOUND after 21 handled messages (one 500 KB without a token): {left}");
    app.stop().await;
}

/// Issue 13, item 11: `RUST_LOG` was silently ignored. `--help` says so and names the filter
/// that is read, `LOG_LEVEL`.
#[test]
fn help_says_log_level_is_the_filter_and_rust_log_is_not_read() {
    let finished = run_to_end(binary().args(["serve", "--help"]), Duration::from_secs(10));
    assert!(finished.status.success(), "{}", finished.stderr);
    let help = finished
        .stdout
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(help.contains("[env: LOG_LEVEL="), "{help}");
    assert!(help.contains("RUST_LOG is not read"), "{help}");
}

/// Issue 13, item 3: a stream close to full said nothing until it refused writes. Now the
/// default rule `StreamNearlyFull` warns past 80 % of `STREAM_MAX_BYTES` (critical past 95 %).
#[tokio::test]
async fn a_stream_close_to_full_raises_an_alert_before_it_refuses() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &[
            "--metrics-snapshot-interval=200ms",
            "--alert-eval-interval=100ms",
            "--alert-lease-ttl=1s",
            "--stream-max-bytes=1MiB",
            "--agent-store-quota=1GiB",
        ],
    )
    .await;
    let a = token("agent-a");
    let mut body = event("agent-a", "x");
    body["data"] = json!("x".repeat(50_000));
    let mut used = 0.0;
    let mut sent = 0;
    while used < 0.82 {
        body["event_id"] = json!(format!("big-{sent}"));
        let (status, answer) = app.post("/orchestrator/events", Some(&a), &body).await;
        assert_eq!(status, StatusCode::OK, "refused before 82 %: {answer}");
        sent += 1;
        let bytes = app
            .js
            .get_stream("ACC_EVENTS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .bytes;
        used = bytes as f64 / f64::from(1u32 << 20);
    }
    let started = Instant::now();
    let alert = eventually(Duration::from_secs(10), "StreamNearlyFull", || async {
        let (_, listed) = app.get("/orchestrator/alerts", Some(&admin_token())).await;
        listed["active"].as_array().and_then(|active| {
            active
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "StreamNearlyFull"
                        && a["labels"]["stream"] == "ACC_EVENTS"
                })
                .cloned()
        })
    })
    .await;
    println!(
        "ACC_EVENTS {:.0} % full after {sent} events: StreamNearlyFull {} within {:?}, before any \
         STREAM_FULL",
        used * 100.0,
        alert["labels"]["severity"],
        started.elapsed()
    );
    assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
    app.stop().await;
}

/// Residual of issue 13, item 3 (messages in flight per agent): `MAX_IN_FLIGHT` was shared by
/// all agents, so one agent holding requests open held every slot and another agent got 503
/// `OVERLOADED`. Now an agent holds at most `MAX_IN_FLIGHT_PER_AGENT` of them, over HTTP and
/// the NATS door together; its excess is refused at once with 429 `RATE_LIMITED`.
#[tokio::test]
async fn one_agent_holding_its_requests_open_does_not_refuse_another() {
    let nats = NatsServer::start();
    let app =
        TestApp::spawn_with(&nats, &["--max-in-flight=3", "--max-in-flight-per-agent=2"]).await;
    // agent-a holds two requests open (valid token, half a body), then tries a third.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(stalled_request(&app).await);
    }
    eventually(
        Duration::from_secs(5),
        "agent-a holding two slots",
        || async {
            let mut probe = stalled_request(&app).await;
            let line = status_line(&mut probe, Duration::from_millis(500)).await;
            line.filter(|line| line.contains(" 429 "))
        },
    )
    .await;
    let started = Instant::now();
    let response = app
        .http
        .post(app.url("/orchestrator/events"))
        .bearer_auth(token("agent-a"))
        .json(&event("agent-a", "third"))
        .send()
        .await
        .unwrap();
    let refused_in = started.elapsed();
    assert_eq!(response.headers()["retry-after"], "1");
    let (status, refused) = read(response).await;
    assert_error(status, &refused, 429, "RATE_LIMITED");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("in flight")),
        "{refused}"
    );
    assert!(refused_in < Duration::from_millis(500), "{refused_in:?}");
    // Another agent still has the third slot.
    let started = Instant::now();
    let (status, other) = app
        .post(
            "/orchestrator/events",
            Some(&token("agent-b")),
            &event("agent-b", "served"),
        )
        .await;
    let other_in = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{other}");
    // The NATS door counts the same slots: agent-a's message is refused, agent-b's admitted.
    let door_a = NatsAgent::connect(&nats.url(), "agent-a").await;
    let (status, on_door) = door_a
        .call("acc.in.event", &event("agent-a", "on-door"))
        .await;
    assert_eq!(status, 429, "{on_door}");
    assert_eq!(on_door["error"]["code"], "RATE_LIMITED", "{on_door}");
    let door_b = NatsAgent::connect(&nats.url(), "agent-b").await;
    let (status, _) = door_b
        .call("acc.in.event", &event("agent-b", "on-door"))
        .await;
    assert_eq!(status, 200);
    // Once agent-a's requests end, it is served again on both doors.
    drop(held);
    let body = eventually(Duration::from_secs(5), "agent-a served again", || async {
        let (status, body) = app
            .post(
                "/orchestrator/events",
                Some(&token("agent-a")),
                &event("agent-a", "after"),
            )
            .await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert_eq!(body["success"], true);
    let (status, _) = door_a
        .call("acc.in.event", &event("agent-a", "on-door-after"))
        .await;
    assert_eq!(status, 200);
    println!(
        "agent-a holding 2 of 3 slots: its third request 429 RATE_LIMITED in {refused_in:?}, \
         its NATS message 429; agent-b 200 in {other_in:?} and 200 on the door"
    );
}

/// Residual of issue 13, item 3 (quotas across replicas): the store quota was per process, so
/// an agent alternating between N replicas stored N times its share. Now the quota's buckets
/// live on the bus (`acc_limits`), and both replicas charge the same one, in bytes
/// (`AGENT_STORE_QUOTA`) and in messages (`AGENT_STORE_MESSAGES`).
#[tokio::test]
async fn an_agent_alternating_between_two_replicas_is_held_to_one_store_quota() {
    let nats = NatsServer::start();
    let flags = [
        "--stream-max-bytes=4MiB",
        "--agent-store-quota=128KiB",
        "--agent-store-messages=10",
    ];
    let first = TestApp::spawn_with(&nats, &flags).await;
    let second = TestApp::spawn_with(&nats, &[&flags[..], &["--roles=ingress"]].concat()).await;
    let replicas = [&first, &second];

    // Bytes: 50 KB events from agent-a, alternating, until refused.
    let a = token("agent-a");
    let mut body = event("agent-a", "x");
    body["data"] = json!("x".repeat(50_000));
    let mut stored = 0;
    let mut refusals = Vec::new();
    for i in 0..12 {
        body["event_id"] = json!(format!("big-{i}"));
        let (status, answer) = replicas[i % 2]
            .post("/orchestrator/events", Some(&a), &body)
            .await;
        match status {
            StatusCode::OK => stored += 1,
            _ => refusals.push((i % 2, status, answer)),
        }
    }
    let bytes = stored_bytes(&first.js, "acc.events.agent-a").await;
    println!(
        "bytes: agent-a alternating between 2 replicas stored {stored} events of 50 KB \
         ({bytes} bytes) of a 131,072-byte quota, then {} refusals",
        refusals.len()
    );
    assert_eq!(stored, 2, "one quota, not one per replica");
    assert!(bytes <= 128 << 10, "{bytes}");
    for (_, status, answer) in &refusals {
        assert_error(*status, answer, 429, "QUOTA_EXCEEDED");
    }
    assert!(refusals.iter().any(|(replica, ..)| *replica == 0));
    assert!(refusals.iter().any(|(replica, ..)| *replica == 1));

    // Messages: small events from agent-m, alternating, until refused.
    let m = token("agent-m");
    let mut answers = Vec::new();
    for i in 0..16 {
        let (status, answer) = replicas[i % 2]
            .post(
                "/orchestrator/events",
                Some(&m),
                &event("agent-m", &format!("small-{i}")),
            )
            .await;
        answers.push((status, answer));
    }
    let accepted = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let stored_messages = all_stored(&first.js, "ACC_EVENTS", "acc.events.agent-m")
        .await
        .len();
    println!(
        "messages: agent-m alternating stored {accepted} of 16 small events \
         (AGENT_STORE_MESSAGES=10); {stored_messages} in ACC_EVENTS"
    );
    assert_eq!(accepted, 10);
    assert_eq!(stored_messages, 10);
    for (status, answer) in &answers[10..] {
        assert_error(*status, answer, 429, "QUOTA_EXCEEDED");
    }
    // Other agents have their own quota on either replica.
    for replica in replicas {
        let (status, body) = replica
            .post(
                "/orchestrator/events",
                Some(&token("agent-b")),
                &event("agent-b", &format!("b-{}", replica.addr.port())),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    second.stop().await;
    first.stop().await;
}

/// Payload bytes `ACC_EVENTS` holds on `subject`.
async fn stored_bytes(js: &async_nats::jetstream::Context, subject: &str) -> u64 {
    raw_messages(js, "ACC_EVENTS")
        .await
        .iter()
        .filter(|m| m.subject.as_str() == subject)
        .map(|m| m.payload.len() as u64)
        .sum()
}

/// Residual of issue 13, item 6 (first reporter): the owner check and the write were two
/// steps, so agents reporting a new task id at the same moment could all be stored. Now a
/// first report is stored only while the task's subject holds nothing, which the server checks
/// as it stores: of 16 agents reporting each of 8 new task ids at once on two replicas, exactly
/// one per task is stored.
#[tokio::test]
async fn concurrent_first_reports_of_a_task_bind_exactly_one_agent() {
    let nats = NatsServer::start();
    let first = TestApp::spawn(&nats).await;
    let second = TestApp::spawn_with(&nats, &["--roles=ingress"]).await;
    let replicas = [&first, &second];
    const AGENTS: usize = 16;
    const TASKS: usize = 8;
    let mut winners = Vec::new();
    let mut refused = 0;
    for task in 0..TASKS {
        let task_id = format!("t-race-{task}");
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(AGENTS));
        let reports = (0..AGENTS).map(|i| {
            let (barrier, app, task_id) = (barrier.clone(), replicas[i % 2], task_id.clone());
            async move {
                let agent = format!("agent-{i}");
                let request = app
                    .http
                    .post(app.url(&format!("/orchestrator/tasks/{task_id}/callback")))
                    .bearer_auth(token(&agent))
                    .json(&json!({"status": "done", "result": agent}));
                barrier.wait().await;
                let (status, body) = read(request.send().await.unwrap()).await;
                (agent, status, body)
            }
        });
        let answers = futures::future::join_all(reports).await;
        let won: Vec<_> = answers
            .iter()
            .filter(|(_, status, _)| *status == StatusCode::OK)
            .map(|(agent, ..)| agent.clone())
            .collect();
        let stored = all_stored(
            &first.js,
            "ACC_TASKS",
            &format!("acc.tasks.result.{task_id}"),
        )
        .await;
        assert_eq!(won.len(), 1, "{task_id}: {won:?} all stored");
        assert_eq!(stored.len(), 1, "{task_id}: {stored:?}");
        assert_eq!(stored[0]["reported_by"], won[0].as_str());
        // Every other agent gets the same 403 as its read of the task.
        let (status, read_by_other) = first
            .get(
                &format!("/orchestrator/tasks/{task_id}"),
                Some(&token(if won[0] == "agent-0" {
                    "agent-1"
                } else {
                    "agent-0"
                })),
            )
            .await;
        assert_error(status, &read_by_other, 403, "FORBIDDEN");
        for (_, status, body) in answers.iter().filter(|(a, ..)| *a != won[0]) {
            assert_error(*status, body, 403, "FORBIDDEN");
            assert_eq!(body["error"], read_by_other["error"]);
            refused += 1;
        }
        // The winner reads its result and may report again.
        let (status, read_by_owner) = second
            .get(
                &format!("/orchestrator/tasks/{task_id}"),
                Some(&token(&won[0])),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{read_by_owner}");
        assert_eq!(read_by_owner["result"], won[0].as_str());
        winners.push(won[0].clone());
    }
    println!(
        "{TASKS} new task ids, each reported by {AGENTS} agents at once on 2 replicas: \
         1 stored per task (winners {winners:?}), {refused} refused 403 FORBIDDEN"
    );
    second.stop().await;
    first.stop().await;
}

/// The other side of the first-report rule: reports racing on a new task id from its own agent
/// are all the owner's. Of 8 different results one agent sends at once on two replicas, one is
/// stored first and the other 7 find it theirs on a second read and are stored after it; a
/// repeat of one of them is its duplicate, not an 8th write.
#[tokio::test]
async fn concurrent_first_reports_of_one_agent_are_all_stored() {
    let nats = NatsServer::start();
    let first = TestApp::spawn(&nats).await;
    let second = TestApp::spawn_with(&nats, &["--roles=ingress"]).await;
    let replicas = [&first, &second];
    const REPORTS: usize = 8;
    let task_id = "t-own-race";
    let path = format!("/orchestrator/tasks/{task_id}/callback");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(REPORTS));
    let reports = (0..REPORTS).map(|i| {
        let (barrier, app, path) = (barrier.clone(), replicas[i % 2], path.clone());
        async move {
            let request = app
                .http
                .post(app.url(&path))
                .bearer_auth(token("agent-owner"))
                .json(&json!({"status": "running", "result": i}));
            barrier.wait().await;
            read(request.send().await.unwrap()).await
        }
    });
    let answers = futures::future::join_all(reports).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["duplicate"], false, "{body}");
    }
    let subject = format!("acc.tasks.result.{task_id}");
    let stored = all_stored(&first.js, "ACC_TASKS", &subject).await;
    assert_eq!(stored.len(), REPORTS, "{stored:?}");
    assert!(stored.iter().all(|r| r["reported_by"] == "agent-owner"));

    let (status, repeat) = second
        .post(
            &path,
            Some(&token("agent-owner")),
            &json!({"status": "running", "result": 3}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{repeat}");
    assert_eq!(repeat["duplicate"], true, "{repeat}");
    assert_eq!(
        all_stored(&first.js, "ACC_TASKS", &subject).await.len(),
        REPORTS
    );
    second.stop().await;
    first.stop().await;
}

/// Issue 13, row 13's residual (`ACC_INBOUND`'s 100 ms duplicate window, shared by all agents):
/// JetStream dedupes on `Nats-Msg-Id` before the door runs, and that cannot be scoped to an
/// agent. `Idempotency-Key` is not read by JetStream, only by the door, per agent and for
/// `DUPLICATE_WINDOW`: another agent sending the same key at the same moment changes nothing,
/// and the agent's own retry well past 100 ms is still one message.
#[tokio::test]
async fn an_idempotency_key_on_the_nats_door_is_scoped_to_its_agent_past_100_ms() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-a").await;
    app.register("agent-b").await;
    let (a, b) = (
        NatsAgent::connect(&nats.url(), "agent-a").await,
        NatsAgent::connect(&nats.url(), "agent-b").await,
    );
    // agent-a sends the key first; agent-b's message with it, at once, is its own.
    let (squat, real) = tokio::join!(beat(&a), beat(&b));
    assert_eq!(squat.0, 200, "{}", squat.1);
    assert_eq!(real.0, 200, "{}", real.1);
    assert_eq!(real.1["duplicate"], false, "{}", real.1);
    // agent-b's retry after a lost answer, past ACC_INBOUND's window: one message.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let retry = beat(&b).await;
    assert_eq!(retry.1["duplicate"], true, "{}", retry.1);
    assert_eq!(retry.1["seq"], real.1["seq"]);
    println!(
        "Idempotency-Key shared by two agents at once: both stored (seq {} and {}); \
         agent-b's retry 300 ms later duplicate: {}",
        squat.1["seq"], real.1["seq"], retry.1["duplicate"]
    );
}

/// A heartbeat from `agent` on the NATS door with the `Idempotency-Key` `shared-key-1`.
async fn beat(agent: &NatsAgent) -> DoorAnswer {
    let body = serde_json::to_vec(&json!({"agent_id": agent.agent})).unwrap();
    agent
        .call_with(
            "acc.in.heartbeat",
            Some(&token(&agent.agent)),
            body,
            &[("Idempotency-Key", "shared-key-1")],
            Duration::from_secs(10),
        )
        .await
        .expect("the door answers")
}

/// Issue 18, item 4: a replica's first draw on an agent's store quota creates the pool's key
/// with no read first (a new agent has none). That the key may exist already (another replica
/// drew first) is covered by the test above: each replica's first draw there finds it.
#[tokio::test]
async fn an_agents_first_message_draws_its_store_quota_with_no_read() {
    const AGENTS: usize = 5;
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let mut api = ApiRequests::watch(&nats).await;
    for i in 0..AGENTS {
        let agent = format!("new-{i}");
        let (status, body) = app
            .post(
                "/orchestrator/events",
                Some(&token(&agent)),
                &event(&agent, "first"),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let reads = api.reads_of("acc_limits").await;
    assert!(
        reads.is_empty(),
        "{} reads of the limits bucket for {AGENTS} new agents' first events: {reads:?}",
        reads.len()
    );
    let limits = app.js.get_key_value("acc_limits").await.unwrap();
    for i in 0..AGENTS {
        let key = auto_com_center::bus::subjects::store_quota_key(
            &auto_com_center::domain::AgentId::parse(&format!("new-{i}")).unwrap(),
        );
        assert!(
            limits.get(&key).await.unwrap().is_some(),
            "new-{i}'s pool was created"
        );
    }
    app.stop().await;
}
