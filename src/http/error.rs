//! The one error type of the HTTP layer and its JSON envelope:
//! `{success:false, error:{code, message, details?}}`. Every variant documents its status.
//! 5xx bodies carry a generic message; the internal cause goes to the log only.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::admission::AdmissionError;
use crate::auth::AuthError;
use crate::bus::PublishFailure;
use crate::telemetry;

/// The code of a refusal, attached to its response so the limits layer can count refusals
/// without parsing bodies.
#[derive(Debug, Clone, Copy)]
pub struct RefusalCode(pub &'static str);

/// Seconds a client should wait before retrying after a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401 `MISSING_TOKEN`
    #[error("Authorization header with Bearer token required")]
    MissingToken,
    /// 401 `INVALID_TOKEN`, with the reason in `details`.
    #[error("Invalid JWT token")]
    InvalidToken(String),
    /// 401 `TOKEN_EXPIRED`
    #[error("JWT token expired")]
    TokenExpired,
    /// 403 `IDENTITY_MISMATCH`: the token speaks for another agent.
    #[error("{0}")]
    IdentityMismatch(String),
    /// 403 `INSUFFICIENT_SCOPE`
    #[error("this route requires the {0} scope")]
    InsufficientScope(&'static str),
    /// 403 `FORBIDDEN`: the resource belongs to another agent.
    #[error("{0}")]
    Forbidden(String),
    /// 400 `INVALID_PAYLOAD`
    #[error("Invalid payload")]
    InvalidPayload(String),
    /// 400 `MISSING_AGENT_ID`
    #[error("agent_id is required")]
    MissingAgentId,
    /// 400 `INVALID_JSON`: the body is not JSON, or not a JSON object.
    #[error("Request body is not valid JSON")]
    InvalidJson(String),
    /// 400 `INVALID_IDEMPOTENCY_KEY`
    #[error("Idempotency-Key must be 1 to 128 visible ASCII characters")]
    InvalidIdempotencyKey,
    /// 413 `PAYLOAD_TOO_LARGE`
    #[error("Request body is too large")]
    PayloadTooLarge(String),
    /// 415 `UNSUPPORTED_MEDIA_TYPE`
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// 404 `AGENT_NOT_FOUND`
    #[error("Agent not registered")]
    AgentNotFound,
    /// 404 `TASK_NOT_FOUND`
    #[error("No result stored for this task")]
    TaskNotFound,
    /// 404 `ALERT_NOT_FOUND`
    #[error("No alert with this id")]
    AlertNotFound,
    /// 404 `SILENCE_NOT_FOUND`
    #[error("No silence with this id")]
    SilenceNotFound,
    /// 404 `NOT_FOUND`
    #[error("No route for {0}")]
    RouteNotFound(String),
    /// 405 `METHOD_NOT_ALLOWED`
    #[error("Method not allowed on this route")]
    MethodNotAllowed,
    /// 503 `BUS_UNAVAILABLE` with `Retry-After`: the write was not acknowledged in time.
    #[error("The message bus is unavailable; retry later")]
    BusUnavailable(String),
    /// 503 `STREAM_FULL` with `Retry-After`: the stream refuses new messages.
    #[error("The message store is full; retry later")]
    StreamFull(String),
    /// 429 `RATE_LIMITED` with `Retry-After` (seconds): the agent is over its rate, or its
    /// address over its failed authentications.
    #[error("Too many requests; retry later")]
    RateLimited(u32),
    /// 503 `OVERLOADED` with `Retry-After`: too many requests in flight; shed, not queued.
    #[error("The server is overloaded; retry later")]
    Overloaded,
    /// 503 `SHUTTING_DOWN` with `Retry-After`.
    #[error("The server is shutting down")]
    ShuttingDown,
    /// 500 `INTERNAL_ERROR`
    #[error("Internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MissingToken | InvalidToken(_) | TokenExpired => StatusCode::UNAUTHORIZED,
            IdentityMismatch(_) | InsufficientScope(_) | Forbidden(_) => StatusCode::FORBIDDEN,
            InvalidPayload(_) | MissingAgentId | InvalidJson(_) | InvalidIdempotencyKey => {
                StatusCode::BAD_REQUEST
            }
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AgentNotFound | TaskNotFound | AlertNotFound | SilenceNotFound | RouteNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            BusUnavailable(_) | StreamFull(_) | Overloaded | ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingToken => "MISSING_TOKEN",
            InvalidToken(_) => "INVALID_TOKEN",
            TokenExpired => "TOKEN_EXPIRED",
            IdentityMismatch(_) => "IDENTITY_MISMATCH",
            InsufficientScope(_) => "INSUFFICIENT_SCOPE",
            Forbidden(_) => "FORBIDDEN",
            InvalidPayload(_) => "INVALID_PAYLOAD",
            MissingAgentId => "MISSING_AGENT_ID",
            InvalidJson(_) => "INVALID_JSON",
            InvalidIdempotencyKey => "INVALID_IDEMPOTENCY_KEY",
            PayloadTooLarge(_) => "PAYLOAD_TOO_LARGE",
            UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            AgentNotFound => "AGENT_NOT_FOUND",
            TaskNotFound => "TASK_NOT_FOUND",
            AlertNotFound => "ALERT_NOT_FOUND",
            SilenceNotFound => "SILENCE_NOT_FOUND",
            RouteNotFound(_) => "NOT_FOUND",
            MethodNotAllowed => "METHOD_NOT_ALLOWED",
            BusUnavailable(_) => "BUS_UNAVAILABLE",
            StreamFull(_) => "STREAM_FULL",
            RateLimited(_) => "RATE_LIMITED",
            Overloaded => "OVERLOADED",
            ShuttingDown => "SHUTTING_DOWN",
            Internal(_) => "INTERNAL_ERROR",
        }
    }

    /// The JSON envelope: `{success:false, error:{code, message, details?}}`.
    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({ "code": self.code(), "message": self.to_string() });
        if let Some(details) = self.details() {
            error["details"] = details.into();
        }
        let mut body = json!({ "success": false, "error": error });
        if let Some(trace_id) = telemetry::current_trace_id() {
            body["trace_id"] = trace_id.into();
        }
        body
    }

    /// What the client may see beyond the message. Never internal causes.
    fn details(&self) -> Option<String> {
        use ApiError::*;
        match self {
            InvalidToken(d) | InvalidPayload(d) | InvalidJson(d) | PayloadTooLarge(d) => {
                Some(d.clone())
            }
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::BusUnavailable(cause) | ApiError::StreamFull(cause) => {
                tracing::warn!(code = self.code(), cause = %cause, "request refused: bus");
            }
            ApiError::Internal(cause) => tracing::error!(cause = %cause, "internal error"),
            _ => {}
        }
        let retry_after = match &self {
            ApiError::RateLimited(secs) => Some(*secs),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_SECS),
            _ => None,
        };
        let mut response = (status, axum::Json(self.body())).into_response();
        response.extensions_mut().insert(RefusalCode(self.code()));
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Missing => ApiError::MissingToken,
            AuthError::Expired => ApiError::TokenExpired,
            AuthError::Invalid(reason) => ApiError::InvalidToken(reason),
        }
    }
}

impl From<PublishFailure> for ApiError {
    fn from(err: PublishFailure) -> Self {
        match err {
            PublishFailure::Unavailable(cause) => ApiError::BusUnavailable(cause),
            PublishFailure::StreamFull(cause) => ApiError::StreamFull(cause),
            PublishFailure::TooLarge => ApiError::PayloadTooLarge(
                "the stored message would exceed the bus's max payload".into(),
            ),
            PublishFailure::Rejected(cause) => ApiError::Internal(cause),
        }
    }
}

impl From<AdmissionError> for ApiError {
    fn from(err: AdmissionError) -> Self {
        match err {
            AdmissionError::InvalidPayload(field) => ApiError::InvalidPayload(field.to_string()),
            AdmissionError::MissingAgentId => ApiError::MissingAgentId,
            AdmissionError::InvalidIdempotencyKey => ApiError::InvalidIdempotencyKey,
            err @ AdmissionError::IdentityMismatch { .. } => {
                ApiError::IdentityMismatch(err.to_string())
            }
            AdmissionError::AgentNotFound => ApiError::AgentNotFound,
            AdmissionError::Lookup(cause) => ApiError::BusUnavailable(cause.to_string()),
            AdmissionError::Publish(failure) => failure.into(),
        }
    }
}
