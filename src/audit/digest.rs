//! `audit verify` and `audit digest` (guide §8): walk the stored chain,
//! recomputing every hash, and summarise it for external anchoring.

use chrono::{Days, NaiveDate, Utc};
use serde::Serialize;
use serde_json::json;

use super::chain::{ChainBreak, ChainVerifier, format_ts};
use super::{AuditError, AuditLog, EventFilter};
use crate::canonical;

const PAGE: u32 = 2000;

/// Walks every event matching `filter` in id order. Without a window the
/// chain must start at genesis; with one, the first event must link to the
/// event just before it.
pub async fn walk(log: &dyn AuditLog, filter: &EventFilter) -> Result<ChainVerifier, AuditError> {
    let mut verifier = ChainVerifier::new(filter.ts_window.is_none().then(String::new));
    let mut after_id = 0;
    loop {
        let page = log.page(filter, after_id, PAGE).await?;
        let Some(last) = page.last() else { break };
        after_id = last.id;
        for event in &page {
            if verifier.needs_anchor() {
                verifier.anchor(log.hash_before(event.id).await?.unwrap_or_default());
            }
            verifier.push(event);
        }
    }
    Ok(verifier)
}

/// The daily digest document.
#[derive(Debug, Clone, Serialize)]
pub struct Digest {
    pub generated_at: String,
    pub window: String,
    pub event_count: u64,
    pub first_hash: Option<String>,
    pub last_hash: Option<String>,
    pub chain_valid: bool,
    /// SHA-256 of the canonical JSON of `window`, `event_count`,
    /// `first_hash`, `last_hash` and `chain_valid`.
    pub digest_hash: String,
    /// Only when the chain is broken: the first event that fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_broken_event: Option<BrokenEvent>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BrokenEvent {
    pub id: i64,
    pub event_id: String,
    pub reason: &'static str,
}

impl From<&ChainBreak> for BrokenEvent {
    fn from(b: &ChainBreak) -> Self {
        BrokenEvent {
            id: b.id,
            event_id: b.event_id.clone(),
            reason: b.reason,
        }
    }
}

/// Yesterday in UTC, the default window.
pub fn yesterday() -> NaiveDate {
    let today = Utc::now().date_naive();
    today.checked_sub_days(Days::new(1)).unwrap_or(today)
}

/// Digest of the events whose `ts` falls on `day` (UTC).
pub async fn digest(log: &dyn AuditLog, day: NaiveDate) -> Result<Digest, AuditError> {
    let next = day.checked_add_days(Days::new(1)).unwrap_or(day);
    let from = format!("{}T", day.format("%Y-%m-%d"));
    let to = format!("{}T", next.format("%Y-%m-%d"));
    let filter = EventFilter {
        ts_window: Some((from, to)),
    };
    let verifier = walk(log, &filter).await?;
    let window = day.format("%Y-%m-%d").to_string();
    let digest_hash = canonical::sha256_hex(&json!({
        "window": window,
        "event_count": verifier.count,
        "first_hash": verifier.first_hash,
        "last_hash": verifier.last_hash,
        "chain_valid": verifier.is_valid(),
    }));
    Ok(Digest {
        generated_at: format_ts(Utc::now()),
        window,
        event_count: verifier.count,
        chain_valid: verifier.is_valid(),
        first_broken_event: verifier.first_break.as_ref().map(BrokenEvent::from),
        first_hash: verifier.first_hash,
        last_hash: verifier.last_hash,
        digest_hash,
    })
}
