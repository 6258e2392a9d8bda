//! Open-loop load generator: requests are scheduled at a constant arrival rate, whatever the
//! server does, and each latency is measured from the request's *scheduled* send time, so a
//! stalled server shows up as latency instead of silently lowering the offered load
//! (no coordinated omission).
//!
//! Two targets, measured the same way:
//! - `http` (default): `POST /orchestrator/events` on the bridge, with a bearer token;
//! - `bus`: publish-and-await-ack straight to a JetStream stream (no HTTP, no bridge), so a
//!   report can show the bridge beside the broker's own ceiling on the same machine.
//!
//! ```sh
//! loadgen --url http://127.0.0.1:8080 --token "$TOKEN" --agent bench --rate 5000 --duration 20s
//! SHARED_SECRET=... loadgen --agents 64 --rate 5000   # the rate spread over bench-0 … bench-63
//! loadgen ... --step 1000:12000:1000     # highest rate with 0 errors and p99 < 50 ms
//! loadgen --target bus --nats-url 127.0.0.1:4222 --step 1000:20000:1000
//! loadgen ... --hdr-dir out/             # per rate: out/<label>-<rate>.hgrm, and out/steps.csv
//! ```

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use tokio::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// `POST /orchestrator/events` on the bridge.
    Http,
    /// Publish-and-ack straight to JetStream.
    Bus,
}

#[derive(Parser, Debug, Clone)]
struct Args {
    /// What to load: the bridge over HTTP, or JetStream directly.
    #[arg(long, value_enum, default_value = "http")]
    target: Target,
    /// Base URL of the bridge.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token of the agent named by --agent (http target).
    #[arg(long, env = "TOKEN", default_value = "")]
    token: String,
    /// NATS server for the bus target; a file-backed stream LOADGEN on `loadgen.>` is created
    /// there if missing.
    #[arg(long, default_value = "127.0.0.1:4222")]
    nats_url: String,
    /// Payload bytes per message for the bus target (about an event's size on the bus).
    #[arg(long, default_value_t = 400)]
    payload_bytes: usize,
    /// Directory for HDR output: one percentile distribution (.hgrm) per rate and steps.csv.
    #[arg(long)]
    hdr_dir: Option<PathBuf>,
    /// The agent the token speaks for (the events' source); with --agents, the prefix of the
    /// agents' names.
    #[arg(long, default_value = "bench")]
    agent: String,
    /// Spread the rate over this many agents (`<agent>-0` …), round robin, each with its own
    /// token minted from --secret, as a fleet sends it. 0: one agent, --token.
    #[arg(long, default_value_t = 0)]
    agents: usize,
    /// The HS256 secret to mint the agents' tokens with (the bridge's SHARED_SECRET).
    #[arg(
        long,
        env = "SHARED_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    secret: String,
    /// Requests per second (ignored with --step).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long each rate is held, e.g. 20s.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Step mode: START:END:INCREMENT requests per second; stops at the first failing step.
    #[arg(long)]
    step: Option<String>,
    /// Most requests in flight at once; beyond it a request counts as an error (dropped).
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: u64,
    /// p99 limit in milliseconds for a step to pass.
    #[arg(long, default_value_t = 50.0)]
    p99_limit_ms: f64,
    /// Label printed with the results.
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

/// What one rate produced.
struct Outcome {
    offered: u64,
    ok: u64,
    errors: u64,
    dropped: u64,
    latency: Histogram<u64>,
    elapsed: Duration,
}

impl Outcome {
    fn ms(&self, q: f64) -> f64 {
        loadgen::ms(&self.latency, q)
    }

    /// Writes the latency distribution in HdrHistogram's percentile format (milliseconds) and
    /// appends one line to steps.csv.
    fn write_hdr(&self, dir: &std::path::Path, label: &str, rate: u64) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        loadgen::write_hgrm(&dir.join(format!("{label}-{rate}.hgrm")), &self.latency)?;
        let csv = dir.join("steps.csv");
        let new = !csv.exists();
        let mut steps = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(csv)?;
        if new {
            writeln!(
                steps,
                "label,rate,offered,ok,errors,dropped,achieved,p50_ms,p90_ms,p99_ms,p999_ms,max_ms,p95_ms"
            )?;
        }
        writeln!(
            steps,
            "{label},{rate},{},{},{},{},{:.0},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3}",
            self.offered,
            self.ok,
            self.errors,
            self.dropped,
            self.ok as f64 / self.elapsed.as_secs_f64(),
            self.ms(0.50),
            self.ms(0.90),
            self.ms(0.99),
            self.ms(0.999),
            self.latency.max() as f64 / 1000.0,
            self.ms(0.95)
        )?;
        Ok(())
    }

    fn print(&self, label: &str, rate: u64) {
        println!(
            "{label} rate={rate} offered={} ok={} errors={} dropped={} achieved={:.0}/s \
             p50={:.2}ms p90={:.2}ms p95={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms",
            self.offered,
            self.ok,
            self.errors,
            self.dropped,
            self.ok as f64 / self.elapsed.as_secs_f64(),
            self.ms(0.50),
            self.ms(0.90),
            self.ms(0.95),
            self.ms(0.99),
            self.ms(0.999),
            self.latency.max() as f64 / 1000.0,
        );
    }
}

/// Where requests go.
#[derive(Clone)]
enum Sender {
    Http {
        client: reqwest::Client,
        url: Arc<str>,
        /// `(agent, "Bearer <token>")` per agent; request `i` goes out as agent `i % len`.
        agents: Arc<[(Arc<str>, Arc<str>)]>,
    },
    Bus {
        /// Boxed: a context is far bigger than the HTTP variant.
        js: Box<jetstream::Context>,
        payload: bytes::Bytes,
    },
}

impl Sender {
    async fn connect(args: &Args) -> anyhow::Result<Self> {
        Ok(match args.target {
            Target::Http => {
                let agents: Vec<(Arc<str>, Arc<str>)> = if args.agents == 0 {
                    anyhow::ensure!(!args.token.is_empty(), "--token (or TOKEN) is required");
                    vec![(
                        args.agent.as_str().into(),
                        format!("Bearer {}", args.token).into(),
                    )]
                } else {
                    anyhow::ensure!(
                        !args.secret.is_empty(),
                        "--agents needs --secret (or SHARED_SECRET)"
                    );
                    (0..args.agents)
                        .map(|k| {
                            let agent = format!("{}-{k}", args.agent);
                            let token = mint(&args.secret, &agent);
                            (agent.into(), format!("Bearer {token}").into())
                        })
                        .collect()
                };
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(4096)
                    .timeout(Duration::from_secs(30))
                    .build()?;
                Sender::Http {
                    client,
                    url: format!("{}/orchestrator/events", args.url.trim_end_matches('/')).into(),
                    agents: agents.into(),
                }
            }
            Target::Bus => {
                let client = async_nats::connect(&args.nats_url).await?;
                let js = jetstream::ContextBuilder::new()
                    .timeout(Duration::from_secs(30))
                    .max_ack_inflight(65_536)
                    .build(client);
                js.get_or_create_stream(stream::Config {
                    name: "LOADGEN".into(),
                    subjects: vec!["loadgen.>".into()],
                    storage: stream::StorageType::File,
                    discard: stream::DiscardPolicy::New,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await?;
                Sender::Bus {
                    js: Box::new(js),
                    payload: bytes::Bytes::from(vec![b'x'; args.payload_bytes]),
                }
            }
        })
    }

    /// One request with a unique id; true on success.
    async fn send(&self, id: String, i: u64) -> bool {
        match self {
            Sender::Http {
                client,
                url,
                agents,
            } => {
                let (agent, auth) = &agents[(i % agents.len() as u64) as usize];
                let body = serde_json::json!({
                    "event_id": id,
                    "type": "bench.event",
                    "source": &**agent,
                    "data": {"i": i},
                    "time": "2026-11-28T00:00:00Z",
                })
                .to_string();
                let request = client
                    .post(&**url)
                    .header("authorization", &**auth)
                    .header("content-type", "application/json")
                    .body(body);
                match request.send().await {
                    Ok(response) => {
                        let status = response.status();
                        let _ = response.bytes().await;
                        status.is_success()
                    }
                    Err(_) => false,
                }
            }
            Sender::Bus { js, payload } => {
                let message = PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(id);
                match js.send_publish("loadgen.bench", message).await {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                }
            }
        }
    }
}

/// An HS256 token for `agent`, as `auto-com-center token` mints one, valid for two hours.
fn mint(secret: &str, agent: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        + 7200;
    let claims = serde_json::json!({
        "agent_id": agent,
        "aud": "auto-com-center",
        "exp": exp,
        "scope": "orchestrator.register orchestrator.task orchestrator.events",
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

async fn run_rate(args: &Args, sender: &Sender, rate: u64, run: u64) -> Outcome {
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    ));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicU64::new(0));
    let mut dropped = 0;
    let total = rate * args.duration.as_secs().max(1);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let scheduled = started + interval.mul_f64(i as f64);
        let now = Instant::now();
        if scheduled > now {
            tokio::time::sleep(scheduled - now).await;
        }
        if in_flight.load(Ordering::Relaxed) >= args.max_in_flight {
            dropped += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{run}-{i}", args.label);
        let (sender, latency, ok, errors, in_flight) = (
            sender.clone(),
            latency.clone(),
            ok.clone(),
            errors.clone(),
            in_flight.clone(),
        );
        tasks.spawn(async move {
            let success = sender.send(id, i).await;
            let micros = scheduled.elapsed().as_micros() as u64;
            latency
                .lock()
                .await
                .record(micros.clamp(1, 60_000_000))
                .ok();
            if success { &ok } else { &errors }.fetch_add(1, Ordering::Relaxed);
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        // Reap finished tasks now and then so the set does not grow without bound.
        if i % 1024 == 0 {
            while tasks.try_join_next().is_some() {}
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let latency = Arc::try_unwrap(latency)
        .expect("all tasks done")
        .into_inner();
    Outcome {
        offered: total,
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        dropped,
        latency,
        elapsed,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sender = Sender::connect(&args).await?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    match &args.step {
        None => {
            let outcome = run_rate(&args, &sender, args.rate, run).await;
            outcome.print(&args.label, args.rate);
            if let Some(dir) = &args.hdr_dir {
                outcome.write_hdr(dir, &args.label, args.rate)?;
            }
            if outcome.errors + outcome.dropped > 0 {
                std::process::exit(1);
            }
        }
        Some(step) => {
            let parts: Vec<u64> = step
                .split(':')
                .map(|p| p.parse())
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("--step wants START:END:INCREMENT"))?;
            let [start, end, inc] = parts[..] else {
                anyhow::bail!("--step wants START:END:INCREMENT");
            };
            let mut best = None;
            let mut rate = start;
            while rate <= end {
                let outcome = run_rate(&args, &sender, rate, run + rate).await;
                outcome.print(&args.label, rate);
                if let Some(dir) = &args.hdr_dir {
                    outcome.write_hdr(dir, &args.label, rate)?;
                }
                let passed = outcome.errors == 0
                    && outcome.dropped == 0
                    && outcome.ms(0.99) < args.p99_limit_ms;
                if !passed {
                    break;
                }
                best = Some(rate);
                rate += inc.max(1);
            }
            match best {
                Some(rate) => println!("{} highest passing rate: {rate}/s", args.label),
                None => println!("{} no rate passed", args.label),
            }
        }
    }
    Ok(())
}
