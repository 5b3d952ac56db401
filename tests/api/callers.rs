//! Callers (`CASF_CALLERS`) through real sockets: 401 without a valid key,
//! a DENY with `Caller_*NotGranted` for a claim outside the grants (audited
//! with the caller's name), a request_id that belongs to the caller who used
//! it, the file followed at run time, the operator's `/admin/mode`, and the
//! Envoy door's JWT subject as the caller.

use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::ext_authz::check;
use crate::helpers::{TestApp, fresh_id, metric_value, spawn_app, spawn_app_with, violations};
use crate::servers::wait_until;

pub const SCHED_KEY: &str = "sched-key-0f3c9a";
const SCHED2_KEY: &str = "sched2-key-77ab01";
const ONCALL_KEY: &str = "oncall-key-5d2e88";

fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The issue's example: a receptionist agent of clinic-a with two tools, a
/// second agent with the same grants, an Envoy-side agent known by its JWT
/// subject, and an operator.
pub fn callers_yaml() -> String {
    format!(
        "callers:
  - name: scheduling-agent
    api_key_sha256: {}
    roles: [receptionist]
    tenants: [clinic-a]
    tools: [cliniccloud.create_appointment, cliniccloud.list_appointments]
  - name: scheduling-agent-2
    api_key_sha256: {}
    roles: [receptionist]
    tenants: [clinic-a]
  - name: mesh-nurse
    subject: user-nurse-1
    roles: [nurse]
    tenants: [t-1]
  - name: on-call
    api_key_sha256: {}
    operator: true
",
        sha(SCHED_KEY),
        sha(SCHED2_KEY),
        sha(ONCALL_KEY)
    )
}

/// An app with the callers file above (kept alive with the app).
async fn app_with_callers(extra: &[(&str, &str)]) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callers.yaml");
    std::fs::write(&path, callers_yaml()).unwrap();
    let mut vars = vec![("CASF_CALLERS", path.to_str().unwrap())];
    vars.extend_from_slice(extra);
    (spawn_app_with(&vars).await, dir)
}

pub fn booking(role: &str, tenant: &str, tool: &str) -> Value {
    json!({
        "request_id": fresh_id(), "tool": tool, "mode": "ALLOW", "role": role,
        "subject": {"patient_id": "pat-1"}, "args": {"slot": "09:00"},
        "context": {"tenant_id": tenant}
    })
}

/// POST /verify with `Authorization: Bearer <key>` (none when `key` is None).
pub async fn verify_as(app: &TestApp, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = app
        .client
        .post(format!("{}/verify", app.base))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("POST /verify")
}

async fn decide_as(app: &TestApp, key: &str, body: &Value) -> Value {
    let response = verify_as(app, Some(key), body).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn payload(row: &crate::helpers::AuditRow) -> Value {
    serde_json::from_str(&row.payload).unwrap()
}

#[tokio::test]
async fn a_call_without_a_valid_key_is_401_counted_and_not_decided() {
    let (app, _dir) = app_with_callers(&[]).await;
    let body = booking("receptionist", "clinic-a", "cliniccloud.create_appointment");
    for (key, reason) in [
        (None, "missing"),
        (Some("wrong-key"), "invalid"),
        (Some(""), "invalid"),
    ] {
        let response = verify_as(&app, key, &body).await;
        assert_eq!(response.status(), 401, "{key:?}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer realm=\"casf-verifier\""
        );
        let answer: Value = response.json().await.unwrap();
        assert!(
            answer["detail"]
                .as_str()
                .unwrap()
                .contains("not authenticated")
        );
        assert!(answer.get("decision").is_none(), "not a decision: {answer}");
        let _ = reason;
    }
    // A malformed Authorization header is not a key either.
    let response = app
        .client
        .post(format!("{}/verify", app.base))
        .header("content-type", "application/json")
        .header("authorization", format!("Basic {SCHED_KEY}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let metrics = app.get("/metrics").await.1;
    assert_eq!(
        metric_value(
            &metrics,
            "casf_caller_rejected_total{door=\"http\",reason=\"missing\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "casf_caller_rejected_total{door=\"http\",reason=\"invalid\"}"
        ),
        3.0
    );
    assert_eq!(metric_value(&metrics, "casf_verify_total"), 0.0);
    assert_eq!(metric_value(&metrics, "casf_callers_unauthenticated"), 0.0);
    assert!(app.audit_rows().await.is_empty());
    // The right key is let in.
    let decision = decide_as(&app, SCHED_KEY, &body).await;
    assert_eq!(decision["decision"], "ALLOW", "{decision}");
}

#[tokio::test]
async fn a_claim_outside_the_grants_is_an_audited_deny_naming_the_caller() {
    let (app, _dir) = app_with_callers(&[]).await;
    let create = "cliniccloud.create_appointment";
    let cases = [
        (booking("receptionist", "clinic-a", create), vec![]),
        (
            booking("doctor", "clinic-a", create),
            vec!["Caller_RoleNotGranted"],
        ),
        (
            booking("receptionist", "clinic-b", create),
            vec!["Caller_TenantNotGranted"],
        ),
        (
            booking("receptionist", "clinic-a", "stripe.generate_invoice"),
            vec!["Caller_ToolNotGranted"],
        ),
    ];
    for (body, expected) in &cases {
        let decision = decide_as(&app, SCHED_KEY, body).await;
        if expected.is_empty() {
            assert_eq!(decision["decision"], "ALLOW", "{decision}");
        } else {
            assert_eq!(decision["decision"], "DENY", "{decision}");
            // The grant codes come first; the policy may add its own.
            assert_eq!(&violations(&decision)[..1], &expected[..], "{decision}");
        }
    }
    let rows = app.audit_rows().await;
    assert_eq!(rows.len(), cases.len(), "every decision audited");
    for (row, (body, _)) in rows.iter().zip(&cases) {
        let payload = payload(row);
        assert_eq!(payload["caller"], "scheduling-agent");
        assert_eq!(payload["request"]["request_id"], body["request_id"]);
        // The actor column still names the claimed role; the hash formula is unchanged.
        assert_eq!(
            row.actor,
            format!("role:{}", body["role"].as_str().unwrap())
        );
    }
    let out = app.audit_cli(&["verify"]);
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn a_request_id_belongs_to_the_caller_who_used_it() {
    let (app, _dir) = app_with_callers(&[]).await;
    let body = booking("receptionist", "clinic-a", "cliniccloud.create_appointment");
    let first = decide_as(&app, SCHED_KEY, &body).await;
    assert_eq!(first["decision"], "ALLOW", "{first}");
    // Another caller, with the same grants and the same body, does not get
    // the stored ALLOW: it is someone else's request_id.
    let other = decide_as(&app, SCHED2_KEY, &body).await;
    assert_eq!(other["decision"], "DENY", "{other}");
    assert_eq!(violations(&other), ["Inv_ReplayPayloadMismatch"]);
    // Nor does the operator (no grants at all).
    let operator = decide_as(&app, ONCALL_KEY, &body).await;
    assert_eq!(operator["decision"], "DENY", "{operator}");
    // The caller who made it replays its own decision.
    let again = decide_as(&app, SCHED_KEY, &body).await;
    assert_eq!(again, first);
    let rows = app.audit_rows().await;
    let callers: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r.action.clone(),
                payload(r)["caller"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        callers,
        [
            (
                "cliniccloud.create_appointment".into(),
                "scheduling-agent".into()
            ),
            ("REPLAY_DETECTED".into(), "scheduling-agent-2".into()),
            ("REPLAY_DETECTED".into(), "on-call".into()),
            ("REPLAY_DETECTED".into(), "scheduling-agent".into()),
        ]
    );
}

#[tokio::test]
async fn the_callers_file_is_followed_and_a_broken_edit_is_refused() {
    let (app, dir) = app_with_callers(&[]).await;
    let path = dir.path().join("callers.yaml");
    let body = || booking("receptionist", "clinic-a", "cliniccloud.list_appointments");
    assert_eq!(
        verify_as(&app, Some(SCHED_KEY), &body()).await.status(),
        200
    );
    // The scheduling agent's key is rotated.
    let rotated = callers_yaml().replace(&sha(SCHED_KEY), &sha("rotated-key"));
    std::fs::write(&path, rotated).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the new key is accepted",
        || async { verify_as(&app, Some("rotated-key"), &body()).await.status() == 200 },
    )
    .await;
    assert_eq!(
        verify_as(&app, Some(SCHED_KEY), &body()).await.status(),
        401
    );
    // A broken edit keeps the callers in force.
    std::fs::write(
        &path,
        "callers: [{name: x, api_key_sha256: 12, colour: red}]",
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the broken file is refused",
        || async {
            app.metric("casf_callers_reload_total{result=\"refused\"}")
                .await
                >= 1.0
        },
    )
    .await;
    assert_eq!(
        verify_as(&app, Some("rotated-key"), &body()).await.status(),
        200
    );
    assert_eq!(
        app.metric("casf_callers_reload_total{result=\"ok\"}").await,
        1.0
    );
}

#[tokio::test]
async fn startup_refuses_a_callers_file_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            format!(
                "callers: [{{name: a, api_key_sha256: {}, role: [nurse]}}]",
                sha("k")
            ),
            "unknown field `role`",
        ),
        (
            "callers: [{name: a, api_key_sha256: 9f86d081}]".to_owned(),
            "callers[0].api_key_sha256",
        ),
        (
            format!(
                "callers: [{{name: a, api_key_sha256: {}}}, {{name: a, peer: spiffe://x}}]",
                sha("k")
            ),
            "callers[1].name: duplicate name",
        ),
    ];
    for ((text, expected), subcommand) in cases.into_iter().zip(["serve", "check", "serve"]) {
        let path = dir.path().join("callers.yaml");
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
            .arg(subcommand)
            .env_clear()
            .env("CASF_CALLERS", &path)
            .env("CASF_HTTP_ADDR", "127.0.0.1:0")
            .env("CASF_GRPC_ADDR", "127.0.0.1:0")
            .env("CASF_AUDIT_SQLITE", dir.path().join("a.db"))
            .env(
                "CASF_POLICY_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
            )
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{text}: started");
        assert!(
            stderr.contains("CASF_CALLERS") && stderr.contains(expected),
            "{text}: {stderr}"
        );
    }
}

async fn admin(
    app: &TestApp,
    method: reqwest::Method,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = app
        .client
        .request(method, format!("{}/admin/mode", app.base));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn an_operator_sets_the_floor_and_no_caller_can_lower_it() {
    let (app, _dir) = app_with_callers(&[("CASF_MODE_FLOOR", "STEP_UP")]).await;
    use reqwest::Method;
    let kill = Some(json!({"mode": "KILL_SWITCH"}));
    assert_eq!(admin(&app, Method::GET, None, None).await.0, 401);
    assert_eq!(admin(&app, Method::PUT, None, kill.clone()).await.0, 401);
    assert_eq!(admin(&app, Method::GET, Some(SCHED_KEY), None).await.0, 403);
    let (status, _) = admin(&app, Method::PUT, Some(SCHED_KEY), kill.clone()).await;
    assert_eq!(status, 403);
    let (status, body) = admin(&app, Method::GET, Some(ONCALL_KEY), None).await;
    assert_eq!((status, &body["mode"]), (200, &json!("STEP_UP")), "{body}");
    let (status, body) = admin(
        &app,
        Method::PUT,
        Some(ONCALL_KEY),
        Some(json!({"mode": "KILL"})),
    )
    .await;
    assert_eq!((status, &body["field"]), (422, &json!("mode")), "{body}");
    let (status, body) = admin(
        &app,
        Method::PUT,
        Some(ONCALL_KEY),
        Some(json!({"mode": "ALLOW", "x": 1})),
    )
    .await;
    assert_eq!((status, &body["field"]), (422, &json!("x")), "{body}");

    let (status, body) = admin(&app, Method::PUT, Some(ONCALL_KEY), kill).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"mode": "KILL_SWITCH", "sources": {"env": "STEP_UP", "file": null, "admin": "KILL_SWITCH"}})
    );
    assert_eq!(
        app.metric("casf_mode_floor{mode=\"KILL_SWITCH\"}").await,
        1.0
    );
    // The body's mode cannot lower it...
    let response = verify_as(
        &app,
        Some(SCHED_KEY),
        &booking("receptionist", "clinic-a", "cliniccloud.list_appointments"),
    )
    .await;
    assert_eq!(response.headers()["x-casf-mode-applied"], "KILL_SWITCH");
    let decision: Value = response.json().await.unwrap();
    assert_eq!(violations(&decision), ["Mode_KillSwitch"]);
    // ... nor the Envoy door's mode header.
    let answer = envoy_check(
        &app,
        &[("x-request-id", &fresh_id()), ("x-casf-mode", "ALLOW")],
        Some(json!({"casf_role": "nurse", "casf_tenant_id": "t-1", "sub": "user-nurse-1"})),
    )
    .await;
    let (status, body) = denied(&answer);
    assert_eq!(status, 403);
    assert_eq!(body["violations"], json!(["Mode_KillSwitch"]));
    // The operator's ALLOW lifts its own raise, never below CASF_MODE_FLOOR.
    let (_, body) = admin(
        &app,
        Method::PUT,
        Some(ONCALL_KEY),
        Some(json!({"mode": "ALLOW"})),
    )
    .await;
    assert_eq!(body["mode"], "STEP_UP");
    let (_, body) = admin(&app, Method::GET, Some(ONCALL_KEY), None).await;
    assert_eq!(body["mode"], "STEP_UP");
}

#[tokio::test]
async fn without_callers_there_is_no_admin_endpoint_and_a_warning() {
    let app = spawn_app().await;
    let (status, _) = app.get("/admin/mode").await;
    assert_eq!(status, 404);
    let response = app
        .client
        .put(format!("{}/admin/mode", app.base))
        .header("content-type", "application/json")
        .body(r#"{"mode":"ALLOW"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(app.metric("casf_callers_unauthenticated").await, 1.0);
    let (status, health) = app.get("/healthz").await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(
        health["checks"]["callers"]["authenticated"], false,
        "{health}"
    );
    // The guide's behaviour: no credential needed.
    let (status, _) = app
        .verify(&booking(
            "doctor",
            "anything",
            "cliniccloud.summary_history",
        ))
        .await;
    assert_eq!(status, 200);
}

async fn envoy_check(
    app: &TestApp,
    headers: &[(&str, &str)],
    claims: Option<Value>,
) -> CheckResponse {
    let mut client = AuthorizationClient::connect(app.grpc.clone())
        .await
        .unwrap();
    client
        .check(check(
            "GET",
            "/cliniccloud/patients/p-1/history",
            headers,
            "",
            claims,
        ))
        .await
        .expect("a CheckResponse")
        .into_inner()
}

fn denied(response: &CheckResponse) -> (i32, Value) {
    let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
        panic!("not denied: {response:?}")
    };
    (
        denied.status.as_ref().unwrap().code,
        serde_json::from_str(&denied.body).unwrap(),
    )
}

#[tokio::test]
async fn on_the_envoy_door_the_jwt_subject_is_the_caller() {
    let (app, _dir) = app_with_callers(&[]).await;
    let claims = |role: &str, sub: Option<&str>| {
        let mut c = json!({"casf_role": role, "casf_tenant_id": "t-1"});
        if let Some(sub) = sub {
            c["sub"] = json!(sub);
        }
        Some(c)
    };
    // Unknown subject, no subject, no JWT: 401, no decision.
    for claims in [claims("nurse", Some("user-x")), claims("nurse", None), None] {
        let answer = envoy_check(&app, &[("x-request-id", &fresh_id())], claims).await;
        assert_eq!(answer.status.as_ref().unwrap().code, 16, "UNAUTHENTICATED");
        let (status, body) = denied(&answer);
        assert_eq!(status, 401);
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("not authenticated")
        );
    }
    assert!(app.audit_rows().await.is_empty());
    assert_eq!(
        app.metric("casf_caller_rejected_total{door=\"ext_authz\",reason=\"unknown\"}")
            .await,
        2.0
    );
    assert_eq!(
        app.metric("casf_caller_rejected_total{door=\"ext_authz\",reason=\"missing\"}")
            .await,
        1.0
    );
    // The known subject, claiming a role it was not granted.
    let answer = envoy_check(
        &app,
        &[("x-request-id", &fresh_id())],
        claims("doctor", Some("user-nurse-1")),
    )
    .await;
    let (status, body) = denied(&answer);
    assert_eq!(status, 403);
    assert_eq!(body["violations"][0], "Caller_RoleNotGranted", "{body}");
    // Within its grants.
    let answer = envoy_check(
        &app,
        &[("x-request-id", &fresh_id())],
        claims("nurse", Some("user-nurse-1")),
    )
    .await;
    assert!(
        matches!(answer.http_response, Some(HttpResponse::OkResponse(_))),
        "{answer:?}"
    );
    let rows = app.audit_rows().await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| payload(r)["caller"] == "mesh-nurse"));
}

#[tokio::test]
async fn the_caller_is_in_the_postgres_audit_row() {
    let db = crate::pg::TestDb::migrated().await;
    let (app, _dir) = app_with_callers(&[("PG_DSN", &db.dsn)]).await;
    let denied = decide_as(
        &app,
        SCHED_KEY,
        &booking("doctor", "clinic-a", "cliniccloud.create_appointment"),
    )
    .await;
    assert_eq!(violations(&denied)[0], "Caller_RoleNotGranted");
    let rows = db.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(payload(&rows[0])["caller"], "scheduling-agent");
    assert_eq!(rows[0].actor, "role:doctor");
}
