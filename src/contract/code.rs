//! Refusal codes: one table, one line per code, with the code's wire name, its HTTP status and
//! the message a client gets unless the refusal says more.

/// Declares [`Code`] and its table. Adding a refusal is one line here plus its use.
macro_rules! codes {
    ($( $(#[$doc:meta])* $variant:ident = ($name:literal, $status:literal, $message:literal), )*) => {
        /// Why a request or a NATS message was refused. Both doors answer the same code with the
        /// same status and envelope; counters are keyed by it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code {
            $( $(#[$doc])* $variant, )*
        }

        impl Code {
            /// Every code, in declaration order (`code as usize` indexes it).
            pub const ALL: &'static [Code] = &[$(Code::$variant),*];

            /// The name on the wire, e.g. `RATE_LIMITED`.
            pub const fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $name,)* }
            }

            /// The HTTP status, also sent by the NATS door as `Acc-Status`.
            pub const fn status(self) -> u16 {
                match self { $(Code::$variant => $status,)* }
            }

            /// The message a client sees when the refusal carries none of its own.
            pub const fn default_message(self) -> &'static str {
                match self { $(Code::$variant => $message,)* }
            }
        }
    };
}

codes! {
    /// No `Authorization: Bearer …`.
    MissingToken = ("MISSING_TOKEN", 401, "Authorization header with Bearer token required"),
    /// The token does not verify; `details` says why (never the token).
    InvalidToken = ("INVALID_TOKEN", 401, "Invalid JWT token"),
    /// The token's `exp` has passed.
    TokenExpired = ("TOKEN_EXPIRED", 401, "JWT token expired"),
    /// The token speaks for another agent than the message names.
    IdentityMismatch = ("IDENTITY_MISMATCH", 403, "The token speaks for another agent"),
    /// The token lacks the scope the route needs.
    InsufficientScope = ("INSUFFICIENT_SCOPE", 403, "The token lacks the scope this route requires"),
    /// The resource belongs to another agent.
    Forbidden = ("FORBIDDEN", 403, "This resource belongs to another agent"),
    /// A field is missing, mistyped or out of range; `details` names it.
    InvalidPayload = ("INVALID_PAYLOAD", 400, "Invalid payload"),
    /// A heartbeat without `agent_id`.
    MissingAgentId = ("MISSING_AGENT_ID", 400, "agent_id is required"),
    /// The body is not JSON, or not a JSON object.
    InvalidJson = ("INVALID_JSON", 400, "Request body is not valid JSON"),
    /// The `Idempotency-Key` is empty, too long or not visible ASCII.
    InvalidIdempotencyKey = ("INVALID_IDEMPOTENCY_KEY", 400, "Idempotency-Key must be 1 to 128 visible ASCII characters"),
    /// NATS door: `Acc-Reply-To` outside the caller's own reply namespace.
    InvalidReplyTo = ("INVALID_REPLY_TO", 400, "Acc-Reply-To must be a subject under acc.reply.<your agent_id>."),
    /// A registration with `dispatch: push` over HTTP whose `base_url` starts with none of the
    /// `PUSH_ALLOWED_URLS` prefixes: the orchestrator never calls a URL an agent chose freely.
    PushUrlNotAllowed = ("PUSH_URL_NOT_ALLOWED", 400, "Push delivery to this base_url is not allowed (PUSH_ALLOWED_URLS)"),
    /// The body is over `BODY_LIMIT`, or the stored message over the bus's max payload.
    PayloadTooLarge = ("PAYLOAD_TOO_LARGE", 413, "Request body is too large"),
    /// HTTP: the body did not all arrive within `BODY_READ_TIMEOUT` of the headers.
    RequestTimeout = ("REQUEST_TIMEOUT", 408, "The request body did not arrive in time"),
    /// HTTP: the content type is not JSON.
    UnsupportedMediaType = ("UNSUPPORTED_MEDIA_TYPE", 415, "Content-Type must be application/json"),
    /// A heartbeat from an agent that never registered.
    AgentNotFound = ("AGENT_NOT_FOUND", 404, "Agent not registered"),
    /// No result stored for the task.
    TaskNotFound = ("TASK_NOT_FOUND", 404, "No result stored for this task"),
    /// A task id already submitted with another body.
    TaskIdConflict = ("TASK_ID_CONFLICT", 409, "A task with this id was submitted with another body"),
    /// A callback from an agent that does not hold the task's live attempt; nothing stored.
    StaleAttempt = ("STALE_ATTEMPT", 409, "This agent does not hold the task's live attempt"),
    /// The task already reached a terminal state.
    TaskFinished = ("TASK_FINISHED", 409, "The task has already finished"),
    /// A replay of a task that is not dead-lettered.
    TaskNotDeadLettered = ("TASK_NOT_DEAD_LETTERED", 409, "Only a dead-lettered task can be replayed"),
    /// No alert with the id.
    AlertNotFound = ("ALERT_NOT_FOUND", 404, "No alert with this id"),
    /// No silence with the id.
    SilenceNotFound = ("SILENCE_NOT_FOUND", 404, "No silence with this id"),
    /// No route (HTTP) or inbound subject (NATS) of that name.
    NotFound = ("NOT_FOUND", 404, "No such route"),
    /// HTTP: the route exists, the method does not.
    MethodNotAllowed = ("METHOD_NOT_ALLOWED", 405, "Method not allowed on this route"),
    /// The caller holds `SSE_MAX_STREAMS_PER_CALLER` open streams; sent with `Retry-After`.
    TooManyStreams = ("TOO_MANY_STREAMS", 429, "Too many open streams for this caller; close one first"),
    /// A submission for a tenant with `TASK_MAX_QUEUED_PER_TENANT` tasks queued; sent with
    /// `Retry-After`. Nothing is stored.
    QueueFull = ("QUEUE_FULL", 429, "This tenant has too many queued tasks; retry later"),
    /// Over a rate (per agent, failed authentications per address, door rejections per
    /// caller); sent with `Retry-After`.
    RateLimited = ("RATE_LIMITED", 429, "Too many requests; retry later"),
    /// The agent has stored its share of the bus (`AGENT_STORE_QUOTA` per `STREAM_MAX_AGE`);
    /// sent with `Retry-After`.
    QuotaExceeded = ("QUOTA_EXCEEDED", 429, "This agent has stored its share of the message store; retry later"),
    /// The token could not be checked: the introspection server is down, slow or answered
    /// garbage (fail closed); sent with `Retry-After`.
    AuthUnavailable = ("AUTH_UNAVAILABLE", 503, "The token cannot be checked right now; retry later"),
    /// The bus did not acknowledge in time, or a read from it failed; sent with `Retry-After`.
    BusUnavailable = ("BUS_UNAVAILABLE", 503, "The message bus is unavailable; retry later"),
    /// The stream is at its limit and refuses new messages; sent with `Retry-After`.
    StreamFull = ("STREAM_FULL", 503, "The message store is full; retry later"),
    /// Too many requests in flight: shed at once, not queued; sent with `Retry-After`.
    Overloaded = ("OVERLOADED", 503, "The server is overloaded; retry later"),
    /// A bug or a misconfigured server; the cause goes to the log only.
    Internal = ("INTERNAL_ERROR", 500, "Internal error"),
}

impl Code {
    /// True for refusals answered before admission ran: no valid token, missing scope, over a
    /// rate, a body too large or not JSON, shed. Anyone can cause these without a token, so they
    /// are counted apart and never weigh on the latency and error figures of `/health`.
    pub const fn is_before_admission(self) -> bool {
        matches!(
            self,
            Code::MissingToken
                | Code::InvalidToken
                | Code::TokenExpired
                | Code::InsufficientScope
                | Code::RateLimited
                | Code::PayloadTooLarge
                | Code::RequestTimeout
                | Code::UnsupportedMediaType
                | Code::Overloaded
        )
    }

    /// The code of a wire name (`"STALE_ATTEMPT"`), as a refusal relayed over the bus carries it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|code| code.as_str() == name)
    }

    /// True for failures on our side (5xx): the client did nothing wrong.
    pub const fn is_server_error(self) -> bool {
        self.status() >= 500
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_unique_upper_case_name_and_an_error_status() {
        let mut names = std::collections::HashSet::new();
        for (index, code) in Code::ALL.iter().enumerate() {
            assert_eq!(*code as usize, index, "ALL is in declaration order");
            let name = code.as_str();
            assert!(names.insert(name), "{name} twice");
            assert!(
                name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{name}"
            );
            assert!((400..600).contains(&code.status()), "{name}");
            assert!(!code.default_message().is_empty(), "{name}");
        }
    }

    #[test]
    fn the_api_docs_name_every_code() {
        let docs = concat!(
            include_str!("../../docs/api.md"),
            include_str!("../../docs/nats.md")
        );
        let missing: Vec<&str> = Code::ALL
            .iter()
            .map(|code| code.as_str())
            .filter(|name| !docs.contains(&format!("`{name}`")))
            .collect();
        assert!(missing.is_empty(), "docs/api.md does not name {missing:?}");
    }
}
