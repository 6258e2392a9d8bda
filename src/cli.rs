//! The command line, the top layer: the clap types ([`Cli`] and its subcommands), the [`Role`]s
//! a process runs, and the aggregate [`Settings`] that `serve` hands to the
//! [`Application`](crate::Application). Every knob has a flag and an environment variable and is
//! shown by `--help`; defaults live here and only here (the table in docs/operations.md, Configuration reference, is written from them).
//!
//! Values are typed as clap reads them (the parsers are in [`values`]; durations use
//! [`crate::domain::parse_duration`]), so a bad value is refused before anything starts, and
//! [`ConfigError::from_clap`] renders clap's refusal as one line naming the environment variable.
//! [`Settings::from_args`] then checks what spans several settings and assembles each module's
//! own settings type. Nothing below this module imports it.

pub mod values;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};

use crate::alerting::AlertingSettings;
use crate::auth::introspection::{ClientSecret, IntrospectionSettings};
use crate::auth::{AuthMode, AuthSettings, Secret, SecretError, cache::CacheLimits};
use crate::bus::batch::SERVER_MAX_BATCH;
use crate::bus::{
    Durability, EmbeddedSettings, GroupCommitMode, GroupCommitSettings, NatsAuth, NatsTarget,
    StreamSettings,
};
use crate::domain::{AgentId, AgentProfile, parse_duration};
use crate::door::DoorSettings;
use crate::http::limits::LimitSettings;
use crate::metrics::MetricsSettings;
use crate::streams::StreamsSettings;
use crate::tasks::TaskSettings;
use crate::tasks::push::PushSettings;
use crate::telemetry::LogFormat;
use crate::workers::registry::RegistrySettings;

/// A comma-separated list, given as one value. (Spelled as an alias because clap reads a field
/// typed `Vec<T>` as a flag that may be repeated.)
pub type CommaSeparated<T> = Vec<T>;

/// The command line of `auto-com-center`.
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

/// What to do.
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

/// Arguments of `alert-rules`.
#[derive(Debug, Args)]
pub struct AlertRulesArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "prometheus")]
    pub format: RulesFormat,
    /// Rules file (JSON); unset: the plan's defaults.
    #[arg(long, env = "ALERT_RULES")]
    pub alert_rules: Option<PathBuf>,
    /// As `serve`'s: with `false`, `/metrics` names no agent, so the exported agent rules
    /// watch the oldest offline agent instead of each one.
    #[arg(
        long,
        env = "METRICS_AGENT_IDS",
        default_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::value_parser!(bool)
    )]
    pub metrics_agent_ids: bool,
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
    /// The task dispatcher: queues submitted tasks, leases them to claiming agents, expires
    /// leases and retries (one replica acts).
    Dispatcher,
}

/// A setting that failed validation. Displays as one line naming the environment variable (or
/// the flag, for a setting without one).
#[derive(Debug, thiserror::Error)]
#[error("invalid {setting}: {message}")]
pub struct ConfigError {
    /// The environment variable, or the flag.
    pub setting: String,
    /// Why the value was refused; never the value of a hidden setting.
    pub message: String,
}

impl ConfigError {
    fn new(setting: &str, message: impl Into<String>) -> Self {
        Self {
            setting: setting.to_owned(),
            message: message.into(),
        }
    }

    /// The one-line form of a value clap refused: a value parser's reason, or a value not among
    /// the possible ones, named by the setting's environment variable. `None` for every other
    /// outcome of parsing (help, version, usage mistakes), which clap prints itself.
    pub fn from_clap(err: &clap::Error) -> Option<Self> {
        use clap::error::{ContextKind, ContextValue, ErrorKind};

        if !matches!(
            err.kind(),
            ErrorKind::ValueValidation | ErrorKind::InvalidValue
        ) {
            return None;
        }
        // The argument as clap shows it: `--agent-stale-after <AGENT_STALE_AFTER>`.
        let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
            return None;
        };
        let flag = arg.split_whitespace().next().unwrap_or(arg);
        let setting = env_var_of(&Cli::command(), flag).unwrap_or_else(|| flag.to_owned());
        let message = match std::error::Error::source(err) {
            Some(reason) => reason.to_string(),
            None => {
                let value = match err.get(ContextKind::InvalidValue) {
                    Some(ContextValue::String(value)) => value.as_str(),
                    _ => "",
                };
                let valid = match err.get(ContextKind::ValidValue) {
                    Some(ContextValue::Strings(valid)) => valid.join(", "),
                    _ => String::new(),
                };
                format!("{value:?} is not one of: {valid}")
            }
        };
        Some(Self { setting, message })
    }
}

/// The environment variable of the flag `--long` in `command` or any of its subcommands.
fn env_var_of(command: &clap::Command, flag: &str) -> Option<String> {
    let long = flag.strip_prefix("--")?;
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .and_then(clap::Arg::get_env)
        .map(|env| env.to_string_lossy().into_owned())
        .or_else(|| {
            command
                .get_subcommands()
                .find_map(|sub| env_var_of(sub, flag))
        })
}

/// The shared secret, read alike by `serve` and `token`.
#[derive(Debug, Args)]
pub struct SecretArg {
    /// HS256 shared secret, at least 32 bytes. Never logged.
    #[arg(long, env = "SHARED_SECRET", hide_env_values = true, value_parser = Secret::parse)]
    pub shared_secret: Option<Secret>,
}

impl SecretArg {
    /// The secret, or the refusal that says how to set one.
    pub fn require(&self) -> Result<Secret, ConfigError> {
        self.shared_secret
            .clone()
            .ok_or_else(|| ConfigError::new("SHARED_SECRET", SecretError::Missing.to_string()))
    }
}

/// Arguments of `token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub secret: SecretArg,
    /// The agent the token speaks for (the `agent_id` claim).
    #[arg(long, value_parser = AgentId::parse)]
    pub agent_id: AgentId,
    /// Space-separated scopes, for example "orchestrator.admin".
    #[arg(long, default_value = "")]
    pub scope: String,
    /// Lifetime in seconds (or a duration such as 1h); at most MAX_TOKEN_LIFETIME.
    #[arg(long, default_value = "3600", value_parser = parse_duration)]
    pub ttl: Duration,
    /// The longest lifetime the service accepts; a longer --ttl is refused.
    #[arg(
        long,
        env = "MAX_TOKEN_LIFETIME",
        default_value = DEFAULT_MAX_TOKEN_LIFETIME,
        value_parser = parse_duration
    )]
    pub max_token_lifetime: Duration,
}

/// Tokens minted to live longer than this (`exp − iat`) are refused.
pub const DEFAULT_MAX_TOKEN_LIFETIME: &str = "24h";

/// Arguments of `serve`, typed; [`Settings::from_args`] validates what spans several of them.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub secret: SecretArg,

    /// Address the HTTP ingress listens on.
    #[arg(
        long,
        env = "HTTP_ADDR",
        default_value = "127.0.0.1:8080",
        value_parser = values::socket_addr
    )]
    pub http_addr: SocketAddr,

    /// Comma-separated roles this process runs: ingress, registry, door, metrics, alerting,
    /// dispatcher.
    #[arg(
        long,
        env = "ROLES",
        default_value = "ingress,registry,door,metrics,alerting,dispatcher",
        value_parser = values::roles
    )]
    pub roles: CommaSeparated<Role>,

    /// NATS server URL(s), comma-separated for a cluster. Unset: start an embedded nats-server.
    #[arg(long, env = "NATS_URL", value_parser = values::nats_urls)]
    pub nats_url: Option<CommaSeparated<String>>,

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
    /// id, in its own account AGENT_<agent_id>, password in
    /// DATA_DIR/nats-agents/<agent_id>.password): publish on acc.in.> only, receive on
    /// acc.reply.<agent_id>.> only.
    #[arg(long, env = "NATS_AGENTS", default_value = "", value_parser = values::agent_ids)]
    pub nats_agents: CommaSeparated<AgentId>,

    /// Rejected inbound NATS messages a caller may cause in a burst before the door refuses its
    /// further messages with RATE_LIMITED.
    #[arg(
        long,
        env = "DOOR_REJECT_BURST",
        default_value = "20",
        value_parser = values::at_least(1u32)
    )]
    pub door_reject_burst: u32,

    /// The door allows a caller one more rejection per this interval, up to DOOR_REJECT_BURST.
    #[arg(long, env = "DOOR_REJECT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub door_reject_interval: Duration,

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
    #[arg(
        long,
        env = "GROUP_COMMIT_MAX_BATCH",
        default_value = "1000",
        value_parser = values::between(1, SERVER_MAX_BATCH)
    )]
    pub group_commit_max_batch: usize,

    /// Most batches or groups per stream on their way to the server at once (1 to 50).
    #[arg(
        long,
        env = "GROUP_COMMIT_IN_FLIGHT",
        default_value = "4",
        value_parser = values::between(1usize, 50)
    )]
    pub group_commit_in_flight: usize,

    /// Replicas per stream and KV bucket (3 on a 3-node cluster).
    #[arg(
        long,
        env = "STREAM_REPLICAS",
        default_value = "1",
        value_parser = values::between(1usize, 5)
    )]
    pub stream_replicas: usize,

    /// Oldest message a stream keeps.
    #[arg(long, env = "STREAM_MAX_AGE", default_value = "7d", value_parser = parse_duration)]
    pub stream_max_age: Duration,

    /// Oldest event the events stream keeps (how far back event streams can resume); unset:
    /// STREAM_MAX_AGE.
    #[arg(long, env = "EVENTS_MAX_AGE", value_parser = parse_duration)]
    pub events_max_age: Option<Duration>,

    /// Oldest record the audit trail keeps; the audit stream denies delete and purge.
    #[arg(long, env = "AUDIT_MAX_AGE", default_value = "90d", value_parser = parse_duration)]
    pub audit_max_age: Duration,

    /// Largest size of each stream; a full stream refuses writes (discard new).
    #[arg(long, env = "STREAM_MAX_BYTES", default_value = "1GiB", value_parser = values::byte_size)]
    pub stream_max_bytes: usize,

    /// Window in which a repeated dedupe id is recognised and not stored again.
    #[arg(long, env = "DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration)]
    pub duplicate_window: Duration,

    /// Pre-registered agents, JSON: {"agent_id": {"name", "base_url", "capabilities": []}}.
    #[arg(long, env = "REGISTERED_AGENTS", value_parser = values::registered_agents)]
    pub registered_agents: Option<BTreeMap<AgentId, AgentProfile>>,

    /// An agent without a heartbeat for this long is marked offline.
    #[arg(long, env = "AGENT_STALE_AFTER", default_value = "5m", value_parser = parse_duration)]
    pub agent_stale_after: Duration,

    /// How often the registry looks for stale agents.
    #[arg(long, env = "AGENT_SWEEP_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub agent_sweep_interval: Duration,

    /// Heartbeats of one agent within this window are written to the registry as one (the
    /// newest); a status change is written at once. 0 writes every heartbeat.
    #[arg(long, env = "HEARTBEAT_COALESCE", default_value = "1s", value_parser = values::duration_or_zero)]
    pub heartbeat_coalesce: Duration,

    /// Largest accepted request body (never above the NATS server's max payload).
    #[arg(long, env = "BODY_LIMIT", default_value = "256KiB", value_parser = values::byte_size)]
    pub body_limit: usize,

    /// Longest wait for JetStream to acknowledge a write before answering 503.
    #[arg(long, env = "PUBLISH_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub publish_timeout: Duration,

    /// Longest wait for in-flight requests and workers on shutdown.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Clock skew tolerated on `exp` and `nbf`.
    #[arg(long, env = "JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// Longest accepted bearer token in bytes.
    #[arg(
        long,
        env = "MAX_TOKEN_BYTES",
        default_value = "8192",
        value_parser = values::at_least(64usize)
    )]
    pub max_token_bytes: usize,

    /// How often each ingress publishes its window snapshot, and the metrics worker merges them.
    #[arg(
        long,
        env = "METRICS_SNAPSHOT_INTERVAL",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub metrics_snapshot_interval: Duration,

    /// Sliding window of the latency and error figures (kept in 30 slices).
    #[arg(long, env = "METRICS_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub metrics_window: Duration,

    /// `/metrics` (unauthenticated) names each offline agent by its id, so Prometheus rules can
    /// alert per agent; `false` shows only the oldest offline agent's last heartbeat.
    #[arg(
        long,
        env = "METRICS_AGENT_IDS",
        default_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::value_parser!(bool)
    )]
    pub metrics_agent_ids: bool,

    /// Alert rules file (JSON, see docs/alerting.md, Rules); unset: the plan's thresholds.
    #[arg(long, env = "ALERT_RULES")]
    pub alert_rules: Option<PathBuf>,

    /// How often the acting alerting replica evaluates the rules.
    #[arg(long, env = "ALERT_EVAL_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub alert_eval_interval: Duration,

    /// A firing alert is notified again after this long.
    #[arg(long, env = "ALERT_REPEAT_INTERVAL", default_value = "4h", value_parser = parse_duration)]
    pub alert_repeat_interval: Duration,

    /// A firing CRITICAL not acknowledged within this long also goes to the escalation route.
    #[arg(long, env = "ALERT_ESCALATE_AFTER", default_value = "15m", value_parser = parse_duration)]
    pub alert_escalate_after: Duration,

    /// Lifetime of the alerting lease; the holder renews it every third of it.
    #[arg(long, env = "ALERT_LEASE_TTL", default_value = "15s", value_parser = parse_duration)]
    pub alert_lease_ttl: Duration,

    /// Comma-separated webhook URLs for WARN notifications (Alertmanager webhook format). URLs
    /// often hold tokens: they are never logged beyond scheme, host and port.
    #[arg(
        long,
        env = "ALERT_WEBHOOKS_WARNING",
        default_value = "",
        hide_env_values = true,
        value_parser = values::webhook_urls
    )]
    pub alert_webhooks_warning: CommaSeparated<url::Url>,

    /// Comma-separated webhook URLs for CRITICAL notifications.
    #[arg(
        long,
        env = "ALERT_WEBHOOKS_CRITICAL",
        default_value = "",
        hide_env_values = true,
        value_parser = values::webhook_urls
    )]
    pub alert_webhooks_critical: CommaSeparated<url::Url>,

    /// Comma-separated webhook URLs for escalations (CRITICAL not acknowledged in time).
    #[arg(
        long,
        env = "ALERT_WEBHOOKS_ESCALATION",
        default_value = "",
        hide_env_values = true,
        value_parser = values::webhook_urls
    )]
    pub alert_webhooks_escalation: CommaSeparated<url::Url>,

    /// A comment is sent this often on an idle event stream, so proxies keep it open.
    #[arg(long, env = "SSE_KEEPALIVE", default_value = "15s", value_parser = parse_duration)]
    pub sse_keepalive: Duration,

    /// Broadcasts a stream subscriber may fall behind the newest before its stream is ended
    /// (it resumes by Last-Event-ID). Each broadcast carries up to 32 events (see
    /// SSE_BATCH_WINDOW). Memory: at most this many broadcasts per stream kind and replica.
    #[arg(
        long,
        env = "SSE_BUFFER",
        default_value = "1024",
        value_parser = values::between(16usize, 1_000_000)
    )]
    pub sse_buffer: usize,

    /// How long an event stream's hub gathers events after the first before it sends them to
    /// its subscribers together: fewer, larger writes per subscriber, for at most this much
    /// added latency. 0s: each event at once.
    #[arg(long, env = "SSE_BATCH_WINDOW", default_value = "10ms", value_parser = parse_duration)]
    pub sse_batch_window: Duration,

    /// Event streams open at once on this replica; more get 503 OVERLOADED.
    #[arg(
        long,
        env = "SSE_MAX_STREAMS",
        default_value = "2000",
        value_parser = values::at_least(1usize)
    )]
    pub sse_max_streams: usize,

    /// Event streams one caller may hold open at once; more get 429 TOO_MANY_STREAMS.
    #[arg(
        long,
        env = "SSE_MAX_STREAMS_PER_CALLER",
        default_value = "64",
        value_parser = values::at_least(1usize)
    )]
    pub sse_max_streams_per_caller: usize,

    /// Public URL of the bridge, for externalURL and generatorURL in notifications.
    #[arg(long, env = "ALERT_EXTERNAL_URL", default_value = "")]
    pub alert_external_url: String,

    /// Comma-separated Alertmanager base URLs (e.g. http://alertmanager:9093): every firing
    /// and resolved alert is POSTed to each one's /api/v2/alerts, as Prometheus does.
    #[arg(
        long,
        env = "ALERTMANAGER_URL",
        default_value = "",
        hide_env_values = true,
        value_parser = values::alertmanager_urls
    )]
    pub alertmanager_url: CommaSeparated<url::Url>,

    /// A firing alert is sent to the Alertmanagers again after this long; its endsAt is four
    /// times this (or ALERT_EVAL_INTERVAL) ahead.
    #[arg(
        long,
        env = "ALERTMANAGER_RESEND_INTERVAL",
        default_value = "1m",
        value_parser = parse_duration
    )]
    pub alertmanager_resend_interval: Duration,
    /// Sustained requests per second each agent may send, over HTTP and the NATS door together
    /// (token bucket); 0 disables. Over it: 429 RATE_LIMITED with Retry-After.
    #[arg(long, env = "RATE_LIMIT_PER_AGENT", default_value = "500", value_parser = values::rate)]
    pub rate_limit_per_agent: f64,

    /// Requests an agent may send in a burst above RATE_LIMIT_PER_AGENT.
    #[arg(
        long,
        env = "RATE_LIMIT_BURST",
        default_value = "1000",
        value_parser = values::at_least(1u32)
    )]
    pub rate_limit_burst: u32,

    /// Failed authentications one source address may cause in a burst; past it, its tokens that
    /// do not verify get 429 RATE_LIMITED (a token that verifies is still served).
    #[arg(
        long,
        env = "AUTH_FAILURE_BURST",
        default_value = "50",
        value_parser = values::at_least(1u32)
    )]
    pub auth_failure_burst: u32,

    /// A source address is allowed one more failed authentication per this interval.
    #[arg(long, env = "AUTH_FAILURE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub auth_failure_interval: Duration,

    /// Requests the HTTP door handles at once; more are refused at once with 503 OVERLOADED.
    #[arg(
        long,
        env = "MAX_IN_FLIGHT",
        default_value = "1024",
        value_parser = values::at_least(1usize)
    )]
    pub max_in_flight: usize,

    /// Requests one agent may have in flight at once, over HTTP and the NATS door together; more
    /// are refused at once with 429 RATE_LIMITED (Retry-After: 1), so one agent never holds the
    /// slots of MAX_IN_FLIGHT that others need. Default: half of MAX_IN_FLIGHT (at least 1).
    #[arg(long, env = "MAX_IN_FLIGHT_PER_AGENT", value_parser = values::at_least(1usize))]
    pub max_in_flight_per_agent: Option<usize>,

    /// A connection must send a request's headers within this long of opening, or of its
    /// previous answer; else it is closed. This is also the idle timeout of keep-alive connections.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// A request's body must arrive within this long of its headers; else 408 REQUEST_TIMEOUT.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// A connection whose pending write makes no progress for this long (its client reads
    /// nothing, e.g. a stalled event stream) is closed, freeing its stream slot.
    #[arg(long, env = "WRITE_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_stall_timeout: Duration,

    /// Bytes one agent may store on the bus per STREAM_MAX_AGE (a token bucket of bytes, full at
    /// start); past it, 429 QUOTA_EXCEEDED. Default: a 32nd of STREAM_MAX_BYTES, so one agent
    /// never fills a stream.
    #[arg(long, env = "AGENT_STORE_QUOTA", value_parser = values::byte_size)]
    pub agent_store_quota: Option<usize>,

    /// Messages one agent may store on the bus per STREAM_MAX_AGE (a token bucket of messages
    /// beside AGENT_STORE_QUOTA's bytes, both kept on the bus so every replica charges the same
    /// one); past it, 429 QUOTA_EXCEEDED.
    #[arg(
        long,
        env = "AGENT_STORE_MESSAGES",
        default_value = "1000000",
        value_parser = values::at_least(1u64)
    )]
    pub agent_store_messages: u64,

    /// Connections one source address may hold open at once; past it, a new connection is closed
    /// as soon as it is accepted. Each open connection costs the bridge about 30 KiB while busy,
    /// so this also bounds its memory under overload.
    #[arg(
        long,
        env = "MAX_CONNECTIONS_PER_ADDRESS",
        default_value = "2048",
        value_parser = values::at_least(1usize)
    )]
    pub max_connections_per_address: usize,

    /// Longest accepted token lifetime (`exp − iat`, and `exp − now`).
    #[arg(
        long,
        env = "MAX_TOKEN_LIFETIME",
        default_value = DEFAULT_MAX_TOKEN_LIFETIME,
        value_parser = parse_duration
    )]
    pub max_token_lifetime: Duration,

    /// A queued task waiting this long counts one priority level higher (per whole period), so
    /// nothing starves behind a steady stream of more urgent work; 0s turns aging off.
    #[arg(
        long,
        env = "TASK_PRIORITY_AGING",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub task_priority_aging: Duration,

    /// Claims per round-robin turn of each tenant within a priority level, as
    /// `tenant=weight,...` (1 to 1000; a tenant not named weighs 1).
    #[arg(long, env = "TENANT_WEIGHTS", default_value = "", value_parser = crate::tasks::queue::TenantWeights::parse)]
    pub tenant_weights: crate::tasks::queue::TenantWeights,

    /// Queued tasks a tenant may have; a submission over it is refused with 429 `QUEUE_FULL`
    /// and `Retry-After` (0: no cap).
    #[arg(long, env = "TASK_MAX_QUEUED_PER_TENANT", default_value_t = crate::tasks::backlog::DEFAULT_MAX_QUEUED_PER_TENANT)]
    pub task_max_queued_per_tenant: u32,

    /// Lifetime of the dispatcher lease: one replica dispatches tasks, and a successor takes
    /// over within this long after it stops answering.
    #[arg(
        long,
        env = "DISPATCHER_LEASE_TTL",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub dispatcher_lease_ttl: Duration,

    /// URL prefixes an agent's `base_url` must start with for `dispatch: push` over HTTP
    /// (comma-separated, e.g. `https://workers.internal/,http://127.0.0.1:`); empty refuses push
    /// registrations. End a prefix with `/` or `:` so `https://a.example` does not also allow
    /// `https://a.example.evil`.
    #[arg(
        long,
        env = "PUSH_ALLOWED_URLS",
        default_value = "",
        value_parser = values::url_prefixes
    )]
    pub push_allowed_urls: CommaSeparated<String>,

    /// Longest wait for a push receiver to answer `POST {base_url}/tasks`; past it the attempt
    /// failed (and is retried).
    #[arg(long, env = "PUSH_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub push_timeout: Duration,

    /// Public URL of this service as push receivers reach it: the `callback_url` of a pushed
    /// task is `{PUSH_CALLBACK_URL}/orchestrator/tasks/{id}/callback` (only the path when
    /// empty).
    #[arg(long, env = "PUSH_CALLBACK_URL", default_value = "")]
    pub push_callback_url: String,

    /// Which tokens are accepted: jwt (HS256 with SHARED_SECRET), introspection (opaque tokens,
    /// RFC 7662; no secret needed) or both (a JWT-shaped token locally, any other introspected).
    /// Default: jwt, or both when INTROSPECTION_URL is set.
    #[arg(long, env = "AUTH_MODE", value_enum)]
    pub auth_mode: Option<AuthMode>,

    /// The authorization server's introspection endpoint (RFC 7662); https is verified TLS.
    #[arg(long, env = "INTROSPECTION_URL")]
    pub introspection_url: Option<url::Url>,

    /// Our client id at the authorization server (HTTP Basic client authentication).
    #[arg(long, env = "INTROSPECTION_CLIENT_ID")]
    pub introspection_client_id: Option<String>,

    /// Our client secret at the authorization server. Never logged.
    #[arg(long, env = "INTROSPECTION_CLIENT_SECRET", hide_env_values = true)]
    pub introspection_client_secret: Option<String>,

    /// Longest wait for an introspection answer; past it, 503 AUTH_UNAVAILABLE.
    #[arg(long, env = "INTROSPECTION_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub introspection_timeout: Duration,

    /// How long an active introspection answer is trusted (never past the token's exp): a
    /// revoked token keeps working for up to this long.
    #[arg(
        long,
        env = "INTROSPECTION_CACHE_TTL",
        default_value = "60s",
        value_parser = parse_duration
    )]
    pub introspection_cache_ttl: Duration,

    /// Most active tokens the introspection cache holds (past it, answers are not cached).
    #[arg(
        long,
        env = "INTROSPECTION_CACHE_MAX_ENTRIES",
        default_value = "100000",
        value_parser = values::at_least(1usize)
    )]
    pub introspection_cache_max_entries: usize,

    /// How long a refused (inactive) token is remembered.
    #[arg(
        long,
        env = "INTROSPECTION_NEGATIVE_TTL",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub introspection_negative_ttl: Duration,

    /// Most refused tokens remembered (oldest forgotten first).
    #[arg(
        long,
        env = "INTROSPECTION_NEGATIVE_MAX_ENTRIES",
        default_value = "10000",
        value_parser = values::at_least(1usize)
    )]
    pub introspection_negative_max_entries: usize,

    /// While the authorization server is unreachable, serve a cached active answer this long past
    /// its freshness (at most 60s, never past exp, never for admin scopes); unset: off (fail
    /// closed).
    #[arg(long, env = "INTROSPECTION_STALE_IF_ERROR", value_parser = parse_duration)]
    pub introspection_stale_if_error: Option<Duration>,

    /// Gate-1 HS256 tokens without a scope claim get no scopes (instead of the agent scopes).
    #[arg(long, env = "REQUIRE_SCOPES", default_value_t = false, action = clap::ArgAction::Set)]
    pub require_scopes: bool,

    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info,auto_com_center=debug`). RUST_LOG
    /// is not read: LOG_LEVEL (or this flag) is the only filter. Message payloads are never
    /// logged, at any level: the NATS client's debug output (which holds them) stays at info
    /// unless the filter names async_nats.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", value_parser = values::log_filter)]
    pub log_level: String,
}

/// Everything `serve` needs, validated: each part is the settings type of the module it
/// configures.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the HTTP ingress listens.
    pub http_addr: SocketAddr,
    /// The roles this process runs, each once.
    pub roles: Vec<Role>,
    /// Embedded or external NATS.
    pub nats: NatsTarget,
    /// Limits of every stream and bucket.
    pub streams: StreamSettings,
    /// Token verification.
    pub auth: AuthSettings,
    /// The registry role.
    pub registry: RegistrySettings,
    /// The NATS door's rejection limit.
    pub door: DoorSettings,
    /// Group commit of writes.
    pub group_commit: GroupCommitSettings,
    /// Snapshots and the metrics role.
    pub metrics: MetricsSettings,
    /// The alerting role.
    pub alerting: AlertingSettings,
    /// The HTTP door's load limits.
    pub limits: LimitSettings,
    /// The event streams.
    pub live: StreamsSettings,
    /// The dispatcher role.
    pub tasks: TaskSettings,
    /// Bytes one agent may store per `streams.max_age` (`AGENT_STORE_QUOTA`).
    pub agent_store_quota: u64,
    /// Messages one agent may store per `streams.max_age` (`AGENT_STORE_MESSAGES`).
    pub agent_store_messages: u64,
    /// Push delivery of tasks (registration check and the dispatcher's pushes).
    pub push: PushSettings,
    /// Largest accepted request body.
    pub body_limit: usize,
    /// Longest wait for JetStream to acknowledge a write.
    pub publish_timeout: Duration,
    /// Longest wait for in-flight work on shutdown.
    pub shutdown_timeout: Duration,
    /// Text or JSON log lines.
    pub log_format: LogFormat,
    /// Log filter, in `EnvFilter` syntax (already checked).
    pub log_level: String,
}

impl Settings {
    /// Whether this process runs `role`.
    pub fn runs(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Checks what spans several settings (or reads a file) and assembles [`Settings`]; each
    /// value on its own was already checked by its parser.
    pub fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let auth = auth_settings(args)?;
        // A pushed task carries an HS256 token minted for its agent: push over HTTP needs the
        // shared secret. Without one (AUTH_MODE=introspection) push is allowed nowhere, and the
        // key below is a random one nothing ever uses.
        let push_secret = match (&auth.secret, args.push_allowed_urls.is_empty()) {
            (Some(secret), _) => secret.clone(),
            (None, true) => Secret::new(format!("{:032x}", rand::random::<u128>())),
            (None, false) => {
                return Err(ConfigError::new(
                    "PUSH_ALLOWED_URLS",
                    "needs SHARED_SECRET: a pushed task carries a token minted with it",
                ));
            }
        };
        let nats = match args.nats_url.as_deref() {
            None | Some([]) => NatsTarget::Embedded(EmbeddedSettings {
                binary: args.nats_server_bin.clone(),
                data_dir: args.data_dir.clone(),
                port: args.embedded_nats_port,
                agent_users: args.nats_agents.clone(),
            }),
            Some(urls) => NatsTarget::External {
                urls: urls.to_vec(),
                auth: nats_auth(args)?,
            },
        };
        let events_max_age = args.events_max_age.unwrap_or(args.stream_max_age);
        for (setting, age) in [
            ("STREAM_MAX_AGE", args.stream_max_age),
            ("EVENTS_MAX_AGE", events_max_age),
            ("AUDIT_MAX_AGE", args.audit_max_age),
        ] {
            if args.duplicate_window > age {
                return Err(ConfigError::new(
                    "DUPLICATE_WINDOW",
                    format!("must not be longer than {setting}"),
                ));
            }
        }
        if args.group_commit_min_batch < 2 {
            return Err(ConfigError::new(
                "GROUP_COMMIT_MIN_BATCH",
                "must be at least 2 (use GROUP_COMMIT=off to turn batching off)",
            ));
        }
        if args.body_limit < 1024 {
            return Err(ConfigError::new("BODY_LIMIT", "must be at least 1KiB"));
        }
        if args.alert_lease_ttl < Duration::from_millis(300) {
            return Err(ConfigError::new(
                "ALERT_LEASE_TTL",
                "must be at least 300ms",
            ));
        }
        if args.dispatcher_lease_ttl < Duration::from_millis(300) {
            return Err(ConfigError::new(
                "DISPATCHER_LEASE_TTL",
                "must be at least 300ms",
            ));
        }
        Ok(Self {
            http_addr: args.http_addr,
            roles: args.roles.clone(),
            nats,
            streams: StreamSettings {
                durability: args.durability,
                replicas: args.stream_replicas,
                max_age: args.stream_max_age,
                max_bytes: i64::try_from(args.stream_max_bytes)
                    .map_err(|_| ConfigError::new("STREAM_MAX_BYTES", "too large"))?,
                duplicate_window: args.duplicate_window,
                events_max_age,
                audit_max_age: args.audit_max_age,
            },
            auth,
            registry: RegistrySettings {
                stale_after: args.agent_stale_after,
                sweep_interval: args.agent_sweep_interval,
                preregistered: args.registered_agents.clone().unwrap_or_default(),
                heartbeat_coalesce: args.heartbeat_coalesce,
            },
            door: DoorSettings {
                reject_burst: args.door_reject_burst,
                reject_interval: args.door_reject_interval,
                body_limit: args.body_limit,
            },
            group_commit: GroupCommitSettings {
                mode: args.group_commit,
                min_batch: args.group_commit_min_batch,
                max_batch: args.group_commit_max_batch,
                in_flight: args.group_commit_in_flight,
            },
            metrics: MetricsSettings {
                snapshot_interval: args.metrics_snapshot_interval,
                window: args.metrics_window,
                agent_ids: args.metrics_agent_ids,
            },
            alerting: AlertingSettings {
                rules: crate::alerting::rules::load(args.alert_rules.as_deref())
                    .map_err(|e| ConfigError::new("ALERT_RULES", e))?,
                eval_interval: args.alert_eval_interval,
                repeat_interval: args.alert_repeat_interval,
                escalate_after: args.alert_escalate_after,
                lease_ttl: args.alert_lease_ttl,
                webhooks_warning: args.alert_webhooks_warning.clone(),
                webhooks_critical: args.alert_webhooks_critical.clone(),
                webhooks_escalation: args.alert_webhooks_escalation.clone(),
                external_url: args.alert_external_url.trim().to_owned(),
                alertmanagers: args.alertmanager_url.clone(),
                alertmanager_resend: args.alertmanager_resend_interval,
            },
            limits: LimitSettings {
                per_agent_rate: (args.rate_limit_per_agent > 0.0)
                    .then_some(args.rate_limit_per_agent),
                per_agent_burst: args.rate_limit_burst,
                auth_failure_burst: args.auth_failure_burst,
                auth_failure_interval: args.auth_failure_interval,
                max_in_flight: args.max_in_flight,
                max_in_flight_per_agent: args
                    .max_in_flight_per_agent
                    .unwrap_or((args.max_in_flight / 2).max(1)),
                connections: crate::http::server::ConnectionLimits {
                    header_read_timeout: args.header_read_timeout,
                    body_read_timeout: args.body_read_timeout,
                    max_per_address: args.max_connections_per_address,
                    write_stall_timeout: args.write_stall_timeout,
                },
            },
            live: StreamsSettings {
                keepalive: args.sse_keepalive,
                buffer: args.sse_buffer,
                batch_window: args.sse_batch_window,
                max_streams: args.sse_max_streams,
                max_streams_per_caller: args.sse_max_streams_per_caller,
            },
            tasks: TaskSettings {
                lease_ttl: args.dispatcher_lease_ttl,
                write_timeout: args.publish_timeout,
                queue: crate::tasks::queue::QueueSettings {
                    aging: args.task_priority_aging,
                    weights: args.tenant_weights.clone(),
                },
                max_queued_per_tenant: args.task_max_queued_per_tenant,
            },
            agent_store_quota: args.agent_store_quota.unwrap_or(args.stream_max_bytes / 32) as u64,
            agent_store_messages: args.agent_store_messages,
            push: PushSettings {
                allowed_urls: args.push_allowed_urls.clone(),
                timeout: args.push_timeout,
                callback_url: args
                    .push_callback_url
                    .trim()
                    .trim_end_matches('/')
                    .to_owned(),
                secret: push_secret,
                max_token_lifetime: args.max_token_lifetime,
            },
            body_limit: args.body_limit,
            publish_timeout: args.publish_timeout,
            shutdown_timeout: args.shutdown_timeout,
            log_format: args.log_format,
            log_level: args.log_level.clone(),
        })
    }
}

/// How tokens are verified: the mode (from `AUTH_MODE`, else from whether `INTROSPECTION_URL`
/// is set), and what that mode needs (a secret for JWTs, a server and client credentials for
/// introspection).
fn auth_settings(args: &ServeArgs) -> Result<AuthSettings, ConfigError> {
    let mode = args.auth_mode.unwrap_or(match args.introspection_url {
        Some(_) => AuthMode::Both,
        None => AuthMode::Jwt,
    });
    let secret = match mode {
        AuthMode::Jwt | AuthMode::Both => Some(args.secret.require()?),
        AuthMode::Introspection => args.secret.shared_secret.clone(),
    };
    let introspection = match mode {
        AuthMode::Jwt => None,
        AuthMode::Introspection | AuthMode::Both => {
            let url = args.introspection_url.clone().ok_or_else(|| {
                ConfigError::new(
                    "INTROSPECTION_URL",
                    "is required when AUTH_MODE introspects",
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(ConfigError::new(
                    "INTROSPECTION_URL",
                    "must be an http or https URL",
                ));
            }
            let client_id = args
                .introspection_client_id
                .clone()
                .filter(|id| !id.is_empty() && !id.contains(':'))
                .ok_or_else(|| {
                    ConfigError::new(
                        "INTROSPECTION_CLIENT_ID",
                        "is required (without ':') when AUTH_MODE introspects",
                    )
                })?;
            let client_secret = args
                .introspection_client_secret
                .clone()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    ConfigError::new(
                        "INTROSPECTION_CLIENT_SECRET",
                        "is required when AUTH_MODE introspects",
                    )
                })?;
            let stale_if_error = args.introspection_stale_if_error.unwrap_or_default();
            if stale_if_error > Duration::from_secs(60) {
                return Err(ConfigError::new(
                    "INTROSPECTION_STALE_IF_ERROR",
                    "must be at most 60s",
                ));
            }
            if args.introspection_timeout.is_zero() {
                return Err(ConfigError::new(
                    "INTROSPECTION_TIMEOUT",
                    "must be more than 0s",
                ));
            }
            Some(IntrospectionSettings {
                url,
                client_id,
                client_secret: ClientSecret::new(client_secret),
                timeout: args.introspection_timeout,
                cache_ttl: args.introspection_cache_ttl,
                limits: CacheLimits {
                    max_entries: args.introspection_cache_max_entries,
                    negative_ttl: args.introspection_negative_ttl,
                    max_negative: args.introspection_negative_max_entries,
                    stale_if_error,
                },
            })
        }
    };
    Ok(AuthSettings {
        mode,
        secret,
        introspection,
        require_scopes: args.require_scopes,
        leeway: args.jwt_leeway,
        max_token_bytes: args.max_token_bytes,
        max_lifetime: args.max_token_lifetime,
    })
}

/// How the bridge authenticates to external NATS: a credentials file, or user and password (both
/// or neither), never both ways.
fn nats_auth(args: &ServeArgs) -> Result<NatsAuth, ConfigError> {
    match (&args.nats_user, &args.nats_password, &args.nats_creds) {
        (Some(_), _, Some(path)) => Err(ConfigError::new(
            "NATS_CREDS",
            format!(
                "set either NATS_CREDS ({}) or NATS_USER/NATS_PASSWORD, not both",
                path.display()
            ),
        )),
        (None, _, Some(path)) => Ok(NatsAuth::CredsFile(path.clone())),
        (Some(user), Some(pass), None) => Ok(NatsAuth::UserPassword(user.clone(), pass.clone())),
        (Some(_), None, None) => Err(ConfigError::new(
            "NATS_PASSWORD",
            "NATS_USER is set but NATS_PASSWORD is not",
        )),
        (None, Some(_), None) => Err(ConfigError::new(
            "NATS_USER",
            "NATS_PASSWORD is set but NATS_USER is not",
        )),
        (None, None, None) => Ok(NatsAuth::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_reference_lists_every_setting() {
        use clap::CommandFactory as _;
        let reference = include_str!("../docs/operations.md");
        let command = Cli::command();
        let serve = command.find_subcommand("serve").expect("serve");
        let missing: Vec<String> = serve
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned())
            .filter(|env| !reference.contains(&format!("`{env}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/operations.md does not list {missing:?}"
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

    /// The refusal of `serve` with these flags, whether clap's parser or
    /// [`Settings::from_args`] refused.
    fn refusal(extra: &[&str]) -> ConfigError {
        let mut argv = vec!["auto-com-center", "serve"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv) {
            Err(err) => ConfigError::from_clap(&err).unwrap_or_else(|| panic!("{err}")),
            Ok(Cli {
                command: Command::Serve(args),
            }) => Settings::from_args(&args).expect_err("accepted"),
            Ok(_) => unreachable!(),
        }
    }

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
        let err = refusal(&["--shared-secret=short"]);
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
            ("--max-in-flight-per-agent=0", "MAX_IN_FLIGHT_PER_AGENT"),
            ("--agent-store-messages=0", "AGENT_STORE_MESSAGES"),
            ("--max-token-lifetime=forever", "MAX_TOKEN_LIFETIME"),
        ];
        for (flag, setting) in cases {
            let err = refusal(&[SECRET, flag]);
            assert_eq!(err.setting, *setting, "{flag}: {err}");
        }
    }

    #[test]
    fn a_refused_value_is_one_line_naming_its_env_var() {
        let err = refusal(&[SECRET, "--agent-stale-after=soon"]);
        let shown = err.to_string();
        assert!(
            shown.starts_with(
                "invalid AGENT_STALE_AFTER: \"soon\" is not a duration like 500ms, 90s, 5m"
            ),
            "{shown}"
        );
        assert_eq!(shown.lines().count(), 1, "{shown}");
        let err = refusal(&[SECRET, "--durability=sometimes"]);
        assert_eq!(err.setting, "DURABILITY");
        assert!(err.message.contains("fsync"), "{err}");
        let err = refusal(&["--shared-secret=short-secret-value"]);
        assert!(!err.to_string().contains("short-secret-value"), "{err}");
    }

    #[test]
    fn help_and_version_are_left_to_clap() {
        for flag in ["--help", "--version"] {
            let err = Cli::try_parse_from(["auto-com-center", flag]).unwrap_err();
            assert!(ConfigError::from_clap(&err).is_none(), "{flag}");
        }
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
