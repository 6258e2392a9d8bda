//! The subject catalog in `subjects/` and the code agree; streams carry the durability settings
//! of docs/architecture.md, Subjects, streams and KV; provisioning is idempotent when replicas race.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use auto_com_center::bus::provision::{self, STREAMS};
use auto_com_center::bus::subjects::{CATALOG, REQUESTS};
use serde_json::Value;

use crate::helpers::*;

fn catalog() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("subjects/catalog.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_catalog_file_lists_exactly_the_subjects_in_code() {
    let file: BTreeSet<(String, String, Option<String>)> = catalog()["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["subject"].as_str().unwrap().to_owned(),
                row["stream"].as_str().unwrap().to_owned(),
                row["schema"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let code: BTreeSet<(String, String, Option<String>)> = CATALOG
        .iter()
        .map(|spec| {
            (
                spec.subject.to_owned(),
                spec.stream.to_owned(),
                spec.schema.map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(file, code);
    let catalog = catalog();
    let streams: BTreeSet<&str> = catalog["streams"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(streams, STREAMS.iter().copied().collect());
    for row in catalog["subjects"].as_array().unwrap() {
        assert!(row["producer"].is_string(), "{row}");
        assert!(row["consumers"].is_array(), "{row}");
    }
}

#[test]
fn the_catalog_file_lists_exactly_the_request_subjects_in_code() {
    let file: BTreeSet<(String, String)> = catalog()["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["subject"].as_str().unwrap().to_owned(),
                row["schema"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let code: BTreeSet<(String, String)> = REQUESTS
        .iter()
        .map(|spec| (spec.subject.to_owned(), spec.schema.to_owned()))
        .collect();
    assert_eq!(file, code);
}

#[test]
fn every_schema_compiles() {
    let mut files: Vec<String> = CATALOG
        .iter()
        .filter_map(|spec| spec.schema.map(str::to_owned))
        .chain(REQUESTS.iter().map(|spec| spec.schema.to_owned()))
        .collect();
    files.push("agent_record.json".into());
    files.push("task_record.json".into());
    for file in files {
        let schema = load_schema(&file);
        jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[tokio::test]
async fn streams_are_provisioned_with_explicit_durability_settings() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(
        &nats,
        &[
            "--stream-max-bytes=32MiB",
            "--stream-max-age=2d",
            "--duplicate-window=90s",
            "--audit-max-age=3d",
        ],
    )
    .await;
    for name in STREAMS {
        let mut stream = app.js.get_stream(name).await.unwrap();
        let config = stream.info().await.unwrap().config.clone();
        assert_eq!(config.storage, StorageType::File, "{name}");
        assert_eq!(config.discard, DiscardPolicy::New, "{name}");
        // The inbound stream holds only what the door has not handled yet.
        let retention = if *name == "ACC_INBOUND" {
            RetentionPolicy::WorkQueue
        } else {
            RetentionPolicy::Limits
        };
        assert_eq!(config.retention, retention, "{name}");
        assert_eq!(config.max_bytes, 32 << 20, "{name}");
        // The audit trail has an age of its own, and nobody may purge it.
        let days = if *name == "ACC_AUDIT" { 3 } else { 2 };
        assert_eq!(config.max_age, Duration::from_secs(days * 86_400), "{name}");
        assert_eq!(config.deny_purge, *name == "ACC_AUDIT", "{name}");
        assert!(config.deny_delete, "{name}");
        // Only the door's intake writes the inbound stream, with ids scoped to each agent, so
        // its window is the normal one too.
        assert_eq!(config.duplicate_window, Duration::from_secs(90), "{name}");
        if *name == "ACC_INBOUND" {
            assert_eq!(config.subjects, ["acc.inbound.>"]);
            let transform = config
                .subject_transform
                .as_ref()
                .expect("stored as acc.in.>");
            assert_eq!(
                (transform.source.as_str(), transform.destination.as_str()),
                ("acc.inbound.>", "acc.in.>")
            );
        }
        assert_eq!(config.num_replicas, 1, "{name}");
    }
    let bucket = app.js.get_key_value("acc_agents").await.unwrap();
    assert_eq!(
        bucket.status().await.unwrap().info.config.storage,
        StorageType::File
    );
}

#[tokio::test]
async fn replicas_provisioning_at_once_converge_and_a_changed_setting_is_applied() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client);
    let base = settings(Some(&nats.url()), &[]).streams;
    let runs = (0..4).map(|_| provision::provision(&js, &base));
    for result in futures::future::join_all(runs).await {
        result.expect("concurrent provisioning succeeds");
    }
    let changed = settings(Some(&nats.url()), &["--stream-max-age=3d"]).streams;
    provision::provision(&js, &changed).await.unwrap();
    let mut stream = js.get_stream("ACC_EVENTS").await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.max_age,
        Duration::from_secs(3 * 86_400)
    );
}

#[tokio::test]
async fn the_agent_record_in_kv_matches_its_schema() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    app.register("agent-1").await;
    let bucket = app.js.get_key_value("acc_agents").await.unwrap();
    let value = eventually(Duration::from_secs(5), "the record", || async {
        bucket.get("agent-1").await.unwrap()
    })
    .await;
    let record: Value = serde_json::from_slice(&value).unwrap();
    assert_valid("agent_record.json", &record);
    assert_eq!(record["status"], "online");
}
