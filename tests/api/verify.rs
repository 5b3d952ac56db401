//! Every row of the contract's decision semantics through `POST /verify`.

use serde_json::{Value, json};

use crate::helpers::{
    READ_TOOLS, WRITE_TOOLS, fresh_id, request, spawn_app, spawn_app_with, violations,
};

#[tokio::test]
async fn the_contract_decision_table_holds_on_embedded_backends() {
    let app = spawn_app().await;
    let decided = crate::contract::assert_decision_table(&app).await;
    let decided = decided + crate::contract::assert_stateful_rows(&app).await;
    assert_eq!(
        app.audit_rows().await.len(),
        decided,
        "one audit row per decision"
    );
}

#[tokio::test]
async fn every_tool_is_allowed_in_allow_mode() {
    let app = spawn_app().await;
    for tool in WRITE_TOOLS.iter().chain(&READ_TOOLS) {
        let decision = app.decide(&request(tool, "ALLOW")).await;
        assert_eq!(
            decision,
            json!({"decision": "ALLOW", "violations": [], "allowed_outputs": [], "reason": "OK"}),
            "{tool}"
        );
    }
}

#[tokio::test]
async fn reads_are_allowed_in_step_up_and_read_only() {
    let app = spawn_app().await;
    for mode in ["STEP_UP", "READ_ONLY"] {
        for tool in READ_TOOLS {
            let decision = app.decide(&request(tool, mode)).await;
            assert_eq!(
                decision["decision"], "ALLOW",
                "{tool} in {mode}: {decision}"
            );
        }
    }
}

#[tokio::test]
async fn read_only_lists_appointments_as_aggregated_slots_only() {
    let app = spawn_app().await;
    let decision = app
        .decide(&request("cliniccloud.list_appointments", "READ_ONLY"))
        .await;
    assert_eq!(decision["decision"], "ALLOW");
    assert_eq!(decision["allowed_outputs"], json!(["slots_aggregated"]));
    let decision = app
        .decide(&request("cliniccloud.summary_history", "READ_ONLY"))
        .await;
    assert_eq!(decision["allowed_outputs"], json!([]));
    let decision = app
        .decide(&request("cliniccloud.list_appointments", "ALLOW"))
        .await;
    assert_eq!(decision["allowed_outputs"], json!([]));
}

#[tokio::test]
async fn read_only_denies_every_write() {
    let app = spawn_app().await;
    for tool in WRITE_TOOLS {
        let decision = app.decide(&request(tool, "READ_ONLY")).await;
        assert_eq!(decision["decision"], "DENY", "{tool}");
        assert_eq!(violations(&decision), ["Mode_ReadOnly_NoWrite"], "{tool}");
        assert_eq!(decision["allowed_outputs"], json!([]));
    }
}

#[tokio::test]
async fn kill_switch_denies_every_tool() {
    let app = spawn_app().await;
    for tool in WRITE_TOOLS.iter().chain(&READ_TOOLS) {
        let decision = app.decide(&request(tool, "KILL_SWITCH")).await;
        assert_eq!(decision["decision"], "DENY", "{tool}");
        assert_eq!(violations(&decision), ["Mode_KillSwitch"], "{tool}");
    }
}

#[tokio::test]
async fn step_up_write_is_a_policy_deny_without_violations() {
    let app = spawn_app().await;
    for tool in WRITE_TOOLS {
        let decision = app.decide(&request(tool, "STEP_UP")).await;
        assert_eq!(decision["decision"], "DENY");
        assert_eq!(violations(&decision), ["OPA_Deny"], "{tool}");
    }
}

#[tokio::test]
async fn missing_or_empty_tenant_is_denied() {
    let app = spawn_app().await;
    for context in [
        json!({}),
        json!({"tenant_id": ""}),
        json!({"tenant_id": 42}),
    ] {
        let mut body = request("cliniccloud.create_appointment", "ALLOW");
        body["context"] = context.clone();
        let decision = app.decide(&body).await;
        assert_eq!(decision["decision"], "DENY", "{context}");
        assert_eq!(
            violations(&decision),
            ["BadRequest_MissingTenantId"],
            "{context}"
        );
    }
}

#[tokio::test]
async fn violations_are_the_union_of_stages_in_stage_order() {
    let app = spawn_app().await;
    let mut body = request("stripe.generate_invoice", "READ_ONLY");
    body["context"] = json!({});
    let decision = app.decide(&body).await;
    assert_eq!(
        violations(&decision),
        ["Mode_ReadOnly_NoWrite", "BadRequest_MissingTenantId"]
    );
    assert_eq!(
        decision["reason"],
        "denied: Mode_ReadOnly_NoWrite, BadRequest_MissingTenantId"
    );
}

#[tokio::test]
async fn unknown_role_is_rejected_with_its_field() {
    let app = spawn_app().await;
    let mut body = request("cliniccloud.list_appointments", "ALLOW");
    body["role"] = json!("surgeon");
    let (status, error) = app.verify(&body).await;
    assert_eq!(status, 422);
    assert_eq!(error["field"], "role");
    assert!(
        error["reason"].as_str().unwrap().contains("surgeon"),
        "{error}"
    );
}

#[tokio::test]
async fn second_sms_to_a_patient_within_the_hour_is_denied() {
    let app = spawn_app().await;
    let first = request("twilio.send_sms", "ALLOW");
    let mut second = first.clone();
    second["request_id"] = json!(fresh_id());
    let mut other_patient = first.clone();
    other_patient["request_id"] = json!(fresh_id());
    other_patient["subject"] = json!({"patient_id": "someone-else"});

    assert_eq!(app.decide(&first).await["decision"], "ALLOW");
    let denied = app.decide(&second).await;
    assert_eq!(denied["decision"], "DENY");
    assert_eq!(violations(&denied), ["Inv_NoSmsBurst"]);
    assert_eq!(app.decide(&other_patient).await["decision"], "ALLOW");
    assert_eq!(app.metric("casf_sms_limited_total").await, 1.0);
}

#[tokio::test]
async fn denied_sms_does_not_use_up_the_patients_quota() {
    let app = spawn_app().await;
    let mut refused = request("twilio.send_sms", "READ_ONLY");
    let patient = refused["subject"].clone();
    assert_eq!(app.decide(&refused).await["decision"], "DENY");
    refused["context"] = json!({});
    refused["mode"] = json!("ALLOW");
    refused["request_id"] = json!(fresh_id());
    assert_eq!(
        violations(&app.decide(&refused).await),
        ["BadRequest_MissingTenantId"]
    );

    let mut send = request("twilio.send_sms", "ALLOW");
    send["subject"] = patient;
    assert_eq!(app.decide(&send).await["decision"], "ALLOW");
}

#[tokio::test]
async fn replay_with_the_same_payload_returns_the_identical_decision() {
    let app = spawn_app().await;
    let hits = app.metric("casf_replay_hit_total").await;
    let body = request("cliniccloud.list_appointments", "READ_ONLY");
    let first = app.decide(&body).await;
    // Key order and whitespace do not change the fingerprint.
    let reordered = format!(
        "{{ \"context\": {}, \"args\": {}, \"subject\": {}, \"role\": \"nurse\", \"mode\": \"READ_ONLY\", \"tool\": \"cliniccloud.list_appointments\", \"request_id\": {} }}",
        body["context"], body["args"], body["subject"], body["request_id"]
    );
    let response = app.post_raw(reordered).await;
    assert_eq!(response.status(), 200);
    let replayed: Value = response.json().await.unwrap();
    assert_eq!(replayed, first);
    assert_eq!(app.metric("casf_replay_hit_total").await, hits + 1.0);

    let rows = app.audit_rows().await;
    let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        ["cliniccloud.list_appointments", "REPLAY_DETECTED"]
    );
    assert_eq!(rows[1].decision, "ALLOW");
}

#[tokio::test]
async fn replayed_sms_is_not_sent_twice_nor_counted_twice() {
    let app = spawn_app().await;
    let body = request("twilio.send_sms", "ALLOW");
    assert_eq!(app.decide(&body).await["decision"], "ALLOW");
    // The replay answers from the stored decision: ALLOW again, and the
    // patient's quota is not touched by it.
    assert_eq!(app.decide(&body).await["decision"], "ALLOW");
    let mut next = body.clone();
    next["request_id"] = json!(fresh_id());
    assert_eq!(violations(&app.decide(&next).await), ["Inv_NoSmsBurst"]);
}

#[tokio::test]
async fn replay_with_a_different_payload_is_denied() {
    let app = spawn_app().await;
    crate::contract::assert_reused_id_with_new_payload_denied(&app).await;
}

#[tokio::test]
async fn concurrent_duplicates_are_decided_exactly_once() {
    let app = spawn_app().await;
    crate::contract::assert_duplicates_decided_once(&app).await;
}

#[tokio::test]
async fn anti_replay_can_be_disabled() {
    let app = spawn_app_with(&[("ANTI_REPLAY_ENABLED", "false")]).await;
    let body = request("cliniccloud.create_appointment", "ALLOW");
    assert_eq!(app.decide(&body).await["decision"], "ALLOW");
    assert_eq!(app.decide(&body).await["decision"], "ALLOW");
    let rows = app.audit_rows().await;
    assert!(
        rows.iter()
            .all(|r| r.action == "cliniccloud.create_appointment"),
        "no replay handling when disabled"
    );
    assert_eq!(rows.len(), 2);
}

#[tokio::test]
async fn metrics_count_the_keys_the_in_process_state_holds() {
    let app = spawn_app().await;
    assert_eq!(app.metric("casf_state_keys").await, 0.0);
    let first = request("cliniccloud.create_appointment", "ALLOW");
    app.decide(&first).await;
    app.decide(&request("cliniccloud.list_appointments", "ALLOW"))
        .await;
    assert_eq!(app.metric("casf_state_keys").await, 2.0);
    app.decide(&first).await; // a replay adds nothing
    assert_eq!(app.metric("casf_state_keys").await, 2.0);
    // An SMS holds its request_id and the patient's window.
    app.decide(&request("twilio.send_sms", "ALLOW")).await;
    assert_eq!(app.metric("casf_state_keys").await, 4.0);
}

#[tokio::test]
async fn a_full_in_process_state_fails_writes_closed_and_lets_reads_through() {
    // 64 keys: one per shard, so a shard fills within 65 fresh ids.
    let mut app = spawn_app_with(&[("CASF_STATE_MAX_KEYS", "64")]).await;
    const FAIL_CLOSED_REDIS: &str = "casf_fail_closed_total{trigger=\"redis\"}";
    assert_eq!(app.metric("casf_state_max_keys").await, 64.0);
    let before = app.metric(FAIL_CLOSED_REDIS).await;
    let mut refused = None;
    for _ in 0..=64 {
        let body = request("cliniccloud.create_appointment", "ALLOW");
        let decision = app.decide(&body).await;
        if decision["decision"] == "DENY" {
            refused = Some((body, decision));
            break;
        }
        assert_eq!(decision["decision"], "ALLOW", "{decision}");
    }
    let (body, decision) = refused.expect("a write was refused once the state was full");
    assert_eq!(
        violations(&decision),
        ["FAIL_CLOSED", "Inv_ReplayCheckUnavailable"]
    );
    assert_eq!(app.metric(FAIL_CLOSED_REDIS).await - before, 1.0);

    // Reads go on without anti-replay, as they do with Redis down.
    for _ in 0..=64 {
        let read = request("cliniccloud.list_appointments", "ALLOW");
        assert_eq!(app.decide(&read).await["decision"], "ALLOW");
    }

    app.shutdown().await;
    let rows = app.audit_rows().await;
    let row = rows
        .iter()
        .find(|r| r.request_id == body["request_id"])
        .expect("the refused write is audited");
    assert_eq!(row.decision, "DENY");
}

#[tokio::test]
async fn missing_patient_id_is_a_400() {
    let app = spawn_app().await;
    for tool in WRITE_TOOLS.iter().chain(&READ_TOOLS) {
        for subject in [json!({}), json!({"patient_id": ""})] {
            let mut body = request(tool, "ALLOW");
            body["subject"] = subject;
            let (status, error) = app.verify(&body).await;
            assert_eq!(status, 400, "{tool}");
            assert_eq!(error, json!({"detail": "subject.patient_id required"}));
        }
    }
}

#[tokio::test]
async fn schema_failures_are_422_naming_the_field() {
    let app = spawn_app().await;
    let base = request("cliniccloud.create_appointment", "ALLOW");
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "tool",
            Box::new(|b| b["tool"] = json!("cliniccloud.delete_everything")),
        ),
        ("mode", Box::new(|b| b["mode"] = json!("YOLO"))),
        ("role", Box::new(|b| b["role"] = json!("admin"))),
        ("request_id", Box::new(|b| b["request_id"] = json!(""))),
        (
            "request_id",
            Box::new(|b| b["request_id"] = json!("x".repeat(129))),
        ),
        ("request_id", Box::new(|b| b["request_id"] = json!(12))),
        ("args", Box::new(|b| b["args"] = json!([1, 2]))),
        ("context", Box::new(|b| b["context"] = json!("t-1"))),
        ("subject", Box::new(|b| b["subject"] = json!(null))),
        (
            "subject.patient_id",
            Box::new(|b| b["subject"] = json!({"patient_id": 5})),
        ),
        (
            "mode",
            Box::new(|b| drop(b.as_object_mut().unwrap().remove("mode"))),
        ),
        ("sneaky", Box::new(|b| b["sneaky"] = json!(true))),
    ];
    for (field, mutate) in cases {
        let mut body = base.clone();
        mutate(&mut body);
        let (status, error) = app.verify(&body).await;
        assert_eq!(status, 422, "{field}: {error}");
        assert_eq!(error["field"], field, "{error}");
        assert!(
            error["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{error}"
        );
        assert!(
            error["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with(field)),
            "{error}"
        );
    }
}

#[tokio::test]
async fn malformed_bodies_are_422_never_500() {
    let app = spawn_app().await;
    for raw in [
        "",
        "{",
        "not json",
        "[]",
        "null",
        "\"text\"",
        "{\"request_id\": \"a\",}",
    ] {
        let response = app.post_raw(raw.to_owned()).await;
        assert_eq!(response.status(), 422, "{raw:?}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["field"], "body", "{raw:?}: {error}");
    }
}

#[tokio::test]
async fn bodies_over_64_kib_are_413() {
    let app = spawn_app().await;
    let mut body = request("cliniccloud.create_appointment", "ALLOW");
    body["args"]["blob"] = json!("x".repeat(64 * 1024));
    let response = app.post_raw(body.to_string()).await;
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["detail"].as_str().unwrap().contains("65536"),
        "{error}"
    );

    // Just under the limit is decided.
    let mut body = request("cliniccloud.create_appointment", "ALLOW");
    body["args"]["blob"] = json!("x".repeat(60 * 1024));
    assert_eq!(app.decide(&body).await["decision"], "ALLOW");
}

#[tokio::test]
async fn rejected_requests_are_neither_decided_nor_audited() {
    let app = spawn_app().await;
    let before = app.metric("casf_verify_total").await;
    let mut body = request("cliniccloud.create_appointment", "ALLOW");
    body["mode"] = json!("nope");
    assert_eq!(app.verify(&body).await.0, 422);
    assert_eq!(app.post_raw("{".to_owned()).await.status(), 422);
    assert_eq!(app.metric("casf_verify_total").await, before);
    assert!(app.audit_rows().await.is_empty());
}

#[tokio::test]
async fn only_json_bodies_are_decided_others_are_415() {
    let app = spawn_app().await;
    let body = request("cliniccloud.summary_history", "ALLOW").to_string();
    let post = |content_type: Option<&'static str>| {
        let mut call = app
            .client
            .post(format!("{}/verify", app.base))
            .body(body.clone());
        if let Some(content_type) = content_type {
            call = call.header("content-type", content_type);
        }
        call.send()
    };
    for refused in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/json; charset=latin1"),
        Some("application/jsonx"),
    ] {
        let response = post(refused).await.expect("POST");
        assert_eq!(response.status(), 415, "{refused:?}");
        let error: Value = response.json().await.expect("JSON error");
        assert!(error["detail"].as_str().is_some(), "{error}");
    }
    for accepted in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=\"UTF-8\"",
    ] {
        let response = post(Some(accepted)).await.expect("POST");
        assert_eq!(response.status(), 200, "{accepted}");
    }
    let before = app.audit_rows().await.len();
    assert_eq!(before, 3, "only the accepted bodies were decided");
}

#[tokio::test]
async fn a_key_given_twice_anywhere_is_422_naming_it() {
    let app = spawn_app().await;
    let body = request("twilio.send_sms", "ALLOW").to_string();
    let cases = [
        (
            body.replacen(
                r#""mode":"ALLOW""#,
                r#""mode":"KILL_SWITCH","mode":"ALLOW""#,
                1,
            ),
            "mode",
        ),
        (body.replacen(r#""n":3"#, r#""n":3,"n":4"#, 1), "args.n"),
        (
            body.replacen(
                r#""tenant_id":"t-1""#,
                r#""tenant_id":"t-1","tenant_\u0069d":"t-2""#,
                1,
            ),
            "context.tenant_id",
        ),
    ];
    for (raw, field) in cases {
        assert_ne!(raw, body, "the case must change the body");
        let response = app.post_raw(raw.clone()).await;
        assert_eq!(response.status(), 422, "{raw}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["field"], field, "{error}");
        assert_eq!(error["reason"], "duplicate key", "{error}");
    }
    assert!(app.audit_rows().await.is_empty());
}

#[tokio::test]
async fn one_patient_cannot_be_spelled_two_ways_to_dodge_the_sms_limit() {
    let app = spawn_app().await;
    let patient = format!("pat-{}", fresh_id());
    let mut first = request("twilio.send_sms", "ALLOW");
    first["subject"]["patient_id"] = json!(patient);
    assert_eq!(app.decide(&first).await["decision"], "ALLOW");
    for spelled in [
        format!("{patient} "),
        format!(" {patient}"),
        format!("\u{200B}{patient}"),
        patient.replacen('-', "-\u{200D}", 1),
        format!("{patient}\u{FEFF}"),
    ] {
        let mut again = request("twilio.send_sms", "ALLOW");
        again["subject"]["patient_id"] = json!(spelled);
        let (status, error) = app.verify(&again).await;
        assert_eq!(status, 422, "{spelled:?}: {error}");
        assert_eq!(error["field"], "subject.patient_id", "{error}");
    }
    let mut id = request("twilio.send_sms", "ALLOW");
    id["request_id"] = json!(format!("{} ", fresh_id()));
    assert_eq!(app.verify(&id).await.1["field"], "request_id");
    let mut tenant = request("twilio.send_sms", "ALLOW");
    tenant["context"]["tenant_id"] = json!("t-1\u{2060}");
    assert_eq!(app.verify(&tenant).await.1["field"], "context.tenant_id");
}

#[tokio::test]
async fn amounts_that_differ_beyond_a_double_are_different_payloads() {
    let app = spawn_app().await;
    let body = request("stripe.generate_invoice", "ALLOW").to_string();
    let with = |amount: &str| body.replacen(r#""n":3"#, &format!(r#""n":{amount}"#), 1);
    let first = app.post_raw(with("123456789012345678901234567890")).await;
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    let replay: Value = app
        .post_raw(with("123456789012345678901234567890"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(replay, first, "the same amount replays");
    let changed: Value = app
        .post_raw(with("123456789012345678901234567891"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(violations(&changed), ["Inv_ReplayPayloadMismatch"]);
}
