//! Prometheus metrics (guide §5), names, types, labels and buckets exactly as
//! the guide's PromQL expects, served in the Prometheus text format.
//!
//! Every label set is closed (decision, trigger, kind, door); nothing that a
//! caller chooses, such as tenant, patient or request ids, becomes a label.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::audit::AuditErrorKind;
use crate::domain::Decision;
use crate::policy::PolicyErrorKind;
use crate::state::StateErrorKind;

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
    /// `CASF_AUDIT_STRICT`: the decision's event was recorded nowhere.
    Audit,
}

impl Trigger {
    pub const ALL: [Trigger; 4] = [Trigger::Redis, Trigger::Opa, Trigger::Rules, Trigger::Audit];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Redis => "redis",
            Trigger::Opa => "opa",
            Trigger::Rules => "rules",
            Trigger::Audit => "audit",
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
    /// Not a valid tool call: 400 (ext_authz: every invalid call).
    BadRequest,
    /// No route maps the call: denied with `Route_Unmapped` (ext_authz).
    Unmapped,
    /// `/verify` body over the limit: 413.
    TooLarge,
    /// `/verify` body not declared as JSON: 415.
    UnsupportedMediaType,
    /// `/verify` body that fails the schema: 422.
    Unprocessable,
}

impl DoorRejection {
    /// The reasons each door can give, pre-created at zero.
    pub const EXT_AUTHZ: [DoorRejection; 2] = [DoorRejection::BadRequest, DoorRejection::Unmapped];
    pub const HTTP: [DoorRejection; 4] = [
        DoorRejection::BadRequest,
        DoorRejection::TooLarge,
        DoorRejection::UnsupportedMediaType,
        DoorRejection::Unprocessable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DoorRejection::BadRequest => "bad_request",
            DoorRejection::Unmapped => "unmapped",
            DoorRejection::TooLarge => "too_large",
            DoorRejection::UnsupportedMediaType => "unsupported_media_type",
            DoorRejection::Unprocessable => "unprocessable",
        }
    }

    /// The reason for a `/verify` answer with this status; `None` for the
    /// statuses that are not rejections of the call.
    pub fn from_http_status(status: u16) -> Option<Self> {
        match status {
            400 => Some(DoorRejection::BadRequest),
            413 => Some(DoorRejection::TooLarge),
            415 => Some(DoorRejection::UnsupportedMediaType),
            422 => Some(DoorRejection::Unprocessable),
            _ => None,
        }
    }
}

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

/// Door TLS series: `cert` (server, client_ca), `result` (ok, refused) and
/// `door` (http, grpc) each take a fixed set of values.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    cert: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsDoorLabels {
    door: &'static str,
}

/// Only the live policy's hash is ever a label value (one series).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HashLabels {
    hash: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DisagreementLabels {
    live: &'static str,
    candidate: &'static str,
}

crate::labels::label_enum!(
    /// The `result` of a reload counter (policy, callers, door TLS): applied,
    /// or refused with the old one still in force.
    pub enum ReloadResult {
        Ok => "ok",
        Refused => "refused",
    }
);

crate::labels::label_enum!(
    /// The `result` of `casf_audit_checkpoint_total`: a periodic checkpoint
    /// of `serve` written, or not (chain head unreadable, file unwritable).
    pub enum CheckpointResult {
        Written => "written",
        Failed => "failed",
    }
);

impl ReloadResult {
    pub fn of(applied: bool) -> Self {
        if applied {
            ReloadResult::Ok
        } else {
            ReloadResult::Refused
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    /// `git rev-parse --short HEAD` at build time, `CASF_BUILD_COMMIT` when
    /// the build sets it, or `unknown` (build.rs).
    commit: &'static str,
}

/// The standard `process_*` metrics of Prometheus clients, read from
/// `/proc/self` at each scrape (prometheus-client has no such collector).
/// Off Linux, or when `/proc` is unreadable, it exposes nothing.
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says about this process.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    start_time_seconds: f64,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
}

impl ProcessStats {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let mut stats = Self::parse(&stat, &boot, clock_ticks()?, page_size()?)?;
        stats.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| i64::try_from(dir.count()).unwrap_or(i64::MAX));
        stats.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| max_open_files(&limits));
        Some(stats)
    }

    /// From `/proc/self/stat` and the `btime` line of `/proc/stat`.
    fn parse(stat: &str, proc_stat: &str, ticks: f64, page: i64) -> Option<Self> {
        // The command name may hold spaces and parentheses: fields start
        // after its last ')'. `fields[0]` is field 3 of proc(5), `state`.
        let fields: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let boot_time: u64 = proc_stat
            .lines()
            .find_map(|line| line.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let rss_pages = i64::try_from(field(24)?).ok()?;
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            resident_bytes: rss_pages.saturating_mul(page),
            virtual_bytes: i64::try_from(field(23)?).ok()?,
            start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
            open_fds: None,
            max_fds: None,
        })
    }
}

/// The soft limit on the `Max open files` line of `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .strip_prefix("Max open files")?
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(i64::MAX),
        n => n.parse().ok(),
    }
}

#[cfg(target_os = "linux")]
fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf only reads a constant of the running system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as f64)
}

#[cfg(target_os = "linux")]
fn page_size() -> Option<i64> {
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then_some(page as i64)
}

#[cfg(not(target_os = "linux"))]
fn clock_ticks() -> Option<f64> {
    None
}

#[cfg(not(target_os = "linux"))]
fn page_size() -> Option<i64> {
    None
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(stats.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                Some(stats.resident_bytes),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                Some(stats.virtual_bytes),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                stats.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                stats.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            let Some(value) = value else { continue };
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let start = ConstGauge::new(stats.start_time_seconds);
        start.encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            None,
            start.metric_type(),
        )?)
    }
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
    state_errors: Family<KindLabels, Counter>,
    door_rejections: Family<RejectionLabels, Counter>,
    build_info: Family<BuildLabels, Gauge>,
    mode_floor: Family<ModeLabels, Gauge>,
    spool: SpoolMetrics,
    tls_cert_expiry: Family<CertLabels, Gauge>,
    tls_reloads: Family<ResultLabels, Counter>,
    tls_handshake_failures: Family<TlsDoorLabels, Counter>,
    grpc_insecure_peers: Gauge,
    caller_rejections: Family<RejectionLabels, Counter>,
    callers_unauthenticated: Gauge,
    callers_reloads: Family<ResultLabels, Counter>,
    policy: PolicyMetrics,
    checkpoints: Family<ResultLabels, Counter>,
    checkpoint_last: Gauge,
}

/// Policy reloads, the live policy, shadow decisions and the candidate.
#[derive(Clone, Default)]
struct PolicyMetrics {
    reloads: Family<ResultLabels, Counter>,
    info: Family<HashLabels, Gauge>,
    shadow_decisions: Family<DecisionLabels, Counter>,
    shadow_mode: Family<ScopeLabels, Gauge>,
    disagreements: Family<DisagreementLabels, Counter>,
}

/// The audit spool's metrics, shared with the audit writer's thread.
#[derive(Clone, Default)]
pub struct SpoolMetrics {
    /// `casf_audit_spooled_total`: events written to the spool.
    pub spooled: Counter,
    /// `casf_audit_lost_total`: events neither appended nor spooled.
    pub lost: Counter,
    /// `casf_audit_spool_depth`: events in the spool, not yet in the chain.
    pub depth: Gauge,
    /// `casf_audit_spool_lag_seconds`: age of the oldest of them (0 when
    /// none): how far the chain is behind the answers.
    pub lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Pre-creates one series per label set at zero, so that `rate()` and
/// alerts see a zero before the first event.
fn zeros<L>(family: &Family<L, Counter>, labels: impl IntoIterator<Item = L>)
where
    L: Clone + std::hash::Hash + Eq,
{
    for label in labels {
        family.get_or_create(&label).inc_by(0);
    }
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
            state_errors: Family::default(),
            door_rejections: Family::default(),
            build_info: Family::default(),
            mode_floor: Family::default(),
            spool: SpoolMetrics::default(),
            caller_rejections: Family::default(),
            callers_unauthenticated: Gauge::default(),
            callers_reloads: Family::default(),
            policy: PolicyMetrics::default(),
            checkpoints: Family::default(),
            checkpoint_last: Gauge::default(),
            tls_cert_expiry: Family::default(),
            tls_reloads: Family::default(),
            tls_handshake_failures: Family::default(),
            grpc_insecure_peers: Gauge::default(),
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
            "casf_audit_spooled",
            "Audit events written to the local spool because PostgreSQL could not take them",
            m.spool.spooled.clone(),
        );
        registry.register(
            "casf_audit_spool_depth",
            "Audit events in the local spool, not yet drained into the chain",
            m.spool.depth.clone(),
        );
        registry.register(
            "casf_audit_spool_lag_seconds",
            "Age of the oldest audit event in the local spool, not yet in the chain (0 when none)",
            m.spool.lag_seconds.clone(),
        );
        registry.register(
            "casf_audit_lost",
            "Audit events neither appended nor spooled (spool full or unwritable, or refused on drain)",
            m.spool.lost.clone(),
        );
        registry.register(
            "casf_audit_checkpoint",
            "Signed checkpoints serve wrote (CASF_AUDIT_CHECKPOINT_EVERY), by result",
            m.checkpoints.clone(),
        );
        zeros(
            &m.checkpoints,
            CheckpointResult::ALL.iter().map(|result| ResultLabels {
                result: result.as_str(),
            }),
        );
        registry.register(
            "casf_audit_checkpoint_last_timestamp_seconds",
            "When serve last wrote a signed checkpoint, Unix seconds (0: none yet)",
            m.checkpoint_last.clone(),
        );
        registry.register(
            "casf_door_rejected",
            "Calls a door answered without a decision, by door and reason",
            m.door_rejections.clone(),
        );

        // Pre-create every label value so rate() and alerts see a zero first.
        for decision in Decision::ALL {
            m.decisions
                .get_or_create(&DecisionLabels {
                    decision: decision.as_str(),
                })
                .inc_by(0);
            zeros(
                &m.door_decisions,
                Door::ALL.into_iter().map(|door| DoorLabels {
                    door: door.as_str(),
                    decision: decision.as_str(),
                }),
            );
        }
        zeros(
            &m.fail_closed,
            Trigger::ALL.into_iter().map(|trigger| TriggerLabels {
                trigger: trigger.as_str(),
            }),
        );
        zeros(
            &m.opa_errors,
            PolicyErrorKind::ALL.iter().map(|kind| KindLabels {
                kind: kind.as_str(),
            }),
        );
        registry.register(
            "casf_state_error",
            "State store (anti-replay, SMS limit) operations that failed, by kind; \
             `down` ones were not tried because the store was known to be disconnected",
            m.state_errors.clone(),
        );
        zeros(
            &m.state_errors,
            StateErrorKind::ALL.iter().map(|kind| KindLabels {
                kind: kind.as_str(),
            }),
        );
        zeros(
            &m.audit_failures,
            AuditErrorKind::ALL.iter().map(|kind| KindLabels {
                kind: kind.as_str(),
            }),
        );
        let reasons = DoorRejection::EXT_AUTHZ
            .map(|reason| (Door::ExtAuthz, reason))
            .into_iter()
            .chain(DoorRejection::HTTP.map(|reason| (Door::Http, reason)));
        zeros(
            &m.door_rejections,
            reasons.map(|(door, reason)| RejectionLabels {
                door: door.as_str(),
                reason: reason.as_str(),
            }),
        );
        registry.register(
            "casf_build_info",
            "The running build: crate version and git commit (always 1)",
            m.build_info.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: env!("CASF_BUILD_COMMIT"),
            })
            .set(1);
        registry.register(
            "casf_mode_floor",
            "The operator's mode floor: 1 for the mode in force, 0 for the others",
            m.mode_floor.clone(),
        );
        m.mode_floor(crate::domain::Mode::Allow);
        registry.register(
            "casf_caller_rejected",
            "Calls refused as unauthenticated under CASF_CALLERS (no decision, no audit row), by door and reason",
            m.caller_rejections.clone(),
        );
        for door in Door::ALL {
            zeros(
                &m.caller_rejections,
                crate::callers::Unauthenticated::ALL
                    .into_iter()
                    .map(|reason| RejectionLabels {
                        door: door.as_str(),
                        reason: reason.as_str(),
                    }),
            );
        }
        registry.register(
            "casf_callers_unauthenticated",
            "1 when CASF_CALLERS is unset: callers are not authenticated and may claim any role, tenant or tool",
            m.callers_unauthenticated.clone(),
        );
        m.callers_unauthenticated.set(1);
        registry.register(
            "casf_callers_reload",
            "Changes of the CASF_CALLERS file, applied (ok) or refused (the callers in force stay)",
            m.callers_reloads.clone(),
        );
        zeros(
            &m.callers_reloads,
            ReloadResult::ALL.iter().map(|result| ResultLabels {
                result: result.as_str(),
            }),
        );
        m.register_policy(&mut registry);
        registry.register(
            "casf_tls_cert_expiry_timestamp_seconds",
            "notAfter of the door TLS certificate in use (cert=server) and the earliest of \
             the client CA (cert=client_ca), Unix seconds; absent without CASF_TLS_CERT",
            m.tls_cert_expiry.clone(),
        );
        registry.register(
            "casf_tls_reload",
            "Changes of the door TLS files: ok (in use for new handshakes) or refused \
             (did not load; the previous certificate stays)",
            m.tls_reloads.clone(),
        );
        zeros(
            &m.tls_reloads,
            ReloadResult::ALL.iter().map(|result| ResultLabels {
                result: result.as_str(),
            }),
        );
        registry.register(
            "casf_tls_handshake_failed",
            "TLS handshakes on a door that failed or timed out (a client without an \
             accepted certificate, a plaintext client, a stalled handshake)",
            m.tls_handshake_failures.clone(),
        );
        zeros(
            &m.tls_handshake_failures,
            crate::door_tls::TlsDoor::ALL
                .into_iter()
                .map(|door| TlsDoorLabels {
                    door: door.as_str(),
                }),
        );
        registry.register(
            "casf_grpc_insecure_peers",
            "1 when CASF_GRPC_INSECURE_PEERS=true lets unauthenticated peers on a \
             non-loopback gRPC door assert identities (JWT claims, trusted headers)",
            m.grpc_insecure_peers.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
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

    pub fn opa_error(&self, kind: PolicyErrorKind) {
        self.opa_errors
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    pub fn replay_hit(&self) {
        self.replay_hits.inc();
    }

    pub fn replay_mismatch(&self) {
        self.replay_mismatches.inc();
    }

    /// One `twilio.send_sms` denied with `Inv_NoSmsBurst` by the limit
    /// itself (not when the limiter failed: that is a fail-closed).
    /// Shows `mode` as the floor in force (every mode has a series).
    pub fn mode_floor(&self, mode: crate::domain::Mode) {
        for each in crate::domain::Mode::ALL {
            self.mode_floor
                .get_or_create(&ModeLabels {
                    mode: each.as_str(),
                })
                .set(i64::from(*each == mode));
        }
    }

    pub fn sms_limited(&self) {
        self.sms_limited.inc();
    }

    pub fn audit_failed(&self, kind: AuditErrorKind) {
        self.audit_failures
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Handles on the spool metrics, for the audit writer and `/healthz`.
    pub fn spool(&self) -> SpoolMetrics {
        self.spool.clone()
    }

    pub fn state_error(&self, kind: StateErrorKind) {
        self.state_errors
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
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

    /// A call refused as unauthenticated under `CASF_CALLERS`.
    pub fn caller_rejected(&self, door: Door, reason: crate::callers::Unauthenticated) {
        self.caller_rejections
            .get_or_create(&RejectionLabels {
                door: door.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Whether callers are authenticated (`CASF_CALLERS` set).
    pub fn callers_authenticated(&self, authenticated: bool) {
        self.callers_unauthenticated.set(i64::from(!authenticated));
    }

    /// One periodic checkpoint written (at `unix_seconds`) or not.
    pub fn checkpoint(&self, result: CheckpointResult, unix_seconds: i64) {
        self.checkpoints
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
        if result == CheckpointResult::Written {
            self.checkpoint_last.set(unix_seconds);
        }
    }

    /// One change of the callers file, applied or refused.
    pub fn callers_reloaded(&self, applied: bool) {
        self.callers_reloads
            .get_or_create(&ResultLabels {
                result: ReloadResult::of(applied).as_str(),
            })
            .inc();
    }

    fn register_policy(&self, registry: &mut Registry) {
        let p = &self.policy;
        registry.register(
            "casf_policy_reload",
            "Policy and route map reloads, by result (ok, or refused: the old policy kept serving)",
            p.reloads.clone(),
        );
        zeros(
            &p.reloads,
            ReloadResult::ALL.iter().map(|result| ResultLabels {
                result: result.as_str(),
            }),
        );
        registry.register(
            "casf_policy_info",
            "The live policy set: SHA-256 of its Rego files and route map (always 1, one series)",
            p.info.clone(),
        );
        registry.register(
            "casf_shadow_decision",
            "Real decisions of calls in shadow (answered ALLOW), by decision",
            p.shadow_decisions.clone(),
        );
        registry.register(
            "casf_shadow_mode",
            "Shadow mode: global is 1 when CASF_ENFORCE=false; routes counts routes with enforce: false",
            p.shadow_mode.clone(),
        );
        registry.register(
            "casf_policy_disagreement",
            "Decisions where the candidate policy (CASF_POLICY_CANDIDATE_DIR) disagreed with the live one",
            p.disagreements.clone(),
        );
        zeros(
            &p.shadow_decisions,
            Decision::ALL.into_iter().map(|decision| DecisionLabels {
                decision: decision.as_str(),
            }),
        );
        self.shadow_global(false);
        self.shadow_routes(0);
    }

    /// One reload attempt that swapped a new policy in (`ok`) or was refused.
    pub fn policy_reloaded(&self, ok: bool) {
        self.policy
            .reloads
            .get_or_create(&ResultLabels {
                result: ReloadResult::of(ok).as_str(),
            })
            .inc();
    }

    /// `cert` is one of [`crate::door_tls::EXPIRY_CERTS`].
    pub fn tls_cert_expiry(&self, cert: &'static str, not_after: i64) {
        self.tls_cert_expiry
            .get_or_create(&CertLabels { cert })
            .set(not_after);
    }

    pub fn tls_reloaded(&self, ok: bool) {
        self.tls_reloads
            .get_or_create(&ResultLabels {
                result: ReloadResult::of(ok).as_str(),
            })
            .inc();
    }

    /// Shows `hash` as the live policy, removing `previous`'s series.
    pub fn policy_live(&self, previous: Option<&str>, hash: &str) {
        if let Some(previous) = previous.filter(|p| *p != hash) {
            self.policy.info.remove(&HashLabels {
                hash: previous.to_owned(),
            });
        }
        self.policy
            .info
            .get_or_create(&HashLabels {
                hash: hash.to_owned(),
            })
            .set(1);
    }

    /// The real decision of a call answered ALLOW because it is in shadow.
    pub fn shadow_decision(&self, decision: Decision) {
        self.policy
            .shadow_decisions
            .get_or_create(&DecisionLabels {
                decision: decision.as_str(),
            })
            .inc();
    }

    pub fn tls_handshake_failed(&self, door: crate::door_tls::TlsDoor) {
        self.tls_handshake_failures
            .get_or_create(&TlsDoorLabels {
                door: door.as_str(),
            })
            .inc();
    }

    /// `casf_shadow_mode{scope="global"}`: `CASF_ENFORCE=false`.
    pub fn shadow_global(&self, on: bool) {
        self.policy
            .shadow_mode
            .get_or_create(&ScopeLabels { scope: "global" })
            .set(i64::from(on));
    }

    /// `casf_shadow_mode{scope="routes"}`: routes with `enforce: false`.
    pub fn shadow_routes(&self, routes: usize) {
        self.policy
            .shadow_mode
            .get_or_create(&ScopeLabels { scope: "routes" })
            .set(i64::try_from(routes).unwrap_or(i64::MAX));
    }

    /// A decision where the candidate policy disagreed with the live one.
    pub fn policy_disagreement(&self, live: Decision, candidate: Decision) {
        self.policy
            .disagreements
            .get_or_create(&DisagreementLabels {
                live: live.as_str(),
                candidate: candidate.as_str(),
            })
            .inc();
    }

    pub fn grpc_insecure_peers(&self, on: bool) {
        self.grpc_insecure_peers.set(i64::from(on));
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

    #[test]
    fn build_info_names_the_version_and_a_commit() {
        let text = Metrics::new().encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("casf_build_info{"))
            .unwrap_or_else(|| panic!("no casf_build_info in\n{text}"));
        assert!(
            line.starts_with(&format!(
                "casf_build_info{{version=\"{}\",commit=\"",
                env!("CARGO_PKG_VERSION")
            )),
            "{line}"
        );
        assert!(line.ends_with("\"} 1"), "{line}");
        assert!(!env!("CASF_BUILD_COMMIT").is_empty());
    }

    #[test]
    fn process_stats_parse_proc_fields() {
        // A command name with a space and a parenthesis, as proc(5) allows.
        let stat = "4242 (casf (v) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 150 0 0 20 0 9 0 5000 123456789 3000 18446744073709551615";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let stats = ProcessStats::parse(stat, proc_stat, 100.0, 4096).unwrap();
        assert_eq!(stats.cpu_seconds, 4.0);
        assert_eq!(stats.resident_bytes, 3000 * 4096);
        assert_eq!(stats.virtual_bytes, 123_456_789);
        assert_eq!(stats.start_time_seconds, 1_700_000_050.0);
        assert!(ProcessStats::parse("garbage", proc_stat, 100.0, 4096).is_none());
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_read_on_each_scrape() {
        let text = Metrics::new().encode();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"));
            let value: f64 = value.parse().unwrap();
            assert!(value >= 0.0, "{name} {value}");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_start_time_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
    }

    #[test]
    fn verify_rejections_are_counted_by_status() {
        assert_eq!(
            DoorRejection::from_http_status(400),
            Some(DoorRejection::BadRequest)
        );
        assert_eq!(
            DoorRejection::from_http_status(413),
            Some(DoorRejection::TooLarge)
        );
        assert_eq!(
            DoorRejection::from_http_status(415),
            Some(DoorRejection::UnsupportedMediaType)
        );
        assert_eq!(
            DoorRejection::from_http_status(422),
            Some(DoorRejection::Unprocessable)
        );
        for status in [200, 404, 405, 500, 503] {
            assert_eq!(DoorRejection::from_http_status(status), None);
        }
        let m = Metrics::new();
        let before = m.encode();
        for reason in DoorRejection::HTTP {
            let zero = format!(
                "casf_door_rejected_total{{door=\"http\",reason=\"{}\"}} 0",
                reason.as_str()
            );
            assert!(before.lines().any(|l| l == zero), "missing {zero}");
        }
        m.door_rejected(Door::Http, DoorRejection::Unprocessable);
        assert!(
            m.encode()
                .lines()
                .any(|l| l == "casf_door_rejected_total{door=\"http\",reason=\"unprocessable\"} 1")
        );
    }
}
