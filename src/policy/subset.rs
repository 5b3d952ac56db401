//! Which policies the compiled evaluator (regorus' RVM) may serve.
//!
//! The RVM is several times faster than the interpreter, but it does not fail
//! where the interpreter fails: conflicting values of a complete rule or a
//! function, or arithmetic on a non-number, make the RVM's expression
//! undefined instead of failing the query, and a `not` turns that undefined
//! into true, so the difference can be a silent ALLOW. The compiled evaluator
//! is therefore used only for policies written in a vetted subset of Rego,
//! every construct of which the differential tests
//! (`src/policy/differential_tests.rs`) cover; any other policy is
//! interpreted. The subset is what the reference policy needs plus a few
//! total builtins; it has no functions, arithmetic, comprehensions, `every`,
//! `with`, unification, variable indexes, or iteration over anything but a
//! literal collection.
//!
//! Only packages the decision package can reach through `data` references
//! and imports are checked, so the unit-test packages shipped next to the
//! policy (which use `with`) do not matter.

use std::collections::BTreeMap;
use std::fmt;

use regorus::Value;
use regorus::unstable::{AssignOp, Expr, Literal, Module, Query, Rule, RuleHead};

/// Builtins the subset may call. Each is total: an argument of the wrong
/// type makes the call undefined in both evaluators, never an error in one.
const BUILTINS: &[&str] = &[
    "contains",
    "count",
    "endswith",
    "is_array",
    "is_boolean",
    "is_null",
    "is_number",
    "is_object",
    "is_set",
    "is_string",
    "lower",
    "startswith",
    "upper",
];

/// The first construct found outside the subset, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub construct: String,
    /// `file:line:col`
    pub at: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.construct, self.at)
    }
}

/// Checks every module that the `decision` package can reach. `modules`
/// pairs each module with its package path components.
pub fn check(modules: &[(&[String], &Module)], decision: &[String]) -> Result<(), Unsupported> {
    let mut checker = Checker::default();
    checker.reachable.push(decision.to_vec());
    let mut checked = vec![false; modules.len()];
    // Checking a module can make more packages reachable; repeat until none is.
    loop {
        let mut progressed = false;
        for (index, (package, module)) in modules.iter().enumerate() {
            if checked[index] || !checker.reaches(package) {
                continue;
            }
            checked[index] = true;
            progressed = true;
            checker.module(package, module)?;
        }
        if !progressed {
            break;
        }
    }
    checker.complete_rules_cannot_conflict()
}

/// One definition of a complete rule: its value(s), `true` when it has none.
struct Definition {
    values: Vec<Option<Value>>,
    /// The definition has an `else` or several bodies.
    branches: bool,
    /// Every value is a constant or a ref into `input` (one value per input).
    single_valued: bool,
    at: String,
}

#[derive(Default)]
struct Checker {
    /// Static `data` path prefixes the decision can depend on.
    reachable: Vec<Vec<String>>,
    /// Complete rules by package and name.
    complete: BTreeMap<(Vec<String>, String), Vec<Definition>>,
}

fn at(span: &regorus::unstable::Span) -> String {
    format!("{}:{}:{}", span.source.file(), span.line, span.col)
}

fn unsupported<T>(
    construct: impl Into<String>,
    span: &regorus::unstable::Span,
) -> Result<T, Unsupported> {
    Err(Unsupported {
        construct: construct.into(),
        at: at(span),
    })
}

impl Checker {
    /// A package is reachable if it lies under, or contains, a reachable path.
    fn reaches(&self, package: &[String]) -> bool {
        self.reachable
            .iter()
            .any(|path| path.starts_with(package) || package.starts_with(path))
    }

    fn module(&mut self, package: &[String], module: &Module) -> Result<(), Unsupported> {
        for import in &module.imports {
            self.data_ref(&import.refr)?;
        }
        for rule in &module.policy {
            self.rule(package, rule)?;
        }
        Ok(())
    }

    fn rule(&mut self, package: &[String], rule: &Rule) -> Result<(), Unsupported> {
        match rule {
            Rule::Default {
                span, args, value, ..
            } => {
                if !args.is_empty() {
                    return unsupported("a function default", span);
                }
                if constant(value).is_none() {
                    return unsupported("a non-constant default", span);
                }
                Ok(())
            }
            Rule::Spec { span, head, bodies } => {
                for body in bodies {
                    if let Some(assign) = &body.assign {
                        self.expr(&assign.value)?;
                    }
                    self.query(&body.query)?;
                }
                match head {
                    RuleHead::Func { .. } => unsupported("a function", span),
                    RuleHead::Set { refr, key, .. } => {
                        plain_name(refr)?;
                        match key {
                            Some(key) => self.expr(key),
                            None => unsupported("a partial set without a key", span),
                        }
                    }
                    RuleHead::Compr { refr, assign, .. } => {
                        let name = plain_name(refr)?;
                        let head_value = assign.as_ref().map(|assign| &assign.value);
                        if let Some(value) = head_value {
                            self.expr(value)?;
                        }
                        let mut values = vec![head_value];
                        values.extend(
                            bodies
                                .iter()
                                .filter(|b| b.is_else)
                                .map(|b| b.assign.as_ref().map(|assign| &assign.value)),
                        );
                        let definition = Definition {
                            single_valued: values
                                .iter()
                                .all(|value| value.is_none_or(|value| single_valued(value))),
                            values: values
                                .iter()
                                .map(|value| {
                                    value.map_or(Some(Value::Bool(true)), |value| constant(value))
                                })
                                .collect(),
                            branches: bodies.len() > 1,
                            at: at(span),
                        };
                        self.complete
                            .entry((package.to_vec(), name.to_string()))
                            .or_default()
                            .push(definition);
                        Ok(())
                    }
                }
            }
        }
    }

    /// Where the interpreter fails on two different values of a complete
    /// rule, the RVM answers undefined; only rules that cannot produce two
    /// different values are accepted.
    fn complete_rules_cannot_conflict(&self) -> Result<(), Unsupported> {
        for ((_, name), definitions) in &self.complete {
            let conflict = |what: &str, at: &str| {
                Err(Unsupported {
                    construct: format!("{what} (complete rule `{name}`)"),
                    at: at.to_string(),
                })
            };
            if let [only] = definitions.as_slice() {
                if !only.single_valued {
                    return conflict("a value that can differ between iterations", &only.at);
                }
                continue;
            }
            let mut first = None;
            for definition in definitions {
                if definition.branches {
                    return conflict("`else` in a rule with several definitions", &definition.at);
                }
                for value in &definition.values {
                    let Some(value) = value else {
                        return conflict(
                            "a non-constant value in several definitions",
                            &definition.at,
                        );
                    };
                    match first {
                        None => first = Some(value),
                        Some(first) if first == value => {}
                        Some(_) => {
                            return conflict("definitions with different values", &definition.at);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn query(&mut self, query: &Query) -> Result<(), Unsupported> {
        for stmt in &query.stmts {
            if let Some(with) = stmt.with_mods.first() {
                return unsupported("`with`", &with.span);
            }
            match &stmt.literal {
                Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => self.expr(expr)?,
                Literal::SomeIn {
                    span,
                    key,
                    value,
                    collection,
                } => {
                    for binding in key.iter().chain([value]) {
                        if !matches!(binding.as_ref(), Expr::Var { .. }) {
                            return unsupported("a destructuring `some ... in`", span);
                        }
                    }
                    // Over a non-collection the interpreter fails and the
                    // RVM iterates nothing; a literal collection is safe.
                    if constant(collection).is_none() {
                        return unsupported("`some ... in` over a non-literal collection", span);
                    }
                }
                Literal::SomeVars { span, .. } => return unsupported("`some` declarations", span),
                Literal::Every { span, .. } => return unsupported("`every`", span),
            }
        }
        Ok(())
    }

    fn expr(&mut self, expr: &Expr) -> Result<(), Unsupported> {
        match expr {
            Expr::String { .. }
            | Expr::RawString { .. }
            | Expr::Number { .. }
            | Expr::Bool { .. }
            | Expr::Null { .. } => Ok(()),
            Expr::Var { .. } | Expr::RefDot { .. } | Expr::RefBrack { .. } => self.data_ref(expr),
            Expr::Array { items, .. } | Expr::Set { items, .. } => {
                items.iter().try_for_each(|item| self.expr(item))
            }
            Expr::Object { fields, .. } => fields
                .iter()
                .try_for_each(|(_, key, value)| self.expr(key).and_then(|()| self.expr(value))),
            Expr::BoolExpr { lhs, rhs, .. } => self.expr(lhs).and_then(|()| self.expr(rhs)),
            Expr::Membership {
                key,
                value,
                collection,
                ..
            } => {
                if let Some(key) = key {
                    self.expr(key)?;
                }
                self.expr(value)?;
                self.expr(collection)
            }
            Expr::AssignExpr {
                span, op, lhs, rhs, ..
            } => {
                if *op != AssignOp::ColEq || !matches!(lhs.as_ref(), Expr::Var { .. }) {
                    return unsupported("unification (`=`) or a destructuring `:=`", span);
                }
                self.expr(rhs)
            }
            Expr::Call {
                span, fcn, params, ..
            } => {
                let name = fcn.span().text();
                if !BUILTINS.contains(&name) {
                    return unsupported(format!("a call to `{name}`"), span);
                }
                params.iter().try_for_each(|param| self.expr(param))
            }
            Expr::ArithExpr { span, .. } => unsupported("arithmetic", span),
            Expr::BinExpr { span, .. } => unsupported("set union/intersection", span),
            Expr::UnaryExpr { span, .. } => unsupported("unary minus", span),
            Expr::ArrayCompr { span, .. }
            | Expr::SetCompr { span, .. }
            | Expr::ObjectCompr { span, .. } => unsupported("a comprehension", span),
            #[allow(unreachable_patterns)]
            other => unsupported("an expression", other.span()),
        }
    }

    /// Checks a reference (`a.b["c"]`); if it is rooted at `data`, records
    /// its static prefix as reachable. Indexes must be literals: a variable
    /// index iterates.
    fn data_ref(&mut self, expr: &Expr) -> Result<(), Unsupported> {
        let mut path = Vec::new();
        let mut static_prefix = true;
        let mut node = expr;
        loop {
            match node {
                Expr::RefDot { refr, field, .. } => {
                    path.push(field.1.as_string().ok().map(|s| s.to_string()));
                    node = refr;
                }
                Expr::RefBrack {
                    span, refr, index, ..
                } => {
                    match index.as_ref() {
                        Expr::String { value, .. } | Expr::RawString { value, .. } => {
                            path.push(value.as_string().ok().map(|s| s.to_string()));
                        }
                        Expr::Number { .. } => path.push(None),
                        _ => return unsupported("a variable or computed index", span),
                    }
                    node = refr;
                }
                Expr::Var { span, .. } => {
                    if span.text() == "data" {
                        let mut prefix = Vec::new();
                        for component in path.iter().rev() {
                            match component {
                                Some(name) if static_prefix => prefix.push(name.clone()),
                                _ => static_prefix = false,
                            }
                        }
                        self.reachable.push(prefix);
                    }
                    return Ok(());
                }
                // A reference rooted at an expression (`{"a": 1}.a`, `f(x).y`).
                other => return self.expr(other),
            }
        }
    }
}

/// The rule name of a head that is a plain identifier (`allow`, not `a.b`
/// or `obj[k]`).
fn plain_name(refr: &Expr) -> Result<&str, Unsupported> {
    match refr {
        Expr::Var { span, .. } => Ok(span.text()),
        other => unsupported("a rule with a multi-part or object head", other.span()),
    }
}

/// The value of a literal made only of literals.
fn constant(expr: &Expr) -> Option<Value> {
    match expr {
        Expr::String { value, .. }
        | Expr::RawString { value, .. }
        | Expr::Number { value, .. }
        | Expr::Bool { value, .. }
        | Expr::Null { value, .. } => Some(value.clone()),
        Expr::Array { items, .. } => {
            let items: Option<Vec<Value>> = items.iter().map(|item| constant(item)).collect();
            items.map(Value::from)
        }
        Expr::Set { items, .. } => {
            let items: Option<std::collections::BTreeSet<Value>> =
                items.iter().map(|item| constant(item)).collect();
            items.map(Value::from)
        }
        Expr::Object { fields, .. } => {
            let fields: Option<BTreeMap<Value, Value>> = fields
                .iter()
                .map(|(_, key, value)| Some((constant(key)?, constant(value)?)))
                .collect();
            fields.map(Value::from)
        }
        _ => None,
    }
}

/// An expression with one value per input: constants, and references into
/// `input` with literal indexes (no local variable that iteration could bind).
fn single_valued(expr: &Expr) -> bool {
    match expr {
        Expr::Var { span, .. } => span.text() == "input",
        Expr::RefDot { refr, .. } => single_valued(refr),
        Expr::RefBrack { refr, index, .. } => {
            matches!(
                index.as_ref(),
                Expr::String { .. } | Expr::RawString { .. } | Expr::Number { .. }
            ) && single_valued(refr)
        }
        Expr::Array { items, .. } | Expr::Set { items, .. } => {
            items.iter().all(|item| single_valued(item))
        }
        Expr::Object { fields, .. } => fields
            .iter()
            .all(|(_, key, value)| single_valued(key) && single_valued(value)),
        other => constant(other).is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regorus::Engine;

    /// [`check`] on the engine's modules whose package `keep` accepts, with
    /// `casf` as the decision package.
    fn check_engine(
        engine: &mut Engine,
        keep: impl Fn(&[String]) -> bool,
    ) -> Result<(), Unsupported> {
        let packages = engine.get_policy_package_components().expect("packages");
        let modules = engine.get_modules().clone();
        let pairs: Vec<(&[String], &Module)> = packages
            .iter()
            .zip(modules.iter())
            .map(|(package, module)| (package.components.as_slice(), &**module))
            .filter(|(package, _)| keep(package))
            .collect();
        check(&pairs, &["casf".to_string()])
    }

    fn check_source(rego: &str) -> Result<(), Unsupported> {
        let mut engine = Engine::new();
        engine
            .add_policy("p.rego".to_string(), rego.to_string())
            .expect("parses");
        check_engine(&mut engine, |_| true)
    }

    #[test]
    fn reference_policy_is_in_the_subset() {
        check_source(include_str!("../../policies/casf.rego")).expect("in the subset");
    }

    #[test]
    fn constructs_outside_the_subset_are_named_with_their_location() {
        for (rego, construct) in [
            ("allow if input.n + 1 == 2", "arithmetic"),
            ("f(x) := x\nallow if f(1)", "a function"),
            ("allow if print(1)", "a call to `print`"),
            ("allow if data.casf.x with input as {}", "`with`"),
            ("allow if every x in input.xs { x }", "`every`"),
            ("allow if input.xs[_]", "a variable or computed index"),
            (
                "allow if { some x in input.xs; x == 1 }",
                "non-literal collection",
            ),
            (
                "allow if count([x | some x in input.xs]) > 0",
                "a comprehension",
            ),
            ("allow if { some x; input.xs[x] }", "`some` declarations"),
            ("allow if { [a, b] = input.pair }", "unification"),
            (
                "x := 1 if input.a\nx := 2 if input.b\nallow if not x",
                "different values",
            ),
            (
                "x := y if { some y in [1, 2] }\nallow if not x",
                "can differ",
            ),
            (
                "x := input.a if input.c\nx := input.b if input.d\nallow if x",
                "non-constant",
            ),
            (
                "obj[k] := 1 if { some k in [\"a\"] }\nallow if obj.a",
                "object head",
            ),
        ] {
            let err = check_source(&format!("package casf\n\n{rego}\n")).expect_err(rego);
            assert!(err.construct.contains(construct), "{rego}: {err}");
            assert!(err.at.starts_with("p.rego:"), "{rego}: {err}");
        }
    }

    #[test]
    fn rules_that_cannot_conflict_are_accepted() {
        for rego in [
            // Several definitions, one constant value.
            "allow if input.a\nallow if input.b",
            "x := 1 if input.a\nx := 1 if input.b\nallow if x == 1",
            // One definition, one value per input, even when the body iterates.
            "tenant := input.context.tenant_id if { some t in [1, 2]; t == input.t }\nallow if tenant",
            "level := \"high\" if input.a else := \"low\"\nallow if level == \"high\"",
            "default allow := false\nallow if input.role in {\"a\", \"b\"}",
            "violations contains x if { some x in [\"a\", 1]; input.code == x }",
        ] {
            check_source(&format!("package casf\n\n{rego}\n"))
                .unwrap_or_else(|err| panic!("{rego}: {err}"));
        }
    }

    #[test]
    fn only_packages_the_decision_reaches_are_checked() {
        let mut engine = Engine::new();
        for (name, rego) in [
            ("casf.rego", "package casf\n\nallow if data.lib.ok\n"),
            ("lib.rego", "package lib\n\nok if input.n + 1 == 2\n"),
            (
                "casf_test.rego",
                "package casf_test\n\nimport data.casf\n\ntest_a if casf.allow with input as {}\n",
            ),
        ] {
            engine
                .add_policy(name.to_string(), rego.to_string())
                .expect("parses");
        }
        // `lib`, reached through `data.lib`, is checked (and uses arithmetic);
        // `casf_test`, which uses `with` but is not reachable, is not.
        let err = check_engine(&mut engine, |_| true).expect_err("lib is reachable");
        assert!(err.at.starts_with("lib.rego:"), "{err}");
        check_engine(&mut engine, |package| package != ["lib".to_string()])
            .expect("casf_test is not reachable");
    }
}
