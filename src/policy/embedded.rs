//! The embedded policy engine: the `casf` Rego package evaluated in-process
//! by `regorus`.
//!
//! This is the default [`PolicyEngine`](super::PolicyEngine): it removes the
//! OPA sidecar (and its network hop and failure mode) from the request path
//! while evaluating the very same `policies/*.rego` files an OPA server
//! would. The policies are parsed and analysed exactly once, in
//! [`EmbeddedPolicy::load`], which also compiles the decision rules to RVM
//! bytecode when the policy stays inside the subset where the compiled
//! program provably answers like the interpreter ([`super::compiled`],
//! [`super::subset`]); otherwise the interpreter serves every request.
//! Requests borrow an already prepared VM or engine from a small pool, so no
//! request re-parses policy or holds a lock while it evaluates.
//! [`EmbeddedPolicy::run_tests`] runs the `test_*` rules shipped next to the
//! policy with the interpreter (they use `with`, which the RVM lacks).

use std::path::{Path, PathBuf};

use regorus::unstable::{Module, Rule, RuleHead};
use regorus::{Engine, Value};
use serde::Deserialize;

use super::compiled::{CompiledDecision, NotCompiled};
use super::pool::Pool;
use super::{PolicyEngine, PolicyError, PolicyVerdict, subset};

/// Package path components of the package queried for decisions.
const DECISION_PACKAGE: &str = "casf";
/// Rule names read from the decision package.
const ALLOW_RULE: &str = "allow";
const VIOLATIONS_RULE: &str = "violations";
/// Prefix of the rules [`EmbeddedPolicy::run_tests`] runs.
const TEST_PREFIX: &str = "test_";

/// Why the policy directory (or the given sources) could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error(
        "cannot read policy directory {}: {source}",
        crate::config::shown_path(dir)
    )]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read policy file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no *.rego policy files in {origin}")]
    NoPolicies { origin: String },
    #[error("cannot parse policy file {file}: {reason}")]
    Parse { file: String, reason: String },
    #[error("policies in {origin} do not compile: {reason}")]
    Compile { origin: String, reason: String },
    #[error("no policy file in {origin} declares `package casf` (files: {})", files.join(", "))]
    MissingPackage { origin: String, files: Vec<String> },
}

/// Outcome of one `test_*` rule.
#[derive(Debug, Clone)]
pub struct RegoTestResult {
    /// Full rule path, e.g. `data.casf_test.test_x`.
    pub name: String,
    /// True only if the rule evaluated to `true`.
    pub passed: bool,
    /// The evaluation error, if the rule failed with one.
    pub error: Option<String>,
}

/// The `casf` package loaded into `regorus`, ready to evaluate.
#[derive(Debug)]
pub struct EmbeddedPolicy {
    /// All policies added and analysed; cloned when the pool runs dry.
    template: Engine,
    /// Idle engines, each a clone of `template`.
    engines: Pool<Engine>,
    /// The fast path, when the policy could be compiled.
    compiled: Option<CompiledDecision>,
    /// `data.casf.allow`, if the package declares `allow`.
    allow_path: Option<String>,
    /// `data.casf.violations`, if the package declares `violations`.
    violations_path: Option<String>,
    /// Every `test_*` rule path, in file then source order.
    tests: Vec<String>,
}

impl EmbeddedPolicy {
    /// Loads every `*.rego` file directly inside `dir` (sorted by name, not
    /// recursive), as Rego v1.
    pub fn load(dir: &Path) -> Result<Self, PolicyLoadError> {
        let read_dir_err = |source| PolicyLoadError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir_err)? {
            let path = entry.map_err(read_dir_err)?.path();
            if path.extension().is_some_and(|ext| ext == "rego") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();

        let mut sources = Vec::with_capacity(files.len());
        for path in files {
            let rego =
                std::fs::read_to_string(&path).map_err(|source| PolicyLoadError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
            sources.push((path.display().to_string(), rego));
        }
        Self::build(&dir.display().to_string(), sources)
    }

    /// Loads policies from `(file name, rego source)` pairs, as Rego v1.
    pub fn from_sources(sources: &[(String, String)]) -> Result<Self, PolicyLoadError> {
        Self::build("<inline sources>", sources.to_vec())
    }

    /// Loads policies from `(file name, rego source)` pairs read from
    /// `origin` (named in errors), as Rego v1.
    pub fn from_named_sources(
        origin: &str,
        sources: Vec<(String, String)>,
    ) -> Result<Self, PolicyLoadError> {
        Self::build(origin, sources)
    }

    fn build(origin: &str, sources: Vec<(String, String)>) -> Result<Self, PolicyLoadError> {
        if sources.is_empty() {
            return Err(PolicyLoadError::NoPolicies {
                origin: origin.to_string(),
            });
        }

        let mut engine = Engine::new();
        // Same default as an OPA server: a builtin error makes the expression
        // undefined instead of failing the whole query.
        engine.set_strict_builtin_errors(false);
        let file_names: Vec<String> = sources.iter().map(|(name, _)| name.clone()).collect();
        for (name, rego) in sources {
            engine
                .add_policy(name.clone(), rego)
                .map_err(|e| PolicyLoadError::Parse {
                    file: name,
                    reason: e.to_string(),
                })?;
        }

        let packages =
            engine
                .get_policy_package_components()
                .map_err(|e| PolicyLoadError::Compile {
                    origin: origin.to_string(),
                    reason: e.to_string(),
                })?;
        // `get_modules` lists modules in the same (insertion) order.
        let modules = engine.get_modules().clone();
        let module_packages: Vec<(&[String], &Module)> = packages
            .iter()
            .zip(modules.iter())
            .map(|(package, module)| (package.components.as_slice(), &**module))
            .collect();

        let mut has_package = false;
        let mut allow_path = None;
        let mut violations_path = None;
        let mut tests = Vec::new();
        for (package, module) in packages.iter().zip(modules.iter()) {
            let package_path = rule_path_prefix(&package.components);
            let is_decision = package.components == [DECISION_PACKAGE];
            has_package |= is_decision;
            for rule in &module.policy {
                let Some((name, is_function)) = rule_name(rule) else {
                    continue;
                };
                if is_decision && !is_function {
                    if name == ALLOW_RULE {
                        allow_path = Some(format!("{package_path}.{name}"));
                    } else if name == VIOLATIONS_RULE {
                        violations_path = Some(format!("{package_path}.{name}"));
                    }
                }
                if !is_function && name.starts_with(TEST_PREFIX) {
                    let path = format!("{package_path}.{name}");
                    if !tests.contains(&path) {
                        tests.push(path);
                    }
                }
            }
        }
        if !has_package {
            return Err(PolicyLoadError::MissingPackage {
                origin: origin.to_string(),
                files: file_names,
            });
        }

        // Analyse and schedule the modules now (unsafe variables, recursion,
        // unknown functions...), so clones are ready to evaluate.
        engine
            .eval_query("true".to_string(), false)
            .map_err(|e| PolicyLoadError::Compile {
                origin: origin.to_string(),
                reason: e.to_string(),
            })?;

        let compiled = subset::check(&module_packages, &[DECISION_PACKAGE.to_string()])
            .map_err(NotCompiled::OutsideSubset)
            .and_then(|()| {
                CompiledDecision::compile(
                    &engine,
                    allow_path.as_deref(),
                    violations_path.as_deref(),
                )
            });
        let compiled = match compiled {
            Ok(compiled) => Some(compiled),
            Err(why) => {
                tracing::info!(
                    origin,
                    kind = why.kind(),
                    reason = %why,
                    "policy is interpreted, not compiled (slower, same answers)"
                );
                None
            }
        };
        let Ok(engines) = Pool::per_core(|| Ok::<_, std::convert::Infallible>(engine.clone()));
        let policy = Self {
            template: engine,
            engines,
            compiled,
            allow_path,
            violations_path,
            tests,
        };
        tracing::debug!(
            origin,
            files = file_names.len(),
            tests = policy.tests.len(),
            evaluator = policy.evaluator(),
            "loaded embedded policy"
        );
        Ok(policy)
    }

    /// `compiled` when requests run on the compiled program, `interpreter`
    /// when the policy is outside the compiled subset.
    pub fn evaluator(&self) -> &'static str {
        if self.compiled.is_some() {
            "compiled"
        } else {
            "interpreter"
        }
    }

    /// Evaluates `data.casf.allow` and `data.casf.violations` for `input`.
    ///
    /// An undefined `allow` is `false`; undefined `violations` is empty;
    /// violations come back sorted.
    pub fn evaluate_sync(&self, input: &serde_json::Value) -> Result<PolicyVerdict, PolicyError> {
        // Deserializing from the borrowed tree skips a deep clone of it.
        let input = Value::deserialize(input).map_err(|e| {
            PolicyError::BadResponse(format!("policy input not representable: {e}"))
        })?;
        if let Some(compiled) = &self.compiled {
            match compiled.evaluate(input.clone()) {
                Ok((allow, violations)) => return verdict(allow, || Ok(violations)),
                Err(error) => tracing::debug!(
                    kind = error.kind(),
                    %error,
                    "compiled policy gave no answer; the interpreter decides"
                ),
            }
        }
        self.interpret(input)
    }

    fn interpret(&self, input: Value) -> Result<PolicyVerdict, PolicyError> {
        let mut engine = self.engines.take().unwrap_or_else(|| self.template.clone());
        engine.set_input(input);
        let answer = verdict(
            eval_declared(&mut engine, self.allow_path.as_deref())?,
            || eval_declared(&mut engine, self.violations_path.as_deref()),
        );
        if answer.is_ok() {
            // Do not keep the request's data around in an idle engine.
            engine.set_input(Value::new_object());
            self.engines.put(engine);
        }
        answer
    }

    #[cfg(test)]
    pub(super) fn template(&self) -> &Engine {
        &self.template
    }

    /// The interpreter's verdict, never the compiled program's.
    #[cfg(test)]
    pub(super) fn evaluate_interpreted(
        &self,
        input: &serde_json::Value,
    ) -> Result<PolicyVerdict, PolicyError> {
        self.interpret(Value::deserialize(input).expect("representable"))
    }

    /// The compiled program's verdict, without the interpreter fallback:
    /// `None` when the policy is interpreted, `Some(Err)` when the VM failed.
    #[cfg(test)]
    pub(super) fn evaluate_compiled(
        &self,
        input: &serde_json::Value,
    ) -> Option<Result<Result<PolicyVerdict, PolicyError>, super::compiled::RunError>> {
        let input = Value::deserialize(input).expect("representable");
        let compiled = self.compiled.as_ref()?;
        Some(
            compiled
                .evaluate(input)
                .map(|(allow, violations)| verdict(allow, || Ok(violations))),
        )
    }

    /// Runs every rule named `test_*` in every loaded package, each on a fresh
    /// engine with no input. A test passes only if it evaluates to `true`.
    pub fn run_tests(&self) -> Vec<RegoTestResult> {
        self.tests
            .iter()
            .map(|name| {
                let mut engine = self.template.clone();
                let (passed, error) = match engine.eval_rule(name.clone()) {
                    Ok(Value::Bool(true)) => (true, None),
                    Ok(_) => (false, None),
                    Err(e) => (false, Some(e.to_string())),
                };
                RegoTestResult {
                    name: name.clone(),
                    passed,
                    error,
                }
            })
            .collect()
    }
}

/// Reads `allow` and (only then) `violations` as the contract defines: an
/// undefined `allow` is `false`, undefined `violations` is empty, and
/// violations come back sorted. Both evaluators answer through here.
fn verdict(
    allow: Value,
    violations: impl FnOnce() -> Result<Value, PolicyError>,
) -> Result<PolicyVerdict, PolicyError> {
    let allow = match allow {
        Value::Bool(allow) => allow,
        Value::Undefined => false,
        other => {
            return Err(PolicyError::BadResponse(format!(
                "data.casf.allow is not a boolean: {}",
                describe(&other)
            )));
        }
    };
    let mut violations = match &violations()? {
        Value::Undefined => Vec::new(),
        Value::Set(set) => strings(set.iter())?,
        Value::Array(array) => strings(array.iter())?,
        other => {
            return Err(PolicyError::BadResponse(format!(
                "data.casf.violations is not a set or array: {}",
                describe(other)
            )));
        }
    };
    violations.sort();
    Ok(PolicyVerdict {
        allow,
        violations,
        revision: None,
    })
}

#[async_trait::async_trait]
impl PolicyEngine for EmbeddedPolicy {
    fn backend(&self) -> &'static str {
        "regorus"
    }

    async fn evaluate(&self, input: &serde_json::Value) -> Result<PolicyVerdict, PolicyError> {
        self.evaluate_sync(input)
    }
}

/// Evaluates a rule the package declares; an undeclared rule is undefined.
fn eval_declared(engine: &mut Engine, path: Option<&str>) -> Result<Value, PolicyError> {
    match path {
        Some(path) => engine
            .eval_rule(path.to_string())
            .map_err(|e| PolicyError::BadResponse(format!("evaluating {path}: {e}"))),
        None => Ok(Value::Undefined),
    }
}

fn strings<'a>(values: impl Iterator<Item = &'a Value>) -> Result<Vec<String>, PolicyError> {
    values
        .map(|value| match value {
            Value::String(s) => Ok(s.to_string()),
            other => Err(PolicyError::BadResponse(format!(
                "data.casf.violations holds a non-string: {}",
                describe(other)
            ))),
        })
        .collect()
}

/// Short rendering of a value for error messages.
fn describe(value: &Value) -> String {
    let mut text = serde_json::to_string(value).unwrap_or_else(|_| "<unprintable>".to_string());
    if text.len() > 200 {
        let mut cut = 200;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// `data.a.b` for package components `["a", "b"]`; components that are not
/// identifiers use bracket notation (`data.a["b.c"]`).
fn rule_path_prefix(components: &[String]) -> String {
    let mut path = String::from("data");
    for component in components {
        if is_identifier(component) {
            path.push('.');
            path.push_str(component);
        } else {
            path.push('[');
            path.push_str(&serde_json::Value::String(component.clone()).to_string());
            path.push(']');
        }
    }
    path
}

/// The name of a rule whose head is a plain identifier, and whether it is a
/// function. Rules with multi-part heads (`a.b if ...`) are skipped.
fn rule_name(rule: &Rule) -> Option<(&str, bool)> {
    let (refr, is_function) = match rule {
        Rule::Spec { head, .. } => match head {
            RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. } => (refr, false),
            RuleHead::Func { refr, .. } => (refr, true),
        },
        Rule::Default { refr, args, .. } => (refr, !args.is_empty()),
    };
    let name = refr.span().text();
    is_identifier(name).then_some((name, is_function))
}

fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const POLICY: &str = include_str!("../../policies/casf.rego");

    fn policy() -> EmbeddedPolicy {
        EmbeddedPolicy::from_sources(&[("casf.rego".to_string(), POLICY.to_string())])
            .expect("reference policy loads")
    }

    fn request(tool: &str, mode: &str) -> serde_json::Value {
        json!({
            "tool": tool,
            "mode": mode,
            "role": "nurse",
            "subject": {"patient_id": "pat-1"},
            "args": {},
            "context": {"tenant_id": "tenant-a"},
        })
    }

    #[test]
    fn allows_a_well_formed_write_in_allow_mode() {
        let verdict = policy()
            .evaluate_sync(&request("twilio.send_sms", "ALLOW"))
            .expect("evaluates");
        assert_eq!(
            verdict,
            PolicyVerdict {
                allow: true,
                violations: vec![],
                revision: None,
            }
        );
    }

    #[test]
    fn denies_with_sorted_violations() {
        let mut input = request("cliniccloud.create_appointment", "READ_ONLY");
        input["role"] = json!("janitor");
        input["context"] = json!({});
        let verdict = policy().evaluate_sync(&input).expect("evaluates");
        assert!(!verdict.allow);
        assert_eq!(
            verdict.violations,
            vec![
                "BadRequest_MissingTenantId",
                "BadRequest_UnknownRole",
                "Mode_ReadOnly_NoWrite"
            ]
        );
    }

    #[test]
    fn pooled_engines_do_not_leak_input_between_requests() {
        let policy = policy();
        for _ in 0..3 {
            let denied = policy
                .evaluate_sync(&request("twilio.send_sms", "KILL_SWITCH"))
                .expect("evaluates");
            assert_eq!(denied.violations, vec!["Mode_KillSwitch"]);
            let allowed = policy
                .evaluate_sync(&request("twilio.send_sms", "ALLOW"))
                .expect("evaluates");
            assert!(allowed.allow && allowed.violations.is_empty());
        }
    }

    #[test]
    fn concurrent_evaluations_share_the_pool() {
        let policy = policy();
        std::thread::scope(|scope| {
            for worker in 0..4 {
                let policy = &policy;
                scope.spawn(move || {
                    for i in 0..50 {
                        let mode = if (worker + i) % 2 == 0 {
                            "ALLOW"
                        } else {
                            "KILL_SWITCH"
                        };
                        let verdict = policy
                            .evaluate_sync(&request("stripe.generate_invoice", mode))
                            .expect("evaluates");
                        assert_eq!(verdict.allow, mode == "ALLOW");
                    }
                });
            }
        });
        assert!(policy.engines.idle_count() <= policy.engines.max_idle());
        let compiled = policy.compiled.as_ref().expect("reference policy compiles");
        let (idle, max_idle) = compiled.idle_vms();
        assert!(
            0 < idle && idle <= max_idle,
            "{idle} idle VMs, at most {max_idle}"
        );
    }

    #[test]
    fn empty_input_is_a_deny_not_an_error() {
        let verdict = policy().evaluate_sync(&json!({})).expect("evaluates");
        assert!(!verdict.allow);
        assert_eq!(
            verdict.violations,
            vec!["BadRequest_MissingTenantId", "BadRequest_UnknownRole"]
        );
    }

    #[test]
    fn undeclared_rules_are_undefined() {
        let policy = EmbeddedPolicy::from_sources(&[(
            "p.rego".to_string(),
            "package casf\n\nother := 1\n".to_string(),
        )])
        .expect("loads");
        let verdict = policy.evaluate_sync(&json!({})).expect("evaluates");
        assert_eq!(
            verdict,
            PolicyVerdict {
                allow: false,
                violations: vec![],
                revision: None,
            }
        );
    }

    #[test]
    fn undefined_allow_is_false_and_array_violations_are_accepted() {
        let policy = EmbeddedPolicy::from_sources(&[(
            "p.rego".to_string(),
            "package casf\n\nallow if input.x == 1\n\nviolations := [\"b\", \"a\"]\n".to_string(),
        )])
        .expect("loads");
        let verdict = policy.evaluate_sync(&json!({})).expect("evaluates");
        assert_eq!(
            verdict,
            PolicyVerdict {
                allow: false,
                violations: vec!["a".to_string(), "b".to_string()],
                revision: None,
            }
        );
        assert!(
            policy
                .evaluate_sync(&json!({"x": 1}))
                .expect("evaluates")
                .allow
        );
    }

    #[test]
    fn malformed_answers_are_bad_response() {
        for (rego, what) in [
            ("package casf\n\nallow := \"yes\"\n", "non-boolean allow"),
            ("package casf\n\nviolations := \"x\"\n", "string violations"),
            (
                "package casf\n\nviolations contains 1 if true\n",
                "non-string code",
            ),
        ] {
            let policy = EmbeddedPolicy::from_sources(&[("p.rego".to_string(), rego.to_string())])
                .expect("loads");
            let err = policy.evaluate_sync(&json!({})).expect_err(what);
            assert_eq!(
                err.kind(),
                crate::policy::PolicyErrorKind::BadResponse,
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn run_tests_reports_passes_and_failures() {
        let tests = r#"
package casf_test

import data.casf

test_passes if {
    casf.allow with input as {"tool": "cliniccloud.list_appointments", "mode": "STEP_UP", "role": "doctor", "context": {"tenant_id": "t"}}
}

test_fails if {
    casf.allow with input as {"tool": "twilio.send_sms", "mode": "KILL_SWITCH", "role": "doctor", "context": {"tenant_id": "t"}}
}

test_false := false

test_errors := x if {
    some x in [1, 2]
}

test_function(x) if x == 1
"#;
        let policy = EmbeddedPolicy::from_sources(&[
            ("casf.rego".to_string(), POLICY.to_string()),
            ("casf_test.rego".to_string(), tests.to_string()),
        ])
        .expect("loads");
        let results = policy.run_tests();
        let summary: Vec<(&str, bool)> = results
            .iter()
            .map(|r| (r.name.as_str(), r.passed))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("data.casf_test.test_passes", true),
                ("data.casf_test.test_fails", false),
                ("data.casf_test.test_false", false),
                ("data.casf_test.test_errors", false),
            ]
        );
        assert!(results[0].error.is_none());
        assert!(results[3].error.is_some(), "{:?}", results[3]);
    }

    #[test]
    fn load_errors_name_the_problem() {
        let err = EmbeddedPolicy::from_sources(&[(
            "broken.rego".to_string(),
            "package casf\n\nallow if {\n".to_string(),
        )])
        .expect_err("parse error");
        assert!(
            matches!(&err, PolicyLoadError::Parse { file, .. } if file == "broken.rego"),
            "{err}"
        );

        let err = EmbeddedPolicy::from_sources(&[(
            "v0.rego".to_string(),
            "package casf\n\nallow { true }\n".to_string(),
        )])
        .expect_err("v0 syntax is rejected");
        assert!(matches!(err, PolicyLoadError::Parse { .. }), "{err}");

        let err = EmbeddedPolicy::from_sources(&[(
            "other.rego".to_string(),
            "package other\n\nallow := true\n".to_string(),
        )])
        .expect_err("no casf package");
        assert!(
            matches!(err, PolicyLoadError::MissingPackage { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("other.rego"), "{err}");

        let err = EmbeddedPolicy::from_sources(&[(
            "unsafe.rego".to_string(),
            "package casf\n\nallow if x == 1\n".to_string(),
        )])
        .expect_err("unsafe variable");
        assert!(matches!(err, PolicyLoadError::Compile { .. }), "{err}");

        let err = EmbeddedPolicy::from_sources(&[]).expect_err("nothing to load");
        assert!(matches!(err, PolicyLoadError::NoPolicies { .. }), "{err}");
    }

    #[test]
    fn load_reads_a_directory() {
        let dir = std::env::temp_dir().join(format!("casf-embedded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("casf.rego"), POLICY).expect("write");
        std::fs::write(dir.join("README.md"), "not rego").expect("write");
        let policy = EmbeddedPolicy::load(&dir);
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).expect("mkdir");
        let no_files = EmbeddedPolicy::load(&empty);
        let missing = EmbeddedPolicy::load(&dir.join("missing"));
        std::fs::remove_dir_all(&dir).expect("cleanup");

        let verdict = policy
            .expect("loads")
            .evaluate_sync(&request("cliniccloud.list_appointments", "READ_ONLY"))
            .expect("evaluates");
        assert!(verdict.allow);
        assert!(matches!(no_files, Err(PolicyLoadError::NoPolicies { .. })));
        let err = missing.expect_err("missing dir");
        assert!(matches!(err, PolicyLoadError::ReadDir { .. }));
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn engine_is_shareable() {
        fn assert_engine<T: PolicyEngine + 'static>() {}
        assert_engine::<EmbeddedPolicy>();
        assert_eq!(policy().backend(), "regorus");
    }
}
