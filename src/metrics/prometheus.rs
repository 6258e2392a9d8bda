//! `GET /metrics` in the Prometheus text exposition format (version 0.0.4).
//!
//! This replica's figures: counters since start (`acc_http_requests_total` by endpoint and
//! status class, `acc_http_responses_total` by endpoint and exact status code), a latency
//! histogram in fixed buckets (`acc_http_request_duration_seconds`), and the sliding window (its
//! percentiles as a `summary`). When a fleet snapshot from the metrics worker is known, fleet
//! figures (`acc_fleet_*`), bus figures (`acc_stream_*`, `acc_consumer_*`) and agent counts
//! (`acc_agents`, and each offline agent's last heartbeat) follow, so scraping any one ingress
//! gives the whole picture. Then the NATS door's counters (`acc_door_*`) where the door runs,
//! the dispatcher's figures where it acts, and process metrics last.
//!
//! The output passes `promtool check metrics` (tested on a real scrape).

use std::fmt::Write as _;

use super::process::ProcessFigures;
use super::snapshot::FleetSnapshot;
use super::tasks::{BATCH_OUTCOMES, LATENCY_BOUNDS, OUTCOMES, TaskFigures};
use crate::contract::{Code, Tally};
use crate::stats::{BUCKETS_MICROS, CLASSES, Endpoint, Stats};

/// The content type Prometheus expects.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric family this module can write: the rules export checks its expressions against
/// this list.
pub const FAMILIES: &[&str] = &[
    "acc_http_requests_total",
    "acc_http_responses_total",
    "acc_http_request_duration_seconds",
    "acc_http_window_requests",
    "acc_http_window_latency_seconds",
    "acc_http_window_error_rate",
    "acc_fleet_replicas",
    "acc_fleet_generated_timestamp_seconds",
    "acc_fleet_requests_per_second",
    "acc_fleet_latency_seconds",
    "acc_fleet_error_rate",
    "acc_stream_messages",
    "acc_stream_bytes",
    "acc_stream_max_bytes",
    "acc_consumer_pending",
    "acc_consumer_ack_pending",
    "acc_consumer_redelivered",
    "acc_agents",
    "acc_agents_offline_oldest_last_seen_timestamp_seconds",
    "acc_agent_offline_last_seen_timestamp_seconds",
    "acc_door_admitted_total",
    "acc_door_rejected_total",
    "acc_tasks_queued",
    "acc_tasks_dead_lettered",
    "acc_task_attempts_total",
    "acc_task_leases_expired_total",
    "acc_task_record_batches_total",
    "acc_task_batched_records_total",
    "acc_task_dispatch_latency_seconds",
    "acc_tasks_dead_lettered_total",
    "acc_tasks_unserved",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

/// Escapes a label value (backslash, quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// What one scrape shows: the figures this process has.
pub struct Exposition<'a> {
    pub stats: &'a Stats,
    /// The latest fleet figures, once the metrics worker published some.
    pub fleet: Option<&'a FleetSnapshot>,
    /// The dispatcher's figures, where it acts.
    pub tasks: Option<&'a TaskFigures>,
    pub process: Option<ProcessFigures>,
    /// The NATS door's counts, where the door runs.
    pub door: Option<&'a Tally>,
    /// Name each offline agent (`METRICS_AGENT_IDS`); otherwise only the oldest heartbeat
    /// among them is shown.
    pub agent_ids: bool,
}

/// Renders every family we have figures for.
pub fn render(exposition: &Exposition<'_>) -> String {
    let mut out = String::with_capacity(16 * 1024);
    render_ingress(&mut out, exposition.stats);
    if let Some(fleet) = exposition.fleet {
        render_fleet(&mut out, fleet, exposition.agent_ids);
    }
    if let Some(door) = exposition.door {
        render_door(&mut out, door);
    }
    if let Some(tasks) = exposition.tasks {
        render_tasks(&mut out, tasks);
    }
    if let Some(process) = &exposition.process {
        render_process(&mut out, process);
    }
    out
}

fn render_ingress(out: &mut String, stats: &Stats) {
    let totals: Vec<_> = Endpoint::ALL
        .iter()
        .map(|&e| (e.name(), stats.cumulative(e), stats.figures(e)))
        .collect();
    header(
        out,
        "acc_http_requests_total",
        "counter",
        "HTTP requests served by this replica, by endpoint and status class.",
    );
    for (endpoint, cumulative, _) in &totals {
        for (class, count) in CLASSES.iter().zip(cumulative.by_class) {
            let _ = writeln!(
                out,
                "acc_http_requests_total{{endpoint=\"{endpoint}\",class=\"{class}\"}} {count}"
            );
        }
    }
    // A family of its own rather than a `code` label on the class series: one family with two
    // label sets would count every request twice in `sum(acc_http_requests_total)`.
    header(
        out,
        "acc_http_responses_total",
        "counter",
        "HTTP requests served by this replica, by endpoint and exact status code (codes seen).",
    );
    for (endpoint, cumulative, _) in &totals {
        for (code, count) in cumulative.by_code.iter() {
            let _ = writeln!(
                out,
                "acc_http_responses_total{{endpoint=\"{endpoint}\",code=\"{code}\"}} {count}"
            );
        }
    }
    header(
        out,
        "acc_http_request_duration_seconds",
        "histogram",
        "Latency of HTTP requests this replica admitted (refusals before admission are not timed).",
    );
    for (endpoint, cumulative, _) in &totals {
        let mut running = 0;
        for (le, count) in BUCKETS_MICROS.iter().zip(cumulative.buckets) {
            running += count;
            let le = *le as f64 / 1e6;
            let _ = writeln!(
                out,
                "acc_http_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"{le}\"}} {running}"
            );
        }
        let _ = writeln!(
            out,
            "acc_http_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"+Inf\"}} {}",
            cumulative.count
        );
        let _ = writeln!(
            out,
            "acc_http_request_duration_seconds_sum{{endpoint=\"{endpoint}\"}} {}",
            cumulative.sum_micros as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "acc_http_request_duration_seconds_count{{endpoint=\"{endpoint}\"}} {}",
            cumulative.count
        );
    }
    header(
        out,
        "acc_http_window_requests",
        "gauge",
        "Requests in this replica's sliding window.",
    );
    for (endpoint, _, figures) in &totals {
        let _ = writeln!(
            out,
            "acc_http_window_requests{{endpoint=\"{endpoint}\"}} {}",
            figures.requests
        );
    }
    header(
        out,
        "acc_http_window_latency_seconds",
        "summary",
        "Latency percentiles over this replica's sliding window (HDR histogram); quantiles only.",
    );
    for (endpoint, _, figures) in &totals {
        for (q, ms) in [
            ("0.5", figures.p50_ms),
            ("0.95", figures.p95_ms),
            ("0.99", figures.p99_ms),
        ] {
            let _ = writeln!(
                out,
                "acc_http_window_latency_seconds{{endpoint=\"{endpoint}\",quantile=\"{q}\"}} {}",
                ms / 1e3
            );
        }
    }
    header(
        out,
        "acc_http_window_error_rate",
        "gauge",
        "Server-side failures (5xx) per request over this replica's sliding window.",
    );
    for (endpoint, _, figures) in &totals {
        let _ = writeln!(
            out,
            "acc_http_window_error_rate{{endpoint=\"{endpoint}\"}} {}",
            figures.error_rate()
        );
    }
}

fn render_fleet(out: &mut String, fleet: &FleetSnapshot, agent_ids: bool) {
    header(
        out,
        "acc_fleet_replicas",
        "gauge",
        "Ingress replicas merged into the fleet figures.",
    );
    let _ = writeln!(out, "acc_fleet_replicas {}", fleet.replicas);
    header(
        out,
        "acc_fleet_generated_timestamp_seconds",
        "gauge",
        "When the metrics worker produced the fleet figures.",
    );
    let _ = writeln!(
        out,
        "acc_fleet_generated_timestamp_seconds {}",
        fleet.generated_at.timestamp_millis() as f64 / 1e3
    );
    header(
        out,
        "acc_fleet_requests_per_second",
        "gauge",
        "Requests per second over the window, all ingress replicas.",
    );
    for (endpoint, figures) in &fleet.endpoints {
        let endpoint = escape(endpoint);
        let _ = writeln!(
            out,
            "acc_fleet_requests_per_second{{endpoint=\"{endpoint}\"}} {}",
            figures.requests_per_second
        );
    }
    header(
        out,
        "acc_fleet_latency_seconds",
        "summary",
        "Latency percentiles over the window, all ingress replicas merged; quantiles only.",
    );
    for (endpoint, figures) in &fleet.endpoints {
        let endpoint = escape(endpoint);
        for (q, ms) in [
            ("0.5", figures.p50_ms),
            ("0.95", figures.p95_ms),
            ("0.99", figures.p99_ms),
        ] {
            let _ = writeln!(
                out,
                "acc_fleet_latency_seconds{{endpoint=\"{endpoint}\",quantile=\"{q}\"}} {}",
                ms / 1e3
            );
        }
    }
    header(
        out,
        "acc_fleet_error_rate",
        "gauge",
        "Server-side failures per request over the window, all ingress replicas.",
    );
    for (endpoint, figures) in &fleet.endpoints {
        let endpoint = escape(endpoint);
        let _ = writeln!(
            out,
            "acc_fleet_error_rate{{endpoint=\"{endpoint}\"}} {}",
            figures.error_rate
        );
    }
    let bus = &fleet.bus;
    header(
        out,
        "acc_stream_messages",
        "gauge",
        "Messages stored per stream.",
    );
    for (stream, figures) in &bus.streams {
        let _ = writeln!(
            out,
            "acc_stream_messages{{stream=\"{}\"}} {}",
            escape(stream),
            figures.messages
        );
    }
    header(out, "acc_stream_bytes", "gauge", "Bytes stored per stream.");
    for (stream, figures) in &bus.streams {
        let _ = writeln!(
            out,
            "acc_stream_bytes{{stream=\"{}\"}} {}",
            escape(stream),
            figures.bytes
        );
    }
    header(
        out,
        "acc_stream_max_bytes",
        "gauge",
        "The most bytes a stream holds before it refuses writes (-1: unbounded).",
    );
    for (stream, figures) in &bus.streams {
        let _ = writeln!(
            out,
            "acc_stream_max_bytes{{stream=\"{}\"}} {}",
            escape(stream),
            figures.max_bytes
        );
    }
    for (name, help, pick) in [
        (
            "acc_consumer_pending",
            "Messages a durable consumer has not yet been delivered.",
            (|c: &super::snapshot::ConsumerFigures| c.pending) as fn(&_) -> u64,
        ),
        (
            "acc_consumer_ack_pending",
            "Messages delivered to a durable consumer and not yet acknowledged.",
            |c| c.ack_pending,
        ),
        (
            "acc_consumer_redelivered",
            "Unacknowledged messages a durable consumer has had delivered more than once.",
            |c| c.redelivered,
        ),
    ] {
        header(out, name, "gauge", help);
        for consumer in &bus.consumers {
            let _ = writeln!(
                out,
                "{name}{{stream=\"{}\",consumer=\"{}\"}} {}",
                escape(&consumer.stream),
                escape(&consumer.consumer),
                pick(consumer)
            );
        }
    }
    header(out, "acc_agents", "gauge", "Registered agents by status.");
    for (status, count) in [
        ("online", bus.agents.online),
        ("offline", bus.agents.offline),
        ("degraded", bus.agents.degraded),
    ] {
        let _ = writeln!(out, "acc_agents{{status=\"{status}\"}} {count}");
    }
    header(
        out,
        "acc_agents_offline_oldest_last_seen_timestamp_seconds",
        "gauge",
        "Oldest last heartbeat among the agents the registry has marked offline.",
    );
    // No sample while no agent is offline: absent, as Prometheus expects of "no value".
    if let Some(oldest) = bus.offline_agents.iter().map(|a| a.last_seen).min() {
        let _ = writeln!(
            out,
            "acc_agents_offline_oldest_last_seen_timestamp_seconds {}",
            oldest.timestamp_millis() as f64 / 1e3
        );
    }
    // One series per offline agent only (online agents have none), so the label set stays as
    // small as the trouble. `/metrics` is unauthenticated: METRICS_AGENT_IDS=false keeps agent
    // ids (the agents list is admin-only) off it.
    if agent_ids {
        header(
            out,
            "acc_agent_offline_last_seen_timestamp_seconds",
            "gauge",
            "Last heartbeat of each agent the registry has marked offline.",
        );
        for agent in &bus.offline_agents {
            let _ = writeln!(
                out,
                "acc_agent_offline_last_seen_timestamp_seconds{{agent_id=\"{}\"}} {}",
                escape(&agent.agent_id),
                agent.last_seen.timestamp_millis() as f64 / 1e3
            );
        }
    }
}

/// The NATS door's counters: messages admitted, and refused by code (codes seen).
fn render_door(out: &mut String, door: &Tally) {
    header(
        out,
        "acc_door_admitted_total",
        "counter",
        "Messages the NATS door admitted onto a verified subject (duplicates included).",
    );
    let _ = writeln!(out, "acc_door_admitted_total {}", door.admitted());
    header(
        out,
        "acc_door_rejected_total",
        "counter",
        "Messages the NATS door refused (stored on acc.rejected.<code>), by code.",
    );
    for code in Code::ALL {
        let count = door.refused.get(*code);
        if count > 0 {
            let _ = writeln!(
                out,
                "acc_door_rejected_total{{code=\"{}\"}} {count}",
                code.as_str()
            );
        }
    }
}

/// The acting dispatcher's figures.
fn render_tasks(out: &mut String, tasks: &TaskFigures) {
    header(
        out,
        "acc_tasks_queued",
        "gauge",
        "Tasks waiting for an agent, by capability and priority.",
    );
    for ((capability, priority), count) in &tasks.queued {
        let _ = writeln!(
            out,
            "acc_tasks_queued{{capability=\"{}\",priority=\"{priority}\"}} {count}",
            escape(capability)
        );
    }
    header(
        out,
        "acc_tasks_dead_lettered",
        "gauge",
        "Tasks in the dead-letter queue.",
    );
    let _ = writeln!(out, "acc_tasks_dead_lettered {}", tasks.dead_lettered);
    header(
        out,
        "acc_task_attempts_total",
        "counter",
        "Task attempts ended while this replica dispatched, by outcome.",
    );
    for (outcome, count) in OUTCOMES.iter().zip(tasks.attempts) {
        let _ = writeln!(
            out,
            "acc_task_attempts_total{{outcome=\"{outcome}\"}} {count}"
        );
    }
    header(
        out,
        "acc_task_leases_expired_total",
        "counter",
        "Attempt leases that ran out without a callback while this replica dispatched.",
    );
    let _ = writeln!(
        out,
        "acc_task_leases_expired_total {}",
        tasks.leases_expired
    );
    header(
        out,
        "acc_task_record_batches_total",
        "counter",
        "Atomic batches of task records the dispatcher sent while this replica dispatched, by outcome.",
    );
    for (outcome, count) in BATCH_OUTCOMES.iter().zip(tasks.record_batches) {
        let _ = writeln!(
            out,
            "acc_task_record_batches_total{{outcome=\"{outcome}\"}} {count}"
        );
    }
    header(
        out,
        "acc_task_batched_records_total",
        "counter",
        "Task records stored through committed atomic batches while this replica dispatched.",
    );
    let _ = writeln!(
        out,
        "acc_task_batched_records_total {}",
        tasks.batched_records
    );
    render_task_extras(out, tasks);
}

/// The dispatch latency histogram, dead-letterings and unserved capabilities.
fn render_task_extras(out: &mut String, tasks: &TaskFigures) {
    header(
        out,
        "acc_task_dispatch_latency_seconds",
        "histogram",
        "Submit to first dispatch (claimed or pushed) of tasks dispatched while this replica acted.",
    );
    let latency = &tasks.dispatch_latency;
    let mut cumulative = 0;
    for (bound, count) in LATENCY_BOUNDS.iter().zip(latency.buckets) {
        cumulative += count;
        let _ = writeln!(
            out,
            "acc_task_dispatch_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "acc_task_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {}",
        latency.count
    );
    let _ = writeln!(
        out,
        "acc_task_dispatch_latency_seconds_sum {}",
        latency.sum_micros as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "acc_task_dispatch_latency_seconds_count {}",
        latency.count
    );
    header(
        out,
        "acc_tasks_dead_lettered_total",
        "counter",
        "Tasks that entered the dead-letter queue while this replica dispatched.",
    );
    let _ = writeln!(
        out,
        "acc_tasks_dead_lettered_total {}",
        tasks.dead_lettered_total
    );
    header(
        out,
        "acc_tasks_unserved",
        "gauge",
        "Queued tasks of a capability no online agent has, by capability.",
    );
    for (capability, count) in &tasks.unserved {
        let _ = writeln!(
            out,
            "acc_tasks_unserved{{capability=\"{}\"}} {count}",
            escape(capability)
        );
    }
}

fn render_process(out: &mut String, process: &ProcessFigures) {
    header(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    );
    let _ = writeln!(
        out,
        "process_resident_memory_bytes {}",
        process.resident_memory_bytes
    );
    header(
        out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
    );
    let _ = writeln!(
        out,
        "process_virtual_memory_bytes {}",
        process.virtual_memory_bytes
    );
    header(
        out,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
    );
    let _ = writeln!(out, "process_cpu_seconds_total {}", process.cpu_seconds);
    header(
        out,
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
    );
    let _ = writeln!(out, "process_open_fds {}", process.open_fds);
    if let Some(max) = process.max_fds {
        header(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        let _ = writeln!(out, "process_max_fds {max}");
    }
    header(
        out,
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
    );
    let _ = writeln!(
        out,
        "process_start_time_seconds {}",
        process.start_time_seconds
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::snapshot::{BusFigures, OfflineAgent};

    fn fleet_with_offline_agents() -> FleetSnapshot {
        let seen = |secs: i64| chrono::DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap();
        FleetSnapshot {
            generated_at: seen(100),
            replicas: 1,
            window_seconds: 300.0,
            endpoints: Default::default(),
            bus: BusFigures {
                offline_agents: vec![
                    OfflineAgent {
                        agent_id: "secret-agent-7".into(),
                        last_seen: seen(50),
                    },
                    OfflineAgent {
                        agent_id: "pilot".into(),
                        last_seen: seen(10),
                    },
                ],
                ..Default::default()
            },
        }
    }

    fn scrape(fleet: &FleetSnapshot, agent_ids: bool, door: Option<&Tally>) -> String {
        render(&Exposition {
            stats: &Stats::new(),
            fleet: Some(fleet),
            tasks: None,
            process: None,
            door,
            agent_ids,
        })
    }

    #[test]
    fn offline_agents_are_named_unless_metrics_agent_ids_is_off() {
        let fleet = fleet_with_offline_agents();
        let text = scrape(&fleet, false, None);
        assert!(!text.contains("agent_id"), "{text}");
        assert!(!text.contains("secret-agent-7"), "{text}");
        assert!(
            text.contains("acc_agents_offline_oldest_last_seen_timestamp_seconds 1800000010\n"),
            "{text}"
        );
        let text = scrape(&fleet, true, None);
        assert!(
            text.contains(
                "acc_agent_offline_last_seen_timestamp_seconds{agent_id=\"pilot\"} 1800000010\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("{agent_id=\"secret-agent-7\"} 1800000050\n"),
            "{text}"
        );
    }

    #[test]
    fn door_counters_show_admitted_and_each_refusal_code_seen() {
        let door = Tally::default();
        door.admit();
        door.admit();
        door.refused.count(Code::InvalidToken);
        let text = scrape(&fleet_with_offline_agents(), false, Some(&door));
        assert!(
            text.contains("# TYPE acc_door_admitted_total counter\nacc_door_admitted_total 2\n")
        );
        assert!(
            text.contains("acc_door_rejected_total{code=\"INVALID_TOKEN\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("code=\"RATE_LIMITED\""), "{text}");
    }
}
