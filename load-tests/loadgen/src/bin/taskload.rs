//! Task load generator: open-loop task submissions at a fixed rate, and N simulated pull agents
//! on loopback that long-poll `POST /orchestrator/tasks/claim` and report `succeeded` for every
//! task they get at once.
//!
//! Every latency is measured from the submission's *scheduled* time (the submitter keeps to its
//! schedule whatever the bridge does, so a stall shows up as latency, not as a lower offered
//! load): submit→202, submit→claimed (the claim answer carrying the task reached its agent) and
//! submit→succeeded (the `succeeded` callback was answered 200). Throughput is the number of
//! tasks that succeeded divided by the time from the first scheduled submission to the last
//! success.
//!
//! Tokens come from a file written by the runner (`load-tests/run-task-bench`): one
//! `<agent_id> <token>` per line, the first line the submitter (scope `orchestrator.submit`),
//! then one per agent.
//!
//! ```sh
//! taskload --url http://127.0.0.1:8080 --tokens tokens.txt --agents 20 --rate 2000 --duration 10s
//! ```

use loadgen::{ms, write_hgrm};
use std::collections::HashSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Base URL of the bridge.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// `<agent_id> <token>` per line: the submitter first, then the agents.
    #[arg(long)]
    tokens: PathBuf,
    /// Simulated pull agents (at most the file's lines minus one).
    #[arg(long, default_value_t = 20)]
    agents: usize,
    /// Live tasks each agent takes at once (`max_concurrent_tasks`, and the claim's `max`).
    #[arg(long, default_value_t = 16)]
    slots: u32,
    /// Submissions per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long submissions are made, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// How long, after the last submission, tasks may still finish before the run ends.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain: Duration,
    /// Most submissions in flight at once; beyond it a submission is dropped (counted).
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: u64,
    /// Directory for results: `<label>-claim.hgrm`, `<label>-succeeded.hgrm` and tasks.csv.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Label of this run (also the prefix of its task ids).
    #[arg(long, default_value = "run")]
    label: String,
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("bad duration {raw:?}"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("bad duration {raw:?}")),
    })
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds")
}

/// What the run shares between the submitter and the agents.
struct Shared {
    http: reqwest::Client,
    url: String,
    label: String,
    started: Instant,
    interval: Duration,
    /// Latencies in microseconds from each task's scheduled submission.
    submit: Mutex<Histogram<u64>>,
    claim: Mutex<Histogram<u64>>,
    succeeded: Mutex<Histogram<u64>>,
    accepted: AtomicU64,
    submit_errors: AtomicU64,
    dropped: AtomicU64,
    claimed: AtomicU64,
    done: AtomicU64,
    callback_errors: AtomicU64,
    /// Tasks an agent got more than once (by any agent): must stay 0.
    doubled: AtomicU64,
    seen: Mutex<HashSet<u64>>,
    /// Lowest and highest `seq` of the `succeeded` answers: the revision of the task bucket's
    /// stream, so their difference over the tasks between them is the bucket writes per task.
    kv_seq_min: AtomicU64,
    kv_seq_max: AtomicU64,
    /// Micros since `started` of the last success.
    last_done_us: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn scheduled(&self, i: u64) -> Instant {
        self.started + self.interval.mul_f64(i as f64)
    }

    /// The index of a task id `<label>-<i>` of this run.
    fn index(&self, task_id: &str) -> Option<u64> {
        task_id
            .strip_prefix(self.label.as_str())?
            .strip_prefix('-')?
            .parse()
            .ok()
    }

    fn record(&self, histogram: &Mutex<Histogram<u64>>, i: u64) {
        let micros = self.scheduled(i).elapsed().as_micros() as u64;
        let _ = histogram
            .lock()
            .expect("no panics")
            .record(micros.clamp(1, 120_000_000));
    }
}

async fn post(shared: &Shared, path: &str, token: &str, body: &Value) -> Option<(u16, Value)> {
    let response = shared
        .http
        .post(format!("{}{path}", shared.url))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await.ok()?;
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Some((status, body))
}

/// One simulated agent: registers, then claims and completes until told to stop.
async fn agent(shared: Arc<Shared>, agent_id: String, token: String, slots: u32) {
    let registration = json!({
        "agent_id": agent_id,
        "name": format!("load agent {agent_id}"),
        "base_url": format!("https://{agent_id}.invalid"),
        "capabilities": ["bench"],
        "max_concurrent_tasks": slots,
    });
    match post(&shared, "/orchestrator/register", &token, &registration).await {
        Some((200, _)) => {}
        other => {
            eprintln!("{agent_id}: registration failed: {other:?}");
            return;
        }
    }
    let claim = json!({"max": slots, "wait": "1s"});
    while !shared.stop.load(Ordering::Relaxed) {
        let tasks = match post(&shared, "/orchestrator/tasks/claim", &token, &claim).await {
            Some((200, body)) => body["tasks"].as_array().cloned().unwrap_or_default(),
            // No dispatcher yet, or the bridge busy: ask again shortly.
            _ => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut callbacks = tokio::task::JoinSet::new();
        for task in tasks {
            let Some(task_id) = task["task_id"].as_str().map(str::to_owned) else {
                continue;
            };
            let index = shared.index(&task_id);
            if let Some(i) = index {
                if !shared.seen.lock().expect("no panics").insert(i) {
                    shared.doubled.fetch_add(1, Ordering::Relaxed);
                }
                shared.record(&shared.claim, i);
                shared.claimed.fetch_add(1, Ordering::Relaxed);
            }
            let (shared, token) = (shared.clone(), token.clone());
            callbacks.spawn(async move {
                let path = format!("/orchestrator/tasks/{task_id}/callback");
                let body = json!({"status": "succeeded", "result": {"ok": true}});
                match post(&shared, &path, &token, &body).await {
                    Some((200, answer)) => {
                        if let Some(seq) = answer["seq"].as_u64() {
                            shared.kv_seq_min.fetch_min(seq, Ordering::Relaxed);
                            shared.kv_seq_max.fetch_max(seq, Ordering::Relaxed);
                        }
                        if let Some(i) = index {
                            shared.record(&shared.succeeded, i);
                            shared.done.fetch_add(1, Ordering::Relaxed);
                            let at = shared.started.elapsed().as_micros() as u64;
                            shared.last_done_us.fetch_max(at, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        shared.callback_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        while callbacks.join_next().await.is_some() {}
    }
}

/// Submits `total` tasks at the fixed rate.
async fn submitter(shared: Arc<Shared>, token: String, total: u64, max_in_flight: u64) {
    let in_flight = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let scheduled = shared.scheduled(i);
        let now = Instant::now();
        if scheduled > now {
            tokio::time::sleep(scheduled - now).await;
        }
        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (shared, token, in_flight) = (shared.clone(), token.clone(), in_flight.clone());
        tasks.spawn(async move {
            let body = json!({
                "task_id": format!("{}-{i}", shared.label),
                "capability": "bench",
                "input": {"i": i},
            });
            match post(&shared, "/orchestrator/tasks", &token, &body).await {
                Some((202, _)) => {
                    shared.record(&shared.submit, i);
                    shared.accepted.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    shared.submit_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        if i % 1024 == 0 {
            while tasks.try_join_next().is_some() {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let lines = std::fs::read_to_string(&args.tokens)?;
    let mut tokens = lines.lines().filter_map(|line| {
        let (agent, token) = line.trim().split_once(' ')?;
        Some((agent.to_owned(), token.to_owned()))
    });
    let (_, submit_token) = tokens
        .next()
        .ok_or_else(|| anyhow::anyhow!("the tokens file is empty"))?;
    let agents: Vec<(String, String)> = tokens.take(args.agents).collect();
    anyhow::ensure!(
        agents.len() == args.agents,
        "the tokens file holds {} agent tokens, {} wanted",
        agents.len(),
        args.agents
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(35))
        .build()?;
    let url = args.url.trim_end_matches('/').to_owned();
    let total = args.rate * args.duration.as_secs().max(1);
    let shared = Arc::new(Shared {
        http,
        url,
        label: args.label.clone(),
        // Agents register and settle into their long polls first.
        started: Instant::now() + Duration::from_secs(2),
        interval: Duration::from_secs_f64(1.0 / args.rate as f64),
        submit: Mutex::new(histogram()),
        claim: Mutex::new(histogram()),
        succeeded: Mutex::new(histogram()),
        accepted: AtomicU64::new(0),
        submit_errors: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        claimed: AtomicU64::new(0),
        done: AtomicU64::new(0),
        callback_errors: AtomicU64::new(0),
        doubled: AtomicU64::new(0),
        seen: Mutex::new(HashSet::new()),
        kv_seq_min: AtomicU64::new(u64::MAX),
        kv_seq_max: AtomicU64::new(0),
        last_done_us: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let mut agent_tasks = tokio::task::JoinSet::new();
    for (agent_id, token) in agents {
        agent_tasks.spawn(agent(shared.clone(), agent_id, token, args.slots));
    }
    let now = Instant::now();
    if shared.started > now {
        tokio::time::sleep(shared.started - now).await;
    }
    submitter(shared.clone(), submit_token, total, args.max_in_flight).await;
    let drain_until = Instant::now() + args.drain;
    while shared.done.load(Ordering::Relaxed) < shared.accepted.load(Ordering::Relaxed)
        && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    // Agents finish their current long poll (at most its 1 s wait).
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while agent_tasks.join_next().await.is_some() {}
    })
    .await;

    let accepted = shared.accepted.load(Ordering::Relaxed);
    let done = shared.done.load(Ordering::Relaxed);
    let span = Duration::from_micros(shared.last_done_us.load(Ordering::Relaxed));
    let throughput = done as f64 / span.as_secs_f64().max(1e-9);
    let (submit, claim, succeeded) = (
        shared.submit.lock().expect("no panics").clone(),
        shared.claim.lock().expect("no panics").clone(),
        shared.succeeded.lock().expect("no panics").clone(),
    );
    let (kv_min, kv_max) = (
        shared.kv_seq_min.load(Ordering::Relaxed),
        shared.kv_seq_max.load(Ordering::Relaxed),
    );
    let kv_writes = if done > 1 && kv_max > kv_min {
        (kv_max - kv_min) as f64 / (done - 1) as f64
    } else {
        f64::NAN
    };
    let line = format!(
        "{label} rate={rate} agents={agents} offered={total} accepted={accepted} \
         submit_errors={se} dropped={dr} claimed={claimed} succeeded={done} \
         callback_errors={ce} doubled={doubled} tasks_per_s={throughput:.0} \
         submit_p50={:.2}ms submit_p99={:.2}ms claim_p50={:.2}ms claim_p99={:.2}ms \
         succeeded_p50={:.2}ms succeeded_p99={:.2}ms succeeded_max={:.2}ms \
         bucket_writes_per_task={kv_writes:.2}",
        ms(&submit, 0.5),
        ms(&submit, 0.99),
        ms(&claim, 0.5),
        ms(&claim, 0.99),
        ms(&succeeded, 0.5),
        ms(&succeeded, 0.99),
        succeeded.max() as f64 / 1000.0,
        label = args.label,
        rate = args.rate,
        agents = args.agents,
        se = shared.submit_errors.load(Ordering::Relaxed),
        dr = shared.dropped.load(Ordering::Relaxed),
        claimed = shared.claimed.load(Ordering::Relaxed),
        ce = shared.callback_errors.load(Ordering::Relaxed),
        doubled = shared.doubled.load(Ordering::Relaxed),
    );
    println!("{line}");
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir)?;
        write_hgrm(&dir.join(format!("{}-claim.hgrm", args.label)), &claim)?;
        write_hgrm(
            &dir.join(format!("{}-succeeded.hgrm", args.label)),
            &succeeded,
        )?;
        let csv = dir.join("tasks.csv");
        let new = !csv.exists();
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(csv)?;
        if new {
            writeln!(
                out,
                "label,rate,agents,offered,accepted,succeeded,doubled,tasks_per_s,\
                 submit_p50_ms,submit_p99_ms,claim_p50_ms,claim_p99_ms,succeeded_p50_ms,succeeded_p99_ms,\
                 bucket_writes_per_task"
            )?;
        }
        writeln!(
            out,
            "{},{},{},{total},{accepted},{done},{},{throughput:.0},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{kv_writes:.2}",
            args.label,
            args.rate,
            args.agents,
            shared.doubled.load(Ordering::Relaxed),
            ms(&submit, 0.5),
            ms(&submit, 0.99),
            ms(&claim, 0.5),
            ms(&claim, 0.99),
            ms(&succeeded, 0.5),
            ms(&succeeded, 0.99),
        )?;
    }
    if done < accepted || shared.doubled.load(Ordering::Relaxed) > 0 {
        std::process::exit(1);
    }
    Ok(())
}
