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

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Claim, RateLimiter, ReplayGuard, StateError};
use crate::domain::{RequestId, VerifyResponse};

/// How often expired entries are swept out of a shard, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Independent maps (and locks); a power of two.
const SHARDS: usize = 64;

enum ReplayEntry {
    Pending {
        fingerprint: String,
        expires: Instant,
    },
    Done {
        fingerprint: String,
        response: VerifyResponse,
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
    replay: HashMap<String, ReplayEntry>,
    windows: HashMap<String, Window>,
    next_sweep: Instant,
}

pub struct MemoryState {
    shards: Box<[Mutex<Maps>]>,
    /// Picks a key's shard (randomly seeded, like the maps themselves).
    spread: std::collections::hash_map::RandomState,
    replay_ttl: Duration,
    pending_ttl: Duration,
}

impl MemoryState {
    pub fn new(replay_ttl: Duration, pending_ttl: Duration) -> Self {
        let next_sweep = Instant::now() + SWEEP_EVERY;
        MemoryState {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Maps {
                        replay: HashMap::new(),
                        windows: HashMap::new(),
                        next_sweep,
                    })
                })
                .collect(),
            spread: Default::default(),
            replay_ttl,
            pending_ttl,
        }
    }

    /// Locks the shard holding `key` and drops its expired entries when a
    /// sweep is due.
    fn lock(&self, key: &str, now: Instant) -> MutexGuard<'_, Maps> {
        let shard = &self.shards[self.spread.hash_one(key) as usize % SHARDS];
        // A panic while holding the lock cannot leave the maps half-updated
        // (every update is a single insert or remove), so poisoning is ignored.
        let mut maps = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if now >= maps.next_sweep {
            maps.replay.retain(|_, entry| entry.expires() > now);
            maps.windows.retain(|_, window| window.expires > now);
            maps.next_sweep = now + SWEEP_EVERY;
        }
        maps
    }
}

#[async_trait]
impl ReplayGuard for MemoryState {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, request_id: &RequestId, fingerprint: &str) -> Result<Claim, StateError> {
        let now = Instant::now();
        let mut maps = self.lock(request_id.as_str(), now);
        let claim = match maps.replay.get(request_id.as_str()) {
            Some(entry) if entry.expires() > now => match entry {
                ReplayEntry::Pending {
                    fingerprint: stored,
                    ..
                } if stored == fingerprint => Claim::Pending,
                ReplayEntry::Done {
                    fingerprint: stored,
                    response,
                    ..
                } if stored == fingerprint => Claim::Cached(response.clone()),
                _ => Claim::Mismatch,
            },
            _ => Claim::Claimed,
        };
        if claim == Claim::Claimed {
            let entry = ReplayEntry::Pending {
                fingerprint: fingerprint.to_owned(),
                expires: now + self.pending_ttl,
            };
            maps.replay.insert(request_id.as_str().to_owned(), entry);
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
        let entry = ReplayEntry::Done {
            fingerprint: fingerprint.to_owned(),
            response: response.clone(),
            expires: now + self.replay_ttl,
        };
        self.lock(request_id.as_str(), now)
            .replay
            .insert(request_id.as_str().to_owned(), entry);
        Ok(())
    }

    async fn release(&self, request_id: &RequestId, fingerprint: &str) -> Result<(), StateError> {
        let mut maps = self.lock(request_id.as_str(), Instant::now());
        let ours = matches!(
            maps.replay.get(request_id.as_str()),
            Some(ReplayEntry::Pending { fingerprint: stored, .. }) if stored == fingerprint
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
        let slot = maps.windows.entry(key.to_owned()).or_insert(Window {
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
        MemoryState::new(Duration::from_secs(86_400), Duration::from_secs(30))
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
