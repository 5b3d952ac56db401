//! Calls through Envoy, decided by the verifier, seen by the upstream.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Stack, read};

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn allowed_calls_reach_the_upstream_with_the_casf_headers() {
    let stack = Stack::start(true).await;
    let request_id = id();
    let (status, body, _) = read(
        stack
            .request(Method::POST, "/cliniccloud/patients/p-1/appointments")
            .header("x-casf-request-id", &request_id)
            .header("x-casf-role", "receptionist")
            .header("x-casf-tenant-id", "clinic-a")
            // Forged by the client: must not survive to the upstream.
            .header("x-casf-decision", "FORGED")
            .header("x-casf-allowed-outputs", "everything")
            .header("content-type", "application/json")
            .body(r#"{"slot": "2026-12-01T09:00"}"#),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, r#"{"upstream": "ok"}"#));

    let (status, _, _) = read(
        stack
            .request(
                Method::GET,
                "/cliniccloud/patients/p-1/appointments?day=2026-12-01",
            )
            .header("x-casf-role", "receptionist")
            .header("x-casf-tenant-id", "clinic-a")
            .header("x-casf-mode", "READ_ONLY"),
    )
    .await;
    assert_eq!(status, 200);

    let seen = stack.upstream.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let write = &seen[0];
    assert_eq!(
        (write.method.as_str(), write.path.as_str()),
        ("POST", "/cliniccloud/patients/p-1/appointments")
    );
    assert_eq!(write.body, br#"{"slot": "2026-12-01T09:00"}"#);
    assert_eq!(write.headers["x-casf-decision"], "ALLOW");
    assert_eq!(write.headers["x-casf-request-id"], request_id);
    for stripped in ["x-casf-role", "x-casf-tenant-id", "x-casf-allowed-outputs"] {
        assert!(
            !write.headers.contains_key(stripped),
            "{stripped} reached the upstream: {:?}",
            write.headers
        );
    }
    let read_only = &seen[1];
    assert_eq!(
        read_only.headers["x-casf-allowed-outputs"],
        "slots_aggregated"
    );
    // Without x-casf-request-id the verifier used Envoy's x-request-id.
    assert_eq!(
        read_only.headers["x-casf-request-id"],
        read_only.headers["x-request-id"]
    );

    // Envoy got the decision and the audit event's hash as dynamic metadata.
    let rows = stack.verifier.audit_rows().await;
    assert_eq!(rows.len(), 2);
    let log = stack.envoy.access_log(2).await;
    let first = log
        .iter()
        .find(|e| e["request_id"] == json!(request_id))
        .expect("an access log entry for the write");
    assert_eq!(first["decision"], "ALLOW");
    assert_eq!(first["audit_hash"], json!(rows[0].4));
    assert_eq!(rows[0].0, "role:receptionist");
    assert_eq!(rows[0].3["request"]["args"]["slot"], "2026-12-01T09:00");
}

#[tokio::test]
async fn denied_calls_get_403_and_the_json_body_and_never_reach_the_upstream() {
    let stack = Stack::start(true).await;
    let (status, body, headers) = read(
        stack
            .request(Method::POST, "/stripe/patients/p-1/invoices")
            .header("x-casf-role", "billing")
            .header("x-casf-tenant-id", "clinic-a")
            .header("x-casf-mode", "READ_ONLY")
            .header("content-type", "application/json")
            .body(r#"{"amount": 120}"#),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"decision": "DENY", "violations": ["Mode_ReadOnly_NoWrite"], "allowed_outputs": [], "reason": "denied: Mode_ReadOnly_NoWrite"})
    );
    let (status, body, _) = read(
        stack
            .request(Method::GET, "/cliniccloud/patients/p-1/history")
            .header("x-casf-role", "nurse")
            .header("x-casf-tenant-id", "clinic-a")
            .header("x-casf-mode", "KILL_SWITCH"),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["violations"],
        json!(["Mode_KillSwitch"])
    );
    assert!(stack.upstream.requests().is_empty());
    assert_eq!(stack.verifier.audit_rows().await.len(), 2);
}

#[tokio::test]
async fn a_second_sms_to_the_same_patient_is_denied() {
    let stack = Stack::start(true).await;
    let sms = |text: &str| {
        stack
            .request(Method::POST, "/twilio/patients/p-sms/sms")
            .header("x-casf-role", "nurse")
            .header("x-casf-tenant-id", "clinic-a")
            .header("content-type", "application/json")
            .body(json!({"text": text}).to_string())
    };
    let (first, _, _) = read(sms("see you tomorrow")).await;
    let (second, body, _) = read(sms("reminder")).await;
    assert_eq!((first, second), (200, 403));
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["violations"],
        json!(["Inv_NoSmsBurst"])
    );
    let seen = stack.upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, br#"{"text":"see you tomorrow"}"#);
}

#[tokio::test]
async fn bad_bodies_get_400_and_unmapped_routes_403() {
    let stack = Stack::start(true).await;
    let nurse = |method: Method, path: &str| {
        stack
            .request(method, path)
            .header("x-casf-role", "nurse")
            .header("x-casf-tenant-id", "clinic-a")
    };
    let (status, body, headers) = read(
        nurse(Method::POST, "/twilio/patients/p-1/sms")
            .header("content-type", "text/plain")
            .body("hello"),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(headers["content-type"], "application/json");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["field"], "body", "{error}");

    // Longer than with_request_body.max_request_bytes: Envoy sends it cut
    // short and marked partial, and a partial call is not decided.
    let long = json!({"text": "x".repeat(70_000)}).to_string();
    let (status, body, _) = read(
        nurse(Method::POST, "/twilio/patients/p-1/sms")
            .header("content-type", "application/json")
            .body(long),
    )
    .await;
    assert_eq!(status, 400);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert!(
        error["detail"]
            .as_str()
            .unwrap()
            .contains("x-envoy-auth-partial-body"),
        "{error}"
    );

    let (status, body, _) = read(nurse(Method::GET, "/admin/export-all-patients")).await;
    assert_eq!(status, 403);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"decision": "DENY", "violations": ["Route_Unmapped"], "allowed_outputs": [], "reason": "denied: Route_Unmapped"})
    );
    assert!(stack.upstream.requests().is_empty());
    assert!(
        stack.verifier.audit_rows().await.is_empty(),
        "no decision, no audit row"
    );
}

#[tokio::test]
async fn jwt_claims_are_the_identity_and_a_client_role_header_is_ignored() {
    // The shipped map: identity headers not trusted.
    let stack = Stack::start(false).await;
    let token = stack.idp.token(json!({
        "sub": "agent-7", "casf_role": "receptionist", "casf_tenant_id": "clinic-a"
    }));
    let (status, _, _) = read(
        stack
            .request(Method::POST, "/cliniccloud/patients/p-1/appointments")
            .bearer_auth(&token)
            .header("x-casf-role", "doctor")
            .header("content-type", "application/json")
            .body("{}"),
    )
    .await;
    assert_eq!(status, 200);
    let rows = stack.verifier.audit_rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "role:receptionist");
    assert_eq!(
        rows[0].3["request"]["context"],
        json!({"tenant_id": "clinic-a"})
    );
    let seen = stack.upstream.requests();
    assert!(!seen[0].headers.contains_key("x-casf-role"));
    assert!(
        !seen[0].headers.contains_key("authorization"),
        "jwt_authn forward: false"
    );

    // The client names its own role, with no token: not an identity.
    let (status, body, _) = read(
        stack
            .request(Method::POST, "/cliniccloud/patients/p-1/appointments")
            .header("x-casf-role", "doctor")
            .header("x-casf-tenant-id", "clinic-a")
            .header("content-type", "application/json")
            .body("{}"),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["field"],
        "role"
    );

    // A token that does not verify never reaches the verifier. The forgery
    // changes the signature's first character, which carries six of its
    // bits. (Changing the last one, as this test once did, can alter only
    // base64 padding bits that decoders ignore: then the "forged" token is
    // the same token, one run in sixteen.)
    let (signed, signature) = token.rsplit_once('.').expect("a JWS has three parts");
    let other = if signature.starts_with('A') { 'B' } else { 'A' };
    let forged = format!("{signed}.{other}{}", &signature[1..]);
    let (status, _, _) = read(
        stack
            .request(Method::POST, "/cliniccloud/patients/p-1/appointments")
            .bearer_auth(forged)
            .body("{}"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(stack.upstream.requests().len(), 1);
    assert_eq!(stack.verifier.audit_rows().await.len(), 1);
}

#[tokio::test]
async fn with_the_verifier_stopped_envoy_fails_closed() {
    let mut stack = Stack::start(true).await;
    let call = |stack: &Stack| {
        stack
            .request(Method::GET, "/cliniccloud/patients/p-1/history")
            .header("x-casf-role", "nurse")
            .header("x-casf-tenant-id", "clinic-a")
    };
    let (before, _, _) = read(call(&stack)).await;
    assert_eq!(before, 200);
    let exit = stack.verifier.stop();
    assert!(exit.success(), "SIGTERM is a clean stop: {exit}");
    for _ in 0..3 {
        let (status, _, _) = read(call(&stack)).await;
        assert_eq!(status, 503, "status_on_error, never the upstream");
    }
    assert_eq!(stack.upstream.requests().len(), 1);
}

#[tokio::test]
async fn one_audit_chain_holds_verify_and_envoy_decisions_and_verifies() {
    let mut stack = Stack::start(true).await;
    let verify = |tool: &str, mode: &str| {
        json!({
            "request_id": id(), "tool": tool, "mode": mode, "role": "nurse",
            "subject": {"patient_id": "p-2"}, "args": {}, "context": {"tenant_id": "clinic-a"}
        })
    };
    let direct = |body: Value| {
        stack
            .client
            .post(format!("{}/verify", stack.verifier.http))
            .json(&body)
    };
    let through_envoy = |method: Method, path: &str, mode: &str| {
        stack
            .request(method, path)
            .header("x-casf-role", "nurse")
            .header("x-casf-tenant-id", "clinic-a")
            .header("x-casf-mode", mode)
            .header("content-type", "application/json")
    };
    assert_eq!(
        read(direct(verify("cliniccloud.summary_history", "ALLOW")))
            .await
            .0,
        200
    );
    assert_eq!(
        read(through_envoy(
            Method::GET,
            "/cliniccloud/patients/p-2/history",
            "ALLOW"
        ))
        .await
        .0,
        200
    );
    assert_eq!(
        read(direct(verify("twilio.send_sms", "READ_ONLY"))).await.0,
        200
    );
    assert_eq!(
        read(through_envoy(Method::POST, "/twilio/patients/p-2/sms", "READ_ONLY").body("{}"))
            .await
            .0,
        403
    );
    let rows = stack.verifier.audit_rows().await;
    let decisions: Vec<(&str, &str)> = rows.iter().map(|r| (r.1.as_str(), r.2.as_str())).collect();
    assert_eq!(
        decisions,
        [
            ("cliniccloud.summary_history", "ALLOW"),
            ("cliniccloud.summary_history", "ALLOW"),
            ("twilio.send_sms", "DENY"),
            ("twilio.send_sms", "DENY"),
        ]
    );
    // Both doors write the same payload: the /verify request and response.
    let keys = |payload: &Value| {
        let mut keys: Vec<String> = payload["request"]
            .as_object()
            .unwrap()
            .keys()
            .chain(payload["response"].as_object().unwrap().keys())
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    for row in &rows {
        assert_eq!(keys(&row.3), keys(&rows[0].3));
    }
    assert_eq!(stack.verifier.stop().code(), Some(0));
    let output = stack.verifier.audit_verify();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("chain valid: 4 events"), "{stdout}");
}

/// A write denied in READ_ONLY, as an invoice through Envoy.
fn read_only_invoice(stack: &Stack) -> reqwest::RequestBuilder {
    stack
        .request(Method::POST, "/stripe/patients/p-1/invoices")
        .header("x-casf-role", "billing")
        .header("x-casf-tenant-id", "clinic-a")
        .header("x-casf-mode", "READ_ONLY")
        // Forged by the client: must not survive to the upstream.
        .header("x-casf-shadow-decision", "FORGED")
        .header("content-type", "application/json")
        .body(r#"{"amount": 120}"#)
}

#[tokio::test]
async fn global_shadow_lets_a_denied_call_reach_the_upstream_with_the_real_decision() {
    let stack = Stack::start_with(
        &crate::harness::routes_yaml(true),
        &[("CASF_ENFORCE", "false")],
    )
    .await;
    let (status, body, _) = read(read_only_invoice(&stack)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"upstream": "ok"}"#));
    let seen = stack.upstream.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].headers["x-casf-decision"], "ALLOW");
    assert_eq!(seen[0].headers["x-casf-shadow-decision"], "DENY");
    let rows = stack.verifier.audit_rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].3["response"]["decision"], "DENY");
    assert_eq!(rows[0].3["shadow"], true);
}

#[tokio::test]
async fn a_route_in_shadow_reaches_the_upstream_and_the_others_are_enforced() {
    let mut map: serde_norway::Value =
        serde_norway::from_str(&crate::harness::routes_yaml(true)).unwrap();
    for route in map["routes"].as_sequence_mut().unwrap() {
        if route["tool"] == "stripe.generate_invoice" {
            route["enforce"] = serde_norway::Value::Bool(false);
        }
    }
    let stack = Stack::start_with(&serde_norway::to_string(&map).unwrap(), &[]).await;
    let (status, _, _) = read(read_only_invoice(&stack)).await;
    assert_eq!(status, 200);
    let seen = stack.upstream.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].headers["x-casf-shadow-decision"], "DENY");

    // Another write in READ_ONLY is denied as usual.
    let (status, body, _) = read(
        stack
            .request(Method::POST, "/cliniccloud/patients/p-1/appointments")
            .header("x-casf-role", "receptionist")
            .header("x-casf-tenant-id", "clinic-a")
            .header("x-casf-mode", "READ_ONLY")
            .header("content-type", "application/json")
            .body(r#"{"slot": "2026-12-01T09:00"}"#),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(stack.upstream.requests().len(), 1);

    // An enforced ALLOW never carries the header, even a forged one.
    let (status, _, _) = read(
        stack
            .request(Method::GET, "/cliniccloud/patients/p-1/history")
            .header("x-casf-role", "nurse")
            .header("x-casf-tenant-id", "clinic-a")
            .header("x-casf-shadow-decision", "FORGED"),
    )
    .await;
    assert_eq!(status, 200);
    let seen = stack.upstream.requests();
    assert!(
        !seen[1].headers.contains_key("x-casf-shadow-decision"),
        "{:?}",
        seen[1].headers
    );
}
