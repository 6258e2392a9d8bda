//! How the HTTP door answers a [`Refusal`]: its status, the JSON envelope
//! `{success:false, error:{code, message, details?}}`, `Retry-After` for 429 and 503, and the
//! [`Code`] attached to the response so the limits layer counts refusals without reading bodies.
//! 5xx bodies carry the code's generic message; the cause goes to the log only, as a chain.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::contract::{Code, Refusal};
use crate::telemetry;

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let code = self.code();
        if code.is_server_error() {
            tracing::warn!(code = code.as_str(), error = %telemetry::error_chain(&self), "request refused on our side");
        }
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(self.body())).into_response();
        response.extensions_mut().insert(code);
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The refusal of an unknown route.
pub fn route_not_found(path: &str) -> Refusal {
    Refusal::new(Code::NotFound).with_message(format!("No route for {path}"))
}
