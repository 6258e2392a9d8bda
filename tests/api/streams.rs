//! `GET /orchestrator/events/stream`: Server-Sent Events of stored events, resumable by id on
//! any replica, with filters, a reset for resume points the stream no longer holds, and
//! subscribers that cannot keep up cut off without slowing the others.

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
        let mut request = app
            .http
            .get(app.url(&format!("/orchestrator/events/stream{query}")))
            .bearer_auth(token);
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
    let sender = {
        let (url, token) = (app.url("/orchestrator/events"), token("emitter"));
        let http = app.http.clone();
        tokio::spawn(async move {
            for i in 0..total {
                let mut body = event("emitter", &format!("big-{i}"));
                // Big enough that the stalled connection's socket buffers fill.
                body["data"] = json!({ "pad": "x".repeat(64 * 1024) });
                let response = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
            }
        })
    };
    let started = std::time::Instant::now();
    let got = reading.take(total).await;
    let took = started.elapsed();
    sender.await.unwrap();
    assert_eq!(got.len(), total);
    let mut seen = ids(&got);
    seen.dedup();
    assert_eq!(seen.len(), total, "no duplicate for the reading subscriber");
    println!("the reading subscriber got {total} events in {took:?} beside a stalled one");

    // The stalled subscriber, read at last, finds its stream ended with an overflow notice.
    let mut last = None;
    while let Some(event) = stalled.next(Duration::from_secs(5)).await {
        last = Some(event);
    }
    let last = last.expect("it got something before it was cut off");
    assert_eq!(last.event.as_deref(), Some("overflow"), "{last:?}");
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
