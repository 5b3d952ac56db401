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

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Directive;

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

/// Installs the process's subscriber. A second call (tests) keeps the first.
pub fn init(format: LogFormat, decision_log: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = match decision_directive(decision_log) {
        Some(directive) => filter.add_directive(directive),
        None => filter,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When stderr is gone (a closed pipe), a log line is lost; reporting
        // that with eprintln! would panic the task that logged instead.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
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
