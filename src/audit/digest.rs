//! `audit digest` (guide §8): a UTC day of the stored chain, every hash
//! recomputed ([`walk`]), summarised for external anchoring.

use chrono::{Days, NaiveDate, Utc};
use serde::Serialize;
use serde_json::json;

use super::EventFilter;
use super::chain::{ChainBreak, format_ts};
use super::scan::{ChainSource, ReadError, walk};
use crate::canonical;

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
    /// The policy sets that decided the window's events (`policy.hash` of
    /// their payloads, with OPA's `policy.revision` where recorded), in
    /// order of first use. Not covered by `digest_hash`.
    pub policies: Vec<PolicyInForce>,
}

/// One policy set over the window: which events it decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyInForce {
    /// `null` for events written before payloads named their policy.
    pub hash: Option<String>,
    /// The OPA bundle revisions that decided, in OPA mode (where `hash`
    /// covers the route map only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub first_id: i64,
    pub last_id: i64,
    pub count: u64,
}

/// Reads the `policy` of every event matching `filter`, grouped by hash and
/// revision.
async fn policies_in_force(
    source: &dyn ChainSource,
    filter: &EventFilter,
) -> Result<Vec<PolicyInForce>, ReadError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let collect = async move {
        let mut policies: Vec<PolicyInForce> = Vec::new();
        while let Some(rows) = rx.recv().await {
            for row in rows {
                let row: super::scan::RawRow = row;
                let payload = serde_json::from_str::<serde_json::Value>(&row.payload).ok();
                let field = |name: &str| {
                    payload
                        .as_ref()?
                        .get("policy")?
                        .get(name)?
                        .as_str()
                        .map(str::to_owned)
                };
                let (hash, revision) = (field("hash"), field("revision"));
                match policies
                    .iter_mut()
                    .find(|p| p.hash == hash && p.revision == revision)
                {
                    Some(policy) => {
                        policy.first_id = policy.first_id.min(row.id);
                        policy.last_id = policy.last_id.max(row.id);
                        policy.count += 1;
                    }
                    None => policies.push(PolicyInForce {
                        hash,
                        revision,
                        first_id: row.id,
                        last_id: row.id,
                        count: 1,
                    }),
                }
            }
        }
        policies.sort_by_key(|p| p.first_id);
        policies
    };
    let (streamed, policies) = tokio::join!(source.stream(filter, tx), collect);
    streamed?;
    Ok(policies)
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

/// Digest of the events whose `ts` falls on `day` (UTC); `progress` as for [`walk`].
pub async fn digest(
    source: &dyn ChainSource,
    day: NaiveDate,
    progress: bool,
) -> Result<Digest, ReadError> {
    let next = day.checked_add_days(Days::new(1)).unwrap_or(day);
    let from = format!("{}T", day.format("%Y-%m-%d"));
    let to = format!("{}T", next.format("%Y-%m-%d"));
    let filter = EventFilter {
        ts_window: Some((from, to)),
    };
    let verifier = walk(source, &filter, progress).await?;
    let policies = policies_in_force(source, &filter).await?;
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
        policies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::link;
    use crate::audit::scan::RawRow;
    use crate::audit::{NewEvent, StoredEvent};
    use async_trait::async_trait;

    /// A chain in memory, read the way the stores read it.
    struct Rows(Vec<StoredEvent>);

    impl Rows {
        fn matching<'a>(
            &'a self,
            filter: &'a EventFilter,
        ) -> impl Iterator<Item = &'a StoredEvent> {
            self.0.iter().filter(|e| match &filter.ts_window {
                Some((from, to)) => e.event.ts >= *from && e.event.ts < *to,
                None => true,
            })
        }
    }

    #[async_trait]
    impl ChainSource for Rows {
        async fn stream(
            &self,
            filter: &EventFilter,
            out: tokio::sync::mpsc::Sender<Vec<RawRow>>,
        ) -> Result<(), ReadError> {
            // Batches of two, so that the walk reorders and joins several.
            let rows: Vec<RawRow> = self
                .matching(filter)
                .map(|e| RawRow {
                    id: e.id,
                    request_id: e.event.request_id.clone(),
                    event_id: e.event.event_id.clone(),
                    ts: e.event.ts.clone(),
                    actor: e.event.actor.clone(),
                    action: e.event.action.clone(),
                    decision: e.event.decision.clone(),
                    payload: canonical::to_string(&e.event.payload),
                    prev_hash: e.prev_hash.clone(),
                    hash: e.hash.clone(),
                })
                .collect();
            for batch in rows.chunks(2) {
                if out.send(batch.to_vec()).await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        async fn hash_before(&self, id: i64) -> Result<Option<String>, ReadError> {
            Ok(self
                .0
                .iter()
                .rev()
                .find(|e| e.id < id)
                .map(|e| e.hash.clone()))
        }
        async fn count(&self, filter: &EventFilter) -> Result<u64, ReadError> {
            Ok(self.matching(filter).count() as u64)
        }
        async fn head(&self) -> Result<crate::audit::checkpoint::Head, ReadError> {
            Ok(crate::audit::checkpoint::Head {
                last_id: self.0.last().map_or(0, |e| e.id),
                last_hash: self.0.last().map_or(String::new(), |e| e.hash.clone()),
                count: self.0.len() as u64,
            })
        }
    }

    /// Events in commit (id) order whose stamps straddle midnight out of order.
    fn straddling_midnight() -> Vec<StoredEvent> {
        let stamps = [
            "2026-02-09T23:59:59.999000Z",
            "2026-02-10T00:00:00.000100Z",
            "2026-02-09T23:59:59.999900Z",
            "2026-02-10T00:00:00.000200Z",
            "2026-02-10T00:00:00.000300Z",
        ];
        let events: Vec<NewEvent> = stamps
            .iter()
            .enumerate()
            .map(|(i, ts)| NewEvent {
                request_id: format!("r{i}"),
                event_id: format!("e{i}"),
                ts: (*ts).into(),
                actor: "role:nurse".into(),
                action: "twilio.send_sms".into(),
                decision: "ALLOW".into(),
                // Events 0-2 predate `policy`, 3 and 4 name theirs.
                payload: match i {
                    0..=2 => json!({"i": i}),
                    _ => json!({"i": i, "policy": {"hash": format!("h{}", i / 4)}}),
                },
            })
            .collect();
        let links = link("", &events);
        events
            .into_iter()
            .zip(links)
            .enumerate()
            .map(|(i, (event, link))| StoredEvent {
                id: i as i64 * 2 + 1, // ids with gaps, as sequences leave them
                event,
                prev_hash: link.prev_hash,
                hash: link.hash,
            })
            .collect()
    }

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    #[tokio::test]
    async fn windows_whose_events_interleave_with_the_next_day_still_verify() {
        let log = Rows(straddling_midnight());
        let first = digest(&log, day("2026-02-09"), false).await.unwrap();
        assert_eq!(first.event_count, 2);
        assert!(first.chain_valid, "{first:?}");
        let second = digest(&log, day("2026-02-10"), false).await.unwrap();
        assert_eq!(second.event_count, 3);
        assert!(second.chain_valid, "{second:?}");
    }

    #[tokio::test]
    async fn a_row_deleted_inside_an_interleaved_window_is_still_caught() {
        let mut rows = straddling_midnight();
        let removed = rows.remove(3);
        let log = Rows(rows);
        let d = digest(&log, day("2026-02-10"), false).await.unwrap();
        assert!(!d.chain_valid);
        let broken = d.first_broken_event.unwrap();
        assert_eq!(broken.id, removed.id + 2);
    }

    #[tokio::test]
    async fn the_digest_lists_the_policies_in_force() {
        let log = Rows(straddling_midnight());
        let d = digest(&log, day("2026-02-10"), false).await.unwrap();
        let listed: Vec<(Option<&str>, i64, i64, u64)> = d
            .policies
            .iter()
            .map(|p| (p.hash.as_deref(), p.first_id, p.last_id, p.count))
            .collect();
        // Ids 3 (no policy), 7 (h0) and 9 (h1) fall on the 10th.
        assert_eq!(
            listed,
            vec![
                (None, 3, 3, 1),
                (Some("h0"), 7, 7, 1),
                (Some("h1"), 9, 9, 1)
            ]
        );
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["policies"][1]["hash"], "h0");
        assert!(json["policies"][1].get("revision").is_none(), "{json}");
    }

    #[tokio::test]
    async fn in_opa_mode_each_bundle_revision_is_its_own_policy() {
        // One route map (one hash) while OPA moved from bundle r1 to r2.
        let revisions = [None, Some("casf:r1"), Some("casf:r1"), Some("casf:r2")];
        let events: Vec<NewEvent> = revisions
            .iter()
            .enumerate()
            .map(|(i, revision)| NewEvent {
                request_id: format!("r{i}"),
                event_id: format!("e{i}"),
                ts: format!("2026-02-10T00:00:0{i}.000000Z"),
                actor: "role:nurse".into(),
                action: "cliniccloud.list_appointments".into(),
                decision: "ALLOW".into(),
                payload: match revision {
                    None => json!({"policy": {"hash": "routes"}}),
                    Some(r) => json!({"policy": {"hash": "routes", "revision": r}}),
                },
            })
            .collect();
        let rows = crate::audit::chain::stored("", events);
        let d = digest(&Rows(rows), day("2026-02-10"), false).await.unwrap();
        let listed: Vec<(Option<&str>, i64, i64, u64)> = d
            .policies
            .iter()
            .map(|p| (p.revision.as_deref(), p.first_id, p.last_id, p.count))
            .collect();
        assert_eq!(
            listed,
            vec![
                (None, 1, 1, 1),
                (Some("casf:r1"), 2, 3, 2),
                (Some("casf:r2"), 4, 4, 1)
            ]
        );
        assert!(
            d.policies
                .iter()
                .all(|p| p.hash.as_deref() == Some("routes"))
        );
    }
}
