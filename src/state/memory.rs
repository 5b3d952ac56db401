//! In-process state for a single verifier: the embedded default when
//! `REDIS_URL` is unset. Same semantics as the Redis store, including the
//! short pending TTL, but not shared between processes.
//!
//! Locks are plain mutexes held only for map operations, never across I/O.
//! The maps are split into shards by key: a decision is kept for the whole
//! replay TTL (a day by default), so at load a single map grew to hundreds of
//! thousands of entries, and each time it doubled, or was swept, every
//! request waited behind the lock (a 300 ms stall in a 1,000/s run). A shard
//! holds a 64th of that and blocks only the requests that hash to it.
//!
//! Memory is bounded. Every decision is kept for the replay TTL, so without a
//! bound the process grows with the request rate times a day. Entries are
//! kept small (a 32-byte digest of the fingerprint, the answer shared with
//! every other entry that gave the same one), and at most `max_keys` are
//! held. When a shard is full even after dropping what expired, it refuses
//! new keys with [`StateError::Full`]: writes then fail closed and reads go on
//! without anti-replay, as they would with Redis down. Forgetting old
//! decisions instead would let a replay of one be decided, and run, twice.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{Claim, RateLimiter, ReplayGuard, StateError};
use crate::domain::{RequestId, VerifyResponse};

/// How often expired entries are swept out of a shard, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often a full shard sweeps again to find room. Without a pause a full
/// shard would scan all its entries for every request it refuses.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Independent maps (and locks); a power of two.
const SHARDS: usize = 64;
/// Default `CASF_STATE_MAX_KEYS`.
pub const DEFAULT_MAX_KEYS: usize = 2_000_000;
/// Distinct answers a shard keeps for sharing before it starts afresh.
/// Answers come from a small set (decision, violation codes, reason), so
/// this is only reached if that ever stops being true.
const MAX_SHARED_RESPONSES: usize = 1024;

/// What a claim remembers of the payload: the SHA-256 of its fingerprint,
/// 32 bytes instead of a 64-character string.
type PayloadDigest = [u8; 32];

fn digest(fingerprint: &str) -> PayloadDigest {
    Sha256::digest(fingerprint.as_bytes()).into()
}

enum ReplayEntry {
    Pending {
        payload: PayloadDigest,
        expires: Instant,
    },
    Done {
        payload: PayloadDigest,
        response: Arc<VerifyResponse>,
        expires: Instant,
    },
}

impl ReplayEntry {
    fn expires(&self) -> Instant {
        match self {
            ReplayEntry::Pending { expires, .. } | ReplayEntry::Done { expires, .. } => *expires,
        }
    }
}

struct Window {
    count: u64,
    expires: Instant,
}

struct Maps {
    replay: HashMap<Box<str>, ReplayEntry>,
    windows: HashMap<Box<str>, Window>,
    /// One copy of each answer stored, shared by the entries that gave it.
    responses: HashSet<Arc<VerifyResponse>>,
    next_sweep: Instant,
    last_sweep: Instant,
}

impl Maps {
    fn keys(&self) -> usize {
        self.replay.len() + self.windows.len()
    }

    fn sweep(&mut self, now: Instant) {
        self.replay.retain(|_, entry| entry.expires() > now);
        self.windows.retain(|_, window| window.expires > now);
        // Answers no entry holds any more.
        self.responses
            .retain(|response| Arc::strong_count(response) > 1);
        self.next_sweep = now + SWEEP_EVERY;
        self.last_sweep = now;
    }

    fn shared(&mut self, response: &VerifyResponse) -> Arc<VerifyResponse> {
        if let Some(shared) = self.responses.get(response) {
            return shared.clone();
        }
        if self.responses.len() >= MAX_SHARED_RESPONSES {
            self.responses.clear();
        }
        let shared = Arc::new(response.clone());
        self.responses.insert(shared.clone());
        shared
    }
}

pub struct MemoryState {
    shards: Box<[Mutex<Maps>]>,
    /// Picks a key's shard (randomly seeded, like the maps themselves).
    spread: std::collections::hash_map::RandomState,
    /// Most keys one shard holds: `max_keys` spread evenly over the shards.
    shard_capacity: usize,
    max_keys: usize,
    replay_ttl: Duration,
    pending_ttl: Duration,
}

impl MemoryState {
    /// State holding at most `max_keys` replay and rate-limit keys in all
    /// (rounded up to a multiple of the shard count).
    pub fn new(replay_ttl: Duration, pending_ttl: Duration, max_keys: usize) -> Self {
        let now = Instant::now();
        MemoryState {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Maps {
                        replay: HashMap::new(),
                        windows: HashMap::new(),
                        responses: HashSet::new(),
                        next_sweep: now + SWEEP_EVERY,
                        last_sweep: now,
                    })
                })
                .collect(),
            spread: Default::default(),
            shard_capacity: max_keys.div_ceil(SHARDS).max(1),
            max_keys,
            replay_ttl,
            pending_ttl,
        }
    }

    /// Locks the shard holding `key` and drops its expired entries when a
    /// sweep is due.
    fn lock(&self, key: &str, now: Instant) -> MutexGuard<'_, Maps> {
        let mut maps = locked(&self.shards[self.spread.hash_one(key) as usize % SHARDS]);
        if now >= maps.next_sweep {
            maps.sweep(now);
        }
        maps
    }

    /// The configured bound, `CASF_STATE_MAX_KEYS` (`casf_state_max_keys`).
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Keys held in all shards (`casf_state_keys`), counted when asked.
    pub fn keys_held(&self) -> usize {
        self.shards.iter().map(|shard| locked(shard).keys()).sum()
    }

    /// Whether the shard may take one more key, sweeping it first if full
    /// (at most every [`FULL_SWEEP_EVERY`]).
    fn make_room(&self, maps: &mut Maps, now: Instant) -> Result<(), StateError> {
        if maps.keys() >= self.shard_capacity && now >= maps.last_sweep + FULL_SWEEP_EVERY {
            maps.sweep(now);
        }
        if maps.keys() >= self.shard_capacity {
            return Err(StateError::Full {
                max_keys: self.max_keys,
            });
        }
        Ok(())
    }
}

/// A shard's maps. A panic while holding the lock cannot leave them
/// half-updated (every update is a single insert or remove), so poisoning is
/// ignored.
fn locked(shard: &Mutex<Maps>) -> MutexGuard<'_, Maps> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl ReplayGuard for MemoryState {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, request_id: &RequestId, fingerprint: &str) -> Result<Claim, StateError> {
        let now = Instant::now();
        let mut maps = self.lock(request_id.as_str(), now);
        let payload = digest(fingerprint);
        let claim = match maps.replay.get(request_id.as_str()) {
            Some(entry) if entry.expires() > now => match entry {
                ReplayEntry::Pending {
                    payload: stored, ..
                } if *stored == payload => Claim::Pending,
                ReplayEntry::Done {
                    payload: stored,
                    response,
                    ..
                } if *stored == payload => Claim::Cached(VerifyResponse::clone(response)),
                _ => Claim::Mismatch,
            },
            // An expired entry is replaced in place; only a new key needs room.
            Some(_) => Claim::Claimed,
            None => {
                self.make_room(&mut maps, now)?;
                Claim::Claimed
            }
        };
        if claim == Claim::Claimed {
            let entry = ReplayEntry::Pending {
                payload,
                expires: now + self.pending_ttl,
            };
            maps.replay.insert(request_id.as_str().into(), entry);
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        request_id: &RequestId,
        fingerprint: &str,
        response: &VerifyResponse,
    ) -> Result<(), StateError> {
        let now = Instant::now();
        let mut maps = self.lock(request_id.as_str(), now);
        // The claim normally still holds the key; if it expired and was
        // swept, storing the decision needs room like any new key.
        if !maps.replay.contains_key(request_id.as_str()) {
            self.make_room(&mut maps, now)?;
        }
        let entry = ReplayEntry::Done {
            payload: digest(fingerprint),
            response: maps.shared(response),
            expires: now + self.replay_ttl,
        };
        maps.replay.insert(request_id.as_str().into(), entry);
        Ok(())
    }

    async fn release(&self, request_id: &RequestId, fingerprint: &str) -> Result<(), StateError> {
        let mut maps = self.lock(request_id.as_str(), Instant::now());
        let payload = digest(fingerprint);
        let ours = matches!(
            maps.replay.get(request_id.as_str()),
            Some(ReplayEntry::Pending { payload: stored, .. }) if *stored == payload
        );
        if ours {
            maps.replay.remove(request_id.as_str());
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
}

#[async_trait]
impl RateLimiter for MemoryState {
    async fn hit(&self, key: &str, window: Duration) -> Result<u64, StateError> {
        let now = Instant::now();
        let mut maps = self.lock(key, now);
        if !maps.windows.contains_key(key) {
            self.make_room(&mut maps, now)?;
        }
        let slot = maps.windows.entry(key.into()).or_insert(Window {
            count: 0,
            expires: now + window,
        });
        if slot.expires <= now {
            *slot = Window {
                count: 0,
                expires: now + window,
            };
        }
        slot.count += 1;
        Ok(slot.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Decision;

    fn id(s: &str) -> RequestId {
        RequestId::parse(s).unwrap()
    }

    fn state() -> MemoryState {
        MemoryState::new(
            Duration::from_secs(86_400),
            Duration::from_secs(30),
            1_000_000,
        )
    }

    fn allow() -> VerifyResponse {
        VerifyResponse::from_violations(vec![], vec![])
    }

    #[tokio::test(start_paused = true)]
    async fn claim_then_replay_then_mismatch() {
        let s = state();
        assert_eq!(s.claim(&id("a"), "f1").await.unwrap(), Claim::Claimed);
        assert_eq!(s.claim(&id("a"), "f1").await.unwrap(), Claim::Pending);
        assert_eq!(s.claim(&id("a"), "f2").await.unwrap(), Claim::Mismatch);
        s.complete(&id("a"), "f1", &allow()).await.unwrap();
        assert_eq!(
            s.claim(&id("a"), "f1").await.unwrap(),
            Claim::Cached(allow())
        );
        assert_eq!(s.claim(&id("a"), "f2").await.unwrap(), Claim::Mismatch);
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_claim_expires_after_pending_ttl_not_replay_ttl() {
        let s = state();
        assert_eq!(s.claim(&id("a"), "f").await.unwrap(), Claim::Claimed);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(s.claim(&id("a"), "f").await.unwrap(), Claim::Pending);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(s.claim(&id("a"), "f").await.unwrap(), Claim::Claimed);
    }

    #[tokio::test(start_paused = true)]
    async fn completed_decision_lives_for_the_replay_ttl() {
        let s = state();
        s.claim(&id("a"), "f").await.unwrap();
        s.complete(&id("a"), "f", &allow()).await.unwrap();
        tokio::time::advance(Duration::from_secs(86_399)).await;
        assert!(
            matches!(s.claim(&id("a"), "f").await.unwrap(), Claim::Cached(r) if r.decision == Decision::Allow)
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(s.claim(&id("a"), "f").await.unwrap(), Claim::Claimed);
    }

    #[tokio::test(start_paused = true)]
    async fn release_frees_the_id() {
        let s = state();
        s.claim(&id("a"), "f").await.unwrap();
        s.release(&id("a"), "f").await.unwrap();
        assert_eq!(s.claim(&id("a"), "g").await.unwrap(), Claim::Claimed);
    }

    #[tokio::test(start_paused = true)]
    async fn release_never_drops_a_stored_decision_or_another_claim() {
        let s = state();
        s.claim(&id("a"), "f").await.unwrap();
        s.complete(&id("a"), "f", &allow()).await.unwrap();
        s.release(&id("a"), "f").await.unwrap();
        assert_eq!(
            s.claim(&id("a"), "f").await.unwrap(),
            Claim::Cached(allow())
        );
        s.claim(&id("b"), "f").await.unwrap();
        s.release(&id("b"), "other").await.unwrap();
        assert_eq!(s.claim(&id("b"), "f").await.unwrap(), Claim::Pending);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_window_counts_and_resets() {
        let s = state();
        let hour = Duration::from_secs(3600);
        assert_eq!(s.hit("sms:p1", hour).await.unwrap(), 1);
        assert_eq!(s.hit("sms:p1", hour).await.unwrap(), 2);
        assert_eq!(s.hit("sms:p2", hour).await.unwrap(), 1);
        tokio::time::advance(hour).await;
        assert_eq!(s.hit("sms:p1", hour).await.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn every_shard_keeps_its_own_decisions() {
        let s = state();
        let ids: Vec<RequestId> = (0..1000).map(|i| id(&format!("req-{i}"))).collect();
        for (i, request_id) in ids.iter().enumerate() {
            assert_eq!(
                s.claim(request_id, "f").await.unwrap(),
                Claim::Claimed,
                "{i}"
            );
            let response = VerifyResponse::deny(&format!("V{i}"));
            s.complete(request_id, "f", &response).await.unwrap();
        }
        for (i, request_id) in ids.iter().enumerate() {
            assert_eq!(
                s.claim(request_id, "f").await.unwrap(),
                Claim::Cached(VerifyResponse::deny(&format!("V{i}")))
            );
        }
        let used = s
            .shards
            .iter()
            .filter(|shard| !shard.lock().unwrap().replay.is_empty());
        assert_eq!(used.count(), SHARDS, "1,000 ids spread over every shard");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_state_refuses_new_ids_keeps_known_ones_and_frees_room_as_they_expire() {
        // Two keys per shard: some shard fills within 2 * SHARDS + 1 claims.
        let s = MemoryState::new(
            Duration::from_secs(600),
            Duration::from_secs(30),
            2 * SHARDS,
        );
        let mut kept = Vec::new();
        let refused = loop {
            let request_id = id(&format!("req-{}", kept.len()));
            match s.claim(&request_id, "f").await {
                Ok(Claim::Claimed) => {
                    s.complete(&request_id, "f", &allow()).await.unwrap();
                    kept.push(request_id);
                }
                Ok(other) => panic!("fresh id answered {other:?}"),
                Err(error) => break (request_id, error),
            }
            assert!(kept.len() <= 2 * SHARDS, "never refused a key");
        };
        assert!(matches!(refused.1, StateError::Full { max_keys } if max_keys == 2 * SHARDS));
        assert_eq!(
            s.keys_held(),
            kept.len(),
            "the refused id left nothing behind"
        );
        for request_id in &kept {
            assert_eq!(
                s.claim(request_id, "f").await.unwrap(),
                Claim::Cached(allow())
            );
        }
        assert!(s.claim(&refused.0, "f").await.is_err(), "still full");

        tokio::time::advance(Duration::from_secs(601)).await;
        assert_eq!(s.claim(&refused.0, "f").await.unwrap(), Claim::Claimed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_shard_looks_for_expired_keys_at_most_once_a_second() {
        // One key per shard, claimed and abandoned: each expires after 30 s.
        let s = MemoryState::new(Duration::from_secs(600), Duration::from_secs(30), SHARDS);
        let mut n = 0;
        let refused = loop {
            let request_id = id(&format!("req-{n}"));
            n += 1;
            if s.claim(&request_id, "f").await.is_err() {
                break request_id;
            }
            assert!(n <= SHARDS + 1, "never refused a key");
        };
        tokio::time::advance(Duration::from_millis(29_900)).await;
        assert!(s.claim(&refused, "f").await.is_err(), "nothing expired yet");
        // Expired now, but the shard swept 0.6 s ago: still refused.
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(
            s.claim(&refused, "f").await.is_err(),
            "swept again too soon"
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(s.claim(&refused, "f").await.unwrap(), Claim::Claimed);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_windows_count_against_the_same_bound() {
        let s = MemoryState::new(Duration::from_secs(600), Duration::from_secs(30), SHARDS);
        let hour = Duration::from_secs(3600);
        let mut counted = Vec::new();
        while let Ok(count) = s.hit(&format!("sms:p{}", counted.len()), hour).await {
            assert_eq!(count, 1);
            counted.push(format!("sms:p{}", counted.len()));
            assert!(counted.len() <= SHARDS, "never refused a key");
        }
        // A window already held keeps counting when the state is full.
        assert_eq!(s.hit(&counted[0], hour).await.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn each_shard_stores_one_copy_of_an_answer_however_many_ids_gave_it() {
        let s = state();
        let denied = VerifyResponse::deny("Inv_NoSmsBurst");
        for i in 0..1000 {
            let request_id = id(&format!("req-{i}"));
            s.claim(&request_id, "f").await.unwrap();
            s.complete(&request_id, "f", &denied).await.unwrap();
        }
        for shard in s.shards.iter() {
            let maps = shard.lock().unwrap();
            assert_eq!(maps.responses.len(), 1);
            let shared = maps.responses.iter().next().unwrap();
            // The set's own reference plus one per entry of the shard.
            assert_eq!(Arc::strong_count(shared), maps.replay.len() + 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keys_held_follows_claims_releases_windows_and_sweeps() {
        let s = MemoryState::new(Duration::from_secs(600), Duration::from_secs(30), 100_000);
        for i in 0..40 {
            let request_id = id(&format!("req-{i}"));
            s.claim(&request_id, "f").await.unwrap();
            match i % 4 {
                0 => s.release(&request_id, "f").await.unwrap(),
                1 => {} // abandoned: expires after the pending TTL
                _ => s.complete(&request_id, "f", &allow()).await.unwrap(),
            }
            s.claim(&request_id, "f").await.unwrap(); // replays change nothing
        }
        s.hit("sms:p1", Duration::from_secs(60)).await.unwrap();
        s.hit("sms:p1", Duration::from_secs(60)).await.unwrap();
        // 10 released, then claimed again by the replay; 10 abandoned; 20 done.
        assert_eq!(s.keys_held(), 41);

        // Past the pending TTL and the window, the next access to each shard
        // sweeps it (3,000 ids reach all 64): the abandoned claims, the
        // re-claims and the SMS window go.
        tokio::time::advance(SWEEP_EVERY + Duration::from_secs(1)).await;
        for i in 0..3000 {
            s.claim(&id(&format!("later-{i}")), "f").await.unwrap();
        }
        assert_eq!(s.keys_held(), 20 + 3000);
    }

    #[tokio::test]
    async fn concurrent_claims_yield_exactly_one_winner() {
        let s = std::sync::Arc::new(state());
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.claim(&id("same"), "f").await.unwrap() })
            })
            .collect();
        let mut claimed = 0;
        for t in tasks {
            if t.await.unwrap() == Claim::Claimed {
                claimed += 1;
            }
        }
        assert_eq!(claimed, 1);
    }
}
