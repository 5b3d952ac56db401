//! The load: a fixed rate of `POST /verify` requests of known kinds, so an
//! oracle can tell afterwards what each answer was allowed to be. The mix is
//! a seeded sequence (the same kinds in the same order on every run); what
//! each request meets depends on timing, and is recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};

/// Requests in flight at most; past it the offered rate drops.
const MAX_IN_FLIGHT: usize = 256;

/// What a request is, and so what its answer may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A read the policy allows.
    Read,
    /// A write the policy allows (mode ALLOW, tenant present).
    Write,
    /// A write in READ_ONLY or KILL_SWITCH: the invariants deny it.
    WriteInDenyingMode,
    /// A write with no `context.tenant_id`: the policy denies it.
    WriteWithoutTenant,
    /// A read under KILL_SWITCH: the invariants deny it.
    ReadInKillSwitch,
    /// An SMS to a patient never messaged before in this run.
    SmsFirst,
    /// Another SMS, under a new request_id, to a patient already messaged.
    SmsAgain,
    /// An earlier answered request, resent byte for byte.
    Replay,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Read,
        Kind::Write,
        Kind::WriteInDenyingMode,
        Kind::WriteWithoutTenant,
        Kind::ReadInKillSwitch,
        Kind::SmsFirst,
        Kind::SmsAgain,
        Kind::Replay,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write (allowed by policy)",
            Kind::WriteInDenyingMode => "write in READ_ONLY / KILL_SWITCH",
            Kind::WriteWithoutTenant => "write without tenant_id",
            Kind::ReadInKillSwitch => "read in KILL_SWITCH",
            Kind::SmsFirst => "SMS to a new patient",
            Kind::SmsAgain => "SMS again to the same patient",
            Kind::Replay => "replay of an answered request",
        }
    }

    /// Out of 100 requests.
    fn weight(self) -> u64 {
        match self {
            Kind::Read => 30,
            Kind::Write => 25,
            Kind::WriteInDenyingMode => 7,
            Kind::WriteWithoutTenant => 5,
            Kind::ReadInKillSwitch => 3,
            Kind::SmsFirst => 8,
            Kind::SmsAgain => 7,
            Kind::Replay => 15,
        }
    }
}

/// How a request ended, as the client saw it.
#[derive(Clone, Debug)]
pub enum Answer {
    /// HTTP 200 with a decision.
    Decided {
        decision: String,
        violations: Vec<String>,
        reason: String,
    },
    /// Any other HTTP answer.
    Status { status: u16, body: String },
    /// No HTTP answer: refused, reset or timed out.
    Failed { error: String, connect: bool },
}

#[derive(Clone, Debug)]
pub struct Record {
    pub seq: usize,
    pub kind: Kind,
    pub body: Value,
    /// Seconds since the load started.
    pub sent_at: f64,
    pub answered_at: f64,
    pub answer: Answer,
}

impl Record {
    pub fn request_id(&self) -> &str {
        self.body["request_id"].as_str().unwrap_or_default()
    }

    pub fn decision(&self) -> Option<&str> {
        match &self.answer {
            Answer::Decided { decision, .. } => Some(decision),
            _ => None,
        }
    }

    pub fn tool(&self) -> &str {
        self.body["tool"].as_str().unwrap_or_default()
    }

    pub fn is_write(&self) -> bool {
        !matches!(
            self.tool(),
            "cliniccloud.list_appointments" | "cliniccloud.summary_history"
        )
    }

    pub fn failed_closed(&self) -> bool {
        matches!(&self.answer, Answer::Decided { violations, .. } if violations.iter().any(|v| v == "FAIL_CLOSED"))
    }

    pub fn audit_failed(&self) -> bool {
        matches!(&self.answer, Answer::Decided { reason, .. } if reason.ends_with("| audit_append_failed"))
    }
}

/// splitmix64: a fixed, seeded sequence with no dependency.
struct Seq(u64);

impl Seq {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn kind(&mut self) -> Kind {
        let mut roll = self.below(100);
        for kind in Kind::ALL {
            if roll < kind.weight() {
                return kind;
            }
            roll -= kind.weight();
        }
        unreachable!("weights add up to 100")
    }
}

const READS: [&str; 2] = [
    "cliniccloud.list_appointments",
    "cliniccloud.summary_history",
];
const WRITES: [&str; 3] = [
    "cliniccloud.create_appointment",
    "cliniccloud.cancel_appointment",
    "stripe.generate_invoice",
];

fn body(run: &str, seq: usize, tool: &str, mode: &str, patient: &str, tenant: bool) -> Value {
    json!({
        "request_id": format!("chaos-{run}-{seq}"),
        "tool": tool,
        "mode": mode,
        "role": "nurse",
        "subject": {"patient_id": patient},
        "args": {"seq": seq, "note": "chaos"},
        "context": if tenant { json!({"tenant_id": "t-chaos"}) } else { json!({}) },
    })
}

/// Answered requests that a replay may resend.
#[derive(Default)]
struct Answered(Vec<Value>);

/// Offers `rate` requests a second for `length`, then waits for every
/// request still in flight (each bounded by the client's timeout).
pub async fn run(
    t0: Instant,
    client: &reqwest::Client,
    base: &str,
    rate: u32,
    length: Duration,
) -> Vec<Record> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let url = format!("{base}/verify");
    let answered = Arc::new(Mutex::new(Answered::default()));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut seq_rng = Seq(0x00C0_FFEE);
    let mut sms_patients: Vec<String> = Vec::new();
    let mut tasks = Vec::new();
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0usize;
    while t0.elapsed() < length {
        ticks.tick().await;
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("semaphore open");
        let mut kind = seq_rng.kind();
        let patient = format!("p-{run}-{seq}");
        let body = match kind {
            Kind::Read => body(&run, seq, READS[seq % 2], "ALLOW", &patient, true),
            Kind::Write => body(&run, seq, WRITES[seq % 3], "ALLOW", &patient, true),
            Kind::WriteInDenyingMode => {
                let mode = if seq.is_multiple_of(2) {
                    "READ_ONLY"
                } else {
                    "KILL_SWITCH"
                };
                body(&run, seq, WRITES[seq % 3], mode, &patient, true)
            }
            Kind::WriteWithoutTenant => body(&run, seq, WRITES[seq % 3], "ALLOW", &patient, false),
            Kind::ReadInKillSwitch => {
                body(&run, seq, READS[seq % 2], "KILL_SWITCH", &patient, true)
            }
            Kind::SmsFirst => {
                sms_patients.push(patient.clone());
                body(&run, seq, "twilio.send_sms", "ALLOW", &patient, true)
            }
            Kind::SmsAgain if !sms_patients.is_empty() => {
                let i = seq_rng.below(sms_patients.len() as u64) as usize;
                body(
                    &run,
                    seq,
                    "twilio.send_sms",
                    "ALLOW",
                    &sms_patients[i],
                    true,
                )
            }
            Kind::Replay => {
                let answered = answered.lock().await;
                if answered.0.is_empty() {
                    kind = Kind::Read;
                    body(&run, seq, READS[0], "ALLOW", &patient, true)
                } else {
                    let i = seq_rng.below(answered.0.len() as u64) as usize;
                    answered.0[i].clone()
                }
            }
            Kind::SmsAgain => {
                kind = Kind::SmsFirst;
                sms_patients.push(patient.clone());
                body(&run, seq, "twilio.send_sms", "ALLOW", &patient, true)
            }
        };
        let client = client.clone();
        let url = url.clone();
        let answered = Arc::clone(&answered);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let sent_at = t0.elapsed().as_secs_f64();
            let answer = send(&client, &url, &body).await;
            let answered_at = t0.elapsed().as_secs_f64();
            if matches!(answer, Answer::Decided { .. }) && kind != Kind::Replay {
                answered.lock().await.0.push(body.clone());
            }
            Record {
                seq,
                kind,
                body,
                sent_at,
                answered_at,
                answer,
            }
        }));
        seq += 1;
    }
    let mut records = Vec::with_capacity(tasks.len());
    for task in tasks {
        records.push(task.await.expect("request task"));
    }
    records
}

async fn send(client: &reqwest::Client, url: &str, body: &Value) -> Answer {
    let response = match client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
    {
        Ok(response) => response,
        Err(error) => {
            return Answer::Failed {
                connect: error.is_connect(),
                error: error.to_string(),
            };
        }
    };
    let status = response.status().as_u16();
    let text = match response.text().await {
        Ok(text) => text,
        Err(error) => {
            return Answer::Failed {
                connect: false,
                error: error.to_string(),
            };
        }
    };
    let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    match (status, json["decision"].as_str()) {
        (200, Some(decision)) => Answer::Decided {
            decision: decision.to_owned(),
            violations: json["violations"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            reason: json["reason"].as_str().unwrap_or_default().to_owned(),
        },
        _ => Answer::Status { status, body: text },
    }
}
