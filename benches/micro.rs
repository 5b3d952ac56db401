//! Micro-benchmarks of the decision path's parts, each on its own (the
//! Envoy door's CheckRequest → tool call mapping included), plus one whole
//! pipeline decision on embedded backends. Run with `cargo bench`;
//! `cargo bench -- --test` (CI's smoke mode) runs each once without timing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use casf_verifier::audit::sqlite::SqliteAuditLog;
use casf_verifier::audit::writer::AuditWriter;
use casf_verifier::audit::{NewEvent, chain};
use casf_verifier::domain::VerifyRequest;
use casf_verifier::ext_authz::routes::RouteMap;
use casf_verifier::ext_authz::translate;
use casf_verifier::metrics::{Door, Metrics};
use casf_verifier::pipeline::{Pipeline, SmsLimit};
use casf_verifier::policy::embedded::EmbeddedPolicy;
use casf_verifier::state::memory::MemoryState;
use criterion::{Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use serde_json::{Value, json};

fn body(request_id: &str) -> Value {
    json!({
        "request_id": request_id,
        "tool": "cliniccloud.create_appointment",
        "mode": "ALLOW",
        "role": "receptionist",
        "subject": {"patient_id": "pat-001"},
        "args": {"slot": "2026-12-01T09:00", "duration_min": 30, "notes": "Zoë, first visit"},
        "context": {"tenant_id": "clinic-a", "agent": "scheduler-v2"}
    })
}

fn policy() -> EmbeddedPolicy {
    EmbeddedPolicy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
        .expect("policies load")
}

fn parse(c: &mut Criterion) {
    let raw = body("7d0c1a52-0001").to_string().into_bytes();
    c.bench_function("request parse and validate", |b| {
        b.iter(|| VerifyRequest::from_slice(std::hint::black_box(&raw)).expect("valid"))
    });
}

fn chain_hash(c: &mut Criterion) {
    let request = VerifyRequest::from_value(body("7d0c1a52-0001")).expect("valid");
    let event = NewEvent::now(
        "7d0c1a52-0001",
        "role:receptionist".into(),
        "cliniccloud.create_appointment",
        "ALLOW",
        json!({"request": request.to_value(), "response": {"decision": "ALLOW", "violations": [], "allowed_outputs": [], "reason": "OK"}}),
    );
    let prev = "a".repeat(64);
    c.bench_function("canonical JSON + chain hash", |b| {
        b.iter(|| chain::event_hash(std::hint::black_box(&event), &prev))
    });
    c.bench_function("request fingerprint", |b| {
        b.iter(|| std::hint::black_box(&request).fingerprint())
    });
}

fn policy_eval(c: &mut Criterion) {
    let engine = policy();
    let input = VerifyRequest::from_value(body("x"))
        .expect("valid")
        .policy_input();
    c.bench_function("policy evaluation (regorus)", |b| {
        b.iter(|| {
            engine
                .evaluate_sync(std::hint::black_box(&input))
                .expect("evaluates")
        })
    });
}

/// What Envoy's ext_authz filter sends for a `create_appointment` call at
/// the shipped front proxy (`envoy/envoy.yaml`): the request headers,
/// the body packed as bytes (`with_request_body`, `pack_as_bytes`), and
/// the jwt_authn claims in `metadata_context`.
fn envoy_check() -> CheckRequest {
    let body =
        br#"{"slot": "2026-12-01T09:00", "duration_min": 30, "notes": "Zo\u00eb, first visit"}"#;
    let string = |s: &str| PbValue {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let claims = Struct {
        fields: [
            ("iss", "https://idp.clinic.example"),
            ("sub", "agent-scheduler-v2"),
            ("aud", "casf-tools"),
            ("casf_role", "receptionist"),
            ("casf_tenant_id", "clinic-a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), string(v)))
        .collect(),
    };
    let jwt_authn = Struct {
        fields: [(
            "jwt_payload".to_owned(),
            PbValue {
                kind: Some(Kind::StructValue(claims)),
            },
        )]
        .into(),
    };
    let headers = [
        (":authority", "tools.clinic.local"),
        (":method", "POST"),
        (":path", "/cliniccloud/patients/pat-001/appointments"),
        (":scheme", "https"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("user-agent", "agent-runtime/1.4"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "5b0c3f4e-8a41-4f7e-9d7c-0e1f2a3b4c5d"),
        ("x-casf-request-id", "7d0c1a52-0001"),
    ];
    let mut headers: HashMap<String, String> = headers
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    headers.insert("content-length".into(), body.len().to_string());
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "1234567890".into(),
                    method: "POST".into(),
                    headers,
                    path: "/cliniccloud/patients/pat-001/appointments".into(),
                    host: "tools.clinic.local".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    size: body.len() as i64,
                    raw_body: body.to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            metadata_context: Some(Metadata {
                filter_metadata: [("envoy.filters.http.jwt_authn".to_owned(), jwt_authn)].into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn check_mapping(c: &mut Criterion) {
    let routes = RouteMap::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/routes.yaml"))
        .expect("the shipped route map loads");
    let check = envoy_check();
    let mapped = translate::tool_call_from(&routes, &check, true).expect("maps to a tool call");
    assert_eq!(mapped.to_value()["tool"], "cliniccloud.create_appointment");
    assert_eq!(mapped.to_value()["role"], "receptionist");
    c.bench_function("CheckRequest → tool call mapping", |b| {
        b.iter(|| {
            translate::tool_call_from(&routes, std::hint::black_box(&check), true).expect("maps")
        })
    });
}

fn pipeline(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = runtime.block_on(async {
        let log = Arc::new(
            SqliteAuditLog::open(&dir.path().join("bench.db"))
                .await
                .expect("sqlite"),
        );
        let (writer, _task) = AuditWriter::spawn(log).expect("audit writer starts");
        let state = Arc::new(MemoryState::new(
            Duration::from_secs(86_400),
            Duration::from_secs(30),
            casf_verifier::state::memory::DEFAULT_MAX_KEYS,
        ));
        Arc::new(Pipeline::new(
            Arc::new(policy()),
            Some(state.clone()),
            state,
            Some(writer),
            Arc::new(Metrics::new()),
            SmsLimit::default(),
        ))
    });
    let counter = AtomicU64::new(0);
    c.bench_function("pipeline decision (embedded, durable SQLite)", |b| {
        b.to_async(&runtime).iter(|| async {
            let id = format!("bench-{}", counter.fetch_add(1, Ordering::Relaxed));
            let request = VerifyRequest::from_value(body(&id)).expect("valid");
            pipeline.decide(request, Door::Http).await
        })
    });
}

criterion_group!(
    benches,
    parse,
    chain_hash,
    policy_eval,
    check_mapping,
    pipeline
);
criterion_main!(benches);
