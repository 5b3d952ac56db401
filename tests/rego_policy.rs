//! Runs the Rego unit tests in `policies/` (`casf_test.rego`) with the
//! embedded regorus engine, so `cargo test` checks the reference policy.

use std::path::Path;

use casf_verifier::policy::embedded::EmbeddedPolicy;

#[test]
fn rego_policy_tests_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policy =
        EmbeddedPolicy::load(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let results = policy.run_tests();

    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| match &r.error {
            Some(error) => format!("{} (error: {error})", r.name),
            None => r.name.clone(),
        })
        .collect();
    for result in &results {
        println!(
            "{} {}",
            if result.passed { "PASS" } else { "FAIL" },
            result.name
        );
    }
    assert!(
        results.len() >= 15,
        "expected at least 15 Rego tests in {}, found {}",
        dir.display(),
        results.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} Rego tests failed:\n  {}",
        failed.len(),
        results.len(),
        failed.join("\n  ")
    );
}
