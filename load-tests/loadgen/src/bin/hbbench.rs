//! Heartbeats per registry replica: the helper behind `load-tests/run-heartbeat-bench`.
//!
//! The registry's ceiling is measured on a backlog, so that neither HTTP nor the publisher's own
//! fsyncs bound what is measured: the script publishes the agents' registrations and applies
//! them, stops the registry, publishes a backlog of heartbeats straight onto the agents stream
//! (in the shape the ingress stores them), starts one registry replica on it and times how fast
//! that replica works the backlog off.
//!
//! ```sh
//! hbbench publish --nats-url 127.0.0.1:4222 --agents 1000 --registrations
//! hbbench publish --nats-url 127.0.0.1:4222 --agents 1000 --per-agent 10
//! hbbench drain --nats-url 127.0.0.1:4222 --label fsync-1000     # after the registry started
//! ```

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, message::PublishMessage};
use clap::{Parser, Subcommand};
use futures::StreamExt as _;

const STREAM: &str = "ACC_AGENTS";
const CONSUMER: &str = "registry";
const BUCKET_STREAM: &str = "KV_acc_agents";

#[derive(Parser, Debug)]
struct Args {
    /// The NATS server the bridge uses.
    #[arg(long, default_value = "127.0.0.1:4222")]
    nats_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publishes registrations (with --registrations) or a backlog of heartbeats, round robin
    /// over the agents `hb-0` … `hb-<agents-1>`.
    Publish {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Heartbeats per agent.
        #[arg(long, default_value_t = 10)]
        per_agent: usize,
        /// Publish one registration per agent instead of heartbeats.
        #[arg(long)]
        registrations: bool,
    },
    /// Waits until the registry consumer has settled everything; with --label, prints the rate
    /// at which it did, from its first progress on, and the KV writes it cost.
    Drain {
        #[arg(long)]
        label: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Times KV compare-and-set writes to a scratch bucket, three ways: one at a time, 32 in
    /// flight, and as atomic batches; shows what a write costs the server in each.
    KvProbe {
        /// Distinct keys written round robin.
        #[arg(long, default_value_t = 1000)]
        keys: usize,
        /// Writes per way.
        #[arg(long, default_value_t = 3000)]
        writes: usize,
        /// Writes per atomic batch.
        #[arg(long, default_value_t = 250)]
        batch: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = async_nats::connect(&args.nats_url).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(30))
        .max_ack_inflight(4096)
        .build(client);
    match args.command {
        Command::Publish {
            agents,
            per_agent,
            registrations,
        } => {
            publish(
                &js,
                agents,
                if registrations { 1 } else { per_agent },
                registrations,
            )
            .await
        }
        Command::Drain { label, timeout } => drain(&js, label, Duration::from_secs(timeout)).await,
        Command::KvProbe {
            keys,
            writes,
            batch,
        } => kv_probe(&js, keys, writes, batch).await,
    }
}

async fn publish(
    js: &jetstream::Context,
    agents: usize,
    rounds: usize,
    registrations: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let base = now_ms();
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut sent = 0u64;
    for round in 0..rounds {
        for k in 0..agents {
            let agent = format!("hb-{k}");
            // Receive times one millisecond apart per round, the latest round newest.
            let at = rfc3339_ms(base + round as u64);
            let (subject, body) = if registrations {
                (
                    format!("acc.agents.registered.{agent}"),
                    serde_json::json!({
                        "agent_id": agent, "name": agent, "base_url": "https://hb.example",
                        "capabilities": [], "origin": "agent", "received_at": at,
                    }),
                )
            } else {
                (
                    format!("acc.agents.heartbeat.{agent}"),
                    serde_json::json!({"agent_id": agent, "status": "online", "received_at": at}),
                )
            };
            let message = PublishMessage::build()
                .payload(serde_json::to_vec(&body)?.into())
                .message_id(format!("hbbench:{subject}:{round}:{base}"));
            acks.push(js.send_publish(subject, message).await?.into_future());
            sent += 1;
            while acks.len() >= 2048 {
                acks.next().await.expect("not empty")?;
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    eprintln!("published {sent} messages in {:?}", started.elapsed());
    Ok(())
}

async fn drain(
    js: &jetstream::Context,
    label: Option<String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    // The registry provisions both when it starts.
    let (stream, mut bucket) = loop {
        match (
            js.get_stream(STREAM).await,
            js.get_stream(BUCKET_STREAM).await,
        ) {
            (Ok(stream), Ok(bucket)) => break (stream, bucket),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            (Err(e), _) | (_, Err(e)) => return Err(e.into()),
        }
    };
    let writes_before = bucket.info().await?.state.last_sequence;
    // Messages left when first seen, and when and at how many the registry was first seen
    // making progress: the rate is timed from there, so the replica's start-up is not in it.
    let mut initial = None;
    let mut progress: Option<(Instant, u64)> = None;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the registry did not drain within {timeout:?}"
        );
        let Ok(mut consumer) = stream.get_consumer::<pull::Config>(CONSUMER).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let info = consumer.info().await?;
        let left = info.num_pending + info.num_ack_pending as u64;
        let now = Instant::now();
        let initial = *initial.get_or_insert(left);
        if left == 0 {
            let writes = bucket.info().await?.state.last_sequence - writes_before;
            if let (Some(label), Some((since, at))) = (&label, progress) {
                let seconds = now.duration_since(since).as_secs_f64();
                println!(
                    "{label}: {at} messages in {seconds:.2} s = {:.0}/s; {writes} KV writes for \
                     {initial} messages ({:.3} per message)",
                    at as f64 / seconds.max(1e-9),
                    writes as f64 / initial.max(1) as f64
                );
            }
            return Ok(());
        }
        if progress.is_none() && left < initial {
            progress = Some((now, left));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn kv_probe(
    js: &jetstream::Context,
    keys: usize,
    writes: usize,
    batch: usize,
) -> anyhow::Result<()> {
    let kv = js
        .create_key_value(jetstream::kv::Config {
            bucket: "hbprobe".into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let mut stream = js.get_stream("KV_hbprobe").await?;
    let mut config = stream.info().await?.config.clone();
    config.allow_atomic_publish = true;
    js.update_stream(config).await?;
    let value = bytes::Bytes::from(vec![b'x'; 300]);
    let mut revisions = Vec::with_capacity(keys);
    for k in 0..keys {
        revisions.push(kv.put(format!("k{k}"), value.clone()).await?);
    }
    let report = |way: &str, started: Instant| {
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "kv-probe {way}: {writes} writes in {seconds:.2} s = {:.0} writes/s",
            writes as f64 / seconds
        );
    };
    let started = Instant::now();
    for i in 0..writes {
        let k = i % keys;
        revisions[k] = kv
            .update(format!("k{k}"), value.clone(), revisions[k])
            .await?;
    }
    report("one at a time", started);
    let started = Instant::now();
    for chunk in (0..writes).collect::<Vec<_>>().chunks(32) {
        let updates = chunk.iter().map(|i| {
            let k = i % keys;
            let kv = kv.clone();
            let (value, revision) = (value.clone(), revisions[k]);
            async move { (k, kv.update(format!("k{k}"), value, revision).await) }
        });
        for (k, revision) in futures::future::join_all(updates).await {
            revisions[k] = revision?;
        }
    }
    report("32 in flight", started);
    let client = js.client();
    let started = Instant::now();
    let mut done = 0;
    let mut id = 0;
    while done < writes {
        let n = batch.min(writes - done).min(keys);
        id += 1;
        let mut commit = None;
        for j in 0..n {
            let k = (done + j) % keys;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Batch-Id", format!("probe-{id}").as_str());
            headers.insert("Nats-Batch-Sequence", (j + 1).to_string().as_str());
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                revisions[k].to_string().as_str(),
            );
            let subject = format!("$KV.hbprobe.k{k}");
            if j + 1 == n {
                headers.insert("Nats-Batch-Commit", "1");
                commit = Some(client.request_with_headers(subject, headers, value.clone()));
            } else {
                client
                    .publish_with_headers(subject, headers, value.clone())
                    .await?;
            }
        }
        let reply = commit.expect("n > 0").await?;
        let ack: serde_json::Value = serde_json::from_slice(&reply.payload)?;
        let seq = ack["seq"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("batch refused: {ack}"))?;
        for j in 0..n {
            revisions[(done + j) % keys] = seq - n as u64 + 1 + j as u64;
        }
        done += n;
    }
    report(&format!("atomic batches of {batch}"), started);
    Ok(())
}

/// `ms` since the epoch as an RFC 3339 UTC timestamp with milliseconds.
fn rfc3339_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .expect("a time in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}
