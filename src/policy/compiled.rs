//! The decision rules compiled once to regorus' RVM bytecode: the embedded
//! engine's fast path.
//!
//! Interpreting `data.casf.allow` and `data.casf.violations` costs tens of
//! microseconds a request; the compiled program answers the same two
//! queries several times faster (numbers in the README). It is built at load
//! time, only for policies inside the vetted subset (see
//! [`super::subset`]), and it never answers with an error of its own: when
//! the VM fails (its instruction budget, say), the caller re-evaluates with
//! the interpreter, so every error a client can see is the interpreter's.
//!
//! Both rules are read in one VM run, through a generated partial set in a
//! package of its own (`decision contains ["allow", x] if x := data.casf.allow`):
//! the VM forgets computed rules between runs, so two runs would evaluate
//! the helper rules `allow` and `violations` share twice.

use std::sync::Arc;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::program::Program;
use regorus::rvm::vm::{RegoVM, VmError};
use regorus::{Engine, Rc, Value};

use super::pool::Pool;
use super::subset::Unsupported;

/// Package of the generated rule; a policy may not use it.
const DECISION_PACKAGE: &str = "casf_verifier_compiled";
/// The generated rule: a set of `[name, value]` pairs, one per defined rule.
const DECISION_RULE: &str = "data.casf_verifier_compiled.decision";
const ALLOW: &str = "allow";
const VIOLATIONS: &str = "violations";

/// Why a policy is interpreted rather than compiled.
#[derive(Debug, thiserror::Error)]
pub enum NotCompiled {
    #[error("uses {0}, outside the compiled subset")]
    OutsideSubset(Unsupported),
    #[error("the RVM compiler rejects it: {0}")]
    Rejected(String),
}

impl NotCompiled {
    /// Bounded label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            NotCompiled::OutsideSubset(_) => "outside_subset",
            NotCompiled::Rejected(_) => "rejected",
        }
    }
}

/// Why the compiled program gave no answer (the interpreter then decides).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("the decision rule is not a set of [name, value] pairs: {0}")]
    Shape(String),
}

impl RunError {
    /// Bounded label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            RunError::Vm(_) => "vm",
            RunError::Shape(_) => "shape",
        }
    }
}

/// The compiled decision rule, with idle VMs ready to run it.
#[derive(Debug)]
pub(super) struct CompiledDecision {
    program: Arc<Program>,
    vms: Pool<RegoVM>,
}

impl CompiledDecision {
    /// Compiles the declared decision rules of `template` (an engine with
    /// every policy added and analysed). `None` paths are undeclared rules.
    pub(super) fn compile(
        template: &Engine,
        allow: Option<&str>,
        violations: Option<&str>,
    ) -> Result<Self, NotCompiled> {
        let rejected = |e: &dyn std::fmt::Display| NotCompiled::Rejected(e.to_string());
        let packages = template
            .get_policy_package_components()
            .map_err(|e| rejected(&e))?;
        if packages
            .iter()
            .any(|p| p.components.first().is_some_and(|c| c == DECISION_PACKAGE))
        {
            return Err(NotCompiled::Rejected(format!(
                "package {DECISION_PACKAGE} is reserved for the compiled decision"
            )));
        }
        let mut source = format!("package {DECISION_PACKAGE}\n\n");
        for (name, path) in [(ALLOW, allow), (VIOLATIONS, violations)] {
            if let Some(path) = path {
                source.push_str(&format!(
                    "decision contains [\"{name}\", x] if x := {path}\n"
                ));
            }
        }
        if allow.is_none() && violations.is_none() {
            return Err(NotCompiled::Rejected(
                "the package declares neither allow nor violations".to_string(),
            ));
        }
        let mut engine = template.clone();
        engine
            .add_policy(format!("<{DECISION_PACKAGE}>"), source)
            .map_err(|e| rejected(&e))?;
        let policy = engine
            .compile_with_entrypoint(&Rc::from(DECISION_RULE))
            .map_err(|e| rejected(&e))?;
        let program =
            Compiler::compile_from_policy(&policy, &[DECISION_RULE]).map_err(|e| rejected(&e))?;
        let vms = Pool::per_core(|| new_vm(&program)).map_err(|e| rejected(&e))?;
        Ok(CompiledDecision { program, vms })
    }

    /// The values of `allow` and `violations` (`Undefined` when undeclared
    /// or undefined) for `input`.
    pub(super) fn evaluate(&self, input: Value) -> Result<(Value, Value), RunError> {
        let mut vm = match self.vms.take() {
            Some(vm) => vm,
            None => new_vm(&self.program)?,
        };
        vm.set_input(input);
        let answer = vm.execute_entry_point_by_index(0);
        // Drop the request's input now; registers that still hold parts of
        // it are reset when the VM next runs.
        vm.set_input(Value::Undefined);
        let answer = answer?;
        self.vms.put(vm);
        split(&answer)
    }

    #[cfg(test)]
    pub(super) fn idle_vms(&self) -> (usize, usize) {
        (self.vms.idle_count(), self.vms.max_idle())
    }
}

/// `{["allow", a], ["violations", v]}` into `(a, v)`; a missing pair is an
/// undefined rule.
fn split(decision: &Value) -> Result<(Value, Value), RunError> {
    let shape = || RunError::Shape(decision.to_string());
    let (mut allow, mut violations) = (Value::Undefined, Value::Undefined);
    for pair in decision.as_set().map_err(|_| shape())? {
        match pair.as_array().map_err(|_| shape())?.as_slice() {
            [Value::String(name), value] if name.as_ref() == ALLOW => allow = value.clone(),
            [Value::String(name), value] if name.as_ref() == VIOLATIONS => {
                violations = value.clone()
            }
            _ => return Err(shape()),
        }
    }
    Ok((allow, violations))
}

/// A VM with the program loaded and the interpreter's settings: builtin
/// errors make an expression undefined, and `data` holds only the rules.
fn new_vm(program: &Arc<Program>) -> Result<RegoVM, VmError> {
    let mut vm = RegoVM::new();
    vm.load_program(program.clone());
    vm.set_strict_builtin_errors(false);
    vm.set_data(Value::new_object())?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str, value: Value) -> Value {
        Value::from(vec![Value::from(name), value])
    }

    #[test]
    fn the_decision_set_splits_into_allow_and_violations() {
        let violations = Value::from(vec![Value::from("A")]);
        let both = Value::from(
            [
                pair(ALLOW, Value::Bool(true)),
                pair(VIOLATIONS, violations.clone()),
            ]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>(),
        );
        assert_eq!(
            split(&both).expect("splits"),
            (Value::Bool(true), violations)
        );
        // A rule with no pair is undefined.
        assert_eq!(
            split(&Value::new_set()).expect("splits"),
            (Value::Undefined, Value::Undefined)
        );
        for malformed in [
            Value::Bool(true),
            Value::from(vec![pair(ALLOW, Value::Bool(true))]),
            Value::from(
                [pair("other", Value::Null)]
                    .into_iter()
                    .collect::<std::collections::BTreeSet<_>>(),
            ),
        ] {
            let err = split(&malformed).expect_err("not a decision set");
            assert_eq!(err.kind(), "shape", "{err}");
        }
    }

    #[test]
    fn the_generated_package_name_is_reserved() {
        let mut engine = Engine::new();
        for (name, rego) in [
            ("casf.rego", "package casf\n\nallow if input.a\n"),
            (
                "mine.rego",
                "package casf_verifier_compiled\n\ndecision contains 1 if true\n",
            ),
        ] {
            engine
                .add_policy(name.to_string(), rego.to_string())
                .expect("parses");
        }
        let err = CompiledDecision::compile(&engine, Some("data.casf.allow"), None)
            .expect_err("reserved package");
        assert!(err.to_string().contains("reserved"), "{err}");
        assert_eq!(err.kind(), "rejected");
    }
}
