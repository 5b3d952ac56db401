//! The verifier's answer, identical on every door.

use serde::{Deserialize, Serialize};

/// Stable machine codes for violations.
pub mod violation {
    pub const FAIL_CLOSED: &str = "FAIL_CLOSED";
    pub const REPLAY_CHECK_UNAVAILABLE: &str = "Inv_ReplayCheckUnavailable";
    pub const REPLAY_PAYLOAD_MISMATCH: &str = "Inv_ReplayPayloadMismatch";
    pub const REPLAY_CONCURRENT: &str = "Inv_ReplayConcurrent";
    pub const NO_SMS_BURST: &str = "Inv_NoSmsBurst";
    pub const OPA_UNAVAILABLE: &str = "OPA_Unavailable";
    pub const OPA_DENY: &str = "OPA_Deny";
    pub const MODE_KILL_SWITCH: &str = "Mode_KillSwitch";
    pub const MODE_READ_ONLY_NO_WRITE: &str = "Mode_ReadOnly_NoWrite";
    /// An Envoy Check that no route of the route map matches.
    pub const ROUTE_UNMAPPED: &str = "Route_Unmapped";
    /// A door could not get a decision out of the pipeline (fails closed).
    pub const INTERNAL_ERROR: &str = "Verifier_InternalError";
    /// `CASF_AUDIT_STRICT`: the write's audit event could be recorded
    /// neither in the chain nor in the spool.
    pub const AUDIT_UNRECORDED: &str = "Audit_Unrecorded";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Decision {
    Allow,
    Deny,
    NeedsApproval,
}

impl Decision {
    pub const ALL: [Decision; 3] = [Decision::Allow, Decision::Deny, Decision::NeedsApproval];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "ALLOW",
            Decision::Deny => "DENY",
            Decision::NeedsApproval => "NEEDS_APPROVAL",
        }
    }
}

/// Body of every decision, HTTP 200 on `/verify`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VerifyResponse {
    pub decision: Decision,
    pub violations: Vec<String>,
    pub allowed_outputs: Vec<String>,
    pub reason: String,
    /// Shadow mode only: the real decision of a call answered ALLOW because
    /// it is in shadow (`CASF_ENFORCE=false`, or `enforce: false` on its route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_decision: Option<Decision>,
    /// Shadow mode only: the real decision's violations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_violations: Option<Vec<String>>,
}

impl VerifyResponse {
    /// A response whose decision follows from its violations: none means ALLOW.
    pub fn from_violations(violations: Vec<String>, allowed_outputs: Vec<String>) -> Self {
        if violations.is_empty() {
            VerifyResponse {
                decision: Decision::Allow,
                violations,
                allowed_outputs,
                reason: "OK".into(),
                shadow_decision: None,
                shadow_violations: None,
            }
        } else {
            let reason = format!("denied: {}", violations.join(", "));
            VerifyResponse {
                decision: Decision::Deny,
                violations,
                allowed_outputs: Vec::new(),
                reason,
                shadow_decision: None,
                shadow_violations: None,
            }
        }
    }

    pub fn deny(violation: &str) -> Self {
        Self::from_violations(vec![violation.to_owned()], Vec::new())
    }

    /// The answer to a call in shadow: ALLOW, with the real decision and
    /// violations beside it for the caller to see.
    pub fn shadowed(self) -> Self {
        VerifyResponse {
            decision: Decision::Allow,
            violations: Vec::new(),
            allowed_outputs: self.allowed_outputs,
            reason: format!("shadow: {}", self.reason),
            shadow_decision: Some(self.decision),
            shadow_violations: Some(self.violations),
        }
    }

    /// Whether a dependency (or the verifier itself) failed and the call was
    /// denied for that: shadow never turns these into ALLOW.
    pub fn failed_closed(&self) -> bool {
        self.violations.iter().any(|v| v == violation::FAIL_CLOSED)
    }
}
