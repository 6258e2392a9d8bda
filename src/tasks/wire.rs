//! What the ingress and the acting dispatcher say to each other over core NATS request/reply
//! (`acc.dispatch.*`, schemas `subjects/schemas/dispatch_*.json`): the requests, the one
//! [`Answer`] envelope, and [`DispatchClient`], which bounds every wait and turns "nobody
//! answered" into 503 `BUS_UNAVAILABLE`.

use std::time::Duration;

use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::contract::{Code, Refusal};
use crate::domain::{AgentId, TaskId};

/// `acc.dispatch.claim`: lease up to `max` tasks to `agent_id`, waiting up to `wait_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimRequest {
    pub agent_id: AgentId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    pub max: u32,
    pub wait_ms: u64,
}

/// What an agent reports about its attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Report {
    Running {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<Value>,
    },
    Succeeded {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
    },
    Failed {
        error: Failure,
    },
}

/// `error` of a `failed` callback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub message: String,
    /// False dead-letters the task at once.
    pub retryable: bool,
}

/// `acc.dispatch.callback`: `agent_id` reports on `task_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallbackRequest {
    pub task_id: TaskId,
    pub agent_id: AgentId,
    pub report: Report,
}

/// `acc.dispatch.cancel`: cancel `task_id` on behalf of `caller`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelRequest {
    pub task_id: TaskId,
    pub caller: AgentId,
    /// The caller holds the admin scope (checked by the ingress, which verified the token).
    pub admin: bool,
}

/// `acc.dispatch.replay`: queue dead-lettered `task_id` again; `by` is the admin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayRequest {
    pub task_id: TaskId,
    pub by: AgentId,
}

/// The dispatcher's answer: the success body, or the refusal to relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Ok(Value),
    Refused {
        code: String,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        details: Option<String>,
    },
}

impl Answer {
    pub fn from_result(result: Result<Value, Refusal>) -> Self {
        match result {
            Ok(body) => Self::Ok(body),
            Err(refusal) => Self::Refused {
                code: refusal.code().as_str().to_owned(),
                message: refusal.message().to_owned(),
                details: refusal.details().map(str::to_owned),
            },
        }
    }

    pub fn into_result(self) -> Result<Value, Refusal> {
        match self {
            Self::Ok(body) => Ok(body),
            Self::Refused {
                code,
                message,
                details,
            } => {
                let Some(code) = Code::from_name(&code) else {
                    return Err(Refusal::internal(format!(
                        "the dispatcher answered an unknown code {code:?}"
                    )));
                };
                let mut refusal = Refusal::new(code).with_message(message);
                if let Some(details) = details {
                    refusal = refusal.with_details(details);
                }
                Err(refusal)
            }
        }
    }

    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("answers serialize"))
    }
}

/// Asks the acting dispatcher, never waiting longer than told.
#[derive(Clone)]
pub struct DispatchClient {
    client: Client,
    /// Added to every wait: the dispatcher's own work (a KV write) on top of a claim's `wait`.
    margin: Duration,
}

impl DispatchClient {
    pub fn new(client: Client, margin: Duration) -> Self {
        Self { client, margin }
    }

    /// Sends `request` on `subject` and waits up to `wait` plus the margin for the answer.
    pub async fn ask<T: Serialize>(
        &self,
        subject: &'static str,
        request: &T,
        wait: Duration,
    ) -> Result<Value, Refusal> {
        let payload = Bytes::from(serde_json::to_vec(request).expect("requests serialize"));
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(wait + self.margin));
        let reply = self
            .client
            .send_request(subject, request)
            .await
            .map_err(|err| {
                let reason = match err.kind() {
                    RequestErrorKind::NoResponders => "no dispatcher is acting",
                    RequestErrorKind::TimedOut => "the dispatcher did not answer in time",
                    RequestErrorKind::MaxPayloadExceeded => {
                        return Refusal::too_large(self.client.server_info().max_payload);
                    }
                    RequestErrorKind::InvalidSubject | RequestErrorKind::Other => {
                        "the dispatcher request failed"
                    }
                };
                Refusal::bus_unavailable(err).with_details(reason)
            })?;
        serde_json::from_slice::<Answer>(&reply.payload)
            .map_err(Refusal::internal)?
            .into_result()
    }
}
