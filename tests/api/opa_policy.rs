//! Policy through an OPA server (`OPA_URL`, the real OPA engine behind
//! `tests/support/opa_server.py`): the same decisions as the embedded engine,
//! and each failure kind of guide §6 on a private server with faults.

use serde_json::{Value, json};

use crate::helpers::{
    READ_TOOLS, TestApp, WRITE_TOOLS, metric_value, request, spawn_app, spawn_app_with, violations,
};
use crate::servers::{OpaServer, required_env, wait_until};

const MODES: [&str; 4] = ["ALLOW", "STEP_UP", "READ_ONLY", "KILL_SWITCH"];
const RECOVERY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);
const FAIL_CLOSED_OPA: &str = "casf_fail_closed_total{trigger=\"opa\"}";
const FAIL_CLOSED_REDIS: &str = "casf_fail_closed_total{trigger=\"redis\"}";
const OPA_ERROR_KINDS: [&str; 4] = ["timeout", "unavailable", "bad_status", "bad_response"];

fn opa_errors(kind: &str) -> String {
    format!("casf_opa_error_total{{kind=\"{kind}\"}}")
}

/// Every counter this file checks, from one `/metrics` page.
async fn counters(app: &TestApp) -> impl Fn(&str) -> f64 {
    let (_, text) = app.get("/metrics").await;
    move |series: &str| metric_value(&text, series)
}

async fn healthz(app: &TestApp) -> (u16, Value) {
    let (status, body) = app.get("/healthz").await;
    (status, serde_json::from_str(&body).expect("JSON /healthz"))
}

#[tokio::test]
async fn opa_decides_every_contract_row_like_the_embedded_engine() {
    let opa_url = required_env("CASF_TEST_OPA_URL");
    let opa = spawn_app_with(&[("OPA_URL", opa_url.as_str())]).await;
    let embedded = spawn_app().await;
    let (status, mut body) = healthz(&opa).await;
    assert_eq!(status, 200, "{body}");
    let checks = body["checks"].as_object_mut().unwrap();
    assert!(checks.remove("policy_hash").is_some_and(|h| h.is_string()));
    assert_eq!(
        body["checks"],
        json!({"sqlite": "ok", "memory": "ok", "opa": "ok", "callers": {"authenticated": false, "warning": "CASF_CALLERS is unset: callers are not authenticated and may claim any role, tenant or tool"}, "shadow": "off"})
    );

    for tool in WRITE_TOOLS.iter().chain(&READ_TOOLS) {
        for mode in MODES {
            for role in ["nurse", "system"] {
                for context in [json!({"tenant_id": "t-1"}), json!({})] {
                    let mut body = request(tool, mode);
                    body["role"] = json!(role);
                    body["context"] = context.clone();
                    let by_opa = opa.decide(&body).await;
                    let by_embedded = embedded.decide(&body).await;
                    assert_eq!(by_opa, by_embedded, "{tool} {mode} {role} {context}");
                }
            }
        }
    }

    // A few rows spelled out, so the comparison above cannot pass vacuously.
    let allow = opa
        .decide(&request("cliniccloud.create_appointment", "ALLOW"))
        .await;
    assert_eq!(
        allow,
        json!({"decision": "ALLOW", "violations": [], "allowed_outputs": [], "reason": "OK"})
    );
    assert_eq!(
        violations(
            &opa.decide(&request("stripe.generate_invoice", "STEP_UP"))
                .await
        ),
        ["OPA_Deny"]
    );
    assert_eq!(
        violations(&opa.decide(&request("twilio.send_sms", "READ_ONLY")).await),
        ["Mode_ReadOnly_NoWrite"]
    );
    let mut no_tenant = request("cliniccloud.summary_history", "ALLOW");
    no_tenant["context"] = json!({});
    assert_eq!(
        violations(&opa.decide(&no_tenant).await),
        ["BadRequest_MissingTenantId"]
    );
    let listed = opa
        .decide(&request("cliniccloud.list_appointments", "READ_ONLY"))
        .await;
    assert_eq!(listed["allowed_outputs"], json!(["slots_aggregated"]));
}

#[tokio::test]
async fn opa_down_fails_writes_closed_reads_run_rules_only_and_recovery_needs_no_restart() {
    let mut server = OpaServer::start().await;
    let url = server.url();
    let app = spawn_app_with(&[("OPA_URL", url.as_str())]).await;
    assert_eq!(healthz(&app).await.0, 200);

    server.stop();
    let before = counters(&app).await;
    for tool in WRITE_TOOLS {
        let decision = app.decide(&request(tool, "ALLOW")).await;
        assert_eq!(decision["decision"], "DENY", "{tool}");
        assert_eq!(
            violations(&decision),
            ["FAIL_CLOSED", "OPA_Unavailable"],
            "{tool}"
        );
    }
    for tool in READ_TOOLS {
        let decision = app.decide(&request(tool, "ALLOW")).await;
        assert_eq!(
            decision,
            json!({"decision": "ALLOW", "violations": [], "allowed_outputs": [], "reason": "OK"}),
            "{tool}"
        );
    }
    // The kill switch is a hard invariant: it holds without the policy engine.
    let killed = app
        .decide(&request("cliniccloud.list_appointments", "KILL_SWITCH"))
        .await;
    assert_eq!(killed["decision"], "DENY");
    assert_eq!(violations(&killed), ["Mode_KillSwitch"]);

    let after = counters(&app).await;
    let delta = |series: &str| after(series) - before(series);
    let writes = WRITE_TOOLS.len() as f64;
    let evaluations = writes + READ_TOOLS.len() as f64 + 1.0;
    assert_eq!(delta(FAIL_CLOSED_OPA), writes);
    assert_eq!(delta(FAIL_CLOSED_REDIS), 0.0);
    assert_eq!(delta(&opa_errors("unavailable")), evaluations);
    for kind in ["timeout", "bad_status", "bad_response"] {
        assert_eq!(delta(&opa_errors(kind)), 0.0, "{kind}");
    }

    let (status, body) = healthz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .starts_with("opa: "),
        "{body}"
    );

    server.restart().await;
    wait_until(RECOVERY_DEADLINE, "/healthz recovers with OPA", || async {
        healthz(&app).await.0 == 200
    })
    .await;
    let decision = app
        .decide(&request("cliniccloud.create_appointment", "ALLOW"))
        .await;
    assert_eq!(decision["decision"], "ALLOW", "{decision}");
}

/// With the private server in `fault`, a write fails closed and a read goes
/// through, each counted once under `kind`; clearing the fault restores ALLOW.
async fn fault_is_counted_as(fault: &str, delay_ms: u64, kind: &str) {
    let server = OpaServer::start().await;
    let url = server.url();
    let app = spawn_app_with(&[("OPA_URL", url.as_str())]).await;
    server.fault(fault, delay_ms).await;

    let before = counters(&app).await;
    let write = app
        .decide(&request("stripe.generate_invoice", "ALLOW"))
        .await;
    assert_eq!(write["decision"], "DENY", "{write}");
    assert_eq!(violations(&write), ["FAIL_CLOSED", "OPA_Unavailable"]);
    let read = app
        .decide(&request("cliniccloud.summary_history", "ALLOW"))
        .await;
    assert_eq!(read["decision"], "ALLOW", "{read}");
    let after = counters(&app).await;
    let delta = |series: &str| after(series) - before(series);
    assert_eq!(delta(FAIL_CLOSED_OPA), 1.0);
    assert_eq!(delta(FAIL_CLOSED_REDIS), 0.0);
    for other in OPA_ERROR_KINDS {
        let expected = if other == kind { 2.0 } else { 0.0 };
        assert_eq!(delta(&opa_errors(other)), expected, "{other}");
    }

    server.fault("ok", 0).await;
    let write = app
        .decide(&request("stripe.generate_invoice", "ALLOW"))
        .await;
    assert_eq!(write["decision"], "ALLOW", "{write}");
    let recovered = counters(&app).await;
    assert_eq!(recovered(&opa_errors(kind)), after(&opa_errors(kind)));
}

#[tokio::test]
async fn opa_http_500_is_bad_status() {
    fault_is_counted_as("status500", 0, "bad_status").await;
}

#[tokio::test]
async fn opa_non_json_answer_is_bad_response() {
    fault_is_counted_as("nonjson", 0, "bad_response").await;
}

#[tokio::test]
async fn opa_slower_than_350ms_is_timeout() {
    fault_is_counted_as("slow", 600, "timeout").await;
}

/// The revision OPA itself reports for its bundles, asked directly.
async fn revision_opa_reports(opa_url: &str) -> String {
    let answer: Value = casf_verifier::tls::http_client_builder()
        .build()
        .expect("HTTP client")
        .post(format!("{opa_url}/v1/data/casf?provenance=true"))
        .json(&json!({"input": request("cliniccloud.list_appointments", "ALLOW")}))
        .send()
        .await
        .expect("ask OPA")
        .json()
        .await
        .expect("OPA's answer");
    let bundles = answer["provenance"]["bundles"]
        .as_object()
        .expect("OPA reports its bundles");
    let mut revisions: Vec<String> = bundles
        .iter()
        .map(|(name, bundle)| format!("{name}:{}", bundle["revision"].as_str().unwrap()))
        .collect();
    revisions.sort();
    revisions.join(",")
}

#[tokio::test]
async fn each_audit_row_names_the_opa_bundle_revision_that_decided() {
    let opa_url = required_env("CASF_TEST_OPA_URL");
    let expected = revision_opa_reports(&opa_url).await;
    assert!(
        expected.starts_with("casf:") && expected.len() > 5,
        "{expected}"
    );

    let opa = spawn_app_with(&[("OPA_URL", opa_url.as_str())]).await;
    let embedded = spawn_app().await;
    for app in [&opa, &embedded] {
        app.decide(&request("cliniccloud.create_appointment", "ALLOW"))
            .await;
        app.decide(&request("cliniccloud.list_appointments", "READ_ONLY"))
            .await;
    }
    let policies = |rows: Vec<crate::helpers::AuditRow>| -> Vec<Value> {
        rows.iter()
            .map(|row| serde_json::from_str::<Value>(&row.payload).unwrap()["policy"].clone())
            .collect()
    };
    let by_opa = policies(opa.audit_rows().await);
    assert_eq!(by_opa.len(), 2);
    for policy in &by_opa {
        assert_eq!(policy["revision"], json!(expected), "{policy}");
        assert!(policy["hash"].is_string(), "{policy}");
    }
    // The embedded engine's files are named by the hash alone.
    let by_embedded = policies(embedded.audit_rows().await);
    assert_eq!(by_embedded.len(), 2);
    for policy in &by_embedded {
        assert!(policy.get("revision").is_none(), "{policy}");
    }
}
