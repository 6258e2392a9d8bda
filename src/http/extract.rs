//! Extractors that refuse bad requests with the JSON envelope, never axum's plain-text bodies:
//! [`Authenticated`] (the bearer token, the per-address limit on failed authentications and the
//! per-agent rate limit) and [`JsonObject`] (content type, size limit, syntax).

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::{HeaderMap, header, request::Parts};
use serde_json::{Map, Value};

use super::server::BodyDeadline;
use super::{AppState, routes};
use crate::auth::{ADMIN_SCOPE, AuthError, Caller};
use crate::contract::{self, Code, Refusal};

/// The verified caller of this request, within its rate, holding the scope its route needs
/// (`routes::Access`; else 403 `INSUFFICIENT_SCOPE` naming the scope).
///
/// A token that verifies is served whatever its address did: a valid agent behind a shared NAT
/// is never locked out by someone else's bad tokens. A token that does not verify is refused 429
/// when its address has used up its failed authentications (so a guesser learns nothing more),
/// else 401, counted against the address. A request without a token at all does not count as a
/// failure, nor does a token that could not be checked (503 `AUTH_UNAVAILABLE`). A verified
/// agent over its rate, or holding all its slots in flight (`MAX_IN_FLIGHT_PER_AGENT`), is
/// refused (429).
pub struct Authenticated(pub Caller);

/// The outcome of verifying this request's `Authorization` header, when it was verified before
/// the extractor ran (see `observe`), so that a request's token is verified once.
#[derive(Clone)]
pub struct Verified(pub Result<Caller, AuthError>);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Refusal> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        // `observe` may have verified the header already; the result is taken, not recomputed.
        let verified = match parts.extensions.remove::<Verified>() {
            Some(Verified(verified)) => verified,
            None => state.verifier.verify_header(header).await,
        };
        let caller = match verified {
            Ok(caller) => caller,
            Err(err @ (AuthError::Missing | AuthError::Unavailable)) => return Err(err.into()),
            Err(err) => {
                if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
                    state.limits.auth_blocked(peer.ip())?;
                    state.limits.auth_failed(peer.ip());
                }
                return Err(err.into());
            }
        };
        state.limits.admit_agent(caller.agent_id.as_str())?;
        // One of the agent's slots for the rest of the request (`observe` may hold it already).
        if let Some(slot) = parts.extensions.get::<super::limits::SlotCell>() {
            slot.hold(&state.limits, caller.agent_id.as_str())?;
        }
        // The route's scope, on every request: a cached token is checked like a fresh one.
        let path = parts
            .extensions
            .get::<MatchedPath>()
            .map(MatchedPath::as_str);
        let access = path.map_or(routes::Access::AnyOf(&[ADMIN_SCOPE]), |path| {
            routes::access_of(&parts.method, path)
        });
        if let Some(scope) = access.missing(&caller) {
            return Err(Refusal::insufficient_scope(scope));
        }
        Ok(Self(caller))
    }
}

/// A JSON object body: `Content-Type: application/json`, at most `BODY_LIMIT` bytes.
pub struct JsonObject(pub Map<String, Value>);

/// The body of this request as a JSON object, when `observe` parsed it already (for its
/// `trace_id`): [`JsonObject`] takes it instead of parsing the bytes a second time.
#[derive(Clone)]
pub struct Parsed(pub Map<String, Value>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = Refusal;

    async fn from_request(mut req: Request, state: &AppState) -> Result<Self, Refusal> {
        if !is_json(req.headers()) {
            return Err(Refusal::new(Code::UnsupportedMediaType));
        }
        let limit = state.body_limit;
        declared_within(req.headers(), limit)?;
        if let Some(Parsed(object)) = req.extensions_mut().remove::<Parsed>() {
            return Ok(Self(object));
        }
        let deadline = req.extensions().get::<BodyDeadline>().copied();
        let bytes = read_body(req.into_body(), limit, deadline).await?;
        contract::json_object(&bytes, limit).map(Self)
    }
}

/// 413 when the declared `Content-Length` is over `limit`: checked before anything else, so an
/// oversized body (or an `Expect: 100-continue` for one) is refused without a byte of it read.
pub(super) fn declared_within(headers: &HeaderMap, limit: usize) -> Result<(), Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Refusal::too_large(limit));
    }
    Ok(())
}

/// Reads a body of at most `limit` bytes: 413 past it, 400 `INVALID_JSON` when it cannot be read,
/// 408 `REQUEST_TIMEOUT` when it has not all arrived by `deadline` (set by the server loop).
pub(super) async fn read_body(
    body: Body,
    limit: usize,
    deadline: Option<BodyDeadline>,
) -> Result<axum::body::Bytes, Refusal> {
    let read = axum::body::to_bytes(body, limit);
    let read = match deadline {
        Some(BodyDeadline(deadline)) => tokio::time::timeout_at(deadline, read)
            .await
            .map_err(|_| Refusal::new(Code::RequestTimeout))?,
        None => read.await,
    };
    read.map_err(|err| {
        if is_length_limit(&err) {
            Refusal::too_large(limit)
        } else {
            Refusal::invalid_json(format!("could not read the body: {err}"))
        }
    })
}

fn is_length_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    // Compared without case and without a lowercased copy: every body-carrying request asks.
    let essence = value.split(';').next().unwrap_or("").trim().as_bytes();
    let ends_with = |suffix: &[u8]| {
        essence.len() >= suffix.len()
            && essence[essence.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
    };
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() >= b"application/".len()
            && essence[..b"application/".len()].eq_ignore_ascii_case(b"application/")
            && ends_with(b"+json"))
}

/// The optional `Idempotency-Key` header. A header that is not text is passed on as an empty
/// key so admission refuses it with `INVALID_IDEMPOTENCY_KEY`.
pub fn idempotency_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check before it, which lowercased a copy of the value.
    fn lowercased(value: &str) -> bool {
        let essence = value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"))
    }

    #[test]
    fn json_media_types_are_told_apart_without_case_as_before() {
        for value in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "  application/json  ;",
            "application/problem+json",
            "APPLICATION/VND.API+JSON",
            "application/+json",
            "application+json",
            "application/jsonx",
            "text/json",
            "application/",
            "json",
            "",
            "é/json",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            assert_eq!(is_json(&headers), lowercased(value), "{value:?}");
        }
    }
}
