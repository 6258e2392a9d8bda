//! The ingress's own figures: per endpoint, an HDR latency histogram and request counts over a
//! sliding window (5 minutes in 10-second slices). `/health` reads p95 and the error rate from
//! here; the error rate counts server-side failures (5xx), as the plan defines it.

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

const SLICE: Duration = Duration::from_secs(10);
const SLICES: usize = 30;
/// Latencies are recorded in microseconds, up to one minute, to 3 significant figures.
const MAX_MICROS: u64 = 60_000_000;

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
        self.latency.reset();
        self.requests = 0;
        self.client_errors = 0;
        self.server_errors = 0;
    }
}

struct Window {
    slices: Vec<Slice>,
    current: usize,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            slices: (0..SLICES).map(|_| Slice::new(now)).collect(),
            current: 0,
        }
    }

    /// Moves to a fresh slice when the current one is older than [`SLICE`].
    fn rotate(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.slices[self.current].started);
        if age < SLICE {
            return;
        }
        let steps = ((age.as_secs() / SLICE.as_secs()) as usize).min(SLICES);
        for _ in 0..steps {
            self.current = (self.current + 1) % SLICES;
            self.slices[self.current].reset(now);
        }
    }
}

/// Per-endpoint windows. One mutex per endpoint keeps requests to different routes apart.
pub struct Stats {
    windows: Vec<Mutex<Window>>,
    started: Instant,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            windows: Endpoint::ALL
                .iter()
                .map(|_| Mutex::new(Window::new(now)))
                .collect(),
            started: now,
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn record(&self, endpoint: Endpoint, status: u16, latency: Duration) {
        let now = Instant::now();
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        let mut window = self.windows[endpoint.index()].lock().expect("not poisoned");
        window.rotate(now);
        let current = window.current;
        let slice = &mut window.slices[current];
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

    pub fn figures(&self, endpoint: Endpoint) -> WindowFigures {
        let now = Instant::now();
        let mut merged = Histogram::<u64>::new_with_bounds(1, MAX_MICROS, 3).expect("valid bounds");
        let (mut requests, mut client_errors, mut server_errors) = (0, 0, 0);
        {
            let mut window = self.windows[endpoint.index()].lock().expect("not poisoned");
            window.rotate(now);
            for slice in &window.slices {
                if now.saturating_duration_since(slice.started) >= SLICE * SLICES as u32 {
                    continue;
                }
                merged.add(&slice.latency).expect("same bounds");
                requests += slice.requests;
                client_errors += slice.client_errors;
                server_errors += slice.server_errors;
            }
        }
        let ms = |q: f64| {
            if merged.is_empty() {
                0.0
            } else {
                merged.value_at_quantile(q) as f64 / 1000.0
            }
        };
        WindowFigures {
            requests,
            client_errors,
            server_errors,
            p50_ms: ms(0.50),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
        }
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
    }
}
