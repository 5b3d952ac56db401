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

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{AppendReceipt, AuditError, AuditLog, NewEvent};

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
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let (stopped, on_stop) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("casf-audit-writer".into())
            .spawn(move || {
                runtime.block_on(run(log, queue));
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

async fn run(log: Arc<dyn AuditLog>, mut queue: mpsc::Receiver<Job>) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut unreachable = false;
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let (events, callers): (Vec<NewEvent>, Vec<_>) =
            jobs.drain(..).map(|job| (job.event, job.done)).unzip();
        let started = std::time::Instant::now();
        let results = if unreachable && let Err(error) = probe(log.as_ref()).await {
            events.iter().map(|_| Err(error.clone())).collect()
        } else {
            append(log.as_ref(), &events).await
        };
        unreachable = results
            .iter()
            .any(|r| matches!(r, Err(AuditError::Unavailable(_) | AuditError::Timeout)));
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
    tracing::debug!("audit writer drained and stopped");
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
}
