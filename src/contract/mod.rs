//! The contract both doors share: what an agent is told when its message is refused, and the
//! mechanisms both doors apply before and around admission.
//!
//! - [`Code`]: one variant per refusal, carrying its status and default message.
//! - [`Refusal`]: the refusal every layer below the doors returns — a code, what the client may
//!   see, and the internal cause (kept for the log, never shown). The HTTP door renders it as a
//!   response (`http::error`), the NATS door as an answer on the caller's reply subject and a
//!   record on `acc.rejected.<CODE>` (`door`). Neither door imports the other.
//! - [`json_object`]: the one body check (size limit, JSON syntax, an object at the top).
//! - [`bucket::Buckets`]: the one token bucket (per-agent rates, failed authentications per
//!   address, the NATS door's rejections per caller).
//! - [`slots::AgentSlots`]: requests in flight per agent, capped (`MAX_IN_FLIGHT_PER_AGENT`).
//! - [`RefusalCounts`], [`Tally`]: refusals counted by code (and admissions), for `/health`.

pub mod bucket;
mod code;
mod counts;
mod refusal;
pub mod slots;

pub use code::Code;
pub use counts::{RefusalCounts, Tally};
pub use refusal::Refusal;

use serde_json::{Map, Value};

/// Checks a body both doors accept: at most `limit` bytes of JSON whose top level is an object.
pub fn json_object(bytes: &[u8], limit: usize) -> Result<Map<String, Value>, Refusal> {
    if bytes.len() > limit {
        return Err(Refusal::too_large(limit));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Refusal::invalid_json("the body must be a JSON object")),
        Err(err) => Err(Refusal::invalid_json(err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_json_object_within_the_limit_passes_the_body_check() {
        assert!(json_object(br#"{"a":1}"#, 100).is_ok());
        let cases: [(&[u8], Code); 4] = [
            (b"[1,2]", Code::InvalidJson),
            (b"{\"a\":", Code::InvalidJson),
            (b"\"text\"", Code::InvalidJson),
            (br#"{"a":"0123456789"}"#, Code::PayloadTooLarge),
        ];
        for (body, code) in cases {
            assert_eq!(json_object(body, 10).unwrap_err().code(), code, "{body:?}");
        }
    }
}
