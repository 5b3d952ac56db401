//! Policy evaluation: the Rego `casf` package, behind one trait.
//!
//! The pipeline asks a [`PolicyEngine`] for `data.casf` and gets back a
//! [`PolicyVerdict`]. Two engines exist: the embedded `regorus` engine
//! (the default, loading `CASF_POLICY_DIR`; compiled to RVM bytecode when the
//! policy allows, interpreted otherwise) and an OPA server over its REST
//! API (`OPA_URL`). Errors carry a `kind` that is the `casf_opa_error_total`
//! label and decides fail-closed behaviour for writes.

pub mod compiled;
#[cfg(test)]
mod differential_tests;
pub mod embedded;
pub mod live;
pub mod opa;
mod pool;
pub mod subset;

use async_trait::async_trait;

/// What `data.casf` said about one input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyVerdict {
    pub allow: bool,
    /// Violation codes reported by the policy, in the order the engine gave them.
    pub violations: Vec<String>,
    /// Which policy the engine says decided, when it says: OPA's bundle
    /// revisions (`name:revision`, sorted). `None` from the embedded engine,
    /// whose files are already named by the audit payload's `policy.hash`.
    pub revision: Option<String>,
}

impl PolicyVerdict {
    /// The same answer, whichever policy revision gave it.
    pub fn same_outcome(&self, other: &PolicyVerdict) -> bool {
        self.allow == other.allow && self.violations == other.violations
    }
}

/// Why a policy evaluation produced no verdict.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy evaluation timed out")]
    Timeout,
    #[error("policy engine unavailable: {0}")]
    Unavailable(String),
    #[error("policy engine answered HTTP {0}")]
    BadStatus(u16),
    #[error("policy engine gave an unusable answer: {0}")]
    BadResponse(String),
}

crate::labels::label_enum!(
    /// The `kind` label of `casf_opa_error_total`.
    pub enum PolicyErrorKind {
        Timeout => "timeout",
        Unavailable => "unavailable",
        BadStatus => "bad_status",
        BadResponse => "bad_response",
    }
);

impl PolicyError {
    pub fn kind(&self) -> PolicyErrorKind {
        match self {
            PolicyError::Timeout => PolicyErrorKind::Timeout,
            PolicyError::Unavailable(_) => PolicyErrorKind::Unavailable,
            PolicyError::BadStatus(_) => PolicyErrorKind::BadStatus,
            PolicyError::BadResponse(_) => PolicyErrorKind::BadResponse,
        }
    }
}

/// Evaluates the `casf` package for one policy input
/// (`{tool, mode, role, subject, args, context}`).
#[async_trait]
pub trait PolicyEngine: Send + Sync {
    /// Short backend name for the startup line and `/healthz` (`regorus`, `opa`).
    fn backend(&self) -> &'static str;
    async fn evaluate(&self, input: &serde_json::Value) -> Result<PolicyVerdict, PolicyError>;
}
