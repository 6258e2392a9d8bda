//! JWT verification and minting: HS256 only, `aud` (a string, or an array naming us) and `exp`
//! required, any `crit` header refused, `nbf` honoured, a small
//! leeway, a bound on token length and on token lifetime. Header fields other than `alg` (`kid`,
//! `jku`, `x5u`, `jwk`, `x5c`) are never acted on: the one key is the shared secret, so no file
//! or network is ever read to verify a token. Both doors call [`Verifier::verify`]; the result is a
//! [`Caller`], the only identity the rest of the code trusts.
//!
//! It also owns what configures it: the [`Secret`] (checked once, never printed) and
//! [`AuthSettings`].

use std::fmt;
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

/// What a token without a `scope` claim may do: the agent calls of Gate 1 (register,
/// heartbeat, events) and taking tasks. Submitting tasks is not among them.
pub const AGENT_SCOPES: &[&str] = &["orchestrator.register", TASK_SCOPE, "orchestrator.events"];

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

/// How tokens are verified.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The HS256 key.
    pub secret: Secret,
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
    scopes: Vec<String>,
}

impl Caller {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    pub fn is_admin(&self) -> bool {
        self.has_scope(ADMIN_SCOPE)
    }

    /// True when the caller may use a route that needs `scope`: it carries the scope, it is an
    /// admin, or its token has no scope claim at all and `scope` is one of [`AGENT_SCOPES`].
    pub fn allows(&self, scope: &str) -> bool {
        self.is_admin()
            || self.has_scope(scope)
            || (self.scopes.is_empty() && AGENT_SCOPES.contains(&scope))
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
    /// Anything else: bad signature, wrong algorithm, missing claims, not yet valid, too long.
    #[error("Invalid JWT token")]
    Invalid(String),
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
}

impl Verifier {
    pub fn new(settings: &AuthSettings) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = settings.leeway.as_secs();
        Self {
            key: DecodingKey::from_secret(settings.secret.expose()),
            validation,
            max_token_bytes: settings.max_token_bytes,
            max_lifetime_secs: settings.max_lifetime.as_secs(),
            leeway_secs: settings.leeway.as_secs(),
        }
    }

    /// Verifies the value of an `Authorization` header (or `None` when it was absent).
    pub fn verify_header(&self, header: Option<&[u8]>) -> Result<Caller, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        if header.len() > self.max_token_bytes + 7 {
            return Err(AuthError::Invalid(format!(
                "token longer than {} bytes",
                self.max_token_bytes
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
        self.verify(token)
    }

    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        if token.len() > self.max_token_bytes {
            return Err(AuthError::Invalid(format!(
                "token longer than {} bytes",
                self.max_token_bytes
            )));
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
        self.check_lifetime(&claims, now_secs())?;
        let agent_id = AgentId::parse(&claims.agent_id)
            .map_err(|e| AuthError::Invalid(format!("agent_id claim {e}")))?;
        Ok(Caller {
            agent_id,
            scopes: claims.scope.split_whitespace().map(str::to_owned).collect(),
        })
    }
}

impl Verifier {
    /// Refuses tokens minted to live longer than the configured maximum.
    fn check_lifetime(&self, claims: &Claims, now: u64) -> Result<(), AuthError> {
        let max = self.max_lifetime_secs;
        if let Some(iat) = claims.iat {
            if iat > now + self.leeway_secs {
                return Err(AuthError::Invalid("iat is in the future".into()));
            }
            if claims.exp.saturating_sub(iat) > max {
                return Err(AuthError::Invalid(format!(
                    "token lifetime (exp - iat) exceeds the maximum of {max} s"
                )));
            }
        }
        if claims.exp.saturating_sub(now) > max + self.leeway_secs {
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

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
