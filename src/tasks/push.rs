//! Push delivery (DESIGN.md §6.1, Delivery): for agents registered with `"dispatch": "push"` the
//! dispatcher sends each task it leases to them instead of waiting for a claim.
//!
//! - Over HTTP (`push_over: http`, the default): `POST {base_url}/tasks` with
//!   `{task_id, capability, input, attempt, lease_expires_at, callback_url}` and
//!   `Authorization: Bearer <token>`, a token minted for that agent (HS256 with the shared
//!   secret, `aud` auto-com-center, scope `orchestrator.task`, living as long as the lease plus
//!   `PUSH_TIMEOUT`). A non-2xx answer, or none within `PUSH_TIMEOUT`, is a failed (retryable)
//!   attempt. Registration refuses a `base_url` under none of the `PUSH_ALLOWED_URLS` prefixes
//!   ([`PushSettings::allows`]), so the orchestrator never calls a URL an agent chose freely.
//! - Over NATS (`push_over: nats`, what the NATS door sets for agents registering on it): the
//!   same body on `acc.reply.<agent_id>.tasks.push`, inside the agent's own reply namespace,
//!   with the same `Authorization` header. Core NATS cannot tell whether anyone listened: an
//!   agent that is not subscribed lets the lease expire, and the task is retried.
//!
//! A cancel of a task whose live attempt a push agent holds is told to it, best effort:
//! `POST {base_url}/tasks/{task_id}/cancel`, or `acc.reply.<agent_id>.tasks.cancel`.
//!
//! [`Pusher`] never blocks the dispatcher's loop: every delivery runs in its own task and its
//! outcome comes back as a [`PushOutcome`] on a channel the loop reads.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::auth::{Secret, TASK_SCOPE, mint};
use crate::bus::subjects;
use crate::domain::{AgentId, AgentRecord, PushChannel, TaskId};

/// Push delivery's settings.
#[derive(Clone)]
pub struct PushSettings {
    /// `PUSH_ALLOWED_URLS`: a push `base_url` must start with one of these (empty: none may).
    pub allowed_urls: Vec<String>,
    /// `PUSH_TIMEOUT`: longest wait for a receiver's answer.
    pub timeout: Duration,
    /// `PUSH_CALLBACK_URL` without a trailing `/`: where receivers reach this service.
    pub callback_url: String,
    /// Signs the tokens minted for push receivers.
    pub secret: Secret,
    /// `MAX_TOKEN_LIFETIME`: a minted token never lives longer (the verifier would refuse it).
    pub max_token_lifetime: Duration,
}

impl std::fmt::Debug for PushSettings {
    /// The secret is never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushSettings")
            .field("allowed_urls", &self.allowed_urls)
            .field("timeout", &self.timeout)
            .field("callback_url", &self.callback_url)
            .finish_non_exhaustive()
    }
}

impl PushSettings {
    /// True when push to `base_url` is allowed: it starts with one of `PUSH_ALLOWED_URLS`.
    pub fn allows(&self, base_url: &str) -> bool {
        crate::domain::push_allowed(&self.allowed_urls, base_url)
    }
}

/// How one push ended; `failure` is `None` when the receiver took the task.
#[derive(Debug)]
pub struct PushOutcome {
    pub task_id: TaskId,
    pub agent_id: AgentId,
    pub attempt: u32,
    pub failure: Option<String>,
}

/// Sends tasks to push agents, each in its own task.
#[derive(Clone)]
pub struct Pusher {
    http: reqwest::Client,
    nats: async_nats::Client,
    settings: Arc<PushSettings>,
    outcomes: mpsc::UnboundedSender<PushOutcome>,
}

impl Pusher {
    /// A pusher whose outcomes arrive on the returned receiver.
    pub fn new(
        settings: Arc<PushSettings>,
        nats: async_nats::Client,
    ) -> (Self, mpsc::UnboundedReceiver<PushOutcome>) {
        let (outcomes, receiver) = mpsc::unbounded_channel();
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let pusher = Self {
            http,
            nats,
            settings,
            outcomes,
        };
        (pusher, receiver)
    }

    /// Sends `task` (one entry of a claim answer) to `agent`; the outcome comes back on the
    /// channel. An agent without a push channel is ignored.
    pub fn deliver(&self, agent: &AgentRecord, task: &Value) {
        let Some(channel) = agent.profile.push_channel() else {
            return;
        };
        let Ok(task_id) = serde_json::from_value::<TaskId>(task["task_id"].clone()) else {
            return;
        };
        let attempt = task["attempt"].as_u64().unwrap_or(0) as u32;
        let body = json!({
            "task_id": task_id,
            "capability": task["capability"],
            "input": task["input"],
            "attempt": attempt,
            "lease_expires_at": task["lease_expires_at"],
            "callback_url": format!(
                "{}/orchestrator/tasks/{task_id}/callback",
                self.settings.callback_url
            ),
        });
        let lease = serde_json::from_value::<DateTime<Utc>>(task["lease_expires_at"].clone()).ok();
        let token = self.token(&agent.agent_id, lease);
        let base_url = agent.profile.base_url.clone();
        let agent_id = agent.agent_id.clone();
        let pusher = self.clone();
        tokio::spawn(async move {
            let sent = match channel {
                PushChannel::Http => {
                    let url = format!("{}/tasks", base_url.trim_end_matches('/'));
                    pusher.post(&url, &token, &body).await
                }
                PushChannel::Nats => {
                    let subject = subjects::pushed_tasks(&agent_id);
                    pusher.publish(subject, &token, &body).await
                }
            };
            match &sent {
                Ok(()) => tracing::info!(%task_id, %agent_id, attempt, "task pushed"),
                Err(reason) => {
                    tracing::warn!(%task_id, %agent_id, attempt, reason = %reason, "task push failed")
                }
            }
            let _ = pusher.outcomes.send(PushOutcome {
                task_id,
                agent_id,
                attempt,
                failure: sent.err(),
            });
        });
    }

    /// Tells `agent` that `task_id` was cancelled, best effort (nothing waits for it).
    pub fn tell_cancelled(&self, agent: &AgentRecord, task_id: &TaskId) {
        let Some(channel) = agent.profile.push_channel() else {
            return;
        };
        let token = self.token(&agent.agent_id, None);
        let body = json!({"task_id": task_id, "status": "cancelled"});
        let (base_url, agent_id, task_id) = (
            agent.profile.base_url.clone(),
            agent.agent_id.clone(),
            task_id.clone(),
        );
        let pusher = self.clone();
        tokio::spawn(async move {
            let told = match channel {
                PushChannel::Http => {
                    let url = format!("{}/tasks/{task_id}/cancel", base_url.trim_end_matches('/'));
                    pusher.post(&url, &token, &body).await
                }
                PushChannel::Nats => {
                    let subject = subjects::cancelled_tasks(&agent_id);
                    pusher.publish(subject, &token, &body).await
                }
            };
            if let Err(reason) = told {
                tracing::info!(%task_id, %agent_id, reason = %reason, "cancel not told to the push agent");
            }
        });
    }

    /// A token for `agent`: it lives until the lease ends plus `PUSH_TIMEOUT` (or one
    /// `PUSH_TIMEOUT` without a lease), never beyond `MAX_TOKEN_LIFETIME`.
    fn token(&self, agent: &AgentId, lease: Option<DateTime<Utc>>) -> String {
        let lease_left = lease
            .and_then(|at| (at - Utc::now()).to_std().ok())
            .unwrap_or_default();
        let ttl = (lease_left + self.settings.timeout)
            .min(self.settings.max_token_lifetime)
            .max(Duration::from_secs(1));
        mint(&self.settings.secret, agent, TASK_SCOPE, ttl)
    }

    async fn post(&self, url: &str, token: &str, body: &Value) -> Result<(), String> {
        let answer = self
            .http
            .post(url)
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .map_err(|err| {
                if err.is_timeout() {
                    format!(
                        "no answer within PUSH_TIMEOUT ({:?})",
                        self.settings.timeout
                    )
                } else {
                    format!("push request failed: {}", without_url(&err))
                }
            })?;
        let status = answer.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the push receiver answered {}", status.as_u16()))
        }
    }

    async fn publish(&self, subject: String, token: &str, body: &Value) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        headers.insert("Authorization", format!("Bearer {token}").as_str());
        let payload = Bytes::from(serde_json::to_vec(body).expect("JSON values serialize"));
        self.nats
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|err| format!("push publish failed: {err}"))
    }
}

/// The error without the URL it names (a base URL may carry credentials).
fn without_url(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    if let Some(url) = err.url() {
        text = text.replace(url.as_str(), "<base_url>");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_urls_under_an_allowed_prefix_may_be_pushed_to() {
        let mut settings = PushSettings {
            allowed_urls: Vec::new(),
            timeout: Duration::from_secs(1),
            callback_url: String::new(),
            secret: Secret::new("0123456789abcdef0123456789abcdef"),
            max_token_lifetime: Duration::from_secs(3600),
        };
        assert!(!settings.allows("https://w.example/"));
        settings.allowed_urls = vec!["https://w.example/".into(), "http://127.0.0.1:".into()];
        assert!(settings.allows("https://w.example/agent-1"));
        assert!(settings.allows("http://127.0.0.1:8080"));
        assert!(!settings.allows("https://w.example.evil/"));
        assert!(!settings.allows("http://127.0.0.2:8080"));
        assert!(!format!("{settings:?}").contains("0123456789abcdef"));
    }
}
