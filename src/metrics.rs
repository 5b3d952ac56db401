//! Prometheus metrics (guide §5), names, types, labels and buckets exactly as
//! the guide's PromQL expects, served in the Prometheus text format.
//!
//! Every label set is closed (decision, trigger, kind, door); nothing that a
//! caller chooses, such as tenant, patient or request ids, becomes a label.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::domain::Decision;

/// The Python client's default buckets up to 2.5 s, as the guide's dashboards use.
pub const DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
];

/// What made a write fail closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    Redis,
    Opa,
    /// The verifier itself could not decide (an internal error at a door).
    Rules,
}

impl Trigger {
    pub const ALL: [Trigger; 3] = [Trigger::Redis, Trigger::Opa, Trigger::Rules];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Redis => "redis",
            Trigger::Opa => "opa",
            Trigger::Rules => "rules",
        }
    }
}

/// Which door a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Door {
    Http,
    ExtAuthz,
}

impl Door {
    pub const ALL: [Door; 2] = [Door::Http, Door::ExtAuthz];

    pub fn as_str(self) -> &'static str {
        match self {
            Door::Http => "http",
            Door::ExtAuthz => "ext_authz",
        }
    }
}

/// Why a door answered without a pipeline decision (so without an audit row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DoorRejection {
    /// Not a valid tool call: 400.
    BadRequest,
    /// No route maps the call: denied with `Route_Unmapped`.
    Unmapped,
}

impl DoorRejection {
    pub const ALL: [DoorRejection; 2] = [DoorRejection::BadRequest, DoorRejection::Unmapped];

    pub fn as_str(self) -> &'static str {
        match self {
            DoorRejection::BadRequest => "bad_request",
            DoorRejection::Unmapped => "unmapped",
        }
    }
}

pub const OPA_ERROR_KINDS: [&str; 4] = ["timeout", "unavailable", "bad_status", "bad_response"];
pub const AUDIT_ERROR_KINDS: [&str; 4] = ["unavailable", "timeout", "rejected", "closed"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    trigger: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DoorLabels {
    door: &'static str,
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    door: &'static str,
    reason: &'static str,
}

/// `casf_state_keys`, counted when scraped rather than kept up to date on
/// every claim, and `casf_state_max_keys`, the bound it is held to.
struct StateKeys {
    max_keys: usize,
    count: Box<dyn Fn() -> usize + Send + Sync>,
}

impl std::fmt::Debug for StateKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKeys")
    }
}

impl Collector for StateKeys {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let keys = ConstGauge::new(i64::try_from((self.count)()).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "casf_state_keys",
            "Keys held by the in-process anti-replay and rate-limit state",
            None,
            keys.metric_type(),
        )?;
        keys.encode(metric)?;
        let max_keys = ConstGauge::new(i64::try_from(self.max_keys).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "casf_state_max_keys",
            "Most keys the in-process state holds (CASF_STATE_MAX_KEYS)",
            None,
            max_keys.metric_type(),
        )?;
        max_keys.encode(metric)
    }
}

/// All metrics of one verifier process.
pub struct Metrics {
    registry: Registry,
    verify_total: Counter,
    decisions: Family<DecisionLabels, Counter>,
    duration: Histogram,
    in_flight: Gauge,
    fail_closed: Family<TriggerLabels, Counter>,
    opa_errors: Family<KindLabels, Counter>,
    replay_hits: Counter,
    replay_mismatches: Counter,
    sms_limited: Counter,
    door_decisions: Family<DoorLabels, Counter>,
    audit_failures: Family<KindLabels, Counter>,
    door_rejections: Family<RejectionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            verify_total: Counter::default(),
            decisions: Family::default(),
            duration: Histogram::new(DURATION_BUCKETS),
            in_flight: Gauge::default(),
            fail_closed: Family::default(),
            opa_errors: Family::default(),
            replay_hits: Counter::default(),
            replay_mismatches: Counter::default(),
            sms_limited: Counter::default(),
            door_decisions: Family::default(),
            audit_failures: Family::default(),
            door_rejections: Family::default(),
            registry: Registry::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "casf_verify",
            "Tool-call decisions made",
            m.verify_total.clone(),
        );
        registry.register(
            "casf_verify_decision",
            "Decisions by outcome",
            m.decisions.clone(),
        );
        registry.register(
            "casf_verify_duration_seconds",
            "Time to decide one tool call",
            m.duration.clone(),
        );
        registry.register(
            "casf_verify_in_flight",
            "Decisions being made right now",
            m.in_flight.clone(),
        );
        registry.register(
            "casf_fail_closed",
            "Writes denied because a dependency failed",
            m.fail_closed.clone(),
        );
        registry.register(
            "casf_opa_error",
            "Policy evaluations that failed, by kind",
            m.opa_errors.clone(),
        );
        registry.register(
            "casf_replay_hit",
            "Replays answered from the stored decision",
            m.replay_hits.clone(),
        );
        registry.register(
            "casf_replay_mismatch",
            "Reused request_id with a different payload",
            m.replay_mismatches.clone(),
        );
        registry.register(
            "casf_sms_limited",
            "SMS sends denied by the per-patient burst limit",
            m.sms_limited.clone(),
        );
        registry.register(
            "casf_door_decision",
            "Decisions by door and outcome",
            m.door_decisions.clone(),
        );
        registry.register(
            "casf_audit_append_failed",
            "Decisions whose audit append failed, by kind",
            m.audit_failures.clone(),
        );

        registry.register(
            "casf_door_rejected",
            "Calls a door answered without a decision (bad request, unmapped route)",
            m.door_rejections.clone(),
        );

        // Pre-create every label value so rate() and alerts see a zero first.
        for decision in Decision::ALL {
            m.decisions
                .get_or_create(&DecisionLabels {
                    decision: decision.as_str(),
                })
                .inc_by(0);
            for door in Door::ALL {
                m.door_decisions
                    .get_or_create(&DoorLabels {
                        door: door.as_str(),
                        decision: decision.as_str(),
                    })
                    .inc_by(0);
            }
        }
        for trigger in Trigger::ALL {
            m.fail_closed
                .get_or_create(&TriggerLabels {
                    trigger: trigger.as_str(),
                })
                .inc_by(0);
        }
        for kind in OPA_ERROR_KINDS {
            m.opa_errors.get_or_create(&KindLabels { kind }).inc_by(0);
        }
        for kind in AUDIT_ERROR_KINDS {
            m.audit_failures
                .get_or_create(&KindLabels { kind })
                .inc_by(0);
        }
        // Only the ext_authz door rejects on its own; /verify's 4xx are
        // plain HTTP errors.
        for reason in DoorRejection::ALL {
            m.door_rejections
                .get_or_create(&RejectionLabels {
                    door: Door::ExtAuthz.as_str(),
                    reason: reason.as_str(),
                })
                .inc_by(0);
        }
        Metrics { registry, ..m }
    }

    /// Exposes `casf_state_keys`, how many keys the in-process state holds
    /// (read from `count` at each scrape), and `casf_state_max_keys`, its
    /// `CASF_STATE_MAX_KEYS` bound. Registered only when that state is in
    /// use; Redis reports its own memory.
    pub fn track_state_keys(
        &mut self,
        max_keys: usize,
        count: impl Fn() -> usize + Send + Sync + 'static,
    ) {
        self.registry.register_collector(Box::new(StateKeys {
            max_keys,
            count: Box::new(count),
        }));
    }

    /// Marks one decision as started; the gauge drops when the guard does.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// Records one finished decision. Called exactly once per request.
    pub fn decided(&self, door: Door, decision: Decision, elapsed: Duration) {
        self.verify_total.inc();
        self.decisions
            .get_or_create(&DecisionLabels {
                decision: decision.as_str(),
            })
            .inc();
        self.door_decisions
            .get_or_create(&DoorLabels {
                door: door.as_str(),
                decision: decision.as_str(),
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn fail_closed(&self, trigger: Trigger) {
        self.fail_closed
            .get_or_create(&TriggerLabels {
                trigger: trigger.as_str(),
            })
            .inc();
    }

    pub fn opa_error(&self, kind: &'static str) {
        self.opa_errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn replay_hit(&self) {
        self.replay_hits.inc();
    }

    pub fn replay_mismatch(&self) {
        self.replay_mismatches.inc();
    }

    /// One `twilio.send_sms` denied with `Inv_NoSmsBurst` by the limit
    /// itself (not when the limiter failed: that is a fail-closed).
    pub fn sms_limited(&self) {
        self.sms_limited.inc();
    }

    pub fn audit_failed(&self, kind: &'static str) {
        self.audit_failures
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn door_rejected(&self, door: Door, reason: DoorRejection) {
        self.door_rejections
            .get_or_create(&RejectionLabels {
                door: door.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Decrements `casf_verify_in_flight` when dropped, even if the request is cancelled.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_guide_names_with_zeroes() {
        let text = Metrics::new().encode();
        for line in [
            "casf_verify_total 0",
            "casf_verify_decision_total{decision=\"DENY\"} 0",
            "casf_verify_duration_seconds_bucket{le=\"0.005\"} 0",
            "casf_verify_duration_seconds_bucket{le=\"2.5\"} 0",
            "casf_verify_in_flight 0",
            "casf_fail_closed_total{trigger=\"redis\"} 0",
            "casf_opa_error_total{kind=\"bad_response\"} 0",
            "casf_replay_hit_total 0",
            "casf_replay_mismatch_total 0",
            "casf_sms_limited_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn state_keys_come_with_their_bound() {
        let mut m = Metrics::new();
        assert!(!m.encode().contains("casf_state_max_keys"));
        m.track_state_keys(5000, || 42);
        let text = m.encode();
        for line in [
            "# TYPE casf_state_keys gauge",
            "casf_state_keys 42",
            "# TYPE casf_state_max_keys gauge",
            "casf_state_max_keys 5000",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn in_flight_guard_restores_the_gauge() {
        let m = Metrics::new();
        let guard = m.in_flight();
        assert!(m.encode().contains("casf_verify_in_flight 1"));
        drop(guard);
        assert!(m.encode().contains("casf_verify_in_flight 0"));
    }
}
