//! Group commit: one task owns all appends.
//!
//! The writer runs on a thread and runtime of its own. On the request
//! runtime it would queue behind every ready request task at each of the
//! transaction's round trips, and the batch (with every caller waiting on it)
//! would take many times its I/O.
//!
//! Requests queue their event on a channel and wait for their own receipt.
//! The writer takes everything queued (up to a batch limit), appends it in one
//! transaction, and answers each caller after that commit. Under load this
//! turns N fsyncs into one, and no request ever waits on a lock held across
//! another request's I/O: only the writer touches the store. A batch that the
//! store rejects (rather than cannot reach) is retried one event at a time,
//! so a single event the store refuses costs only its own audit row.
//!
//! With a spool ([`super::spool`], `CASF_AUDIT_SPOOL`), events of a batch the
//! store could not reach (or whose commit is of unknown outcome) are written
//! to the spool and synced before their callers hear of the failure. Between
//! batches, and on a timer while idle, the writer drains the spool into the
//! chain oldest first, one batch at a time, skipping events the chain
//! already holds.
//!
//! With `CASF_AUDIT_SPOOL_MODE=always` the writer only spools: each batch is
//! synced to the spool and its callers answered, with no PostgreSQL round
//! trip on their path. A shipper on a thread of its own drains the spool
//! into the chain by the same path, so a slow or absent PostgreSQL (a
//! checkpoint, an outage) delays the chain, not the answers.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::spool::{Spool, SpoolMode};
use super::{AppendReceipt, AuditError, AuditLog, NewEvent};
use crate::metrics::SpoolMetrics;

/// Most events in one transaction.
pub const MAX_BATCH: usize = 512;
/// Queued events before callers wait for room (backpressure, not loss).
const QUEUE_DEPTH: usize = 8192;
/// How long a caller waits for its batch to commit before reporting failure.
const APPEND_TIMEOUT: Duration = Duration::from_secs(5);
/// After the store was unreachable, each batch first pings it for at most
/// this long. A failed ping fails the batch at once instead of waiting out
/// the store's connect timeout, so an outage costs decisions milliseconds,
/// not seconds, and the first successful ping resumes writing.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// While events are spooled, or the store was last found away, and no
/// request comes: how often to try draining, or probing the store.
const DRAIN_RETRY: Duration = Duration::from_millis(500);
/// In `always` mode, how long the shipper lets spooled events gather before
/// it ships them, unless a full batch is waiting. At 1,000 decisions a
/// second that is about 20 events a transaction rather than one or two:
/// far fewer commits for PostgreSQL to make on the machine's shared cores,
/// for a chain that trails the answers by this much more.
const SHIP_GATHER: Duration = Duration::from_millis(20);
/// On shutdown in `always` mode, how long the shipper goes on shipping what
/// is spooled; what is left waits in the spool for the next start.
const SHIP_ON_STOP: Duration = Duration::from_secs(5);

/// The spool and what to do when it cannot take an event.
pub struct SpoolSetup {
    pub spool: Spool,
    /// `CASF_AUDIT_STRICT`: an event neither appended nor spooled is
    /// reported as [`AuditError::NotRecorded`], so a write fails closed.
    pub strict: bool,
    pub metrics: SpoolMetrics,
    /// `CASF_AUDIT_SPOOL_MODE`.
    pub mode: SpoolMode,
}

/// The spool as the writer and the shipper share it.
struct Spooled {
    spool: Mutex<Spool>,
    strict: bool,
    metrics: SpoolMetrics,
    /// In `outage` mode every spooled event went to a failed append first,
    /// so the drain always looks its batch up in the chain; in `always`
    /// mode only what [`Spool::may_be_in_chain`] counts.
    mode: SpoolMode,
}

impl Spooled {
    fn lock(&self) -> MutexGuard<'_, Spool> {
        // A panic while holding it cannot leave the file half-written (an
        // append is all or nothing), so the spool is still usable.
        self.spool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn depth(&self) -> u64 {
        self.lock().depth()
    }

    /// Publishes depth and lag (age of the oldest event not yet in the
    /// chain), read under the lock so that two threads cannot publish them
    /// out of order.
    fn report(&self) {
        let mut spool = self.lock();
        self.metrics.depth.set(spool.depth() as i64);
        let lag = match spool.oldest_ts() {
            Ok(Some(ts)) => chrono::DateTime::parse_from_rfc3339(&ts)
                .map(|ts| {
                    let age = chrono::Utc::now().signed_duration_since(ts);
                    age.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
                })
                .unwrap_or(0.0)
                .max(0.0),
            _ => 0.0,
        };
        self.metrics.lag_seconds.set(lag);
    }
}

/// What a caller hears once its event is durable: where it landed in the
/// chain, or `None` when the synced spool is its commit point (`always`
/// mode) and it reaches the chain later.
pub type Committed = Option<AppendReceipt>;

struct Job {
    event: NewEvent,
    done: oneshot::Sender<Result<Committed, AuditError>>,
}

/// The pipeline's handle on the audit trail.
#[derive(Clone)]
pub struct AuditWriter {
    jobs: mpsc::Sender<Job>,
}

impl AuditWriter {
    /// Starts the writer on its own thread. It ends, after flushing what is
    /// queued, once every `AuditWriter` clone has been dropped; the returned
    /// task completes then. Must be called within a Tokio runtime.
    pub fn spawn(log: Arc<dyn AuditLog>) -> std::io::Result<(Self, JoinHandle<()>)> {
        Self::spawn_with_spool(log, None)
    }

    /// [`AuditWriter::spawn`], spooling what the store cannot take (or, in
    /// `always` mode, everything). A spool left by an earlier process starts
    /// draining at once, in the background.
    pub fn spawn_with_spool(
        log: Arc<dyn AuditLog>,
        spool: Option<SpoolSetup>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let (stopped, on_stop) = oneshot::channel::<()>();
        let mode = spool.as_ref().map(|s| s.mode);
        let spooled = spool.map(|setup| {
            Arc::new(Spooled {
                spool: Mutex::new(setup.spool),
                strict: setup.strict,
                metrics: setup.metrics,
                mode: setup.mode,
            })
        });
        if let Some(spooled) = &spooled {
            spooled.report();
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shipper = match (&spooled, mode) {
            (Some(spooled), Some(SpoolMode::Always)) => {
                Some(Shipper::spawn(log.clone(), spooled.clone())?)
            }
            _ => None,
        };
        std::thread::Builder::new()
            .name("casf-audit-writer".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match (spooled, shipper) {
                        (Some(spooled), Some(shipper)) => {
                            run_always(log, queue, &spooled, &shipper).await;
                            shipper.stop().await;
                        }
                        (spooled, _) => run(log, queue, spooled.as_deref()).await,
                    }
                });
                let _ = stopped.send(());
            })?;
        let task = tokio::spawn(async move {
            // An error means the thread died without flushing; callers already
            // got `Closed` for whatever it held.
            if on_stop.await.is_err() {
                tracing::error!("audit writer thread ended abnormally");
            }
        });
        Ok((AuditWriter { jobs }, task))
    }

    /// Appends one event and waits until it is durable: committed in the
    /// chain, or (`always` mode) synced to the spool.
    pub async fn append(&self, event: NewEvent) -> Result<Committed, AuditError> {
        let (done, receipt) = oneshot::channel();
        self.jobs
            .send(Job { event, done })
            .await
            .map_err(|_| AuditError::Closed)?;
        match tokio::time::timeout(APPEND_TIMEOUT, receipt).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AuditError::Closed),
            Err(_) => Err(AuditError::Timeout),
        }
    }
}

/// `always` mode's background thread: ships the spool into the chain.
struct Shipper {
    /// Rung after each batch is spooled.
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    stopped: oneshot::Receiver<()>,
}

impl Shipper {
    fn spawn(log: Arc<dyn AuditLog>, spooled: Arc<Spooled>) -> std::io::Result<Self> {
        let wake = Arc::new(Notify::new());
        let (stop, stopping) = watch::channel(false);
        let (done, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let rung = wake.clone();
        std::thread::Builder::new()
            .name("casf-audit-shipper".into())
            .spawn(move || {
                runtime.block_on(ship(&log, &spooled, &rung, stopping));
                let _ = done.send(());
            })?;
        Ok(Shipper {
            wake,
            stop,
            stopped,
        })
    }

    /// Asks the shipper to ship what it can within [`SHIP_ON_STOP`], and
    /// waits for it.
    async fn stop(self) {
        let _ = self.stop.send(true);
        if self.stopped.await.is_err() {
            tracing::error!("audit shipper thread ended abnormally");
        }
    }
}

/// Drains the spool into the chain whenever it holds events: [`SHIP_GATHER`]
/// after the first event, or after a batch that moved (at once if a full
/// batch waits), and [`DRAIN_RETRY`] after one that did not (the store
/// away). On stop, goes on until the spool is empty, the store fails,
/// or [`SHIP_ON_STOP`] has passed.
async fn ship(
    log: &Arc<dyn AuditLog>,
    spooled: &Spooled,
    wake: &Notify,
    mut stopping: watch::Receiver<bool>,
) {
    let mut reach = Reach::default();
    let mut deadline = None;
    // Asked to stop, or the writer is gone.
    let mut stop = false;
    loop {
        stop = stop || *stopping.borrow();
        if stop && deadline.is_none() {
            deadline = Some(tokio::time::Instant::now() + SHIP_ON_STOP);
        }
        let moved = spooled.depth() > 0 && drain_one(log, spooled, &mut reach).await;
        spooled.report();
        let empty = spooled.depth() == 0;
        if stop && (empty || !moved || deadline.is_some_and(|d| tokio::time::Instant::now() >= d)) {
            break;
        }
        if moved && (stop || spooled.depth() >= MAX_BATCH as u64) {
            continue;
        }
        let pause = if moved { SHIP_GATHER } else { DRAIN_RETRY };
        tokio::select! {
            () = wake.notified(), if empty => {
                // The first event of a batch: let others join it.
                tokio::select! {
                    () = tokio::time::sleep(SHIP_GATHER) => {}
                    changed = stopping.changed(), if !stop => stop = changed.is_err(),
                }
            }
            () = tokio::time::sleep(pause), if !empty => {}
            changed = stopping.changed(), if !stop => stop = changed.is_err(),
        }
    }
    let left = spooled.depth();
    if left > 0 {
        tracing::warn!(
            events = left,
            "audit shipper stopped with events still spooled; the next start ships them"
        );
    }
}

/// `always` mode: every batch goes to the spool, synced, and its callers
/// are answered; the shipper takes it from there. A spool that cannot take
/// a batch (full, unwritable) falls back to a direct append, and what that
/// cannot place either is lost (or, strict, reported as not recorded).
async fn run_always(
    log: Arc<dyn AuditLog>,
    mut queue: mpsc::Receiver<Job>,
    spooled: &Spooled,
    shipper: &Shipper,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut reach = Reach::default();
    let pending = spooled.depth();
    if pending > 0 {
        tracing::warn!(
            events = pending,
            "audit spool holds events from an earlier run; shipping them into the chain"
        );
    }
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let (events, callers): (Vec<NewEvent>, Vec<_>) =
            jobs.drain(..).map(|job| (job.event, job.done)).unzip();
        let written = {
            let mut spool = spooled.lock();
            let written = spool.append(&events);
            spooled.metrics.depth.set(spool.depth() as i64);
            written
        };
        let results: Vec<Result<Committed, AuditError>> = match written {
            Ok(()) => {
                spooled.metrics.spooled.inc_by(events.len() as u64);
                shipper.wake.notify_one();
                events.iter().map(|_| Ok(None)).collect()
            }
            Err(error) => {
                tracing::error!(%error, events = events.len(), "audit spool cannot take a batch; appending it to the chain directly");
                let results = append_probed(&log, &events, &mut reach).await;
                results
                    .into_iter()
                    .map(|result| match result {
                        Ok(receipt) => Ok(Some(receipt)),
                        Err(failed) => {
                            spooled.metrics.lost.inc();
                            if spooled.strict {
                                Err(AuditError::NotRecorded(error.to_string()))
                            } else {
                                Err(failed)
                            }
                        }
                    })
                    .collect()
            }
        };
        for (caller, result) in callers.into_iter().zip(results) {
            let _ = caller.send(result);
        }
    }
    tracing::debug!("audit writer stopped; the shipper finishes");
}

async fn run(log: Arc<dyn AuditLog>, mut queue: mpsc::Receiver<Job>, spool: Option<&Spooled>) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut reach = Reach::default();
    if let Some(spooled) = spool {
        let pending = spooled.depth();
        if pending > 0 {
            tracing::warn!(events = pending, path = %spooled.lock().path().display(), "audit spool holds events from an earlier run; draining them into the chain");
        }
    }
    // Whether the last drain moved a batch: then the next follows at once
    // (after any queued requests), else after DRAIN_RETRY.
    let mut draining = true;
    loop {
        let pending = spool.is_some_and(|s| s.depth() > 0);
        let received = if pending || reach.down {
            let pause = if pending && draining {
                Duration::ZERO
            } else {
                DRAIN_RETRY
            };
            tokio::select! {
                biased;
                n = queue.recv_many(&mut jobs, MAX_BATCH) => Some(n),
                () = tokio::time::sleep(pause) => None,
            }
        } else {
            Some(queue.recv_many(&mut jobs, MAX_BATCH).await)
        };
        let idle = match received {
            Some(0) => break,
            Some(_) => {
                batch(&log, &mut jobs, &mut reach, spool).await;
                false
            }
            None => true,
        };
        // After a batch, drain only if that batch reached the store: a
        // second probe per batch would double what an outage costs each
        // decision. While idle, the timer probes.
        if let Some(spooled) = spool
            && spooled.depth() > 0
            && (idle || !reach.down)
        {
            draining = drain_one(&log, spooled, &mut reach).await;
            spooled.report();
            if draining && spooled.depth() == 0 {
                tracing::info!("audit spool drained into the chain");
            }
        } else if idle {
            draining = false;
            // Find the store again while nobody waits, so that the first
            // decision after an outage does not pay for the probe, nor fail
            // on it when a new connection is slower than PROBE_TIMEOUT.
            if reach.down && reach.probe(&log).await.is_ok() {
                reach.down = false;
                tracing::info!(backend = log.backend(), "audit store answers again");
            }
        }
    }
    tracing::debug!("audit writer drained and stopped");
}

/// Appends what was queued (spooling what the store cannot take) and
/// answers each caller.
async fn batch(
    log: &Arc<dyn AuditLog>,
    jobs: &mut Vec<Job>,
    reach: &mut Reach,
    spool: Option<&Spooled>,
) {
    let (events, callers): (Vec<NewEvent>, Vec<_>) =
        jobs.drain(..).map(|job| (job.event, job.done)).unzip();
    let started = std::time::Instant::now();
    let mut results = append_probed(log, &events, reach).await;
    if let Some(spooled) = spool {
        spool_failed(spooled, &events, &mut results);
    }
    tracing::trace!(
        events = events.len(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "audit batch"
    );
    for (caller, result) in callers.into_iter().zip(results) {
        // A caller that gave up waiting is not an error here.
        let _ = caller.send(result.map(Some));
    }
}

/// [`append`], after a probe when the store was last found unreachable;
/// updates that finding.
async fn append_probed(
    log: &Arc<dyn AuditLog>,
    events: &[NewEvent],
    reach: &mut Reach,
) -> Vec<Result<AppendReceipt, AuditError>> {
    let results = if reach.down
        && let Err(error) = reach.probe(log).await
    {
        events.iter().map(|_| Err(error.clone())).collect()
    } else {
        append(log.as_ref(), events).await
    };
    reach.down = results.iter().any(is_unreachable);
    results
}

/// The store was not reached, or the commit's outcome is unknown: the
/// event belongs in the spool. A rejected event would be rejected again.
fn is_unreachable<T>(result: &Result<T, AuditError>) -> bool {
    matches!(
        result,
        Err(AuditError::Unavailable(_) | AuditError::Timeout)
    )
}

/// Spools the events whose append failed for want of the store, in order,
/// synced, before anyone is answered. Their callers still get the store's
/// error (the chain append did fail); what the spool cannot take is lost,
/// or [`AuditError::NotRecorded`] when strict.
fn spool_failed(
    spooled: &Spooled,
    events: &[NewEvent],
    results: &mut [Result<AppendReceipt, AuditError>],
) {
    let failed: Vec<usize> = (0..events.len())
        .filter(|&i| is_unreachable(&results[i]))
        .collect();
    if failed.is_empty() {
        return;
    }
    let to_spool: Vec<NewEvent> = failed.iter().map(|&i| events[i].clone()).collect();
    let written = spooled.lock().append(&to_spool);
    match written {
        Ok(()) => {
            spooled.metrics.spooled.inc_by(failed.len() as u64);
            spooled.report();
        }
        Err(error) => {
            spooled.metrics.lost.inc_by(failed.len() as u64);
            tracing::error!(%error, events = failed.len(), strict = spooled.strict, "audit events neither appended nor spooled: lost");
            if spooled.strict {
                for &i in &failed {
                    results[i] = Err(AuditError::NotRecorded(error.to_string()));
                }
            }
        }
    }
}

/// Moves the oldest spooled batch into the chain, unless the store is
/// still away. Events already in the chain (a commit whose acknowledgement
/// was lost) are skipped by `event_id`. Whether a batch was drained. The
/// spool is locked only to read the batch and to record the drain, never
/// across the store's round trips.
async fn drain_one(log: &Arc<dyn AuditLog>, spooled: &Spooled, reach: &mut Reach) -> bool {
    if reach.down && reach.probe(log).await.is_err() {
        return false;
    }
    let (peeked, suspect) = {
        let mut spool = spooled.lock();
        (spool.peek(MAX_BATCH), spool.may_be_in_chain())
    };
    let (events, end) = match peeked {
        Ok(found) => found,
        Err(error) => {
            tracing::error!(%error, "audit spool unreadable: draining stops");
            return false;
        }
    };
    if events.is_empty() {
        return false;
    }
    // Events spooled without an append attempt cannot be in the chain, and
    // looking them up would cost each batch a round trip (and PostgreSQL an
    // index scan) for nothing.
    let present = if spooled.mode == SpoolMode::Outage || suspect > 0 {
        let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
        match log.present_event_ids(&ids).await {
            Ok(present) => present,
            Err(error) => {
                reach.down = matches!(error, AuditError::Unavailable(_) | AuditError::Timeout);
                tracing::warn!(%error, "audit spool: cannot check the chain; drain retried later");
                return false;
            }
        }
    } else {
        Default::default()
    };
    let fresh: Vec<NewEvent> = events
        .iter()
        .filter(|e| !present.contains(&e.event_id.to_ascii_lowercase()))
        .cloned()
        .collect();
    let results = append(log.as_ref(), &fresh).await;
    if results.iter().any(is_unreachable) {
        // The commit may have happened (its acknowledgement lost): the
        // next drain of these events looks them up first.
        spooled.lock().suspect_head(events.len());
        reach.down = true;
        return false;
    }
    reach.down = false;
    for (event, result) in fresh.iter().zip(&results) {
        if let Err(error) = result {
            // The store refuses this event for good; keeping it would stop
            // the drain for every event behind it.
            spooled.metrics.lost.inc();
            tracing::error!(%error, event_id = %event.event_id, request_id = %event.request_id, "spooled audit event rejected by the store: lost");
        }
    }
    let (recorded, left) = {
        let mut spool = spooled.lock();
        (spool.drained(end, events.len()), spool.depth())
    };
    if let Err(error) = recorded {
        tracing::error!(%error, "audit spool: cannot record the drain; events will be skipped as duplicates on the next one");
    }
    tracing::debug!(
        drained = fresh.len(),
        already_in_chain = events.len() - fresh.len(),
        left,
        "audit spool drained a batch"
    );
    true
}

/// Whether the store answers, as far as this thread knows.
#[derive(Default)]
struct Reach {
    /// The last batch or drain found it unreachable: probe before the next.
    down: bool,
    /// A probe still running from an earlier call.
    ping: Option<JoinHandle<Result<(), AuditError>>>,
}

impl Reach {
    /// Whether a store that was unreachable answers again, waiting at most
    /// [`PROBE_TIMEOUT`]. The ping runs as a task of this thread's runtime,
    /// and one not done in time is kept, not dropped: a new connection
    /// (TLS, SCRAM) slower than the timeout on a loaded machine completes
    /// over later calls instead of starting over and timing out each time.
    async fn probe(&mut self, log: &Arc<dyn AuditLog>) -> Result<(), AuditError> {
        let ping = self.ping.get_or_insert_with(|| {
            let log = log.clone();
            tokio::spawn(async move { log.ping().await })
        });
        match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            Err(_) => Err(AuditError::Timeout),
            Ok(joined) => {
                self.ping = None;
                joined.unwrap_or_else(|e| Err(AuditError::Unavailable(format!("ping: {e}"))))
            }
        }
    }
}

/// One result per event. A batch the store rejects (as opposed to one it
/// could not reach) is retried event by event, so that one event the store
/// refuses does not cost every other decision in its batch its audit row.
async fn append(log: &dyn AuditLog, events: &[NewEvent]) -> Vec<Result<AppendReceipt, AuditError>> {
    match checked_batch(log, events).await {
        Ok(receipts) => receipts.into_iter().map(Ok).collect(),
        Err(error @ AuditError::Rejected(_)) if events.len() > 1 => {
            tracing::warn!(backend = log.backend(), %error, events = events.len(), "audit batch rejected; appending its events one at a time");
            let mut results = Vec::with_capacity(events.len());
            for event in events {
                let one = checked_batch(log, std::slice::from_ref(event)).await;
                results.push(one.map(|mut receipts| receipts.remove(0)));
            }
            results
        }
        Err(error) => events.iter().map(|_| Err(error.clone())).collect(),
    }
}

/// `append_batch`, logged, with exactly one receipt per event or an error.
async fn checked_batch(
    log: &dyn AuditLog,
    events: &[NewEvent],
) -> Result<Vec<AppendReceipt>, AuditError> {
    let result = match log.append_batch(events).await {
        Ok(receipts) if receipts.len() == events.len() => Ok(receipts),
        Ok(receipts) => Err(AuditError::Rejected(format!(
            "store returned {} receipts for {} events",
            receipts.len(),
            events.len()
        ))),
        Err(error) => Err(error),
    };
    if let Err(error) = &result {
        tracing::error!(backend = log.backend(), kind = error.kind().as_str(), %error, events = events.len(), "audit batch failed");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{EventFilter, StoredEvent};
    use async_trait::async_trait;
    use std::sync::Mutex;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    /// Rejects any batch holding a "poison" event; counts what it stored and
    /// the appends it was asked for; its outage can be switched on and off.
    #[derive(Default)]
    struct PickyLog {
        stored: Mutex<Vec<String>>,
        event_ids: Mutex<std::collections::HashSet<String>>,
        unreachable: AtomicBool,
        /// Once: commit the next batch, then report the store unreachable
        /// (an acknowledgement lost on the way back).
        ack_lost: AtomicBool,
        tried: AtomicUsize,
        pings: AtomicUsize,
        lookups: AtomicUsize,
    }

    #[tokio::test]
    async fn after_an_outage_batches_fail_on_the_ping_and_resume_when_it_answers() {
        let log = Arc::new(PickyLog::default());
        let (writer, task) = AuditWriter::spawn(log.clone()).unwrap();

        log.unreachable.store(true, SeqCst);
        assert!(matches!(
            writer.append(event("a")).await,
            Err(AuditError::Unavailable(_))
        ));
        assert_eq!(log.tried.load(SeqCst), 1);
        // Still down: the ping fails and the store's append is not even tried.
        assert!(matches!(
            writer.append(event("b")).await,
            Err(AuditError::Unavailable(_))
        ));
        assert_eq!(log.tried.load(SeqCst), 1);

        log.unreachable.store(false, SeqCst);
        assert!(writer.append(event("c")).await.is_ok());
        assert_eq!(log.tried.load(SeqCst), 2);
        drop(writer);
        task.await.unwrap();
    }

    /// Runs `run` on the test's own runtime, so that a paused clock drives
    /// its timers; one append through it.
    async fn append_via(jobs: &mpsc::Sender<Job>, request_id: &str) -> Result<(), AuditError> {
        let (done, receipt) = oneshot::channel();
        let job = Job {
            event: event(request_id),
            done,
        };
        assert!(jobs.send(job).await.is_ok(), "writer stopped");
        receipt.await.expect("answered").map(drop)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_writer_finds_the_store_again_before_the_next_decision() {
        let log = Arc::new(PickyLog::default());
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let writer = tokio::spawn(run(log.clone(), queue, None));

        log.unreachable.store(true, SeqCst);
        assert!(append_via(&jobs, "a").await.is_err());
        log.unreachable.store(false, SeqCst);
        // Virtual time: nothing but the writer's own timer runs meanwhile.
        tokio::time::sleep(DRAIN_RETRY * 2).await;
        let pinged = log.pings.load(SeqCst);
        assert!(pinged >= 1, "the idle writer probed the store");

        // The next decision goes straight to the store, without a probe.
        assert!(append_via(&jobs, "b").await.is_ok());
        assert_eq!(log.pings.load(SeqCst), pinged);
        assert_eq!(*log.stored.lock().unwrap(), ["b"]);

        // Up again, the idle writer stops probing.
        tokio::time::sleep(DRAIN_RETRY * 4).await;
        assert_eq!(log.pings.load(SeqCst), pinged);
        drop(jobs);
        writer.await.unwrap();
    }

    #[async_trait]
    impl AuditLog for PickyLog {
        fn backend(&self) -> &'static str {
            "picky"
        }

        async fn append_batch(
            &self,
            events: &[NewEvent],
        ) -> Result<Vec<AppendReceipt>, AuditError> {
            self.tried.fetch_add(1, SeqCst);
            if self.unreachable.load(SeqCst) {
                return Err(AuditError::Unavailable("down".into()));
            }
            if events.iter().any(|e| e.request_id == "poison") {
                return Err(AuditError::Rejected("bad value".into()));
            }
            let mut stored = self.stored.lock().unwrap();
            let receipts = events
                .iter()
                .map(|e| {
                    stored.push(e.request_id.clone());
                    self.event_ids.lock().unwrap().insert(e.event_id.clone());
                    AppendReceipt {
                        id: stored.len() as i64,
                        hash: e.request_id.clone(),
                    }
                })
                .collect();
            if self.ack_lost.swap(false, SeqCst) {
                return Err(AuditError::Unavailable("connection reset".into()));
            }
            Ok(receipts)
        }

        async fn page(
            &self,
            _: &EventFilter,
            _: i64,
            _: u32,
        ) -> Result<Vec<StoredEvent>, AuditError> {
            Ok(Vec::new())
        }

        async fn hash_before(&self, _: i64) -> Result<Option<String>, AuditError> {
            Ok(None)
        }

        async fn present_event_ids(
            &self,
            ids: &[String],
        ) -> Result<std::collections::HashSet<String>, AuditError> {
            self.ping().await?;
            self.lookups.fetch_add(1, SeqCst);
            let present = self.event_ids.lock().unwrap();
            Ok(ids
                .iter()
                .filter(|i| present.contains(*i))
                .cloned()
                .collect())
        }

        async fn ping(&self) -> Result<(), AuditError> {
            self.pings.fetch_add(1, SeqCst);
            if self.unreachable.load(SeqCst) {
                return Err(AuditError::Unavailable("down".into()));
            }
            Ok(())
        }
    }

    fn event(request_id: &str) -> NewEvent {
        NewEvent::now(
            request_id,
            "role:nurse".into(),
            "t",
            "ALLOW",
            serde_json::json!({}),
        )
    }

    #[tokio::test]
    async fn a_rejected_event_does_not_take_its_batch_down() {
        let log = PickyLog::default();
        let events = [event("a"), event("poison"), event("b")];
        let results = append(&log, &events).await;
        assert!(matches!(results[0], Ok(AppendReceipt { id: 1, .. })));
        assert!(matches!(results[1], Err(AuditError::Rejected(_))));
        assert!(matches!(results[2], Ok(AppendReceipt { id: 2, .. })));
        assert_eq!(*log.stored.lock().unwrap(), ["a", "b"]);
    }

    #[tokio::test]
    async fn an_unreachable_store_fails_the_batch_without_retrying_each_event() {
        let log = PickyLog {
            unreachable: AtomicBool::new(true),
            ..PickyLog::default()
        };
        let results = append(&log, &[event("a"), event("b")]).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(AuditError::Unavailable(_))))
        );
    }

    fn spooled(dir: &std::path::Path, max_bytes: u64, strict: bool) -> (SpoolSetup, SpoolMetrics) {
        let metrics = SpoolMetrics::default();
        let setup = SpoolSetup {
            spool: Spool::open(dir, max_bytes).unwrap(),
            strict,
            metrics: metrics.clone(),
            mode: SpoolMode::Outage,
        };
        (setup, metrics)
    }

    fn always(dir: &std::path::Path, max_bytes: u64, strict: bool) -> (SpoolSetup, SpoolMetrics) {
        let (mut setup, metrics) = spooled(dir, max_bytes, strict);
        setup.mode = SpoolMode::Always;
        (setup, metrics)
    }

    #[tokio::test]
    async fn always_mode_answers_from_the_spool_and_ships_in_order_through_an_outage() {
        let dir = tempfile::tempdir().unwrap();
        let (setup, metrics) = always(dir.path(), crate::audit::spool::DEFAULT_MAX_BYTES, false);
        let log = Arc::new(PickyLog::default());
        let (writer, task) = AuditWriter::spawn_with_spool(log.clone(), Some(setup)).unwrap();
        // Committed to the spool: no receipt, and no error, store or not.
        assert!(matches!(writer.append(event("a")).await, Ok(None)));
        until_drained(&metrics).await;
        assert_eq!(*log.stored.lock().unwrap(), ["a"]);
        log.unreachable.store(true, SeqCst);
        for id in ["b", "c", "d"] {
            assert!(matches!(writer.append(event(id)).await, Ok(None)));
        }
        assert_eq!(metrics.spooled.get(), 4);
        assert!(metrics.depth.get() > 0);
        log.unreachable.store(false, SeqCst);
        until_drained(&metrics).await;
        assert_eq!(*log.stored.lock().unwrap(), ["a", "b", "c", "d"]);
        assert_eq!(metrics.lost.get(), 0);
        assert_eq!(metrics.lag_seconds.get(), 0.0);
        drop(writer);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn always_mode_looks_up_only_events_that_may_already_be_in_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer, task, metrics) = drained_left_behind(dir.path(), SpoolMode::Always).await;
        assert_eq!(*log.stored.lock().unwrap(), ["b"]);
        let looked_up = log.lookups.load(SeqCst);
        assert!(looked_up >= 1, "events left behind are looked up");

        // Spooled by this run and never tried: shipped without a lookup.
        assert!(matches!(writer.append(event("c")).await, Ok(None)));
        until_drained(&metrics).await;
        assert_eq!(*log.stored.lock().unwrap(), ["b", "c"]);
        assert_eq!(log.lookups.load(SeqCst), looked_up);

        // A shipment committed whose acknowledgement was lost: looked up
        // before it is shipped again, so it is not in the chain twice.
        log.ack_lost.store(true, SeqCst);
        assert!(matches!(writer.append(event("d")).await, Ok(None)));
        until_drained(&metrics).await;
        assert_eq!(*log.stored.lock().unwrap(), ["b", "c", "d"]);
        assert!(log.lookups.load(SeqCst) > looked_up);
        drop(writer);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn always_mode_ships_what_is_left_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (setup, _) = always(dir.path(), crate::audit::spool::DEFAULT_MAX_BYTES, false);
        let log = Arc::new(PickyLog::default());
        let (writer, task) = AuditWriter::spawn_with_spool(log.clone(), Some(setup)).unwrap();
        let ids: Vec<String> = (0..50).map(|i| format!("e{i}")).collect();
        let answers =
            futures::future::join_all(ids.iter().map(|id| writer.append(event(id)))).await;
        assert!(answers.iter().all(|a| matches!(a, Ok(None))));
        drop(writer);
        task.await.unwrap();
        // Every answered event is in the chain once the writer has stopped.
        let mut stored = log.stored.lock().unwrap().clone();
        stored.sort();
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(stored, expected);
        assert_eq!(crate::audit::spool::waiting(dir.path()).unwrap(), 0);
    }

    #[tokio::test]
    async fn always_mode_with_a_full_spool_appends_directly_or_is_lost() {
        for strict in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (setup, metrics) = always(dir.path(), 10, strict);
            let log = Arc::new(PickyLog::default());
            let (writer, task) = AuditWriter::spawn_with_spool(log.clone(), Some(setup)).unwrap();
            assert!(matches!(writer.append(event("a")).await, Ok(Some(_))));
            log.unreachable.store(true, SeqCst);
            let result = writer.append(event("b")).await;
            if strict {
                assert!(
                    matches!(result, Err(AuditError::NotRecorded(_))),
                    "{result:?}"
                );
            } else {
                assert!(
                    matches!(result, Err(AuditError::Unavailable(_))),
                    "{result:?}"
                );
            }
            assert_eq!((metrics.lost.get(), metrics.spooled.get()), (1, 0));
            assert_eq!(*log.stored.lock().unwrap(), ["a"]);
            drop(writer);
            task.await.unwrap();
        }
    }

    /// A writer in `mode` on a spool an earlier run left holding `a` and
    /// `b`, of which `a` reached the chain (its commit acknowledged too late
    /// to be recorded), once it has drained that spool.
    async fn drained_left_behind(
        dir: &std::path::Path,
        mode: SpoolMode,
    ) -> (Arc<PickyLog>, AuditWriter, JoinHandle<()>, SpoolMetrics) {
        let (a, b) = (event("a"), event("b"));
        Spool::open(dir, 1 << 20)
            .unwrap()
            .append(&[a.clone(), b])
            .unwrap();
        let log = Arc::new(PickyLog::default());
        log.event_ids.lock().unwrap().insert(a.event_id.clone());
        let (mut setup, metrics) = spooled(dir, 1 << 20, false);
        setup.mode = mode;
        let (writer, task) = AuditWriter::spawn_with_spool(log.clone(), Some(setup)).unwrap();
        until_drained(&metrics).await;
        (log, writer, task, metrics)
    }

    async fn until_drained(metrics: &SpoolMetrics) {
        for _ in 0..100 {
            if metrics.depth.get() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("spool still holds {} events", metrics.depth.get());
    }

    #[tokio::test]
    async fn an_outage_is_spooled_and_drained_in_order_once_the_store_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let (setup, metrics) = spooled(dir.path(), crate::audit::spool::DEFAULT_MAX_BYTES, false);
        let log = Arc::new(PickyLog::default());
        let (writer, task) = AuditWriter::spawn_with_spool(log.clone(), Some(setup)).unwrap();
        log.unreachable.store(true, SeqCst);
        for id in ["a", "b", "c"] {
            // The caller still hears that the chain append failed.
            assert!(matches!(
                writer.append(event(id)).await,
                Err(AuditError::Unavailable(_))
            ));
        }
        assert_eq!(metrics.spooled.get(), 3);
        assert_eq!(metrics.depth.get(), 3);
        log.unreachable.store(false, SeqCst);
        until_drained(&metrics).await;
        assert!(writer.append(event("d")).await.is_ok());
        assert_eq!(*log.stored.lock().unwrap(), ["a", "b", "c", "d"]);
        assert_eq!(metrics.lost.get(), 0);
        drop(writer);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_spool_left_behind_drains_at_start_without_duplicating_what_landed() {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer, task, _) = drained_left_behind(dir.path(), SpoolMode::Outage).await;
        assert_eq!(*log.stored.lock().unwrap(), ["b"]);
        drop(writer);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_full_spool_is_lost_or_when_strict_not_recorded() {
        for strict in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (setup, metrics) = spooled(dir.path(), 10, strict);
            let log = Arc::new(PickyLog::default());
            log.unreachable.store(true, SeqCst);
            let (writer, task) = AuditWriter::spawn_with_spool(log, Some(setup)).unwrap();
            let result = writer.append(event("a")).await;
            if strict {
                assert!(matches!(result, Err(AuditError::NotRecorded(_))));
            } else {
                assert!(matches!(result, Err(AuditError::Unavailable(_))));
            }
            assert_eq!((metrics.lost.get(), metrics.spooled.get()), (1, 0));
            drop(writer);
            task.await.unwrap();
        }
    }
}
