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
        ("garbage", "not-a-token".to_owned(), "INVALID_TOKEN"),
        (
            "non-base64url characters",
            "abc$.def!.ghi~".to_owned(),
            "INVALID_TOKEN",
        ),
        ("100 KB token", "a".repeat(100 * 1024), "INVALID_TOKEN"),
    ];
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
