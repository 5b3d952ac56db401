//! Canonical JSON survives PostgreSQL: for generated JSON values (numbers
//! of every form the verifier writes, non-ASCII and escaped text, nesting),
//! the canonical text of what JSONB gives back equals the canonical text of
//! what went in. This is what lets anyone recompute an audit row's hash from
//! the stored payload. `PROPTEST_CASES` sets the number of values (512 by
//! default here; CI runs the default).

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};

use crate::pg::TestDb;

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        // Integral doubles from 1e15 to beyond 2^64, where exponents start.
        (15i32..22, 1u32..10).prop_map(|(exp, digit)| json!(f64::from(digit) * 10f64.powi(exp))),
        // Tiny and huge magnitudes, and negative zero.
        (-30i32..30, -9i32..10)
            .prop_map(|(exp, digit)| json!(f64::from(digit) * 10f64.powi(exp) / 7.0)),
        Just(json!(-0.0)),
        Just(json!(1.5e-7)),
        Just(json!(1e16)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ]{0,12}",
        // Anything but U+0000, which the verifier refuses (422) because
        // PostgreSQL cannot store it.
        "[^\u{0}]{0,12}",
        Just("naïve café – 東京 🏥".to_owned()),
        Just("quote \" backslash \\ tab \t newline \n".to_owned()),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[tokio::test]
async fn canonical_json_round_trips_through_jsonb() {
    let cases: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(512);
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let mut runner = TestRunner::deterministic();
    let strategy = value();
    let mut checked = 0;
    for _ in 0..cases {
        let original = strategy.new_tree(&mut runner).unwrap().current();
        let canonical = casf_verifier::canonical::to_string(&original);
        let (stored,): (String,) = sqlx::query_as("SELECT ($1::text)::jsonb::text")
            .bind(&canonical)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL refused {canonical}: {e}"));
        let read_back: Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(
            casf_verifier::canonical::to_string(&read_back),
            canonical,
            "JSONB gave back {stored} for {original}"
        );
        checked += 1;
    }
    // Not vacuous: the cases ran, and they held numbers JSONB could have
    // changed (an exponent form, and a negative zero, are generated).
    assert_eq!(checked, cases);
    assert!(casf_verifier::canonical::to_string(&json!(1e16)).contains('.'));
}
