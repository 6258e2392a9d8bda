//! What travels on the bus: an ingress's compact window snapshot, and the fleet figures the
//! metrics worker merges from every replica's latest snapshot.
//!
//! A snapshot carries the window's HDR histogram as `[value_µs, count]` pairs, one per recorded
//! bucket (the bucket's highest equivalent value). Recording those pairs into an empty histogram
//! with the same bounds rebuilds every bucket exactly, so fleet percentiles equal the
//! percentiles of all replicas' raw samples merged, within HDR precision (3 significant figures).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::stats::{Endpoint, MAX_MICROS, Stats, new_histogram};

/// One ingress replica's window, published every `METRICS_SNAPSHOT_INTERVAL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngressSnapshot {
    /// Random per process: tells replicas apart.
    pub instance: String,
    pub taken_at: DateTime<Utc>,
    /// Length of the sliding window the figures cover.
    pub window_seconds: f64,
    /// Keyed by endpoint name (`register`, `heartbeat`, ...).
    pub endpoints: BTreeMap<String, EndpointWindow>,
}

/// One endpoint's window on one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointWindow {
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    /// `[value_µs, count]` per recorded histogram bucket.
    pub latency_us: Vec<[u64; 2]>,
}

impl IngressSnapshot {
    /// Takes a snapshot of every endpoint's window.
    pub fn take(instance: &str, stats: &Stats) -> Self {
        let endpoints = Endpoint::ALL
            .iter()
            .map(|&endpoint| {
                let (figures, histogram) = stats.window_histogram(endpoint);
                let window = EndpointWindow {
                    requests: figures.requests,
                    client_errors: figures.client_errors,
                    server_errors: figures.server_errors,
                    latency_us: encode(&histogram),
                };
                (endpoint.name().to_owned(), window)
            })
            .collect();
        Self {
            instance: instance.to_owned(),
            taken_at: Utc::now(),
            window_seconds: stats.window().as_secs_f64(),
            endpoints,
        }
    }
}

/// The histogram's recorded buckets as `[highest equivalent value, count]`.
pub fn encode(histogram: &Histogram<u64>) -> Vec<[u64; 2]> {
    histogram
        .iter_recorded()
        .map(|bucket| [bucket.value_iterated_to(), bucket.count_at_value()])
        .collect()
}

/// Adds encoded buckets into `into`; values outside the bounds are clamped, not refused, so a
/// malformed snapshot cannot stop the merge.
pub fn decode_into(into: &mut Histogram<u64>, buckets: &[[u64; 2]]) {
    for [value, count] in buckets {
        let _ = into.record_n((*value).clamp(1, MAX_MICROS), *count);
    }
}

/// Fleet figures of one endpoint, merged over every live replica.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetEndpoint {
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Server-side failures per request (the plan's error rate); 0 without traffic.
    pub error_rate: f64,
}

/// Bus figures the metrics worker adds to the fleet snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BusFigures {
    /// Per stream: messages and bytes stored.
    pub streams: BTreeMap<String, StreamFigures>,
    pub consumers: Vec<ConsumerFigures>,
    pub agents: AgentCounts,
    /// Offline agents with their last heartbeat, for the agent-offline alert.
    pub offline_agents: Vec<OfflineAgent>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamFigures {
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConsumerFigures {
    pub stream: String,
    pub consumer: String,
    /// Messages not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
    /// Delivered more than once and not yet acknowledged.
    pub redelivered: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentCounts {
    pub total: u64,
    pub online: u64,
    pub offline: u64,
    pub degraded: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfflineAgent {
    pub agent_id: String,
    pub last_seen: DateTime<Utc>,
}

/// What the metrics worker publishes every interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetSnapshot {
    pub generated_at: DateTime<Utc>,
    /// Ingress replicas whose snapshot was fresh enough to merge.
    pub replicas: usize,
    pub window_seconds: f64,
    pub endpoints: BTreeMap<String, FleetEndpoint>,
    pub bus: BusFigures,
}

/// Merges replica snapshots into fleet figures per endpoint.
pub fn merge(snapshots: &[IngressSnapshot]) -> BTreeMap<String, FleetEndpoint> {
    let mut merged: BTreeMap<String, (EndpointWindow, Histogram<u64>, f64)> = BTreeMap::new();
    for snapshot in snapshots {
        for (name, window) in &snapshot.endpoints {
            let entry = merged.entry(name.clone()).or_insert_with(|| {
                let empty = EndpointWindow {
                    requests: 0,
                    client_errors: 0,
                    server_errors: 0,
                    latency_us: Vec::new(),
                };
                (empty, new_histogram(), 0.0)
            });
            entry.0.requests += window.requests;
            entry.0.client_errors += window.client_errors;
            entry.0.server_errors += window.server_errors;
            decode_into(&mut entry.1, &window.latency_us);
            entry.2 = f64::max(entry.2, snapshot.window_seconds);
        }
    }
    merged
        .into_iter()
        .map(|(name, (counts, histogram, window_seconds))| {
            let ms = |q: f64| {
                if histogram.is_empty() {
                    0.0
                } else {
                    histogram.value_at_quantile(q) as f64 / 1000.0
                }
            };
            let figures = FleetEndpoint {
                requests: counts.requests,
                client_errors: counts.client_errors,
                server_errors: counts.server_errors,
                requests_per_second: if window_seconds > 0.0 {
                    counts.requests as f64 / window_seconds
                } else {
                    0.0
                },
                p50_ms: ms(0.50),
                p95_ms: ms(0.95),
                p99_ms: ms(0.99),
                error_rate: if counts.requests == 0 {
                    0.0
                } else {
                    counts.server_errors as f64 / counts.requests as f64
                },
            };
            (name, figures)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn encoding_round_trips_every_bucket() {
        let mut histogram = new_histogram();
        for micros in [1, 7, 999, 1_234, 55_555, 1_000_000] {
            histogram.record_n(micros, micros % 5 + 1).unwrap();
        }
        let mut back = new_histogram();
        decode_into(&mut back, &encode(&histogram));
        assert_eq!(back, histogram);
    }

    #[test]
    fn merged_counts_add_up() {
        let (a, b) = (Stats::new(), Stats::new());
        a.record(Endpoint::Register, 200, Duration::from_millis(2));
        b.record(Endpoint::Register, 503, Duration::from_millis(4));
        let fleet = merge(&[
            IngressSnapshot::take("a", &a),
            IngressSnapshot::take("b", &b),
        ]);
        let register = &fleet["register"];
        assert_eq!(register.requests, 2);
        assert_eq!(register.server_errors, 1);
        assert!((register.error_rate - 0.5).abs() < 1e-9);
    }
}
