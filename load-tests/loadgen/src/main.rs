//! Open-loop load generator: requests are scheduled at a constant arrival rate, whatever the
//! server does, and each latency is measured from the request's *scheduled* send time, so a
//! stalled server shows up as latency instead of silently lowering the offered load
//! (no coordinated omission).
//!
//! Three targets, measured the same way:
//! - `http` (default): `POST /orchestrator/events` on the bridge, with a bearer token;
//! - `bus`: publish-and-await-ack straight to a JetStream stream (no HTTP, no bridge), so a
//!   report can show the bridge beside the broker's own ceiling on the same machine;
//! - `door`: the bridge's NATS door: each of `--agents` agents has a NATS connection of its own
//!   and publishes events on `acc.in.event` with its token in `Authorization`, as a JetStream
//!   publish; the latency is until the intake's PubAck (stored in `ACC_INBOUND`), or with
//!   `--door-answer` until the door's answer on the agent's reply subject (admitted and stored
//!   in `ACC_EVENTS`, status 200).
//!
//! ```sh
//! loadgen --url http://127.0.0.1:8080 --token "$TOKEN" --agent bench --rate 5000 --duration 20s
//! SHARED_SECRET=... loadgen --agents 64 --rate 5000   # the rate spread over bench-0 … bench-63
//! loadgen ... --step 1000:12000:1000     # highest rate with 0 errors and p99 < 50 ms
//! loadgen --target bus --nats-url 127.0.0.1:4222 --step 1000:20000:1000
//! SHARED_SECRET=... loadgen --target door --nats-url 127.0.0.1:4222 --agents 64 \
//!     --nats-passwords "$DATA_DIR/nats-agents" [--door-answer] --step 1000:12000:1000
//! loadgen ... --hdr-dir out/             # per rate: out/<label>-<rate>.hgrm, and out/steps.csv
//! ```

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use clap::{Parser, ValueEnum};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use tokio::sync::{Mutex, oneshot};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// `POST /orchestrator/events` on the bridge.
    Http,
    /// Publish-and-ack straight to JetStream.
    Bus,
    /// Events published on the bridge's NATS door (`acc.in.event`).
    Door,
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
    /// Door target: the directory of the agents' NATS passwords (`<agent>.password`, as the
    /// embedded server writes them into `DATA_DIR/nats-agents`); each agent logs in as the user
    /// named by its id. Without it, agents connect without credentials.
    #[arg(long)]
    nats_passwords: Option<PathBuf>,
    /// Door target: measure until the door's answer (admitted, 200) instead of the PubAck.
    #[arg(long)]
    door_answer: bool,
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
    Door {
        /// One per agent; request `i` goes out as agent `i % len`.
        agents: Arc<[DoorAgent]>,
        /// Wait for the door's answer, not only the PubAck.
        answer: bool,
    },
}

/// One agent on the NATS door: its connection, `Authorization` value, and the answers it awaits.
struct DoorAgent {
    name: String,
    js: jetstream::Context,
    authorization: String,
    /// Where each awaited answer goes, by the request number in its reply subject.
    waiting: Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<bool>>>>,
}

impl DoorAgent {
    /// Connects as `name` (with its NATS password from `passwords`, if given) and routes the
    /// door's answers on `acc.reply.<name>.bench.<i>` to whoever awaits request `i`.
    async fn connect(
        args: &Args,
        name: String,
        passwords: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("loadgen {name}"))
            .custom_inbox_prefix(format!("acc.reply.{name}"));
        if let Some(dir) = passwords {
            let password = std::fs::read_to_string(dir.join(format!("{name}.password")))
                .with_context(|| format!("reading the NATS password of {name}"))?;
            options = options.user_and_password(name.clone(), password.trim().to_owned());
        }
        let client = options.connect(&args.nats_url).await?;
        let waiting: Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<bool>>>> =
            Default::default();
        let prefix = format!("acc.reply.{name}.bench.");
        let mut answers = client.subscribe(format!("{prefix}*")).await?;
        let routes = waiting.clone();
        tokio::spawn(async move {
            while let Some(answer) = answers.next().await {
                let Some(i) = answer
                    .subject
                    .strip_prefix(prefix.as_str())
                    .and_then(|i| i.parse::<u64>().ok())
                else {
                    continue;
                };
                let ok = answer
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Acc-Status"))
                    .is_some_and(|status| status.as_str() == "200");
                if let Some(waiter) = routes.lock().expect("not poisoned").remove(&i) {
                    let _ = waiter.send(ok);
                }
            }
        });
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(30))
            .max_ack_inflight(65_536)
            .build(client);
        let token = mint(&args.secret, &name);
        Ok(Self {
            name,
            js,
            authorization: format!("Bearer {token}"),
            waiting,
        })
    }

    /// Publishes event `i` with dedupe id `id`; true once it is acknowledged (and answered 200,
    /// when `answer`).
    async fn send(&self, id: String, i: u64, answer: bool) -> bool {
        let body = serde_json::json!({
            "event_id": id,
            "type": "bench.event",
            "source": self.name,
            "data": {"i": i},
            "time": "2026-11-28T00:00:00Z",
        })
        .to_string();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Authorization", self.authorization.as_str());
        headers.insert("Nats-Msg-Id", id.as_str());
        let answered = answer.then(|| {
            let reply = format!("acc.reply.{}.bench.{i}", self.name);
            headers.insert("Acc-Reply-To", reply.as_str());
            let (tx, rx) = oneshot::channel();
            self.waiting.lock().expect("not poisoned").insert(i, tx);
            rx
        });
        let message = PublishMessage::build()
            .payload(body.into())
            .headers(headers);
        let acked = match self.js.send_publish("acc.in.event", message).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        match answered {
            None => acked,
            Some(_) if !acked => {
                self.waiting.lock().expect("not poisoned").remove(&i);
                false
            }
            Some(rx) => tokio::time::timeout(Duration::from_secs(30), rx)
                .await
                .is_ok_and(|ok| ok.unwrap_or(false)),
        }
    }
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
            Target::Door => {
                anyhow::ensure!(
                    args.agents > 0 && !args.secret.is_empty(),
                    "the door target needs --agents and --secret (or SHARED_SECRET)"
                );
                let mut agents = Vec::with_capacity(args.agents);
                for k in 0..args.agents {
                    let name = format!("{}-{k}", args.agent);
                    agents.push(
                        DoorAgent::connect(args, name, args.nats_passwords.as_deref()).await?,
                    );
                }
                Sender::Door {
                    agents: agents.into(),
                    answer: args.door_answer,
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
            Sender::Door { agents, answer } => {
                let agent = &agents[(i % agents.len() as u64) as usize];
                agent.send(id, i, *answer).await
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
