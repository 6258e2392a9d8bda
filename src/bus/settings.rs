//! What configures the bus: where NATS is ([`NatsTarget`], with [`NatsAuth`] or an embedded
//! server's [`EmbeddedSettings`]), how streams are provisioned ([`StreamSettings`], with their
//! [`Durability`]), and whether writes are committed in groups ([`GroupCommitSettings`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use crate::domain::AgentId;

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

/// Whether concurrent writes to a stream are committed together (see [`super::group`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupCommitMode {
    /// On with `fsync` durability (where each write costs an fsync), off with `interval`.
    Auto,
    /// Always on (needs nats-server 2.12+).
    On,
    /// Every write is published on its own.
    Off,
}

/// Group commit as configured; whether it runs also depends on the server's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitSettings {
    /// On, off, or decided by the durability.
    pub mode: GroupCommitMode,
    /// Fewest waiting writes sent as one atomic batch.
    pub min_batch: usize,
    /// Most writes in one atomic batch.
    pub max_batch: usize,
    /// Most batches or groups per stream on their way at once.
    pub in_flight: usize,
}

/// Stream limits applied to every stream the bridge owns.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// How an acknowledged write is kept.
    pub durability: Durability,
    /// Replicas per stream and KV bucket.
    pub replicas: usize,
    /// Oldest message a stream keeps.
    pub max_age: Duration,
    /// Largest size of each stream.
    pub max_bytes: i64,
    /// Window in which a repeated dedupe id is recognised.
    pub duplicate_window: Duration,
    /// Oldest event `ACC_EVENTS` keeps (the replay horizon of the event streams).
    pub events_max_age: Duration,
    /// Oldest record the audit trail keeps; nothing else removes one.
    pub audit_max_age: Duration,
}

/// How to reach NATS.
#[derive(Debug, Clone)]
pub enum NatsTarget {
    /// Start and supervise a local nats-server.
    Embedded(EmbeddedSettings),
    /// Connect to servers someone else runs.
    External {
        /// Server URLs, each with a scheme.
        urls: Vec<String>,
        /// How the bridge authenticates.
        auth: NatsAuth,
    },
}

/// How the bridge authenticates to NATS. The password never prints.
#[derive(Clone, Default)]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// User name and password.
    UserPassword(String, String),
    /// A credentials file (JWT + NKey).
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

/// The embedded nats-server (see [`super::embedded`]).
#[derive(Debug, Clone)]
pub struct EmbeddedSettings {
    /// The nats-server binary; `None`: found on PATH.
    pub binary: Option<PathBuf>,
    /// JetStream store, generated configuration and credentials.
    pub data_dir: PathBuf,
    /// Client port on 127.0.0.1 (0 picks a free port).
    pub port: u16,
    /// Agents that get their own NATS user, confined to the inbound subjects and their reply
    /// namespace.
    pub agent_users: Vec<AgentId>,
}
