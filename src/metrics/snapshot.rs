//! What travels on the bus: an ingress's compact window snapshot, and the fleet figures the
//! metrics worker merges from every replica's latest snapshot.
//!
//! A snapshot carries the window's HDR histogram compactly: for each recorded bucket, in
//! ascending order, the distance (µs) from the previous bucket's value and the count, both as
//! LEB128 varints, the whole in base64 — a few bytes per bucket, so even a wide distribution
//! stays far below the bus's max payload. Recording each bucket's value (its highest equivalent
//! value) into an empty histogram with the same bounds rebuilds every bucket exactly, so fleet
//! percentiles equal the percentiles of all replicas' raw samples merged, within HDR precision
//! (3 significant figures).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::domain::AgentCounts;
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
    /// The window's latency histogram, encoded by [`encode`].
    pub latency: String,
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
                    latency: histogram.as_ref().map_or_else(String::new, encode),
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

/// The histogram's recorded buckets as base64 of varint pairs (value delta in µs, count).
pub fn encode(histogram: &Histogram<u64>) -> String {
    // Most endpoints see no request in a window, and `iter_recorded` walks every bucket of an
    // empty histogram (it stops early only after the last recorded one).
    if histogram.is_empty() {
        return String::new();
    }
    let mut bytes = Vec::with_capacity(64);
    let mut previous = 0;
    for bucket in histogram.iter_recorded() {
        let value = bucket.value_iterated_to();
        put_varint(&mut bytes, value - previous);
        put_varint(&mut bytes, bucket.count_at_value());
        previous = value;
    }
    BASE64.encode(bytes)
}

/// Why an encoded histogram could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("truncated or overlong varint")]
    Varint,
}

/// Adds the buckets of an [`encode`]d histogram into `into`, all or nothing: the whole input is
/// decoded into a histogram of its own first, and merged only when every byte was valid, so a
/// snapshot that turns to garbage halfway adds none of its buckets. Values are clamped into the
/// bounds and counts saturate, so a readable snapshot cannot fail the merge.
pub fn decode_into(into: &mut Histogram<u64>, encoded: &str) -> Result<(), DecodeError> {
    // An empty window (most endpoints, most of the time) adds nothing: no histogram to build.
    if encoded.is_empty() {
        return Ok(());
    }
    let bytes = BASE64.decode(encoded)?;
    let mut rest = bytes.as_slice();
    let mut value: u64 = 0;
    let mut decoded = new_histogram();
    while !rest.is_empty() {
        value = value.saturating_add(take_varint(&mut rest)?);
        let count = take_varint(&mut rest)?;
        let _ = decoded.record_n(value.clamp(1, MAX_MICROS), count);
    }
    into.add(&decoded).expect("same bounds");
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn take_varint(input: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut n: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or(DecodeError::Varint)?;
        *input = rest;
        n |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(n);
        }
    }
    Err(DecodeError::Varint)
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
    /// The stream's `max_bytes` (-1: unbounded), for the stream-nearly-full alert.
    #[serde(default = "unbounded")]
    pub max_bytes: i64,
}

fn unbounded() -> i64 {
    -1
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
    // An endpoint's histogram is made only once a snapshot has latencies for it: making one
    // zeroes every bucket, and most endpoints of most snapshots have none.
    let mut merged: BTreeMap<String, (EndpointWindow, Option<Histogram<u64>>, f64)> =
        BTreeMap::new();
    for snapshot in snapshots {
        for (name, window) in &snapshot.endpoints {
            let entry = merged.entry(name.clone()).or_insert_with(|| {
                let empty = EndpointWindow {
                    requests: 0,
                    client_errors: 0,
                    server_errors: 0,
                    latency: String::new(),
                };
                (empty, None, 0.0)
            });
            // Counts come from the bus: saturate rather than overflow on a bogus one.
            entry.0.requests = entry.0.requests.saturating_add(window.requests);
            entry.0.client_errors = entry.0.client_errors.saturating_add(window.client_errors);
            entry.0.server_errors = entry.0.server_errors.saturating_add(window.server_errors);
            if !window.latency.is_empty() {
                let histogram = entry.1.get_or_insert_with(new_histogram);
                if let Err(err) = decode_into(histogram, &window.latency) {
                    tracing::warn!(instance = %snapshot.instance, endpoint = %name, error = %err,
                        "unreadable latency histogram in a snapshot; its latencies are left out");
                }
            }
            entry.2 = f64::max(entry.2, snapshot.window_seconds);
        }
    }
    merged
        .into_iter()
        .map(|(name, (counts, histogram, window_seconds))| {
            let ms = |q: f64| match &histogram {
                Some(histogram) if !histogram.is_empty() => {
                    histogram.value_at_quantile(q) as f64 / 1000.0
                }
                _ => 0.0,
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
        decode_into(&mut back, &encode(&histogram)).unwrap();
        assert_eq!(back, histogram);
    }

    #[test]
    fn a_wide_distribution_stays_compact() {
        // Every bucket from 1 µs to 60 s recorded: the worst case.
        let mut histogram = new_histogram();
        let mut value = 1;
        while value < MAX_MICROS {
            histogram.record(value).unwrap();
            value = histogram.next_non_equivalent(value);
        }
        let buckets = histogram.iter_recorded().count();
        let encoded = encode(&histogram);
        assert!(
            encoded.len() < buckets * 6,
            "{} bytes for {buckets} buckets",
            encoded.len()
        );
        let mut back = new_histogram();
        decode_into(&mut back, &encoded).unwrap();
        assert_eq!(back, histogram);
    }

    #[test]
    fn garbage_is_refused_not_merged() {
        let mut histogram = new_histogram();
        assert!(decode_into(&mut histogram, "not base64!").is_err());
        assert!(decode_into(&mut histogram, &BASE64.encode([0x80])).is_err());
        assert!(histogram.is_empty());
    }

    #[test]
    fn a_valid_pair_followed_by_garbage_is_not_partly_merged() {
        let mut bytes = Vec::new();
        put_varint(&mut bytes, 1_000);
        put_varint(&mut bytes, 3);
        // Then a value varint that never ends.
        bytes.extend_from_slice(&[0x80, 0x80]);
        let mut histogram = new_histogram();
        assert!(decode_into(&mut histogram, &BASE64.encode(&bytes)).is_err());
        assert!(histogram.is_empty(), "{} partly merged", histogram.len());
    }

    #[test]
    fn bogus_counts_from_the_bus_saturate() {
        let window = |requests| EndpointWindow {
            requests,
            client_errors: 0,
            server_errors: requests,
            latency: String::new(),
        };
        let snapshot = |instance: &str, requests| IngressSnapshot {
            instance: instance.into(),
            taken_at: Utc::now(),
            window_seconds: 300.0,
            endpoints: BTreeMap::from([("events".to_owned(), window(requests))]),
        };
        let fleet = merge(&[snapshot("a", u64::MAX - 1), snapshot("b", 5)]);
        assert_eq!(fleet["events"].requests, u64::MAX);
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

    #[test]
    fn empty_windows_travel_as_no_buckets_beside_busy_ones() {
        let (a, b) = (Stats::new(), Stats::new());
        a.record(Endpoint::Events, 200, Duration::from_millis(3));
        let (taken_a, taken_b) = (
            IngressSnapshot::take("a", &a),
            IngressSnapshot::take("b", &b),
        );
        assert_ne!(taken_a.endpoints["events"].latency, "");
        for snapshot in [&taken_a, &taken_b] {
            for (name, window) in &snapshot.endpoints {
                if !(snapshot.instance == "a" && name == "events") {
                    assert_eq!(window.latency, "", "{} {name}", snapshot.instance);
                }
            }
        }
        let fleet = merge(&[taken_a, taken_b]);
        assert!(
            (fleet["events"].p99_ms - 3.0).abs() < 0.01,
            "{:?}",
            fleet["events"]
        );
        assert_eq!(fleet["register"].p99_ms, 0.0);
        let mut histogram = new_histogram();
        decode_into(&mut histogram, "").unwrap();
        assert!(histogram.is_empty());
    }
}
