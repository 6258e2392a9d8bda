//! The floor the bridge is measured against: the least a handler of `POST /orchestrator/events`
//! can do and still keep the contract's promise — axum, an HS256 JWT check (audience, expiry,
//! the token's agent is the event's source), and publish-and-await-ack to a file-backed
//! JetStream stream with the event id as dedupe id. Nothing else: no registry, no limits, no
//! tracing, no schema beyond the two fields it reads.
//!
//! `load-tests/run-bench` runs it beside the bridge on a bare nats-server of the same
//! durability, so that the bridge's figures can be read as ratios against it.
//!
//! ```sh
//! SHARED_SECRET=... floor --nats-url 127.0.0.1:4222 --listen 127.0.0.1:8090
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use clap::Parser;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// NATS server; a file-backed stream FLOOR on `floor.>` is created there if missing.
    #[arg(long, default_value = "127.0.0.1:4222")]
    nats_url: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
    /// The HS256 secret tokens are signed with (the bridge's SHARED_SECRET).
    #[arg(long, env = "SHARED_SECRET", hide_env_values = true)]
    secret: String,
}

struct Floor {
    js: jetstream::Context,
    key: DecodingKey,
    validation: Validation,
}

#[derive(serde::Deserialize)]
struct Claims {
    agent_id: String,
}

#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    event_id: &'a str,
    #[serde(borrow)]
    source: &'a str,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = async_nats::connect(&args.nats_url).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_ack_inflight(65_536)
        .build(client);
    js.get_or_create_stream(stream::Config {
        name: "FLOOR".into(),
        subjects: vec!["floor.>".into()],
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&["auto-com-center"]);
    validation.set_required_spec_claims(&["exp", "aud"]);
    let floor = Arc::new(Floor {
        js,
        key: DecodingKey::from_secret(args.secret.as_bytes()),
        validation,
    });
    let app = axum::Router::new()
        .route("/orchestrator/events", post(events))
        .route("/health/ready", axum::routing::get(|| async { "ready" }))
        .with_state(floor);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn events(State(floor): State<Arc<Floor>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return refuse(StatusCode::UNAUTHORIZED, "MISSING_TOKEN");
    };
    let Ok(claims) = jsonwebtoken::decode::<Claims>(token, &floor.key, &floor.validation) else {
        return refuse(StatusCode::UNAUTHORIZED, "INVALID_TOKEN");
    };
    let Ok(event) = serde_json::from_slice::<Event>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "INVALID_PAYLOAD");
    };
    if event.source != claims.claims.agent_id {
        return refuse(StatusCode::FORBIDDEN, "FORBIDDEN");
    }
    let message = PublishMessage::build()
        .payload(body.clone())
        .message_id(event.event_id);
    let subject = format!("floor.events.{}", event.source);
    let ack = match floor.js.send_publish(subject, message).await {
        Ok(ack) => ack.await,
        Err(_) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "BUS_UNAVAILABLE"),
    };
    match ack {
        Ok(ack) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({
                "success": true,
                "event_id": event.event_id,
                "message": "Event received",
                "stream": ack.stream,
                "seq": ack.sequence,
                "duplicate": ack.duplicate,
            })
            .to_string(),
        )
            .into_response(),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "BUS_UNAVAILABLE"),
    }
}

fn refuse(status: StatusCode, code: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"success":false,"error":{{"code":"{code}"}}}}"#),
    )
        .into_response()
}
