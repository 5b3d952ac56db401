//! The one place that decides. Every door hands a parsed [`VerifyRequest`]
//! to [`Pipeline::decide`] and translates the [`Verdict`] back.
//!
//! A decision runs as a task of its own that owns the request, so that once
//! started it is finished (audited, then stored or released for replays)
//! whether or not its caller is still waiting: a client that disconnects
//! mid-decision must not leave a claim pending, nor an audited ALLOW that a
//! retry would decide again. A panic inside it becomes an audited fail-closed
//! deny, on every door.
//!
//! Order: anti-replay gate, hard invariants, policy, SMS rate limit, audit
//! append, then the decision is stored for replays. Violations are the union
//! of the stages', deduplicated, in stage order. Writes fail closed when a
//! dependency fails; reads go on without it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::audit::writer::AuditWriter;
use crate::audit::{AppendReceipt, NewEvent};
use crate::domain::{Decision, Mode, Tool, VerifyRequest, VerifyResponse, violation};
use crate::metrics::{Door, Metrics, Trigger};
use crate::policy::PolicyEngine;
use crate::state::{Claim, RateLimiter, ReplayGuard};

/// Audit `action` of events that answer a reused `request_id`.
pub const REPLAY_ACTION: &str = "REPLAY_DETECTED";
/// `allowed_outputs` for listing appointments in READ_ONLY.
pub const SLOTS_AGGREGATED: &str = "slots_aggregated";
/// Appended to `reason` when the decision could not be audited.
pub const AUDIT_FAILED_SUFFIX: &str = " | audit_append_failed";

/// The SMS burst limit: at most `max` sends per patient per `window`.
#[derive(Debug, Clone, Copy)]
pub struct SmsLimit {
    pub max: u64,
    pub window: Duration,
}

impl Default for SmsLimit {
    fn default() -> Self {
        SmsLimit {
            max: 1,
            window: Duration::from_secs(3600),
        }
    }
}

/// What the pipeline decided, and where it was written.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub response: VerifyResponse,
    /// The audit event of this decision, when it was appended.
    pub audit: Option<AppendReceipt>,
}

pub struct Pipeline {
    policy: Arc<dyn PolicyEngine>,
    /// `None` when `ANTI_REPLAY_ENABLED` is false.
    replay: Option<Arc<dyn ReplayGuard>>,
    limiter: Arc<dyn RateLimiter>,
    /// `None` when `CASF_DISABLE_AUDIT=1`.
    audit: Option<AuditWriter>,
    metrics: Arc<Metrics>,
    sms_limit: SmsLimit,
}

/// Violations in stage order, without duplicates, plus what failed closed.
#[derive(Default)]
struct Findings {
    violations: Vec<String>,
    triggers: Vec<Trigger>,
}

impl Findings {
    fn push(&mut self, code: &str) {
        if !self.violations.iter().any(|v| v == code) {
            self.violations.push(code.to_owned());
        }
    }

    fn fail_closed(&mut self, trigger: Trigger, code: &str) {
        self.push(violation::FAIL_CLOSED);
        self.push(code);
        if !self.triggers.contains(&trigger) {
            self.triggers.push(trigger);
        }
    }
}

/// How far a decision got, kept outside its future so that a panic inside
/// it still leaves the claim and the audited answer known.
#[derive(Default)]
struct Progress {
    fingerprint: String,
    /// This decision holds the `request_id`'s claim.
    claimed: bool,
    /// The answer once appended to the audit trail, and whether it failed
    /// closed.
    audited: Option<(Verdict, bool)>,
}

/// The answer when the verifier itself could not decide.
fn internal_error() -> VerifyResponse {
    VerifyResponse::from_violations(
        vec![
            violation::FAIL_CLOSED.to_owned(),
            violation::INTERNAL_ERROR.to_owned(),
        ],
        Vec::new(),
    )
}

/// Turns a panic while polling the inner future into `Err(())`. The future
/// is not polled again after that; only [`Progress`] is read.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

impl Pipeline {
    pub fn new(
        policy: Arc<dyn PolicyEngine>,
        replay: Option<Arc<dyn ReplayGuard>>,
        limiter: Arc<dyn RateLimiter>,
        audit: Option<AuditWriter>,
        metrics: Arc<Metrics>,
        sms_limit: SmsLimit,
    ) -> Self {
        Pipeline {
            policy,
            replay,
            limiter,
            audit,
            metrics,
            sms_limit,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Decides one tool call. Metrics are recorded here, once per call.
    ///
    /// The decision runs in its own task, which owns `request`: dropping the
    /// returned future (a client gone, Envoy's timeout) does not stop it.
    pub async fn decide(self: &Arc<Self>, request: VerifyRequest, door: Door) -> Verdict {
        let started = Instant::now();
        let pipeline = Arc::clone(self);
        let task = tokio::spawn(async move { pipeline.decide_owned(request, door, started).await });
        match task.await {
            Ok(verdict) => verdict,
            // Only reachable if the panic handling below panicked too, or the
            // runtime is shutting down: still an explicit fail-closed deny.
            Err(error) => {
                tracing::error!(%error, "decision task failed: denied (fail closed)");
                self.metrics.fail_closed(Trigger::Rules);
                self.metrics
                    .decided(door, Decision::Deny, started.elapsed());
                Verdict {
                    response: internal_error(),
                    audit: None,
                }
            }
        }
    }

    async fn decide_owned(&self, request: VerifyRequest, door: Door, started: Instant) -> Verdict {
        let _in_flight = self.metrics.in_flight();
        let mut progress = Progress::default();
        let outcome = CatchUnwind(Box::pin(self.run(&request, &mut progress))).await;
        let verdict = match outcome {
            Ok(verdict) => verdict,
            Err(()) => self.after_panic(&request, progress).await,
        };
        self.metrics
            .decided(door, verdict.response.decision, started.elapsed());
        verdict
    }

    /// A stage panicked. Before the audit append: the decision is a
    /// fail-closed deny, audited, and the claim released so a retry is
    /// decided afresh. After it: the audited answer stands and is stored (or
    /// released) as usual, so it is neither lost nor decided twice.
    async fn after_panic(&self, request: &VerifyRequest, progress: Progress) -> Verdict {
        tracing::error!(request_id = %request.request_id, "panic while deciding: denied (fail closed)");
        let (verdict, failed_closed) = match progress.audited {
            Some(audited) => audited,
            None => {
                self.metrics.fail_closed(Trigger::Rules);
                let input = request.policy_input();
                let verdict = self
                    .audited(request, input, request.tool.as_str(), internal_error())
                    .await;
                (verdict, true)
            }
        };
        if progress.claimed {
            self.store_or_release(request, &progress.fingerprint, &verdict, failed_closed)
                .await;
        }
        verdict
    }

    async fn run(&self, request: &VerifyRequest, progress: &mut Progress) -> Verdict {
        // One policy input serves the fingerprint (guide §7) and the policy.
        let input = request.policy_input();
        let fingerprint = request.fingerprint_of(&input);
        progress.fingerprint.clone_from(&fingerprint);
        let mut findings = Findings::default();

        // 1. Anti-replay gate.
        if let Some(guard) = &self.replay {
            match guard.claim(&request.request_id, &fingerprint).await {
                Ok(Claim::Claimed) => progress.claimed = true,
                Ok(Claim::Cached(response)) => {
                    self.metrics.replay_hit();
                    return self.audited(request, input, REPLAY_ACTION, response).await;
                }
                Ok(Claim::Mismatch) => {
                    self.metrics.replay_mismatch();
                    tracing::warn!(request_id = %request.request_id, "request_id reused with a different payload");
                    let response = VerifyResponse::deny(violation::REPLAY_PAYLOAD_MISMATCH);
                    return self.audited(request, input, REPLAY_ACTION, response).await;
                }
                Ok(Claim::Pending) => {
                    let response = VerifyResponse::deny(violation::REPLAY_CONCURRENT);
                    return self.audited(request, input, REPLAY_ACTION, response).await;
                }
                Err(error) if request.tool.is_write() => {
                    tracing::error!(%error, "anti-replay unavailable: write fails closed");
                    findings.fail_closed(Trigger::Redis, violation::REPLAY_CHECK_UNAVAILABLE);
                }
                Err(error) => {
                    tracing::warn!(%error, "anti-replay unavailable: read proceeds without it")
                }
            }
        }

        // 2. Hard invariants. A kill switch stops reads too, so that it
        // holds even when the policy engine is down and reads run rules-only.
        let mut allowed_outputs = Vec::new();
        match request.mode {
            Mode::KillSwitch => findings.push(violation::MODE_KILL_SWITCH),
            Mode::ReadOnly if request.tool.is_write() => {
                findings.push(violation::MODE_READ_ONLY_NO_WRITE)
            }
            Mode::ReadOnly if request.tool == Tool::ListAppointments => {
                allowed_outputs.push(SLOTS_AGGREGATED.to_owned());
            }
            _ => {}
        }

        // 3. Policy.
        match self.policy.evaluate(&input).await {
            Ok(verdict) if !verdict.allow && verdict.violations.is_empty() => {
                findings.push(violation::OPA_DENY)
            }
            Ok(verdict) => verdict.violations.iter().for_each(|v| findings.push(v)),
            Err(error) => {
                self.metrics.opa_error(error.kind());
                if request.tool.is_write() {
                    tracing::error!(%error, "policy unavailable: write fails closed");
                    findings.fail_closed(Trigger::Opa, violation::OPA_UNAVAILABLE);
                } else {
                    tracing::warn!(%error, "policy unavailable: read proceeds rules-only");
                }
            }
        }

        // 4. SMS burst limit, counted only for sends that everything else
        // allowed, so denied or replayed requests never use up the quota.
        if request.tool == Tool::SendSms && findings.violations.is_empty() {
            let key = format!("sms:{}", request.patient_id().unwrap_or_default());
            match self.limiter.hit(&key, self.sms_limit.window).await {
                Ok(count) if count > self.sms_limit.max => findings.push(violation::NO_SMS_BURST),
                Ok(_) => {}
                Err(error) => {
                    tracing::error!(%error, "SMS rate limit unavailable: send fails closed");
                    findings.fail_closed(Trigger::Redis, violation::NO_SMS_BURST);
                }
            }
        }

        for trigger in &findings.triggers {
            self.metrics.fail_closed(*trigger);
        }
        let failed_closed = !findings.triggers.is_empty();
        let response = VerifyResponse::from_violations(findings.violations, allowed_outputs);

        // 5. Audit, then 6. remember the answer for replays. A fail-closed
        // deny is not remembered: once the dependency is back, a retry with
        // the same request_id deserves a real decision.
        let verdict = self
            .audited(request, input, request.tool.as_str(), response)
            .await;
        progress.audited = Some((verdict.clone(), failed_closed));
        if progress.claimed {
            self.store_or_release(request, &fingerprint, &verdict, failed_closed)
                .await;
        }
        verdict
    }

    /// Step 6: remembers an audited answer for replays, or drops the claim
    /// of a fail-closed one.
    async fn store_or_release(
        &self,
        request: &VerifyRequest,
        fingerprint: &str,
        verdict: &Verdict,
        failed_closed: bool,
    ) {
        let Some(guard) = &self.replay else { return };
        let stored = if failed_closed {
            guard.release(&request.request_id, fingerprint).await
        } else {
            guard
                .complete(&request.request_id, fingerprint, &verdict.response)
                .await
        };
        if let Err(error) = stored {
            tracing::warn!(%error, "could not store the decision for replays; the claim will expire");
        }
    }

    /// Appends the decision to the audit trail; on failure the decision still
    /// stands, with the guide's reason suffix. `input` is the request's
    /// policy input, reused (not copied) for the audit payload.
    async fn audited(
        &self,
        request: &VerifyRequest,
        input: serde_json::Value,
        action: &str,
        mut response: VerifyResponse,
    ) -> Verdict {
        let Some(writer) = &self.audit else {
            return Verdict {
                response,
                audit: None,
            };
        };
        let event = NewEvent::now(
            request.request_id.as_str(),
            format!("role:{}", request.role),
            action,
            response.decision.as_str(),
            json!({"request": request.completed(input), "response": response}),
        );
        match writer.append(event).await {
            Ok(receipt) => Verdict {
                response,
                audit: Some(receipt),
            },
            Err(error) => {
                self.metrics.audit_failed(error.kind());
                tracing::error!(%error, request_id = %request.request_id, "audit append failed");
                response.reason.push_str(AUDIT_FAILED_SUFFIX);
                Verdict {
                    response,
                    audit: None,
                }
            }
        }
    }
}
