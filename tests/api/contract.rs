//! The contract's decision table as data, run against any backend profile.
//! `verify.rs` runs it on embedded backends; `production.rs` on PostgreSQL,
//! Redis and OPA together.

use serde_json::{Value, json};

use crate::helpers::{READ_TOOLS, TestApp, WRITE_TOOLS, fresh_id, request, violations};

/// What the contract says about one tool in one mode, for a well-formed
/// request of a known role and tenant.
fn expected(tool: &str, mode: &str) -> Value {
    let write = WRITE_TOOLS.contains(&tool);
    let deny = |codes: &[&str]| json!({"decision": "DENY", "violations": codes, "allowed_outputs": [], "reason": format!("denied: {}", codes.join(", "))});
    match (mode, write) {
        ("KILL_SWITCH", _) => deny(&["Mode_KillSwitch"]),
        ("READ_ONLY", true) => deny(&["Mode_ReadOnly_NoWrite"]),
        ("STEP_UP", true) => deny(&["OPA_Deny"]),
        ("READ_ONLY", false) if tool == "cliniccloud.list_appointments" => {
            json!({"decision": "ALLOW", "violations": [], "allowed_outputs": ["slots_aggregated"], "reason": "OK"})
        }
        _ => json!({"decision": "ALLOW", "violations": [], "allowed_outputs": [], "reason": "OK"}),
    }
}

/// Every tool in every mode, plus a missing tenant for each tool, decided
/// exactly as the contract says. Returns how many decisions were made.
pub async fn assert_decision_table(app: &TestApp) -> usize {
    let mut decided = 0;
    for tool in WRITE_TOOLS.iter().chain(&READ_TOOLS) {
        for mode in ["ALLOW", "STEP_UP", "READ_ONLY", "KILL_SWITCH"] {
            let decision = app.decide(&request(tool, mode)).await;
            assert_eq!(decision, expected(tool, mode), "{tool} in {mode}");
            decided += 1;
        }
        let mut no_tenant = request(tool, "ALLOW");
        no_tenant["context"] = json!({});
        let decision = app.decide(&no_tenant).await;
        assert_eq!(decision["decision"], "DENY", "{tool} without tenant");
        assert_eq!(
            decision["violations"],
            json!(["BadRequest_MissingTenantId"]),
            "{tool}"
        );
        decided += 1;
    }
    decided
}

/// SMS burst, replay (same and different payload) and concurrent duplicates.
/// Returns how many decisions were made.
pub async fn assert_stateful_rows(app: &TestApp) -> usize {
    let sms = request("twilio.send_sms", "ALLOW");
    let mut again = sms.clone();
    again["request_id"] = json!(fresh_id());
    let mut other = sms.clone();
    other["request_id"] = json!(fresh_id());
    other["subject"] = json!({"patient_id": format!("p-{}", fresh_id())});
    assert_eq!(app.decide(&sms).await["decision"], "ALLOW");
    assert_eq!(
        app.decide(&again).await["violations"],
        json!(["Inv_NoSmsBurst"])
    );
    assert_eq!(app.decide(&other).await["decision"], "ALLOW");

    let first = request("cliniccloud.create_appointment", "ALLOW");
    let original = app.decide(&first).await;
    assert_eq!(
        app.decide(&first).await,
        original,
        "replay returns the stored decision"
    );
    let mut changed = first.clone();
    changed["args"] = json!({"slot": "elsewhere"});
    assert_eq!(
        app.decide(&changed).await["violations"],
        json!(["Inv_ReplayPayloadMismatch"])
    );

    let duplicate = request("cliniccloud.cancel_appointment", "ALLOW");
    let answers = futures::future::join_all((0..12).map(|_| app.decide(&duplicate))).await;
    let fresh = answers.iter().filter(|a| a["decision"] == "ALLOW").count();
    let concurrent = answers
        .iter()
        .filter(|a| a["violations"] == json!(["Inv_ReplayConcurrent"]))
        .count();
    assert!(
        fresh >= 1 && fresh + concurrent == answers.len(),
        "{answers:?}"
    );
    6 + answers.len()
}

/// Two dozen simultaneous copies of one request: exactly one is processed,
/// every other copy is answered as a replay, and the SQLite audit trail
/// shows one tool row and a replay row for each of the others.
pub async fn assert_duplicates_decided_once(app: &TestApp) {
    let violations = |d: &Value| d["violations"].clone();
    let body = request("cliniccloud.create_appointment", "ALLOW");
    let calls = (0..24).map(|_| app.decide(&body));
    let decisions = futures::future::join_all(calls).await;

    let allowed = decisions
        .iter()
        .filter(|d| d["decision"] == "ALLOW")
        .count();
    let concurrent = decisions
        .iter()
        .filter(|d| violations(d) == json!(["Inv_ReplayConcurrent"]))
        .count();
    assert!(allowed >= 1, "{decisions:?}");
    assert_eq!(allowed + concurrent, decisions.len(), "{decisions:?}");

    let rows = app.audit_rows().await;
    let processed = rows
        .iter()
        .filter(|r| r.action == "cliniccloud.create_appointment")
        .count();
    let replays = rows
        .iter()
        .filter(|r| r.action == "REPLAY_DETECTED")
        .count();
    assert_eq!(processed, 1, "exactly one processed decision");
    assert_eq!(
        replays,
        decisions.len() - 1,
        "every other attempt audited as a replay"
    );
}

/// A request id reused with another payload: denied as a mismatch, counted
/// once in `casf_replay_mismatch_total`, and audited as a replay.
pub async fn assert_reused_id_with_new_payload_denied(app: &TestApp) {
    let mismatches = app.metric("casf_replay_mismatch_total").await;
    let body = request("cliniccloud.create_appointment", "ALLOW");
    assert_eq!(app.decide(&body).await["decision"], "ALLOW");
    let mut tampered = body.clone();
    tampered["args"]["n"] = json!(4);
    let decision = app.decide(&tampered).await;
    assert_eq!(decision["decision"], "DENY");
    assert_eq!(violations(&decision), ["Inv_ReplayPayloadMismatch"]);
    assert_eq!(
        app.metric("casf_replay_mismatch_total").await,
        mismatches + 1.0
    );
    let rows = app.audit_rows().await;
    assert_eq!(
        rows.last()
            .map(|r| (r.action.as_str(), r.decision.as_str())),
        Some(("REPLAY_DETECTED", "DENY"))
    );
}
