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
//! Order: anti-replay gate, hard invariants (the caller's grants first),
//! policy, SMS rate limit, audit
//! append, then the decision is stored for replays. Violations are the union
//! of the stages', deduplicated, in stage order. Writes fail closed when a
//! dependency fails; reads go on without it.

use crate::telemetry::TraceParent;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::Instrument;

use crate::audit::writer::AuditWriter;
use crate::audit::{AppendReceipt, AuditError, NewEvent};
use crate::callers::{self, Callers};
use crate::domain::{Decision, Mode, Tool, VerifyRequest, VerifyResponse, violation};
use crate::ext_authz::routes::RouteMap;
use crate::log_limit::LogLimiter;
use crate::metrics::{Door, Metrics, Trigger};
use crate::mode_floor::{ModeFloor, stricter};
use crate::policy::live::{LivePolicy, PolicySet};
use crate::policy::{PolicyEngine, PolicyError, PolicyVerdict};
use crate::state::{Claim, RateLimiter, ReplayGuard, StateError};

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
    /// The audit event of this decision, when it was appended to the chain
    /// (`None` also when `CASF_AUDIT_SPOOL_MODE=always` made the synced
    /// spool its commit point: it reaches the chain after the answer).
    pub audit: Option<AppendReceipt>,
    /// The mode the decision ran under, when the operator's floor made it
    /// stricter than the caller's (doors show it as `x-casf-mode-applied`).
    pub floor_applied: Option<Mode>,
    /// The call is in shadow: `response` is the real decision, audited and
    /// stored as such, and the door is answered with
    /// [`VerifyResponse::shadowed`] (done once, in [`Pipeline::decide`]).
    pub shadow: bool,
}

pub struct Pipeline {
    /// The policy set in force (policy, route map, hash); see
    /// [`crate::policy::live`].
    live: Arc<LivePolicy>,
    /// `CASF_ENFORCE`: false puts every call in shadow.
    enforce: bool,
    /// `CASF_POLICY_CANDIDATE_DIR`: evaluated beside the live policy, never
    /// deciding.
    candidate: Option<Arc<dyn PolicyEngine>>,
    /// `None` when `ANTI_REPLAY_ENABLED` is false.
    replay: Option<Arc<dyn ReplayGuard>>,
    limiter: Arc<dyn RateLimiter>,
    /// `None` when `CASF_DISABLE_AUDIT=1`.
    audit: Option<AuditWriter>,
    metrics: Arc<Metrics>,
    sms_limit: SmsLimit,
    floor: Arc<ModeFloor>,
    /// `CASF_CALLERS`: every request must come with a caller, whose grants
    /// bound what it may claim.
    callers: Option<Arc<Callers>>,
    /// A dependency's failures repeat per request while it is down: one
    /// line a second per site and kind (state store, policy). Audit append
    /// failures are not limited: each line records a decision with no row.
    failure_log: LogLimiter,
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

/// What an audit row records beside the request and response: the policy
/// set that decided, whether the answer was shadowed, and the candidate
/// policy's answer where it differed.
struct Stamp<'a> {
    set: &'a PolicySet,
    shadow: bool,
    candidate: Option<serde_json::Value>,
    /// The engine's own name for the policy that decided (OPA's bundle
    /// revisions), when it gave one.
    revision: Option<String>,
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
/// Whether the audit step itself turned the answer into a fail-closed deny.
fn audit_failed_closed(verdict: &Verdict) -> bool {
    verdict
        .response
        .violations
        .iter()
        .any(|v| v == violation::AUDIT_UNRECORDED)
}

fn internal_error() -> VerifyResponse {
    VerifyResponse::from_violations(
        vec![
            violation::FAIL_CLOSED.to_owned(),
            violation::INTERNAL_ERROR.to_owned(),
        ],
        Vec::new(),
    )
}

/// Why a floor of `mode` denies `tool` outright, for a stored ALLOW that
/// must not be replayed past it: the invariants' codes, and the policy's
/// deny for a write in STEP_UP.
fn floor_denial(mode: Mode, tool: Tool) -> Option<&'static str> {
    match mode {
        Mode::KillSwitch => Some(violation::MODE_KILL_SWITCH),
        Mode::ReadOnly if tool.is_write() => Some(violation::MODE_READ_ONLY_NO_WRITE),
        Mode::StepUp if tool.is_write() => Some(violation::OPA_DENY),
        _ => None,
    }
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
            live: Arc::new(LivePolicy::fixed(PolicySet::fixed(
                policy,
                RouteMap::empty(),
            ))),
            enforce: true,
            candidate: None,
            replay,
            limiter,
            audit,
            metrics,
            sms_limit,
            floor: Arc::new(ModeFloor::default()),
            callers: None,
            failure_log: LogLimiter::default(),
        }
    }

    /// Decides under `floor` (see [`crate::mode_floor`]); ALLOW otherwise.
    pub fn with_mode_floor(mut self, floor: Arc<ModeFloor>) -> Self {
        self.metrics.mode_floor(floor.get());
        self.floor = floor;
        self
    }

    /// Requires a caller on every request, and holds each to its grants
    /// (see [`crate::callers`]). Doors resolve credentials with these callers.
    pub fn with_callers(self, callers: Arc<Callers>) -> Self {
        self.metrics.callers_authenticated(true);
        Pipeline {
            callers: Some(callers),
            ..self
        }
    }

    /// The callers, when `CASF_CALLERS` is set.
    pub fn callers(&self) -> Option<&Arc<Callers>> {
        self.callers.as_ref()
    }

    /// The operator's floor, for `/admin/mode`.
    pub fn mode_floor(&self) -> &Arc<ModeFloor> {
        &self.floor
    }

    /// Decides with `live`'s policy set, which may be reloaded while serving.
    pub fn with_live_policy(mut self, live: Arc<LivePolicy>) -> Self {
        let set = live.current();
        self.metrics.policy_live(None, &set.hash);
        self.metrics.shadow_routes(set.routes.shadowed_routes());
        self.live = live;
        self
    }

    /// `CASF_ENFORCE`: `false` answers ALLOW to every call that is not
    /// failed closed, with the real decision beside it (shadow mode).
    pub fn with_enforce(mut self, enforce: bool) -> Self {
        self.metrics.shadow_global(!enforce);
        self.enforce = enforce;
        self
    }

    /// `CASF_POLICY_CANDIDATE_DIR`: a policy evaluated beside the live one
    /// on every decision, recorded where they disagree, never deciding.
    pub fn with_candidate(mut self, candidate: Arc<dyn PolicyEngine>) -> Self {
        self.candidate = Some(candidate);
        self
    }

    /// The policy set in force, and its reloads.
    pub fn live(&self) -> &Arc<LivePolicy> {
        &self.live
    }

    /// `CASF_ENFORCE`.
    pub fn enforcing(&self) -> bool {
        self.enforce
    }

    /// Counts a state store failure, and tells whether a line may be logged
    /// for it now (with how many were left out since the last one).
    fn state_failed(&self, site: &'static str, error: &StateError) -> Option<u64> {
        self.metrics.state_error(error.kind());
        self.failure_log.admit(site, error.kind().as_str())
    }

    /// [`Self::state_failed`] for the policy engine.
    fn policy_failed(&self, site: &'static str, error: &PolicyError) -> Option<u64> {
        self.metrics.opa_error(error.kind());
        self.failure_log.admit(site, error.kind().as_str())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Decides one tool call. Metrics are recorded here, once per call.
    ///
    /// The decision runs in its own task, which owns `request`: dropping the
    /// returned future (a client gone, Envoy's timeout) does not stop it.
    pub async fn decide(self: &Arc<Self>, request: VerifyRequest, door: Door) -> Verdict {
        self.decide_traced(request, door, None).await
    }

    /// [`Self::decide`], as a child of the caller's trace when the door
    /// found a W3C `traceparent` (and OpenTelemetry is on).
    pub async fn decide_traced(
        self: &Arc<Self>,
        request: VerifyRequest,
        door: Door,
        parent: Option<TraceParent>,
    ) -> Verdict {
        let set = self.live.current();
        self.decide_with(request, door, parent, set).await
    }

    /// [`Self::decide_traced`] under the policy set `set`, which the door
    /// already used to translate the call (ext_authz's route map).
    pub async fn decide_with(
        self: &Arc<Self>,
        request: VerifyRequest,
        door: Door,
        parent: Option<TraceParent>,
        set: Arc<PolicySet>,
    ) -> Verdict {
        let started = Instant::now();
        // Every log event of the decision, in whatever task, carries its
        // request_id through this span.
        let span = crate::telemetry::decision_span(&request, door);
        crate::telemetry::set_parent(&span, parent.as_ref());
        let pipeline = Arc::clone(self);
        let task = tokio::spawn(
            async move { pipeline.decide_owned(request, door, started, set).await }
                .instrument(span.clone()),
        );
        match task.instrument(span.clone()).await {
            Ok(verdict) => verdict,
            // Only reachable if the panic handling below panicked too, or the
            // runtime is shutting down: still an explicit fail-closed deny.
            Err(error) => {
                let _entered = span.enter();
                tracing::error!(%error, "decision task failed: denied (fail closed)");
                self.metrics.fail_closed(Trigger::Rules);
                self.metrics
                    .decided(door, Decision::Deny, started.elapsed());
                Verdict {
                    response: internal_error(),
                    audit: None,
                    floor_applied: None,
                    shadow: false,
                }
            }
        }
    }

    async fn decide_owned(
        &self,
        request: VerifyRequest,
        door: Door,
        started: Instant,
        set: Arc<PolicySet>,
    ) -> Verdict {
        let _in_flight = self.metrics.in_flight();
        let mut progress = Progress::default();
        let outcome = CatchUnwind(Box::pin(self.run(&request, &mut progress, &set))).await;
        let mut verdict = match outcome {
            Ok(verdict) => verdict,
            Err(()) => self.after_panic(&request, progress, &set).await,
        };
        let elapsed = started.elapsed();
        // Counted (and logged) as decided; only the answer is shadowed.
        self.metrics
            .decided(door, verdict.response.decision, elapsed);
        crate::telemetry::decision_log(door, &request, &verdict, elapsed);
        if verdict.shadow {
            self.metrics.shadow_decision(verdict.response.decision);
            verdict.response = verdict.response.shadowed();
        }
        verdict
    }

    /// Whether a call answered `response` is in shadow: shadow is on for it
    /// (globally or on its route) and nothing failed closed. The operator's
    /// floor and the anti-replay gate's own denials are never shadowed
    /// either; their callers pass `false`.
    fn shadowed(
        &self,
        set: &PolicySet,
        request: &VerifyRequest,
        response: &VerifyResponse,
    ) -> bool {
        (!self.enforce || !set.routes.enforced(request.tool))
            && !response.failed_closed()
            // A caller outside its grants is refused as the floor is: shadow
            // trials a policy, it does not lend a caller another's rights.
            && !response.violations.iter().any(|code| callers::is_grant_violation(code))
    }

    /// Evaluates the candidate policy on the input the live one saw, and
    /// says what it would have answered where the two differ.
    async fn compare_candidate(
        &self,
        input: &serde_json::Value,
        live: &Result<PolicyVerdict, crate::policy::PolicyError>,
    ) -> Option<serde_json::Value> {
        let candidate = self.candidate.as_ref()?;
        let policy_decision = |verdict: &PolicyVerdict| {
            if verdict.allow && verdict.violations.is_empty() {
                Decision::Allow
            } else {
                Decision::Deny
            }
        };
        let live = live.as_ref().ok()?;
        match candidate.evaluate(input).await {
            Ok(verdict) if verdict.same_outcome(live) => None,
            Ok(verdict) => {
                let (live_decision, decision) = (policy_decision(live), policy_decision(&verdict));
                self.metrics.policy_disagreement(live_decision, decision);
                Some(json!({
                    "decision": decision.as_str(),
                    "violations": verdict.violations,
                    "live_decision": live_decision.as_str(),
                }))
            }
            Err(error) => {
                tracing::debug!(%error, "candidate policy gave no answer");
                None
            }
        }
    }

    /// A stage panicked. Before the audit append: the decision is a
    /// fail-closed deny, audited, and the claim released so a retry is
    /// decided afresh. After it: the audited answer stands and is stored (or
    /// released) as usual, so it is neither lost nor decided twice.
    async fn after_panic(
        &self,
        request: &VerifyRequest,
        progress: Progress,
        set: &PolicySet,
    ) -> Verdict {
        tracing::error!("panic while deciding: denied (fail closed)");
        let (verdict, failed_closed) = match progress.audited {
            Some(audited) => audited,
            None => {
                self.metrics.fail_closed(Trigger::Rules);
                let input = request.policy_input();
                let verdict = self
                    .audited(request, input, request.tool.as_str(), internal_error(), set)
                    .await;
                (verdict, true)
            }
        };
        if progress.claimed {
            // If storing is what panicked, it may panic again: the claim is
            // then left to expire, and the audited answer still stands.
            let stored =
                self.store_or_release(request, &progress.fingerprint, &verdict, failed_closed);
            if CatchUnwind(Box::pin(stored)).await.is_err() {
                tracing::error!(
                    "panic while storing the decision; its claim expires with the pending TTL"
                );
            }
        }
        verdict
    }

    async fn run(
        &self,
        request: &VerifyRequest,
        progress: &mut Progress,
        set: &PolicySet,
    ) -> Verdict {
        // One policy input serves the fingerprint (guide §7) and the policy.
        let input = request.policy_input();
        // Bound to the caller: nobody gets another caller's stored decision.
        let fingerprint =
            callers::bind_fingerprint(request.fingerprint_of(&input), request.caller_name());
        progress.fingerprint.clone_from(&fingerprint);
        let mut findings = Findings::default();
        // The operator's floor, read once as the decision starts. The
        // fingerprint stays the caller's request: a retry after the floor
        // moves is the same request, not a mismatch.
        let mode = stricter(request.mode, self.floor.get());
        let floor_applied = (mode != request.mode).then_some(mode);
        // What the caller claimed beyond its grants (pure, so computed once
        // for the replay answer and the invariants alike).
        let not_granted = match (&request.caller, &self.callers) {
            (Some(caller), _) => caller.grant_violations(request),
            (None, Some(_)) => vec![callers::violation::UNAUTHENTICATED],
            (None, None) => Vec::new(),
        };

        // 1. Anti-replay gate.
        if let Some(guard) = &self.replay {
            let claimed = guard
                .claim(&request.request_id, &fingerprint)
                .instrument(tracing::info_span!("replay_claim"))
                .await;
            match claimed {
                Ok(Claim::Claimed) => progress.claimed = true,
                Ok(Claim::Cached(response)) => {
                    self.metrics.replay_hit();
                    // A stored ALLOW is not replayed past a floor that now
                    // forbids the call (no ALLOW after the kill switch), nor
                    // to a caller whose grants no longer cover it.
                    let floor_code =
                        floor_applied.and_then(|mode| floor_denial(mode, request.tool));
                    let (response, floor_applied) = match floor_code {
                        Some(code) if response.decision == Decision::Allow => {
                            (VerifyResponse::deny(code), floor_applied)
                        }
                        _ if response.decision == Decision::Allow && !not_granted.is_empty() => (
                            VerifyResponse::from_violations(
                                not_granted.iter().map(|v| (*v).to_owned()).collect(),
                                Vec::new(),
                            ),
                            None,
                        ),
                        _ => (response, None),
                    };
                    // The stored answer is the real decision; whether it is
                    // shadowed follows the enforcement in force now.
                    let shadow = floor_applied.is_none() && self.shadowed(set, request, &response);
                    let stamp = Stamp {
                        set,
                        shadow,
                        candidate: None,
                        revision: None,
                    };
                    return self
                        .audited_under(
                            request,
                            input,
                            REPLAY_ACTION,
                            response,
                            floor_applied,
                            stamp,
                        )
                        .await;
                }
                Ok(Claim::Mismatch) => {
                    self.metrics.replay_mismatch();
                    tracing::warn!("request_id reused with a different payload");
                    let response = VerifyResponse::deny(violation::REPLAY_PAYLOAD_MISMATCH);
                    return self
                        .audited(request, input, REPLAY_ACTION, response, set)
                        .await;
                }
                Ok(Claim::Pending) => {
                    let response = VerifyResponse::deny(violation::REPLAY_CONCURRENT);
                    return self
                        .audited(request, input, REPLAY_ACTION, response, set)
                        .await;
                }
                Err(error) if request.tool.is_write() => {
                    if let Some(suppressed) = self.state_failed("claim_write", &error) {
                        tracing::error!(%error, suppressed, "anti-replay unavailable: write fails closed");
                    }
                    findings.fail_closed(Trigger::Redis, violation::REPLAY_CHECK_UNAVAILABLE);
                }
                Err(error) => {
                    if let Some(suppressed) = self.state_failed("claim_read", &error) {
                        tracing::warn!(%error, suppressed, "anti-replay unavailable: read proceeds without it");
                    }
                }
            }
        }

        // 2. Hard invariants. A kill switch stops reads too, so that it
        // holds even when the policy engine is down and reads run rules-only.
        let mut allowed_outputs = Vec::new();
        // The caller's grants come first: a claim it may not make.
        not_granted.iter().for_each(|code| findings.push(code));
        match mode {
            Mode::KillSwitch => findings.push(violation::MODE_KILL_SWITCH),
            Mode::ReadOnly if request.tool.is_write() => {
                findings.push(violation::MODE_READ_ONLY_NO_WRITE)
            }
            Mode::ReadOnly if request.tool == Tool::ListAppointments => {
                allowed_outputs.push(SLOTS_AGGREGATED.to_owned());
            }
            _ => {}
        }

        // 3. Policy, under the mode in force.
        let (evaluated, candidate) = async {
            let raised = floor_applied.map(|mode| {
                let mut raised = input.clone();
                raised["mode"] = json!(mode.as_str());
                raised
            });
            let seen = raised.as_ref().unwrap_or(&input);
            let evaluated = set.engine.evaluate(seen).await;
            let candidate = self.compare_candidate(seen, &evaluated).await;
            (evaluated, candidate)
        }
        .instrument(tracing::info_span!("policy"))
        .await;
        let revision = evaluated.as_ref().ok().and_then(|v| v.revision.clone());
        match evaluated {
            Ok(verdict) if !verdict.allow && verdict.violations.is_empty() => {
                findings.push(violation::OPA_DENY)
            }
            Ok(verdict) => verdict.violations.iter().for_each(|v| findings.push(v)),
            Err(error) if request.tool.is_write() => {
                if let Some(suppressed) = self.policy_failed("policy_write", &error) {
                    tracing::error!(%error, suppressed, "policy unavailable: write fails closed");
                }
                findings.fail_closed(Trigger::Opa, violation::OPA_UNAVAILABLE);
            }
            Err(error) => {
                if let Some(suppressed) = self.policy_failed("policy_read", &error) {
                    tracing::warn!(%error, suppressed, "policy unavailable: read proceeds rules-only");
                }
            }
        }

        // 4. SMS burst limit, counted only for sends that everything else
        // allowed, so denied or replayed requests never use up the quota.
        if request.tool == Tool::SendSms && findings.violations.is_empty() {
            let key = format!("sms:{}", request.patient_id().unwrap_or_default());
            let counted = self
                .limiter
                .hit(&key, self.sms_limit.window)
                .instrument(tracing::info_span!("rate_limit"))
                .await;
            match counted {
                Ok(count) if count > self.sms_limit.max => {
                    self.metrics.sms_limited();
                    findings.push(violation::NO_SMS_BURST)
                }
                Ok(_) => {}
                Err(error) => {
                    if let Some(suppressed) = self.state_failed("sms_limit", &error) {
                        tracing::error!(%error, suppressed, "SMS rate limit unavailable: send fails closed");
                    }
                    findings.fail_closed(Trigger::Redis, violation::NO_SMS_BURST);
                }
            }
        }

        for trigger in &findings.triggers {
            self.metrics.fail_closed(*trigger);
        }
        let failed_closed = !findings.triggers.is_empty();
        let response = VerifyResponse::from_violations(findings.violations, allowed_outputs);
        let shadow = floor_applied.is_none() && self.shadowed(set, request, &response);

        // 5. Audit, then 6. remember the answer for replays. A fail-closed
        // deny is not remembered: once the dependency is back, a retry with
        // the same request_id deserves a real decision. A shadowed answer
        // is stored as the real decision (see `Verdict::shadow`).
        let verdict = self
            .audited_under(
                request,
                input,
                request.tool.as_str(),
                response,
                floor_applied,
                Stamp {
                    set,
                    shadow,
                    candidate,
                    revision,
                },
            )
            .await;
        let failed_closed = failed_closed || audit_failed_closed(&verdict);
        // A decision the floor changed is not remembered either: once the
        // operator lowers it, a retry deserves the caller's own decision.
        let transient = failed_closed || floor_applied.is_some();
        progress.audited = Some((verdict.clone(), transient));
        if progress.claimed {
            self.store_or_release(request, &fingerprint, &verdict, transient)
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
        if let Err(error) = stored
            && let Some(suppressed) = self.state_failed("store", &error)
        {
            tracing::warn!(%error, suppressed, "could not store the decision for replays now (the Redis store keeps retrying until the claim expires)");
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
        response: VerifyResponse,
        set: &PolicySet,
    ) -> Verdict {
        let stamp = Stamp {
            set,
            shadow: false,
            candidate: None,
            revision: None,
        };
        self.audited_under(request, input, action, response, None, stamp)
            .await
    }

    /// [`Self::audited`], recording the mode the decision ran under when the
    /// operator's floor raised the caller's (`mode_applied` in the payload,
    /// beside the request's own `mode`).
    async fn audited_under(
        &self,
        request: &VerifyRequest,
        input: serde_json::Value,
        action: &str,
        mut response: VerifyResponse,
        floor_applied: Option<Mode>,
        stamp: Stamp<'_>,
    ) -> Verdict {
        let shadow = stamp.shadow;
        let Some(writer) = &self.audit else {
            return Verdict {
                response,
                audit: None,
                floor_applied,
                shadow,
            };
        };
        let mut payload = match floor_applied {
            None => json!({"request": request.completed(input), "response": response}),
            Some(mode) => json!({
                "request": request.completed(input),
                "response": response,
                "mode_applied": mode.as_str(),
            }),
        };
        payload["policy"] = stamp.set.stamp().clone();
        if let Some(revision) = stamp.revision {
            payload["policy"]["revision"] = json!(revision);
        }
        if shadow {
            payload["shadow"] = json!(true);
        }
        if let Some(candidate) = stamp.candidate {
            payload["candidate"] = candidate;
        }
        // Who made the claim, beside what was claimed (`role` stays the actor).
        if let Some(name) = request.caller_name() {
            payload["caller"] = json!(name);
        }
        let event = NewEvent::now(
            request.request_id.as_str(),
            format!("role:{}", request.role),
            action,
            response.decision.as_str(),
            payload,
        );
        let appended = writer
            .append(event)
            .instrument(tracing::info_span!("audit_commit"))
            .await;
        match appended {
            Ok(receipt) => Verdict {
                response,
                audit: receipt,
                floor_applied,
                shadow,
            },
            Err(error) => {
                self.metrics.audit_failed(error.kind());
                // Not rate-limited: with no row, this line (in the decision's
                // span, so with its request_id) is the record of the gap.
                tracing::error!(%error, "audit append failed");
                if matches!(error, AuditError::NotRecorded(_)) && request.tool.is_write() {
                    // Strict: a write with no record anywhere is not allowed
                    // to happen; the claim is then released (see below).
                    self.metrics.fail_closed(Trigger::Audit);
                    response = VerifyResponse::from_violations(
                        vec![
                            violation::FAIL_CLOSED.to_owned(),
                            violation::AUDIT_UNRECORDED.to_owned(),
                        ],
                        Vec::new(),
                    );
                }
                response.reason.push_str(AUDIT_FAILED_SUFFIX);
                Verdict {
                    shadow: shadow && !response.failed_closed(),
                    response,
                    audit: None,
                    floor_applied,
                }
            }
        }
    }
}

/// One row per dependency failing on a read or on a write, plus the happy
/// path, replays and panics in each port. Fakes stand in for every port, so
/// these run with no services.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditError, AuditLog, EventFilter, StoredEvent};
    use crate::domain::RequestId;
    use crate::policy::{PolicyError, PolicyVerdict};
    use crate::state::StateError;
    use serde_json::Value;
    use std::sync::Mutex;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Port {
        Works,
        Fails,
        Panics,
    }
    use Port::{Fails, Panics, Works};

    #[derive(Clone, Copy, Debug)]
    enum Claiming {
        Claims(Port),
        Cached,
        Pending,
        Mismatch,
    }

    /// What became of the claim.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum ClaimEnd {
        /// Neither stored nor released (no claim was held, or storing failed).
        Untouched,
        Stored,
        Released,
    }

    struct Row {
        name: &'static str,
        tool: Tool,
        claim: Claiming,
        /// `complete` or `release`, whichever the decision calls.
        store: Port,
        policy: Port,
        /// What the policy says when it works.
        policy_denies: bool,
        limiter: Port,
        sms_count: u64,
        audit: Port,
        violations: &'static [&'static str],
        trigger: Option<&'static str>,
        claim_end: ClaimEnd,
        /// The action of the audit row, or `None` when none was written.
        audited: Option<&'static str>,
    }

    const OK_ROW: Row = Row {
        name: "",
        tool: Tool::CreateAppointment,
        claim: Claiming::Claims(Works),
        store: Works,
        policy: Works,
        policy_denies: false,
        limiter: Works,
        sms_count: 1,
        audit: Works,
        violations: &[],
        trigger: None,
        claim_end: ClaimEnd::Stored,
        audited: Some("cliniccloud.create_appointment"),
    };
    const READ: Tool = Tool::SummaryHistory;
    const READ_ACTION: Option<&str> = Some("cliniccloud.summary_history");
    const SMS_ACTION: Option<&str> = Some("twilio.send_sms");
    const INTERNAL: &[&str] = &["FAIL_CLOSED", "Verifier_InternalError"];

    fn rows() -> Vec<Row> {
        vec![
            Row {
                name: "happy write",
                ..OK_ROW
            },
            Row {
                name: "happy read",
                tool: READ,
                audited: READ_ACTION,
                ..OK_ROW
            },
            Row {
                name: "happy SMS",
                tool: Tool::SendSms,
                audited: SMS_ACTION,
                ..OK_ROW
            },
            Row {
                name: "policy deny is stored",
                policy_denies: true,
                violations: &["OPA_Deny"],
                ..OK_ROW
            },
            Row {
                name: "replay of a stored decision",
                claim: Claiming::Cached,
                claim_end: ClaimEnd::Untouched,
                audited: Some(REPLAY_ACTION),
                ..OK_ROW
            },
            Row {
                name: "same id still pending",
                claim: Claiming::Pending,
                violations: &["Inv_ReplayConcurrent"],
                claim_end: ClaimEnd::Untouched,
                audited: Some(REPLAY_ACTION),
                ..OK_ROW
            },
            Row {
                name: "same id, other payload",
                claim: Claiming::Mismatch,
                violations: &["Inv_ReplayPayloadMismatch"],
                claim_end: ClaimEnd::Untouched,
                audited: Some(REPLAY_ACTION),
                ..OK_ROW
            },
            Row {
                name: "claim fails on a write",
                claim: Claiming::Claims(Fails),
                violations: &["FAIL_CLOSED", "Inv_ReplayCheckUnavailable"],
                trigger: Some("redis"),
                claim_end: ClaimEnd::Untouched,
                ..OK_ROW
            },
            Row {
                name: "claim fails on a read",
                tool: READ,
                claim: Claiming::Claims(Fails),
                claim_end: ClaimEnd::Untouched,
                audited: READ_ACTION,
                ..OK_ROW
            },
            Row {
                name: "policy fails on a write",
                policy: Fails,
                violations: &["FAIL_CLOSED", "OPA_Unavailable"],
                trigger: Some("opa"),
                claim_end: ClaimEnd::Released,
                ..OK_ROW
            },
            Row {
                name: "policy fails on a read",
                tool: READ,
                policy: Fails,
                audited: READ_ACTION,
                ..OK_ROW
            },
            Row {
                name: "SMS limit fails",
                tool: Tool::SendSms,
                limiter: Fails,
                violations: &["FAIL_CLOSED", "Inv_NoSmsBurst"],
                trigger: Some("redis"),
                claim_end: ClaimEnd::Released,
                audited: SMS_ACTION,
                ..OK_ROW
            },
            Row {
                name: "SMS over the limit is stored",
                tool: Tool::SendSms,
                sms_count: 2,
                violations: &["Inv_NoSmsBurst"],
                audited: SMS_ACTION,
                ..OK_ROW
            },
            Row {
                name: "audit append fails on a write",
                audit: Fails,
                audited: None,
                ..OK_ROW
            },
            Row {
                name: "audit append fails on a read",
                tool: READ,
                audit: Fails,
                audited: None,
                ..OK_ROW
            },
            Row {
                name: "storing the decision fails",
                store: Fails,
                claim_end: ClaimEnd::Untouched,
                ..OK_ROW
            },
            Row {
                name: "releasing a fail-closed claim fails",
                policy: Fails,
                store: Fails,
                violations: &["FAIL_CLOSED", "OPA_Unavailable"],
                trigger: Some("opa"),
                claim_end: ClaimEnd::Untouched,
                ..OK_ROW
            },
            Row {
                name: "claim panics",
                claim: Claiming::Claims(Panics),
                violations: INTERNAL,
                trigger: Some("rules"),
                claim_end: ClaimEnd::Untouched,
                ..OK_ROW
            },
            Row {
                name: "policy panics on a write",
                policy: Panics,
                violations: INTERNAL,
                trigger: Some("rules"),
                claim_end: ClaimEnd::Released,
                ..OK_ROW
            },
            Row {
                name: "policy panics on a read",
                tool: READ,
                policy: Panics,
                violations: INTERNAL,
                trigger: Some("rules"),
                claim_end: ClaimEnd::Released,
                audited: READ_ACTION,
                ..OK_ROW
            },
            Row {
                name: "SMS limit panics",
                tool: Tool::SendSms,
                limiter: Panics,
                violations: INTERNAL,
                trigger: Some("rules"),
                claim_end: ClaimEnd::Released,
                audited: SMS_ACTION,
                ..OK_ROW
            },
            Row {
                name: "storing panics after the audit: the audited answer stands",
                store: Panics,
                claim_end: ClaimEnd::Untouched,
                ..OK_ROW
            },
            Row {
                name: "audit store panics: the decision stands, unaudited",
                audit: Panics,
                audited: None,
                ..OK_ROW
            },
        ]
    }

    fn act<T>(port: Port, works: T, fails: T) -> T {
        match port {
            Works => works,
            Fails => fails,
            Panics => panic!("bug in a port"),
        }
    }

    struct FakePolicy(Port, bool);

    #[async_trait::async_trait]
    impl PolicyEngine for FakePolicy {
        fn backend(&self) -> &'static str {
            "fake"
        }
        async fn evaluate(&self, _: &Value) -> Result<PolicyVerdict, PolicyError> {
            let verdict = PolicyVerdict {
                allow: !self.1,
                violations: Vec::new(),
                revision: None,
            };
            act(self.0, Ok(verdict), Err(PolicyError::Timeout))
        }
    }

    struct FakeState {
        claim: Claiming,
        store: Port,
        limiter: Port,
        sms_count: u64,
        ends: Mutex<Vec<ClaimEnd>>,
    }

    #[async_trait::async_trait]
    impl ReplayGuard for FakeState {
        fn backend(&self) -> &'static str {
            "fake"
        }
        async fn claim(&self, _: &RequestId, _: &str) -> Result<Claim, StateError> {
            match self.claim {
                Claiming::Claims(port) => act(port, Ok(Claim::Claimed), Err(StateError::Timeout)),
                Claiming::Cached => Ok(Claim::Cached(VerifyResponse::from_violations(
                    Vec::new(),
                    Vec::new(),
                ))),
                Claiming::Pending => Ok(Claim::Pending),
                Claiming::Mismatch => Ok(Claim::Mismatch),
            }
        }
        async fn complete(
            &self,
            _: &RequestId,
            _: &str,
            _: &VerifyResponse,
        ) -> Result<(), StateError> {
            act(self.store, Ok(()), Err(StateError::Timeout))?;
            self.ends.lock().unwrap().push(ClaimEnd::Stored);
            Ok(())
        }
        async fn release(&self, _: &RequestId, _: &str) -> Result<(), StateError> {
            act(self.store, Ok(()), Err(StateError::Timeout))?;
            self.ends.lock().unwrap().push(ClaimEnd::Released);
            Ok(())
        }
        async fn ping(&self) -> Result<(), StateError> {
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl RateLimiter for FakeState {
        async fn hit(&self, _: &str, _: Duration) -> Result<u64, StateError> {
            act(
                self.limiter,
                Ok(self.sms_count),
                Err(StateError::Unavailable("down".into())),
            )
        }
    }

    impl FakeState {
        /// Claims as `claim`; the store and the limiter work; one SMS so far.
        fn claiming(claim: Claiming) -> Self {
            FakeState {
                claim,
                store: Works,
                limiter: Works,
                sms_count: 1,
                ends: Mutex::new(Vec::new()),
            }
        }

        /// How the claim ended: nothing, or the one end expected of it.
        fn ended(&self) -> Vec<ClaimEnd> {
            self.ends.lock().unwrap().clone()
        }
    }

    /// What a claim should end as, in [`FakeState::ended`]'s terms.
    fn one_end(end: ClaimEnd) -> Vec<ClaimEnd> {
        match end {
            ClaimEnd::Untouched => vec![],
            end => vec![end],
        }
    }

    /// A pipeline over fakes, with the fakes kept to look at afterwards.
    struct Fakes {
        state: Arc<FakeState>,
        log: Arc<FakeAudit>,
        metrics: Arc<Metrics>,
        pipeline: Arc<Pipeline>,
    }

    impl Fakes {
        /// `policy`, `state` and an audit log behaving as `audit`, with the
        /// pipeline adjusted by `with` (a floor, callers, shadow mode).
        fn new(
            policy: FakePolicy,
            state: FakeState,
            audit: Port,
            with: impl FnOnce(Pipeline) -> Pipeline,
        ) -> Self {
            let state = Arc::new(state);
            let log = Arc::new(FakeAudit {
                port: audit,
                events: Mutex::new(Vec::new()),
            });
            let (writer, _task) = AuditWriter::spawn(log.clone()).unwrap();
            let metrics = Arc::new(Metrics::new());
            let pipeline = Pipeline::new(
                Arc::new(policy),
                Some(state.clone()),
                state.clone(),
                Some(writer),
                metrics.clone(),
                SmsLimit::default(),
            );
            Fakes {
                state,
                log,
                metrics,
                pipeline: Arc::new(with(pipeline)),
            }
        }

        fn events(&self) -> Vec<NewEvent> {
            self.log.events.lock().unwrap().clone()
        }
    }

    /// An in-memory audit log.
    struct FakeAudit {
        port: Port,
        events: Mutex<Vec<NewEvent>>,
    }

    #[async_trait::async_trait]
    impl AuditLog for FakeAudit {
        fn backend(&self) -> &'static str {
            "fake"
        }
        async fn append_batch(
            &self,
            events: &[NewEvent],
        ) -> Result<Vec<AppendReceipt>, AuditError> {
            act(
                self.port,
                Ok(()),
                Err(AuditError::Unavailable("down".into())),
            )?;
            let mut stored = self.events.lock().unwrap();
            let mut receipts = Vec::new();
            for event in events {
                stored.push(event.clone());
                receipts.push(AppendReceipt {
                    id: stored.len() as i64,
                    hash: format!("h{}", stored.len()),
                });
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
        async fn ping(&self) -> Result<(), AuditError> {
            Ok(())
        }
    }

    fn request(tool: Tool) -> VerifyRequest {
        VerifyRequest::from_value(json!({
            "request_id": "r-1",
            "tool": tool.as_str(),
            "mode": "ALLOW",
            "role": "nurse",
            "subject": {"patient_id": "p-1"},
            "args": {},
            "context": {"tenant_id": "t-1"}
        }))
        .unwrap()
    }

    fn fail_closed_count(metrics: &Metrics, trigger: &str) -> u64 {
        let series = format!("casf_fail_closed_total{{trigger=\"{trigger}\"}} ");
        metrics
            .encode()
            .lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .map_or(0, |n| n.trim().parse().unwrap())
    }

    #[tokio::test]
    async fn each_dependency_failing_on_a_read_or_a_write() {
        for row in rows() {
            let name = row.name;
            let fakes = Fakes::new(
                FakePolicy(row.policy, row.policy_denies),
                FakeState {
                    store: row.store,
                    limiter: row.limiter,
                    sms_count: row.sms_count,
                    ..FakeState::claiming(row.claim)
                },
                row.audit,
                |p| p,
            );

            let verdict = fakes.pipeline.decide(request(row.tool), Door::Http).await;

            assert_eq!(verdict.response.violations, row.violations, "{name}");
            let expected_decision = if row.violations.is_empty() {
                Decision::Allow
            } else {
                Decision::Deny
            };
            assert_eq!(verdict.response.decision, expected_decision, "{name}");
            for trigger in ["redis", "opa", "rules"] {
                let expected = u64::from(row.trigger == Some(trigger));
                assert_eq!(
                    fail_closed_count(&fakes.metrics, trigger),
                    expected,
                    "{name}: trigger {trigger}"
                );
            }
            assert_eq!(fakes.state.ended(), one_end(row.claim_end), "{name}: claim");

            let events = fakes.events();
            match row.audited {
                Some(action) => {
                    assert_eq!(events.len(), 1, "{name}: one audit row");
                    assert_eq!(events[0].action, action, "{name}");
                    assert_eq!(
                        events[0].decision,
                        verdict.response.decision.as_str(),
                        "{name}"
                    );
                    assert!(verdict.audit.is_some(), "{name}");
                    assert!(
                        !verdict.response.reason.ends_with(AUDIT_FAILED_SUFFIX),
                        "{name}"
                    );
                }
                None => {
                    assert!(events.is_empty(), "{name}");
                    assert!(verdict.audit.is_none(), "{name}");
                    assert!(
                        verdict.response.reason.ends_with(AUDIT_FAILED_SUFFIX),
                        "{name}"
                    );
                }
            }
            let text = fakes.metrics.encode();
            assert!(
                text.lines().any(|l| l == "casf_verify_in_flight 0"),
                "{name}"
            );
            assert!(text.lines().any(|l| l == "casf_verify_total 1"), "{name}");
        }
    }

    /// The operator's floor against the caller's mode: the stricter one
    /// decides, a stored ALLOW is not replayed past it, the payload records
    /// it, and a decision it changed is released rather than remembered.
    #[tokio::test]
    async fn the_mode_floor_wins_over_the_callers_mode() {
        struct Case {
            name: &'static str,
            floor: Mode,
            tool: Tool,
            claim: Claiming,
            violations: &'static [&'static str],
            applied: Option<Mode>,
            end: ClaimEnd,
        }
        let cases = [
            Case {
                name: "ALLOW floor: the caller's mode",
                floor: Mode::Allow,
                tool: Tool::CreateAppointment,
                claim: Claiming::Claims(Works),
                violations: &[],
                applied: None,
                end: ClaimEnd::Stored,
            },
            Case {
                name: "kill switch over a caller's ALLOW",
                floor: Mode::KillSwitch,
                tool: Tool::SummaryHistory,
                claim: Claiming::Claims(Works),
                violations: &[violation::MODE_KILL_SWITCH],
                applied: Some(Mode::KillSwitch),
                end: ClaimEnd::Released,
            },
            Case {
                name: "READ_ONLY floor denies a write",
                floor: Mode::ReadOnly,
                tool: Tool::GenerateInvoice,
                claim: Claiming::Claims(Works),
                violations: &[violation::MODE_READ_ONLY_NO_WRITE],
                applied: Some(Mode::ReadOnly),
                end: ClaimEnd::Released,
            },
            Case {
                name: "a stored ALLOW is not replayed past the kill switch",
                floor: Mode::KillSwitch,
                tool: Tool::CreateAppointment,
                claim: Claiming::Cached,
                violations: &[violation::MODE_KILL_SWITCH],
                applied: Some(Mode::KillSwitch),
                end: ClaimEnd::Untouched,
            },
            Case {
                name: "a stored ALLOW of a read replays under READ_ONLY",
                floor: Mode::ReadOnly,
                tool: Tool::SummaryHistory,
                claim: Claiming::Cached,
                violations: &[],
                applied: None,
                end: ClaimEnd::Untouched,
            },
        ];
        for case in cases {
            let name = case.name;
            let fakes = Fakes::new(
                FakePolicy(Works, false),
                FakeState::claiming(case.claim),
                Works,
                |p| p.with_mode_floor(Arc::new(ModeFloor::new(case.floor))),
            );
            let verdict = fakes.pipeline.decide(request(case.tool), Door::Http).await;
            assert_eq!(verdict.response.violations, case.violations, "{name}");
            assert_eq!(verdict.floor_applied, case.applied, "{name}");
            assert_eq!(fakes.state.ended(), one_end(case.end), "{name}: claim");
            let events = fakes.events();
            assert_eq!(events.len(), 1, "{name}: one audit row");
            assert_eq!(
                events[0]
                    .payload
                    .get("mode_applied")
                    .and_then(Value::as_str),
                case.applied.map(Mode::as_str),
                "{name}: payload"
            );
            assert_eq!(events[0].payload["request"]["mode"], "ALLOW", "{name}");
            let floor_series = format!("casf_mode_floor{{mode=\"{}\"}} 1", case.floor.as_str());
            assert!(fakes.metrics.encode().contains(&floor_series), "{name}");
        }
    }

    /// The caller's grants as an invariant: outside them is a DENY with the
    /// grant codes, a stored ALLOW is not replayed to a caller whose grants
    /// no longer cover it, and a request that reaches the pipeline without a
    /// caller while callers are configured is denied.
    #[tokio::test]
    async fn the_callers_grants_bound_every_decision() {
        use crate::callers::{CallerSet, Callers};
        use sha2::Digest;
        let key = hex::encode(sha2::Sha256::digest(b"k"));
        let set = CallerSet::parse(&format!(
            "callers: [{{name: desk, api_key_sha256: {key}, roles: [receptionist], tenants: [t-1]}}]"
        ))
        .unwrap();
        let desk = set.authenticate_http(Some("Bearer k"), None).unwrap();
        let callers = Arc::new(Callers::fixed(set));
        // `request()` claims a nurse: outside the desk's grants.
        let cases = [
            (
                Claiming::Claims(Works),
                Some(desk.clone()),
                vec!["Caller_RoleNotGranted"],
                ClaimEnd::Stored,
            ),
            (
                Claiming::Cached,
                Some(desk.clone()),
                vec!["Caller_RoleNotGranted"],
                ClaimEnd::Untouched,
            ),
            (
                Claiming::Claims(Works),
                None,
                vec!["Caller_Unauthenticated"],
                ClaimEnd::Stored,
            ),
        ];
        for (claim, caller, expected, end) in cases {
            let fakes = Fakes::new(
                FakePolicy(Works, false),
                FakeState::claiming(claim),
                Works,
                |p| p.with_callers(callers.clone()),
            );
            let mut request = request(Tool::SummaryHistory);
            if let Some(caller) = &caller {
                request = request.with_caller(caller.clone());
            }
            let verdict = fakes.pipeline.decide(request, Door::Http).await;
            assert_eq!(verdict.response.violations, expected, "{claim:?}");
            assert_eq!(fakes.state.ended(), one_end(end), "{claim:?}");
            let events = fakes.events();
            assert_eq!(events.len(), 1);
            assert_eq!(
                events[0].payload.get("caller").and_then(Value::as_str),
                caller.as_ref().map(|c| c.name.as_str())
            );
        }
    }

    /// Shadow answers ALLOW for the policy's and the caller's-mode denials
    /// only: never over a dependency failing closed or the operator's floor,
    /// and the audit row and stored answer stay the real decision.
    #[tokio::test]
    async fn shadow_answers_allow_but_never_over_fail_closed_or_the_floor() {
        // (policy port, policy denies, floor, tool, shadowed, answered violations)
        let cases = [
            (
                Works,
                true,
                Mode::Allow,
                Tool::CreateAppointment,
                true,
                vec![],
            ),
            (
                Fails,
                false,
                Mode::Allow,
                Tool::CreateAppointment,
                false,
                vec!["FAIL_CLOSED", "OPA_Unavailable"],
            ),
            (
                Works,
                false,
                Mode::KillSwitch,
                Tool::SummaryHistory,
                false,
                vec!["Mode_KillSwitch"],
            ),
        ];
        for (port, denies, floor, tool, shadowed, answered) in cases {
            let name = format!("{port:?} denies={denies} floor={floor:?}");
            let fakes = Fakes::new(
                FakePolicy(port, denies),
                FakeState::claiming(Claiming::Claims(Works)),
                Works,
                |p| {
                    p.with_mode_floor(Arc::new(ModeFloor::new(floor)))
                        .with_enforce(false)
                },
            );
            let verdict = fakes.pipeline.decide(request(tool), Door::Http).await;
            assert_eq!(verdict.shadow, shadowed, "{name}");
            assert_eq!(verdict.response.violations, answered, "{name}");
            let events = fakes.events();
            assert_eq!(events.len(), 1, "{name}");
            assert_eq!(
                events[0].payload.get("shadow").is_some(),
                shadowed,
                "{name}"
            );
            if shadowed {
                assert_eq!(verdict.response.decision, Decision::Allow, "{name}");
                assert_eq!(verdict.response.shadow_decision, Some(Decision::Deny));
                assert_eq!(events[0].decision, "DENY", "{name}: the real one");
                assert_eq!(fakes.state.ended(), vec![ClaimEnd::Stored]);
                assert!(
                    fakes
                        .metrics
                        .encode()
                        .contains("casf_shadow_decision_total{decision=\"DENY\"} 1")
                );
            } else {
                assert_eq!(verdict.response.decision, Decision::Deny, "{name}");
                assert!(verdict.response.shadow_decision.is_none(), "{name}");
            }
        }
    }
}
