//! `GET /orchestrator/events/stream`: Server-Sent Events of stored events, resumable by id on
//! any replica, with filters, a reset for resume points the stream no longer holds, and
//! subscribers that cannot keep up cut off without slowing the others. And
//! `GET /orchestrator/tasks/{id}/stream`: one task's states until the terminal one.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

/// A token that may read the event streams.
fn reader_token(agent: &str) -> String {
    auth_token(agent, "orchestrator.events.read")
}

fn auth_token(agent: &str, scope: &str) -> String {
    auto_com_center::auth::mint(
        &secret(),
        &auto_com_center::domain::AgentId::parse(agent).unwrap(),
        scope,
        Duration::from_secs(3600),
    )
}

/// One SSE event as read off the wire.
#[derive(Debug, Clone, Default)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Reads SSE events from a streaming response.
struct SseReader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: String,
}

impl SseReader {
    async fn open(app: &TestApp, query: &str, token: &str, last_event_id: Option<&str>) -> Self {
        let response = Self::request(app, query, token, last_event_id).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    async fn request(
        app: &TestApp,
        query: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> reqwest::Response {
        let path = format!("/orchestrator/events/stream{query}");
        Self::request_path(app, &path, token, last_event_id).await
    }

    /// A stream at `path`, expecting 200.
    async fn open_path(
        app: &TestApp,
        path: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Self {
        let response = Self::request_path(app, path, token, last_event_id).await;
        assert_eq!(response.status(), StatusCode::OK);
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    async fn request_path(
        app: &TestApp,
        path: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> reqwest::Response {
        let mut request = app.http.get(app.url(path)).bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        request.send().await.unwrap()
    }

    /// The next event (comments skipped), or `None` when the stream ended or nothing came
    /// within `within`.
    async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                let mut fields = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().to_owned());
                        fields = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event.event = Some(v.trim().to_owned());
                        fields = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        event.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        fields = true;
                    }
                }
                if fields {
                    return Some(event);
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// True when the server ends the stream within `within` with no further event (comments
    /// aside).
    async fn ends(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let has_event = |buffer: &str| buffer.lines().any(|l| !l.is_empty() && !l.starts_with(':'));
        loop {
            if has_event(&self.buffer) {
                return false;
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) => return true,
                Ok(Some(Err(_))) | Err(_) => return false,
            }
        }
    }

    /// The next `n` events, failing the test when they do not come in time.
    async fn take(&mut self, n: usize) -> Vec<SseEvent> {
        let mut events = Vec::with_capacity(n);
        for i in 0..n {
            let event = self
                .next(Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("event {} of {n} did not arrive", i + 1));
            events.push(event);
        }
        events
    }
}

/// Emits `n` events from `agent` numbered from `from`; returns their stream sequences.
async fn emit(app: &TestApp, agent: &str, from: usize, n: usize, kind: &str) -> Vec<u64> {
    let token = token(agent);
    let mut seqs = Vec::with_capacity(n);
    for i in from..from + n {
        let mut body = event(agent, &format!("e-{i}"));
        body["type"] = kind.into();
        body["data"] = json!({ "n": i });
        let (status, answer) = app.post("/orchestrator/events", Some(&token), &body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        seqs.push(answer["seq"].as_u64().unwrap());
    }
    seqs
}

fn ids(events: &[SseEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.id.as_deref().expect("an id").parse().unwrap())
        .collect()
}

#[tokio::test]
async fn a_subscriber_resuming_after_event_50_gets_exactly_51_to_100_then_new_ones() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let seqs = emit(&app, "emitter", 1, 100, "test.event").await;
    let reader = reader_token("watcher");

    let mut first = SseReader::open(&app, "?from_seq=1", &reader, None).await;
    let got = first.take(50).await;
    assert_eq!(ids(&got), seqs[..50]);
    let stored: Value = serde_json::from_str(&got[0].data).unwrap();
    assert_eq!(
        stored["event_id"], "e-1",
        "data is the stored JSON: {stored}"
    );
    let last_id = got[49].id.clone().unwrap();
    drop(first);

    let mut resumed = SseReader::open(&app, "", &reader, Some(&last_id)).await;
    let replayed = resumed.take(50).await;
    assert_eq!(ids(&replayed), seqs[50..], "exactly the gap, in order");
    let more = emit(&app, "emitter", 101, 5, "test.event").await;
    let live = resumed.take(5).await;
    assert_eq!(ids(&live), more, "then the new events, no duplicate");
    assert!(
        resumed.next(Duration::from_millis(300)).await.is_none(),
        "nothing more"
    );
}

#[tokio::test]
async fn a_resume_on_a_second_replica_replays_the_same_gap() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let replica = TestApp::spawn_with(&nats, &["--roles=ingress"]).await;
    let seqs = emit(&app, "emitter", 1, 20, "test.event").await;
    let reader = reader_token("watcher");

    let mut first = SseReader::open(&app, "?from_seq=1", &reader, None).await;
    let got = first.take(10).await;
    drop(first);
    let mut resumed = SseReader::open(&replica, "", &reader, got[9].id.as_deref()).await;
    assert_eq!(ids(&resumed.take(10).await), seqs[10..]);
    // Live events written through the first replica reach a subscriber of the second.
    let more = emit(&app, "emitter", 21, 3, "test.event").await;
    assert_eq!(ids(&resumed.take(3).await), more);
}

#[tokio::test]
async fn a_stream_without_a_resume_point_gets_only_new_events() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    emit(&app, "emitter", 1, 5, "test.event").await;
    let mut reader = SseReader::open(&app, "", &reader_token("watcher"), None).await;
    let new = emit(&app, "emitter", 6, 2, "test.event").await;
    assert_eq!(ids(&reader.take(2).await), new);
}

#[tokio::test]
async fn a_resume_point_older_than_the_stream_holds_gets_a_reset_first() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let seqs = emit(&app, "emitter", 1, 30, "test.event").await;
    // Age out the first 19 events as the stream's limits would.
    let mut stream = app.js.get_stream("ACC_EVENTS").await.unwrap();
    stream.purge().sequence(seqs[19]).await.unwrap();
    let first_held = stream.info().await.unwrap().state.first_sequence;
    assert_eq!(first_held, seqs[19]);

    let mut reader = SseReader::open(
        &app,
        "",
        &reader_token("watcher"),
        Some(&seqs[4].to_string()),
    )
    .await;
    let reset = reader.take(1).await.remove(0);
    assert_eq!(reset.event.as_deref(), Some("reset"));
    let data: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(data["first_seq"], first_held);
    assert_eq!(ids(&reader.take(11).await), seqs[19..]);
}

#[tokio::test]
async fn type_and_source_filters_select_events() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let started = emit(&app, "alpha", 1, 2, "job.started").await;
    let done = emit(&app, "alpha", 3, 2, "job.done.ok").await;
    let other = emit(&app, "beta", 5, 2, "job.started").await;
    let reader = reader_token("watcher");

    let mut exact = SseReader::open(&app, "?from_seq=1&type=job.started", &reader, None).await;
    assert_eq!(
        ids(&exact.take(4).await),
        [started.clone(), other.clone()].concat()
    );

    let mut wildcard =
        SseReader::open(&app, "?from_seq=1&type=job.>&source=alpha", &reader, None).await;
    assert_eq!(
        ids(&wildcard.take(4).await),
        [started.clone(), done.clone()].concat()
    );
    assert!(wildcard.next(Duration::from_millis(300)).await.is_none());

    let mut star = SseReader::open(
        &app,
        "?from_seq=1&type=*.started&type=job.done.*",
        &reader,
        None,
    )
    .await;
    let mut want = [started, done, other].concat();
    want.sort_unstable();
    assert_eq!(ids(&star.take(6).await), want);
}

#[tokio::test]
async fn an_agent_token_without_the_read_scope_gets_403_and_bad_parameters_400() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let response = SseReader::request(&app, "", &token("agent-a"), None).await;
    let (status, body) = read(response).await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("orchestrator.events.read"),
        "{body}"
    );
    // An admin token reads the streams too.
    let response = SseReader::request(&app, "?type=a..b", &admin_token(), None).await;
    let (status, body) = read(response).await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
    let response = SseReader::request(&app, "", &admin_token(), Some("not-a-number")).await;
    let (status, body) = read(response).await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
}

#[tokio::test]
async fn a_caller_over_its_stream_cap_gets_429() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--sse-max-streams-per-caller=2"]).await;
    let reader = reader_token("watcher");
    let _one = SseReader::open(&app, "", &reader, None).await;
    let two = SseReader::open(&app, "", &reader, None).await;
    let response = SseReader::request(&app, "", &reader, None).await;
    assert_eq!(response.headers()["retry-after"], "1");
    let (status, body) = read(response).await;
    assert_error(status, &body, 429, "TOO_MANY_STREAMS");
    // Another caller is not affected, and a closed stream frees its slot.
    let _other = SseReader::open(&app, "", &reader_token("someone-else"), None).await;
    drop(two);
    eventually(Duration::from_secs(5), "the slot is freed", || async {
        let response = SseReader::request(&app, "", &reader, None).await;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
}

/// Publishes `total` events of 64 KiB from `emitter` in a task of their own (so that readers
/// read meanwhile): big enough that a connection that reads nothing fills its socket's buffers.
/// The task ends with how long it took from now.
fn publish_big_events(app: &TestApp, total: usize) -> tokio::task::JoinHandle<Duration> {
    let (url, token) = (app.url("/orchestrator/events"), token("emitter"));
    let http = app.http.clone();
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        for i in 0..total {
            let mut body = event("emitter", &format!("big-{i}"));
            body["data"] = json!({ "pad": "x".repeat(64 * 1024) });
            let response = http.post(&url).bearer_auth(&token).json(&body).send().await;
            assert_eq!(response.unwrap().status(), StatusCode::OK);
        }
        started.elapsed()
    })
}

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_delay_others_and_is_cut_off() {
    let nats = NatsServer::start();
    // 300 events of 64 KiB from one agent: over the test stream's default store quota.
    let app = TestApp::spawn_with(&nats, &["--sse-buffer=16", "--agent-store-quota=1GiB"]).await;
    let reader = reader_token("watcher");
    // Opened, then never read while the events flow.
    let mut stalled = SseReader::open(&app, "", &reader, None).await;
    let mut reading = SseReader::open(&app, "", &reader, None).await;
    let total = 300;
    let started = std::time::Instant::now();
    let sender = publish_big_events(&app, total);
    let got = reading.take(total).await;
    let took = started.elapsed();
    let sent_within = sender.await.unwrap();
    assert_eq!(got.len(), total);
    let mut seen = ids(&got);
    seen.dedup();
    assert_eq!(seen.len(), total, "no duplicate for the reading subscriber");
    // Measured: the reading subscriber has the last event soon after it was stored, however
    // far behind the stalled one is (a stalled subscriber that held the others back would hold
    // them until it was cut off).
    let behind = took.saturating_sub(sent_within);
    println!(
        "the reading subscriber got {total} events in {took:?} beside a stalled one; \
         the publisher took {sent_within:?}, so the reader finished {behind:?} after it"
    );
    assert!(
        behind < Duration::from_secs(2),
        "the reader finished {behind:?} after the last event was stored"
    );

    // The stalled subscriber, read at last, finds its stream ended with an overflow notice,
    // after far fewer events than were sent: what the bridge held for it is bounded (its
    // connection's buffers and the hub's ring of 16), not the whole backlog.
    let mut before_overflow = 0;
    let mut last = None;
    while let Some(event) = stalled.next(Duration::from_secs(5)).await {
        if event.id.is_some() {
            before_overflow += 1;
        }
        last = Some(event);
    }
    let last = last.expect("it got something before it was cut off");
    assert_eq!(last.event.as_deref(), Some("overflow"), "{last:?}");
    println!("the stalled subscriber got {before_overflow} of {total} events, then the overflow");
    assert!(
        before_overflow < total / 2,
        "{before_overflow} of {total} events were held for the stalled subscriber"
    );
}

/// A stream opened on a raw socket with a small receive buffer whose client then reads nothing:
/// once its socket's buffers are full, hyper stops polling the body, and only the connection's
/// write watchdog can end it.
async fn open_and_never_read(app: &TestApp, token: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(app.addr).await.unwrap();
    let request = format!(
        "GET /orchestrator/events/stream HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
        app.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // The answer's head, then nothing more is read.
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "the head ended early"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
}

#[tokio::test]
async fn a_connection_that_never_reads_is_closed_within_the_write_stall_timeout() {
    use tokio::io::AsyncReadExt as _;
    let nats = NatsServer::start();
    // The hub's ring (the default 1,024 broadcasts) holds everything sent here: the stalled
    // stream is never cut off for falling behind, only by the watchdog.
    let app = TestApp::spawn_with(
        &nats,
        &[
            "--write-stall-timeout=1s",
            "--sse-max-streams-per-caller=1",
            "--agent-store-quota=1GiB",
        ],
    )
    .await;
    let stalled_token = reader_token("stalled");
    let mut stalled = open_and_never_read(&app, &stalled_token).await;
    let mut reading = SseReader::open(&app, "", &reader_token("watcher"), None).await;
    // The stalled stream holds its caller's one slot.
    let refused = SseReader::request(&app, "", &stalled_token, None).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    drop(refused);

    // 200 events of 64 KiB, far more than the stalled socket's buffers hold, published while
    // the other subscriber reads.
    let total = 200;
    let publisher = publish_big_events(&app, total);
    assert_eq!(reading.take(total).await.len(), total);
    publisher.await.unwrap();
    let stored = std::time::Instant::now();

    // The stalled write began before the last event was stored, so within the 1 s bound of
    // it (and the time an open takes) the slot is free again.
    eventually(
        Duration::from_secs(4),
        "the stalled stream's slot is freed",
        || async {
            let response = SseReader::request(&app, "", &stalled_token, None).await;
            (response.status() == StatusCode::OK).then_some(())
        },
    )
    .await;
    let freed = stored.elapsed();
    println!("the stalled stream's slot was free {freed:?} after the last event was stored");

    // The stalled client, reading at last, finds the connection closed after what its
    // buffers held: a part of the 12.5 MiB sent, not all of it.
    let mut received = 0usize;
    let mut buffer = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the stalled connection is still open");
    println!("the stalled client got {received} bytes before the connection closed");
    assert!(
        received < total * 64 * 1024 / 2,
        "{received} bytes were held for the stalled client"
    );

    // The other subscriber goes on receiving.
    let more = emit(&app, "emitter", 1_000, 3, "test.event").await;
    assert_eq!(ids(&reading.take(3).await), more);
}

#[tokio::test]
async fn a_stream_survives_a_bus_restart_without_a_gap() {
    let mut nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let reader = reader_token("watcher");
    let mut stream = SseReader::open(&app, "", &reader, None).await;
    let mut want = emit(&app, "emitter", 1, 5, "test.event").await;
    let mut got = ids(&stream.take(5).await);

    nats.kill();
    nats.restart();
    // Writes succeed again once the bridge has reconnected.
    let body = event("emitter", "after-restart");
    let seq = eventually(
        Duration::from_secs(20),
        "a write after the restart",
        || async {
            let (status, answer) = app
                .post("/orchestrator/events", Some(&token("emitter")), &body)
                .await;
            (status == StatusCode::OK).then(|| answer["seq"].as_u64().unwrap())
        },
    )
    .await;
    want.push(seq);
    want.extend(emit(&app, "emitter", 6, 4, "test.event").await);

    // Read on; should the stream have ended with the bus, resume by the last id.
    while got.len() < want.len() {
        match stream.next(Duration::from_secs(5)).await {
            Some(event) if event.id.is_some() => got.push(event.id.unwrap().parse().unwrap()),
            Some(_) => {}
            None => {
                let last = got.last().unwrap().to_string();
                stream = SseReader::open(&app, "", &reader, Some(&last)).await;
            }
        }
    }
    assert_eq!(got, want, "every event once, in order, across the restart");
}

#[tokio::test]
async fn an_idle_hub_drops_its_consumer_and_the_next_subscriber_still_resumes_by_id() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let reader = reader_token("watcher");
    // Whatever else consumes the events stream; the hub adds one consumer only while anybody
    // is subscribed.
    let idle = consumers(&app, "ACC_EVENTS").await;
    let mut first = SseReader::open(&app, "", &reader, None).await;
    assert_eq!(
        consumers(&app, "ACC_EVENTS").await,
        idle + 1,
        "the hub's consumer"
    );
    let seen = emit(&app, "emitter", 1, 3, "test.event").await;
    assert_eq!(ids(&first.take(3).await), seen);
    drop(first);

    let idle_after = auto_com_center::streams::IDLE_AFTER;
    eventually(
        idle_after + Duration::from_secs(10),
        "the idle hub deleting its consumer",
        || async { (consumers(&app, "ACC_EVENTS").await == idle).then_some(()) },
    )
    .await;
    // Stored while nobody is subscribed.
    let missed = emit(&app, "emitter", 4, 3, "test.event").await;
    let mut resumed = SseReader::open(&app, "", &reader, Some(&seen[2].to_string())).await;
    assert_eq!(ids(&resumed.take(3).await), missed, "exactly the gap");
    let live = emit(&app, "emitter", 7, 2, "test.event").await;
    assert_eq!(
        ids(&resumed.take(2).await),
        live,
        "then live events, through the hub's new consumer, no duplicate"
    );
    assert!(resumed.next(Duration::from_millis(300)).await.is_none());
    let mut fresh = SseReader::open(&app, "", &reader, None).await;
    let newest = emit(&app, "emitter", 9, 1, "test.event").await;
    assert_eq!(ids(&fresh.take(1).await), newest);
    assert_eq!(ids(&resumed.take(1).await), newest);
}

#[tokio::test]
async fn an_idle_stream_gets_a_keepalive_comment_at_each_interval() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--sse-keepalive=200ms"]).await;
    let reader = reader_token("watcher");
    // A stream of another hub, idle from the start; one whose filter takes none of the events
    // that flow.
    let idle =
        SseReader::request_path(&app, "/orchestrator/alerts/stream", &admin_token(), None).await;
    let filtered = SseReader::request(&app, "?type=nothing.of.this", &reader, None).await;
    let emitting = emit(&app, "emitter", 1, 10, "test.event");
    let count = |response: reqwest::Response| async move {
        let mut body = Box::pin(response.bytes_stream());
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1_100);
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(!text.contains("data:"), "no event: {text}");
        text.matches(":\n\n").count()
    };
    let (idle, filtered, _) = tokio::join!(count(idle), count(filtered), emitting);
    for (what, comments) in [("idle", idle), ("filtered", filtered)] {
        assert!(
            (3..=7).contains(&comments),
            "{what}: {comments} comments in 1.1 s at 200 ms"
        );
    }
}

/// A task's stream path.
fn task_stream(task_id: &str) -> String {
    format!("/orchestrator/tasks/{task_id}/stream")
}

fn submitter() -> String {
    auth_token("client-1", "orchestrator.submit")
}

async fn submit_task(app: &TestApp, task_id: &str, capability: &str) {
    let (status, answer) = app
        .post(
            "/orchestrator/tasks",
            Some(&submitter()),
            &json!({ "task_id": task_id, "capability": capability }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
}

async fn claim_one(app: &TestApp, agent: &str) {
    let (status, answer) = app
        .post(
            "/orchestrator/tasks/claim",
            Some(&token(agent)),
            &json!({ "wait": "5s" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["tasks"].as_array().unwrap().len(), 1, "{answer}");
}

async fn report(app: &TestApp, agent: &str, task_id: &str, status: &str) {
    let (code, answer) = app
        .post(
            &format!("/orchestrator/tasks/{task_id}/callback"),
            Some(&token(agent)),
            &json!({ "status": status, "result": { "ok": true } }),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{answer}");
}

/// The status a task stream's event carries, and its id (the record's revision).
fn state(event: &SseEvent) -> (String, u64) {
    let view: Value = serde_json::from_str(&event.data).unwrap();
    (
        view["status"].as_str().unwrap().to_owned(),
        event.id.as_deref().expect("an id").parse().unwrap(),
    )
}

async fn consumers(app: &TestApp, stream: &str) -> usize {
    let mut stream = app.js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.consumer_count
}

#[tokio::test]
async fn a_task_stream_sends_queued_dispatched_running_succeeded_and_then_ends() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    crate::tasks::register_worker(&app, "worker-1", &["summarize"], 1).await;
    submit_task(&app, "t-live", "summarize").await;
    // The first watcher has the replica's hub follow the bucket.
    let mut stream = SseReader::open_path(&app, &task_stream("t-live"), &submitter(), None).await;
    let before = consumers(&app, "KV_acc_tasks").await;
    // More watchers of the same and of another task: still no consumer of their own.
    let _admin = SseReader::open_path(&app, &task_stream("t-live"), &admin_token(), None).await;
    let _second = SseReader::open_path(&app, &task_stream("t-live"), &submitter(), None).await;
    assert_eq!(
        consumers(&app, "KV_acc_tasks").await,
        before,
        "task streams share the replica's one consumer of the bucket"
    );

    let mut seen = vec![state(&stream.take(1).await[0])];
    claim_one(&app, "worker-1").await;
    seen.push(state(&stream.take(1).await[0]));
    report(&app, "worker-1", "t-live", "running").await;
    seen.push(state(&stream.take(1).await[0]));
    report(&app, "worker-1", "t-live", "succeeded").await;
    let last = stream.take(1).await.remove(0);
    seen.push(state(&last));
    let statuses: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["queued", "dispatched", "running", "succeeded"]);
    assert!(
        seen.windows(2).all(|w| w[0].1 < w[1].1),
        "ids are increasing revisions: {seen:?}"
    );
    let view: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(view["result"], json!({ "ok": true }), "{view}");
    assert!(
        stream.ends(Duration::from_secs(5)).await,
        "the stream ends after the terminal state"
    );
}

#[tokio::test]
async fn a_task_stream_resumed_after_a_state_change_gets_only_later_states() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    crate::tasks::register_worker(&app, "worker-1", &["summarize"], 1).await;
    submit_task(&app, "t-resume", "summarize").await;
    let path = task_stream("t-resume");
    let mut first = SseReader::open_path(&app, &path, &submitter(), None).await;
    let (queued, queued_id) = state(&first.take(1).await[0]);
    assert_eq!(queued, "queued");
    drop(first);

    // Two changes while nobody watches: the bucket keeps the newest, so that is the gap.
    claim_one(&app, "worker-1").await;
    report(&app, "worker-1", "t-resume", "running").await;
    let mut resumed =
        SseReader::open_path(&app, &path, &submitter(), Some(&queued_id.to_string())).await;
    let (status, running_id) = state(&resumed.take(1).await[0]);
    assert_eq!(status, "running");
    assert!(running_id > queued_id);
    drop(resumed);

    // Resumed at the current revision: nothing until the next change, and no repeat.
    let mut current =
        SseReader::open_path(&app, &path, &submitter(), Some(&running_id.to_string())).await;
    report(&app, "worker-1", "t-resume", "succeeded").await;
    let (status, done_id) = state(&current.take(1).await[0]);
    assert_eq!(status, "succeeded");
    assert!(current.ends(Duration::from_secs(5)).await);

    // After the terminal state there is nothing more: 204, which stops an EventSource.
    let response =
        SseReader::request_path(&app, &path, &submitter(), Some(&done_id.to_string())).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // Without a resume point, a finished task's stream is its final state, then the end.
    let mut late = SseReader::open_path(&app, &path, &submitter(), None).await;
    assert_eq!(
        state(&late.take(1).await[0]),
        ("succeeded".to_owned(), done_id)
    );
    assert!(late.ends(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_task_stream_is_refused_to_whoever_may_not_read_the_task() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    submit_task(&app, "t-private", "summarize").await;
    let path = task_stream("t-private");
    let (status, body) =
        read(SseReader::request_path(&app, &path, &token("stranger"), None).await).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (get_status, _) = app
        .get("/orchestrator/tasks/t-private", Some(&token("stranger")))
        .await;
    assert_eq!(get_status, status, "as the task's GET");
    let (status, body) =
        read(SseReader::request_path(&app, &task_stream("t-nobody"), &submitter(), None).await)
            .await;
    assert_error(status, &body, 404, "TASK_NOT_FOUND");
    let (status, body) =
        read(SseReader::request_path(&app, &path, &submitter(), Some("not-a-number")).await).await;
    assert_error(status, &body, 400, "INVALID_PAYLOAD");
    let mut stream = SseReader::open_path(&app, &path, &admin_token(), None).await;
    assert_eq!(state(&stream.take(1).await[0]).0, "queued");
}
