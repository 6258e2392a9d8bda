//! The audit trail: every admin write and every refused credential, stored on `ACC_AUDIT`
//! (which denies delete and purge; records leave only by `AUDIT_MAX_AGE`).
//!
//! An admin write is recorded *before* it is carried out, and refused with 503 when the record
//! cannot be stored: no admin write happens without its record. A refused credential is
//! recorded in the background, so a 401 costs the refused client no wait; the per-address limit
//! on failed authentications bounds how many such records one address can cause over HTTP, and
//! the NATS door's limit on rejections (one bucket per caller, one shared by every message
//! whose token did not verify) how many inbound messages can. A record names the caller or the
//! source address and the code, never the token.

use std::net::IpAddr;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound as _, Utc};
use serde::{Deserialize, Serialize};

use crate::bus::{PublishFailure, Publisher, subjects};
use crate::contract::Code;
use crate::domain::AgentId;
use crate::telemetry;

/// The refusals that mean a credential was presented and refused, on either door. A missing
/// token is not a credential; a rate-limited caller is already on record.
pub fn is_refused_credential(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidToken | Code::TokenExpired | Code::InsufficientScope | Code::IdentityMismatch
    )
}

/// What kind of thing is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// An admin write: alert ack, silence create or expire, task cancel (by an admin), DLQ
    /// replay.
    Admin,
    /// A refused credential: an invalid or expired token, a missing scope, another identity.
    Credential,
}

/// One record of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub kind: AuditKind,
    /// What was done or tried, e.g. `silence.create`, or the route of a refused request.
    pub action: String,
    /// The authenticated caller, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The source address, for refused credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// What the write was about: an alert, silence or task id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The refusal code, for refused credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub at: DateTime<Utc>,
}

/// Writes the audit trail. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    publisher: Publisher,
}

impl Audit {
    pub fn new(publisher: Publisher) -> Self {
        Self { publisher }
    }

    /// Records an admin write by `actor`, and waits until it is stored.
    pub async fn admin_write(
        &self,
        actor: &AgentId,
        action: &'static str,
        target: &str,
    ) -> Result<(), PublishFailure> {
        let entry = AuditEntry {
            kind: AuditKind::Admin,
            action: action.to_owned(),
            actor: Some(actor.to_string()),
            address: None,
            target: Some(target.to_owned()),
            code: None,
            trace_id: telemetry::current_trace_id(),
            at: Utc::now().trunc_subsecs(3),
        };
        tracing::info!(actor = %actor, action, target, "admin write");
        self.store(subjects::AUDIT_ADMIN, &entry).await
    }

    /// Records a credential refused over HTTP, in the background.
    pub fn credential_refused(&self, address: Option<IpAddr>, route: &str, code: Code) {
        self.record_refusal(None, address, route, code);
    }

    /// Records a credential the NATS door refused, in the background: `subject` is the
    /// inbound subject pattern (e.g. `NATS acc.in.heartbeat`), `actor` the caller when its
    /// token verified (a missing scope), else `None`.
    pub fn door_credential_refused(&self, actor: Option<&str>, subject: &str, code: Code) {
        self.record_refusal(actor, None, subject, code);
    }

    fn record_refusal(
        &self,
        actor: Option<&str>,
        address: Option<IpAddr>,
        action: &str,
        code: Code,
    ) {
        let entry = AuditEntry {
            kind: AuditKind::Credential,
            action: action.to_owned(),
            actor: actor.map(str::to_owned),
            address: address.map(|a| a.to_string()),
            target: None,
            code: Some(code.as_str().to_owned()),
            trace_id: telemetry::current_trace_id(),
            at: Utc::now().trunc_subsecs(3),
        };
        let audit = self.clone();
        tokio::spawn(async move {
            if let Err(err) = audit.store(subjects::AUDIT_CREDENTIAL, &entry).await {
                tracing::warn!(error = %telemetry::error_chain(&err), code = ?entry.code, "cannot record a refused credential");
            }
        });
    }

    async fn store(&self, subject: &str, entry: &AuditEntry) -> Result<(), PublishFailure> {
        let payload = Bytes::from(serde_json::to_vec(entry).expect("audit entries serialize"));
        // Every record is its own: a random dedupe id never matches another.
        let msg_id = format!("audit:{:032x}", rand::random::<u128>());
        self.publisher
            .publish(subject.to_owned(), &msg_id, payload, None)
            .await
            .map(|_| ())
    }
}
