//! The gRPC door through a real socket: ext_authz Check on the same pipeline
//! as `/verify`, gRPC health, server reflection and graceful shutdown. The
//! CheckRequests are built as Envoy builds them; tests/envoy runs the same
//! door behind a real Envoy.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use futures::StreamExt;
use prost::Message;
use serde_json::{Value, json};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::helpers::{TestApp, fresh_id, metric_value, spawn_app, spawn_app_with};
use crate::servers::{OpaServer, wait_until};

const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 3;
const PERMISSION_DENIED: i32 = 7;

/// A Check as Envoy sends it, with jwt_authn claims in metadata_context
/// (the shipped routes.yaml trusts no identity headers).
pub(crate) fn check(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    claims: Option<Value>,
) -> CheckRequest {
    fn pb(value: Value) -> PbValue {
        let kind = match value {
            Value::String(s) => Kind::StringValue(s),
            Value::Object(map) => Kind::StructValue(Struct {
                fields: map.into_iter().map(|(k, v)| (k, pb(v))).collect(),
            }),
            other => panic!("unsupported claim {other}"),
        };
        PbValue { kind: Some(kind) }
    }
    let metadata_context = claims.map(|claims| {
        let Some(Kind::StructValue(ns)) = pb(json!({"jwt_payload": claims})).kind else {
            unreachable!()
        };
        Metadata {
            filter_metadata: HashMap::from([("envoy.filters.http.jwt_authn".to_owned(), ns)]),
            ..Default::default()
        }
    });
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    raw_body: body.as_bytes().to_vec(),
                    size: body.len() as i64,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            metadata_context,
            ..Default::default()
        }),
    }
}

pub(crate) fn nurse() -> Option<Value> {
    Some(json!({"casf_role": "nurse", "casf_tenant_id": "t-1", "sub": "u-1"}))
}

async fn channel(app: &TestApp) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(app.grpc.clone())
        .expect("gRPC URL")
        .connect()
        .await
        .expect("connect to the gRPC listener")
}

async fn call(app: &TestApp, request: CheckRequest) -> CheckResponse {
    let mut client = AuthorizationClient::connect(app.grpc.clone())
        .await
        .expect("connect to the gRPC door");
    client
        .check(request)
        .await
        .expect("a CheckResponse, never a bare gRPC error")
        .into_inner()
}

fn code(response: &CheckResponse) -> i32 {
    response.status.as_ref().expect("status is always set").code
}

/// The denied response's HTTP status and JSON body.
fn denied(response: &CheckResponse) -> (i32, Value) {
    let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
        panic!("not a denied response: {response:?}")
    };
    let ct = denied
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == "content-type")
        .expect("content-type");
    assert_eq!(ct.value, "application/json");
    (
        denied.status.as_ref().expect("HTTP status").code,
        serde_json::from_str(&denied.body).expect("JSON body"),
    )
}

fn meta(response: &CheckResponse, key: &str) -> Value {
    let value = response
        .dynamic_metadata
        .as_ref()
        .expect("dynamic_metadata on every response")
        .fields
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in dynamic_metadata"));
    match value.kind.as_ref() {
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::ListValue(list)) => Value::Array(
            list.values
                .iter()
                .map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => json!(s),
                    other => panic!("unexpected {other:?}"),
                })
                .collect(),
        ),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn an_allowed_check_goes_upstream_with_the_decision_headers_and_audit_hash() {
    let app = spawn_app().await;
    let id = fresh_id();
    let response = call(
        &app,
        check(
            "POST",
            "/cliniccloud/patients/p-1/appointments?slot=2026-12-01T09%3A00",
            &[("x-request-id", &id), ("x-casf-role", "doctor")],
            r#"{"room": "3"}"#,
            nurse(),
        ),
    )
    .await;
    assert_eq!(code(&response), OK, "{response:?}");
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("not ok: {response:?}")
    };
    let headers: HashMap<&str, &str> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(headers["x-casf-decision"], "ALLOW");
    assert_eq!(headers["x-casf-request-id"], id);
    assert!(
        ok.headers_to_remove.contains(&"x-casf-role".to_owned())
            && ok
                .headers_to_remove
                .contains(&"x-casf-tenant-id".to_owned()),
        "{:?}",
        ok.headers_to_remove
    );

    let rows = app.audit_rows().await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(meta(&response, "audit_hash"), json!(row.hash));
    assert_eq!(meta(&response, "decision"), "ALLOW");
    assert_eq!(meta(&response, "request_id"), json!(id));
    assert_eq!(meta(&response, "violations"), json!([]));
    // The claims, not the client's x-casf-role, made the identity.
    assert_eq!(row.actor, "role:nurse");
    assert_eq!(row.action, "cliniccloud.create_appointment");
    let payload: Value = serde_json::from_str(&row.payload).unwrap();
    assert_eq!(
        payload["request"],
        json!({
            "request_id": id,
            "tool": "cliniccloud.create_appointment",
            "mode": "ALLOW",
            "role": "nurse",
            "subject": {"patient_id": "p-1"},
            "args": {"slot": "2026-12-01T09:00", "room": "3"},
            "context": {"tenant_id": "t-1"},
        })
    );
}

#[tokio::test]
async fn both_doors_share_the_chain_the_replay_state_and_the_guide_metrics() {
    let mut app = spawn_app().await;
    let id = fresh_id();
    let body = json!({
        "request_id": id,
        "tool": "cliniccloud.summary_history",
        "mode": "ALLOW",
        "role": "nurse",
        "subject": {"patient_id": "p-7"},
        "args": {},
        "context": {"tenant_id": "t-1"},
    });
    let by_http = app.decide(&body).await;
    let envoy_call =
        |path: &str, id: &str| check("GET", path, &[("x-casf-request-id", id)], "", nurse());
    // The same call through Envoy with the same id is a replay of it...
    let replay = call(&app, envoy_call("/cliniccloud/patients/p-7/history", &id)).await;
    assert_eq!(code(&replay), OK);
    assert_eq!(by_http["decision"], "ALLOW");
    // ...and the same id for another patient is a mismatch, whichever door.
    let mismatch = call(&app, envoy_call("/cliniccloud/patients/p-8/history", &id)).await;
    assert_eq!(code(&mismatch), PERMISSION_DENIED);
    assert_eq!(
        denied(&mismatch),
        (
            403,
            json!({"decision": "DENY", "violations": ["Inv_ReplayPayloadMismatch"], "allowed_outputs": [], "reason": "denied: Inv_ReplayPayloadMismatch"})
        )
    );
    let fresh = call(
        &app,
        envoy_call("/cliniccloud/patients/p-9/history", &fresh_id()),
    )
    .await;
    assert_eq!(code(&fresh), OK);

    let rows = app.audit_rows().await;
    assert_eq!(rows.len(), 4, "one row per decision, whichever door");
    let shape = |payload: &str| -> Vec<String> {
        let v: Value = serde_json::from_str(payload).unwrap();
        let mut keys: Vec<String> = v["request"].as_object().unwrap().keys().cloned().collect();
        keys.extend(v["response"].as_object().unwrap().keys().cloned());
        keys.sort();
        keys
    };
    for row in &rows {
        assert_eq!(shape(&row.payload), shape(&rows[0].payload));
        assert_eq!(row.actor, "role:nurse");
    }
    assert_eq!(
        [rows[1].action.as_str(), rows[2].action.as_str()],
        ["REPLAY_DETECTED", "REPLAY_DETECTED"]
    );
    assert_eq!(rows[3].action, "cliniccloud.summary_history");

    let (_, text) = app.get("/metrics").await;
    assert_eq!(metric_value(&text, "casf_verify_total"), 4.0);
    assert_eq!(metric_value(&text, "casf_replay_hit_total"), 1.0);
    assert_eq!(metric_value(&text, "casf_replay_mismatch_total"), 1.0);
    assert_eq!(
        metric_value(&text, "casf_verify_decision_total{decision=\"DENY\"}"),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            "casf_door_decision_total{door=\"ext_authz\",decision=\"ALLOW\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            "casf_door_decision_total{door=\"http\",decision=\"ALLOW\"}"
        ),
        1.0
    );

    app.shutdown().await;
    let verify = app.audit_cli(&["verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[tokio::test]
async fn denials_bad_requests_and_unmapped_routes_are_explicit() {
    let app = spawn_app().await;
    // A write in READ_ONLY: the /verify body, 403.
    let deny = call(
        &app,
        check(
            "POST",
            "/stripe/patients/p-1/invoices",
            &[("x-request-id", &fresh_id()), ("x-casf-mode", "READ_ONLY")],
            r#"{"amount": 120}"#,
            nurse(),
        ),
    )
    .await;
    assert_eq!(code(&deny), PERMISSION_DENIED);
    let (status, body) = denied(&deny);
    assert_eq!(status, 403);
    assert_eq!(
        body,
        json!({"decision": "DENY", "violations": ["Mode_ReadOnly_NoWrite"], "allowed_outputs": [], "reason": "denied: Mode_ReadOnly_NoWrite"})
    );
    assert_eq!(meta(&deny, "violations"), json!(["Mode_ReadOnly_NoWrite"]));
    let rows = app.audit_rows().await;
    assert_eq!(meta(&deny, "audit_hash"), json!(rows[0].hash));

    // A body that is not JSON: 400 naming the field, no decision, no row.
    let bad = call(
        &app,
        check(
            "POST",
            "/twilio/patients/p-1/sms",
            &[("x-request-id", &fresh_id())],
            "text=hi",
            nurse(),
        ),
    )
    .await;
    assert_eq!(code(&bad), INVALID_ARGUMENT);
    let (status, body) = denied(&bad);
    assert_eq!((status, body["field"].as_str()), (400, Some("body")));
    assert_eq!(meta(&bad, "decision"), "DENY");
    assert_eq!(meta(&bad, "audit_hash"), Value::Null);

    // An unknown mode is a schema failure, as on /verify.
    let bad_mode = call(
        &app,
        check(
            "GET",
            "/cliniccloud/patients/p-1/history",
            &[("x-request-id", &fresh_id()), ("x-casf-mode", "PANIC")],
            "",
            nurse(),
        ),
    )
    .await;
    assert_eq!(denied(&bad_mode).1["field"], "mode");

    // No route: denied with Route_Unmapped.
    let unmapped = call(
        &app,
        check(
            "GET",
            "/admin/export",
            &[("x-request-id", &fresh_id())],
            "",
            nurse(),
        ),
    )
    .await;
    assert_eq!(code(&unmapped), PERMISSION_DENIED);
    let (status, body) = denied(&unmapped);
    assert_eq!(status, 403);
    assert_eq!(body["violations"], json!(["Route_Unmapped"]));
    assert_eq!(meta(&unmapped, "violations"), json!(["Route_Unmapped"]));

    assert_eq!(
        app.audit_rows().await.len(),
        1,
        "only the decision is audited"
    );
    let (_, text) = app.get("/metrics").await;
    for (series, expected) in [
        ("casf_verify_total", 1.0),
        (
            "casf_door_rejected_total{door=\"ext_authz\",reason=\"bad_request\"}",
            2.0,
        ),
        (
            "casf_door_rejected_total{door=\"ext_authz\",reason=\"unmapped\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric_value(&text, series), expected, "{series}");
    }
}

async fn health(app: &TestApp, service: &str) -> Result<i32, tonic::Code> {
    let mut client = HealthClient::new(channel(app).await);
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

#[tokio::test]
async fn grpc_health_matches_healthz_and_knows_its_services() {
    let app = spawn_app().await;
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(health(&app, "").await, Ok(ServingStatus::Serving as i32));
    assert_eq!(
        health(&app, "envoy.service.auth.v3.Authorization").await,
        Ok(ServingStatus::Serving as i32)
    );
    assert_eq!(
        health(&app, "no.such.Service").await,
        Err(tonic::Code::NotFound)
    );
}

/// The services a prober may ask about, and how long a status may take to follow.
const HEALTH_SERVICES: [&str; 2] = ["", "envoy.service.auth.v3.Authorization"];
const HEALTH_DEADLINE: Duration = Duration::from_secs(20);

async fn all_services_are(app: &TestApp, status: ServingStatus) -> bool {
    for service in HEALTH_SERVICES {
        if health(app, service).await != Ok(status as i32) {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn grpc_health_is_not_serving_while_a_dependency_is_down_and_serving_once_it_is_back() {
    let mut opa = OpaServer::start().await;
    let url = opa.url();
    let app = spawn_app_with(&[("OPA_URL", url.as_str())]).await;
    assert_eq!(app.get("/healthz").await.0, 200);
    assert!(all_services_are(&app, ServingStatus::Serving).await);

    opa.stop();
    wait_until(
        HEALTH_DEADLINE,
        "gRPC health NOT_SERVING with OPA down",
        || all_services_are(&app, ServingStatus::NotServing),
    )
    .await;
    // The same dependency, seen through /healthz at the same time.
    let (status, body) = app.get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    let detail: Value = serde_json::from_str(&body).expect("JSON /healthz body");
    assert!(
        detail["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("opa: ")),
        "{body}"
    );
    // Still down: the status does not flap back on its own.
    assert!(all_services_are(&app, ServingStatus::NotServing).await);
    assert_eq!(
        health(&app, "no.such.Service").await,
        Err(tonic::Code::NotFound)
    );

    opa.restart().await;
    wait_until(HEALTH_DEADLINE, "gRPC health SERVING with OPA back", || {
        all_services_are(&app, ServingStatus::Serving)
    })
    .await;
    assert_eq!(app.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn shutdown_turns_health_to_not_serving_and_ends_open_watches() {
    let mut app = spawn_app().await;
    let mut client = HealthClient::new(channel(&app).await);
    let mut watch = client
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    // An open Watch must not hold the shutdown up.
    tokio::time::timeout(Duration::from_secs(10), app.shutdown())
        .await
        .expect("graceful shutdown with an open Watch");
    let last = watch.next().await.unwrap().unwrap();
    assert_eq!(last.status, ServingStatus::NotServing as i32);
    assert!(watch.next().await.is_none(), "the Watch ends");
}

async fn reflect(
    client: &mut ServerReflectionClient<tonic::transport::Channel>,
    request: MessageRequest,
) -> MessageResponse {
    let outbound = futures::stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut inbound = client
        .server_reflection_info(outbound)
        .await
        .unwrap()
        .into_inner();
    inbound
        .next()
        .await
        .expect("a reflection answer")
        .unwrap()
        .message_response
        .expect("message_response")
}

#[tokio::test]
async fn reflection_lists_the_services_and_resolves_every_file_they_need() {
    let app = spawn_app().await;
    let mut client = ServerReflectionClient::new(channel(&app).await);
    let MessageResponse::ListServicesResponse(list) =
        reflect(&mut client, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list")
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }

    // What `grpcurl describe` does: the file defining the service, then
    // every file it imports, by name, until nothing is missing.
    let MessageResponse::FileDescriptorResponse(files) = reflect(
        &mut client,
        MessageRequest::FileContainingSymbol("envoy.service.auth.v3.Authorization".into()),
    )
    .await
    else {
        panic!("no file for the service")
    };
    let root =
        prost_types::FileDescriptorProto::decode(&files.file_descriptor_proto[0][..]).unwrap();
    let service = &root.service[0];
    assert_eq!(service.name(), "Authorization");
    assert_eq!(service.method[0].name(), "Check");
    assert_eq!(
        service.method[0].input_type(),
        ".envoy.service.auth.v3.CheckRequest"
    );
    let mut pending = root.dependency.clone();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(name) = pending.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let MessageResponse::FileDescriptorResponse(found) =
            reflect(&mut client, MessageRequest::FileByFilename(name.clone())).await
        else {
            panic!("{name} cannot be resolved")
        };
        let file =
            prost_types::FileDescriptorProto::decode(&found.file_descriptor_proto[0][..]).unwrap();
        pending.extend(file.dependency);
    }
    assert!(seen.contains("envoy/service/auth/v3/attribute_context.proto"));
    assert!(seen.contains("google/rpc/status.proto"));
}

#[tokio::test]
async fn ambiguous_checks_are_bad_requests_like_on_verify() {
    let app = spawn_app().await;
    let big = format!(r#"{{"amount": 1, "memo": "{}"}}"#, "x".repeat(64 * 1024));
    let cases = [
        (
            "/stripe/patients/p-1/invoices",
            r#"{"amount": 1, "amount": 2}"#.to_owned(),
            "body.amount",
        ),
        ("/stripe/patients/p-1/invoices", big, "body"),
        (
            "/stripe/patients/%2e%2e/invoices",
            r#"{"amount": 1}"#.to_owned(),
            "path.patient_id",
        ),
        (
            "/stripe/patients/p%2F1/invoices",
            r#"{"amount": 1}"#.to_owned(),
            "path.patient_id",
        ),
        (
            "/stripe/patients/p-1%E2%80%8B/invoices",
            r#"{"amount": 1}"#.to_owned(),
            "subject.patient_id",
        ),
    ];
    for (path, body, field) in cases {
        let response = call(
            &app,
            check(
                "POST",
                path,
                &[("x-request-id", &fresh_id())],
                &body,
                nurse(),
            ),
        )
        .await;
        assert_eq!(code(&response), INVALID_ARGUMENT, "{path}");
        let (status, error) = denied(&response);
        assert_eq!(
            (status, error["field"].as_str()),
            (400, Some(field)),
            "{path}: {error}"
        );
    }
    assert!(app.audit_rows().await.is_empty(), "nothing was decided");

    // Integers that differ beyond a double are two payloads on this door too.
    let id = fresh_id();
    let invoice = |amount: &str| {
        check(
            "POST",
            "/stripe/patients/p-1/invoices",
            &[("x-request-id", &id)],
            &format!(r#"{{"amount": {amount}}}"#),
            nurse(),
        )
    };
    call(&app, invoice("123456789012345678901234567890")).await;
    let changed = call(&app, invoice("123456789012345678901234567891")).await;
    assert_eq!(
        meta(&changed, "violations"),
        json!(["Inv_ReplayPayloadMismatch"])
    );
}

/// The operator's floor holds on the Envoy door too: a caller's mode header
/// cannot lower it, and the answer says which mode applied.
#[tokio::test]
async fn the_mode_floor_holds_whatever_mode_header_the_caller_sends() {
    let app = spawn_app_with(&[("CASF_MODE_FLOOR", "READ_ONLY")]).await;
    let write = check(
        "POST",
        "/cliniccloud/patients/p-1/appointments",
        &[("x-request-id", &fresh_id()), ("x-casf-mode", "ALLOW")],
        r#"{"slot": "2026-12-01T09:00"}"#,
        nurse(),
    );
    let response = call(&app, write).await;
    let (status, body) = denied(&response);
    assert_eq!(status, 403);
    assert_eq!(body["violations"], json!(["Mode_ReadOnly_NoWrite"]));
    let Some(HttpResponse::DeniedResponse(answer)) = &response.http_response else {
        unreachable!()
    };
    let applied = answer
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == "x-casf-mode-applied")
        .expect("the mode that applied");
    assert_eq!(applied.value, "READ_ONLY");

    // A read still goes through, under the floor's mode.
    let read = check(
        "GET",
        "/cliniccloud/patients/p-1/appointments",
        &[("x-request-id", &fresh_id()), ("x-casf-mode", "ALLOW")],
        "",
        nurse(),
    );
    let response = call(&app, read).await;
    assert_eq!(code(&response), OK);
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("not allowed: {response:?}")
    };
    let upstream: HashMap<&str, &str> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(upstream["x-casf-mode-applied"], "READ_ONLY");
    assert_eq!(upstream["x-casf-allowed-outputs"], "slots_aggregated");
}
