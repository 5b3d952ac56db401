//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as
//! text or one JSON object a line (`CASF_LOG_FORMAT`) for log pipelines.
//! Stderr keeps stdout clean for the JSON that `audit digest` prints.
//!
//! Also the decision's span (so every log line about a decision carries its
//! `request_id`) and the optional decision log (`CASF_DECISION_LOG`), which
//! live here so that their fields, and what they leave out, are tested in
//! one place.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Directive;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::domain::VerifyRequest;
use crate::metrics::Door;
use crate::pipeline::Verdict;

/// The `tracing` target of the decision log: `CASF_DECISION_LOG` turns it
/// on or off whatever `RUST_LOG` says.
pub const DECISION_TARGET: &str = "casf_decision";

/// `CASF_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, the event's
    /// fields (`message` included) and the current `span`'s fields.
    Json,
}

impl LogFormat {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// The standard variables that turn OpenTelemetry on: with none of them
/// set there is no exporter and no OpenTelemetry layer.
pub const OTEL_VARIABLES: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
];

/// The service name when `OTEL_SERVICE_NAME` is unset.
const SERVICE_NAME: &str = "casf-verifier";

/// Whether OpenTelemetry is on: read once by [`init`], then by the doors'
/// parent extraction so that, when off, a `traceparent` costs nothing.
static OTEL_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether an `OTEL_*` variable of [`OTEL_VARIABLES`] is set (non-empty).
pub fn otel_requested() -> bool {
    OTEL_VARIABLES
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

/// The tracer provider, when OpenTelemetry is on: [`Tracing::shutdown`]
/// exports the spans still batched before the process exits.
#[must_use = "shut it down on exit, or batched spans are lost"]
#[derive(Default)]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Flushes and stops the exporter (a no-op when OpenTelemetry is off).
    /// Blocks: call it outside async code, with the runtime still alive.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.force_flush() {
                eprintln!("casf-verifier: flushing OpenTelemetry spans: {error}");
            }
            if let Err(error) = provider.shutdown() {
                eprintln!("casf-verifier: stopping the OpenTelemetry exporter: {error}");
            }
        }
    }
}

/// Installs the process's subscriber. A second call (tests) keeps the first.
///
/// With `otel` and an `OTEL_*` variable set, also an OTLP/gRPC exporter of
/// the spans (the OpenTelemetry SDK reads the endpoint, sampler and batch
/// settings from the standard variables). Its channel is spawned on the
/// current Tokio runtime, which must therefore be entered.
pub fn init(format: LogFormat, decision_log: bool, otel: bool) -> Tracing {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = match decision_directive(decision_log) {
        Some(directive) => filter.add_directive(directive),
        None => filter,
    };
    let (provider, otel_error) = if otel && otel_requested() {
        match tracer_provider() {
            Ok(provider) => (Some(provider), None),
            Err(error) => (None, Some(error)),
        }
    } else {
        (None, None)
    };
    let otel_layer = provider.as_ref().map(|provider| {
        // Only the verifier's own spans: not the exporter's (tonic, h2),
        // which would trace their own exports.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(SERVICE_NAME))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(env!("CARGO_CRATE_NAME"), tracing::Level::INFO),
            )
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // When stderr is gone (a closed pipe), a log line is lost; reporting
        // that with eprintln! would panic the task that logged instead.
        .log_internal_errors(false);
    let registry = tracing_subscriber::registry().with(otel_layer);
    let installed = match format {
        LogFormat::Text => registry
            .with(
                fmt.with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_filter(filter),
            )
            .try_init(),
    };
    if let Some(error) = otel_error {
        tracing::error!(%error, "OpenTelemetry exporter not started: spans are not exported");
    }
    if installed.is_err() {
        // Another subscriber was already installed: this provider is unused.
        if let Some(provider) = provider {
            let _ = provider.shutdown();
        }
        return Tracing::default();
    }
    if provider.is_some() {
        OTEL_ON.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("OpenTelemetry: exporting spans over OTLP/gRPC");
    }
    Tracing { provider }
}

fn tracer_provider() -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none_or(|name| name.is_empty()) {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Whether spans are exported: the doors look for a `traceparent` only then.
pub fn otel_on() -> bool {
    OTEL_ON.load(std::sync::atomic::Ordering::Relaxed)
}

/// Makes the W3C `traceparent` (and `tracestate`) the parent of `span`, so
/// the decision joins the caller's trace. Nothing when OpenTelemetry is off
/// or the header is absent or malformed.
pub fn set_parent(span: &tracing::Span, parent: Option<&TraceParent>) {
    let Some(parent) = parent else { return };
    if !otel_on() {
        return;
    }
    let context = TraceContextPropagator::new().extract(&parent.0);
    let _ = span.set_parent(context);
}

/// The W3C trace-context headers of a request (`traceparent`, and
/// `tracestate` if any), as the doors found them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceParent(std::collections::HashMap<String, String>);

impl TraceParent {
    /// From a header lookup by lower-case name; `None` without `traceparent`
    /// or when OpenTelemetry is off.
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Self> {
        if !otel_on() {
            return None;
        }
        let traceparent = get("traceparent")?;
        let mut headers = std::collections::HashMap::new();
        headers.insert("traceparent".to_owned(), traceparent.to_owned());
        if let Some(state) = get("tracestate") {
            headers.insert("tracestate".to_owned(), state.to_owned());
        }
        Some(TraceParent(headers))
    }
}

fn decision_directive(on: bool) -> Option<Directive> {
    let level = if on { "info" } else { "off" };
    format!("{DECISION_TARGET}={level}").parse().ok()
}

/// The span of one decision: every event logged inside it carries the
/// `request_id` (and the door) without repeating them as fields.
pub fn decision_span(request: &VerifyRequest, door: Door) -> tracing::Span {
    tracing::info_span!(
        "decision",
        request_id = %request.request_id,
        door = door.as_str()
    )
}

/// One line of the decision log, if `CASF_DECISION_LOG` is on: door, tool,
/// role, decision, violations, latency and audit hash. It never holds
/// `args`, `subject` or `context`, which carry patient data. Logged inside
/// [`decision_span`], it also carries the `request_id`.
pub fn decision_log(door: Door, request: &VerifyRequest, verdict: &Verdict, elapsed: Duration) {
    tracing::info!(
        target: DECISION_TARGET,
        door = door.as_str(),
        tool = request.tool.as_str(),
        role = request.role.as_str(),
        decision = verdict.response.decision.as_str(),
        violations = %verdict.response.violations.join(","),
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        audit_hash = verdict.audit.as_ref().map_or("", |receipt| receipt.hash.as_str()),
        "decision"
    );
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};

    use super::*;
    use crate::audit::AppendReceipt;
    use crate::domain::VerifyResponse;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn json_lines(decision_log: bool, emit: impl FnOnce()) -> Vec<Value> {
        let captured = Captured::default();
        let sink = captured.clone();
        let mut filter = EnvFilter::new("info");
        if let Some(directive) = decision_directive(decision_log) {
            filter = filter.add_directive(directive);
        }
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(move || sink.clone())
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn request() -> VerifyRequest {
        VerifyRequest::from_slice(
            json!({
                "request_id": "req-log-1",
                "tool": "twilio.send_sms",
                "mode": "ALLOW",
                "role": "receptionist",
                "subject": {"patient_id": "pat-SECRET-77"},
                "args": {"body": "ARGS-SECRET text"},
                "context": {"tenant_id": "clinic-a"}
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    fn verdict() -> Verdict {
        Verdict {
            response: VerifyResponse::from_violations(
                vec!["Mode_ReadOnly_NoWrite".into(), "OPA_Deny".into()],
                vec![],
            ),
            audit: Some(AppendReceipt {
                id: 7,
                hash: "ab12".into(),
            }),
            floor_applied: None,
            shadow: false,
        }
    }

    #[test]
    fn log_formats_parse_and_others_are_refused() {
        assert_eq!(LogFormat::parse("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("TEXT"), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse("yaml"), None);
    }

    #[test]
    fn the_decision_log_has_its_fields_and_nothing_about_the_patient() {
        let request = request();
        let lines = json_lines(true, || {
            let _span = decision_span(&request, Door::Http).entered();
            decision_log(
                Door::Http,
                &request,
                &verdict(),
                Duration::from_micros(1500),
            );
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line["target"], DECISION_TARGET);
        assert_eq!(line["door"], "http");
        assert_eq!(line["tool"], "twilio.send_sms");
        assert_eq!(line["role"], "receptionist");
        assert_eq!(line["decision"], "DENY");
        assert_eq!(line["violations"], "Mode_ReadOnly_NoWrite,OPA_Deny");
        assert_eq!(line["latency_ms"], 1.5);
        assert_eq!(line["audit_hash"], "ab12");
        assert_eq!(line["span"]["request_id"], "req-log-1");
        let text = line.to_string();
        for leak in [
            "pat-SECRET-77",
            "ARGS-SECRET",
            "clinic-a",
            "subject",
            "args",
        ] {
            assert!(!text.contains(leak), "{leak} in {text}");
        }
    }

    #[test]
    fn the_decision_log_is_off_by_default() {
        let request = request();
        let lines = json_lines(false, || {
            decision_log(Door::ExtAuthz, &request, &verdict(), Duration::ZERO);
        });
        assert!(lines.is_empty(), "{lines:?}");
    }

    #[test]
    fn events_inside_the_decision_span_carry_the_request_id() {
        let request = request();
        let lines = json_lines(false, || {
            let _span = decision_span(&request, Door::ExtAuthz).entered();
            tracing::warn!("policy unavailable");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["span"]["request_id"], "req-log-1");
        assert_eq!(lines[0]["span"]["door"], "ext_authz");
        assert_eq!(lines[0]["message"], "policy unavailable");
    }
}
