//! The chain walk behind `audit verify` and `audit digest`, fast enough for
//! years of history.
//!
//! A row's hash is recomputed from its own stored columns, its stored
//! `prev_hash` included, so that work (parsing and re-rendering the payload,
//! SHA-256) needs no other row and runs on every core, batch by batch. What
//! is left, each `prev_hash` against the previous row's `hash`, is a cheap
//! sequential pass in id order ([`ChainVerifier::push_checked`]), which gives
//! the same first break, count and hashes as checking row by row.
//!
//! Rows stream in batches from a [`ChainSource`] (a read-only store) through
//! a bounded channel: memory stays flat whatever the length of the chain.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::EventFilter;
use super::chain::{ChainVerifier, Checked, stored_hash_holds};
use super::checkpoint::Head;

/// Rows per batch handed to a hashing thread.
pub const BATCH: usize = 1024;

/// A stored row as read, its payload as the stored text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRow {
    pub id: i64,
    pub request_id: String,
    pub event_id: String,
    pub ts: String,
    pub actor: String,
    pub action: String,
    pub decision: String,
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
}

impl RawRow {
    /// Recomputes the row's own hash; keeps only what the linkage pass needs.
    pub fn check(self) -> Checked {
        let hash_holds = stored_hash_holds(
            [
                &self.request_id,
                &self.event_id,
                &self.ts,
                &self.actor,
                &self.action,
                &self.decision,
            ],
            &self.payload,
            &self.prev_hash,
            &self.hash,
        );
        Checked {
            id: self.id,
            event_id: self.event_id,
            prev_hash: self.prev_hash,
            hash: self.hash,
            hash_holds,
        }
    }
}

/// Why the audit commands could not read the chain. Each names what failed;
/// none is about writing, since these commands never write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error(
        "no audit database at {0}: set CASF_AUDIT_SQLITE to the server's file (or PG_DSN); \
         the audit commands never create one"
    )]
    NoDatabase(String),
    #[error("audit schema missing in {0}: no table audit_events; run `casf-verifier migrate`")]
    NoSchema(String),
    #[error("cannot connect to the audit store: {0}")]
    Unreachable(String),
    #[error("cannot read the audit trail: {0}")]
    Read(String),
}

/// A read-only view of a stored chain.
#[async_trait]
pub trait ChainSource: Send + Sync {
    /// Sends every row matching `filter`, in id order, in batches of about
    /// [`BATCH`]; stops early without error if `out` is closed.
    async fn stream(
        &self,
        filter: &EventFilter,
        out: mpsc::Sender<Vec<RawRow>>,
    ) -> Result<(), ReadError>;

    /// Hash of the last row before `id`, or `None` at genesis.
    async fn hash_before(&self, id: i64) -> Result<Option<String>, ReadError>;

    /// How many rows match `filter`: only for the progress line's ETA.
    async fn count(&self, filter: &EventFilter) -> Result<u64, ReadError>;

    /// The last row's id and hash and the count of rows up to it, read in
    /// one statement; [`Head::EMPTY`] for an empty chain.
    async fn head(&self) -> Result<Head, ReadError>;

    /// [`ChainSource::head`] counted from `since`, a head read earlier from
    /// this chain: its count plus the rows after it, so the cost follows
    /// what was appended since, not the whole trail. `None` when the row at
    /// `since.last_id` no longer holds `since.last_hash` (the chain below
    /// it changed): the caller counts afresh, and the checkpoints will say
    /// what changed. The default counts afresh every time.
    async fn head_since(&self, since: &Head) -> Result<Option<Head>, ReadError> {
        let _ = since;
        Ok(None)
    }
}

/// Walks every row matching `filter` in id order. Without a window the chain
/// must start at genesis; with one, the first row must link to the row just
/// before it. `progress` prints events/s and an ETA to stderr every second
/// (for a terminal; the caller decides).
pub async fn walk(
    source: &dyn ChainSource,
    filter: &EventFilter,
    progress: bool,
) -> Result<ChainVerifier, ReadError> {
    walk_watching(source, filter, progress, BTreeSet::new()).await
}

/// [`walk`] that also records the count and hash at each of `watch`
/// ([`ChainVerifier::seen_at`]): the ids of checkpoints.
pub async fn walk_watching(
    source: &dyn ChainSource,
    filter: &EventFilter,
    progress: bool,
    watch: BTreeSet<i64>,
) -> Result<ChainVerifier, ReadError> {
    let mut progress = match progress {
        true => Some(Progress::new(source.count(filter).await?)),
        false => None,
    };
    let windowed = filter.ts_window.is_some();
    let mut verifier = ChainVerifier::new((!windowed).then(String::new)).watching(watch);

    let hashers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (rows_tx, mut rows_rx) = mpsc::channel::<Vec<RawRow>>(hashers);
    let (checked_tx, checked_rx) = mpsc::channel::<(u64, Vec<Checked>)>(hashers * 2);
    let mut to_hashers = Vec::with_capacity(hashers);
    let mut threads = Vec::with_capacity(hashers);
    for _ in 0..hashers {
        let (tx, rx) = mpsc::channel::<(u64, Vec<RawRow>)>(2);
        let checked_tx = checked_tx.clone();
        to_hashers.push(tx);
        threads.push(std::thread::spawn(move || hash_batches(rx, &checked_tx)));
    }
    drop(checked_tx);

    let producing = async {
        let dispatch = async move {
            // Batch n goes to hasher n mod N: equal batches, equal shares.
            let mut seq = 0u64;
            while let Some(batch) = rows_rx.recv().await {
                let hasher = &to_hashers[(seq % to_hashers.len() as u64) as usize];
                if hasher.send((seq, batch)).await.is_err() {
                    break;
                }
                seq += 1;
            }
            // Dropping the senders here lets the hashers finish.
        };
        let (streamed, ()) = tokio::join!(source.stream(filter, rows_tx), dispatch);
        streamed
    };
    let linking = async {
        // Moved in, so that an early return also stops the hashers.
        let mut checked_rx = checked_rx;
        // Batches come back in any order; they are linked in sequence.
        let mut waiting: BTreeMap<u64, Vec<Checked>> = BTreeMap::new();
        let mut next = 0;
        while let Some((seq, batch)) = checked_rx.recv().await {
            waiting.insert(seq, batch);
            while let Some(batch) = waiting.remove(&next) {
                next += 1;
                let rows = batch.len() as u64;
                for checked in batch {
                    // Events of a window need not be neighbours in the
                    // chain: `ts` is stamped before the append queue and ids
                    // at commit, so near the window's edge an event from
                    // outside it (another process, or a request that queued
                    // later) can sit between two inside it. Each event must
                    // still link to its real predecessor by id.
                    if verifier.needs_anchor()
                        || (windowed && !verifier.links_to(&checked.prev_hash))
                    {
                        let prev = source.hash_before(checked.id).await?;
                        verifier.anchor(prev.unwrap_or_default());
                    }
                    verifier.push_checked(checked);
                }
                if let Some(progress) = &mut progress {
                    progress.advance(rows);
                }
            }
        }
        Ok::<(), ReadError>(())
    };
    // The first error drops the other side, whose channels then close.
    let outcome = tokio::try_join!(producing, linking);
    for thread in threads {
        if thread.join().is_err() {
            return Err(ReadError::Read("a hashing thread panicked".into()));
        }
    }
    if let Some(progress) = &mut progress {
        progress.finish();
    }
    outcome?;
    Ok(verifier)
}

/// One hashing thread: recomputes each row's own hash, batch by batch.
fn hash_batches(
    mut rows: mpsc::Receiver<(u64, Vec<RawRow>)>,
    out: &mpsc::Sender<(u64, Vec<Checked>)>,
) {
    while let Some((seq, batch)) = rows.blocking_recv() {
        let checked = batch.into_iter().map(RawRow::check).collect();
        if out.blocking_send((seq, checked)).is_err() {
            return;
        }
    }
}

/// Events/s and ETA on one stderr line, redrawn at most once a second.
struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    shown: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(1);

    fn new(total: u64) -> Self {
        let now = Instant::now();
        Progress {
            total,
            done: 0,
            started: now,
            shown: now,
        }
    }

    fn advance(&mut self, rows: u64) {
        self.done += rows;
        if self.shown.elapsed() < Self::EVERY {
            return;
        }
        self.shown = Instant::now();
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / seconds.max(1e-9);
        let left = self.total.saturating_sub(self.done) as f64 / rate.max(1.0);
        let percent = 100.0 * self.done as f64 / self.total.max(1) as f64;
        let mut stderr = std::io::stderr().lock();
        // A failed progress line must not fail the verification.
        let _ = write!(
            stderr,
            "\r\x1b[K{}/{} events ({percent:.0}%), {rate:.0} events/s, ETA {left:.0}s",
            self.done, self.total
        );
        let _ = stderr.flush();
    }

    fn finish(&mut self) {
        if self.shown > self.started {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}
