//! Opaque tokens from a real authorization server (oidc-provider, see [`crate::oidc`]): the
//! agent calls, revocation within the cache TTL, inactive tokens, one introspection call for
//! many requests, scopes on cached tokens, failing closed while the server is unreachable, and
//! stale-if-error for agents but never for operators.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;
use crate::oidc::{AuthServer, Gate, introspection_flags};

/// A real server, a gate in front of it, and the app introspecting through the gate.
async fn setup(extra: &[&str]) -> (NatsServer, AuthServer, Gate, TestApp) {
    let nats = NatsServer::start();
    let server = AuthServer::start();
    let gate = Gate::open(server.addr).await;
    let flags = introspection_flags(&gate, extra);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let app = TestApp::spawn_with(&nats, &flags).await;
    (nats, server, gate, app)
}

const AGENT_SCOPES: &str = "orchestrator.register orchestrator.events orchestrator.task";

#[tokio::test]
async fn an_opaque_token_registers_heartbeats_and_emits_and_once_revoked_is_refused_after_the_cache_ttl()
 {
    let (_nats, server, _gate, app) = setup(&["--introspection-cache-ttl=1s"]).await;
    let token = server.token("agent-1", AGENT_SCOPES).await;
    assert!(!token.contains('.'), "an opaque token, not a JWT");

    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token),
            &registration("agent-1"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .post(
            "/orchestrator/heartbeat",
            Some(&token),
            &json!({"agent_id": "agent-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .post(
            "/orchestrator/events",
            Some(&token),
            &event("agent-1", "evt-opaque-1"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    server.revoke(&token).await;
    let revoked_at = tokio::time::Instant::now();
    let body = eventually(
        Duration::from_secs(10),
        "the revoked token refused",
        || async {
            let (status, body) = app
                .post(
                    "/orchestrator/heartbeat",
                    Some(&token),
                    &json!({"agent_id": "agent-1"}),
                )
                .await;
            (status == StatusCode::UNAUTHORIZED).then_some(body)
        },
    )
    .await;
    assert_eq!(body["error"]["code"], "INVALID_TOKEN", "{body}");
    // Refused within the cache TTL (1 s) and a bit of slack for a busy machine.
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    app.stop().await;
}

#[tokio::test]
async fn an_inactive_or_foreign_token_is_401_invalid_token() {
    let (_nats, server, _gate, app) = setup(&[]).await;
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some("not-a-token-the-server-ever-issued"),
            &registration("agent-2"),
        )
        .await;
    assert_error(status, &body, 401, "INVALID_TOKEN");
    assert_eq!(body["error"]["details"], "token is not active", "{body}");

    // Issued by the same server for another service: its `aud` does not name us.
    let foreign = server
        .token_for("agent-2", AGENT_SCOPES, Some("urn:other:api"))
        .await;
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&foreign),
            &registration("agent-2"),
        )
        .await;
    assert_error(status, &body, 401, "INVALID_TOKEN");
    assert_eq!(body["error"]["details"], "wrong audience", "{body}");

    // `svc-x` speaks for `agent-x` (its answer's agent_id member), not for its client id.
    let named = server.token("svc-x", AGENT_SCOPES).await;
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&named),
            &registration("agent-x"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn a_thousand_concurrent_requests_with_one_new_token_make_one_introspection_call() {
    let (_nats, server, _gate, app) = setup(&["--rate-limit-per-agent=0"]).await;
    let token = server.token("reader", "orchestrator.admin.read").await;
    let before = server.introspections().await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1_000)
        .build()
        .unwrap();
    let url = app.url("/orchestrator/agents");
    let requests = (0..1_000).map(|_| {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status())
        })
    });
    let statuses = futures::future::join_all(requests).await;
    let ok = statuses
        .iter()
        .filter(|s| matches!(s, Ok(Ok(StatusCode::OK))))
        .count();
    assert_eq!(
        ok,
        1_000,
        "{:?}",
        statuses
            .iter()
            .find(|s| !matches!(s, Ok(Ok(StatusCode::OK))))
    );
    assert_eq!(server.introspections().await - before, 1);
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("acc_introspection_calls_total 1\n"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_cached_token_still_has_its_scopes_checked() {
    let (_nats, server, _gate, app) = setup(&[]).await;
    let token = server.token("agent-3", AGENT_SCOPES).await;
    // Before it is cached: the first request introspects, and is refused for its scope.
    let (status, body) = app.get("/orchestrator/agents", Some(&token)).await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("orchestrator.admin.read"),
        "{body}"
    );
    let calls = server.introspections().await;
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token),
            &registration("agent-3"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // After: answered from the cache, and still refused.
    let (status, body) = app.get("/orchestrator/agents", Some(&token)).await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
    assert_eq!(
        server.introspections().await,
        calls,
        "served from the cache"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_introspection_server_is_503_auth_unavailable_and_once_back_tokens_work_without_a_restart()
 {
    let (_nats, server, gate, app) = setup(&[]).await;
    let token = server.token("agent-4", AGENT_SCOPES).await;
    gate.close();
    let response = app
        .http
        .post(app.url("/orchestrator/register"))
        .bearer_auth(&token)
        .json(&registration("agent-4"))
        .send()
        .await
        .unwrap();
    let retry_after = response.headers().get("retry-after").cloned();
    let (status, body) = read(response).await;
    assert_error(status, &body, 503, "AUTH_UNAVAILABLE");
    assert!(retry_after.is_some(), "503 carries Retry-After");
    // Not a failed authentication: the address is not charged for it, and nothing is cached.
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("acc_introspection_errors_total 1\n"),
        "{metrics}"
    );

    gate.reopen().await;
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token),
            &registration("agent-4"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn with_stale_if_error_an_agent_token_works_through_a_10s_outage_and_an_admin_token_does_not()
{
    let (_nats, server, gate, app) = setup(&[
        "--introspection-cache-ttl=1s",
        "--introspection-stale-if-error=30s",
    ])
    .await;
    let agent = server.token("agent-5", AGENT_SCOPES).await;
    let admin = server.token("operator", "orchestrator.admin").await;
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&agent),
            &registration("agent-5"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.get("/orchestrator/agents", Some(&admin)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    gate.close();
    let outage = tokio::time::Instant::now();
    // Past the cache TTL: every answer now comes from the stale window, or not at all.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    while outage.elapsed() < Duration::from_secs(10) {
        let (status, body) = app
            .post(
                "/orchestrator/heartbeat",
                Some(&agent),
                &json!({"agent_id": "agent-5"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "agent during the outage: {body}");
        let (status, body) = app.get("/orchestrator/agents", Some(&admin)).await;
        assert_error(status, &body, 503, "AUTH_UNAVAILABLE");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let metrics = app.metrics_text().await;
    assert!(
        !metrics.contains("acc_introspection_stale_served_total 0\n"),
        "{metrics}"
    );
    gate.reopen().await;
    let (status, body) = app.get("/orchestrator/agents", Some(&admin)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn the_nats_door_resolves_opaque_tokens_the_same_way() {
    let (nats, server, _gate, app) = setup(&[]).await;
    let token = server.token("agent-6", AGENT_SCOPES).await;
    let door = NatsAgent::connect(&nats.url(), "agent-6").await;
    let body = serde_json::to_vec(&registration("agent-6")).unwrap();
    let (status, answer) = door
        .call_with(
            "acc.in.register",
            Some(&token),
            body,
            &[],
            Duration::from_secs(10),
        )
        .await
        .expect("the door answers");
    assert_eq!(status, 200, "{answer}");
    let events_only = server.token("agent-6", "orchestrator.events").await;
    let body = serde_json::to_vec(&json!({"agent_id": "agent-6"})).unwrap();
    let (status, answer) = door
        .call_with(
            "acc.in.heartbeat",
            Some(&events_only),
            body,
            &[],
            Duration::from_secs(10),
        )
        .await
        .expect("the door answers");
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["error"]["code"], "INSUFFICIENT_SCOPE");
    app.stop().await;
}
