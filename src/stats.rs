//! The ingress's own figures: per endpoint, an HDR latency histogram and request counts over a
//! sliding window (by default 5 minutes in 30 slices of 10 seconds), plus counters since start
//! for Prometheus (requests by status class and by exact status code, latency in fixed buckets). `/health` reads p95 and
//! the error rate from here; the error rate counts server-side failures (5xx), as the plan
//! defines it.
//!
//! Recording takes one mutex per endpoint (requests to the same route share it) and touches only
//! that endpoint's current slice, a running sum of the window and its cumulative counters. Readers
//! (`/health`, `/metrics`, snapshots) hold it only to clone the running sum, never to merge the
//! slices, so they do not stall the request path; a slice leaving the window is subtracted from
//! the sum once, on rotation.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// The routes we keep figures for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Register,
    Heartbeat,
    TaskCallback,
    TaskStatus,
    Events,
    Agents,
}

impl Endpoint {
    pub const ALL: [Endpoint; 6] = [
        Endpoint::Register,
        Endpoint::Heartbeat,
        Endpoint::TaskCallback,
        Endpoint::TaskStatus,
        Endpoint::Events,
        Endpoint::Agents,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Register => "register",
            Endpoint::Heartbeat => "heartbeat",
            Endpoint::TaskCallback => "task_callback",
            Endpoint::TaskStatus => "task_status",
            Endpoint::Events => "events",
            Endpoint::Agents => "agents",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The window is cut into this many slices; the oldest slice is dropped as a new one starts.
const SLICES: usize = 30;
/// The default window: 5 minutes (30 slices of 10 s).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
/// Latencies are recorded in microseconds, up to one minute, to 3 significant figures.
pub const MAX_MICROS: u64 = 60_000_000;
/// Significant figures of every latency histogram (snapshots must match to merge).
pub const SIGFIGS: u8 = 3;

/// Upper bounds (µs) of the cumulative latency buckets `/metrics` exposes. 100 ms and 120 ms
/// are the plan's WARN and CRITICAL latency thresholds, so an alert on the buckets is exact.
pub const BUCKETS_MICROS: [u64; 15] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 120_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Status classes counted apart: 1xx to 5xx.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// An empty latency histogram with the bounds every ingress uses.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, SIGFIGS).expect("valid bounds")
}

/// Requests per exact status code, sorted by code.
///
/// An endpoint answers with a handful of distinct codes, so a sorted vector is smaller and
/// faster than a hash map: counting a code seen before is a binary search and an increment, and
/// only the first request with a new code allocates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeCounts(Vec<(u16, u64)>);

impl CodeCounts {
    /// Counts one request answered `code`.
    pub fn add(&mut self, code: u16) {
        match self.0.binary_search_by_key(&code, |&(c, _)| c) {
            Ok(i) => self.0[i].1 += 1,
            Err(i) => self.0.insert(i, (code, 1)),
        }
    }

    /// Requests answered `code` (0 when none was).
    pub fn get(&self, code: u16) -> u64 {
        self.0
            .binary_search_by_key(&code, |&(c, _)| c)
            .map_or(0, |i| self.0[i].1)
    }

    /// `(code, count)` of every code seen, in ascending code order.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.0.iter().copied()
    }
}

/// Counters since the process started, for Prometheus counters and histograms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cumulative {
    /// Requests per status class, indexed like [`CLASSES`].
    pub by_class: [u64; 5],
    /// Requests per exact status code; each class is the sum of its codes.
    pub by_code: CodeCounts,
    /// Requests per latency bucket (not cumulative), indexed like [`BUCKETS_MICROS`]; slower
    /// requests are only in `count`.
    pub buckets: [u64; BUCKETS_MICROS.len()],
    pub count: u64,
    pub sum_micros: u64,
}

/// Figures of one endpoint over the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowFigures {
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl WindowFigures {
    /// Server-side failures per request (0 when there was no traffic).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.server_errors as f64 / self.requests as f64
        }
    }
}

struct Slice {
    started: Instant,
    latency: Histogram<u64>,
    requests: u64,
    client_errors: u64,
    server_errors: u64,
}

impl Slice {
    fn new(started: Instant) -> Self {
        Self {
            started,
            latency: Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid bounds"),
            requests: 0,
            client_errors: 0,
            server_errors: 0,
        }
    }

    fn reset(&mut self, started: Instant) {
        self.started = started;
        // Resetting zeroes every bucket; most slices of most endpoints recorded nothing.
        if !self.latency.is_empty() {
            self.latency.reset();
        }
        self.requests = 0;
        self.client_errors = 0;
        self.server_errors = 0;
    }
}

struct Window {
    slices: Vec<Slice>,
    current: usize,
    slice: Duration,
    /// The sum of every slice still in the window (the slices' figures merged, kept current).
    running: Slice,
    totals: Cumulative,
}

impl Window {
    fn new(now: Instant, slice: Duration) -> Self {
        Self {
            slices: (0..SLICES).map(|_| Slice::new(now)).collect(),
            current: 0,
            slice,
            running: Slice::new(now),
            totals: Cumulative::default(),
        }
    }

    /// Takes slice `index` out of the running sum and empties it, keeping its start.
    fn expire(&mut self, index: usize) {
        let slice = &mut self.slices[index];
        if slice.requests == 0 {
            return;
        }
        self.running
            .latency
            .subtract(&slice.latency)
            .expect("the slice was added to the sum");
        self.running.requests -= slice.requests;
        self.running.client_errors -= slice.client_errors;
        self.running.server_errors -= slice.server_errors;
        let started = slice.started;
        slice.reset(started);
    }

    /// Moves to a fresh slice when the current one is older than one slice, and takes slices
    /// that left the window out of the running sum.
    fn rotate(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.slices[self.current].started);
        if age >= self.slice {
            let steps = ((age.as_nanos() / self.slice.as_nanos()) as usize).min(SLICES);
            for _ in 0..steps {
                self.current = (self.current + 1) % SLICES;
                self.expire(self.current);
                self.slices[self.current].reset(now);
            }
        }
        // Slices start in ring order, oldest just after the current one; a slice can be older
        // than the window while still in the ring when rotations came late.
        let span = self.slice * SLICES as u32;
        for k in 1..SLICES {
            let index = (self.current + k) % SLICES;
            if now.saturating_duration_since(self.slices[index].started) < span {
                break;
            }
            self.expire(index);
        }
    }
}

/// Per-endpoint windows. One mutex per endpoint keeps requests to different routes apart.
pub struct Stats {
    windows: Vec<Mutex<Window>>,
    started: Instant,
    window: Duration,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        Self::with_window(DEFAULT_WINDOW)
    }

    /// Figures over a sliding `window` (30 slices; tests use seconds, production minutes).
    pub fn with_window(window: Duration) -> Self {
        let now = Instant::now();
        let slice = (window / SLICES as u32).max(Duration::from_millis(10));
        Self {
            windows: Endpoint::ALL
                .iter()
                .map(|_| Mutex::new(Window::new(now, slice)))
                .collect(),
            started: now,
            window: slice * SLICES as u32,
        }
    }

    /// The length of the sliding window.
    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Counts one request to `endpoint` answered `status` after `latency`.
    pub fn record(&self, endpoint: Endpoint, status: u16, latency: Duration) {
        let now = Instant::now();
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        let bucket = BUCKETS_MICROS.partition_point(|&le| le < micros);
        let class = (usize::from(status / 100)).clamp(1, 5) - 1;
        let mut window = self.windows[endpoint.index()].lock().expect("not poisoned");
        window.rotate(now);
        let totals = &mut window.totals;
        totals.by_class[class] += 1;
        totals.by_code.add(status);
        if let Some(count) = totals.buckets.get_mut(bucket) {
            *count += 1;
        }
        totals.count += 1;
        totals.sum_micros += micros;
        let current = window.current;
        let window = &mut *window;
        for slice in [&mut window.slices[current], &mut window.running] {
            slice.requests += 1;
            match status {
                400..=499 => slice.client_errors += 1,
                500..=599 => slice.server_errors += 1,
                _ => {}
            }
            slice
                .latency
                .record(micros)
                .expect("value clamped into bounds");
        }
    }

    /// Counts one request to `endpoint` refused before admission (see
    /// [`crate::contract::Code::is_before_admission`]): only in the counters by status since
    /// start, never in the window's latency and error figures, so requests without a valid token
    /// cannot move `/health`.
    pub fn record_refused(&self, endpoint: Endpoint, status: u16) {
        let class = (usize::from(status / 100)).clamp(1, 5) - 1;
        let mut window = self.windows[endpoint.index()].lock().expect("not poisoned");
        window.totals.by_class[class] += 1;
        window.totals.by_code.add(status);
    }

    /// Counters of `endpoint` since start.
    pub fn cumulative(&self, endpoint: Endpoint) -> Cumulative {
        let window = self.windows[endpoint.index()].lock().expect("not poisoned");
        window.totals.clone()
    }

    pub fn figures(&self, endpoint: Endpoint) -> WindowFigures {
        self.window_histogram(endpoint).0
    }

    /// The window's figures and its merged latency histogram (µs), for snapshots; `None` for
    /// a window without a recorded latency (cloning an empty histogram copies every bucket).
    pub fn window_histogram(&self, endpoint: Endpoint) -> (WindowFigures, Option<Histogram<u64>>) {
        let now = Instant::now();
        // Under the lock: one clone of the running sum (no merging), then figures outside it.
        let (merged, requests, client_errors, server_errors) = {
            let mut window = self.windows[endpoint.index()].lock().expect("not poisoned");
            window.rotate(now);
            let running = &window.running;
            (
                (!running.latency.is_empty()).then(|| running.latency.clone()),
                running.requests,
                running.client_errors,
                running.server_errors,
            )
        };
        let ms = |q: f64| {
            merged
                .as_ref()
                .map_or(0.0, |merged| merged.value_at_quantile(q) as f64 / 1000.0)
        };
        let figures = WindowFigures {
            requests,
            client_errors,
            server_errors,
            p50_ms: ms(0.50),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
        };
        (figures, merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let stats = Stats::new();
        for ms in 1..=100 {
            stats.record(Endpoint::Register, 200, Duration::from_millis(ms));
        }
        let figures = stats.figures(Endpoint::Register);
        assert_eq!(figures.requests, 100);
        assert!((figures.p95_ms - 95.0).abs() < 0.5, "{figures:?}");
        assert!((figures.p50_ms - 50.0).abs() < 0.5, "{figures:?}");
        assert_eq!(stats.figures(Endpoint::Heartbeat).requests, 0);
    }

    #[test]
    fn only_server_errors_count_toward_the_error_rate() {
        let stats = Stats::new();
        for status in [200, 200, 400, 401, 503] {
            stats.record(Endpoint::Heartbeat, status, Duration::from_millis(1));
        }
        let figures = stats.figures(Endpoint::Heartbeat);
        assert_eq!(figures.client_errors, 2);
        assert_eq!(figures.server_errors, 1);
        assert!((figures.error_rate() - 0.2).abs() < 1e-9);
        let totals = stats.cumulative(Endpoint::Heartbeat);
        assert_eq!(totals.by_class, [0, 2, 0, 2, 1]);
        assert_eq!(totals.count, 5);
    }

    #[test]
    fn cumulative_counts_keep_the_exact_status_code() {
        let stats = Stats::new();
        for status in [404, 200, 401, 200, 503, 401, 200] {
            stats.record(Endpoint::Heartbeat, status, Duration::from_millis(1));
        }
        let totals = stats.cumulative(Endpoint::Heartbeat);
        assert_eq!(
            totals.by_code.iter().collect::<Vec<_>>(),
            [(200, 3), (401, 2), (404, 1), (503, 1)],
            "sorted by code"
        );
        assert_eq!(totals.by_code.get(401), 2);
        assert_eq!(totals.by_code.get(500), 0);
        assert_eq!(totals.by_class, [0, 3, 0, 3, 1]);
        // Every code counted is in the class counts, once.
        assert_eq!(
            totals.by_code.iter().map(|(_, n)| n).sum::<u64>(),
            totals.count
        );
        assert_eq!(
            stats.cumulative(Endpoint::Events).by_code,
            CodeCounts::default()
        );
    }

    #[test]
    fn cumulative_buckets_count_each_request_once() {
        let stats = Stats::new();
        stats.record(Endpoint::Events, 200, Duration::from_micros(400));
        stats.record(Endpoint::Events, 200, Duration::from_millis(110));
        stats.record(Endpoint::Events, 200, Duration::from_secs(30));
        let totals = stats.cumulative(Endpoint::Events);
        assert_eq!(totals.buckets[0], 1, "400 µs is in the 500 µs bucket");
        assert_eq!(totals.buckets[8], 1, "110 ms is in the 120 ms bucket");
        assert_eq!(
            totals.buckets.iter().sum::<u64>(),
            2,
            "30 s is only in +Inf"
        );
        assert_eq!(totals.count, 3);
    }

    #[test]
    fn old_slices_leave_a_short_window() {
        let stats = Stats::with_window(Duration::from_millis(300));
        stats.record(Endpoint::Register, 200, Duration::from_millis(1));
        assert_eq!(stats.figures(Endpoint::Register).requests, 1);
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(stats.figures(Endpoint::Register).requests, 0);
        assert_eq!(stats.cumulative(Endpoint::Register).count, 1);
    }

    /// Checks, at one instant, that the running sum equals the merge of the slices still in
    /// the window (the way figures were computed before the running sum).
    fn assert_running_matches_slices(stats: &Stats, endpoint: Endpoint, round: u64) {
        let mut window = stats.windows[endpoint.index()].lock().unwrap();
        let now = Instant::now();
        window.rotate(now);
        let span = window.slice * SLICES as u32;
        let mut merged = new_histogram();
        let (mut requests, mut server_errors) = (0, 0);
        for slice in &window.slices {
            if now.saturating_duration_since(slice.started) >= span {
                continue;
            }
            merged.add(&slice.latency).unwrap();
            requests += slice.requests;
            server_errors += slice.server_errors;
        }
        let running = &window.running;
        assert_eq!(running.requests, requests, "round {round}");
        assert_eq!(running.server_errors, server_errors, "round {round}");
        assert_eq!(running.latency, merged, "round {round}");
    }

    #[test]
    fn the_running_window_agrees_with_its_slices_as_they_rotate_out() {
        let stats = Stats::with_window(Duration::from_millis(300));
        for round in 0..40u64 {
            for i in 0..5 {
                stats.record(
                    Endpoint::Events,
                    if i == 0 { 503 } else { 200 },
                    Duration::from_micros(100 + round * 50 + i),
                );
            }
            // Sometimes a gap longer than a slice, sometimes longer than the window.
            std::thread::sleep(Duration::from_millis(match round {
                10 => 120,
                25 => 330,
                _ => 10,
            }));
            assert_running_matches_slices(&stats, Endpoint::Events, round);
        }
    }
}
