//! Who is calling, and what it may do. Both doors call [`Authenticator::verify_header`]; the
//! result is a [`Caller`] (an agent id and its [`Scopes`]), the only identity the rest of the
//! code trusts, or an [`AuthError`].
//!
//! Two ways to verify a bearer token, chosen by [`AuthMode`]:
//! - **JWT** ([`Verifier`]): HS256 only, `aud` (a string, or an array naming us) and `exp`
//!   required, any `crit` header refused, `nbf` honoured, a small leeway, a bound on token length
//!   and on token lifetime. Header fields other than `alg` (`kid`, `jku`, `x5u`, `jwk`, `x5c`) are
//!   never acted on: the one key is the shared secret, so no file or network is read to verify.
//!   A token that verified is remembered ([`verified`]) and its time claims re-checked on each
//!   later use, so an agent's requests pay for the signature check once per token.
//! - **Introspection** ([`introspection::Introspector`]): an opaque token is sent to the
//!   authorization server (RFC 7662) and its answer cached ([`cache`]) under a hash of the token.
//!
//! Scopes are checked on every request against the caller, however it was verified (cached or
//! not): [`Caller::allows`]. The scope each route needs is in the route tables of the doors.
//!
//! It also owns what configures it: the [`Secret`] (checked once, never printed) and
//! [`AuthSettings`].

pub mod cache;
pub mod introspection;
pub mod verified;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::AgentId;

/// The shortest shared secret we accept: HS256 with fewer than 32 bytes of key is guessable.
pub const MIN_SECRET_BYTES: usize = 32;

/// The JWT audience every token must carry.
pub const AUDIENCE: &str = "auto-com-center";

/// The scope that unlocks operator routes such as `GET /orchestrator/agents`.
pub const ADMIN_SCOPE: &str = "orchestrator.admin";

/// The scope that lets a caller subscribe to the event streams.
pub const EVENTS_READ_SCOPE: &str = "orchestrator.events.read";

/// The scope that lets a client submit tasks (`POST /orchestrator/tasks`).
pub const SUBMIT_SCOPE: &str = "orchestrator.submit";

/// The scope that lets an agent claim tasks and report on them.
pub const TASK_SCOPE: &str = "orchestrator.task";

/// The scope of the agent calls `register` and `heartbeat`.
pub const REGISTER_SCOPE: &str = "orchestrator.register";

/// The scope that lets an agent emit events.
pub const EVENTS_SCOPE: &str = "orchestrator.events";

/// The scope of every operator read (admin GETs); [`ADMIN_SCOPE`] includes it.
pub const ADMIN_READ_SCOPE: &str = "orchestrator.admin.read";

/// What a Gate-1 HS256 token without a `scope` claim may do (unless `REQUIRE_SCOPES`): the agent
/// calls of Gate 1 (register, heartbeat, events) and taking tasks. Submitting tasks is not among
/// them.
pub const AGENT_SCOPES: &[&str] = &[REGISTER_SCOPE, TASK_SCOPE, EVENTS_SCOPE];

/// Every scope the service knows, in the order of [`Scopes`]' bits. A token's other scopes are
/// ignored: no route needs them.
pub const KNOWN_SCOPES: [&str; 7] = [
    REGISTER_SCOPE,
    TASK_SCOPE,
    EVENTS_SCOPE,
    EVENTS_READ_SCOPE,
    SUBMIT_SCOPE,
    ADMIN_READ_SCOPE,
    ADMIN_SCOPE,
];

/// A set of [`KNOWN_SCOPES`], one bit each: a cached caller costs one byte of scopes, and a check
/// is a mask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Scopes(u8);

impl Scopes {
    /// The known scopes named in a space-separated `scope` value; unknown names are ignored.
    pub fn parse(scope: &str) -> Self {
        Self(
            scope
                .split_whitespace()
                .fold(0, |bits, name| bits | bit(name)),
        )
    }

    /// The scopes a Gate-1 token without a `scope` claim keeps.
    pub fn agent_defaults() -> Self {
        Self::parse(&AGENT_SCOPES.join(" "))
    }

    pub fn contains(self, scope: &str) -> bool {
        let bit = bit(scope);
        bit != 0 && self.0 & bit == bit
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The scopes, by name, in [`KNOWN_SCOPES`] order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        KNOWN_SCOPES
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, name)| *name)
    }
}

fn bit(scope: &str) -> u8 {
    KNOWN_SCOPES
        .iter()
        .position(|known| *known == scope)
        .map_or(0, |i| 1 << i)
}

/// The shared secret, wrapped so that it never prints.
#[derive(Clone)]
pub struct Secret(String);

/// Why a shared secret was refused. The message never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No secret, or an empty one.
    #[error(
        "not set; export SHARED_SECRET with at least {MIN_SECRET_BYTES} random bytes (for example: openssl rand -hex 32)"
    )]
    Missing,
    /// Fewer than [`MIN_SECRET_BYTES`] bytes.
    #[error("must be at least {MIN_SECRET_BYTES} bytes, got {0}")]
    TooShort(usize),
}

impl Secret {
    /// Wraps a secret as is, unchecked (tests and tools; the service uses [`Secret::parse`]).
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// Accepts a secret of at least [`MIN_SECRET_BYTES`] bytes.
    pub fn parse(raw: &str) -> Result<Self, SecretError> {
        match raw.len() {
            0 => Err(SecretError::Missing),
            n if n < MIN_SECRET_BYTES => Err(SecretError::TooShort(n)),
            _ => Ok(Self(raw.to_owned())),
        }
    }

    /// The key bytes, for signing and verifying.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Which tokens are accepted (`AUTH_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// HS256 JWTs only, verified locally with the shared secret.
    Jwt,
    /// Opaque tokens only, introspected (RFC 7662); HS256 tokens are refused.
    Introspection,
    /// A JWT-shaped token is verified locally, any other is introspected.
    Both,
}

/// How tokens are verified.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Which tokens are accepted.
    pub mode: AuthMode,
    /// The HS256 key; `None` only in [`AuthMode::Introspection`], which needs none.
    pub secret: Option<Secret>,
    /// The authorization server; `Some` exactly when the mode introspects.
    pub introspection: Option<introspection::IntrospectionSettings>,
    /// A Gate-1 token without a `scope` claim gets no scopes (instead of [`AGENT_SCOPES`]).
    pub require_scopes: bool,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Longest accepted bearer token in bytes.
    pub max_token_bytes: usize,
    /// Longest accepted `exp − iat`.
    pub max_lifetime: Duration,
}

/// The claims we read. Unknown claims are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub agent_id: String,
    pub aud: Audience,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
}

/// The `aud` claim: one audience, or a list of them (RFC 7519 §4.1.3). The verifier requires
/// [`AUDIENCE`] to be the one, or among them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub agent_id: AgentId,
    /// What its token grants (for a Gate-1 token without a `scope` claim, the agent defaults
    /// unless `REQUIRE_SCOPES`): decided once, when the token is verified.
    scopes: Scopes,
}

impl Caller {
    pub fn new(agent_id: AgentId, scopes: Scopes) -> Self {
        Self { agent_id, scopes }
    }

    pub fn scopes(&self) -> Scopes {
        self.scopes
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }

    /// Holds [`ADMIN_SCOPE`]: every route, every write.
    pub fn is_admin(&self) -> bool {
        self.has_scope(ADMIN_SCOPE)
    }

    /// May read everything an operator reads: [`ADMIN_READ_SCOPE`] or [`ADMIN_SCOPE`].
    pub fn reads_all(&self) -> bool {
        self.is_admin() || self.has_scope(ADMIN_READ_SCOPE)
    }

    /// True when the caller may use a route that needs `scope`: it carries the scope, or it is
    /// an admin (which includes every other scope).
    pub fn allows(&self, scope: &str) -> bool {
        self.is_admin() || self.has_scope(scope)
    }

    /// The first of `scopes` the caller lacks when it holds none of them (routes open to several
    /// scopes, e.g. a task read by its agent or its submitter), else `None`.
    pub fn lacks_all(&self, scopes: &[&'static str]) -> Option<&'static str> {
        if scopes.iter().any(|s| self.allows(s)) {
            None
        } else {
            scopes.first().copied()
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header.
    #[error("Authorization header with Bearer token required")]
    Missing,
    /// The token was valid once but its `exp` has passed.
    #[error("JWT token expired")]
    Expired,
    /// Anything else: bad signature, wrong algorithm, missing claims, not yet valid, too long,
    /// or an introspected token the authorization server calls inactive.
    #[error("Invalid JWT token")]
    Invalid(String),
    /// The token could not be checked: the authorization server is down, slow or answered
    /// garbage. Fail closed: 503 with `Retry-After`, never served as valid.
    #[error("token introspection unavailable")]
    Unavailable,
}

/// Verifies bearer tokens against the shared secret.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    max_token_bytes: usize,
    /// Longest accepted `exp − iat` (and `exp − now`, so a token without `iat`, or with an `iat`
    /// in the future, cannot live longer either).
    max_lifetime_secs: u64,
    leeway_secs: u64,
    /// The scopes of a token without a `scope` claim: the agent defaults, or none when
    /// `REQUIRE_SCOPES`.
    default_scopes: Scopes,
    /// Tokens that verified, shared by the clones of this verifier.
    verified: Arc<verified::VerifiedTokens>,
}

impl Verifier {
    pub fn new(secret: &Secret, settings: &AuthSettings) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = settings.leeway.as_secs();
        Self {
            key: DecodingKey::from_secret(secret.expose()),
            validation,
            max_token_bytes: settings.max_token_bytes,
            max_lifetime_secs: settings.max_lifetime.as_secs(),
            leeway_secs: settings.leeway.as_secs(),
            default_scopes: if settings.require_scopes {
                Scopes::default()
            } else {
                Scopes::agent_defaults()
            },
            verified: Arc::new(verified::VerifiedTokens::new(verified::MAX_ENTRIES)),
        }
    }

    /// Verifies the value of an `Authorization` header (or `None` when it was absent).
    pub fn verify_header(&self, header: Option<&[u8]>) -> Result<Caller, AuthError> {
        self.verify(bearer(header, self.max_token_bytes)?)
    }

    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        self.verify_at(token, now_secs())
    }

    /// [`Verifier::verify`] with the clock at `now` for a token verified before (the first
    /// check of a token reads the clock itself).
    fn verify_at(&self, token: &str, now: u64) -> Result<Caller, AuthError> {
        if token.len() > self.max_token_bytes {
            return Err(AuthError::Invalid(format!(
                "token longer than {} bytes",
                self.max_token_bytes
            )));
        }
        if let Some(known) = self
            .verified
            .lookup(token, |verified| self.check_time(verified, now))
        {
            return known;
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                kind => AuthError::Invalid(describe(kind)),
            },
        )?;
        // RFC 7515 §4.1.11: a `crit` header lists extensions the verifier must understand; we
        // understand none, so a token that has one is refused.
        if data.header.crit.is_some() {
            return Err(AuthError::Invalid(
                "unsupported critical header extension (crit)".into(),
            ));
        }
        let claims = data.claims;
        self.check_lifetime(claims.exp, claims.iat, now)?;
        let agent_id = AgentId::parse(&claims.agent_id)
            .map_err(|e| AuthError::Invalid(format!("agent_id claim {e}")))?;
        let scopes = if claims.scope.trim().is_empty() {
            self.default_scopes
        } else {
            Scopes::parse(&claims.scope)
        };
        let caller = Caller { agent_id, scopes };
        let leeway = self.leeway_secs;
        self.verified.store(
            token,
            verified::Verified {
                caller: caller.clone(),
                exp: claims.exp,
                nbf: claims.nbf,
                iat: claims.iat,
            },
            |entry| entry.exp.saturating_add(leeway) >= now,
        );
        Ok(caller)
    }

    /// The time checks of a token verified before, as its first check made them: `exp` and
    /// `nbf` with the leeway, then the lifetime bound.
    fn check_time(&self, verified: &verified::Verified, now: u64) -> Result<(), AuthError> {
        if verified.exp.saturating_add(self.leeway_secs) < now {
            return Err(AuthError::Expired);
        }
        if verified.nbf.is_some_and(|nbf| nbf > now + self.leeway_secs) {
            return Err(AuthError::Invalid(describe(&ErrorKind::ImmatureSignature)));
        }
        self.check_lifetime(verified.exp, verified.iat, now)
    }

    /// Tokens remembered as verified (tests).
    pub fn remembered(&self) -> usize {
        self.verified.len()
    }
}

/// The token of an `Authorization: Bearer …` header value (`None`: no header), bounded.
pub fn bearer(header: Option<&[u8]>, max_token_bytes: usize) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    if header.len() > max_token_bytes + 7 {
        return Err(AuthError::Invalid(format!(
            "token longer than {max_token_bytes} bytes"
        )));
    }
    let header = std::str::from_utf8(header)
        .map_err(|_| AuthError::Invalid("authorization header is not UTF-8".into()))?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(AuthError::Missing)?
        .trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

/// True for a token of three base64url segments (`header.payload.signature`): a JWT to verify
/// locally in [`AuthMode::Both`]. Opaque tokens (RFC 6750 b64token) rarely hold two dots.
pub fn is_jwt_shaped(token: &str) -> bool {
    let mut segments = 0;
    for segment in token.split('.') {
        segments += 1;
        if segment.is_empty()
            || !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
    }
    segments == 3
}

/// Verifies bearer tokens the way [`AuthMode`] says: locally, by introspection, or either by
/// the token's shape. Cheap to clone; both doors hold one.
#[derive(Clone)]
pub struct Authenticator {
    mode: AuthMode,
    jwt: Option<Verifier>,
    introspector: Option<Arc<introspection::Introspector>>,
    max_token_bytes: usize,
}

/// How [`Authenticator::check`] settles a token.
enum Check<'a> {
    /// Verified (or refused) without waiting.
    Done(Result<Caller, AuthError>),
    /// To be asked of the authorization server.
    Introspect(&'a introspection::Introspector),
}

impl Authenticator {
    /// Builds the verifiers the mode needs. The settings were checked by the CLI: a mode that
    /// verifies JWTs has a secret, one that introspects has its server.
    pub fn new(settings: &AuthSettings) -> Self {
        let jwt = match settings.mode {
            AuthMode::Introspection => None,
            AuthMode::Jwt | AuthMode::Both => settings
                .secret
                .as_ref()
                .map(|secret| Verifier::new(secret, settings)),
        };
        let introspector = match settings.mode {
            AuthMode::Jwt => None,
            AuthMode::Introspection | AuthMode::Both => settings
                .introspection
                .as_ref()
                .map(|s| Arc::new(introspection::Introspector::new(s.clone()))),
        };
        Self {
            mode: settings.mode,
            jwt,
            introspector,
            max_token_bytes: settings.max_token_bytes,
        }
    }

    /// Verifies the value of an `Authorization` header (or `None` when it was absent).
    pub async fn verify_header(&self, header: Option<&[u8]>) -> Result<Caller, AuthError> {
        let token = bearer(header, self.max_token_bytes)?;
        self.verify(token).await
    }

    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        match self.check(token) {
            Check::Done(verdict) => verdict,
            // Boxed: the call to the authorization server makes a large future, and inline it
            // would be moved with every request's, JWTs included.
            Check::Introspect(introspector) => Box::pin(introspector.verify(token)).await,
        }
    }

    /// [`Self::verify_header`] when it needs no waiting: the verdict on a missing or malformed
    /// header and on a token verified locally (a JWT); `None` for a token to be introspected.
    /// The NATS door's intake uses it to know a message's agent the moment it arrives.
    pub fn verify_header_now(&self, header: Option<&[u8]>) -> Option<Result<Caller, AuthError>> {
        match bearer(header, self.max_token_bytes).map(|token| self.check(token)) {
            Ok(Check::Done(verdict)) => Some(verdict),
            Ok(Check::Introspect(_)) => None,
            Err(err) => Some(Err(err)),
        }
    }

    /// How `token` is checked: decided here and now, or by the authorization server.
    fn check(&self, token: &str) -> Check<'_> {
        if token.len() > self.max_token_bytes {
            return Check::Done(Err(AuthError::Invalid(format!(
                "token longer than {} bytes",
                self.max_token_bytes
            ))));
        }
        let local = match self.mode {
            AuthMode::Jwt => true,
            AuthMode::Introspection => false,
            AuthMode::Both => is_jwt_shaped(token),
        };
        match (local, &self.jwt, &self.introspector) {
            (true, Some(jwt), _) => Check::Done(jwt.verify(token)),
            (false, _, Some(introspector)) => Check::Introspect(introspector),
            _ => Check::Done(Err(AuthError::Invalid(match self.mode {
                AuthMode::Introspection => "only introspected (opaque) tokens are accepted".into(),
                _ => "this token kind is not accepted".into(),
            }))),
        }
    }

    /// The introspection figures in Prometheus text (nothing when the mode does not introspect).
    pub fn render_metrics(&self, out: &mut String) {
        if let Some(introspector) = &self.introspector {
            introspector.render_metrics(out);
        }
    }

    /// The introspection client and its cache, when the mode introspects (tests, benchmarks).
    pub fn introspector(&self) -> Option<&introspection::Introspector> {
        self.introspector.as_deref()
    }
}

impl Verifier {
    /// Refuses tokens minted to live longer than the configured maximum.
    fn check_lifetime(&self, exp: u64, iat: Option<u64>, now: u64) -> Result<(), AuthError> {
        let max = self.max_lifetime_secs;
        if let Some(iat) = iat {
            if iat > now + self.leeway_secs {
                return Err(AuthError::Invalid("iat is in the future".into()));
            }
            if exp.saturating_sub(iat) > max {
                return Err(AuthError::Invalid(format!(
                    "token lifetime (exp - iat) exceeds the maximum of {max} s"
                )));
            }
        }
        if exp.saturating_sub(now) > max + self.leeway_secs {
            return Err(AuthError::Invalid(format!(
                "token expires more than {max} s from now"
            )));
        }
        Ok(())
    }
}

/// A short, safe description of why a token failed: never the token itself.
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidSignature => "invalid signature".into(),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "algorithm not allowed: only HS256 is accepted".into()
        }
        ErrorKind::MissingRequiredClaim(claim) => format!("missing required claim {claim}"),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::ImmatureSignature => "token not yet valid (nbf)".into(),
        ErrorKind::InvalidToken => "malformed token".into(),
        ErrorKind::Base64(_) => "malformed token (base64)".into(),
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => "malformed token (claims)".into(),
        _ => "token rejected".into(),
    }
}

/// Mints a token, for `auto-com-center token`, the start-up script and tests.
pub fn mint(secret: &Secret, agent_id: &AgentId, scope: &str, ttl: Duration) -> String {
    let now = now_secs();
    let claims = Claims {
        agent_id: agent_id.as_str().to_owned(),
        aud: Audience::One(AUDIENCE.to_owned()),
        exp: now + ttl.as_secs().max(1),
        iat: Some(now),
        nbf: None,
        iss: Some("auto-com-center".to_owned()),
        scope: scope.trim().to_owned(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose()),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(leeway: u64) -> (Secret, Verifier) {
        let secret = Secret::new("a-test-secret-of-at-least-thirty-two-bytes");
        let settings = AuthSettings {
            mode: AuthMode::Jwt,
            secret: Some(secret.clone()),
            introspection: None,
            require_scopes: false,
            leeway: Duration::from_secs(leeway),
            max_token_bytes: 4096,
            max_lifetime: Duration::from_secs(3600),
        };
        let verifier = Verifier::new(&secret, &settings);
        (secret, verifier)
    }

    fn agent(name: &str) -> AgentId {
        AgentId::parse(name).unwrap()
    }

    #[test]
    fn a_verified_token_is_remembered_and_still_expires_on_time() {
        let (secret, verifier) = verifier(5);
        let token = mint(&secret, &agent("agent-1"), "", Duration::from_secs(60));
        let first = verifier.verify(&token).unwrap();
        assert_eq!(verifier.remembered(), 1);
        let now = now_secs();
        assert_eq!(verifier.verify_at(&token, now + 30).unwrap(), first);
        assert_eq!(
            verifier.verify_at(&token, now + 64).unwrap(),
            first,
            "within the leeway"
        );
        assert!(matches!(
            verifier.verify_at(&token, now + 67),
            Err(AuthError::Expired)
        ));
        assert_eq!(verifier.remembered(), 0, "an expired entry is dropped");
    }

    #[test]
    fn a_token_differing_in_one_byte_from_a_remembered_one_is_checked_in_full() {
        let (secret, verifier) = verifier(0);
        let token = mint(&secret, &agent("agent-1"), "", Duration::from_secs(60));
        verifier.verify(&token).unwrap();
        let mut forged = token.clone().into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(matches!(
            verifier.verify(&forged),
            Err(AuthError::Invalid(_))
        ));
        let other_secret = Secret::new("another-secret-of-at-least-thirty-two-bytes");
        let foreign = mint(
            &other_secret,
            &agent("agent-1"),
            "",
            Duration::from_secs(60),
        );
        assert!(matches!(
            verifier.verify(&foreign),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(
            verifier.remembered(),
            1,
            "refused tokens are not remembered"
        );
    }

    #[test]
    fn the_remembered_tokens_are_bounded_and_a_token_past_the_bound_still_verifies() {
        let tokens = verified::VerifiedTokens::new(2);
        let entry = |exp| verified::Verified {
            caller: Caller::new(agent("agent-1"), Scopes::agent_defaults()),
            exp,
            nbf: None,
            iat: None,
        };
        tokens.store("a", entry(10), |e| e.exp >= 20);
        tokens.store("b", entry(30), |e| e.exp >= 20);
        tokens.store("c", entry(30), |e| e.exp >= 20);
        assert_eq!(tokens.len(), 2, "the expired one made room");
        tokens.store("d", entry(30), |e| e.exp >= 20);
        assert_eq!(tokens.len(), 2, "full of live entries: not stored");
        assert!(tokens.lookup("d", |_| Ok(())).is_none());

        // And a verifier whose cache is full still verifies every token in full.
        let (secret, verifier) = verifier(0);
        for i in 0..3 {
            let token = mint(
                &secret,
                &agent(&format!("agent-{i}")),
                "",
                Duration::from_secs(60),
            );
            assert_eq!(
                verifier.verify(&token).unwrap().agent_id,
                agent(&format!("agent-{i}"))
            );
        }
    }
}
