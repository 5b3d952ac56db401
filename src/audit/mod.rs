//! The audit trail: an append-only, SHA-256 hash-chained log of every decision.
//!
//! [`AuditLog`] is the storage (SQLite by default, PostgreSQL with `PG_DSN`);
//! it appends a whole batch in one transaction, chaining from the stored head.
//! [`writer::AuditWriter`] is what the pipeline holds: a single writer task
//! that group-commits whatever requests queued while the last batch was being
//! written; with [`spool`] it keeps what PostgreSQL cannot take through an
//! outage and drains it later. [`chain`] holds the hash rule and the verifier
//! shared by `audit verify`, `audit digest` and every backend; [`scan`] is how
//! those two commands read a chain: read-only, streamed, hashed on every core.
//! [`checkpoint`] and [`signing`] anchor it: signed checkpoints of the head
//! catch what a valid chain cannot show, a cut tail or a rebuilt database.

pub mod chain;
pub mod checkpoint;
pub mod digest;
pub mod pg_dsn;
pub mod postgres;
pub mod scan;
pub mod signing;
pub mod spool;
pub mod sqlite;
pub mod writer;

use async_trait::async_trait;
use serde_json::Value;

/// An event before it joins the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub request_id: String,
    pub event_id: String,
    /// UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
    pub ts: String,
    pub actor: String,
    pub action: String,
    pub decision: String,
    pub payload: Value,
}

impl NewEvent {
    /// A fresh event stamped now with a random UUIDv4 `event_id`.
    pub fn now(
        request_id: &str,
        actor: String,
        action: &str,
        decision: &str,
        payload: Value,
    ) -> Self {
        NewEvent {
            request_id: request_id.to_owned(),
            event_id: uuid::Uuid::new_v4().to_string(),
            ts: chain::format_ts(chrono::Utc::now()),
            actor,
            action: action.to_owned(),
            decision: decision.to_owned(),
            payload,
        }
    }
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: i64,
    pub event: NewEvent,
    pub prev_hash: String,
    pub hash: String,
}

/// Where an appended event landed in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendReceipt {
    pub id: i64,
    pub hash: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit store unavailable: {0}")]
    Unavailable(String),
    #[error("audit store timed out")]
    Timeout,
    #[error("audit store rejected the write: {0}")]
    Rejected(String),
    #[error("audit writer has shut down")]
    Closed,
    /// Neither the chain nor the spool holds the event, and
    /// `CASF_AUDIT_STRICT=true`: a write must fail closed.
    #[error("event recorded nowhere (strict): {0}")]
    NotRecorded(String),
}

crate::labels::label_enum!(
    /// The `kind` label of `casf_audit_append_failed_total`, and of logs.
    pub enum AuditErrorKind {
        Unavailable => "unavailable",
        Timeout => "timeout",
        Rejected => "rejected",
        Closed => "closed",
        NotRecorded => "not_recorded",
    }
);

impl AuditError {
    pub fn kind(&self) -> AuditErrorKind {
        match self {
            AuditError::Unavailable(_) => AuditErrorKind::Unavailable,
            AuditError::Timeout => AuditErrorKind::Timeout,
            AuditError::Rejected(_) => AuditErrorKind::Rejected,
            AuditError::Closed => AuditErrorKind::Closed,
            AuditError::NotRecorded(_) => AuditErrorKind::NotRecorded,
        }
    }
}

/// Which events to read back.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Half-open `[from, to)` on `ts` strings, which sort as times.
    pub ts_window: Option<(String, String)>,
}

/// Durable storage of the chain.
#[async_trait]
pub trait AuditLog: Send + Sync {
    /// Short backend name for the startup line and `/healthz` (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;

    /// Appends `events` in order, in one transaction that reads the current
    /// head under the writers' lock. Receipts come back in the same order.
    async fn append_batch(&self, events: &[NewEvent]) -> Result<Vec<AppendReceipt>, AuditError>;

    /// Up to `limit` events with `id > after_id` matching `filter`, by id.
    async fn page(
        &self,
        filter: &EventFilter,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, AuditError>;

    /// Hash of the last event before `id`, or `None` at genesis.
    async fn hash_before(&self, id: i64) -> Result<Option<String>, AuditError>;

    /// Readiness probe.
    async fn ping(&self) -> Result<(), AuditError>;

    /// Which of `event_ids` the chain already holds, so that a spooled event
    /// whose first commit did land (its acknowledgement lost) is not
    /// appended twice. Only stores that take a spool need it.
    async fn present_event_ids(
        &self,
        _event_ids: &[String],
    ) -> Result<std::collections::HashSet<String>, AuditError> {
        Ok(std::collections::HashSet::new())
    }
}
