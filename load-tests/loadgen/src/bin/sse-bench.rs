//! SSE fan-out benchmark: many concurrent subscribers of `GET /orchestrator/events/stream`, each
//! receiving every event, while events are published at a constant rate; then a stored gap
//! replayed to one subscriber.
//!
//! 1. Opens `--subscribers` streams (filtered to the benchmark's own event type) and waits until
//!    every one has its 200: from then on each is live.
//! 2. Publishes `--rate` events per second for `--duration` with `POST /orchestrator/events`,
//!    open loop; each event carries its *scheduled* send time (µs since the epoch) in
//!    `data.bench_t`, so publish→client latency is measured from when the event was due, and a
//!    stalled publisher or bridge shows up as latency.
//! 3. Each subscriber takes the latency of every event it reads (now − `bench_t`, same clock:
//!    everything runs on one machine) and checks that its ids only grow; at the end each must
//!    have every event exactly once. Once every event is acknowledged an end marker (an event
//!    of the same type without `bench_t`) is published: a subscriber stops when it reads it,
//!    so a reader waits on its socket alone, with no second wake-up source polled per event.
//! 4. The gap: the subscribers are closed, `--gap` events are published as fast as
//!    `--gap-concurrency` requests allow, and one subscriber resumes with `Last-Event-ID` set to
//!    the last id before them; the time from its request to its last gap event is the replay.
//!
//! With `--bridge-pid`, the bridge's CPU time (utime + stime of `/proc/<pid>/stat`) over the
//! live phase and its resident memory before and with the subscribers are reported too; the
//! benchmark's own CPU time (its readers and publisher share the machine) always, and with
//! `--nats-pid` the nats-server's. Each reader takes a frame's receipt time when the read that
//! completes it returns, before parsing it, and searches each byte once.
//!
//! The subscribers speak HTTP/1.1 on a socket each (the request, the response head, the chunked
//! body decoded in place) rather than through an HTTP client: the client shares the machine's
//! cores with the bridge, and a client library's connection task wakes the reader through a
//! channel for every chunk, twice the wake-ups per delivery. The publisher keeps `reqwest`.
//!
//! ```sh
//! sse-bench --url http://127.0.0.1:8080 --reader-token "$ADMIN" --token "$AGENT" \
//!     --subscribers 1000 --rate 200 --duration 30s --gap 10000 --bridge-pid "$PID" --out dir/
//! ```

use loadgen::{ms, write_hgrm};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Base URL of the bridge.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token of the publishing agent (`--agent`).
    #[arg(long, env = "TOKEN")]
    token: String,
    /// The agent `--token` speaks for (the events' source).
    #[arg(long, default_value = "bench")]
    agent: String,
    /// Bearer token the subscribers use (scope `orchestrator.events.read`, or admin).
    #[arg(long, env = "READER_TOKEN")]
    reader_token: String,
    /// Concurrent subscribers.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Events published per second during the live phase.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// How long the live phase publishes, in seconds.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Events in the replayed gap (0: no gap phase).
    #[arg(long, default_value_t = 10_000)]
    gap: u64,
    /// Requests in flight while the gap is published.
    #[arg(long, default_value_t = 64)]
    gap_concurrency: usize,
    /// The bridge's process id, for its CPU time and memory.
    #[arg(long)]
    bridge_pid: Option<u32>,
    /// The embedded nats-server's process id, for its CPU time.
    #[arg(long)]
    nats_pid: Option<u32>,
    /// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Directory for the raw results: `<label>.hgrm` and `<label>.json`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Label of the results.
    #[arg(long, default_value = "sse")]
    label: String,
}

/// The event type the benchmark publishes and its subscribers filter on.
const EVENT_TYPE: &str = "bench.sse";

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as u64
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

/// What one subscriber saw.
struct Seen {
    /// Each event's latency in µs, in arrival order: an append per event, where a histogram
    /// per subscriber (hundreds of KiB each, a thousand of them) costs a cache miss per event
    /// on the cores the bridge needs. Merged into one histogram at the end.
    latency: Vec<u32>,
    events: u64,
    /// Ids that did not grow: duplicates or reordering.
    out_of_order: u64,
}

/// One open SSE response on its own socket, read into events.
struct SseStream {
    socket: TcpStream,
    /// Bytes read off the socket and not yet decoded (a chunk-size line cut by a read).
    raw: Vec<u8>,
    chunked: Chunked,
    /// The decoded body.
    buffer: Vec<u8>,
    /// Where the unread part of `buffer` starts.
    start: usize,
    /// Where the search for the end of the next frame resumes.
    scanned: usize,
    /// When the chunk that completed the frames in `buffer` arrived (µs since the epoch).
    received_at: u64,
}

/// One event's id and, for the benchmark's events, `data.bench_t`, with when its last byte
/// arrived.
struct Frame {
    id: Option<u64>,
    sent_at: Option<u64>,
    received_at: u64,
}

impl SseStream {
    async fn open(args: &Args, last_event_id: Option<u64>) -> anyhow::Result<Self> {
        let authority = args
            .url
            .trim_end_matches('/')
            .strip_prefix("http://")
            .context("--url must be http://host:port")?;
        let mut socket = TcpStream::connect(authority).await?;
        socket.set_nodelay(true)?;
        let mut request = format!(
            "GET /orchestrator/events/stream?type={EVENT_TYPE} HTTP/1.1\r\nHost: {authority}\r\n\
             Authorization: Bearer {}\r\n",
            args.reader_token
        );
        if let Some(id) = last_event_id {
            request.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        request.push_str("\r\n");
        socket.write_all(request.as_bytes()).await?;
        // The response head; what follows it is the start of the body.
        let mut raw = Vec::with_capacity(16 * 1024);
        let head_end = loop {
            if let Some(at) = find(&raw, b"\r\n\r\n") {
                break at + 4;
            }
            anyhow::ensure!(
                socket.read_buf(&mut raw).await? > 0,
                "the stream closed in its head"
            );
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
        anyhow::ensure!(
            head.starts_with("http/1.1 200"),
            "stream refused: {}",
            head.lines().next().unwrap_or_default()
        );
        anyhow::ensure!(
            head.contains("transfer-encoding: chunked"),
            "the stream's body is not chunked"
        );
        raw.drain(..head_end);
        let mut chunked = Chunked::default();
        let mut buffer = Vec::with_capacity(16 * 1024);
        let used = chunked.decode(&raw, &mut buffer)?;
        raw.drain(..used);
        Ok(Self {
            socket,
            raw,
            chunked,
            buffer,
            start: 0,
            scanned: 0,
            received_at: now_micros(),
        })
    }

    /// The next event (comments skipped); `None` when the stream ended. Its receipt time is
    /// taken once per chunk read off the socket, before any parsing, so the reader's own
    /// parsing does not count as latency.
    async fn next(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some(end) = self.frame_end() {
                let frame = parse(&self.buffer[self.start..end], self.received_at);
                self.start = end + 2;
                self.scanned = self.start;
                if let Some(frame) = frame {
                    return Ok(Some(frame));
                }
                continue;
            }
            if self.chunked.ended {
                return Ok(None);
            }
            if self.start == self.buffer.len() {
                self.buffer.clear();
                self.scanned -= self.start;
                self.start = 0;
            } else if self.start > self.buffer.len() / 2 {
                self.buffer.drain(..self.start);
                self.scanned -= self.start;
                self.start = 0;
            }
            // What is left in `raw` is a chunk-size line or CRLF cut by the last read.
            if self.socket.read_buf(&mut self.raw).await? == 0 {
                return Ok(None);
            }
            self.received_at = now_micros();
            let used = self.chunked.decode(&self.raw, &mut self.buffer)?;
            self.raw.drain(..used);
        }
    }

    /// Where the next frame's blank line starts, searching only bytes not searched before.
    fn frame_end(&mut self) -> Option<usize> {
        let from = self.scanned.max(self.start);
        let unread = &self.buffer[from..];
        match find(unread, b"\n\n") {
            Some(at) => Some(from + at),
            None => {
                // The last byte may be the first half of the blank line.
                self.scanned = self.buffer.len().saturating_sub(1).max(self.start);
                None
            }
        }
    }
}

/// HTTP/1.1 chunked transfer coding, decoded as it arrives.
#[derive(Default)]
struct Chunked {
    /// Data bytes still to come in the current chunk.
    left: usize,
    /// The CRLF after a chunk's data is still to come.
    crlf: bool,
    /// The last (empty) chunk came.
    ended: bool,
}

impl Chunked {
    /// Appends the data in `raw` to `out`; how many bytes of `raw` were used (a chunk-size line
    /// cut short is left for the next read).
    fn decode(&mut self, raw: &[u8], out: &mut Vec<u8>) -> anyhow::Result<usize> {
        let mut at = 0;
        while at < raw.len() && !self.ended {
            if self.left > 0 {
                let n = self.left.min(raw.len() - at);
                out.extend_from_slice(&raw[at..at + n]);
                (at, self.left) = (at + n, self.left - n);
                self.crlf = self.left == 0;
                continue;
            }
            if self.crlf {
                if raw.len() - at < 2 {
                    break;
                }
                (at, self.crlf) = (at + 2, false);
                continue;
            }
            let Some(line) = find(&raw[at..], b"\r\n") else {
                break;
            };
            let size = &raw[at..at + line];
            let size = size.split(|b| *b == b';').next().unwrap_or_default();
            let size = usize::from_str_radix(std::str::from_utf8(size)?.trim(), 16)?;
            at += line + 2;
            self.left = size;
            self.ended = size == 0;
        }
        Ok(at)
    }
}

/// Where `needle` first occurs in `haystack`: a scan for its first byte, then a comparison
/// where it matches (comparing a window at every position costs a `memcmp` call per byte).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(at) = haystack.get(from..)?.iter().position(|b| b == first) {
        let at = from + at;
        if haystack[at + 1..].starts_with(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// An event block's id and `bench_t`; `None` for a comment-only block.
fn parse(block: &[u8], received_at: u64) -> Option<Frame> {
    let mut frame = Frame {
        id: None,
        sent_at: None,
        received_at,
    };
    let mut any = false;
    for line in block.split(|b| *b == b'\n') {
        if let Some(id) = line.strip_prefix(b"id:") {
            frame.id = digits(id.trim_ascii_start());
            any = true;
        } else if let Some(data) = line.strip_prefix(b"data:") {
            any = true;
            let key = b"bench_t\":";
            if let Some(at) = find(data, key) {
                frame.sent_at = digits(data[at + key.len()..].trim_ascii_start());
            }
        } else if line.starts_with(b"event:") {
            any = true;
        }
    }
    any.then_some(frame)
}

/// The decimal number `raw` starts with.
fn digits(raw: &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    let mut any = false;
    for b in raw.iter().take_while(|b| b.is_ascii_digit()) {
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

/// Reads one subscriber's stream until the end marker (an event with an id and no `bench_t`)
/// or the stream ends.
async fn subscribe(mut stream: SseStream) -> Seen {
    let mut seen = Seen {
        latency: Vec::with_capacity(4096),
        events: 0,
        out_of_order: 0,
    };
    let mut last_id = 0;
    while let Ok(Some(frame)) = stream.next().await {
        let Some(sent_at) = frame.sent_at else {
            if frame.id.is_some() {
                // The end marker: every event was published before it.
                return seen;
            }
            continue;
        };
        let micros = frame.received_at.saturating_sub(sent_at);
        seen.latency.push(micros.clamp(1, 60_000_000) as u32);
        seen.events += 1;
        match frame.id {
            Some(id) if id > last_id => last_id = id,
            _ => seen.out_of_order += 1,
        }
    }
    seen
}

/// Publishes one event due at `due` (µs since the epoch); its stream sequence on success.
async fn publish(client: &reqwest::Client, args: &Args, id: &str, due: u64) -> Option<u64> {
    publish_data(client, args, id, serde_json::json!({ "bench_t": due })).await
}

/// Publishes one event of the benchmark's type with `data`; its stream sequence on success.
async fn publish_data(
    client: &reqwest::Client,
    args: &Args,
    id: &str,
    data: serde_json::Value,
) -> Option<u64> {
    let body = serde_json::json!({
        "event_id": id,
        "type": EVENT_TYPE,
        "source": args.agent,
        "data": data,
        "time": "2026-12-01T00:00:00Z",
    });
    let response = client
        .post(format!(
            "{}/orchestrator/events",
            args.url.trim_end_matches('/')
        ))
        .bearer_auth(&args.token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let answer: serde_json::Value = serde_json::from_slice(&response.bytes().await.ok()?).ok()?;
    answer["seq"].as_u64()
}

/// utime + stime of `pid` in seconds.
fn cpu_seconds(pid: u32, clk_tck: u64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clk_tck as f64)
}

/// A `Vm…:` figure of `/proc/<pid>/status` in KiB.
fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.gap_concurrency + 16)
        .build()?;
    let mut report = serde_json::Map::new();
    let pid = args.bridge_pid;
    let rss = |field: &str| pid.and_then(|p| vm_kib(p, field));
    let rss_idle = rss("VmRSS:");

    // 1. Every subscriber live before the first event.
    let opened = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..args.subscribers {
        let (args, gate) = (args.clone(), gate.clone());
        opening.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("open");
            SseStream::open(&args, None).await
        });
    }
    let mut readers = tokio::task::JoinSet::new();
    while let Some(stream) = opening.join_next().await {
        readers.spawn(subscribe(stream??));
    }
    let open_took = opened.elapsed();
    let rss_connected = rss("VmRSS:");
    eprintln!(
        "{} subscribers live in {open_took:.2?}; publishing {}/s for {} s",
        args.subscribers, args.rate, args.duration
    );

    // 2. Publish open loop at the rate.
    let cpu_before = pid.and_then(|p| cpu_seconds(p, args.clk_tck));
    let own_pid = std::process::id();
    let own_cpu_before = cpu_seconds(own_pid, args.clk_tck);
    let nats_cpu_before = args.nats_pid.and_then(|p| cpu_seconds(p, args.clk_tck));
    let live_started = Instant::now();
    let total = args.rate * args.duration;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let failed = Arc::new(AtomicU64::new(0));
    let last_seq = Arc::new(AtomicU64::new(0));
    let epoch_start = now_micros();
    let mut publishing = tokio::task::JoinSet::new();
    for i in 0..total {
        let offset = interval.mul_f64(i as f64);
        let due = live_started + offset;
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let (client, args, failed, last_seq) = (
            client.clone(),
            args.clone(),
            failed.clone(),
            last_seq.clone(),
        );
        let due_micros = epoch_start + offset.as_micros() as u64;
        publishing.spawn(async move {
            match publish(
                &client,
                &args,
                &format!("{}-live-{i}", args.label),
                due_micros,
            )
            .await
            {
                Some(seq) => drop(last_seq.fetch_max(seq, Ordering::Relaxed)),
                None => drop(failed.fetch_add(1, Ordering::Relaxed)),
            }
        });
    }
    while publishing.join_next().await.is_some() {}
    let published = total - failed.load(Ordering::Relaxed);
    // The end marker, stored after every acknowledged event.
    let mut end_seq = None;
    for attempt in 0..5 {
        let id = format!("{}-end-{attempt}", args.label);
        end_seq = publish_data(
            &client,
            &args,
            &id,
            serde_json::json!({ "bench_end": true }),
        )
        .await;
        if end_seq.is_some() {
            break;
        }
    }
    let end_seq = end_seq.context("the end marker could not be published")?;
    last_seq.fetch_max(end_seq, Ordering::Relaxed);

    // 3. Every subscriber has every event, or gives up after a bound.
    let mut latency = histogram();
    let (mut complete, mut incomplete, mut out_of_order, mut deliveries) = (0, 0, 0, 0);
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(seen) = readers.join_next().await {
            let seen = seen.expect("subscriber task");
            for micros in &seen.latency {
                latency.record(u64::from(*micros)).ok();
            }
            deliveries += seen.events;
            out_of_order += seen.out_of_order;
            if seen.events == published {
                complete += 1;
            } else {
                incomplete += 1;
            }
        }
    })
    .await;
    let live_took = live_started.elapsed();
    let cpu_after = pid.and_then(|p| cpu_seconds(p, args.clk_tck));
    let own_cpu_after = cpu_seconds(own_pid, args.clk_tck);
    let nats_cpu_after = args.nats_pid.and_then(|p| cpu_seconds(p, args.clk_tck));
    let rss_peak = rss("VmHWM:");
    incomplete += readers.len() as u64;
    readers.abort_all();
    drop(readers);
    if drained.is_err() {
        eprintln!("some subscribers did not get every event within 30 s");
    }
    println!(
        "{} live: {} subscribers, {published} events ({} failed) at {}/s; deliveries {deliveries}; \
         complete {complete}, incomplete {incomplete}, out of order {out_of_order}; \
         publish→client p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        args.label,
        args.subscribers,
        failed.load(Ordering::Relaxed),
        args.rate,
        ms(&latency, 0.5),
        ms(&latency, 0.9),
        ms(&latency, 0.99),
        ms(&latency, 0.999),
        latency.max() as f64 / 1000.0,
    );
    report.insert("subscribers".into(), args.subscribers.into());
    report.insert("rate".into(), args.rate.into());
    report.insert("duration_s".into(), args.duration.into());
    report.insert("published".into(), published.into());
    report.insert(
        "publish_failed".into(),
        failed.load(Ordering::Relaxed).into(),
    );
    report.insert("deliveries".into(), deliveries.into());
    report.insert("complete_subscribers".into(), complete.into());
    report.insert("incomplete_subscribers".into(), incomplete.into());
    report.insert("out_of_order".into(), out_of_order.into());
    report.insert("open_s".into(), open_took.as_secs_f64().into());
    for (name, q) in [
        ("p50_ms", 0.5),
        ("p90_ms", 0.9),
        ("p99_ms", 0.99),
        ("p999_ms", 0.999),
    ] {
        report.insert(name.into(), ms(&latency, q).into());
    }
    report.insert("max_ms".into(), (latency.max() as f64 / 1000.0).into());
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        let cpu = after - before;
        let secs = live_took.as_secs_f64();
        println!(
            "{} bridge CPU {cpu:.2} s over {secs:.1} s ({:.0} % of one core), {:.2} µs per delivery, \
             {:.2} ms/s per subscriber",
            args.label,
            100.0 * cpu / secs,
            cpu * 1e6 / deliveries.max(1) as f64,
            cpu * 1e3 / secs / args.subscribers.max(1) as f64,
        );
        report.insert("bridge_cpu_s".into(), cpu.into());
        report.insert("live_s".into(), secs.into());
        report.insert(
            "bridge_cpu_us_per_delivery".into(),
            (cpu * 1e6 / deliveries.max(1) as f64).into(),
        );
    }
    // The other processes on the same 2 cores: this client (the subscribers' reading and
    // parsing, and the publisher) and the bridge's embedded nats-server.
    let secs = live_took.as_secs_f64();
    for (who, before, after) in [
        ("client", own_cpu_before, own_cpu_after),
        ("nats_server", nats_cpu_before, nats_cpu_after),
    ] {
        if let (Some(before), Some(after)) = (before, after) {
            let cpu = after - before;
            println!(
                "{} {who} CPU {cpu:.2} s over {secs:.1} s ({:.0} % of one core), {:.2} µs per delivery",
                args.label,
                100.0 * cpu / secs,
                cpu * 1e6 / deliveries.max(1) as f64,
            );
            report.insert(format!("{who}_cpu_s"), cpu.into());
        }
    }
    if let (Some(idle), Some(connected)) = (rss_idle, rss_connected) {
        let per = (connected as f64 - idle as f64) / args.subscribers.max(1) as f64;
        println!(
            "{} bridge RSS {:.1} MiB idle, {:.1} MiB with the subscribers ({per:.1} KiB each), peak {:.1} MiB",
            args.label,
            idle as f64 / 1024.0,
            connected as f64 / 1024.0,
            rss_peak.unwrap_or(0) as f64 / 1024.0,
        );
        report.insert("bridge_rss_idle_kib".into(), idle.into());
        report.insert("bridge_rss_connected_kib".into(), connected.into());
        report.insert("bridge_rss_peak_kib".into(), rss_peak.into());
        report.insert("bridge_rss_per_subscriber_kib".into(), per.into());
    }

    // 4. The gap, replayed to one subscriber.
    if args.gap > 0 {
        // Let the closed subscribers' slots go before the gap is written.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = last_seq.load(Ordering::Relaxed);
        let gate = Arc::new(Semaphore::new(args.gap_concurrency));
        let mut writing = tokio::task::JoinSet::new();
        let gap_started = Instant::now();
        for i in 0..args.gap {
            let permit = gate.clone().acquire_owned().await.expect("gate");
            let (client, args) = (client.clone(), args.clone());
            writing.spawn(async move {
                let _permit = permit;
                publish(
                    &client,
                    &args,
                    &format!("{}-gap-{i}", args.label),
                    now_micros(),
                )
                .await
            });
        }
        let mut gap_last = 0;
        let mut gap_failed = 0;
        while let Some(seq) = writing.join_next().await {
            match seq.expect("publisher task") {
                Some(seq) => gap_last = gap_last.max(seq),
                None => gap_failed += 1,
            }
        }
        let write_took = gap_started.elapsed();
        let stored = args.gap - gap_failed;
        let asked = Instant::now();
        let mut stream = SseStream::open(&args, Some(before)).await?;
        let first_byte = asked.elapsed();
        let mut got = 0;
        let mut last_id = before;
        let mut gap_out_of_order = 0;
        while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
        {
            match frame.id {
                Some(id) if id > last_id => last_id = id,
                _ => gap_out_of_order += 1,
            }
            got += 1;
            if last_id >= gap_last {
                break;
            }
        }
        let replay = asked.elapsed();
        println!(
            "{} gap: {stored} events written in {write_took:.2?}; replayed {got} to one subscriber \
             in {:.3} s (headers after {:.1} ms), {:.0} events/s, out of order {gap_out_of_order}",
            args.label,
            replay.as_secs_f64(),
            first_byte.as_secs_f64() * 1e3,
            got as f64 / replay.as_secs_f64(),
        );
        report.insert("gap_events".into(), stored.into());
        report.insert("gap_replayed".into(), got.into());
        report.insert("gap_replay_s".into(), replay.as_secs_f64().into());
        report.insert("gap_out_of_order".into(), gap_out_of_order.into());
    }

    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        write_hgrm(&dir.join(format!("{}.hgrm", args.label)), &latency)?;
        std::fs::write(
            dir.join(format!("{}.json", args.label)),
            serde_json::to_string_pretty(&serde_json::Value::Object(report))? + "\n",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_gives_its_id_and_bench_t_and_the_end_marker_has_none() {
        let frame = parse(
            b"id: 42\ndata: {\"type\":\"bench.sse\",\"source\":\"bench\",\"data\":{\"bench_t\":1234567}}",
            9,
        )
        .unwrap();
        assert_eq!(
            (frame.id, frame.sent_at, frame.received_at),
            (Some(42), Some(1234567), 9)
        );
        let end = parse(b"id: 43\ndata: {\"data\":{\"bench_end\":true}}", 9).unwrap();
        assert_eq!((end.id, end.sent_at), (Some(43), None));
        assert!(parse(b":", 9).is_none(), "a comment is no frame");
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(digits(b"18446744073709551616"), None, "overflow");
    }

    #[test]
    fn a_chunked_body_decodes_the_same_however_the_reads_cut_it() {
        let wire = b"5\r\nid: 1\r\n19;ext=1\r\n\ndata: {\"bench_t\":7}\n\n:\n\n\r\n0\r\n\r\n";
        let whole = b"id: 1\ndata: {\"bench_t\":7}\n\n:\n\n";
        for cut in 0..wire.len() {
            let (mut chunked, mut out, mut raw) = (Chunked::default(), Vec::new(), Vec::new());
            for part in [&wire[..cut], &wire[cut..]] {
                raw.extend_from_slice(part);
                let used = chunked.decode(&raw, &mut out).unwrap();
                raw.drain(..used);
            }
            assert_eq!(out, whole, "cut at {cut}");
            assert!(chunked.ended, "cut at {cut}");
        }
    }
}
