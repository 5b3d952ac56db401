//! Group commit: one task owns all appends.
//!
//! Requests queue their event on a channel and wait for their own receipt.
//! The writer takes everything queued (up to a batch limit), appends it in one
//! transaction, and answers each caller after that commit. Under load this
//! turns N fsyncs into one, and no request ever waits on a lock held across
//! another request's I/O: only the writer touches the store.

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
    /// Starts the writer task. It ends, after flushing what is queued, once
    /// every `AuditWriter` clone has been dropped.
    pub fn spawn(log: Arc<dyn AuditLog>) -> (Self, JoinHandle<()>) {
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let task = tokio::spawn(run(log, queue));
        (AuditWriter { jobs }, task)
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
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let events: Vec<NewEvent> = jobs.iter().map(|job| job.event.clone()).collect();
        let result = log.append_batch(&events).await;
        if let Err(error) = &result {
            tracing::error!(backend = log.backend(), kind = error.kind(), %error, events = events.len(), "audit batch failed");
        }
        match result {
            Ok(receipts) if receipts.len() == jobs.len() => {
                for (job, receipt) in jobs.drain(..).zip(receipts) {
                    // A caller that gave up waiting is not an error here.
                    let _ = job.done.send(Ok(receipt));
                }
            }
            Ok(receipts) => {
                let error = AuditError::Rejected(format!(
                    "store returned {} receipts for {} events",
                    receipts.len(),
                    jobs.len()
                ));
                for job in jobs.drain(..) {
                    let _ = job.done.send(Err(error.clone()));
                }
            }
            Err(error) => {
                for job in jobs.drain(..) {
                    let _ = job.done.send(Err(error.clone()));
                }
            }
        }
    }
    tracing::debug!("audit writer drained and stopped");
}
