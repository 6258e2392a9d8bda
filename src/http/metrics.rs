//! `GET /metrics`: Prometheus text, no authentication (scrapers rarely carry tokens; the
//! figures are operational, not agent data — restrict the port at the network if needed).
//! Cheap: one lock per endpoint, a few `/proc` reads.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::{AppState, routes};
use crate::metrics::{process, prometheus};

pub fn router() -> Router<AppState> {
    Router::new().route(routes::METRICS.path, get(metrics))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let fleet = state.fleet.latest();
    let tasks = state.task_figures.latest();
    let mut text = prometheus::render(&prometheus::Exposition {
        stats: &state.stats,
        fleet: fleet.as_deref(),
        tasks: tasks.as_ref(),
        process: process::read(),
        door: state.door.as_deref(),
        agent_ids: state.metrics_agent_ids,
    });
    state.verifier.render_metrics(&mut text);
    ([(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)], text)
}
