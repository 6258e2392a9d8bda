//! The RFC 7662 client: an opaque token is POSTed (`token=…`) to `INTROSPECTION_URL` with
//! HTTP Basic client authentication (§2.1), within a bounded wait, over verified TLS when the
//! URL is `https`; the answer is cached ([`super::cache`]), one call in flight per token.
//!
//! The answer's `agent_id` member names the caller, else its `client_id`; `active: false`, an
//! `aud` without `auto-com-center`, a passed `exp`, or a caller that is not a valid agent id is a
//! 401. No answer (refused connection, timeout, a status other than 200, a body that is not an
//! introspection answer) fails closed: [`AuthError::Unavailable`], 503 with `Retry-After`. With
//! stale-if-error on, a still-valid cached answer of a non-admin caller is served instead, for
//! at most the configured window past its freshness, never past `exp`.
//!
//! Counters (`acc_introspection_*` on `/metrics`): cache hits, misses (calls made), refusals
//! served from the negative cache, errors, stale answers served.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use super::cache::{self, CacheLimits, Lookup, TokenCache, Verdict};
use super::{AUDIENCE, AuthError, Caller, Scopes, now_secs};
use crate::domain::AgentId;

/// The client secret for introspection, wrapped so that it never prints.
#[derive(Clone)]
pub struct ClientSecret(String);

impl ClientSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret(***)")
    }
}

/// How to reach the authorization server and how long to trust its answers.
#[derive(Debug, Clone)]
pub struct IntrospectionSettings {
    /// The introspection endpoint (`INTROSPECTION_URL`).
    pub url: url::Url,
    /// Our client id at the authorization server (`INTROSPECTION_CLIENT_ID`).
    pub client_id: String,
    /// Our client secret (`INTROSPECTION_CLIENT_SECRET`), never logged.
    pub client_secret: ClientSecret,
    /// Longest wait for an answer before 503 (`INTROSPECTION_TIMEOUT`).
    pub timeout: Duration,
    /// Longest a positive answer is trusted (`INTROSPECTION_CACHE_TTL`); never past `exp`. A
    /// revoked token keeps working for up to this long.
    pub cache_ttl: Duration,
    /// The cache's bounds and stale-if-error window.
    pub limits: CacheLimits,
}

/// The members of an introspection answer we read (RFC 7662 §2.2); others are ignored.
#[derive(Debug, Deserialize)]
struct Answer {
    active: bool,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    aud: Option<super::Audience>,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    negative_hits: AtomicU64,
    errors: AtomicU64,
    stale: AtomicU64,
    calls: AtomicU64,
}

/// The introspection client and its cache.
pub struct Introspector {
    http: reqwest::Client,
    settings: IntrospectionSettings,
    cache: TokenCache,
    counters: Counters,
}

impl Introspector {
    pub fn new(settings: IntrospectionSettings) -> Self {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // An authorization server answers itself: a redirect is not followed with our
            // credentials.
            .redirect(reqwest::redirect::Policy::none())
            .https_only(settings.url.scheme() == "https")
            .build()
            .expect("the HTTP client builds with these options");
        Self {
            http,
            cache: TokenCache::new(settings.limits),
            settings,
            counters: Counters::default(),
        }
    }

    /// The caller an opaque token stands for: from the cache when fresh, else from one call
    /// shared by every request carrying the token.
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let key = cache::key(token);
        let now = Instant::now();
        let stale = match self.cache.lookup(&key, now) {
            Lookup::Fresh(caller) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(caller);
            }
            Lookup::Refused(err) => {
                self.counters.negative_hits.fetch_add(1, Ordering::Relaxed);
                return Err(err);
            }
            Lookup::Miss { stale } => stale,
        };
        let flight = match self.cache.flight(&key, now) {
            Ok(flight) => flight,
            Err(Lookup::Fresh(caller)) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(caller);
            }
            Err(Lookup::Refused(err)) => {
                self.counters.negative_hits.fetch_add(1, Ordering::Relaxed);
                return Err(err);
            }
            Err(Lookup::Miss { .. }) => unreachable!("a miss starts a flight"),
        };
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let verdict = flight
            .get_or_init(|| async {
                self.counters.calls.fetch_add(1, Ordering::Relaxed);
                self.introspect(token).await
            })
            .await
            .clone();
        self.cache.land(&key, &flight, Instant::now());
        match verdict {
            Verdict::Active { caller, .. } => Ok(caller),
            Verdict::Refused(err) => Err(err),
            Verdict::Unavailable => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                match stale {
                    Some(caller) => {
                        self.counters.stale.fetch_add(1, Ordering::Relaxed);
                        Ok(caller)
                    }
                    None => Err(AuthError::Unavailable),
                }
            }
        }
    }

    /// One call to the authorization server.
    async fn introspect(&self, token: &str) -> Verdict {
        let sent = self
            .http
            .post(self.settings.url.clone())
            .basic_auth(
                &self.settings.client_id,
                Some(&self.settings.client_secret.0),
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[("token", token), ("token_type_hint", "access_token")])
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(err) => {
                // The error names the URL, never the form (which holds the token).
                tracing::warn!(error = %err.without_url(), "token introspection failed");
                return Verdict::Unavailable;
            }
        };
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            tracing::warn!(
                status = status.as_u16(),
                "token introspection answered other than 200"
            );
            return Verdict::Unavailable;
        }
        match response.bytes().await {
            Ok(body) => self.judge(&body, now_secs(), Instant::now()),
            Err(err) => {
                tracing::warn!(error = %err.without_url(), "token introspection answer unreadable");
                Verdict::Unavailable
            }
        }
    }

    /// What an answer body comes to, at `now` (seconds since the epoch) and `instant`.
    fn judge(&self, body: &[u8], now: u64, instant: Instant) -> Verdict {
        let answer: Answer = match serde_json::from_slice(body) {
            Ok(answer) => answer,
            Err(_) => {
                tracing::warn!("token introspection answer is not an introspection response");
                return Verdict::Unavailable;
            }
        };
        judge(answer, self.settings.cache_ttl, now, instant)
    }

    /// The figures in Prometheus text.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let c = &self.counters;
        let (positive, negative, _) = self.cache.len();
        for (name, help, value) in [
            (
                "acc_introspection_cache_hits_total",
                "Requests whose opaque token was answered from the introspection cache.",
                c.hits.load(Ordering::Relaxed),
            ),
            (
                "acc_introspection_cache_misses_total",
                "Requests whose opaque token was not in the cache (they waited on a call).",
                c.misses.load(Ordering::Relaxed),
            ),
            (
                "acc_introspection_negative_hits_total",
                "Requests refused from the negative cache (a token recently found inactive).",
                c.negative_hits.load(Ordering::Relaxed),
            ),
            (
                "acc_introspection_calls_total",
                "Calls made to the introspection endpoint.",
                c.calls.load(Ordering::Relaxed),
            ),
            (
                "acc_introspection_errors_total",
                "Requests for which the authorization server gave no usable answer.",
                c.errors.load(Ordering::Relaxed),
            ),
            (
                "acc_introspection_stale_served_total",
                "Requests served from a stale cached answer during an outage (stale-if-error).",
                c.stale.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        for (name, help, value) in [
            (
                "acc_introspection_cache_entries",
                "Active tokens held in the introspection cache.",
                positive,
            ),
            (
                "acc_introspection_negative_entries",
                "Refused tokens held in the negative cache.",
                negative,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
    }

    /// Entries held: (positive, negative, in flight).
    pub fn cache_len(&self) -> (usize, usize, usize) {
        self.cache.len()
    }

    /// Stores an answer as if the server had given it (benchmarks of the cached path).
    #[doc(hidden)]
    pub fn prime(&self, token: &str, caller: Caller, ttl: Duration) {
        let now = Instant::now();
        let verdict = Verdict::Active {
            caller,
            fresh_until: now + ttl,
            expires: None,
        };
        self.cache.store(cache::key(token), &verdict, now);
    }
}

/// What an introspection answer comes to: the rules of DESIGN §6.3.
fn judge(answer: Answer, cache_ttl: Duration, now: u64, instant: Instant) -> Verdict {
    let refuse = |why: &str| Verdict::Refused(AuthError::Invalid(why.to_owned()));
    if !answer.active {
        return refuse("token is not active");
    }
    if let Some(aud) = &answer.aud {
        let ours = match aud {
            super::Audience::One(one) => one == AUDIENCE,
            super::Audience::Many(many) => many.iter().any(|a| a == AUDIENCE),
        };
        if !ours {
            return refuse("wrong audience");
        }
    }
    if answer.nbf.is_some_and(|nbf| nbf > now) {
        return refuse("token not yet valid (nbf)");
    }
    let left = match answer.exp {
        Some(exp) if exp <= now => return Verdict::Refused(AuthError::Expired),
        Some(exp) => Some(Duration::from_secs(exp - now)),
        None => None,
    };
    let Some(name) = answer.agent_id.or(answer.client_id) else {
        return refuse("the answer names no agent_id and no client_id");
    };
    let agent_id = match AgentId::parse(&name) {
        Ok(id) => id,
        Err(e) => return refuse(&format!("caller id {e}")),
    };
    let scopes = Scopes::parse(answer.scope.as_deref().unwrap_or(""));
    let fresh_for = left.map_or(cache_ttl, |left| left.min(cache_ttl));
    Verdict::Active {
        caller: Caller::new(agent_id, scopes),
        fresh_until: instant + fresh_for,
        expires: left.map(|left| instant + left),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(body: &str) -> Verdict {
        let answer: Answer = serde_json::from_str(body).unwrap();
        judge(answer, Duration::from_secs(60), 1_000, Instant::now())
    }

    fn refused(body: &str) -> String {
        match verdict(body) {
            Verdict::Refused(AuthError::Invalid(why)) => why,
            Verdict::Refused(AuthError::Expired) => "expired".into(),
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn the_caller_is_agent_id_else_client_id_with_its_scopes() {
        let Verdict::Active { caller, .. } = verdict(
            r#"{"active":true,"client_id":"svc","agent_id":"agent-7","scope":"orchestrator.task x"}"#,
        ) else {
            panic!()
        };
        assert_eq!(caller.agent_id.as_str(), "agent-7");
        assert!(caller.has_scope("orchestrator.task"));
        assert!(!caller.has_scope("orchestrator.register"));
        let Verdict::Active { caller, .. } = verdict(r#"{"active":true,"client_id":"agent-1"}"#)
        else {
            panic!()
        };
        assert_eq!(caller.agent_id.as_str(), "agent-1");
        assert!(caller.scopes().is_empty(), "no scope claim: no scopes");
    }

    #[test]
    fn inactive_foreign_audience_expired_and_unnamed_tokens_are_refused() {
        assert_eq!(refused(r#"{"active":false}"#), "token is not active");
        assert_eq!(
            refused(r#"{"active":true,"client_id":"a","aud":"other"}"#),
            "wrong audience"
        );
        assert_eq!(
            refused(r#"{"active":true,"client_id":"a","aud":["x","y"]}"#),
            "wrong audience"
        );
        assert!(matches!(
            verdict(r#"{"active":true,"client_id":"a","aud":["x","auto-com-center"]}"#),
            Verdict::Active { .. }
        ));
        assert_eq!(
            refused(r#"{"active":true,"client_id":"a","exp":999}"#),
            "expired"
        );
        assert!(refused(r#"{"active":true}"#).contains("no agent_id"));
        assert!(refused(r#"{"active":true,"client_id":"a b"}"#).contains("caller id"));
        assert!(refused(r#"{"active":true,"client_id":"a","nbf":2000}"#).contains("nbf"));
    }

    #[test]
    fn freshness_is_the_cache_ttl_or_the_time_to_exp_whichever_is_shorter() {
        let at = Instant::now();
        let answer: Answer =
            serde_json::from_str(r#"{"active":true,"client_id":"a","exp":1010}"#).unwrap();
        let Verdict::Active {
            fresh_until,
            expires,
            ..
        } = judge(answer, Duration::from_secs(60), 1_000, at)
        else {
            panic!()
        };
        assert_eq!(fresh_until, at + Duration::from_secs(10));
        assert_eq!(expires, Some(at + Duration::from_secs(10)));
        let answer: Answer =
            serde_json::from_str(r#"{"active":true,"client_id":"a","exp":5000}"#).unwrap();
        let Verdict::Active { fresh_until, .. } = judge(answer, Duration::from_secs(60), 1_000, at)
        else {
            panic!()
        };
        assert_eq!(fresh_until, at + Duration::from_secs(60));
    }

    #[test]
    fn the_client_secret_never_prints() {
        let secret = ClientSecret::new("hunter2-hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
