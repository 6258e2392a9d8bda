//! End-to-end scheduling figures against a running bridge (load-tests/run-sched-bench starts
//! one with `DURABILITY=fsync` and runs this):
//!
//! - `probe`: a priority-1 probe submitted behind a backlog of priority-5 tasks (same
//!   capability), `--probes` times: how long from sending the probe's submission until a claim
//!   returns it, and how long that claim request took. The backlog stays queued throughout.
//! - `fairness`: tenant B submits at `--b-rate`, first alone, then while tenant A submits at
//!   `--a-factor` times that rate, with `--workers` agents claiming and completing tasks: B's
//!   latency from each submission's scheduled send time (open loop) to the claim that returns it.
//! - `claims`: the cost of a claim with `--queued` tasks left queued (10 tenants, priorities
//!   1–5): one agent claims and completes `--claims` tasks one after another; the claim
//!   request's latency and the CPU the bridge (from its `/metrics`) and, given `--nats-pid`, its
//!   nats-server spent per claimed and completed task.
//!
//! `probe` and `fairness` print CSV lines `scenario,phase,count,p50_ms,p99_ms,max_ms`, `claims`
//! prints `queued,claims,claim_p50_ms,claim_p99_ms,claim_max_ms,bridge_cpu_ms,nats_cpu_ms` (CPU
//! per claimed task); a note or two go to stderr.
//! Tokens are minted from `SHARED_SECRET`.
//!
//! ```sh
//! cargo run --release --example sched_bench -- --url http://127.0.0.1:8080 probe
//! cargo run --release --example sched_bench -- --url http://127.0.0.1:8080 fairness
//! cargo run --release --example sched_bench -- --url http://127.0.0.1:8080 claims --queued 100000
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use auto_com_center::auth::{Secret, mint};
use auto_com_center::domain::AgentId;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The bridge's shared secret, to mint tokens. Never printed.
    #[arg(long, env = "SHARED_SECRET", hide_env_values = true)]
    secret: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    Probe {
        #[arg(long, default_value_t = 50_000)]
        backlog: usize,
        #[arg(long, default_value_t = 100)]
        probes: usize,
        /// Submissions in flight while the backlog is loaded.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    Fairness {
        /// Tenant B's submissions per second.
        #[arg(long, default_value_t = 5.0)]
        b_rate: f64,
        /// Tenant A's rate as a multiple of B's, in the second phase.
        #[arg(long, default_value_t = 100.0)]
        a_factor: f64,
        /// Length of each phase.
        #[arg(long, default_value = "20s")]
        duration: humantime::Duration,
        /// Claiming agents, each with 16 slots.
        #[arg(long, default_value_t = 4)]
        workers: usize,
    },
    Claims {
        /// Tasks still queued when the last measured claim is made.
        #[arg(long, default_value_t = 1_000)]
        queued: usize,
        /// Measured claims, each followed by the task's completion.
        #[arg(long, default_value_t = 2_000)]
        claims: usize,
        /// Claims made before the measured ones, to warm the bridge's paths.
        #[arg(long, default_value_t = 200)]
        warmup: usize,
        /// Submissions in flight while the tasks are loaded.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// The bridge's nats-server, to report its CPU too (read from `/proc`).
        #[arg(long, env = "NATS_PID")]
        nats_pid: Option<u32>,
    },
}

struct Client {
    http: reqwest::Client,
    url: String,
    secret: Secret,
}

impl Client {
    fn token(&self, agent: &str, scope: &str) -> String {
        let agent = AgentId::parse(agent).expect("a valid agent id");
        mint(&self.secret, &agent, scope, Duration::from_secs(7200))
    }

    async fn post(&self, path: &str, token: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token)
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    async fn submit(&self, token: &str, body: Value) -> anyhow::Result<()> {
        let (status, answer) = self.post("/orchestrator/tasks", token, &body).await?;
        if status != 202 {
            bail!("submit: {status} {answer}");
        }
        Ok(())
    }

    /// Registers `agent` for capability `bench` and waits until the bridge shows it online.
    async fn worker(&self, agent: &str, slots: u32) -> anyhow::Result<String> {
        let token = self.token(agent, "");
        let body = json!({
            "agent_id": agent, "name": agent, "base_url": format!("https://{agent}.invalid"),
            "capabilities": ["bench"], "max_concurrent_tasks": slots,
        });
        let (status, answer) = self.post("/orchestrator/register", &token, &body).await?;
        if status != 200 {
            bail!("register: {status} {answer}");
        }
        // A claim that does not fail means the dispatcher's view knows the agent.
        for _ in 0..100 {
            let (status, answer) = self
                .post(
                    "/orchestrator/tasks/claim",
                    &token,
                    &json!({"max": 1, "wait": "0s"}),
                )
                .await?;
            if status == 200 && answer["tasks"].as_array().is_some_and(Vec::is_empty) {
                return Ok(token);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{agent} never became claimable")
    }

    async fn claim(&self, token: &str, max: u32, wait: &str) -> anyhow::Result<Vec<Value>> {
        let (status, answer) = self
            .post(
                "/orchestrator/tasks/claim",
                token,
                &json!({"max": max, "wait": wait}),
            )
            .await?;
        if status != 200 {
            bail!("claim: {status} {answer}");
        }
        Ok(answer["tasks"].as_array().cloned().unwrap_or_default())
    }

    async fn succeed(&self, token: &str, task_id: &str) -> anyhow::Result<()> {
        let path = format!("/orchestrator/tasks/{task_id}/callback");
        let (status, answer) = self
            .post(&path, token, &json!({"status": "succeeded"}))
            .await?;
        if status != 200 {
            bail!("callback: {status} {answer}");
        }
        Ok(())
    }

    /// The figure of the line that starts with `series` on `/metrics` (0 when there is none).
    async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?;
        let prefix = format!("{series} ");
        Ok(text
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// The `acc_tasks_queued` figure of capability `bench` and `priority` on `/metrics`.
    async fn queued(&self, priority: u8) -> anyhow::Result<u64> {
        let series = format!("acc_tasks_queued{{capability=\"bench\",priority=\"{priority}\"}}");
        Ok(self.metric(&series).await? as u64)
    }

    /// Tasks of capability `bench` queued at any priority.
    async fn queued_all(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for priority in 1..=5 {
            total += self.queued(priority).await?;
        }
        Ok(total)
    }

    /// Submits `count` tasks of capability `bench`, `concurrency` at a time, each made by `task`
    /// from its number.
    async fn load(
        self: &Arc<Self>,
        count: usize,
        concurrency: usize,
        task: fn(usize) -> Value,
    ) -> anyhow::Result<()> {
        let submitter = self.token("sched-submitter", "orchestrator.submit");
        let began = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut loaders = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (client, submitter, next) = (self.clone(), submitter.clone(), next.clone());
            loaders.spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= count {
                        return anyhow::Ok(());
                    }
                    client.submit(&submitter, task(n)).await?;
                }
            });
        }
        while let Some(done) = loaders.join_next().await {
            done??;
        }
        eprintln!(
            "{count} tasks submitted in {:.1}s",
            began.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// The `q` quantile of `sorted` (nearest rank), NaN when it is empty.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn print(scenario: &str, phase: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let at = |q| quantile(&ms, q);
    println!(
        "{scenario},{phase},{},{:.2},{:.2},{:.2}",
        ms.len(),
        at(0.50),
        at(0.99),
        at(1.0)
    );
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn probe(
    client: Arc<Client>,
    backlog: usize,
    probes: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let submitter = client.token("sched-submitter", "orchestrator.submit");
    let worker = client.worker("sched-prober", 1024).await?;
    client
        .load(backlog, concurrency, |n| {
            json!({"capability": "bench", "priority": 5, "tenant": "backlog",
                   "timeout": "24h", "task_id": format!("backlog-{n}")})
        })
        .await?;
    while client.queued(5).await? < backlog as u64 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (mut end_to_end, mut claim_call, mut passed_over) = (Vec::new(), Vec::new(), 0);
    for n in 0..probes {
        let id = format!("probe-{n}");
        let sent = Instant::now();
        let body = json!({"capability": "bench", "priority": 1, "tenant": "probe", "task_id": id});
        client.submit(&submitter, body).await?;
        loop {
            let asked = Instant::now();
            let tasks = client.claim(&worker, 1, "0s").await?;
            let answered = Instant::now();
            match tasks.first().and_then(|t| t["task_id"].as_str()) {
                Some(got) if got == id => {
                    end_to_end.push(millis(answered - sent));
                    claim_call.push(millis(answered - asked));
                    client.succeed(&worker, &id).await?;
                    break;
                }
                // Claimed before the dispatcher took the probe in: a backlog task, held.
                Some(_) => passed_over += 1,
                None => {}
            }
            if sent.elapsed() > Duration::from_secs(10) {
                bail!("probe {id} not claimed within 10 s");
            }
        }
    }
    eprintln!("backlog tasks claimed before a probe was taken in: {passed_over}");
    print("probe", "submit_to_claimed", end_to_end);
    print("probe", "claim_request", claim_call);
    Ok(())
}

async fn fairness(
    client: Arc<Client>,
    b_rate: f64,
    a_factor: f64,
    duration: Duration,
    workers: usize,
) -> anyhow::Result<()> {
    let submitter = client.token("sched-submitter", "orchestrator.submit");
    // When each task's claim came back, by task id.
    let claimed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pool = tokio::task::JoinSet::new();
    for w in 0..workers {
        let token = client.worker(&format!("sched-worker-{w}"), 16).await?;
        let (client, claimed, stop) = (client.clone(), claimed.clone(), stop.clone());
        pool.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let tasks = client.claim(&token, 16, "1s").await?;
                let now = Instant::now();
                let ids: Vec<String> = tasks
                    .iter()
                    .filter_map(|t| t["task_id"].as_str().map(str::to_owned))
                    .collect();
                claimed
                    .lock()
                    .expect("not poisoned")
                    .extend(ids.iter().map(|id| (id.clone(), now)));
                futures::future::try_join_all(ids.iter().map(|id| client.succeed(&token, id)))
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    let mut results = Vec::new();
    for (phase, a_rate) in [("b_alone", 0.0), ("b_with_a_burst", b_rate * a_factor)] {
        // Open loop: every submission is sent at its scheduled time, in a task of its own.
        let scheduled: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let mut senders = tokio::task::JoinSet::new();
        for (tenant, rate) in [("tenant-b", b_rate), ("tenant-a", a_rate)] {
            if rate <= 0.0 {
                continue;
            }
            let count = (rate * duration.as_secs_f64()) as u64;
            let every = Duration::from_secs_f64(1.0 / rate);
            let start = tokio::time::Instant::now();
            for n in 0..count {
                let at = start + every * n as u32;
                let (client, submitter, scheduled) =
                    (client.clone(), submitter.clone(), scheduled.clone());
                let id = format!("{phase}-{tenant}-{n}");
                senders.spawn(async move {
                    tokio::time::sleep_until(at).await;
                    if tenant == "tenant-b" {
                        scheduled
                            .lock()
                            .expect("not poisoned")
                            .push((id.clone(), at.into_std()));
                    }
                    let body = json!({"capability": "bench", "tenant": tenant, "task_id": id});
                    client.submit(&submitter, body).await
                });
            }
        }
        let mut errors = 0;
        while let Some(done) = senders.join_next().await {
            errors += usize::from(!matches!(done, Ok(Ok(()))));
        }
        // Every B task of the phase claimed, or 30 s more.
        let deadline = Instant::now() + Duration::from_secs(30);
        let wanted: Vec<(String, Instant)> = scheduled.lock().expect("not poisoned").clone();
        let latencies = loop {
            let got: Vec<f64> = {
                let seen = claimed.lock().expect("not poisoned");
                wanted
                    .iter()
                    .filter_map(|(id, at)| seen.get(id).map(|done| millis(*done - *at)))
                    .collect()
            };
            if got.len() == wanted.len() || Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        eprintln!(
            "{phase}: A at {a_rate}/s, B at {b_rate}/s; {} of {} B tasks claimed; {errors} submit errors",
            latencies.len(),
            wanted.len()
        );
        results.push((phase, latencies));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(done) = pool.join_next().await {
        done?.context("a worker")?;
    }
    for (phase, latencies) in results {
        print("fairness", phase, latencies);
    }
    Ok(())
}

async fn claims(
    client: Arc<Client>,
    queued: usize,
    claims: usize,
    warmup: usize,
    concurrency: usize,
    nats_pid: Option<u32>,
) -> anyhow::Result<()> {
    let worker = client.worker("sched-claimer", 4).await?;
    let total = queued + warmup + claims;
    // Ten tenants, priorities 1 to 5, so a claim has levels and tenants to choose between.
    client
        .load(total, concurrency, |n| {
            json!({"capability": "bench", "priority": 1 + (n / 10) % 5,
                   "tenant": format!("tenant-{}", n % 10),
                   "timeout": "24h", "task_id": format!("load-{n}")})
        })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let seen = client.queued_all().await?;
        if seen >= total as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{seen} of {total} tasks queued after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cycle = |worker: &str| {
        let (client, worker) = (client.clone(), worker.to_owned());
        async move {
            let asked = Instant::now();
            let tasks = client.claim(&worker, 1, "0s").await?;
            let took = asked.elapsed();
            let Some(id) = tasks.first().and_then(|t| t["task_id"].as_str()) else {
                bail!("a claim with tasks queued returned none");
            };
            client.succeed(&worker, id).await?;
            anyhow::Ok(took)
        }
    };
    for _ in 0..warmup {
        cycle(&worker).await?;
    }
    let bridge_cpu = client.metric("process_cpu_seconds_total").await?;
    let nats_cpu = nats_pid.and_then(auto_com_center::metrics::process::read_pid);
    let mut latencies = Vec::with_capacity(claims);
    for _ in 0..claims {
        latencies.push(millis(cycle(&worker).await?));
    }
    let per_claim = |seconds: f64| format!("{:.4}", seconds * 1000.0 / claims as f64);
    let bridge_cpu = per_claim(client.metric("process_cpu_seconds_total").await? - bridge_cpu);
    let nats_cpu = match (
        nats_cpu,
        nats_pid.and_then(auto_com_center::metrics::process::read_pid),
    ) {
        (Some(before), Some(after)) => per_claim(after.cpu_seconds - before.cpu_seconds),
        _ => String::new(),
    };
    let left = client.queued_all().await?;
    eprintln!(
        "claims at {queued} queued: {claims} measured after {warmup} warm-up; the queued gauge now reads {left}"
    );
    latencies.sort_by(f64::total_cmp);
    let at = |q| quantile(&latencies, q);
    println!(
        "{queued},{claims},{:.3},{:.3},{:.3},{bridge_cpu},{nats_cpu}",
        at(0.50),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Arc::new(Client {
        http: reqwest::Client::new(),
        url: args.url.trim_end_matches('/').to_owned(),
        secret: Secret::new(args.secret),
    });
    if matches!(args.scenario, Scenario::Claims { .. }) {
        println!("queued,claims,claim_p50_ms,claim_p99_ms,claim_max_ms,bridge_cpu_ms,nats_cpu_ms");
    } else {
        println!("scenario,phase,count,p50_ms,p99_ms,max_ms");
    }
    match args.scenario {
        Scenario::Probe {
            backlog,
            probes,
            concurrency,
        } => probe(client, backlog, probes, concurrency).await,
        Scenario::Fairness {
            b_rate,
            a_factor,
            duration,
            workers,
        } => fairness(client, b_rate, a_factor, duration.into(), workers).await,
        Scenario::Claims {
            queued,
            claims: count,
            warmup,
            concurrency,
            nats_pid,
        } => claims(client, queued, count, warmup, concurrency, nats_pid).await,
    }
}
