//! Wiring: build the application from [`Settings`] (embedded or external NATS, provisioning,
//! listener), then run every configured role until a shutdown signal, and stop in order:
//! stop accepting, drain in-flight requests, let workers finish their message, flush the
//! connection, stop the embedded server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use async_nats::Client;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, StoreQuota};
use crate::audit::Audit;
use crate::auth::Authenticator;
use crate::bus::embedded::{BRIDGE_USER, EmbeddedNats};
use crate::bus::group::GroupSettings;
use crate::bus::{
    self, Durability, GroupCommitMode, NatsAuth, NatsTarget, Publisher, provision, subjects,
};
use crate::cli::{Role, Settings};
use crate::contract::Tally;
use crate::directory::Directory;
use crate::door::Door;
use crate::http::{self, AppState};
use crate::metrics::FleetView;
use crate::metrics::worker::AgentRecords;
use crate::stats::Stats;
use crate::streams::{Hub, Slots};
use crate::workers;
use futures::FutureExt as _;

/// Room for our own fields and headers on top of the largest accepted body.
const ENVELOPE_OVERHEAD: usize = 16 * 1024;

pub struct Application {
    settings: Settings,
    listener: Option<TcpListener>,
    embedded: Option<EmbeddedNats>,
    client: Client,
    publisher: Publisher,
}

impl Application {
    /// Starts (or connects to) NATS, provisions streams and buckets, binds the HTTP listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_unless_stopped(settings, &CancellationToken::new())
            .await?
            .context("start-up stopped")
    }

    /// [`Application::build`], unless `stop` fires first: `None` then, with the embedded server
    /// (if one was started) stopped again and nothing served. `stop` ends the wait for NATS,
    /// which has no bound, and is looked at once provisioning is done; a provisioning under way
    /// is finished first, so no stream is left half-configured.
    pub async fn build_unless_stopped(
        settings: Settings,
        stop: &CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        let max_payload = (settings.body_limit + ENVELOPE_OVERHEAD).max(1 << 20);
        let (embedded, urls, auth) = match &settings.nats {
            NatsTarget::Embedded(embedded) => {
                let server =
                    EmbeddedNats::start(embedded, settings.streams.durability, max_payload).await?;
                let auth = NatsAuth::UserPassword(BRIDGE_USER.into(), server.password().into());
                let urls = vec![server.url().to_owned()];
                (Some(server), urls, auth)
            }
            NatsTarget::External { urls, auth } => {
                if settings.streams.durability == Durability::Fsync {
                    tracing::warn!(
                        "DURABILITY=fsync with NATS_URL: the bridge cannot see the server's \
                         sync_interval; configure `jetstream {{ sync_interval: always }}` on every \
                         server (see docs/operations.md, Durability)"
                    );
                }
                (None, urls.clone(), auth.clone())
            }
        };
        let client = bus::connect(&urls, &auth).await?;
        tokio::select! {
            () = bus::wait_connected(&client) => {}
            () = stop.cancelled() => {}
        }
        if stop.is_cancelled() {
            close(client, embedded).await;
            return Ok(None);
        }
        let server_max = client.server_info().max_payload;
        if settings.body_limit + ENVELOPE_OVERHEAD > server_max {
            anyhow::bail!(
                "invalid BODY_LIMIT: {} bytes plus {} bytes of envelope exceeds the NATS server's \
                 max_payload of {} bytes; lower BODY_LIMIT or raise max_payload",
                settings.body_limit,
                ENVELOPE_OVERHEAD,
                server_max
            );
        }
        let mut publisher = Publisher::new(client.clone(), settings.publish_timeout);
        if let Some(group) = group_commit(&settings, &client.server_info().version)? {
            tracing::info!(
                min_batch = group.min_batch,
                max_batch = group.max_batch,
                in_flight = group.in_flight,
                "group commit on"
            );
            publisher = publisher.with_group_commit(group);
        }
        provision::provision(publisher.jetstream(), &settings.streams).await?;
        if stop.is_cancelled() {
            close(client, embedded).await;
            return Ok(None);
        }
        let listener = if settings.runs(Role::Ingress) {
            let listener = TcpListener::bind(settings.http_addr)
                .await
                .with_context(|| format!("HTTP_ADDR: cannot listen on {}", settings.http_addr))?;
            Some(listener)
        } else {
            None
        };
        Ok(Some(Self {
            settings,
            listener,
            embedded,
            client,
            publisher,
        }))
    }

    /// The bound HTTP address, when this process runs the ingress.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle on the bridge's NATS connection (for inspection and tests).
    pub fn nats_client(&self) -> Client {
        self.client.clone()
    }

    /// The embedded server, when there is one.
    pub fn embedded(&self) -> Option<&EmbeddedNats> {
        self.embedded.as_ref()
    }

    /// Serves until `shutdown` completes or a role ends on its own, then drains: in-flight
    /// requests and workers get `SHUTDOWN_TIMEOUT`, cut short when `hurry` is cancelled (a
    /// second signal).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
        hurry: CancellationToken,
    ) -> anyhow::Result<()> {
        let Self {
            settings,
            listener,
            embedded,
            client,
            publisher,
        } = self;
        let door_tally = Arc::new(Tally::default());
        // One authenticator for both doors: one introspection cache, one call in flight per token.
        let authenticator = Authenticator::new(&settings.auth);
        let js = publisher.jetstream().clone();
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let agents_stream = js
            .get_stream(subjects::AGENTS_STREAM)
            .await
            .context("opening the agents stream")?;
        let bucket = js
            .get_key_value(subjects::AGENTS_BUCKET)
            .await
            .context("opening the agents bucket")?;

        // Configured agents are on the bus before any role serves, whichever roles run here.
        workers::registry::preregister(&publisher, &bucket, &settings.registry.preregistered)
            .await?;
        // The metrics and alerting roles read the agents bucket too, through the view below.
        let agents_bucket = bucket.clone();

        if settings.runs(Role::Registry) {
            let (publisher, stream, bucket, registry, stop) = (
                publisher.clone(),
                agents_stream.clone(),
                bucket.clone(),
                settings.registry.clone(),
                stop.clone(),
            );
            tasks.spawn(async move {
                workers::registry::run(publisher, stream, bucket, registry, stop)
                    .await
                    .context("registry worker")
            });
        }

        // Both doors, the dispatcher and the metrics and alerting roles read the agents view;
        // one follower serves them.
        let directory = Directory::new(agents_stream, settings.publish_timeout);
        if listener.is_some()
            || [Role::Door, Role::Dispatcher, Role::Metrics, Role::Alerting]
                .into_iter()
                .any(|role| settings.runs(role))
        {
            tasks.spawn({
                let (directory, client, stop) = (directory.clone(), client.clone(), stop.clone());
                async move {
                    directory.follow(bucket, client, stop).await;
                    Ok(())
                }
            });
        }

        if settings.runs(Role::Metrics) {
            let (publisher, bucket, interval, stop) = (
                publisher.clone(),
                AgentRecords {
                    directory: directory.clone(),
                    bucket: agents_bucket.clone(),
                },
                settings.metrics.snapshot_interval,
                stop.clone(),
            );
            tasks.spawn(async move {
                crate::metrics::worker::run(publisher, bucket, interval, stop)
                    .await
                    .context("metrics worker")
            });
        }

        if settings.runs(Role::Alerting) {
            let (publisher, bucket, alerting, interval, stop) = (
                publisher.clone(),
                AgentRecords {
                    directory: directory.clone(),
                    bucket: agents_bucket.clone(),
                },
                settings.alerting.clone(),
                settings.metrics.snapshot_interval,
                stop.clone(),
            );
            tasks.spawn(async move {
                crate::alerting::run(publisher, bucket, alerting, interval, stop)
                    .await
                    .context("alerting worker")
            });
        }

        // One bucket per agent for both doors: an agent cannot double its rate by using both.
        let agent_rate = Arc::new(settings.limits.agent_rate());
        // And one cap on each agent's requests in flight.
        let agent_slots = Arc::new(settings.limits.agent_slots());
        // And one store quota per agent for both doors, kept on the bus for every replica.
        let limits_bucket = js
            .get_key_value(subjects::LIMITS_BUCKET)
            .await
            .context("opening the limits bucket")?;
        let store_quota = Arc::new(StoreQuota::new(
            limits_bucket,
            settings.agent_store_quota,
            settings.agent_store_messages,
            settings.streams.max_age,
            settings.publish_timeout,
        ));
        let task_figures = Arc::new(crate::metrics::tasks::TaskGauges::default());
        if settings.runs(Role::Dispatcher) {
            let (publisher, directory, tasks_settings, figures, stop) = (
                publisher.clone(),
                directory.clone(),
                settings.tasks.clone(),
                task_figures.clone(),
                stop.clone(),
            );
            let push = Arc::new(settings.push.clone());
            tasks.spawn(async move {
                crate::tasks::dispatcher::run(
                    publisher,
                    directory,
                    tasks_settings,
                    figures,
                    push,
                    stop,
                )
                .await
                .context("dispatcher")
            });
        }

        let runs_door = settings.runs(Role::Door);
        if runs_door {
            let inbound = js
                .get_stream(subjects::INBOUND_STREAM)
                .await
                .context("opening the inbound stream")?;
            let door = Door::new(
                Admission::new(publisher.clone(), directory.clone())
                    .with_quota(store_quota.clone())
                    .with_push_allowed(&settings.push.allowed_urls),
                task_api(&js, &publisher, &settings).await?,
                authenticator.clone(),
                publisher.clone(),
                &settings.door,
                agent_rate.clone(),
                door_tally.clone(),
            )
            .with_agent_slots(agent_slots.clone());
            let stop = stop.clone();
            tasks.spawn(async move { door.run(inbound, stop).await.context("NATS door") });
        }

        if let Some(listener) = listener {
            let tasks_stream = js
                .get_stream(subjects::TASKS_STREAM)
                .await
                .context("opening the tasks stream")?;
            let stats = Arc::new(Stats::with_window(settings.metrics.window));
            let interval = settings.metrics.snapshot_interval;
            tasks.spawn(
                crate::metrics::publish_snapshots(
                    publisher.clone(),
                    stats.clone(),
                    crate::metrics::instance_id(),
                    interval,
                    stop.clone(),
                )
                .map(Ok),
            );
            let fleet = Arc::new(FleetView::new(
                interval * crate::metrics::STALE_AFTER_INTERVALS,
            ));
            tasks.spawn(
                fleet
                    .clone()
                    .follow(client.clone(), js.clone(), stop.clone())
                    .map(Ok),
            );
            let hubs = [
                (subjects::EVENTS_STREAM, subjects::EVENTS),
                (subjects::AGENTS_STREAM, subjects::STATUS_CHANGES),
                (subjects::ALERTS_STREAM, subjects::ALERTS),
                (subjects::AUDIT_STREAM, subjects::AUDIT_ALL),
            ];
            let mut followed = Vec::with_capacity(hubs.len());
            for (stream, subject) in hubs {
                let stream = js
                    .get_stream(stream)
                    .await
                    .with_context(|| format!("opening {stream}"))?;
                let hub = Hub::new(
                    stream,
                    subject,
                    settings.live.buffer,
                    settings.live.batch_window,
                    settings.live.keepalive,
                );
                tasks.spawn(hub.clone().run(stop.clone()).map(Ok));
                followed.push(hub);
            }
            let [events, agents, alerts, audit_hub]: [Hub; 4] =
                followed.try_into().ok().expect("one hub per stream");
            // A task stream that falls behind reads its one key again, so a small ring will do.
            let records = js
                .get_stream(subjects::TASKS_BUCKET_STREAM)
                .await
                .context("opening the task records")?;
            let task_hub = Hub::new(
                records,
                subjects::TASK_RECORDS,
                settings.live.buffer.min(256),
                // A task's few changes go out at once.
                std::time::Duration::ZERO,
                // Its streams keep themselves alive (`KeepAlive`); the ticks are ignored.
                settings.live.keepalive,
            );
            tasks.spawn(task_hub.clone().run(stop.clone()).map(Ok));
            let alerting = js
                .get_key_value(subjects::ALERTING_BUCKET)
                .await
                .context("opening the alerting bucket")?;
            let task_api = task_api(&js, &publisher, &settings).await?;
            let state = AppState::new(http::Inner {
                admission: Admission::new(publisher.clone(), directory)
                    .with_quota(store_quota)
                    .with_push_allowed(&settings.push.allowed_urls),
                verifier: authenticator.clone(),
                stats,
                tasks: tasks_stream,
                client: client.clone(),
                js: js.clone(),
                body_limit: settings.body_limit,
                lookup_timeout: settings.publish_timeout,
                door: runs_door.then_some(door_tally),
                metrics_agent_ids: settings.metrics.agent_ids,
                fleet,
                alerting,
                limits: http::limits::Limits::new(&settings.limits, agent_rate, agent_slots),
                live: http::streams::Live {
                    events,
                    agents,
                    alerts,
                    audit: audit_hub,
                    tasks: task_hub,
                    slots: Slots::new(
                        settings.live.max_streams,
                        settings.live.max_streams_per_caller,
                    ),
                    settings: settings.live.clone(),
                    stop: stop.clone(),
                },
                audit: Audit::new(publisher.clone()),
                task_api,
                task_figures,
            });
            let app = http::router(state);
            let stop = stop.clone();
            tracing::info!(addr = %listener.local_addr()?, "HTTP ingress listening");
            // The server loop hands each request its peer address (for the per-address limits)
            // and bounds every connection (timeouts, connections per address).
            let connections = settings.limits.connections;
            tasks.spawn(async move {
                http::server::serve(listener, app, connections, stop).await;
                Ok(())
            });
        }

        tokio::select! {
            () = shutdown => tracing::info!("shutdown requested; draining"),
            Some(result) = tasks.join_next() => {
                // A role ended on its own: that is a failure; stop the rest.
                stop.cancel();
                let outcome = result.context("role task panicked").and_then(|r| r);
                tracing::error!(error = ?outcome.as_ref().err(), "a role stopped unexpectedly");
                finish(tasks, &settings, &hurry, client, embedded).await;
                return outcome.and(Err(anyhow::anyhow!("a role stopped unexpectedly")));
            }
        }
        stop.cancel();
        finish(tasks, &settings, &hurry, client, embedded).await;
        Ok(())
    }
}

/// The task routes' side of a door (HTTP or NATS).
async fn task_api(
    js: &async_nats::jetstream::Context,
    publisher: &Publisher,
    settings: &Settings,
) -> anyhow::Result<crate::tasks::Tasks> {
    let submissions = js
        .get_stream(subjects::SUBMISSIONS_STREAM)
        .await
        .context("opening the submissions stream")?;
    let records = js
        .get_key_value(subjects::TASKS_BUCKET)
        .await
        .context("opening the tasks bucket")?;
    Ok(crate::tasks::Tasks::new(
        publisher.clone(),
        submissions,
        records,
        settings.publish_timeout,
    )
    .with_queue_cap(settings.tasks.max_queued_per_tenant))
}

/// The end of every stop, and of a start-up given up: the connection drained (at most 5 s),
/// then the embedded server stopped.
async fn close(client: Client, embedded: Option<EmbeddedNats>) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), client.drain()).await;
    if let Some(server) = embedded {
        server.stop().await;
    }
}

/// The roles' drain, bounded by `SHUTDOWN_TIMEOUT` and cut short by `hurry`; then [`close`],
/// or after a hurried stop only the embedded server's stop (no wait for the connection's drain).
async fn finish(
    mut tasks: JoinSet<anyhow::Result<()>>,
    settings: &Settings,
    hurry: &CancellationToken,
    client: Client,
    embedded: Option<EmbeddedNats>,
) {
    let drain = tokio::time::timeout(settings.shutdown_timeout, async {
        while let Some(result) = tasks.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!(error = ?err, "role failed while stopping"),
                Err(err) => tracing::error!(error = %err, "role panicked while stopping"),
            }
        }
    });
    tokio::select! {
        drained = drain => if drained.is_err() {
            tracing::warn!("SHUTDOWN_TIMEOUT passed; abandoning unfinished work");
            tasks.abort_all();
        },
        () = hurry.cancelled() => {
            tracing::warn!("second stop signal; abandoning unfinished work");
            tasks.abort_all();
        }
    }
    if hurry.is_cancelled() {
        if let Some(server) = embedded {
            server.stop().await;
        }
    } else {
        close(client, embedded).await;
    }
    tracing::info!("stopped");
}

/// The runtime `serve` runs on. Its worker threads are `TOKIO_WORKER_THREADS` when set (tokio
/// reads it), else [`worker_threads`] of this machine's cores.
pub fn runtime(settings: &Settings) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let embedded = matches!(settings.nats, NatsTarget::Embedded(_));
        builder.worker_threads(worker_threads(cores, embedded));
    }
    builder.build()
}

/// Worker threads for `cores` cores: one fewer when the embedded nats-server runs beside the
/// bridge (it needs a core of its own; a worker per core makes both wait on each other, and
/// every request pays wake-ups across threads), at least one.
///
/// Measured on 2 cores with `fsync` (`BRIDGE_WORKERS=1|2 load-tests/run-bench`, see
/// docs/BENCHMARKS.md): one worker spent 0.38 ms of CPU per request at 200 req/s against 0.67
/// ms with two, and 0.17 against 0.24 ms at 2,000 req/s, with a lower p99.
pub fn worker_threads(cores: usize, embedded: bool) -> usize {
    if embedded {
        cores.saturating_sub(1).max(1)
    } else {
        cores.max(1)
    }
}

/// SIGINT and SIGTERM. The listeners are made here, not when they are first awaited, so a
/// signal that arrives in between is not lost; call it inside the runtime, before start-up.
pub fn shutdown_signals() -> std::io::Result<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok(Signals {
        interrupt: signal(SignalKind::interrupt())?,
        terminate: signal(SignalKind::terminate())?,
    })
}

/// The process's stop signals: the first asks for a drain, a second for an end at once.
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Completes on the next SIGINT or SIGTERM.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Whether writes are grouped: `auto` turns it on with `fsync` durability on a server that
/// supports atomic batches; `on` insists on such a server.
fn group_commit(
    settings: &Settings,
    server_version: &str,
) -> anyhow::Result<Option<GroupSettings>> {
    let config = settings.group_commit;
    let wanted = match config.mode {
        GroupCommitMode::Off => false,
        GroupCommitMode::On => true,
        GroupCommitMode::Auto => settings.streams.durability == Durability::Fsync,
    };
    if !wanted {
        return Ok(None);
    }
    let supported = crate::bus::embedded::parse_version(server_version)
        .is_some_and(|v| v >= ATOMIC_BATCH_VERSION);
    if !supported {
        if config.mode == GroupCommitMode::On {
            anyhow::bail!(
                "invalid GROUP_COMMIT: on needs nats-server 2.12 or newer (atomic batches), \
                 the server is {server_version}"
            );
        }
        tracing::warn!(
            server = server_version,
            "group commit off: nats-server 2.12 or newer is needed for atomic batches"
        );
        return Ok(None);
    }
    Ok(Some(GroupSettings {
        min_batch: config.min_batch,
        max_batch: config.max_batch,
        in_flight: config.in_flight,
        ..GroupSettings::default()
    }))
}

/// The first nats-server with atomic batch publish (ADR-50).
const ATOMIC_BATCH_VERSION: (u64, u64, u64) = (2, 12, 0);

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn the_embedded_server_keeps_a_core_of_its_own_and_there_is_always_a_worker() {
        assert_eq!(worker_threads(2, true), 1);
        assert_eq!(worker_threads(8, true), 7);
        assert_eq!(worker_threads(1, true), 1);
        assert_eq!(worker_threads(2, false), 2);
        assert_eq!(worker_threads(0, false), 1);
    }
}
