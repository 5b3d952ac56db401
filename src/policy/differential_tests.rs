//! Differential tests: the compiled program must answer exactly like the
//! interpreter, for the reference policy on every contract-shaped input and
//! for every construct of the compiled subset on inputs of every type.
//! Policies outside the subset must be interpreted, and a VM failure must
//! fall back to the interpreter.

use serde_json::{Value, json};

use super::compiled::CompiledDecision;
use super::embedded::EmbeddedPolicy;
use super::{PolicyErrorKind, PolicyVerdict};
use crate::domain::{Mode, Role, Tool};

const REFERENCE: &str = include_str!("../../policies/casf.rego");

fn load(rego: &str) -> EmbeddedPolicy {
    EmbeddedPolicy::from_sources(&[("p.rego".to_string(), rego.to_string())]).expect("loads")
}

/// A comparable rendering of an outcome (errors by kind and message).
fn outcome(result: Result<PolicyVerdict, super::PolicyError>) -> Result<PolicyVerdict, String> {
    result.map_err(|e| format!("{}: {e}", e.kind()))
}

/// Asserts the compiled path ran without a VM failure and agreed with the
/// interpreter, and that `evaluate_sync` gives that same answer.
fn assert_same(policy: &EmbeddedPolicy, input: &Value) -> Result<PolicyVerdict, String> {
    let interpreted = outcome(policy.evaluate_interpreted(input));
    let compiled = policy
        .evaluate_compiled(input)
        .expect("policy is compiled")
        .unwrap_or_else(|e| panic!("VM failed on {input}: {e}"));
    assert_eq!(outcome(compiled), interpreted, "input: {input}");
    assert_eq!(
        outcome(policy.evaluate_sync(input)),
        interpreted,
        "input: {input}"
    );
    interpreted
}

/// Sets `object[key]` to `value`, or removes the key for `None`.
fn set(object: &mut Value, key: &str, value: Option<Value>) {
    let map = object.as_object_mut().expect("object");
    match value {
        Some(value) => map.insert(key.to_string(), value),
        None => map.remove(key),
    };
}

#[test]
fn reference_policy_compiled_answers_like_the_interpreter_on_every_input_shape() {
    let policy = load(REFERENCE);
    assert_eq!(policy.evaluator(), "compiled");

    let strings = |all: Vec<&'static str>| -> Vec<Option<Value>> {
        let mut values: Vec<Option<Value>> = all.into_iter().map(|s| Some(json!(s))).collect();
        // Unknown, case-mangled, empty, non-string and absent.
        values.extend([
            Some(json!("unknown")),
            Some(json!("")),
            Some(json!(7)),
            Some(Value::Null),
            None,
        ]);
        values
    };
    let tools = strings(Tool::ALL.iter().map(|t| t.as_str()).collect());
    let mut modes = strings(Mode::ALL.iter().map(|m| m.as_str()).collect());
    modes.push(Some(json!("allow")));
    let mut roles = strings(Role::ALL.iter().map(|r| r.as_str()).collect());
    roles.push(Some(json!("DOCTOR")));
    // Present, empty, non-string, absent, and the parent not an object.
    let fields = |name: &str, value: &str| -> Vec<Option<Value>> {
        vec![
            Some(json!({ name: value })),
            Some(json!({ name: "" })),
            Some(json!({ name: 42 })),
            Some(json!({ name: [value] })),
            Some(json!({})),
            Some(json!(value)),
            None,
        ]
    };
    let contexts = fields("tenant_id", "tenant-a");
    let subjects = fields("patient_id", "pat-1");

    let (mut allowed, mut denied, mut cases) = (0, 0, 0);
    for tool in &tools {
        for mode in &modes {
            for role in &roles {
                for context in &contexts {
                    for subject in &subjects {
                        let mut input = json!({"args": {"n": 1.5, "note": "Zoë"}});
                        set(&mut input, "tool", tool.clone());
                        set(&mut input, "mode", mode.clone());
                        set(&mut input, "role", role.clone());
                        set(&mut input, "context", context.clone());
                        set(&mut input, "subject", subject.clone());
                        let verdict = assert_same(&policy, &input).expect("no errors");
                        if verdict.allow {
                            allowed += 1;
                        } else {
                            denied += 1;
                        }
                        cases += 1;
                    }
                }
            }
        }
    }
    // Both answers occur, so agreement is not agreement on a constant.
    assert!(
        allowed > 50 && denied > 50,
        "{allowed} allowed, {denied} denied"
    );
    assert_eq!(cases, tools.len() * modes.len() * roles.len() * 49);
}

/// Every construct the compiled subset admits (see `subset.rs`).
const SUBSET_POLICY: &str = r#"
package casf

import rego.v1

default allow := false

known := {"a", "b", "Zoë", "abz"}
limits := {"max": 3, "names": ["x", "y"]}
tenant := input.context.tenant_id
level := "high" if input.level >= 5 else := "low"

ok_name if is_string(input.name)
ok_name if input.name == null

allow if {
	ok_name
	input.name in known
	count(input.items) <= limits.max
	tenant != ""
	not input.blocked
	startswith(lower(input.name), "a")
}

allow if {
	some item in ["override", "bypass"]
	item in input.items
	level == "high"
}

violations contains "name" if not ok_name
violations contains "count" if count(input.items) > 2
violations contains "number" if is_number(input.items)
violations contains upper(input.name) if endswith(input.name, "z")
violations contains code if {
	some code in {"c1", "c2", "c3"}
	code in input.codes
}
violations contains "kv" if {
	some k, v in {"a": 1, "b": "1"}
	k == "a"
	input.obj.a == v
}
violations contains "member" if 3 in input.items
violations contains "contains" if contains(input.name, "ë")
violations contains "compare" if input.level < "5"
violations contains "flag" if input.flag == true
violations contains "local" if {
	t := tenant
	t == input.name
}
violations contains "data" if data.casf.tenant == "t1"
violations contains "missing" if data.nowhere.x
violations contains "types" if {
	is_array(input.items)
	is_object(input.obj)
	is_set(known)
	is_boolean(input.flag)
	is_null(input.nil)
}
violations contains "bracket" if input["context"]["tenant_id"] == "t2"
violations contains "index" if input.items[0] == "first"
violations contains "object" if {
	{"k": input.name} == {"k": "a"}
}
violations contains "array" if [input.level, 1] == [5, 1]
violations contains "set" if {
	{input.name} == {"b"}
}
violations contains "level" if level == "low"
violations contains "prefix" if startswith(input.name, input.level)
"#;

/// Inputs drawn deterministically from per-field variants of every type.
fn subset_inputs(count: usize) -> Vec<Value> {
    let variants: Vec<(&str, Vec<Option<Value>>)> = vec![
        (
            "name",
            vec![
                Some(json!("a")),
                Some(json!("A")),
                Some(json!("abz")),
                Some(json!("Zoë")),
                Some(json!("b")),
                Some(json!(5)),
                Some(Value::Null),
                Some(json!(["a"])),
                None,
            ],
        ),
        (
            "items",
            vec![
                Some(json!(["first", "override"])),
                Some(json!([3])),
                Some(json!(["a", "b", "c", "d"])),
                Some(json!([])),
                Some(json!("str")),
                Some(json!(7)),
                Some(json!({"a": 3})),
                None,
            ],
        ),
        (
            "codes",
            vec![
                Some(json!(["c1", 2, "c2"])),
                Some(json!("c3")),
                Some(json!({"x": "c3"})),
                None,
            ],
        ),
        (
            "obj",
            vec![
                Some(json!({"a": 1})),
                Some(json!({"a": "1"})),
                Some(json!({"a": 1.0})),
                Some(json!([1])),
                None,
            ],
        ),
        (
            "level",
            vec![
                Some(json!(5)),
                Some(json!(4)),
                Some(json!(5.0)),
                Some(json!(4.999)),
                Some(json!("9")),
                Some(json!("ab")),
                Some(json!(-1)),
                Some(json!(u64::MAX)),
                None,
            ],
        ),
        (
            "context",
            vec![
                Some(json!({"tenant_id": "t1"})),
                Some(json!({"tenant_id": "t2"})),
                Some(json!({"tenant_id": ""})),
                Some(json!({"tenant_id": 1})),
                Some(json!({"tenant_id": "a"})),
                Some(json!("t1")),
                None,
            ],
        ),
        (
            "blocked",
            vec![
                Some(json!(true)),
                Some(json!(false)),
                Some(json!("yes")),
                None,
            ],
        ),
        ("flag", vec![Some(json!(true)), Some(json!("true")), None]),
        ("nil", vec![Some(Value::Null), Some(json!(0)), None]),
    ];
    // A fixed linear congruential sequence: reproducible, no extra crate.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |bound: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) % bound as u64) as usize
    };
    (0..count)
        .map(|_| {
            let mut input = json!({});
            for (field, values) in &variants {
                set(&mut input, field, values[next(values.len())].clone());
            }
            input
        })
        .collect()
}

#[test]
fn every_subset_construct_compiles_and_answers_like_the_interpreter() {
    let policy = load(SUBSET_POLICY);
    assert_eq!(policy.evaluator(), "compiled");
    let mut seen_violations = std::collections::BTreeSet::new();
    let mut allowed = 0;
    for input in subset_inputs(3000) {
        let verdict = assert_same(&policy, &input).expect("no errors");
        allowed += usize::from(verdict.allow);
        seen_violations.extend(verdict.violations);
    }
    // The inputs reach both answers and every violation rule, so each
    // construct was exercised, not just compiled.
    assert!(allowed > 0, "no input was allowed");
    for code in [
        "name", "count", "number", "ABZ", "c1", "c2", "c3", "kv", "member", "contains", "compare",
        "flag", "local", "data", "types", "bracket", "index", "object", "array", "set", "level",
        "prefix",
    ] {
        assert!(seen_violations.contains(code), "{code} never reported");
    }
    assert!(!seen_violations.contains("missing"));
}

/// Policies where the RVM would not fail where the interpreter does.
const DIVERGENT: &[(&str, &str)] = &[
    (
        "conflicting complete rule",
        "package casf\n\nx := 1 if input.a\nx := 2 if input.b\n\nallow if not x\n",
    ),
    (
        "arithmetic on a string in a helper rule",
        "package casf\n\nbig if input.n + 1 > 2\n\nallow if not big\n",
    ),
];

#[test]
fn policies_outside_the_subset_are_interpreted_so_conflicts_stay_errors() {
    let input = json!({"a": true, "b": true, "n": "one"});
    for (what, rego) in DIVERGENT {
        // Compiled anyway, the RVM reads the failing expression as undefined
        // and the `not` makes it an ALLOW...
        let policy = load(rego);
        let forced = CompiledDecision::compile(policy.template(), Some("data.casf.allow"), None)
            .expect("the RVM compiles it");
        let (allow, _) = forced
            .evaluate(regorus::Value::from(input.clone()))
            .expect("runs");
        assert_eq!(allow, regorus::Value::Bool(true), "{what}");
        // ...so the policy is interpreted, and the interpreter's error stands.
        assert_eq!(policy.evaluator(), "interpreter", "{what}");
        let err = policy.evaluate_sync(&input).expect_err(what);
        assert_eq!(err.kind(), PolicyErrorKind::BadResponse, "{what}: {err}");
    }
}

#[test]
fn a_vm_failure_falls_back_to_the_interpreter() {
    // Iterating a literal this long exhausts the VM's instruction budget.
    // (Twenty to a line: the parser limits both line width and count.)
    let codes: Vec<String> = (0..1_500)
        .map(|line| {
            let line: Vec<String> = (0..20).map(|i| format!("\"c{}\"", line * 20 + i)).collect();
            line.join(", ")
        })
        .collect();
    let policy = load(&format!(
        "package casf\n\nallow if input.role == \"doctor\"\n\nviolations contains x if {{\n\tsome x in [{}]\n\tx == input.code\n}}\n",
        codes.join(",\n")
    ));
    assert_eq!(policy.evaluator(), "compiled");
    let input = json!({"role": "doctor", "code": "c29999"});
    let failed = policy.evaluate_compiled(&input).expect("compiled");
    assert!(failed.is_err(), "the VM should run out of instructions");
    assert_eq!(
        policy
            .evaluate_sync(&input)
            .expect("the interpreter answers"),
        PolicyVerdict {
            allow: true,
            violations: vec!["c29999".to_string()],
            revision: None,
        }
    );
}

#[test]
fn input_conversion_keeps_every_json_value() {
    use serde::Deserialize;
    let input = json!({
        "u": u64::MAX, "i": i64::MIN, "f": 1.5, "one": 1.0, "tiny": 1e-300,
        "s": "Zoë \u{1F600} \"q\"", "n": null, "b": false,
        "a": [1, [2, {"k": []}]], "o": {"": {}, "z": 1, "a": 2}
    });
    let borrowed = regorus::Value::deserialize(&input).expect("converts");
    let owned: regorus::Value = serde_json::from_value(input.clone()).expect("converts");
    assert_eq!(borrowed, owned);
    assert_eq!(borrowed["u"], regorus::Value::from(u64::MAX));
    assert_eq!(borrowed["s"], regorus::Value::from("Zoë \u{1F600} \"q\""));
}
