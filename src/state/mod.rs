//! Short-lived shared state: anti-replay claims and the SMS rate limit.
//!
//! Both live in Redis in production and in process memory by default. The
//! pipeline only sees the two traits below; a [`StateError`] from either is
//! what makes writes fail closed with `trigger="redis"`.

pub mod memory;
pub mod redis;
pub mod reload;

use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{RequestId, VerifyResponse};

/// Default lifetime of a claim whose decision was never stored (the process
/// died mid-request): short, so a crash does not block a `request_id` for a day.
pub const DEFAULT_PENDING_TTL: Duration = Duration::from_secs(30);

/// Outcome of claiming a `request_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// First sight of this id: process it, then [`ReplayGuard::complete`].
    Claimed,
    /// Same payload already decided: answer with the stored decision.
    Cached(VerifyResponse),
    /// Same id, different payload.
    Mismatch,
    /// Same id and payload, still being decided by another request.
    Pending,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store timed out")]
    Timeout,
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// Known to be down (its connection is lost or reconnecting), so the
    /// operation was not tried: waiting out the budget would only slow reads.
    #[error("state store unavailable: not connected, not tried")]
    Down,
    #[error("state store gave an unusable answer: {0}")]
    BadResponse(String),
    /// The in-process state holds as many keys as it may
    /// (`CASF_STATE_MAX_KEYS`) and none has expired yet.
    #[error(
        "in-process state is full ({max_keys} keys): raise CASF_STATE_MAX_KEYS or set REDIS_URL"
    )]
    Full { max_keys: usize },
}

crate::labels::label_enum!(
    /// The `kind` label of `casf_state_error_total`, and of its
    /// rate-limited log lines.
    pub enum StateErrorKind {
        Timeout => "timeout",
        Unavailable => "unavailable",
        Down => "down",
        BadResponse => "bad_response",
        Full => "full",
    }
);

impl StateError {
    pub fn kind(&self) -> StateErrorKind {
        match self {
            StateError::Timeout => StateErrorKind::Timeout,
            StateError::Unavailable(_) => StateErrorKind::Unavailable,
            StateError::Down => StateErrorKind::Down,
            StateError::BadResponse(_) => StateErrorKind::BadResponse,
            StateError::Full { .. } => StateErrorKind::Full,
        }
    }
}

/// Idempotency by `request_id` (guide §7).
#[async_trait]
pub trait ReplayGuard: Send + Sync {
    /// Short backend name for the startup line and `/healthz` (`memory`, `redis`).
    fn backend(&self) -> &'static str;

    /// Atomically claims `request_id` for a request with this payload fingerprint.
    async fn claim(&self, request_id: &RequestId, fingerprint: &str) -> Result<Claim, StateError>;

    /// Stores the decision for replays, for the full anti-replay TTL.
    async fn complete(
        &self,
        request_id: &RequestId,
        fingerprint: &str,
        response: &VerifyResponse,
    ) -> Result<(), StateError>;

    /// Drops a claim whose decision must not be replayed (a fail-closed deny),
    /// so that a retry after recovery is decided afresh. Only a claim still
    /// pending for this fingerprint is dropped, never a stored decision.
    async fn release(&self, request_id: &RequestId, fingerprint: &str) -> Result<(), StateError>;

    /// Readiness probe.
    async fn ping(&self) -> Result<(), StateError>;

    /// Whether stored decisions survive a restart of the store, for the
    /// startup line and `/healthz`; `None` when the question does not apply.
    async fn persistence(&self) -> Option<Persistence> {
        None
    }
}

/// What the state store says about surviving its own restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Append-only file: at most about a second of decisions lost.
    Aof,
    /// RDB snapshots only: decisions since the last snapshot are lost.
    Rdb,
    /// Nothing on disk: a restart forgets every stored decision.
    None,
    /// The store would not say (CONFIG disabled, as on managed Redis).
    Unknown,
}

impl Persistence {
    pub fn as_str(self) -> &'static str {
        match self {
            Persistence::Aof => "aof",
            Persistence::Rdb => "rdb",
            Persistence::None => "none",
            Persistence::Unknown => "unknown",
        }
    }

    /// A warning for operators, when replays would be forgotten on restart.
    pub fn warning(self) -> Option<&'static str> {
        match self {
            Persistence::Aof => None,
            Persistence::Rdb => Some(
                "Redis persists by RDB snapshots only: a restart forgets the decisions since the last one; set appendonly yes, appendfsync everysec",
            ),
            Persistence::None => Some(
                "Redis has no persistence: a restart forgets every stored decision, and replays are decided again; set appendonly yes, appendfsync everysec",
            ),
            Persistence::Unknown => Some(
                "Redis persistence unknown (CONFIG GET refused): make sure AOF is on, or a restart forgets stored decisions",
            ),
        }
    }
}

/// Fixed-window counters (the SMS burst limit).
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Counts one event under `key` and returns how many the current window
    /// holds, this one included. The window starts at the first event.
    async fn hit(&self, key: &str, window: Duration) -> Result<u64, StateError>;
}
