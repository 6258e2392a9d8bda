//! A small agent: registers, sends a heartbeat on an interval, emits an event, reports a task
//! result, then works: claims tasks of its capability (`example.echo`), reports `running` and
//! echoes each task's input as its result, failing a share of them (`--fail-share`); it stops
//! cleanly on Ctrl-C. It talks to the NATS door by default, or to the HTTP door with `--http`
//! (a claim long-polls over both). docs/nats.md, "Writing an agent", walks through it.
//!
//! ```sh
//! export SHARED_SECRET=...            # the bridge's secret, to mint the token
//! export AGENT_TOKEN=$(target/release/auto-com-center token --agent-id demo-agent)
//! # over NATS (the bridge started with NATS_AGENTS=demo-agent):
//! cargo run --example agent -- --agent-id demo-agent \
//!     --nats-password-file data/nats-agents/demo-agent.password
//! # over HTTP:
//! cargo run --example agent -- --agent-id demo-agent --http http://127.0.0.1:8080
//! # as a push receiver (the bridge started with PUSH_ALLOWED_URLS=http://127.0.0.1:):
//! cargo run --example agent -- --agent-id demo-agent --http http://127.0.0.1:8080 \
//!     --push-listen 127.0.0.1:9000
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::HeaderMap;
use clap::Parser;
use futures::StreamExt as _;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "An example agent of auto-com-center, over NATS or HTTP")]
struct Args {
    /// This agent's id: the token's agent_id, and its NATS user name.
    #[arg(long, env = "AGENT_ID")]
    agent_id: String,
    /// The agent's JWT (`auto-com-center token --agent-id ...`). Never printed.
    #[arg(long, env = "AGENT_TOKEN", hide_env_values = true)]
    token: String,
    /// Talk HTTP to this base URL instead of NATS.
    #[arg(long)]
    http: Option<String>,
    /// The NATS server.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// File holding this agent's NATS password (embedded server: DATA_DIR/nats-agents/<id>.password).
    #[arg(long)]
    nats_password_file: Option<PathBuf>,
    /// Time between heartbeats.
    #[arg(long, default_value = "10s")]
    heartbeat_every: humantime::Duration,
    /// How long to wait for the door's answer to one call.
    #[arg(long, default_value = "5s")]
    answer_timeout: humantime::Duration,
    /// Share of claimed tasks (0 to 1) to report as failed (retryable), to watch retries.
    #[arg(long, default_value_t = 0.0)]
    fail_share: f64,
    /// Be a push receiver instead of claiming: listen here (e.g. 127.0.0.1:9000), register with
    /// `"dispatch": "push"` and that address as `base_url`, and report each pushed task on its
    /// `callback_url`. Needs `--http` (callbacks go there) and a bridge started with
    /// `PUSH_ALLOWED_URLS=http://127.0.0.1:`.
    #[arg(long, requires = "http")]
    push_listen: Option<std::net::SocketAddr>,
}

/// The capability this agent registers and works on.
const CAPABILITY: &str = "example.echo";

/// One way to reach the bridge.
enum Door {
    Nats {
        agent: String,
        token: String,
        client: async_nats::Client,
        timeout: Duration,
    },
    Http {
        base: String,
        token: String,
        client: reqwest::Client,
    },
}

/// The calls, named as the inbound subject and the HTTP path name them.
enum Call<'a> {
    Register,
    Heartbeat,
    Event,
    TaskResult(&'a str),
    Claim,
}

impl Door {
    async fn nats(args: &Args) -> anyhow::Result<Self> {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("agent {}", args.agent_id))
            // Our NATS user may receive only on acc.reply.<agent_id>.>: JetStream's acks to our
            // publishes and the door's answers both arrive there.
            .custom_inbox_prefix(format!("acc.reply.{}", args.agent_id));
        if let Some(file) = &args.nats_password_file {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            options = options.user_and_password(args.agent_id.clone(), password.trim().to_owned());
        }
        let client = options
            .connect(args.nats_url.as_str())
            .await
            .context("connecting to NATS")?;
        Ok(Door::Nats {
            agent: args.agent_id.clone(),
            token: args.token.clone(),
            client,
            timeout: args.answer_timeout.into(),
        })
    }

    /// Sends one call and returns the bridge's answer: the HTTP status and JSON body.
    async fn call(&self, call: Call<'_>, body: &Value) -> anyhow::Result<(u16, Value)> {
        match self {
            Door::Nats {
                agent,
                token,
                client,
                timeout,
            } => {
                let js = async_nats::jetstream::new(client.clone());
                let subject = match call {
                    Call::Register => "acc.in.register".to_owned(),
                    Call::Heartbeat => "acc.in.heartbeat".to_owned(),
                    Call::Event => "acc.in.event".to_owned(),
                    Call::TaskResult(task) => format!("acc.in.task_result.{task}"),
                    Call::Claim => "acc.in.task_claim".to_owned(),
                };
                // Listen for the answer before asking.
                let reply = client.new_inbox();
                let mut answers = client.subscribe(reply.clone()).await?;
                let mut headers = HeaderMap::new();
                headers.insert("Authorization", format!("Bearer {token}").as_str());
                headers.insert("Acc-Reply-To", reply.as_str());
                // Dedupes a retried publish in ACC_INBOUND (the door's intake scopes it to
                // this agent, so no other agent can take it first).
                let msg_id = format!("{agent}-{:016x}", rand::random::<u64>());
                headers.insert("Nats-Msg-Id", msg_id.as_str());
                // The intake's PubAck: the message is durably captured in ACC_INBOUND. With no
                // door running the publish fails with "no responders"; try again later.
                js.publish_with_headers(subject, headers, serde_json::to_vec(body)?.into())
                    .await?
                    .await
                    .context("the inbound stream did not acknowledge")?;
                let answer = tokio::time::timeout(*timeout, answers.next())
                    .await
                    .context("captured, but no answer from the door in time")?
                    .context("answer subscription closed")?;
                let status = answer
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Acc-Status"))
                    .and_then(|v| v.as_str().parse().ok())
                    .context("answer without Acc-Status")?;
                Ok((status, serde_json::from_slice(&answer.payload)?))
            }
            Door::Http {
                base,
                token,
                client,
            } => {
                let path = match call {
                    Call::Register => "/orchestrator/register".to_owned(),
                    Call::Heartbeat => "/orchestrator/heartbeat".to_owned(),
                    Call::Event => "/orchestrator/events".to_owned(),
                    Call::TaskResult(task) => format!("/orchestrator/tasks/{task}/callback"),
                    Call::Claim => "/orchestrator/tasks/claim".to_owned(),
                };
                let response = client
                    .post(format!("{}{path}", base.trim_end_matches('/')))
                    .bearer_auth(token)
                    .json(body)
                    .send()
                    .await?;
                let status = response.status().as_u16();
                Ok((status, response.json().await?))
            }
        }
    }

    async fn close(self) {
        if let Door::Nats { client, .. } = self {
            let _ = client.drain().await;
        }
    }
}

/// Sends a call and logs the answer; an error answer is returned as an error.
async fn send(door: &Door, what: &str, call: Call<'_>, body: Value) -> anyhow::Result<Value> {
    let (status, answer) = door.call(call, &body).await?;
    if status != 200 {
        bail!("{what}: {status} {}", answer["error"]);
    }
    tracing::info!(
        what,
        stream = %answer["stream"],
        seq = %answer["seq"],
        duplicate = %answer["duplicate"],
        "stored"
    );
    Ok(answer)
}

/// Claims what there is and works on it: `running`, then the input echoed back as the result,
/// or (a `fail_share` of the time) a retryable failure. Returns how many tasks it took.
async fn work(door: &Door, claim: &Value, fail_share: f64) -> anyhow::Result<usize> {
    let (status, answer) = door.call(Call::Claim, claim).await?;
    if status != 200 {
        bail!("claim: {status} {}", answer["error"]);
    }
    let tasks = answer["tasks"].as_array().cloned().unwrap_or_default();
    for task in &tasks {
        let task_id = task["task_id"].as_str().context("a task without task_id")?;
        tracing::info!(task_id, attempt = %task["attempt"], "working");
        let running = json!({"status": "running"});
        send(door, "running", Call::TaskResult(task_id), running).await?;
        let report = if rand::random::<f64>() < fail_share {
            json!({"status": "failed", "error": {"message": "told to fail", "retryable": true}})
        } else {
            json!({"status": "succeeded", "result": {"echo": task["input"]}})
        };
        send(door, "result", Call::TaskResult(task_id), report).await?;
    }
    Ok(tasks.len())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let agent = args.agent_id.clone();
    let door = match &args.http {
        Some(base) => Door::Http {
            base: base.clone(),
            token: args.token.clone(),
            client: reqwest::Client::new(),
        },
        None => Door::nats(&args).await?,
    };
    tracing::info!(
        agent,
        via = if args.http.is_some() { "http" } else { "nats" },
        "starting"
    );

    if let (Some(addr), Some(base)) = (args.push_listen, &args.http) {
        return push_receiver(door, &agent, addr, base, args.fail_share).await;
    }
    send(
        &door,
        "register",
        Call::Register,
        json!({
            "agent_id": agent,
            "name": format!("Example agent {agent}"),
            "base_url": "http://127.0.0.1:9000",
            "capabilities": [CAPABILITY],
        }),
    )
    .await?;

    let now = chrono::Utc::now().to_rfc3339();
    send(
        &door,
        "event",
        Call::Event,
        json!({
            "event_id": format!("{agent}-started-{}", chrono::Utc::now().timestamp_millis()),
            "type": "agent.started",
            "source": agent,
            "data": {"pid": std::process::id()},
            "time": now,
        }),
    )
    .await?;

    let task_id = format!("{agent}-task-1");
    send(
        &door,
        "task result",
        Call::TaskResult(&task_id),
        json!({"status": "succeeded", "result": {"echo": "hello"}}),
    )
    .await?;

    // Heartbeats and work until Ctrl-C. A failed call is logged, not fatal: the next may pass.
    // Heartbeats go between claims, so a long-polling claim is never cut short (a claim dropped
    // midway may lease a task this agent never sees; its lease would run out).
    let heartbeat_every: Duration = args.heartbeat_every.into();
    let mut next_heartbeat = tokio::time::Instant::now();
    // A claim waits for work (long-polls) over both doors; over NATS it waits at most half the
    // answer timeout, so the answer always comes in time.
    let mut wait = heartbeat_every.min(Duration::from_secs(10));
    if args.http.is_none() {
        wait = wait.min(Duration::from(args.answer_timeout) / 2);
    }
    let claim = json!({"capabilities": [CAPABILITY], "wait": format!("{}ms", wait.as_millis())});
    let idle = Duration::ZERO;
    loop {
        let round = async {
            if tokio::time::Instant::now() >= next_heartbeat {
                next_heartbeat = tokio::time::Instant::now() + heartbeat_every;
                let body = json!({"agent_id": agent, "status": "online"});
                if let Err(err) = send(&door, "heartbeat", Call::Heartbeat, body).await {
                    tracing::warn!(error = %err, "heartbeat failed");
                }
            }
            match work(&door, &claim, args.fail_share).await {
                Ok(0) => tokio::time::sleep(idle).await,
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "work failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = round => {}
        }
    }
    tracing::info!("stopping");
    door.close().await;
    Ok(())
}

/// The push receiver: a tiny HTTP server that takes `POST /tasks` (answering 200 at once) and
/// reports each task on its `callback_url` with the token the bridge sent, until Ctrl-C.
async fn push_receiver(
    door: Door,
    agent: &str,
    addr: std::net::SocketAddr,
    bridge: &str,
    fail_share: f64,
) -> anyhow::Result<()> {
    use axum::extract::{Json, Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    #[derive(Clone)]
    struct Receiver {
        bridge: String,
        client: reqwest::Client,
        fail_share: f64,
    }

    async fn take(
        State(receiver): State<Receiver>,
        headers: HeaderMap,
        Json(task): Json<Value>,
    ) -> StatusCode {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned();
        tracing::info!(task_id = %task["task_id"], attempt = %task["attempt"], "pushed to us");
        // Answer at once; do the work (and the callbacks) afterwards.
        tokio::spawn(async move {
            let url = task["callback_url"].as_str().unwrap_or_default();
            let url = if url.starts_with('/') {
                format!("{}{url}", receiver.bridge.trim_end_matches('/'))
            } else {
                url.to_owned()
            };
            let report = if rand::random::<f64>() < receiver.fail_share {
                json!({"status": "failed", "error": {"message": "told to fail", "retryable": true}})
            } else {
                json!({"status": "succeeded", "result": {"echo": task["input"]}})
            };
            for body in [json!({"status": "running"}), report] {
                let sent = receiver
                    .client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await;
                if let Err(err) = sent {
                    tracing::warn!(error = %err, "callback failed");
                    return;
                }
            }
        });
        StatusCode::OK
    }

    async fn cancelled(Path(task_id): Path<String>) -> StatusCode {
        tracing::info!(task_id, "the bridge cancelled a task we hold");
        StatusCode::OK
    }

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let base_url = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/tasks", post(take))
        .route("/tasks/{task_id}/cancel", post(cancelled))
        .with_state(Receiver {
            bridge: bridge.to_owned(),
            client: reqwest::Client::new(),
            fail_share,
        });
    send(
        &door,
        "register",
        Call::Register,
        json!({
            "agent_id": agent,
            "name": format!("Example push agent {agent}"),
            "base_url": base_url,
            "capabilities": [CAPABILITY],
            "dispatch": "push",
        }),
    )
    .await?;
    tracing::info!(%base_url, "push receiver ready");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("push receiver")?;
    door.close().await;
    Ok(())
}
