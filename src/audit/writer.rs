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
//! already holds. Only this thread touches the spool.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::spool::Spool;
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
/// While events are spooled and no request comes, how often to try draining.
const DRAIN_RETRY: Duration = Duration::from_millis(500);

/// The spool and what to do when it cannot take an event.
pub struct SpoolSetup {
    pub spool: Spool,
    /// `CASF_AUDIT_STRICT`: an event neither appended nor spooled is
    /// reported as [`AuditError::NotRecorded`], so a write fails closed.
    pub strict: bool,
    pub metrics: SpoolMetrics,
}

struct Job {
    event: NewEvent,
    done: oneshot::Sender<Result<AppendReceipt, AuditError>>,
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

    /// [`AuditWriter::spawn`], spooling what the store cannot take. A spool
    /// left by an earlier process starts draining at once, in the background.
    pub fn spawn_with_spool(
        log: Arc<dyn AuditLog>,
        spool: Option<SpoolSetup>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        if let Some(setup) = &spool {
            setup.metrics.depth.set(setup.spool.depth() as i64);
        }
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let (stopped, on_stop) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("casf-audit-writer".into())
            .spawn(move || {
                runtime.block_on(run(log, queue, spool));
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

    /// Appends one event and waits until the batch holding it has committed.
    pub async fn append(&self, event: NewEvent) -> Result<AppendReceipt, AuditError> {
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

async fn run(
    log: Arc<dyn AuditLog>,
    mut queue: mpsc::Receiver<Job>,
    mut spool: Option<SpoolSetup>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut unreachable = false;
    if let Some(setup) = &spool
        && setup.spool.depth() > 0
    {
        tracing::warn!(events = setup.spool.depth(), path = %setup.spool.path().display(), "audit spool holds events from an earlier run; draining them into the chain");
    }
    // Whether the last drain moved a batch: then the next follows at once
    // (after any queued requests), else after DRAIN_RETRY.
    let mut draining = true;
    loop {
        let pending = spool.as_ref().is_some_and(|s| s.spool.depth() > 0);
        let received = if pending {
            let pause = if draining {
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
                batch(log.as_ref(), &mut jobs, &mut unreachable, spool.as_mut()).await;
                false
            }
            None => true,
        };
        // After a batch, drain only if that batch reached the store: a
        // second probe per batch would double what an outage costs each
        // decision. While idle, the timer probes.
        if let Some(setup) = spool.as_mut()
            && setup.spool.depth() > 0
            && (idle || !unreachable)
        {
            draining = drain_one(log.as_ref(), setup, &mut unreachable).await;
        } else if idle {
            draining = false;
        }
    }
    tracing::debug!("audit writer drained and stopped");
}

/// Appends (or spools) what was queued and answers each caller.
async fn batch(
    log: &dyn AuditLog,
    jobs: &mut Vec<Job>,
    unreachable: &mut bool,
    spool: Option<&mut SpoolSetup>,
) {
    let (events, callers): (Vec<NewEvent>, Vec<_>) =
        jobs.drain(..).map(|job| (job.event, job.done)).unzip();
    let started = std::time::Instant::now();
    let mut results = if *unreachable && let Err(error) = probe(log).await {
        events.iter().map(|_| Err(error.clone())).collect()
    } else {
        append(log, &events).await
    };
    *unreachable = results.iter().any(is_unreachable);
    if let Some(setup) = spool {
        spool_failed(setup, &events, &mut results);
    }
    tracing::trace!(
        events = events.len(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "audit batch"
    );
    for (caller, result) in callers.into_iter().zip(results) {
        // A caller that gave up waiting is not an error here.
        let _ = caller.send(result);
    }
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
    setup: &mut SpoolSetup,
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
    match setup.spool.append(&to_spool) {
        Ok(()) => {
            setup.metrics.spooled.inc_by(failed.len() as u64);
            setup.metrics.depth.set(setup.spool.depth() as i64);
        }
        Err(error) => {
            setup.metrics.lost.inc_by(failed.len() as u64);
            tracing::error!(%error, events = failed.len(), strict = setup.strict, "audit events neither appended nor spooled: lost");
            if setup.strict {
                for &i in &failed {
                    results[i] = Err(AuditError::NotRecorded(error.to_string()));
                }
            }
        }
    }
}

/// Moves the oldest spooled batch into the chain, unless the store is
/// still away. Events already in the chain (a commit whose acknowledgement
/// was lost) are skipped by `event_id`. Whether a batch was drained.
async fn drain_one(log: &dyn AuditLog, setup: &mut SpoolSetup, unreachable: &mut bool) -> bool {
    if *unreachable && probe(log).await.is_err() {
        return false;
    }
    let (events, end) = match setup.spool.peek(MAX_BATCH) {
        Ok(found) => found,
        Err(error) => {
            tracing::error!(%error, "audit spool unreadable: draining stops");
            return false;
        }
    };
    let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    let present = match log.present_event_ids(&ids).await {
        Ok(present) => present,
        Err(error) => {
            *unreachable = matches!(error, AuditError::Unavailable(_) | AuditError::Timeout);
            tracing::warn!(%error, "audit spool: cannot check the chain; drain retried later");
            return false;
        }
    };
    let fresh: Vec<NewEvent> = events
        .iter()
        .filter(|e| !present.contains(&e.event_id.to_ascii_lowercase()))
        .cloned()
        .collect();
    let results = append(log, &fresh).await;
    if results.iter().any(is_unreachable) {
        *unreachable = true;
        return false;
    }
    *unreachable = false;
    for (event, result) in fresh.iter().zip(&results) {
        if let Err(error) = result {
            // The store refuses this event for good; keeping it would stop
            // the drain for every event behind it.
            setup.metrics.lost.inc();
            tracing::error!(%error, event_id = %event.event_id, request_id = %event.request_id, "spooled audit event rejected by the store: lost");
        }
    }
    if let Err(error) = setup.spool.drained(end, events.len()) {
        tracing::error!(%error, "audit spool: cannot record the drain; events will be skipped as duplicates on the next one");
    }
    setup.metrics.depth.set(setup.spool.depth() as i64);
    tracing::info!(
        drained = fresh.len(),
        already_in_chain = events.len() - fresh.len(),
        left = setup.spool.depth(),
        "audit spool drained a batch"
    );
    true
}

/// Whether a store that was unreachable answers again.
async fn probe(log: &dyn AuditLog) -> Result<(), AuditError> {
    match tokio::time::timeout(PROBE_TIMEOUT, log.ping()).await {
        Ok(answer) => answer,
        Err(_) => Err(AuditError::Timeout),
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
        tracing::error!(backend = log.backend(), kind = error.kind(), %error, events = events.len(), "audit batch failed");
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
        tried: AtomicUsize,
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
            Ok(events
                .iter()
                .map(|e| {
                    stored.push(e.request_id.clone());
                    self.event_ids.lock().unwrap().insert(e.event_id.clone());
                    AppendReceipt {
                        id: stored.len() as i64,
                        hash: e.request_id.clone(),
                    }
                })
                .collect())
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
            let present = self.event_ids.lock().unwrap();
            Ok(ids
                .iter()
                .filter(|i| present.contains(*i))
                .cloned()
                .collect())
        }

        async fn ping(&self) -> Result<(), AuditError> {
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
        };
        (setup, metrics)
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
        let (a, b) = (event("a"), event("b"));
        Spool::open(dir.path(), 1 << 20)
            .unwrap()
            .append(&[a.clone(), b.clone()])
            .unwrap();
        // `a` was committed, but its acknowledgement was lost.
        let log = Arc::new(PickyLog::default());
        log.event_ids.lock().unwrap().insert(a.event_id.clone());
        let (setup, metrics) = spooled(dir.path(), 1 << 20, false);
        let (writer, task) = AuditWriter::spawn_with_spool(log.clone(), Some(setup)).unwrap();
        until_drained(&metrics).await;
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
