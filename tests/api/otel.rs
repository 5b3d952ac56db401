//! OpenTelemetry: the real binary exports its decision spans over OTLP/gRPC
//! to a receiver, as children of the caller's W3C `traceparent`, on both
//! doors.

use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;

use crate::ext_authz::{check, nurse};
use crate::operator::serve_with_json_logs;
use crate::otlp_receiver::OtlpReceiver;

const STAGES: [&str; 4] = ["replay_claim", "policy", "rate_limit", "audit_commit"];

/// A fresh W3C trace context: (header, trace id, parent span id), hex.
fn traceparent() -> (String, String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (format!("00-{trace_id}-{span_id}-01"), trace_id, span_id)
}

/// The decision span of `trace_id` and its stage children, once all are in.
fn decision_of<'a>(
    spans: &'a [(String, Span)],
    trace_id: &str,
) -> Option<(&'a Span, Vec<&'a Span>)> {
    let in_trace: Vec<&Span> = spans
        .iter()
        .map(|(_, span)| span)
        .filter(|span| hex::encode(&span.trace_id) == trace_id)
        .collect();
    let decision = in_trace.iter().find(|span| span.name == "decision")?;
    let stages: Vec<&Span> = in_trace
        .iter()
        .copied()
        .filter(|span| STAGES.contains(&span.name.as_str()))
        .collect();
    (stages.len() == STAGES.len()).then_some((*decision, stages))
}

fn assert_joined(spans: &[(String, Span)], trace_id: &str, parent_id: &str) {
    let (decision, stages) = decision_of(spans, trace_id).unwrap();
    assert_eq!(hex::encode(&decision.parent_span_id), parent_id);
    for stage in stages {
        assert_eq!(stage.parent_span_id, decision.span_id, "{}", stage.name);
    }
    let service = &spans
        .iter()
        .find(|(_, span)| span.span_id == decision.span_id)
        .unwrap()
        .0;
    assert!(service.contains("casf-otel-test"), "{service}");
}

#[tokio::test]
async fn decisions_are_exported_as_children_of_the_callers_traceparent() {
    let receiver = OtlpReceiver::start().await;
    let endpoint = receiver.endpoint();
    let (mut child, logs, _dir) = serve_with_json_logs(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "casf-otel-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ]);
    let ready = logs.next_matching(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("casf-verifier ready"))
    });
    let http = ready["http"].as_str().unwrap().to_owned();
    let grpc = ready["grpc"].as_str().unwrap().to_owned();

    // The HTTP door: the traceparent header of POST /verify.
    let (header, trace_id, parent_id) = traceparent();
    let response = casf_verifier::tls::http_client_builder()
        .build()
        .unwrap()
        .post(format!("http://{http}/verify"))
        .header("traceparent", &header)
        .json(&json!({
            "request_id": format!("otel-{}", uuid::Uuid::new_v4()),
            "tool": "twilio.send_sms", "mode": "ALLOW", "role": "nurse",
            "subject": {"patient_id": "pat-otel"}, "args": {"text": "hi"},
            "context": {"tenant_id": "clinic-a"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["decision"], "ALLOW", "{body}");
    let spans = receiver
        .wait_for(Duration::from_secs(30), |spans| {
            decision_of(spans, &trace_id).is_some()
        })
        .await;
    assert_joined(&spans, &trace_id, &parent_id);

    // The ext_authz door: the traceparent among the Check's HTTP headers.
    let (header, trace_id, parent_id) = traceparent();
    let id = format!("otel-{}", uuid::Uuid::new_v4());
    let mut client = AuthorizationClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    client
        .check(check(
            "POST",
            "/cliniccloud/patients/p-1/appointments?slot=2026-12-01T09%3A00",
            &[("x-request-id", &id), ("traceparent", &header)],
            r#"{"room": "3"}"#,
            nurse(),
        ))
        .await
        .unwrap();
    let spans = receiver
        .wait_for(Duration::from_secs(30), |spans| {
            spans
                .iter()
                .any(|(_, span)| span.name == "decision" && hex::encode(&span.trace_id) == trace_id)
        })
        .await;
    let decision = spans
        .iter()
        .map(|(_, span)| span)
        .find(|span| span.name == "decision" && hex::encode(&span.trace_id) == trace_id)
        .unwrap();
    assert_eq!(hex::encode(&decision.parent_span_id), parent_id);
    for stage in ["replay_claim", "policy", "audit_commit"] {
        let stage_span = receiver
            .wait_for(Duration::from_secs(30), |spans| {
                spans
                    .iter()
                    .any(|(_, span)| span.name == stage && span.parent_span_id == decision.span_id)
            })
            .await;
        drop(stage_span);
    }

    let _ = child.kill();
    let _ = child.wait();
}

/// Spans still batched when SIGTERM comes are exported before the process
/// exits: with a one-minute batch delay, only the shutdown flush sends them.
#[tokio::test]
async fn sigterm_flushes_the_spans_still_batched() {
    let receiver = OtlpReceiver::start().await;
    let endpoint = receiver.endpoint();
    let (mut child, logs, _dir) = serve_with_json_logs(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
    ]);
    let ready = logs.next_matching(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("casf-verifier ready"))
    });
    let http = ready["http"].as_str().unwrap().to_owned();
    let (header, trace_id, _) = traceparent();
    let response = casf_verifier::tls::http_client_builder()
        .build()
        .unwrap()
        .post(format!("http://{http}/verify"))
        .header("traceparent", &header)
        .json(&json!({
            "request_id": format!("otel-{}", uuid::Uuid::new_v4()),
            "tool": "cliniccloud.list_appointments", "mode": "ALLOW", "role": "nurse",
            "subject": {"patient_id": "pat-otel"}, "args": {},
            "context": {"tenant_id": "clinic-a"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        receiver.spans().is_empty(),
        "exported before the batch delay"
    );
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let spans = receiver.spans();
    assert!(
        spans.iter().any(|(service, span)| span.name == "decision"
            && hex::encode(&span.trace_id) == trace_id
            && service.contains("casf-verifier")),
        "{:?}",
        spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
    );
}
