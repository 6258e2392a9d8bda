//! The alerting bucket's keys: `alert.<id>` (alert states, written by the lease holder),
//! `ack.<id>` (acknowledgements) and `silence.<id>` (silences), both written by the admin API.

use std::collections::HashMap;

use async_nats::jetstream::kv::Store;
use bytes::Bytes;
use futures::TryStreamExt as _;
use serde::de::DeserializeOwned;

use super::engine::{Ack, AlertState, Silence};
use crate::bus::unreadable::Unreadable;

pub const ALERT_PREFIX: &str = "alert.";
pub const ACK_PREFIX: &str = "ack.";
pub const SILENCE_PREFIX: &str = "silence.";

/// Why the bucket could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("alerting bucket: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// True for ids we generate (16 hex digits): keeps user input out of key names.
pub fn valid_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Entries of the alerting bucket that could not be read.
static UNREADABLE: Unreadable = Unreadable::new("alerting entry");

/// Every readable value under `prefix` (unreadable ones are skipped, counted and logged once).
async fn all<T: DeserializeOwned>(kv: &Store, prefix: &str) -> Result<Vec<T>, StoreError> {
    let keys: Vec<String> = kv
        .keys()
        .await
        .map_err(err)?
        .try_collect()
        .await
        .map_err(err)?;
    let mut out = Vec::new();
    for key in keys.iter().filter(|k| k.starts_with(prefix)) {
        if let Some(value) = kv.get(key).await.map_err(err)? {
            match serde_json::from_slice(&value) {
                Ok(item) => out.push(item),
                Err(e) => UNREADABLE.skip(key, &e),
            }
        }
    }
    Ok(out)
}

pub async fn alerts(kv: &Store) -> Result<Vec<AlertState>, StoreError> {
    all(kv, ALERT_PREFIX).await
}

pub async fn alert(kv: &Store, id: &str) -> Result<Option<AlertState>, StoreError> {
    get(kv, &format!("{ALERT_PREFIX}{id}")).await
}

pub async fn acks(kv: &Store) -> Result<HashMap<String, Ack>, StoreError> {
    let acks: Vec<Ack> = all(kv, ACK_PREFIX).await?;
    Ok(acks.into_iter().map(|a| (a.alert_id.clone(), a)).collect())
}

pub async fn silences(kv: &Store) -> Result<Vec<Silence>, StoreError> {
    all(kv, SILENCE_PREFIX).await
}

pub async fn silence(kv: &Store, id: &str) -> Result<Option<Silence>, StoreError> {
    get(kv, &format!("{SILENCE_PREFIX}{id}")).await
}

async fn get<T: DeserializeOwned>(kv: &Store, key: &str) -> Result<Option<T>, StoreError> {
    match kv.get(key).await.map_err(err)? {
        Some(value) => Ok(serde_json::from_slice(&value).ok()),
        None => Ok(None),
    }
}

pub async fn put<T: serde::Serialize>(
    kv: &Store,
    key: String,
    value: &T,
) -> Result<(), StoreError> {
    let bytes = Bytes::from(serde_json::to_vec(value).map_err(err)?);
    kv.put(key, bytes).await.map_err(err)?;
    Ok(())
}

pub async fn put_alert(kv: &Store, alert: &AlertState) -> Result<(), StoreError> {
    put(kv, format!("{ALERT_PREFIX}{}", alert.id), alert).await
}

pub async fn delete_alert(kv: &Store, id: &str) -> Result<(), StoreError> {
    kv.purge(format!("{ALERT_PREFIX}{id}")).await.map_err(err)?;
    let _ = kv.purge(format!("{ACK_PREFIX}{id}")).await;
    Ok(())
}

pub async fn delete_silence(kv: &Store, id: &str) -> Result<(), StoreError> {
    kv.purge(format!("{SILENCE_PREFIX}{id}"))
        .await
        .map_err(err)?;
    Ok(())
}
