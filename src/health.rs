//! Readiness (`/healthz`, and gRPC health later): every dependency checked in
//! turn, audit store, then state store, then policy engine, each with its own
//! timeout. The first failure names its component; configured secrets are
//! masked out of the error text.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::audit::AuditLog;
use crate::audit::spool::SpoolMode;
use crate::callers::Callers;
use crate::config::Redactor;
use crate::metrics::SpoolMetrics;
use crate::policy::PolicyEngine;
use crate::state::ReplayGuard;

/// Per-dependency check budget (guide §4).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The input used to probe the policy engine (guide RB-2).
fn probe_input() -> Value {
    json!({"tool": "healthcheck", "mode": "ALLOW", "role": "system", "subject": {}, "args": {}, "context": {}})
}

pub struct Readiness {
    /// `None` when auditing is disabled.
    pub audit: Option<Arc<dyn AuditLog>>,
    pub state: Arc<dyn ReplayGuard>,
    pub policy: Arc<dyn PolicyEngine>,
    pub redactor: Redactor,
    /// The spool's depth and lag, when `CASF_AUDIT_SPOOL` is in use. Shown,
    /// never a reason to be unready: a deep spool is PostgreSQL's outage,
    /// which the audit check already reports (in `always` mode as well, as
    /// the guide has `/healthz` check PostgreSQL).
    pub spool: Option<SpoolView>,
    /// `CASF_CALLERS`; `None` when callers are not authenticated, which the
    /// checks say (a warning, not a failure: that is the guide's behaviour).
    pub callers: Option<Arc<Callers>>,
    /// The live policy set and `CASF_ENFORCE`: `/healthz` shows the policy
    /// hash and whether shadow mode is on (never silently).
    pub enforcement: Option<Enforcement>,
}

pub struct Enforcement {
    pub live: Arc<crate::policy::live::LivePolicy>,
    pub enforce: bool,
}

impl Enforcement {
    /// `off`, or what is in shadow.
    fn shadow(&self) -> String {
        let routes = self.live.current().routes.shadowed_routes();
        match (self.enforce, routes) {
            (false, _) => {
                "on: CASF_ENFORCE=false, every call is answered ALLOW unless it failed closed"
                    .into()
            }
            (true, 0) => "off".into(),
            (true, n) => format!(
                "on: {n} routes with enforce: false are answered ALLOW unless they fail closed"
            ),
        }
    }
}

/// What `/healthz` shows of the audit spool.
pub struct SpoolView {
    pub metrics: SpoolMetrics,
    pub mode: SpoolMode,
}

/// Result of one readiness pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Every component answered: `{component: "ok" | "disabled"}`.
    Ready(Map<String, Value>),
    /// `"<component>: <error>"` of the first that did not.
    NotReady(String),
}

impl Readiness {
    pub async fn check(&self) -> Health {
        let mut checks = Map::new();
        match &self.audit {
            Some(audit) => {
                if let Err(detail) = self.probe(audit.backend(), audit.ping()).await {
                    return Health::NotReady(match &self.spool {
                        Some(spool) => {
                            format!("{detail} (audit spool depth {})", spool.metrics.depth.get())
                        }
                        None => detail,
                    });
                }
                checks.insert(audit.backend().into(), "ok".into());
            }
            None => {
                checks.insert("audit".into(), "disabled".into());
            }
        }
        if let Some(spool) = &self.spool {
            checks.insert(
                "audit_spool".into(),
                json!({
                    "depth": spool.metrics.depth.get(),
                    "lag_seconds": spool.metrics.lag_seconds.get(),
                    "mode": spool.mode.as_str(),
                }),
            );
        }
        if let Err(detail) = self.probe(self.state.backend(), self.state.ping()).await {
            return Health::NotReady(detail);
        }
        checks.insert(self.state.backend().into(), "ok".into());
        // A warning, not a failure: replays still work until the store restarts.
        if let Some(persistence) = self.state.persistence().await {
            let shown = match persistence.warning() {
                Some(warning) => format!("{} (warning: {warning})", persistence.as_str()),
                None => persistence.as_str().to_owned(),
            };
            checks.insert(
                format!("{}_persistence", self.state.backend()),
                shown.into(),
            );
        }
        let input = probe_input();
        if let Err(detail) = self
            .probe(self.policy.backend(), self.policy.evaluate(&input))
            .await
        {
            return Health::NotReady(detail);
        }
        checks.insert(self.policy.backend().into(), "ok".into());
        let callers = match &self.callers {
            Some(callers) => json!({"authenticated": true, "count": callers.current().len()}),
            None => json!({
                "authenticated": false,
                "warning": "CASF_CALLERS is unset: callers are not authenticated and may claim any role, tenant or tool",
            }),
        };
        checks.insert("callers".into(), callers);
        if let Some(enforcement) = &self.enforcement {
            checks.insert(
                "policy_hash".into(),
                enforcement.live.current().hash.clone().into(),
            );
            checks.insert("shadow".into(), enforcement.shadow().into());
        }
        Health::Ready(checks)
    }

    async fn probe<T, E: std::fmt::Display>(
        &self,
        component: &str,
        check: impl Future<Output = Result<T, E>>,
    ) -> Result<(), String> {
        match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!(
                "{component}: {}",
                self.redactor.redact(&error.to_string())
            )),
            Err(_) => Err(format!(
                "{component}: no answer within {}s",
                CHECK_TIMEOUT.as_secs()
            )),
        }
    }
}
