//! Settings: every knob has a flag and an environment variable, is shown by `--help`, and is
//! validated once at start-up into a typed [`Settings`].
//!
//! Raw flags arrive as strings in [`ServeArgs`]; [`Settings::from_args`] turns them into typed
//! values or refuses with a [`ConfigError`] that names the setting, so a typo never reaches the
//! running service. Defaults live here and only here; the README table is written from them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::domain::{AgentId, AgentProfile};

/// The shortest shared secret we accept: HS256 with fewer than 32 bytes of key is guessable.
pub const MIN_SECRET_BYTES: usize = 32;

/// The JWT audience every token must carry.
pub const AUDIENCE: &str = "auto-com-center";

/// The scope that unlocks operator routes such as `GET /orchestrator/agents`.
pub const ADMIN_SCOPE: &str = "orchestrator.admin";

#[derive(Debug, Parser)]
#[command(
    name = "auto-com-center",
    version,
    args_override_self = true,
    about = "A message-bus bridge: agents register, heartbeat, report task results and emit events \
             over HTTP; everything is stored durably on NATS JetStream."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bridge: HTTP ingress and workers, with an embedded nats-server unless NATS_URL is set.
    #[command(after_help = OTEL_HELP)]
    Serve(Box<ServeArgs>),
    /// Mint an HS256 token for an agent and print it.
    Token(TokenArgs),
    /// Print the alert rules (ALERT_RULES, or the plan's defaults), e.g. as a Prometheus
    /// alerting-rules file.
    AlertRules(AlertRulesArgs),
}

/// Output format of `alert-rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RulesFormat {
    /// A Prometheus alerting-rules file (YAML) over the metrics `/metrics` exposes.
    Prometheus,
    /// The rules file format ALERT_RULES reads.
    Json,
}

#[derive(Debug, Args)]
pub struct AlertRulesArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "prometheus")]
    pub format: RulesFormat,
    /// Rules file (JSON); unset: the plan's defaults.
    #[arg(long, env = "ALERT_RULES")]
    pub alert_rules: Option<PathBuf>,
}

/// Trace export takes the standard OpenTelemetry variables (read in `telemetry.rs`).
const OTEL_HELP: &str = "Trace export (standard OpenTelemetry variables):
  OTEL_EXPORTER_OTLP_ENDPOINT   collector URL; unset: nothing is recorded or exported
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT  traces-only URL, used as given
  OTEL_EXPORTER_OTLP_PROTOCOL   grpc or http/protobuf (default http/protobuf)
  OTEL_SERVICE_NAME             service name (default auto-com-center)
  OTEL_RESOURCE_ATTRIBUTES      key=value,key=value
  OTEL_TRACES_SAMPLER           e.g. parentbased_traceidratio (default parentbased_always_on)
  OTEL_TRACES_SAMPLER_ARG       the ratio, 0 to 1";

/// The shared secret, wrapped so that it never prints.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A setting that failed validation. Displays as one line naming the environment variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid {setting}: {message}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub message: String,
}

impl ConfigError {
    fn new(setting: &'static str, message: impl Into<String>) -> Self {
        Self {
            setting,
            message: message.into(),
        }
    }
}

/// How hard the bus works to keep an acknowledged write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    /// The server fsyncs before it acknowledges (`sync_interval: always`): survives power loss.
    Fsync,
    /// Acknowledged from the page cache (or a quorum in a cluster): survives process crashes, and
    /// node loss with 3 replicas, but not power loss of a single node.
    #[value(alias = "replicated")]
    Interval,
}

/// Whether concurrent writes to a stream are committed together (see `bus::group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupCommitMode {
    /// On with `fsync` durability (where each write costs an fsync), off with `interval`.
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The parts of the bridge one process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Role {
    /// The HTTP door: authenticate, validate, publish-and-ack.
    Ingress,
    /// The agent registry: applies registrations and heartbeats to the agents KV, sweeps stale agents.
    Registry,
    /// The NATS door: admits what agents publish on `acc.in.*` with the same admission as HTTP.
    Door,
    /// The metrics worker: merges every ingress's snapshot into fleet figures, adds bus figures.
    Metrics,
    /// The alerting worker: evaluates the alert rules, notifies routes (one replica acts).
    Alerting,
}

#[derive(Debug, Args)]
pub struct SecretArg {
    /// HS256 shared secret, at least 32 bytes. Never logged.
    #[arg(long, env = "SHARED_SECRET", hide_env_values = true)]
    pub shared_secret: Option<String>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub secret: SecretArg,
    /// The agent the token speaks for (the `agent_id` claim).
    #[arg(long)]
    pub agent_id: String,
    /// Space-separated scopes, for example "orchestrator.admin".
    #[arg(long, default_value = "")]
    pub scope: String,
    /// Lifetime in seconds (or a duration such as 1h); at most MAX_TOKEN_LIFETIME.
    #[arg(long, default_value = "3600")]
    pub ttl: String,
    /// The longest lifetime the service accepts; a longer --ttl is refused.
    #[arg(long, env = "MAX_TOKEN_LIFETIME", default_value = DEFAULT_MAX_TOKEN_LIFETIME)]
    pub max_token_lifetime: String,
}

/// Tokens minted to live longer than this (`exp − iat`) are refused.
pub const DEFAULT_MAX_TOKEN_LIFETIME: &str = "24h";

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub secret: SecretArg,

    /// Address the HTTP ingress listens on.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: String,

    /// Comma-separated roles this process runs: ingress, registry, door, metrics, alerting.
    #[arg(
        long,
        env = "ROLES",
        default_value = "ingress,registry,door,metrics,alerting"
    )]
    pub roles: String,

    /// NATS server URL(s), comma-separated for a cluster. Unset: start an embedded nats-server.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,

    /// NATS user name for NATS_URL.
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,

    /// NATS password for NATS_URL. Never logged.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,

    /// NATS credentials file (JWT + NKey) for NATS_URL.
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// The nats-server binary for the embedded server (default: found on PATH).
    #[arg(long, env = "NATS_SERVER_BIN")]
    pub nats_server_bin: Option<PathBuf>,

    /// Data directory of the embedded server (JetStream store, generated config and credentials).
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Client port of the embedded server on 127.0.0.1 (0 picks a free port).
    #[arg(long, env = "EMBEDDED_NATS_PORT", default_value = "4222")]
    pub embedded_nats_port: u16,

    /// Comma-separated agent ids that get a NATS user on the embedded server (user name = agent
    /// id, password in DATA_DIR/nats-agents/<agent_id>.password): publish on acc.in.> only,
    /// receive on acc.reply.<agent_id>.> only.
    #[arg(long, env = "NATS_AGENTS", default_value = "")]
    pub nats_agents: String,

    /// Rejected inbound NATS messages a caller may cause in a burst before the door refuses its
    /// further messages with RATE_LIMITED.
    #[arg(long, env = "DOOR_REJECT_BURST", default_value = "20")]
    pub door_reject_burst: u32,

    /// The door allows a caller one more rejection per this interval, up to DOOR_REJECT_BURST.
    #[arg(long, env = "DOOR_REJECT_INTERVAL", default_value = "1s")]
    pub door_reject_interval: String,

    /// Durability mode: fsync (fsync before every ack) or interval (ack from page cache/quorum).
    #[arg(long, env = "DURABILITY", value_enum, default_value = "fsync")]
    pub durability: Durability,

    /// Group commit: auto (on with fsync durability), on or off. Needs nats-server 2.12+.
    #[arg(long, env = "GROUP_COMMIT", value_enum, default_value = "auto")]
    pub group_commit: GroupCommitMode,

    /// Fewest waiting writes to one stream sent as one atomic batch; fewer go one by one.
    #[arg(long, env = "GROUP_COMMIT_MIN_BATCH", default_value = "16")]
    pub group_commit_min_batch: usize,

    /// Most writes in one atomic batch (the server allows at most 1000).
    #[arg(long, env = "GROUP_COMMIT_MAX_BATCH", default_value = "1000")]
    pub group_commit_max_batch: usize,

    /// Most batches or groups per stream on their way to the server at once (1 to 50).
    #[arg(long, env = "GROUP_COMMIT_IN_FLIGHT", default_value = "4")]
    pub group_commit_in_flight: usize,

    /// Replicas per stream and KV bucket (3 on a 3-node cluster).
    #[arg(long, env = "STREAM_REPLICAS", default_value = "1")]
    pub stream_replicas: usize,

    /// Oldest message a stream keeps.
    #[arg(long, env = "STREAM_MAX_AGE", default_value = "7d")]
    pub stream_max_age: String,

    /// Largest size of each stream; a full stream refuses writes (discard new).
    #[arg(long, env = "STREAM_MAX_BYTES", default_value = "1GiB")]
    pub stream_max_bytes: String,

    /// Window in which a repeated dedupe id is recognised and not stored again.
    #[arg(long, env = "DUPLICATE_WINDOW", default_value = "2m")]
    pub duplicate_window: String,

    /// Pre-registered agents, JSON: {"agent_id": {"name", "base_url", "capabilities": []}}.
    #[arg(long, env = "REGISTERED_AGENTS")]
    pub registered_agents: Option<String>,

    /// An agent without a heartbeat for this long is marked offline.
    #[arg(long, env = "AGENT_STALE_AFTER", default_value = "5m")]
    pub agent_stale_after: String,

    /// How often the registry looks for stale agents.
    #[arg(long, env = "AGENT_SWEEP_INTERVAL", default_value = "60s")]
    pub agent_sweep_interval: String,

    /// Largest accepted request body (never above the NATS server's max payload).
    #[arg(long, env = "BODY_LIMIT", default_value = "256KiB")]
    pub body_limit: String,

    /// Longest wait for JetStream to acknowledge a write before answering 503.
    #[arg(long, env = "PUBLISH_TIMEOUT", default_value = "5s")]
    pub publish_timeout: String,

    /// Longest wait for in-flight requests and workers on shutdown.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s")]
    pub shutdown_timeout: String,

    /// Clock skew tolerated on `exp` and `nbf`.
    #[arg(long, env = "JWT_LEEWAY", default_value = "5s")]
    pub jwt_leeway: String,

    /// Longest accepted bearer token in bytes.
    #[arg(long, env = "MAX_TOKEN_BYTES", default_value = "8192")]
    pub max_token_bytes: usize,

    /// How often each ingress publishes its window snapshot, and the metrics worker merges them.
    #[arg(long, env = "METRICS_SNAPSHOT_INTERVAL", default_value = "10s")]
    pub metrics_snapshot_interval: String,

    /// Sliding window of the latency and error figures (kept in 30 slices).
    #[arg(long, env = "METRICS_WINDOW", default_value = "5m")]
    pub metrics_window: String,

    /// Alert rules file (JSON, see README); unset: the plan's thresholds.
    #[arg(long, env = "ALERT_RULES")]
    pub alert_rules: Option<PathBuf>,

    /// How often the acting alerting replica evaluates the rules.
    #[arg(long, env = "ALERT_EVAL_INTERVAL", default_value = "10s")]
    pub alert_eval_interval: String,

    /// A firing alert is notified again after this long.
    #[arg(long, env = "ALERT_REPEAT_INTERVAL", default_value = "4h")]
    pub alert_repeat_interval: String,

    /// A firing CRITICAL not acknowledged within this long also goes to the escalation route.
    #[arg(long, env = "ALERT_ESCALATE_AFTER", default_value = "15m")]
    pub alert_escalate_after: String,

    /// Lifetime of the alerting lease; the holder renews it every third of it.
    #[arg(long, env = "ALERT_LEASE_TTL", default_value = "15s")]
    pub alert_lease_ttl: String,

    /// Comma-separated webhook URLs for WARN notifications (Alertmanager webhook format). URLs
    /// often hold tokens: they are never logged beyond scheme, host and port.
    #[arg(
        long,
        env = "ALERT_WEBHOOKS_WARNING",
        default_value = "",
        hide_env_values = true
    )]
    pub alert_webhooks_warning: String,

    /// Comma-separated webhook URLs for CRITICAL notifications.
    #[arg(
        long,
        env = "ALERT_WEBHOOKS_CRITICAL",
        default_value = "",
        hide_env_values = true
    )]
    pub alert_webhooks_critical: String,

    /// Comma-separated webhook URLs for escalations (CRITICAL not acknowledged in time).
    #[arg(
        long,
        env = "ALERT_WEBHOOKS_ESCALATION",
        default_value = "",
        hide_env_values = true
    )]
    pub alert_webhooks_escalation: String,

    /// Public URL of the bridge, for externalURL and generatorURL in notifications.
    #[arg(long, env = "ALERT_EXTERNAL_URL", default_value = "")]
    pub alert_external_url: String,
    /// Sustained requests per second each agent may send over HTTP (token bucket); 0 disables.
    /// Over it: 429 RATE_LIMITED with Retry-After.
    #[arg(long, env = "RATE_LIMIT_PER_AGENT", default_value = "500")]
    pub rate_limit_per_agent: f64,

    /// Requests an agent may send in a burst above RATE_LIMIT_PER_AGENT.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value = "1000")]
    pub rate_limit_burst: u32,

    /// Failed authentications one source address may cause in a burst; past it, its requests get
    /// 429 RATE_LIMITED before their tokens are checked.
    #[arg(long, env = "AUTH_FAILURE_BURST", default_value = "50")]
    pub auth_failure_burst: u32,

    /// A source address is allowed one more failed authentication per this interval.
    #[arg(long, env = "AUTH_FAILURE_INTERVAL", default_value = "1s")]
    pub auth_failure_interval: String,

    /// Requests the HTTP door handles at once; more are refused at once with 503 OVERLOADED.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value = "1024")]
    pub max_in_flight: usize,

    /// Longest accepted token lifetime (`exp − iat`, and `exp − now`).
    #[arg(long, env = "MAX_TOKEN_LIFETIME", default_value = DEFAULT_MAX_TOKEN_LIFETIME)]
    pub max_token_lifetime: String,

    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// How to reach NATS.
#[derive(Debug, Clone)]
pub enum NatsTarget {
    /// Start and supervise a local nats-server.
    Embedded(EmbeddedSettings),
    /// Connect to servers someone else runs.
    External { urls: Vec<String>, auth: NatsAuth },
}

#[derive(Clone, Default)]
pub enum NatsAuth {
    #[default]
    None,
    UserPassword(String, String),
    CredsFile(PathBuf),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword(user, _) => write!(f, "UserPassword({user}, ***)"),
            Self::CredsFile(path) => write!(f, "CredsFile({})", path.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EmbeddedSettings {
    pub binary: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub port: u16,
    /// Agents that get their own NATS user, confined to the inbound subjects and their reply
    /// namespace.
    pub agent_users: Vec<AgentId>,
}

/// The NATS door's limit on rejections: a token bucket per caller.
#[derive(Debug, Clone)]
pub struct DoorSettings {
    /// Rejections a caller may cause in a burst.
    pub reject_burst: u32,
    /// One rejection is allowed again after this long.
    pub reject_interval: Duration,
}

/// Group commit as configured; whether it runs also depends on the server's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitSettings {
    pub mode: GroupCommitMode,
    pub min_batch: usize,
    pub max_batch: usize,
    pub in_flight: usize,
}

/// The HTTP door's load limits (enforced in `http::limits`).
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Sustained requests per second per agent; `None` disables the per-agent limit.
    pub per_agent_rate: Option<f64>,
    /// Requests an agent may send in a burst above its rate.
    pub per_agent_burst: u32,
    /// Failed authentications a source address may cause in a burst.
    pub auth_failure_burst: u32,
    /// One more failed authentication is allowed per this interval.
    pub auth_failure_interval: Duration,
    /// Requests handled at once; more are refused with 503 `OVERLOADED`.
    pub max_in_flight: usize,
}

/// Stream limits applied to every stream the bridge owns.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub durability: Durability,
    pub replicas: usize,
    pub max_age: Duration,
    pub max_bytes: i64,
    pub duplicate_window: Duration,
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub secret: Secret,
    pub leeway: Duration,
    pub max_token_bytes: usize,
    /// Longest accepted `exp − iat`.
    pub max_lifetime: Duration,
}

#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub stale_after: Duration,
    pub sweep_interval: Duration,
    pub preregistered: BTreeMap<AgentId, AgentProfile>,
}

/// Ingress snapshots and the metrics worker.
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    pub snapshot_interval: Duration,
    pub window: Duration,
}

/// The alerting worker.
#[derive(Clone)]
pub struct AlertingSettings {
    pub rules: Vec<crate::alerting::rules::CheckedRule>,
    pub eval_interval: Duration,
    pub repeat_interval: Duration,
    pub escalate_after: Duration,
    pub lease_ttl: Duration,
    pub webhooks_warning: Vec<url::Url>,
    pub webhooks_critical: Vec<url::Url>,
    pub webhooks_escalation: Vec<url::Url>,
    pub external_url: String,
}

impl fmt::Debug for AlertingSettings {
    /// Webhook URLs may carry tokens: only their number is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertingSettings")
            .field("rules", &self.rules.len())
            .field("eval_interval", &self.eval_interval)
            .field("repeat_interval", &self.repeat_interval)
            .field("escalate_after", &self.escalate_after)
            .field("lease_ttl", &self.lease_ttl)
            .field("webhooks_warning", &self.webhooks_warning.len())
            .field("webhooks_critical", &self.webhooks_critical.len())
            .field("webhooks_escalation", &self.webhooks_escalation.len())
            .field("external_url", &self.external_url)
            .finish()
    }
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub http_addr: SocketAddr,
    pub roles: Vec<Role>,
    pub nats: NatsTarget,
    pub streams: StreamSettings,
    pub auth: AuthSettings,
    pub registry: RegistrySettings,
    pub door: DoorSettings,
    pub group_commit: GroupCommitSettings,
    pub metrics: MetricsSettings,
    pub alerting: AlertingSettings,
    pub limits: LimitSettings,
    pub body_limit: usize,
    pub publish_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
}

impl Settings {
    pub fn runs(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let secret = parse_secret(&args.secret)?;
        let http_addr = args.http_addr.parse::<SocketAddr>().map_err(|e| {
            ConfigError::new(
                "HTTP_ADDR",
                format!(
                    "{:?} is not an address like 127.0.0.1:8080 ({e})",
                    args.http_addr
                ),
            )
        })?;
        let roles = parse_roles(&args.roles)?;
        let nats = match args.nats_url.as_deref().map(str::trim) {
            None | Some("") => NatsTarget::Embedded(EmbeddedSettings {
                binary: args.nats_server_bin.clone(),
                data_dir: args.data_dir.clone(),
                port: args.embedded_nats_port,
                agent_users: parse_agent_list("NATS_AGENTS", &args.nats_agents)?,
            }),
            Some(list) => {
                let urls = parse_nats_urls(list)?;
                let auth = match (&args.nats_user, &args.nats_password, &args.nats_creds) {
                    (_, _, Some(path)) if args.nats_user.is_some() => {
                        return Err(ConfigError::new(
                            "NATS_CREDS",
                            format!(
                                "set either NATS_CREDS ({}) or NATS_USER/NATS_PASSWORD, not both",
                                path.display()
                            ),
                        ));
                    }
                    (_, _, Some(path)) => NatsAuth::CredsFile(path.clone()),
                    (Some(user), Some(pass), None) => {
                        NatsAuth::UserPassword(user.clone(), pass.clone())
                    }
                    (Some(_), None, None) => {
                        return Err(ConfigError::new(
                            "NATS_PASSWORD",
                            "NATS_USER is set but NATS_PASSWORD is not",
                        ));
                    }
                    (None, Some(_), None) => {
                        return Err(ConfigError::new(
                            "NATS_USER",
                            "NATS_PASSWORD is set but NATS_USER is not",
                        ));
                    }
                    (None, None, None) => NatsAuth::None,
                };
                NatsTarget::External { urls, auth }
            }
        };
        if !(1..=5).contains(&args.stream_replicas) {
            return Err(ConfigError::new(
                "STREAM_REPLICAS",
                format!("must be between 1 and 5, got {}", args.stream_replicas),
            ));
        }
        let max_bytes = parse_bytes("STREAM_MAX_BYTES", &args.stream_max_bytes)?;
        let streams = StreamSettings {
            durability: args.durability,
            replicas: args.stream_replicas,
            max_age: parse_duration("STREAM_MAX_AGE", &args.stream_max_age)?,
            max_bytes: i64::try_from(max_bytes)
                .map_err(|_| ConfigError::new("STREAM_MAX_BYTES", "too large"))?,
            duplicate_window: parse_duration("DUPLICATE_WINDOW", &args.duplicate_window)?,
        };
        if streams.duplicate_window > streams.max_age {
            return Err(ConfigError::new(
                "DUPLICATE_WINDOW",
                "must not be longer than STREAM_MAX_AGE",
            ));
        }
        if !(1..=crate::bus::group::SERVER_MAX_BATCH).contains(&args.group_commit_max_batch) {
            return Err(ConfigError::new(
                "GROUP_COMMIT_MAX_BATCH",
                format!(
                    "must be between 1 and {}, got {}",
                    crate::bus::group::SERVER_MAX_BATCH,
                    args.group_commit_max_batch
                ),
            ));
        }
        if args.group_commit_min_batch < 2 {
            return Err(ConfigError::new(
                "GROUP_COMMIT_MIN_BATCH",
                "must be at least 2 (use GROUP_COMMIT=off to turn batching off)",
            ));
        }
        // The server holds at most 50 open atomic batches per stream.
        if !(1..=50).contains(&args.group_commit_in_flight) {
            return Err(ConfigError::new(
                "GROUP_COMMIT_IN_FLIGHT",
                format!(
                    "must be between 1 and 50, got {}",
                    args.group_commit_in_flight
                ),
            ));
        }
        let group_commit = GroupCommitSettings {
            mode: args.group_commit,
            min_batch: args.group_commit_min_batch,
            max_batch: args.group_commit_max_batch,
            in_flight: args.group_commit_in_flight,
        };
        let body_limit = parse_bytes("BODY_LIMIT", &args.body_limit)?;
        if body_limit < 1024 {
            return Err(ConfigError::new("BODY_LIMIT", "must be at least 1KiB"));
        }
        if args.max_token_bytes < 64 {
            return Err(ConfigError::new(
                "MAX_TOKEN_BYTES",
                "must be at least 64 bytes",
            ));
        }
        let registry = RegistrySettings {
            stale_after: parse_duration("AGENT_STALE_AFTER", &args.agent_stale_after)?,
            sweep_interval: parse_duration("AGENT_SWEEP_INTERVAL", &args.agent_sweep_interval)?,
            preregistered: parse_registered_agents(args.registered_agents.as_deref())?,
        };
        let metrics = MetricsSettings {
            snapshot_interval: parse_duration(
                "METRICS_SNAPSHOT_INTERVAL",
                &args.metrics_snapshot_interval,
            )?,
            window: parse_duration("METRICS_WINDOW", &args.metrics_window)?,
        };
        let alerting = AlertingSettings {
            rules: crate::alerting::rules::load(args.alert_rules.as_deref())
                .map_err(|e| ConfigError::new("ALERT_RULES", e))?,
            eval_interval: parse_duration("ALERT_EVAL_INTERVAL", &args.alert_eval_interval)?,
            repeat_interval: parse_duration("ALERT_REPEAT_INTERVAL", &args.alert_repeat_interval)?,
            escalate_after: parse_duration("ALERT_ESCALATE_AFTER", &args.alert_escalate_after)?,
            lease_ttl: parse_duration("ALERT_LEASE_TTL", &args.alert_lease_ttl)?,
            webhooks_warning: parse_urls("ALERT_WEBHOOKS_WARNING", &args.alert_webhooks_warning)?,
            webhooks_critical: parse_urls(
                "ALERT_WEBHOOKS_CRITICAL",
                &args.alert_webhooks_critical,
            )?,
            webhooks_escalation: parse_urls(
                "ALERT_WEBHOOKS_ESCALATION",
                &args.alert_webhooks_escalation,
            )?,
            external_url: args.alert_external_url.trim().to_owned(),
        };
        if alerting.lease_ttl < Duration::from_millis(300) {
            return Err(ConfigError::new(
                "ALERT_LEASE_TTL",
                "must be at least 300ms",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&args.log_level)
            .map_err(|e| ConfigError::new("LOG_LEVEL", e.to_string()))?;
        Ok(Self {
            http_addr,
            roles,
            nats,
            streams,
            auth: AuthSettings {
                secret,
                leeway: parse_duration("JWT_LEEWAY", &args.jwt_leeway)?,
                max_token_bytes: args.max_token_bytes,
                max_lifetime: parse_duration("MAX_TOKEN_LIFETIME", &args.max_token_lifetime)?,
            },
            registry,
            door: DoorSettings {
                reject_burst: match args.door_reject_burst {
                    0 => return Err(ConfigError::new("DOOR_REJECT_BURST", "must be at least 1")),
                    n => n,
                },
                reject_interval: parse_duration(
                    "DOOR_REJECT_INTERVAL",
                    &args.door_reject_interval,
                )?,
            },
            group_commit,
            metrics,
            alerting,
            limits: parse_limits(args)?,
            body_limit,
            publish_timeout: parse_duration("PUBLISH_TIMEOUT", &args.publish_timeout)?,
            shutdown_timeout: parse_duration("SHUTDOWN_TIMEOUT", &args.shutdown_timeout)?,
            log_format: args.log_format,
            log_level: args.log_level.clone(),
        })
    }
}

fn parse_limits(args: &ServeArgs) -> Result<LimitSettings, ConfigError> {
    let rate = args.rate_limit_per_agent;
    if !rate.is_finite() || rate < 0.0 {
        return Err(ConfigError::new(
            "RATE_LIMIT_PER_AGENT",
            "must be a number of requests per second, 0 to disable",
        ));
    }
    if args.rate_limit_burst == 0 {
        return Err(ConfigError::new("RATE_LIMIT_BURST", "must be at least 1"));
    }
    if args.auth_failure_burst == 0 {
        return Err(ConfigError::new("AUTH_FAILURE_BURST", "must be at least 1"));
    }
    if args.max_in_flight == 0 {
        return Err(ConfigError::new("MAX_IN_FLIGHT", "must be at least 1"));
    }
    Ok(LimitSettings {
        per_agent_rate: (rate > 0.0).then_some(rate),
        per_agent_burst: args.rate_limit_burst,
        auth_failure_burst: args.auth_failure_burst,
        auth_failure_interval: parse_duration(
            "AUTH_FAILURE_INTERVAL",
            &args.auth_failure_interval,
        )?,
        max_in_flight: args.max_in_flight,
    })
}

pub fn parse_secret(arg: &SecretArg) -> Result<Secret, ConfigError> {
    match arg.shared_secret.as_deref() {
        None | Some("") => Err(ConfigError::new(
            "SHARED_SECRET",
            format!(
                "not set; export SHARED_SECRET with at least {MIN_SECRET_BYTES} random bytes (for example: openssl rand -hex 32)"
            ),
        )),
        Some(s) if s.len() < MIN_SECRET_BYTES => Err(ConfigError::new(
            "SHARED_SECRET",
            format!("must be at least {MIN_SECRET_BYTES} bytes, got {}", s.len()),
        )),
        Some(s) => Ok(Secret(s.to_owned())),
    }
}

fn parse_roles(raw: &str) -> Result<Vec<Role>, ConfigError> {
    let mut roles = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let role = Role::from_str(name, true).map_err(|_| {
            ConfigError::new(
                "ROLES",
                format!(
                    "unknown role {name:?}; known roles: ingress, registry, door, metrics, alerting"
                ),
            )
        })?;
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    if roles.is_empty() {
        return Err(ConfigError::new("ROLES", "name at least one role"));
    }
    Ok(roles)
}

/// A comma-separated list of agent ids, each safe as a subject token and NATS user name.
fn parse_agent_list(setting: &'static str, raw: &str) -> Result<Vec<AgentId>, ConfigError> {
    let mut agents = Vec::new();
    for id in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let agent =
            AgentId::parse(id).map_err(|e| ConfigError::new(setting, format!("{id:?}: {e}")))?;
        if !agents.contains(&agent) {
            agents.push(agent);
        }
    }
    Ok(agents)
}

/// Comma-separated http(s) URLs (webhooks). Errors never print the URL: webhook paths and
/// queries often carry tokens, so they name the entry by position (and, when it parses, by
/// scheme, host and port only).
fn parse_urls(setting: &'static str, raw: &str) -> Result<Vec<url::Url>, ConfigError> {
    let mut urls = Vec::new();
    for (index, item) in raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        let n = index + 1;
        let url = url::Url::parse(item)
            .map_err(|e| ConfigError::new(setting, format!("entry {n} is not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::new(
                setting,
                format!(
                    "entry {n} ({}): scheme must be http or https",
                    crate::alerting::routes::redacted(&url)
                ),
            ));
        }
        urls.push(url);
    }
    Ok(urls)
}

fn parse_nats_urls(list: &str) -> Result<Vec<String>, ConfigError> {
    let mut urls = Vec::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let with_scheme = if raw.contains("://") {
            raw.to_owned()
        } else {
            format!("nats://{raw}")
        };
        let parsed = url::Url::parse(&with_scheme)
            .map_err(|e| ConfigError::new("NATS_URL", format!("{raw:?} is not a URL ({e})")))?;
        if !matches!(parsed.scheme(), "nats" | "tls" | "ws" | "wss") {
            return Err(ConfigError::new(
                "NATS_URL",
                format!("{raw:?}: scheme must be nats, tls, ws or wss"),
            ));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(ConfigError::new("NATS_URL", format!("{raw:?} has no host")));
        }
        urls.push(with_scheme);
    }
    if urls.is_empty() {
        return Err(ConfigError::new("NATS_URL", "no URL given"));
    }
    Ok(urls)
}

fn parse_registered_agents(
    raw: Option<&str>,
) -> Result<BTreeMap<AgentId, AgentProfile>, ConfigError> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(BTreeMap::new());
    };
    let value: serde_json::Value = serde_json::from_str(raw)
        .map_err(|e| ConfigError::new("REGISTERED_AGENTS", format!("not valid JSON: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(ConfigError::new(
            "REGISTERED_AGENTS",
            "must be a JSON object {agent_id: {name, base_url, capabilities}}",
        ));
    };
    let mut agents = BTreeMap::new();
    for (id, profile) in map {
        let agent_id = AgentId::parse(&id)
            .map_err(|e| ConfigError::new("REGISTERED_AGENTS", format!("agent id {id:?}: {e}")))?;
        let serde_json::Value::Object(fields) = profile else {
            return Err(ConfigError::new(
                "REGISTERED_AGENTS",
                format!("agent {id:?}: expected an object with name, base_url, capabilities"),
            ));
        };
        let profile = AgentProfile::parse(&fields)
            .map_err(|e| ConfigError::new("REGISTERED_AGENTS", format!("agent {id:?}: {e}")))?;
        agents.insert(agent_id, profile);
    }
    Ok(agents)
}

/// Parses `500ms`, `90s`, `5m`, `7d`; a bare number is seconds.
pub fn parse_duration(setting: &'static str, raw: &str) -> Result<Duration, ConfigError> {
    let raw = raw.trim();
    let parsed = match raw.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(raw),
    };
    let value = parsed.map_err(|e| {
        ConfigError::new(
            setting,
            format!("{raw:?} is not a duration like 500ms, 90s, 5m ({e})"),
        )
    })?;
    if value.is_zero() {
        return Err(ConfigError::new(setting, "must be greater than zero"));
    }
    Ok(value)
}

/// Parses `262144`, `256KiB`, `1MiB`, `1GiB` (also `KB`/`MB`/`GB`, read as powers of 1024).
pub fn parse_bytes(setting: &'static str, raw: &str) -> Result<usize, ConfigError> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(ConfigError::new(
                setting,
                format!("{raw:?} is not a size like 262144, 256KiB or 1GiB"),
            ));
        }
    };
    let number = digits.parse::<usize>().map_err(|_| {
        ConfigError::new(
            setting,
            format!("{raw:?} is not a size like 262144, 256KiB or 1GiB"),
        )
    })?;
    number
        .checked_mul(multiplier)
        .filter(|n| *n > 0)
        .ok_or_else(|| ConfigError::new(setting, format!("{raw:?} is out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_webhook_url_is_refused_without_printing_its_credentials() {
        for raw in [
            "ftp://user:hunter2@hooks.example.com/services/T0/B0/secret?token=abc",
            "https://ok.example.com/hook, hooks.example.com/services/secret?token=abc",
        ] {
            let err = parse_urls("ALERT_WEBHOOKS_WARNING", raw).unwrap_err();
            let shown = format!("{}: {}", err.setting, err.message);
            for secret in ["hunter2", "user", "secret", "token", "abc", "services"] {
                assert!(!shown.contains(secret), "{secret} leaked in {shown:?}");
            }
        }
        let err = parse_urls(
            "ALERT_WEBHOOKS_WARNING",
            "ftp://user:pw@hooks.example.com/x",
        )
        .unwrap_err();
        assert!(
            err.message.contains("ftp://hooks.example.com/"),
            "{}",
            err.message
        );
    }

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["auto-com-center", "serve"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(args) => *args,
            _ => unreachable!(),
        }
    }

    const SECRET: &str = "--shared-secret=0123456789abcdef0123456789abcdef";

    #[test]
    fn a_missing_secret_is_refused_by_name() {
        let err = Settings::from_args(&ServeArgs {
            secret: SecretArg {
                shared_secret: None,
            },
            ..args(&[])
        })
        .unwrap_err();
        assert_eq!(err.setting, "SHARED_SECRET");
    }

    #[test]
    fn a_short_secret_is_refused_by_name() {
        let err = Settings::from_args(&args(&["--shared-secret=short"])).unwrap_err();
        assert_eq!(err.setting, "SHARED_SECRET");
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");
    }

    #[test]
    fn defaults_validate() {
        let settings = Settings::from_args(&args(&[SECRET])).unwrap();
        assert_eq!(settings.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.body_limit, 256 * 1024);
        assert_eq!(settings.streams.durability, Durability::Fsync);
        assert_eq!(settings.registry.stale_after, Duration::from_secs(300));
        assert!(matches!(settings.nats, NatsTarget::Embedded(_)));
        assert!(settings.runs(Role::Ingress) && settings.runs(Role::Registry));
        assert!(
            settings.runs(Role::Door),
            "serve runs the NATS door by default"
        );
    }

    #[test]
    fn bad_values_name_their_setting() {
        let cases: &[(&str, &str)] = &[
            ("--http-addr=localhost", "HTTP_ADDR"),
            ("--registered-agents={not json", "REGISTERED_AGENTS"),
            ("--registered-agents=[]", "REGISTERED_AGENTS"),
            (
                r#"--registered-agents={"a.b":{"name":"x","base_url":"http://x","capabilities":[]}}"#,
                "REGISTERED_AGENTS",
            ),
            (
                r#"--registered-agents={"a":{"name":"x","base_url":"not a url","capabilities":[]}}"#,
                "REGISTERED_AGENTS",
            ),
            ("--agent-stale-after=soon", "AGENT_STALE_AFTER"),
            ("--body-limit=lots", "BODY_LIMIT"),
            ("--roles=ingress,cook", "ROLES"),
            ("--nats-url=http://x:4222", "NATS_URL"),
            ("--stream-replicas=7", "STREAM_REPLICAS"),
            ("--nats-agents=good,bad.agent", "NATS_AGENTS"),
            ("--door-reject-burst=0", "DOOR_REJECT_BURST"),
            ("--door-reject-interval=never", "DOOR_REJECT_INTERVAL"),
            (
                "--metrics-snapshot-interval=often",
                "METRICS_SNAPSHOT_INTERVAL",
            ),
            ("--alert-eval-interval=0s", "ALERT_EVAL_INTERVAL"),
            (
                "--alert-webhooks-critical=ftp://x",
                "ALERT_WEBHOOKS_CRITICAL",
            ),
            ("--alert-rules=/nonexistent/rules.json", "ALERT_RULES"),
            ("--alert-lease-ttl=10ms", "ALERT_LEASE_TTL"),
            ("--rate-limit-per-agent=-1", "RATE_LIMIT_PER_AGENT"),
            ("--rate-limit-burst=0", "RATE_LIMIT_BURST"),
            ("--auth-failure-burst=0", "AUTH_FAILURE_BURST"),
            ("--auth-failure-interval=often", "AUTH_FAILURE_INTERVAL"),
            ("--max-in-flight=0", "MAX_IN_FLIGHT"),
            ("--max-token-lifetime=forever", "MAX_TOKEN_LIFETIME"),
        ];
        for (flag, setting) in cases {
            let err = Settings::from_args(&args(&[SECRET, flag])).unwrap_err();
            assert_eq!(err.setting, *setting, "{flag}: {err}");
        }
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_bytes("X", "256KiB").unwrap(), 262_144);
        assert_eq!(parse_bytes("X", "1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("X", "1000").unwrap(), 1000);
        assert_eq!(
            parse_duration("X", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("X", "90").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("X", "7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("X", "0s").is_err());
    }

    #[test]
    fn registered_agents_parse() {
        let settings = Settings::from_args(&args(&[
            SECRET,
            r#"--registered-agents={"pilot":{"name":"Pilot","base_url":"https://pilot.example","capabilities":["a","b"]}}"#,
        ]))
        .unwrap();
        let (id, profile) = settings.registry.preregistered.iter().next().unwrap();
        assert_eq!(id.as_str(), "pilot");
        assert_eq!(profile.capabilities.len(), 2);
    }

    #[test]
    fn external_nats_takes_a_cluster_list() {
        let settings =
            Settings::from_args(&args(&[SECRET, "--nats-url=a:4222, nats://b:4222"])).unwrap();
        let NatsTarget::External { urls, .. } = settings.nats else {
            panic!("expected external");
        };
        assert_eq!(urls, ["nats://a:4222", "nats://b:4222"]);
    }

    #[test]
    fn the_secret_never_prints() {
        let settings = Settings::from_args(&args(&[SECRET])).unwrap();
        assert!(!format!("{settings:?}").contains("0123456789abcdef"));
    }
}
