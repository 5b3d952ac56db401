//! The tool calls a run sends, independent of the door they go through, so
//! that every door carries the same calls and rows compare across doors.
//!
//! Ids and patients are unique per request so that neither the anti-replay
//! gate nor the SMS limit short-circuits the work, except where the mix asks
//! for replays and bursts on purpose.

use std::sync::atomic::{AtomicU64, Ordering};

use clap::ValueEnum;
use serde_json::{Map, Value, json};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Scenario {
    /// `list_appointments` in ALLOW mode.
    ReadAllow,
    /// `create_appointment` in ALLOW mode, unique patient each time.
    WriteAllow,
    /// `generate_invoice` in READ_ONLY mode.
    Deny,
    /// Reads, writes, denials, replays and SMS (some to the same patient).
    Mix,
}

/// The tools the workload uses, with their HTTP form from `envoy/routes.yaml`
/// (what a tool service behind Envoy is called with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    ListAppointments,
    CreateAppointment,
    GenerateInvoice,
    SendSms,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::ListAppointments => "cliniccloud.list_appointments",
            Tool::CreateAppointment => "cliniccloud.create_appointment",
            Tool::GenerateInvoice => "stripe.generate_invoice",
            Tool::SendSms => "twilio.send_sms",
        }
    }

    pub fn method(self) -> &'static str {
        match self {
            Tool::ListAppointments => "GET",
            _ => "POST",
        }
    }

    /// The route's path for `patient` (a loadgen patient id needs no escaping).
    pub fn path(self, patient: &str) -> String {
        match self {
            Tool::ListAppointments | Tool::CreateAppointment => {
                format!("/cliniccloud/patients/{patient}/appointments")
            }
            Tool::GenerateInvoice => format!("/stripe/patients/{patient}/invoices"),
            Tool::SendSms => format!("/twilio/patients/{patient}/sms"),
        }
    }

    /// Reads carry their arguments in the query, writes in a JSON body.
    pub fn args_in_query(self) -> bool {
        self == Tool::ListAppointments
    }
}

/// One tool call, as the caller means it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub request_id: String,
    pub tool: Tool,
    pub mode: &'static str,
    pub role: &'static str,
    pub tenant: &'static str,
    pub patient: String,
    /// String values only for query-borne arguments, so that every door
    /// hands the verifier the same `args`.
    pub args: Map<String, Value>,
}

impl ToolCall {
    /// The `POST /verify` body.
    pub fn verify_body(&self) -> Value {
        json!({
            "request_id": self.request_id,
            "tool": self.tool.name(),
            "mode": self.mode,
            "role": self.role,
            "subject": {"patient_id": self.patient},
            "args": self.args,
            "context": {"tenant_id": self.tenant}
        })
    }

    /// Path and query, as the first line of the HTTP request has them.
    pub fn target(&self) -> String {
        let path = self.tool.path(&self.patient);
        if !self.tool.args_in_query() || self.args.is_empty() {
            return path;
        }
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &self.args {
            match value {
                Value::String(s) => query.append_pair(name, s),
                other => query.append_pair(name, &other.to_string()),
            };
        }
        format!("{path}?{}", query.finish())
    }

    /// The JSON body of a write; reads have none.
    pub fn http_body(&self) -> Option<Vec<u8>> {
        (!self.tool.args_in_query()).then(|| Value::Object(self.args.clone()).to_string().into())
    }
}

pub struct Workload {
    scenario: Scenario,
    run: String,
    next: AtomicU64,
}

impl Workload {
    pub fn new(scenario: Scenario) -> Self {
        Workload {
            scenario,
            run: uuid::Uuid::new_v4().to_string(),
            next: AtomicU64::new(0),
        }
    }

    pub fn next_call(&self) -> ToolCall {
        self.call(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// The `n`th call of the run, the same every time it is asked for.
    pub fn call(&self, n: u64) -> ToolCall {
        let make = |tool: Tool, mode: &'static str, patient: String| {
            let args = match tool {
                Tool::ListAppointments => json!({"day": "2026-12-01"}),
                Tool::CreateAppointment => json!({"slot": "2026-12-01T09:00", "duration_min": 30}),
                Tool::GenerateInvoice => json!({"amount": 120, "currency": "EUR"}),
                Tool::SendSms => json!({"text": "Reminder: your appointment is tomorrow at 09:00"}),
            };
            let Value::Object(args) = args else {
                unreachable!("every args literal above is an object")
            };
            ToolCall {
                request_id: format!("{}-{n}", self.run),
                tool,
                mode,
                role: "receptionist",
                tenant: "clinic-a",
                patient,
                args,
            }
        };
        let scenario = match self.scenario {
            Scenario::Mix => match n % 20 {
                0..=9 => Scenario::ReadAllow,
                10..=14 => Scenario::WriteAllow,
                15..=16 => Scenario::Deny,
                // A replay of an earlier write: same id, same payload.
                17 => return self.call(n - 7),
                // SMS: of each pair, the second goes to the patient the
                // first just messaged, and the burst limit denies it.
                _ => return make(Tool::SendSms, "ALLOW", format!("p-sms-{}", n / 2)),
            },
            other => other,
        };
        let patient = format!("p-{n}");
        match scenario {
            Scenario::ReadAllow => make(Tool::ListAppointments, "ALLOW", patient),
            Scenario::WriteAllow => make(Tool::CreateAppointment, "ALLOW", patient),
            _ => make(Tool::GenerateInvoice, "READ_ONLY", patient),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_replays_an_earlier_write_and_pairs_sms_to_one_patient() {
        let w = Workload::new(Scenario::Mix);
        assert_eq!(w.call(37), w.call(30));
        assert_eq!(w.call(30).tool, Tool::CreateAppointment);
        assert_eq!(w.call(38).patient, w.call(39).patient);
        assert_ne!(w.call(38).request_id, w.call(39).request_id);
        assert_eq!(w.call(15).mode, "READ_ONLY");
    }

    #[test]
    fn reads_carry_args_in_the_query_and_writes_in_the_body() {
        let w = Workload::new(Scenario::Mix);
        let read = w.call(1);
        assert_eq!(
            read.target(),
            "/cliniccloud/patients/p-1/appointments?day=2026-12-01"
        );
        assert_eq!(read.http_body(), None);
        let write = w.call(10);
        assert_eq!(write.target(), "/cliniccloud/patients/p-10/appointments");
        let body: Value = serde_json::from_slice(&write.http_body().unwrap()).unwrap();
        assert_eq!(body, write.verify_body()["args"]);
    }
}
