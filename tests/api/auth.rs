//! The JWT attack table: every forged, malformed or out-of-date token is a 401 with the right
//! code, and a valid one is accepted.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::helpers::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({"agent_id": "agent-1", "aud": "auto-com-center", "exp": now() + 600, "iat": now()})
}

fn sign(alg: Algorithm, secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A token whose header is `header` verbatim, HMAC-SHA256-signed with `secret` whatever `alg`
/// the header names (the RS256 "public key as HMAC secret" confusion, `kid`/`jku` tricks).
fn signed_with_header(header: &Value, secret: &str, claims: &Value) -> String {
    use jsonwebtoken::crypto::sign as hmac_sign;
    let head = URL_SAFE_NO_PAD.encode(header.to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let message = format!("{head}.{payload}");
    let signature = hmac_sign(
        message.as_bytes(),
        &EncodingKey::from_secret(secret.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{message}.{signature}")
}

fn unsigned(alg: &str, claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

fn without(field: &str) -> Value {
    let mut c = claims();
    c.as_object_mut().unwrap().remove(field);
    c
}

fn with(field: &str, value: Value) -> Value {
    let mut c = claims();
    c[field] = value;
    c
}

#[tokio::test]
async fn forged_and_malformed_tokens_are_refused() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let valid = sign(Algorithm::HS256, SECRET, &claims());
    // Swap the payload for one claiming admin scope, keep the signature.
    let tampered = {
        let parts: Vec<&str> = valid.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(with("scope", json!("orchestrator.admin")).to_string());
        format!("{}.{}.{}", parts[0], forged, parts[2])
    };
    let table: Vec<(&str, String, &str)> = vec![
        ("alg none", unsigned("none", &claims()), "INVALID_TOKEN"),
        ("alg None", unsigned("None", &claims()), "INVALID_TOKEN"),
        ("alg NONE", unsigned("NONE", &claims()), "INVALID_TOKEN"),
        (
            "alg none with a valid HS256 signature",
            signed_with_header(&json!({"alg": "none", "typ": "JWT"}), SECRET, &claims()),
            "INVALID_TOKEN",
        ),
        (
            "RS256 header, HMAC with the secret as the public key",
            signed_with_header(&json!({"alg": "RS256", "typ": "JWT"}), SECRET, &claims()),
            "INVALID_TOKEN",
        ),
        (
            "ES256 header",
            signed_with_header(&json!({"alg": "ES256", "typ": "JWT"}), SECRET, &claims()),
            "INVALID_TOKEN",
        ),
        (
            "HS512",
            sign(Algorithm::HS512, SECRET, &claims()),
            "INVALID_TOKEN",
        ),
        (
            "HS384",
            sign(Algorithm::HS384, SECRET, &claims()),
            "INVALID_TOKEN",
        ),
        (
            "wrong secret",
            sign(
                Algorithm::HS256,
                "another-secret-0123456789-0123456789",
                &claims(),
            ),
            "INVALID_TOKEN",
        ),
        ("tampered payload", tampered, "INVALID_TOKEN"),
        (
            "missing exp",
            sign(Algorithm::HS256, SECRET, &without("exp")),
            "INVALID_TOKEN",
        ),
        (
            "exp as a string",
            sign(Algorithm::HS256, SECRET, &with("exp", json!("tomorrow"))),
            "INVALID_TOKEN",
        ),
        (
            "missing aud",
            sign(Algorithm::HS256, SECRET, &without("aud")),
            "INVALID_TOKEN",
        ),
        (
            "wrong aud",
            sign(
                Algorithm::HS256,
                SECRET,
                &with("aud", json!("someone-else")),
            ),
            "INVALID_TOKEN",
        ),
        (
            "missing agent_id",
            sign(Algorithm::HS256, SECRET, &without("agent_id")),
            "INVALID_TOKEN",
        ),
        (
            "agent_id with a dot",
            sign(Algorithm::HS256, SECRET, &with("agent_id", json!("a.b"))),
            "INVALID_TOKEN",
        ),
        (
            "expired",
            sign(Algorithm::HS256, SECRET, &with("exp", json!(now() - 3600))),
            "TOKEN_EXPIRED",
        ),
        (
            "nbf in the future",
            sign(Algorithm::HS256, SECRET, &with("nbf", json!(now() + 3600))),
            "INVALID_TOKEN",
        ),
        (
            "iat one hour in the future",
            sign(Algorithm::HS256, SECRET, &with("iat", json!(now() + 3600))),
            "INVALID_TOKEN",
        ),
        (
            "exp - iat above the 24 h maximum",
            sign(
                Algorithm::HS256,
                SECRET,
                &with("exp", json!(now() + 25 * 3600)),
            ),
            "INVALID_TOKEN",
        ),
        (
            "no iat, exp 25 h away",
            sign(Algorithm::HS256, SECRET, &{
                let mut c = without("iat");
                c["exp"] = json!(now() + 25 * 3600);
                c
            }),
            "INVALID_TOKEN",
        ),
        (
            "iat long ago, exp - iat of 30 h",
            sign(Algorithm::HS256, SECRET, &{
                let mut c = claims();
                c["iat"] = json!(now() - 29 * 3600);
                c["exp"] = json!(now() + 3600);
                c
            }),
            "INVALID_TOKEN",
        ),
        (
            "exp of 2^64 - 1",
            sign(Algorithm::HS256, SECRET, &with("exp", json!(u64::MAX))),
            "INVALID_TOKEN",
        ),
        (
            "exp negative",
            sign(Algorithm::HS256, SECRET, &with("exp", json!(-1))),
            "INVALID_TOKEN",
        ),
        (
            "exp as a float",
            sign(Algorithm::HS256, SECRET, &with("exp", json!(1.5e12))),
            "INVALID_TOKEN",
        ),
        (
            "aud as a list of others",
            sign(Algorithm::HS256, SECRET, &with("aud", json!(["x", "y"]))),
            "INVALID_TOKEN",
        ),
        (
            "agent_id as a number",
            sign(Algorithm::HS256, SECRET, &with("agent_id", json!(42))),
            "INVALID_TOKEN",
        ),
        (
            "claims not an object",
            signed_with_header(
                &json!({"alg": "HS256", "typ": "JWT"}),
                SECRET,
                &json!([1, 2]),
            ),
            "INVALID_TOKEN",
        ),
        (
            "two segments",
            {
                let mut parts = valid.split('.');
                format!("{}.{}", parts.next().unwrap(), parts.next().unwrap())
            },
            "INVALID_TOKEN",
        ),
        (
            "four segments",
            format!("{valid}.{}", valid.split('.').nth(2).unwrap()),
            "INVALID_TOKEN",
        ),
        (
            "empty signature",
            {
                let parts: Vec<&str> = valid.split('.').collect();
                format!("{}.{}.", parts[0], parts[1])
            },
            "INVALID_TOKEN",
        ),
        ("garbage", "not-a-token".to_owned(), "INVALID_TOKEN"),
        (
            "non-base64url characters",
            "abc$.def!.ghi~".to_owned(),
            "INVALID_TOKEN",
        ),
        ("100 KB token", "a".repeat(100 * 1024), "INVALID_TOKEN"),
        (
            "8 KiB of padding inside a signed token",
            sign(
                Algorithm::HS256,
                SECRET,
                &with("pad", json!("p".repeat(8 * 1024))),
            ),
            "INVALID_TOKEN",
        ),
    ];
    println!(
        "JWT attack table: {} forged, malformed or out-of-date tokens, each a 401",
        table.len()
    );
    for (name, token, code) in table {
        let response = app
            .http
            .post(app.url("/orchestrator/register"))
            .bearer_auth(&token)
            .json(&registration("agent-1"))
            .send()
            .await
            .unwrap();
        let (status, body) = read(response).await;
        assert_eq!(status.as_u16(), 401, "{name}: {body}");
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
        if code == "INVALID_TOKEN" {
            assert!(body["error"]["details"].is_string(), "{name}: {body}");
        }
        // Never echo the token back.
        assert!(
            !body.to_string().contains(&token[..token.len().min(40)]) || token.len() < 12,
            "{name}"
        );
    }

    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&valid),
            &registration("agent-1"),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "a valid token is accepted: {body}");
}

#[tokio::test]
async fn missing_or_non_bearer_authorization_is_missing_token() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (status, body) = app
        .post("/orchestrator/register", None, &registration("agent-1"))
        .await;
    assert_error(status, &body, 401, "MISSING_TOKEN");
    let response = app
        .http
        .post(app.url("/orchestrator/register"))
        .header("authorization", format!("Basic {}", token("agent-1")))
        .json(&registration("agent-1"))
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_error(status, &body, 401, "MISSING_TOKEN");
}

#[tokio::test]
async fn a_small_clock_skew_is_tolerated() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    // Expired two seconds ago, inside the default 5 s leeway.
    let token = sign(Algorithm::HS256, SECRET, &with("exp", json!(now() - 2)));
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token),
            &registration("agent-1"),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
}

#[tokio::test]
async fn authentication_comes_before_body_validation() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (status, body) = app
        .post("/orchestrator/events", None, &json!({"nonsense": true}))
        .await;
    assert_error(status, &body, 401, "MISSING_TOKEN");
}

/// `kid`, `jku`, `x5u`, `jwk` and `x5c` headers never point the verifier anywhere: a token signed
/// with another key is refused whatever they say, nothing is fetched from the URLs they name, and
/// a token signed with the secret is accepted with them present (they are ignored).
#[tokio::test]
async fn key_location_headers_are_ignored_and_never_fetched() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    // A listener the headers point to: it must never see a connection.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_url = format!("http://{}/keys.json", trap.local_addr().unwrap());
    let attacker = "attacker-key-0123456789-0123456789-xyz";
    let headers = [
        json!({"alg": "HS256", "typ": "JWT", "kid": "../../../../dev/null"}),
        json!({"alg": "HS256", "typ": "JWT", "kid": "/etc/passwd"}),
        json!({"alg": "HS256", "typ": "JWT", "jku": trap_url}),
        json!({"alg": "HS256", "typ": "JWT", "x5u": trap_url}),
        json!({"alg": "HS256", "typ": "JWT", "jwk": {"kty": "oct", "k": URL_SAFE_NO_PAD.encode(attacker)}}),
        json!({"alg": "HS256", "typ": "JWT", "x5c": ["MIIB"]}),
    ];
    for header in &headers {
        let forged = signed_with_header(header, attacker, &claims());
        let (status, body) = app
            .post(
                "/orchestrator/register",
                Some(&forged),
                &registration("agent-1"),
            )
            .await;
        assert_error(status, &body, 401, "INVALID_TOKEN");
        let genuine = signed_with_header(header, SECRET, &claims());
        let (status, body) = app
            .post(
                "/orchestrator/register",
                Some(&genuine),
                &registration("agent-1"),
            )
            .await;
        assert_eq!(status.as_u16(), 200, "{header}: {body}");
    }
    let fetched = tokio::time::timeout(std::time::Duration::from_millis(300), trap.accept()).await;
    assert!(
        fetched.is_err(),
        "the verifier connected to a URL named in a token header"
    );
}

#[tokio::test]
async fn the_maximum_token_lifetime_is_configurable() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--max-token-lifetime=1h"]).await;
    let two_hours = sign(Algorithm::HS256, SECRET, &with("exp", json!(now() + 7200)));
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&two_hours),
            &registration("agent-1"),
        )
        .await;
    assert_error(status, &body, 401, "INVALID_TOKEN");
    let half_hour = sign(Algorithm::HS256, SECRET, &with("exp", json!(now() + 1800)));
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&half_hour),
            &registration("agent-1"),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    // The default (24 h) accepts a 23 h token.
    let default = TestApp::spawn(&nats).await;
    let long = sign(
        Algorithm::HS256,
        SECRET,
        &with("exp", json!(now() + 23 * 3600)),
    );
    let (status, body) = default
        .post(
            "/orchestrator/register",
            Some(&long),
            &registration("agent-1"),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
}

/// Issue 13, item 11: RFC 7519 allows `aud` as an array, so one naming `auto-com-center` is
/// accepted (it used to be refused as malformed claims); RFC 7515 §4.1.11 says a `crit` header
/// naming extensions the verifier does not understand must be refused (it used to be ignored).
#[tokio::test]
async fn an_aud_array_naming_us_is_accepted_and_a_crit_header_is_refused() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let listed = sign(
        Algorithm::HS256,
        SECRET,
        &with("aud", json!(["another-service", "auto-com-center"])),
    );
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&listed),
            &registration("agent-1"),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let critical = signed_with_header(
        &json!({"alg": "HS256", "typ": "JWT", "crit": ["acc-ext"], "acc-ext": true}),
        SECRET,
        &claims(),
    );
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&critical),
            &registration("agent-1"),
        )
        .await;
    assert_error(status, &body, 401, "INVALID_TOKEN");
    assert!(
        body["error"]["details"].as_str().unwrap().contains("crit"),
        "{body}"
    );
}
