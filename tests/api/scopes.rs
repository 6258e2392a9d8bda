//! Every route × {no scope, a wrong scope, the right scope}, for both doors, driven by the route
//! tables themselves (`http::routes::ALL`, `door::scopes_of`): a new route is covered without
//! editing this file.

use std::time::Duration;

use auto_com_center::auth::{self, ADMIN_SCOPE, KNOWN_SCOPES};
use auto_com_center::domain::AgentId;
use auto_com_center::door;
use auto_com_center::http::routes::{self, Access};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

const AGENT: &str = "scope-tester";

fn token_with(scope: &str) -> String {
    auth::mint(
        &secret(),
        &AgentId::parse(AGENT).unwrap(),
        scope,
        Duration::from_secs(3600),
    )
}

/// The three tokens of a route: none of the known scopes, a known scope that is not enough, and
/// the first scope the route names.
fn cases(needs: &[&'static str]) -> [(&'static str, String, bool); 3] {
    let wrong = KNOWN_SCOPES
        .iter()
        .find(|s| !needs.contains(s) && **s != ADMIN_SCOPE)
        .expect("a scope the route does not take");
    [
        ("no scope", token_with("unrelated.scope"), false),
        ("wrong scope", token_with(wrong), false),
        ("right scope", token_with(needs[0]), true),
    ]
}

fn concrete(path: &str) -> String {
    path.replace("{task_id}", "t-scope-1").replace("{id}", "x1")
}

#[tokio::test]
async fn every_http_route_refuses_a_missing_or_wrong_scope_and_admits_the_right_one() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for route in routes::ALL.iter() {
        let url = app.url(&concrete(route.path));
        let method = Method::from_bytes(route.method.as_str().as_bytes()).unwrap();
        let request = |token: Option<&str>| {
            let mut request = http.request(method.clone(), &url);
            if method != Method::GET {
                request = request.json(&json!({}));
            }
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request
        };
        match route.access {
            Access::Public => {
                let response = request(None).send().await.unwrap();
                assert_ne!(
                    response.status(),
                    StatusCode::UNAUTHORIZED,
                    "{}",
                    route.path
                );
            }
            Access::AnyOf(needs) => {
                for (case, token, admitted) in cases(needs) {
                    let response = request(Some(&token)).send().await.unwrap();
                    let status = response.status();
                    let is_stream = response
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                    let body: Value = if is_stream {
                        Value::Null
                    } else {
                        response.json().await.unwrap_or(Value::Null)
                    };
                    let what = format!(
                        "{} {} with {case}: {status} {body}",
                        route.method, route.path
                    );
                    if admitted {
                        assert_ne!(status, StatusCode::UNAUTHORIZED, "{what}");
                        assert_ne!(body["error"]["code"], "INSUFFICIENT_SCOPE", "{what}");
                    } else {
                        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
                        assert_eq!(body["error"]["code"], "INSUFFICIENT_SCOPE", "{what}");
                        let message = body["error"]["message"].as_str().unwrap_or("");
                        assert!(message.contains(needs[0]), "names the scope: {what}");
                    }
                }
                // The admin scope opens every route.
                let response = request(Some(&token_with(ADMIN_SCOPE)))
                    .send()
                    .await
                    .unwrap();
                assert_ne!(
                    response.status(),
                    StatusCode::FORBIDDEN,
                    "{} {} as admin",
                    route.method,
                    route.path
                );
            }
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn every_door_subject_refuses_a_missing_or_wrong_scope_and_admits_the_right_one() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--door-reject-burst=1000"]).await;
    let agent = NatsAgent::connect(&nats.url(), AGENT).await;
    let subjects = [
        "acc.in.register",
        "acc.in.heartbeat",
        "acc.in.event",
        "acc.in.task_result.t-scope-1",
        "acc.in.task_submit",
        "acc.in.task_claim",
    ];
    for subject in subjects {
        let needs = door::scopes_of(subject).expect("an inbound call");
        for (case, token, admitted) in cases(needs) {
            let (status, body) = agent
                .call_with(
                    subject,
                    Some(&token),
                    serde_json::to_vec(&json!({"agent_id": AGENT})).unwrap(),
                    &[],
                    Duration::from_secs(10),
                )
                .await
                .unwrap_or_else(|| panic!("the door answers {subject} with {case}"));
            let what = format!("{subject} with {case}: {status} {body}");
            if admitted {
                assert_ne!(body["error"]["code"], "INSUFFICIENT_SCOPE", "{what}");
                assert_ne!(status, 401, "{what}");
            } else {
                assert_eq!(status, 403, "{what}");
                assert_eq!(body["error"]["code"], "INSUFFICIENT_SCOPE", "{what}");
                let message = body["error"]["message"].as_str().unwrap_or("");
                assert!(message.contains(needs[0]), "names the scope: {what}");
            }
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn with_require_scopes_a_gate_1_token_without_a_scope_claim_gets_none() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--require-scopes=true"]).await;
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token(AGENT)),
            &registration(AGENT),
        )
        .await;
    assert_error(status, &body, 403, "INSUFFICIENT_SCOPE");
    app.stop().await;

    let app = TestApp::spawn(&nats).await;
    let (status, body) = app
        .post(
            "/orchestrator/register",
            Some(&token(AGENT)),
            &registration(AGENT),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "without REQUIRE_SCOPES the agent scopes: {body}"
    );
    app.stop().await;
}
