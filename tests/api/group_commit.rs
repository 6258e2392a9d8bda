//! Group commit: concurrent requests share atomic batches, yet each request still gets its own
//! answer, its own sequence and its own dedupe; a request alone is written from its own task.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use auto_com_center::bus::group::{GroupCommit, GroupSettings};
use auto_com_center::bus::subjects::EVENTS_STREAM;
use bytes::Bytes;
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

const GROUPED: &[&str] = &["--group-commit=on", "--group-commit-min-batch=2"];

/// Sends every event at once and returns each answer by position.
async fn post_all(app: &TestApp, token: &str, events: &[Value]) -> Vec<(StatusCode, Value)> {
    join_all(
        events
            .iter()
            .map(|e| app.post("/orchestrator/events", Some(token), e)),
    )
    .await
}

/// The `Nats-Batch-Id` the server kept on a stored message, if it came in a batch.
async fn batch_of(app: &TestApp, seq: u64) -> Option<String> {
    let stream = app.js.get_stream("ACC_EVENTS").await.unwrap();
    let message = stream.get_raw_message(seq).await.unwrap();
    message
        .headers
        .get("Nats-Batch-Id")
        .map(|v| v.as_str().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_batches_and_each_gets_its_own_seq() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, GROUPED).await;
    let t = token("agent-1");
    app.register("agent-1").await;
    let events: Vec<Value> = (0..300)
        .map(|i| event("agent-1", &format!("evt-{i}")))
        .collect();
    let answers = post_all(&app, &t, &events).await;

    let mut seqs = HashSet::new();
    let mut batches: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["duplicate"], false, "{body}");
        let seq = body["seq"].as_u64().unwrap();
        assert!(seqs.insert(seq), "seq {seq} answered twice");
        // The answer's seq holds this request's own event.
        let (_, stored_event) = stored(&app.js, "ACC_EVENTS", seq).await;
        assert_eq!(stored_event["event_id"], format!("evt-{i}"));
        if let Some(batch) = batch_of(&app, seq).await {
            *batches.entry(batch).or_default() += 1;
        }
    }
    let stream_len = count_stored(&app.js, "ACC_EVENTS").await;
    assert_eq!(stream_len, 300);
    assert!(
        batches.values().any(|&n| n >= 2),
        "300 concurrent requests never shared a batch: {batches:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_inside_a_burst_are_duplicates_and_the_rest_are_stored() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, GROUPED).await;
    let t = token("agent-1");
    app.register("agent-1").await;
    // Stored before the burst: its retry inside a batch makes the server refuse that batch.
    let (status, first) = app
        .post("/orchestrator/events", Some(&t), &event("agent-1", "old"))
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");

    let mut events: Vec<Value> = (0..100)
        .map(|i| event("agent-1", &format!("new-{i}")))
        .collect();
    events.insert(50, event("agent-1", "old"));
    events.insert(20, event("agent-1", "twice"));
    events.insert(80, event("agent-1", "twice"));
    let answers = post_all(&app, &t, &events).await;

    let mut twice = Vec::new();
    for ((status, body), sent) in answers.iter().zip(&events) {
        assert_eq!(*status, StatusCode::OK, "{body}");
        let id = sent["event_id"].as_str().unwrap();
        let seq = body["seq"].as_u64().unwrap();
        let (_, stored_event) = stored(&app.js, "ACC_EVENTS", seq).await;
        assert_eq!(
            stored_event["event_id"], id,
            "answer {body} points at another event"
        );
        match id {
            "old" => {
                assert_eq!(body["duplicate"], true, "{body}");
                assert_eq!(body["seq"], first["seq"], "{body}");
            }
            "twice" => twice.push(body.clone()),
            _ => assert_eq!(body["duplicate"], false, "{body}"),
        }
    }
    let duplicates: Vec<bool> = twice
        .iter()
        .map(|b| b["duplicate"].as_bool().unwrap())
        .collect();
    assert_eq!(
        duplicates.iter().filter(|d| **d).count(),
        1,
        "one copy of a repeated id is stored, one is a duplicate: {twice:?}"
    );
    assert_eq!(twice[0]["seq"], twice[1]["seq"]);
    let stream_len = count_stored(&app.js, "ACC_EVENTS").await;
    assert_eq!(stream_len, 1 + 100 + 1, "old once, 100 new, twice once");
}

/// A writer of ACC_EVENTS beside `app`'s (which provisioned the stream), for its counts.
async fn events_writer(nats: &NatsServer) -> GroupCommit {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let settings = GroupSettings {
        min_batch: 2,
        ..GroupSettings::default()
    };
    GroupCommit::start(EVENTS_STREAM, js, client, Duration::from_secs(5), settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_alone_goes_out_from_its_own_task_and_a_burst_still_shares_batches() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, GROUPED).await;
    let writer = events_writer(&nats).await;
    let publish = |i: usize| {
        let writer = writer.clone();
        async move {
            let subject = format!("acc.events.agent-{}", i % 8);
            let payload = Bytes::from(format!(r#"{{"i":{i}}}"#));
            writer
                .publish(subject, &format!("direct-{i}"), payload, HeaderMap::new())
                .await
        }
    };
    // One at a time: nothing ever waits, so each is written directly, none queued.
    let mut seqs = HashSet::new();
    for i in 0..20 {
        let ack = publish(i).await.expect("stored");
        assert!(seqs.insert(ack.seq), "seq {} answered twice", ack.seq);
    }
    let counts = writer.counts();
    assert_eq!(counts.direct_messages.load(Ordering::Relaxed), 20);
    assert_eq!(counts.batches.load(Ordering::Relaxed), 0);
    // A burst: the write slots fill, the rest queue and are grouped into atomic batches.
    let acks = join_all((20..620).map(publish)).await;
    for ack in acks {
        let ack = ack.expect("stored");
        assert!(seqs.insert(ack.seq), "seq {} answered twice", ack.seq);
    }
    assert!(
        counts.batches.load(Ordering::Relaxed) > 0,
        "a burst of 600 never batched"
    );
    assert!(counts.direct_messages.load(Ordering::Relaxed) < 620);
    assert_eq!(count_stored(&app.js, "ACC_EVENTS").await, 620);
}
