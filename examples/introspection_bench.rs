//! Measures what token introspection adds to a request, in this process, without HTTP load:
//!
//! - **cached check:** `Authenticator::verify_header` of a token whose answer is cached (hash,
//!   lookup, clone of the caller), per call, p50/p99/max over many calls on 100,000 cached tokens
//!   picked at random; beside it the HS256 check of a Gate-1 JWT, measured in the same run;
//! - **uncached check:** a new token each time, introspected against a local stub server (axum on
//!   127.0.0.1 answering a fixed active answer), against the same stub called directly with a
//!   plain reqwest POST: the difference is what our client and cache add to the server's own time;
//! - **memory:** resident set growth for 100,000 cached tokens (after the tokens themselves are
//!   dropped: only the cache holds them, by their hash).
//!
//! ```sh
//! cargo run --release --example introspection_bench -- 1000000 2000
//! ```
//! (calls of the cached check, calls of the uncached one).

use std::time::{Duration, Instant};

use auto_com_center::auth::cache::CacheLimits;
use auto_com_center::auth::introspection::{ClientSecret, IntrospectionSettings};
use auto_com_center::auth::{self, AuthMode, AuthSettings, Caller, Scopes, Secret};
use auto_com_center::domain::AgentId;
use hdrhistogram::Histogram;
use rand::Rng as _;

const CACHED: usize = 100_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn opaque(i: usize) -> String {
    // 43 characters like oidc-provider's opaque tokens, unique per i.
    format!("{i:010}-bench-opaque-token-abcdefghijklmnopqrs")
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name}: n={} p50={:.3}µs p99={:.3}µs p99.9={:.3}µs max={:.3}µs",
        h.len(),
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let cached_calls: usize = args.next().map_or(Ok(1_000_000), |n| n.parse())?;
    let uncached_calls: usize = args.next().map_or(Ok(2_000), |n| n.parse())?;

    // A stub authorization server: every token is active for agent-1.
    let app = axum::Router::new().route(
        "/introspect",
        axum::routing::post(|| async {
            (
                [("content-type", "application/json")],
                r#"{"active":true,"client_id":"agent-1","aud":"auto-com-center","scope":"orchestrator.register orchestrator.events"}"#,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let stub = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{stub}/introspect");

    let secret = Secret::new("bench-secret-0123456789abcdef0123456789");
    let settings = AuthSettings {
        mode: AuthMode::Both,
        secret: Some(secret.clone()),
        introspection: Some(IntrospectionSettings {
            url: url.parse()?,
            client_id: "auto-com-center".into(),
            client_secret: ClientSecret::new("bench"),
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(3600),
            limits: CacheLimits {
                max_entries: CACHED * 2,
                negative_ttl: Duration::from_secs(5),
                max_negative: 10_000,
                stale_if_error: Duration::ZERO,
            },
        }),
        require_scopes: false,
        leeway: Duration::from_secs(5),
        max_token_bytes: 8192,
        max_lifetime: Duration::from_secs(86_400),
    };
    let authenticator = auth::Authenticator::new(&settings);
    let introspector = authenticator.introspector().expect("introspects");

    // Memory: 100,000 cached tokens, each a distinct agent with two scopes.
    let before = rss_bytes();
    for i in 0..CACHED {
        let caller = Caller::new(
            AgentId::parse(&format!("agent-{i:06}")).expect("valid id"),
            Scopes::parse("orchestrator.register orchestrator.events"),
        );
        introspector.prime(&opaque(i), caller, Duration::from_secs(3600));
    }
    let after = rss_bytes();
    println!(
        "memory: {} cached tokens, RSS +{:.1} MiB ({} bytes per token)",
        introspector.cache_len().0,
        (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0),
        after.saturating_sub(before) / CACHED as u64
    );

    // Cached check, per call, on random cached tokens (headers built before timing).
    let mut rng = rand::rng();
    let headers: Vec<String> = (0..4096)
        .map(|_| format!("Bearer {}", opaque(rng.random_range(0..CACHED))))
        .collect();
    let mut cached = Histogram::<u64>::new(3)?;
    for i in 0..cached_calls {
        let header = headers[i % headers.len()].as_bytes();
        let started = Instant::now();
        let caller = authenticator.verify_header(Some(header)).await;
        cached.record(started.elapsed().as_nanos() as u64)?;
        assert!(caller.is_ok());
    }
    report("cached introspection check", &cached);

    // The Gate-1 JWT check, same run, for scale.
    let jwt = format!(
        "Bearer {}",
        auth::mint(
            &secret,
            &AgentId::parse("agent-1").expect("valid id"),
            "",
            Duration::from_secs(3600)
        )
    );
    let mut local = Histogram::<u64>::new(3)?;
    for _ in 0..cached_calls.min(200_000) {
        let started = Instant::now();
        let caller = authenticator.verify_header(Some(jwt.as_bytes())).await;
        local.record(started.elapsed().as_nanos() as u64)?;
        assert!(caller.is_ok());
    }
    report("HS256 JWT check", &local);

    // Uncached: the stub called directly, then through the introspector with new tokens.
    let http = reqwest::Client::new();
    let mut direct = Histogram::<u64>::new(3)?;
    let mut through = Histogram::<u64>::new(3)?;
    for i in 0..uncached_calls {
        let started = Instant::now();
        let answer = http
            .post(&url)
            .basic_auth("auto-com-center", Some("bench"))
            .form(&[("token", opaque(CACHED + 2 * i).as_str())])
            .send()
            .await?
            .bytes()
            .await?;
        direct.record(started.elapsed().as_nanos() as u64)?;
        assert!(!answer.is_empty());
        let header = format!("Bearer {}", opaque(CACHED + 2 * i + 1));
        let started = Instant::now();
        let caller = authenticator.verify_header(Some(header.as_bytes())).await;
        through.record(started.elapsed().as_nanos() as u64)?;
        assert!(caller.is_ok());
    }
    report("stub server called directly", &direct);
    report("uncached introspection check", &through);
    println!(
        "uncached overhead over the server's own time: p50 {:+.3}µs p99 {:+.3}µs",
        (through.value_at_quantile(0.5) as f64 - direct.value_at_quantile(0.5) as f64) / 1000.0,
        (through.value_at_quantile(0.99) as f64 - direct.value_at_quantile(0.99) as f64) / 1000.0
    );
    Ok(())
}
