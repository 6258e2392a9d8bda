//! auto-com-center: a message-bus bridge. Agents register, heartbeat, report task results and
//! emit events over HTTP; each message is authenticated, validated, stamped and stored on NATS
//! JetStream before the agent gets its 200; workers consume the streams.
//!
//! Where a heartbeat goes: [`http`] → [`admission`] → [`bus`] → [`workers::registry`].
//! Where a task goes: [`http`] → [`tasks`] (submission on the bus, then the acting
//! [`tasks::dispatcher`] queues it and leases it to an agent's claim).
//! Where a latency figure goes: [`stats`] → [`metrics`] (snapshot, fleet) → [`alerting`].
//!
//! [`cli`] sits on top: it reads the command line into [`cli::Settings`], made of the settings
//! type each module owns ([`auth::AuthSettings`], [`bus::StreamSettings`], …). No other module
//! imports it.
//!
//! The interface documents are generated: [`http::openapi`] (HTTP, OpenAPI 3.1) and [`asyncapi`]
//! (NATS, AsyncAPI 3.0), both with the request bodies of [`bodies`].

pub mod admission;
pub mod alerting;
pub mod app;
pub mod asyncapi;
pub mod audit;
pub mod auth;
pub mod bodies;
pub mod bus;
pub mod cli;
pub mod contract;
pub mod directory;
pub mod domain;
pub mod door;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod quota;
pub mod stats;
pub mod streams;
pub mod tasks;
pub mod telemetry;
pub mod workers;

pub use app::Application;
