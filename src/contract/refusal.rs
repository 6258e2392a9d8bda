//! [`Refusal`]: a [`Code`], what the client may see, and the cause (for the log only).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde_json::{Value, json};

use super::Code;
use crate::auth::AuthError;
use crate::bus::PublishFailure;
use crate::directory::LookupError;
use crate::domain::FieldError;
use crate::telemetry;

use crate::telemetry::Cause;

/// Seconds a client is told to wait (`Retry-After`) after a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

/// A refusal, whichever door it is answered through.
///
/// What a client sees is the code, the message and the details; the cause is kept as the
/// error's [`source`](std::error::Error::source) so logs print the whole chain, and 5xx answers
/// never show it.
#[derive(Debug, Clone)]
pub struct Refusal {
    code: Code,
    message: Option<Cow<'static, str>>,
    details: Option<String>,
    retry_after: Option<u32>,
    cause: Option<Cause>,
}

impl Refusal {
    /// A refusal with the code's default message.
    pub fn new(code: Code) -> Self {
        Self {
            code,
            message: None,
            details: None,
            retry_after: None,
            cause: None,
        }
    }

    /// Replaces the default message (e.g. naming the agents of an identity mismatch).
    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// What the client may learn beyond the message: the field, the limit, the reason.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }

    /// The internal cause: logged, never sent.
    pub fn with_cause(
        mut self,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.cause = Some(Arc::from(cause.into()));
        self
    }

    /// Tells the client to come back after `secs` seconds (`Retry-After`).
    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// 400 `INVALID_PAYLOAD` with `details`.
    pub fn invalid_payload(details: impl Into<String>) -> Self {
        Self::new(Code::InvalidPayload).with_details(details)
    }

    /// 400 `INVALID_JSON` with `details`.
    pub fn invalid_json(details: impl Into<String>) -> Self {
        Self::new(Code::InvalidJson).with_details(details)
    }

    /// 413 `PAYLOAD_TOO_LARGE` naming the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(Code::PayloadTooLarge).with_details(format!("the limit is {limit} bytes"))
    }

    /// 429 `RATE_LIMITED`, to come back after `secs` seconds.
    pub fn rate_limited(secs: u32) -> Self {
        Self {
            retry_after: Some(secs.max(1)),
            ..Self::new(Code::RateLimited)
        }
    }

    /// 403 `INSUFFICIENT_SCOPE` naming the scope.
    pub fn insufficient_scope(scope: &'static str) -> Self {
        Self::new(Code::InsufficientScope)
            .with_message(format!("this route requires the {scope} scope"))
    }

    /// 503 `BUS_UNAVAILABLE` caused by `cause`.
    pub fn bus_unavailable(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(Code::BusUnavailable).with_cause(cause)
    }

    /// 500 `INTERNAL_ERROR` caused by `cause`.
    pub fn internal(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(Code::Internal).with_cause(cause)
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    pub fn message(&self) -> &str {
        self.message
            .as_deref()
            .unwrap_or(self.code.default_message())
    }

    pub fn details(&self) -> Option<&str> {
        self.details.as_deref()
    }

    /// Seconds the client should wait before retrying: the limiter's figure for 429, one second
    /// for every 503, none otherwise.
    pub fn retry_after(&self) -> Option<u32> {
        self.retry_after
            .or((self.code.status() == 503).then_some(RETRY_AFTER_SECS))
    }

    /// The JSON envelope: `{success:false, error:{code, message, details?}, trace_id?}`.
    pub fn body(&self) -> Value {
        let mut error = json!({ "code": self.code.as_str(), "message": self.message() });
        if let Some(details) = &self.details {
            error["details"] = details.as_str().into();
        }
        telemetry::with_trace_id(json!({ "success": false, "error": error }))
    }

    /// The message and the details in one line, as the door keeps it with a rejected message.
    pub fn reason(&self) -> String {
        match &self.details {
            Some(details) => format!("{}: {details}", self.message()),
            None => self.message().to_owned(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason(), self.code)
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|cause| cause as &(dyn std::error::Error + 'static))
    }
}

impl From<FieldError> for Refusal {
    fn from(err: FieldError) -> Self {
        Self::invalid_payload(err.to_string())
    }
}

impl From<AuthError> for Refusal {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Missing => Self::new(Code::MissingToken),
            AuthError::Expired => Self::new(Code::TokenExpired),
            AuthError::Invalid(reason) => Self::new(Code::InvalidToken).with_details(reason),
            AuthError::Unavailable => Self::new(Code::AuthUnavailable),
        }
    }
}

impl From<PublishFailure> for Refusal {
    fn from(err: PublishFailure) -> Self {
        let code = match &err {
            PublishFailure::Unavailable { .. } => Code::BusUnavailable,
            PublishFailure::StreamFull(_) => Code::StreamFull,
            PublishFailure::TooLarge => {
                return Self::new(Code::PayloadTooLarge)
                    .with_details("the stored message would exceed the bus's max payload");
            }
            // Only a conditional write gets it, and its caller decides first (admission's
            // first report); one that reaches a client is a bug.
            PublishFailure::Conflict(_) | PublishFailure::Rejected(_) => Code::Internal,
        };
        Self::new(code).with_cause(err)
    }
}

impl From<LookupError> for Refusal {
    fn from(err: LookupError) -> Self {
        Self::bus_unavailable(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_side_refusal_keeps_its_cause_for_the_log_and_out_of_the_body() {
        let cause = std::io::Error::other("disk on fire at 10.0.0.7");
        let refusal = Refusal::internal(cause);
        assert_eq!(refusal.status(), 500);
        let body = refusal.body().to_string();
        assert!(!body.contains("disk on fire"), "{body}");
        let source = std::error::Error::source(&refusal).expect("the cause is kept");
        assert!(source.to_string().contains("disk on fire"));
    }

    #[test]
    fn retry_after_is_sent_with_429_and_503_only() {
        assert_eq!(Refusal::rate_limited(3).retry_after(), Some(3));
        assert_eq!(
            Refusal::new(Code::Overloaded).retry_after(),
            Some(RETRY_AFTER_SECS)
        );
        assert_eq!(Refusal::invalid_payload("x").retry_after(), None);
    }

    #[test]
    fn the_envelope_carries_code_message_and_details() {
        let body = Refusal::invalid_payload("name: is required").body();
        assert_eq!(body["success"], false);
        assert_eq!(body["error"]["code"], "INVALID_PAYLOAD");
        assert_eq!(body["error"]["message"], "Invalid payload");
        assert_eq!(body["error"]["details"], "name: is required");
        let body = Refusal::new(Code::AgentNotFound).body();
        assert!(body["error"].get("details").is_none(), "{body}");
    }
}
