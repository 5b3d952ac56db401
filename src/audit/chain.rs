//! The hash chain rule (guide §8) and its verifier.
//!
//! `hash(N)` is the hex SHA-256 of the plain concatenation of `request_id`,
//! `event_id`, `ts`, `actor`, `action`, `decision`, `canonical_json(payload)`
//! and `hash(N-1)`, with `""` before the first event. Everything here works
//! from stored columns alone.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::{NewEvent, StoredEvent};
use crate::canonical;

/// The `ts` text form that enters the hash.
pub fn format_ts(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// The chain hash of `event` after `prev_hash`.
pub fn event_hash(event: &NewEvent, prev_hash: &str) -> String {
    hash_with_payload(event, &canonical::to_string(&event.payload), prev_hash)
}

/// [`event_hash`] with the canonical payload already rendered.
fn hash_with_payload(event: &NewEvent, canonical_payload: &str, prev_hash: &str) -> String {
    hash_parts(
        [
            &event.request_id,
            &event.event_id,
            &event.ts,
            &event.actor,
            &event.action,
            &event.decision,
        ],
        canonical_payload,
        prev_hash,
    )
}

/// The rule itself: `columns` are `request_id` to `decision`, in order.
fn hash_parts(columns: [&str; 6], canonical_payload: &str, prev_hash: &str) -> String {
    let mut hasher = Sha256::new();
    for part in columns {
        hasher.update(part.as_bytes());
    }
    hasher.update(canonical_payload.as_bytes());
    hasher.update(prev_hash.as_bytes());
    hex::encode(hasher.finalize())
}

/// Whether `hash` is the chain hash of a stored row: `columns` are
/// `request_id` to `decision`, `payload` the stored text, which is parsed and
/// rendered canonical again (JSONB reformats it). Text that no longer parses
/// is hashed as a JSON string, so it fails here instead of failing the read.
/// The same answer as [`event_hash`] on the event the row decodes to.
pub fn stored_hash_holds(columns: [&str; 6], payload: &str, prev_hash: &str, hash: &str) -> bool {
    let canonical_payload = match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(value) => canonical::to_string(&value),
        Err(_) => canonical::to_string(&serde_json::Value::String(payload.to_owned())),
    };
    hash_parts(columns, &canonical_payload, prev_hash) == hash
}

/// One event's place in the chain, with the payload text that was hashed
/// (and is what a store writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Links for `events` appended in order after `head` (`""` at genesis).
pub fn link(head: &str, events: &[NewEvent]) -> Vec<Link> {
    let mut links: Vec<Link> = events
        .iter()
        .map(|event| Link {
            payload: canonical::to_string(&event.payload),
            prev_hash: String::new(),
            hash: String::new(),
        })
        .collect();
    rechain(&mut links, head, events);
    links
}

/// Chains `links`, made by [`link`] for the same `events`, after another
/// `head`: only the hashes depend on it, so the payloads are not rendered
/// again (a writer whose head another writer moved).
pub fn rechain(links: &mut [Link], head: &str, events: &[NewEvent]) {
    let mut prev = head.to_owned();
    for (link, event) in links.iter_mut().zip(events) {
        link.hash = hash_with_payload(event, &link.payload, &prev);
        link.prev_hash = std::mem::replace(&mut prev, link.hash.clone());
    }
}

/// The first place where the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub id: i64,
    pub event_id: String,
    pub reason: &'static str,
}

/// One stored event after its own hash was recomputed: all the chain walk
/// still needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub id: i64,
    pub event_id: String,
    pub prev_hash: String,
    pub hash: String,
    /// `hash` is the hash of the stored columns after the stored `prev_hash`.
    pub hash_holds: bool,
}

/// Walks events in id order and finds the first break.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    expected_prev: Option<String>,
    pub count: u64,
    pub first_hash: Option<String>,
    pub last_hash: Option<String>,
    pub first_break: Option<ChainBreak>,
    /// Id of the last event pushed.
    last_id: Option<i64>,
    /// Ids whose place the walk records (checkpoints' ids), and what it saw
    /// there: the count of events up to them, and their hash.
    watch: BTreeSet<i64>,
    seen: BTreeMap<i64, (u64, String)>,
}

impl ChainVerifier {
    /// `expected_prev` is the hash the first event must link to: `Some("")`
    /// from genesis, or `None` to look it up lazily (see [`Self::needs_anchor`]).
    pub fn new(expected_prev: Option<String>) -> Self {
        ChainVerifier {
            expected_prev,
            count: 0,
            first_hash: None,
            last_hash: None,
            first_break: None,
            last_id: None,
            watch: BTreeSet::new(),
            seen: BTreeMap::new(),
        }
    }

    /// Records the count and hash at each of `ids` as the walk passes them.
    pub fn watching(mut self, ids: BTreeSet<i64>) -> Self {
        self.watch = ids;
        self
    }

    /// The count of events up to `id` and its hash, if `id` was watched and seen.
    pub fn seen_at(&self, id: i64) -> Option<(u64, &str)> {
        self.seen
            .get(&id)
            .map(|(count, hash)| (*count, hash.as_str()))
    }

    /// The last event's id and the count so far, once any was pushed.
    pub fn last_seen(&self) -> Option<(i64, u64)> {
        self.last_id.map(|id| (id, self.count))
    }

    /// True until the first event's predecessor hash is known.
    pub fn needs_anchor(&self) -> bool {
        self.expected_prev.is_none()
    }

    /// True if an event with this `prev_hash` would link to the last one pushed.
    pub fn links_to(&self, prev_hash: &str) -> bool {
        self.expected_prev.as_deref() == Some(prev_hash)
    }

    pub fn anchor(&mut self, prev: String) {
        self.expected_prev = Some(prev);
    }

    pub fn push(&mut self, stored: &StoredEvent) {
        self.push_checked(Checked {
            id: stored.id,
            event_id: stored.event.event_id.clone(),
            hash_holds: event_hash(&stored.event, &stored.prev_hash) == stored.hash,
            prev_hash: stored.prev_hash.clone(),
            hash: stored.hash.clone(),
        });
    }

    /// [`Self::push`] for an event whose own hash was already recomputed
    /// (on any thread): what is left is the linkage, which is sequential.
    pub fn push_checked(&mut self, checked: Checked) {
        self.count += 1;
        if self.first_hash.is_none() {
            self.first_hash = Some(checked.hash.clone());
        }
        if self.first_break.is_none() {
            let expected_prev = self.expected_prev.as_deref().unwrap_or("");
            let reason = if checked.prev_hash != expected_prev {
                Some("prev_hash does not match the previous event's hash")
            } else if !checked.hash_holds {
                Some("hash does not match the recomputed hash of the stored columns")
            } else {
                None
            };
            if let Some(reason) = reason {
                self.first_break = Some(ChainBreak {
                    id: checked.id,
                    event_id: checked.event_id,
                    reason,
                });
            }
        }
        if self.watch.contains(&checked.id) {
            self.seen
                .insert(checked.id, (self.count, checked.hash.clone()));
        }
        self.last_id = Some(checked.id);
        self.last_hash = Some(checked.hash.clone());
        self.expected_prev = Some(checked.hash);
    }

    pub fn is_valid(&self) -> bool {
        self.first_break.is_none()
    }
}

/// `events` as a store would hold them after `head`, with ids from 1:
/// a valid chain for tests to walk or tamper with.
#[cfg(test)]
pub(crate) fn stored(head: &str, events: Vec<NewEvent>) -> Vec<crate::audit::StoredEvent> {
    let links = link(head, &events);
    events
        .into_iter()
        .zip(links)
        .enumerate()
        .map(|(i, (event, link))| crate::audit::StoredEvent {
            id: i as i64 + 1,
            event,
            prev_hash: link.prev_hash,
            hash: link.hash,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(n: u32) -> NewEvent {
        NewEvent {
            request_id: format!("r{n}"),
            event_id: format!("e{n}"),
            ts: "2026-02-09T10:00:00.000000Z".into(),
            actor: "role:nurse".into(),
            action: "twilio.send_sms".into(),
            decision: "ALLOW".into(),
            payload: json!({"b": n, "a": "é"}),
        }
    }

    fn verify(events: &[StoredEvent]) -> ChainVerifier {
        let mut v = ChainVerifier::new(Some(String::new()));
        events.iter().for_each(|e| v.push(e));
        v
    }

    #[test]
    fn hash_matches_the_plain_concatenation() {
        let e = event(1);
        let concat = format!(
            "r1e12026-02-09T10:00:00.000000Zrole:nursetwilio.send_smsALLOW{}prev",
            r#"{"a":"é","b":1}"#
        );
        assert_eq!(
            event_hash(&e, "prev"),
            hex::encode(Sha256::digest(concat.as_bytes()))
        );
    }

    #[test]
    fn rechained_links_are_the_links_from_the_new_head() {
        let events: Vec<NewEvent> = (1..=3).map(event).collect();
        let mut links = link("", &events);
        rechain(&mut links, "moved", &events);
        assert_eq!(links, link("moved", &events));
        assert_eq!(links[0].prev_hash, "moved");
        assert_eq!(links[2].hash, event_hash(&events[2], &links[1].hash));
    }

    #[test]
    fn a_linked_chain_verifies() {
        let chain = stored("", (1..=5).map(event).collect());
        let v = verify(&chain);
        assert!(v.is_valid());
        assert_eq!(v.count, 5);
        assert_eq!(v.last_hash.as_deref(), Some(chain[4].hash.as_str()));
    }

    #[test]
    fn tampered_payload_deleted_row_and_swapped_hashes_are_caught() {
        let chain = stored("", (1..=5).map(event).collect());

        let mut tampered = chain.clone();
        tampered[2].event.payload = json!({"b": 99});
        assert_eq!(verify(&tampered).first_break.unwrap().id, 3);

        let mut deleted = chain.clone();
        deleted.remove(2);
        assert_eq!(verify(&deleted).first_break.unwrap().id, 4);

        let mut swapped = chain.clone();
        let h = swapped[1].hash.clone();
        swapped[1].hash = swapped[3].hash.clone();
        swapped[3].hash = h;
        assert_eq!(verify(&swapped).first_break.unwrap().id, 2);
    }

    #[test]
    fn ts_has_microseconds_and_z() {
        let at = DateTime::parse_from_rfc3339("2026-02-09T10:00:00.5+00:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_ts(at), "2026-02-09T10:00:00.500000Z");
    }
}
