//! Rebuilds the in-process replay memory from the audit trail at startup.
//! The audit trail is the source of truth: without this, a verifier restart
//! with embedded state forgets every stored decision, and a replayed write
//! is decided (and perhaps allowed) again.
//!
//! Each audited decision of the last `ANTI_REPLAY_TTL_SECONDS` becomes a
//! stored decision again: `request_id` → fingerprint of the payload's
//! `request` + its `response`. Replays (`REPLAY_DETECTED`), fail-closed
//! denies and decisions the operator's mode floor changed (`mode_applied`
//! in the payload) are skipped, as they were never stored. Entries get the full TTL
//! from startup (kept up to one TTL longer than strictly needed).
//!
//! Limit: the audit payload holds numbers as parsed doubles, not as sent.
//! A request with a number a double does not give back (an integer beyond
//! 2^53, say) gets a different fingerprint here, so its replay is denied as
//! `Inv_ReplayPayloadMismatch`: safe, never decided twice.

use std::time::Duration;

use crate::audit::{AuditError, AuditLog, EventFilter, NewEvent, chain};
use crate::domain::{VerifyRequest, VerifyResponse, violation};
use crate::pipeline::REPLAY_ACTION;

use super::{Claim, ReplayGuard, StateError};

/// Rows read per page.
const PAGE: u32 = 2_000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Decisions stored again.
    pub stored: u64,
    /// Rows read but not stored: replays, fail-closed denies, unreadable.
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reading the audit trail: {0}")]
    Audit(#[from] AuditError),
    #[error("storing a reloaded decision: {0}")]
    State(#[from] StateError),
}

/// Stores in `guard` the decisions audited within `ttl` of now.
pub async fn reload(
    audit: &dyn AuditLog,
    guard: &dyn ReplayGuard,
    ttl: Duration,
) -> Result<Reloaded, ReloadError> {
    let now = chrono::Utc::now();
    let from = now - chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    // The upper bound only closes the window: later rows are newer still.
    let to = now + chrono::Duration::days(1);
    let filter = EventFilter {
        ts_window: Some((chain::format_ts(from), chain::format_ts(to))),
    };
    let mut counts = Reloaded::default();
    let mut after = 0;
    loop {
        let page = audit.page(&filter, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for stored in &page {
            restore(&stored.event, guard, &mut counts).await?;
        }
    }
    Ok(counts)
}

/// Stores in `guard` the decisions of `events` audited within `ttl` of
/// now: the audit spool's, which the chain does not hold yet. Called after
/// [`reload`], so an event that is in both (its commit landed, its
/// acknowledgement did not) is already stored and is skipped here.
pub async fn reload_spooled(
    events: &[NewEvent],
    guard: &dyn ReplayGuard,
    ttl: Duration,
) -> Result<Reloaded, ReloadError> {
    let from =
        chrono::Utc::now() - chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    // `ts` is fixed-width UTC, so the text compares as the time does.
    let from = chain::format_ts(from);
    let mut counts = Reloaded::default();
    for event in events {
        if event.ts >= from {
            restore(event, guard, &mut counts).await?;
        } else {
            counts.skipped += 1;
        }
    }
    Ok(counts)
}

/// One audited event back in the replay memory, if it was stored for replay.
async fn restore(
    event: &NewEvent,
    guard: &dyn ReplayGuard,
    counts: &mut Reloaded,
) -> Result<(), ReloadError> {
    let Some((request, response)) = replay_entry(&event.action, &event.payload) else {
        counts.skipped += 1;
        return Ok(());
    };
    // As the pipeline bound it to the caller who made it.
    let caller = event.payload.get("caller").and_then(|c| c.as_str());
    let fingerprint = crate::callers::bind_fingerprint(request.fingerprint(), caller);
    if guard.claim(&request.request_id, &fingerprint).await? == Claim::Claimed {
        guard
            .complete(&request.request_id, &fingerprint, &response)
            .await?;
        counts.stored += 1;
    } else {
        counts.skipped += 1;
    }
    Ok(())
}

/// The request and response of an audited decision that was stored for
/// replay, or `None` for a replay, a fail-closed deny, a decision the mode
/// floor changed, or an unreadable row.
fn replay_entry(
    action: &str,
    payload: &serde_json::Value,
) -> Option<(VerifyRequest, VerifyResponse)> {
    if action == REPLAY_ACTION || payload.get("mode_applied").is_some() {
        return None;
    }
    let request = VerifyRequest::from_value(payload.get("request")?.clone()).ok()?;
    let response: VerifyResponse = serde_json::from_value(payload.get("response")?.clone()).ok()?;
    if response
        .violations
        .iter()
        .any(|v| v == violation::FAIL_CLOSED)
    {
        return None;
    }
    Some((request, response))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request() -> serde_json::Value {
        json!({"request_id": "r-1", "tool": "cliniccloud.list_appointments", "mode": "ALLOW",
               "role": "receptionist", "subject": {"patient_id": "p-1"}, "args": {"n": 1.5}, "context": {}})
    }

    #[test]
    fn decisions_come_back_with_the_pipelines_fingerprint() {
        let allow = VerifyResponse::from_violations(vec![], vec![]);
        let payload = json!({"request": request(), "response": allow});
        let (parsed, response) = replay_entry("cliniccloud.list_appointments", &payload).unwrap();
        let sent = VerifyRequest::from_slice(request().to_string().as_bytes()).unwrap();
        assert_eq!(parsed.fingerprint(), sent.fingerprint());
        assert_eq!(response, allow);
    }

    #[test]
    fn replays_fail_closed_denies_and_unreadable_rows_are_skipped() {
        let allow = VerifyResponse::from_violations(vec![], vec![]);
        let payload = json!({"request": request(), "response": allow});
        assert!(replay_entry(REPLAY_ACTION, &payload).is_none());
        let failed = VerifyResponse::from_violations(
            vec![
                violation::FAIL_CLOSED.into(),
                "Inv_ReplayCheckUnavailable".into(),
            ],
            vec![],
        );
        let payload = json!({"request": request(), "response": failed});
        assert!(replay_entry("x", &payload).is_none());
        assert!(replay_entry("x", &json!({"request": 1})).is_none());
        let floored = VerifyResponse::deny(violation::MODE_KILL_SWITCH);
        let payload =
            json!({"request": request(), "response": floored, "mode_applied": "KILL_SWITCH"});
        assert!(replay_entry("x", &payload).is_none());
    }

    #[tokio::test]
    async fn spooled_decisions_within_the_ttl_are_stored_and_older_ones_skipped() {
        use crate::state::memory::MemoryState;
        let ttl = Duration::from_secs(3_600);
        let state = MemoryState::new(ttl, Duration::from_secs(30), 1_000);
        let allow = VerifyResponse::from_violations(vec![], vec![]);
        let event = |id: &str| {
            let mut request = request();
            request["request_id"] = json!(id);
            NewEvent::now(
                id,
                "role:receptionist".into(),
                "cliniccloud.list_appointments",
                "ALLOW",
                json!({"request": request, "response": allow}),
            )
        };
        let mut old = event("r-old");
        old.ts = chain::format_ts(chrono::Utc::now() - chrono::Duration::hours(2));
        let fresh = event("r-new");
        let counts = reload_spooled(&[old, fresh.clone(), fresh], &state, ttl)
            .await
            .unwrap();
        // The old one is outside the TTL; the second copy is already stored.
        assert_eq!(
            counts,
            Reloaded {
                stored: 1,
                skipped: 2
            }
        );
        let id = crate::domain::RequestId::parse("r-new").unwrap();
        let sent = VerifyRequest::from_value({
            let mut r = request();
            r["request_id"] = json!("r-new");
            r
        })
        .unwrap();
        let fingerprint = crate::callers::bind_fingerprint(sent.fingerprint(), None);
        assert!(matches!(
            state.claim(&id, &fingerprint).await.unwrap(),
            Claim::Cached(_)
        ));
        let old_id = crate::domain::RequestId::parse("r-old").unwrap();
        assert_eq!(state.claim(&old_id, "any").await.unwrap(), Claim::Claimed);
    }
}
