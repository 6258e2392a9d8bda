//! Fault tests, bounded and on loopback. Every request of a load is classified as Jepsen does:
//! **ok** (200, and read back where the ack said), **lost** (200 but not there) or **unknown**
//! (no 200: a 503, a refused or reset connection); unknowns are retried with the same dedupe id
//! (the event id) as a client would, and must then be stored exactly once. Each test prints its
//! tally; docs/RELIABILITY.md records the figures.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::helpers::*;

/// What one request got.
#[derive(Debug, Clone)]
struct Outcome {
    event_id: String,
    sent_at: Duration,
    /// `None`: no HTTP answer (connection refused or reset, or the client's own timeout).
    status: Option<u16>,
    code: Option<String>,
    retry_after: bool,
    latency: Duration,
    ack: Option<(String, u64)>,
}

/// Posts one event and records what came back.
async fn send_event(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    agent: &str,
    event_id: &str,
) -> (Option<u16>, Option<String>, bool, Option<(String, u64)>) {
    let response = http
        .post(format!("{base}/orchestrator/events"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(15))
        .json(&event(agent, event_id))
        .send()
        .await;
    let Ok(response) = response else {
        return (None, None, false, None);
    };
    let status = response.status().as_u16();
    let retry_after = response.headers().contains_key("retry-after");
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let ack = (status == 200).then(|| {
        (
            body["stream"].as_str().unwrap().to_owned(),
            body["seq"].as_u64().unwrap(),
        )
    });
    let code = body["error"]["code"].as_str().map(str::to_owned);
    (Some(status), code, retry_after, ack)
}

/// An open-loop load: `rate` events a second for `duration`, each in its own task, so a slow
/// answer never slows the arrivals. `during` runs alongside (the fault), given the elapsed clock.
async fn load<F, Fut>(
    base: &str,
    agent: &str,
    prefix: &str,
    rate: u32,
    duration: Duration,
    during: F,
) -> Vec<Outcome>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let http = reqwest::Client::new();
    let token = token(agent);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let total = (duration.as_secs_f64() * f64::from(rate)) as usize;
    let arrivals = async {
        let mut tick = tokio::time::interval(interval);
        for i in 0..total {
            tick.tick().await;
            let (http, base, token, agent) = (
                http.clone(),
                base.to_owned(),
                token.clone(),
                agent.to_owned(),
            );
            let event_id = format!("{prefix}-{i:05}");
            tasks.spawn(async move {
                let sent_at = started.elapsed();
                let t0 = Instant::now();
                let (status, code, retry_after, ack) =
                    send_event(&http, &base, &token, &agent, &event_id).await;
                Outcome {
                    event_id,
                    sent_at,
                    status,
                    code,
                    retry_after,
                    latency: t0.elapsed(),
                    ack,
                }
            });
        }
    };
    tokio::join!(arrivals, during());
    let mut outcomes = Vec::with_capacity(total);
    while let Some(outcome) = tasks.join_next().await {
        outcomes.push(outcome.unwrap());
    }
    outcomes.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    outcomes
}

/// The classification of one run.
#[derive(Debug, Default)]
struct Tally {
    requests: usize,
    ok: usize,
    lost: usize,
    unknown: usize,
    duplicates: usize,
    statuses: BTreeMap<String, usize>,
    max_latency: Duration,
    /// 200s per half second of sending time: when the outage began and ended.
    timeline: Vec<usize>,
}

impl Tally {
    fn print(&self, name: &str) {
        println!(
            "FAULT {name}: requests {}, ok {}, lost {}, unknown {} (retried with the same id: \
             each stored once), duplicates {}, statuses {:?}, slowest answer {:?}, \
             200s per half second {:?}",
            self.requests,
            self.ok,
            self.lost,
            self.unknown,
            self.duplicates,
            self.statuses,
            self.max_latency,
            self.timeline
        );
    }
}

/// Classifies `outcomes`, retries the unknowns against `base` until each gets a 200, then checks
/// every 200 (first try or retry) is where its ack says, and that every event id of the load is
/// stored exactly once.
async fn classify_and_retry(
    js: &jetstream::Context,
    base: &str,
    agent: &str,
    outcomes: &[Outcome],
) -> Tally {
    let mut tally = Tally {
        requests: outcomes.len(),
        ..Tally::default()
    };
    let http = reqwest::Client::new();
    let token = token(agent);
    let mut acks: Vec<(String, String, u64)> = Vec::new();
    let mut unknowns = Vec::new();
    for outcome in outcomes {
        let label = match (&outcome.status, &outcome.code) {
            (Some(status), Some(code)) => format!("{status} {code}"),
            (Some(status), None) => status.to_string(),
            (None, _) => "no answer".to_owned(),
        };
        *tally.statuses.entry(label).or_default() += 1;
        let slot = (outcome.sent_at.as_millis() / 500) as usize;
        if tally.timeline.len() <= slot {
            tally.timeline.resize(slot + 1, 0);
        }
        if outcome.ack.is_some() {
            tally.timeline[slot] += 1;
        }
        tally.max_latency = tally.max_latency.max(outcome.latency);
        match &outcome.ack {
            Some((stream, seq)) => {
                tally.ok += 1;
                acks.push((outcome.event_id.clone(), stream.clone(), *seq));
            }
            None => {
                tally.unknown += 1;
                unknowns.push(outcome.event_id.clone());
            }
        }
    }
    // Retry the unknowns as clients would: the same event id, until a 200 (16 at a time).
    let retried: Vec<(String, String, u64)> = futures::stream::iter(unknowns)
        .map(|event_id| {
            let (http, token) = (&http, &token);
            async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    if let (Some(200), _, _, Some((stream, seq))) =
                        send_event(http, base, token, agent, &event_id).await
                    {
                        return (event_id, stream, seq);
                    }
                    assert!(
                        Instant::now() < deadline,
                        "retry of {event_id} never got a 200"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    acks.extend(retried);
    let stored = stored_events(js).await;
    for (event_id, stream, seq) in &acks {
        assert_eq!(stream, "ACC_EVENTS");
        let found = stored.get(seq);
        if found.map(|(by, id)| (by.as_str(), id.as_str())) != Some((agent, event_id.as_str())) {
            tally.lost += 1;
        }
    }
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for (by, event_id) in stored.values() {
        if by == agent {
            *per_id.entry(event_id.clone()).or_default() += 1;
        }
    }
    tally.duplicates = per_id.values().map(|n| n.saturating_sub(1)).sum();
    for outcome in outcomes {
        assert_eq!(
            per_id.get(&outcome.event_id),
            Some(&1),
            "{} is stored exactly once",
            outcome.event_id
        );
    }
    tally
}

/// Every stored event by stream sequence: (emitted_by, event_id), read in one pass.
async fn stored_events(js: &jetstream::Context) -> HashMap<u64, (String, String)> {
    let mut out = HashMap::new();
    let consumer = eventually(Duration::from_secs(30), "an events reader", || async {
        let stream = js.get_stream("ACC_EVENTS").await.ok()?;
        stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .ok()
    })
    .await;
    let pending = consumer.cached_info().num_pending as usize;
    let mut messages = consumer.messages().await.unwrap();
    while out.len() < pending {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stored events arrive")
            .unwrap()
            .unwrap();
        let seq = message.info().unwrap().stream_sequence;
        let payload: Value = serde_json::from_slice(&message.payload).unwrap();
        out.insert(
            seq,
            (
                payload["emitted_by"].as_str().unwrap().to_owned(),
                payload["event_id"].as_str().unwrap().to_owned(),
            ),
        );
    }
    out
}

fn base(app: &TestApp) -> String {
    format!("http://{}", app.addr)
}

async fn wait_for_200(app: &TestApp, agent: &str, id: &str) {
    eventually(
        Duration::from_secs(30),
        "the bridge accepting again",
        || async {
            let (status, _) = app
                .post(
                    "/orchestrator/events",
                    Some(&token(agent)),
                    &event(agent, id),
                )
                .await;
            (status == StatusCode::OK).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_nats_server_under_load_loses_nothing_acknowledged() {
    let mut nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--publish-timeout=1s"]).await;
    let kill_at = Duration::from_millis(1500);
    let restart_at = Duration::from_millis(3500);
    let nats_ref = &mut nats;
    let outcomes = load(
        &base(&app),
        "loader",
        "k9",
        200,
        Duration::from_secs(6),
        || async {
            tokio::time::sleep(kill_at).await;
            nats_ref.kill();
            tokio::time::sleep(restart_at - kill_at).await;
            nats_ref.restart();
        },
    )
    .await;
    wait_for_200(&app, "loader", "k9-probe").await;
    // While the bus was down (sent well after the kill, answered before the restart): 503 with
    // Retry-After, never a 200 and never a hang.
    let down: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.sent_at > kill_at + Duration::from_millis(100))
        .filter(|o| o.sent_at + o.latency < restart_at)
        .collect();
    assert!(down.len() > 100, "{} requests while down", down.len());
    for o in &down {
        assert_eq!(o.status, Some(503), "{o:?}");
        assert!(o.retry_after, "{o:?}");
    }
    let tally = classify_and_retry(&app.js, &base(&app), "loader", &outcomes).await;
    tally.print("kill -9 nats-server at 1.5 s, restart at 3.5 s, 200 req/s for 6 s");
    assert_eq!(tally.lost, 0);
    assert_eq!(tally.duplicates, 0);
    assert!(tally.ok > 500, "{tally:?}");
    assert!(tally.max_latency < Duration::from_secs(3), "{tally:?}");
    for o in &outcomes {
        assert!(
            matches!(o.status, Some(200 | 503)),
            "only 200 or 503: {o:?}"
        );
    }
}

/// A TCP proxy between the bridge and NATS that can pass, delay or blackhole bytes.
struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

const PASS: u8 = 0;
const DELAY: u8 = 1;
const BLACKHOLE: u8 = 2;
const PROXY_DELAY: Duration = Duration::from_millis(300);

impl Proxy {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let task = tokio::spawn({
            let mode = mode.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, mode.clone()));
                    tokio::spawn(pump(sr, cw, mode.clone()));
                }
            }
        });
        Self { port, mode, task }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes one way; holds them (and stops reading) while blackholed, sleeps before each
/// write while delayed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            match mode.load(Ordering::SeqCst) {
                BLACKHOLE => tokio::time::sleep(Duration::from_millis(10)).await,
                DELAY => {
                    tokio::time::sleep(PROXY_DELAY).await;
                    break;
                }
                _ => break,
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Resident memory of this process (the bridge runs in it), from /proc.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_stalled_nats_link_keeps_the_wait_bounded_and_sheds_excess_load() {
    const CAP: usize = 32;
    let nats = NatsServer::start();
    let proxy = Proxy::start(nats.port).await;
    let app = TestApp::start(settings(
        Some(&proxy.url()),
        &[
            "--publish-timeout=1s",
            &format!("--max-in-flight={CAP}"),
            // The load is one agent's: it may hold every slot (the per-agent cap is tried in
            // attacks.rs).
            &format!("--max-in-flight-per-agent={CAP}"),
            "--rate-limit-per-agent=0",
        ],
    ))
    .await;
    wait_for_200(&app, "slow", "warm").await;

    // Slow link: every hop delayed 300 ms; answers come, slower, none past the bound.
    proxy.set(DELAY);
    let slow = load(
        &base(&app),
        "slow",
        "delay",
        20,
        Duration::from_secs(2),
        || async {},
    )
    .await;
    proxy.set(PASS);
    let slow_max = slow.iter().map(|o| o.latency).max().unwrap();
    let slow_ok = slow.iter().filter(|o| o.status == Some(200)).count();
    println!(
        "slow link (+{PROXY_DELAY:?} each way): {} requests, {slow_ok} ok, slowest {slow_max:?}",
        slow.len()
    );
    assert!(
        slow_max < Duration::from_millis(1800),
        "bounded wait: {slow_max:?}"
    );
    assert!(slow_ok > 0, "a slow link still stores");

    // Stalled link at 400 req/s: at most CAP requests wait (each at most the publish timeout),
    // the rest are refused at once with 503 OVERLOADED; memory does not grow with the load.
    let rss_before = rss_kib();
    proxy.set(BLACKHOLE);
    let stalled = load(
        &base(&app),
        "slow",
        "stall",
        400,
        Duration::from_secs(3),
        || async {},
    )
    .await;
    let rss_during = rss_kib();
    proxy.set(PASS);
    wait_for_200(&app, "slow", "after-stall").await;
    let waited = stalled
        .iter()
        .filter(|o| o.code.as_deref() == Some("BUS_UNAVAILABLE"))
        .count();
    let shed = stalled
        .iter()
        .filter(|o| o.code.as_deref() == Some("OVERLOADED"))
        .count();
    let stalled_max = stalled.iter().map(|o| o.latency).max().unwrap();
    println!(
        "stalled link: {} requests, {waited} waited the 1 s bound then 503 BUS_UNAVAILABLE, \
         {shed} shed at once with 503 OVERLOADED, slowest {stalled_max:?}, RSS {rss_before} KiB \
         before, {rss_during} KiB during",
        stalled.len()
    );
    assert!(
        stalled_max < Duration::from_millis(2500),
        "bounded: {stalled_max:?}"
    );
    assert!(shed > stalled.len() / 2, "excess load is shed: {shed}");
    // At most CAP wait at once, each about 1 s: over 3 s, at most about 4 × CAP waited.
    assert!(waited <= 5 * CAP, "{waited} waited");
    assert!(
        rss_during < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_during} KiB"
    );

    let mut all = slow;
    all.extend(stalled);
    let tally = classify_and_retry(&app.js, &base(&app), "slow", &all).await;
    tally.print("slow link (300 ms per hop) at 20 req/s, then stalled link at 400 req/s, cap 32");
    assert_eq!(tally.lost, 0);
    assert_eq!(tally.duplicates, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transiently_failing_message_is_dead_lettered_after_its_deliveries_and_the_worker_goes_on()
 {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    // Valid on the wire and well-formed, impossible for the worker: a heartbeat of an agent that
    // never registers. Each delivery fails as "not in the registry yet" until the bound.
    let heartbeat = json!({
        "agent_id": "ghost", "status": "online", "received_at": "2026-11-28T10:00:00Z",
    });
    let ack = app
        .js
        .publish(
            "acc.agents.heartbeat.ghost",
            serde_json::to_vec(&heartbeat).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // The worker keeps going meanwhile.
    app.register("alive").await;
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&token("alive")),
            &json!({"agent_id": "alive"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let started = Instant::now();
    let dead = eventually(Duration::from_secs(30), "the dead letter", || async {
        let mut stream = app.js.get_stream("ACC_DEAD_LETTER").await.unwrap();
        (stream.info().await.unwrap().state.messages == 1).then_some(stream)
    })
    .await;
    let message = dead.get_raw_message(1).await.unwrap();
    let header = |name: &str| message.headers.get(name).unwrap().as_str().to_owned();
    let reason = header("Acc-Dead-Letter-Reason");
    assert!(reason.contains("not in the registry"), "{reason}");
    assert_eq!(header("Acc-Dead-Letter-Sequence"), ack.sequence.to_string());
    let consumer_info = app
        .js
        .get_stream("ACC_AGENTS")
        .await
        .unwrap()
        .get_consumer::<jetstream::consumer::pull::Config>("registry")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    println!(
        "FAULT poison heartbeat: dead-lettered after {:?} with reason {reason:?}; registry \
         consumer ack_pending {} pending {}",
        started.elapsed(),
        consumer_info.num_ack_pending,
        consumer_info.num_pending
    );
    // A registration after the poison was applied while the poison was being retried.
    let (_, agents) = app.get("/orchestrator/agents", Some(&admin_token())).await;
    assert!(
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["agent_id"] == "alive"),
        "{agents}"
    );
    // Nothing is left half-done on the consumer.
    eventually(Duration::from_secs(10), "the consumer drained", || async {
        let mut consumer = app
            .js
            .get_stream("ACC_AGENTS")
            .await
            .unwrap()
            .get_consumer::<jetstream::consumer::pull::Config>("registry")
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
    })
    .await;
}

/// The bridge binary serving HTTP on `port` against `nats_url`, with `roles`.
fn spawn_bridge(nats_url: &str, port: u16, roles: &str) -> std::process::Child {
    spawn_bridge_with(nats_url, port, roles, &[])
}

/// [`spawn_bridge`] with more settings (`env`, e.g. `DISPATCHER_LEASE_TTL`).
pub(crate) fn spawn_bridge_with(
    nats_url: &str,
    port: u16,
    roles: &str,
    env: &[(&str, &str)],
) -> std::process::Child {
    binary()
        .args(["serve"])
        .env("SHARED_SECRET", SECRET)
        .env("NATS_URL", nats_url)
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("ROLES", roles)
        .env("PUBLISH_TIMEOUT", "2s")
        .env("SHUTDOWN_TIMEOUT", "10s")
        .env("LOG_LEVEL", "error")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the bridge")
}

pub(crate) fn signal(child: &std::process::Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill({}, {signal})", child.id());
}

/// Waits for the child to exit, at most `within`.
pub(crate) async fn exited(
    child: &mut std::process::Child,
    within: Duration,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_in_flight_work_and_loses_nothing_acknowledged() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let nats = NatsServer::start();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut bridge = spawn_bridge(&nats.url(), port, "ingress,registry");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(20), "the bridge ready", || async {
        let ready = http.get(format!("{url}/health/ready")).send().await;
        ready.is_ok_and(|r| r.status() == 200).then_some(())
    })
    .await;

    // A request in flight across the signal: headers and half the body before, the rest after.
    let body = serde_json::to_vec(&event("loader", "in-flight")).unwrap();
    let (first_half, second_half) = body.split_at(body.len() / 2);
    let mut in_flight = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "POST /orchestrator/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        token("loader"),
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.unwrap();
    in_flight.write_all(first_half).await.unwrap();

    // Registrations alongside, for the registry worker to be busy with.
    let registrations = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            let mut accepted = Vec::new();
            for i in 0..300 {
                let agent = format!("reg-{i:03}");
                let answer = http
                    .post(format!("{url}/orchestrator/register"))
                    .bearer_auth(token(&agent))
                    .json(&registration(&agent))
                    .send()
                    .await;
                if answer.is_ok_and(|r| r.status() == 200) {
                    accepted.push(agent);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            accepted
        }
    });

    let term_at = Duration::from_millis(1500);
    let bridge_ref = &bridge;
    let outcomes = load(
        &url,
        "loader",
        "term",
        200,
        Duration::from_secs(3),
        || async {
            tokio::time::sleep(term_at).await;
            signal(bridge_ref, libc::SIGTERM);
            tokio::time::sleep(Duration::from_millis(200)).await;
            in_flight.write_all(second_half).await.unwrap();
        },
    )
    .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), in_flight.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the in-flight request completes: {answer}"
    );
    let in_flight_body: Value = answer
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .expect("a JSON body");
    let in_flight_ack = (
        in_flight_body["stream"].as_str().unwrap().to_owned(),
        in_flight_body["seq"].as_u64().unwrap(),
    );
    let status = exited(&mut bridge, Duration::from_secs(20)).await;
    assert!(status.success(), "clean exit: {status:?}");
    let registered = registrations.await.unwrap();

    // Before the signal everything is a 200; after it, a 503 or no connection, never a hang.
    for o in &outcomes {
        if o.sent_at + o.latency < term_at {
            assert_eq!(o.status, Some(200), "{o:?}");
        }
        assert!(matches!(o.status, None | Some(200 | 503)), "{o:?}");
        assert!(o.latency < Duration::from_secs(5), "{o:?}");
    }
    // The worker finished what it had taken: nothing is left delivered-but-unacknowledged.
    let js = jetstream::new(nats.client().await);
    let mut consumer = js
        .get_stream("ACC_AGENTS")
        .await
        .unwrap()
        .get_consumer::<jetstream::consumer::pull::Config>("registry")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap().clone();
    assert_eq!(info.num_ack_pending, 0, "{info:?}");

    // A new bridge on the same bus: every acknowledged write is there; retried unknowns once.
    let app = TestApp::spawn(&nats).await;
    let mut all = outcomes.clone();
    all.push(Outcome {
        event_id: "in-flight".into(),
        sent_at: Duration::ZERO,
        status: Some(200),
        code: None,
        retry_after: false,
        latency: Duration::ZERO,
        ack: Some(in_flight_ack),
    });
    let tally = classify_and_retry(&app.js, &base(&app), "loader", &all).await;
    tally.print("SIGTERM at 1.5 s of 200 req/s for 3 s");
    println!(
        "SIGTERM: {} registrations acknowledged before the stop, registry consumer left \
         {} unacknowledged",
        registered.len(),
        info.num_ack_pending
    );
    assert_eq!(tally.lost, 0);
    assert_eq!(tally.duplicates, 0);
    // Every acknowledged registration reaches the registry (the new bridge runs it).
    eventually(
        Duration::from_secs(20),
        "every registration applied",
        || async {
            let (_, list) = app.get("/orchestrator/agents", Some(&admin_token())).await;
            let listed: Vec<&str> = list["agents"]
                .as_array()?
                .iter()
                .filter_map(|a| a["agent_id"].as_str())
                .collect();
            registered
                .iter()
                .all(|a| listed.contains(&a.as_str()))
                .then_some(())
        },
    )
    .await;
}

/// Every key and value of the agents bucket.
async fn registry_contents(js: &jetstream::Context) -> BTreeMap<String, Value> {
    let bucket = js
        .get_key_value(auto_com_center::bus::subjects::AGENTS_BUCKET)
        .await
        .unwrap();
    let mut keys: Vec<String> = bucket
        .keys()
        .await
        .unwrap()
        .map(|k| k.unwrap())
        .collect()
        .await;
    keys.sort();
    let mut out = BTreeMap::new();
    for key in keys {
        let value = bucket.get(&key).await.unwrap().unwrap();
        out.insert(key, serde_json::from_slice(&value).unwrap());
    }
    out
}

/// Every status change the registry announced, as (subject, payload), sorted.
async fn status_changes(js: &jetstream::Context) -> Vec<(String, Value)> {
    let mut stream = js.get_stream("ACC_AGENTS").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(message) = stream.get_raw_message(seq).await {
            if message.subject.starts_with("acc.agents.status.") {
                let payload: Value = serde_json::from_slice(&message.payload).unwrap();
                out.push((message.subject.to_string(), payload));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.to_string().cmp(&b.1.to_string())));
    out
}

async fn consumer_drained(js: &jetstream::Context) {
    eventually(
        Duration::from_secs(30),
        "the registry consumer drained",
        || async {
            let mut consumer = js
                .get_stream("ACC_AGENTS")
                .await
                .ok()?
                .get_consumer::<jetstream::consumer::pull::Config>("registry")
                .await
                .ok()?;
            let info = consumer.info().await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_before_it_acks_ends_with_the_registry_of_a_run_without_the_kill() {
    const AGENTS: usize = 300;
    let killed_run = NatsServer::start();
    let clean_run = NatsServer::start();
    // The same agent messages on both buses: written once through the ingress, copied verbatim
    // (payload and dedupe id) to the other bus.
    let ingress = TestApp::spawn_with(&killed_run, &["--roles=ingress"]).await;
    let clean_ingress = TestApp::spawn_with(&clean_run, &["--roles=ingress"]).await;
    for i in 0..AGENTS {
        let agent = format!("agent-{i:03}");
        ingress.register(&agent).await;
        let mut again = registration(&agent);
        again["name"] = json!(format!("Renamed {agent}"));
        let (status, body) = ingress
            .post("/orchestrator/register", Some(&token(&agent)), &again)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let source = ingress.js.get_stream("ACC_AGENTS").await.unwrap();
    let last = source.cached_info().state.last_sequence;
    for seq in 1..=last {
        let message = source.get_raw_message(seq).await.unwrap();
        clean_ingress
            .js
            .publish_with_headers(
                message.subject.to_string(),
                message.headers.clone(),
                message.payload.clone(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    // The clean run: one registry, never disturbed.
    let clean_registry = TestApp::spawn_with(&clean_run, &["--roles=registry"]).await;
    consumer_drained(&clean_ingress.js).await;

    // The killed run: a registry process, kill -9 once it has applied some but not all.
    let mut worker = spawn_bridge(&killed_run.url(), free_port(), "registry");
    let kv = format!("KV_{}", auto_com_center::bus::subjects::AGENTS_BUCKET);
    let applied_at_kill = eventually(Duration::from_secs(20), "some records applied", || async {
        let mut stream = ingress.js.get_stream(&kv).await.ok()?;
        let written = stream.info().await.ok()?.state.messages;
        (written > 0).then_some(written)
    })
    .await;
    signal(&worker, libc::SIGKILL);
    let _ = exited(&mut worker, Duration::from_secs(5)).await;
    let mut consumer = ingress
        .js
        .get_stream("ACC_AGENTS")
        .await
        .unwrap()
        .get_consumer::<jetstream::consumer::pull::Config>("registry")
        .await
        .unwrap();
    let at_kill = consumer.info().await.unwrap().clone();
    println!(
        "worker kill -9: {applied_at_kill} records written when killed; consumer then had \
         {} delivered-unacknowledged, {} not yet delivered, of {last} messages",
        at_kill.num_ack_pending, at_kill.num_pending
    );
    assert!(
        at_kill.num_pending + at_kill.num_ack_pending as u64 > 0,
        "killed mid-stream: {at_kill:?}"
    );
    let restarted = TestApp::spawn_with(&killed_run, &["--roles=registry"]).await;
    consumer_drained(&ingress.js).await;

    let (killed, clean) = (
        registry_contents(&ingress.js).await,
        registry_contents(&clean_ingress.js).await,
    );
    assert_eq!(killed.len(), AGENTS);
    assert_eq!(
        killed, clean,
        "the registry after the kill equals the clean run's"
    );
    let (killed_changes, clean_changes) = (
        status_changes(&ingress.js).await,
        status_changes(&clean_ingress.js).await,
    );
    assert_eq!(killed_changes.len(), clean_changes.len());
    assert_eq!(
        killed_changes, clean_changes,
        "the same status changes, once each"
    );
    println!(
        "FAULT worker kill -9 before ack: {last} messages, {} records, {} status changes, \
         identical to the undisturbed run",
        killed.len(),
        killed_changes.len()
    );
    drop((restarted, clean_registry));
}

/// Three JetStream servers clustered on loopback ports, named n1..n3, each with
/// `deploy/nats/cluster.conf`: the configuration docker-compose.cluster.yml's nodes use.
fn start_cluster() -> Vec<NatsServer> {
    let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes = cluster_ports
        .iter()
        .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    (0..3)
        .map(|i| {
            NatsServer::start_with_config_file(
                "deploy/nats/cluster.conf",
                &[
                    ("NATS_SERVER_NAME", format!("n{}", i + 1)),
                    (
                        "NATS_CLUSTER_LISTEN",
                        format!("127.0.0.1:{}", cluster_ports[i]),
                    ),
                    ("NATS_CLUSTER_ROUTES", format!("[{routes}]")),
                ],
                free_port(),
            )
        })
        .collect()
}

/// Waits until the cluster's JetStream answers (a meta leader is elected).
async fn jetstream_ready(url: &str) {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    eventually(
        Duration::from_secs(30),
        "JetStream cluster ready",
        || async { js.query_account().await.ok().map(|_| ()) },
    )
    .await;
}

/// The name of the server leading `stream`.
async fn stream_leader(js: &jetstream::Context, stream: &str) -> String {
    eventually(Duration::from_secs(20), "a stream leader", || async {
        let mut stream = js.get_stream(stream).await.ok()?;
        let info = stream.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_nothing_when_the_leader_dies_or_everything_bounces() {
    let mut nodes = start_cluster();
    let urls = nodes
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    jetstream_ready(&nodes[0].url()).await;
    let app = TestApp::start(settings(
        Some(&urls),
        &[
            "--stream-replicas=3",
            "--durability=interval",
            "--publish-timeout=2s",
            "--rate-limit-per-agent=0",
        ],
    ))
    .await;
    wait_for_200(&app, "loader", "warm").await;
    let mut events = app.js.get_stream("ACC_EVENTS").await.unwrap();
    let info = events.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    let bucket = app.js.get_stream("KV_acc_agents").await.unwrap();
    assert_eq!(bucket.cached_info().config.num_replicas, 3);

    // 1. Kill -9 the ACC_EVENTS leader at 2 s, under 200 req/s for 14 s; bring it back at 5 s.
    // NATS elects a new stream leader after its Raft election timeout (4 to 9 s), so the load
    // runs long enough to see writes come back.
    let leader = stream_leader(&app.js, "ACC_EVENTS").await;
    let index: usize = leader.trim_start_matches('n').parse::<usize>().unwrap() - 1;
    let nodes_ref = &mut nodes;
    let outcomes = load(
        &base(&app),
        "loader",
        "lead",
        200,
        Duration::from_secs(14),
        || async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            nodes_ref[index].kill();
            tokio::time::sleep(Duration::from_secs(3)).await;
            nodes_ref[index].restart();
        },
    )
    .await;
    let new_leader = stream_leader(&app.js, "ACC_EVENTS").await;
    let tally = classify_and_retry(&app.js, &base(&app), "loader", &outcomes).await;
    tally.print(&format!(
        "3-node cluster, R3: kill -9 of the stream leader {leader} at 2 s of 200 req/s for 14 s \
         (new leader {new_leader})"
    ));
    assert_eq!(tally.lost, 0);
    assert_eq!(tally.duplicates, 0);
    for o in &outcomes {
        assert!(matches!(o.status, Some(200 | 503)), "{o:?}");
    }

    // 2. Bounce the whole cluster at 1 s, back at 3 s, under 100 req/s for 12 s.
    let nodes_ref = &mut nodes;
    let down_from = Duration::from_millis(1000);
    let down_until = Duration::from_millis(3000);
    let outcomes = load(
        &base(&app),
        "bouncer",
        "bounce",
        100,
        Duration::from_secs(12),
        || async {
            tokio::time::sleep(down_from).await;
            for node in nodes_ref.iter_mut() {
                node.kill();
            }
            tokio::time::sleep(down_until - down_from).await;
            for node in nodes_ref.iter_mut() {
                node.restart();
            }
        },
    )
    .await;
    wait_for_200(&app, "bouncer", "bounce-probe").await;
    for o in outcomes
        .iter()
        .filter(|o| o.sent_at > down_from + Duration::from_millis(200))
        .filter(|o| o.sent_at + o.latency < down_until)
    {
        assert_eq!(o.status, Some(503), "503 while the cluster is down: {o:?}");
        assert!(o.retry_after, "{o:?}");
    }
    let tally = classify_and_retry(&app.js, &base(&app), "bouncer", &outcomes).await;
    tally
        .print("3-node cluster, R3: all three killed at 1 s, restarted at 3 s, 100 req/s for 12 s");
    assert_eq!(tally.lost, 0);
    assert_eq!(tally.duplicates, 0);
    assert!(tally.max_latency < Duration::from_secs(4), "{tally:?}");
}
