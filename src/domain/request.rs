//! `POST /verify` request body, parsed rather than validated.
//!
//! Every door (HTTP JSON, Envoy `CheckRequest`) ends in [`VerifyRequest::from_value`],
//! so a malformed call is rejected the same way whichever way it came in.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::strict_json::{JsonError, NumberAsSent};

/// Largest accepted request body, on every door.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest accepted `request_id`, in characters.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// Deepest nesting accepted inside `args` and `context` (the object itself
/// is level 1). The audit payload wraps the request two levels deeper, and
/// must stay well inside what a JSON reader accepts when verifying the chain.
pub const MAX_DEPTH: usize = 64;

/// Why U+0000 is refused: PostgreSQL text and JSONB cannot hold it, and a
/// decision that cannot be audited must not be made.
const NUL_REASON: &str = "contains U+0000, which the audit trail cannot store";

const FIELDS: [&str; 7] = [
    "request_id",
    "tool",
    "mode",
    "role",
    "subject",
    "args",
    "context",
];

/// Why a request body is not a tool call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Schema failure: answered with 422 and the field's name.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A tool that is about a patient came without one: answered with 400.
    #[error("subject.patient_id required")]
    MissingPatientId,
}

impl RequestError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        RequestError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// HTTP status a door answers with.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Invalid { .. } => 422,
            RequestError::MissingPatientId => 400,
        }
    }

    /// The JSON error body: `detail` always, plus `field` and `reason` for schema failures.
    pub fn body(&self) -> Value {
        match self {
            RequestError::Invalid { field, reason } => {
                json!({"detail": self.to_string(), "field": field, "reason": reason})
            }
            RequestError::MissingPatientId => json!({"detail": self.to_string()}),
        }
    }

    /// The field at fault.
    pub fn field(&self) -> &str {
        match self {
            RequestError::Invalid { field, .. } => field,
            RequestError::MissingPatientId => "subject.patient_id",
        }
    }
}

/// Idempotency key: 1..=128 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    pub fn parse(raw: &str) -> Result<Self, RequestError> {
        let chars = raw.chars().count();
        if chars == 0 || chars > MAX_REQUEST_ID_CHARS {
            return Err(RequestError::invalid(
                "request_id",
                format!("must be 1..={MAX_REQUEST_ID_CHARS} characters, got {chars}"),
            ));
        }
        if raw.contains('\0') {
            return Err(RequestError::invalid("request_id", NUL_REASON));
        }
        check_identifier("request_id", raw)?;
        Ok(RequestId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Declares a closed string enum with its wire names.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident, $field:literal { $($variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }

            pub fn parse(raw: &str) -> Result<Self, RequestError> {
                match raw {
                    $($wire => Ok($name::$variant),)+
                    other => Err(RequestError::invalid(
                        $field,
                        format!("unknown value {other:?}, expected one of: {}", [$($wire),+].join(", ")),
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum!(
    /// The six clinic tools the verifier knows.
    Tool, "tool" {
        CreateAppointment => "cliniccloud.create_appointment",
        CancelAppointment => "cliniccloud.cancel_appointment",
        SendSms => "twilio.send_sms",
        GenerateInvoice => "stripe.generate_invoice",
        ListAppointments => "cliniccloud.list_appointments",
        SummaryHistory => "cliniccloud.summary_history",
    }
);

impl Tool {
    /// Writes fail closed and are barred in READ_ONLY and KILL_SWITCH.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Tool::CreateAppointment
                | Tool::CancelAppointment
                | Tool::SendSms
                | Tool::GenerateInvoice
        )
    }

    /// Every tool in the contract is about one patient.
    pub fn needs_patient_id(self) -> bool {
        true
    }
}

wire_enum!(
    /// Operational mode set by the caller's control plane.
    Mode, "mode" {
        Allow => "ALLOW",
        StepUp => "STEP_UP",
        ReadOnly => "READ_ONLY",
        KillSwitch => "KILL_SWITCH",
    }
);

wire_enum!(
    /// The caller's role.
    Role, "role" {
        Receptionist => "receptionist",
        Nurse => "nurse",
        Doctor => "doctor",
        Billing => "billing",
        Custodian => "custodian",
        System => "system",
    }
);

/// One tool call the agent wants to make.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyRequest {
    pub request_id: RequestId,
    pub tool: Tool,
    pub mode: Mode,
    pub role: Role,
    pub subject: BTreeMap<String, String>,
    pub args: Map<String, Value>,
    pub context: Map<String, Value>,
    /// Numbers whose text a double does not give back, as `(path from the
    /// body's root, text as sent)`; empty for most requests. The fingerprint
    /// writes them as sent, so two amounts that differ beyond a double's
    /// precision are two payloads.
    numbers_as_sent: Vec<(Vec<Value>, String)>,
    /// Who sent it, as the door authenticated them (`CASF_CALLERS`); not
    /// part of the body. `None` when callers are not configured.
    pub caller: Option<std::sync::Arc<crate::callers::Caller>>,
}

impl VerifyRequest {
    /// Parses a raw JSON body: a key given twice anywhere is refused, and
    /// numbers are fingerprinted as sent (see [`crate::strict_json`]).
    pub fn from_slice(body: &[u8]) -> Result<Self, RequestError> {
        let parsed = crate::strict_json::parse(body).map_err(|e| match e {
            JsonError::Malformed(_) => RequestError::invalid("body", e.to_string()),
            JsonError::DuplicateKey { path } => RequestError::invalid(path, "duplicate key"),
        })?;
        Ok(Self::from_value(parsed.value)?.with_numbers_as_sent(&[], parsed.numbers))
    }

    /// Adds numbers kept as sent by [`crate::strict_json::parse`] of the JSON
    /// found at `under` (e.g. `["args"]` for an Envoy request body).
    pub fn with_numbers_as_sent(mut self, under: &[&str], numbers: Vec<NumberAsSent>) -> Self {
        for number in numbers {
            let path: Vec<Value> = under
                .iter()
                .map(|step| Value::from(*step))
                .chain(number.path)
                .collect();
            self.numbers_as_sent.push((path, number.text));
        }
        self
    }

    /// Parses a JSON value; the single entry point for every door.
    pub fn from_value(value: Value) -> Result<Self, RequestError> {
        let Value::Object(mut body) = value else {
            return Err(RequestError::invalid("body", "must be a JSON object"));
        };
        let mut unknown: Vec<&String> = body
            .keys()
            .filter(|k| !FIELDS.contains(&k.as_str()))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(RequestError::invalid(unknown[0].as_str(), "unknown field"));
        }
        let mut take = |field: &'static str| {
            body.remove(field)
                .ok_or_else(|| RequestError::invalid(field, "field required"))
        };
        let request_id = RequestId::parse(&expect_string(take("request_id")?, "request_id")?)?;
        let tool = Tool::parse(&expect_string(take("tool")?, "tool")?)?;
        let mode = Mode::parse(&expect_string(take("mode")?, "mode")?)?;
        let role = Role::parse(&expect_string(take("role")?, "role")?)?;
        let subject = parse_subject(take("subject")?)?;
        let args = expect_object(take("args")?, "args")?;
        check_storable(&args, "args", 1)?;
        let context = expect_object(take("context")?, "context")?;
        check_storable(&context, "context", 1)?;
        if let Some(Value::String(tenant)) = context.get("tenant_id") {
            check_identifier("context.tenant_id", tenant)?;
        }

        let has_patient = subject.get("patient_id").is_some_and(|p| !p.is_empty());
        if tool.needs_patient_id() && !has_patient {
            return Err(RequestError::MissingPatientId);
        }
        Ok(VerifyRequest {
            request_id,
            tool,
            mode,
            role,
            subject,
            args,
            context,
            numbers_as_sent: Vec::new(),
            caller: None,
        })
    }

    /// The request as sent by `caller`.
    pub fn with_caller(mut self, caller: std::sync::Arc<crate::callers::Caller>) -> Self {
        self.caller = Some(caller);
        self
    }

    /// The authenticated caller's name, if callers are configured.
    pub fn caller_name(&self) -> Option<&str> {
        self.caller.as_ref().map(|c| c.name.as_str())
    }

    pub fn patient_id(&self) -> Option<&str> {
        self.subject.get("patient_id").map(String::as_str)
    }

    /// The policy input, which is also the body without `request_id`:
    /// the fingerprint covers exactly what the policy decides on.
    pub fn policy_input(&self) -> Value {
        json!({
            "tool": self.tool.as_str(),
            "mode": self.mode.as_str(),
            "role": self.role.as_str(),
            "subject": self.subject,
            "args": self.args,
            "context": self.context,
        })
    }

    /// The whole request as received, for the audit payload.
    pub fn to_value(&self) -> Value {
        self.completed(self.policy_input())
    }

    /// The whole request, from its [`policy_input`](Self::policy_input)
    /// (which lacks only `request_id`) without copying it again.
    pub fn completed(&self, mut value: Value) -> Value {
        if let Value::Object(map) = &mut value {
            map.insert(
                "request_id".into(),
                Value::String(self.request_id.as_str().to_owned()),
            );
        }
        value
    }

    /// SHA-256 of the canonical body without `request_id` (guide §7).
    pub fn fingerprint(&self) -> String {
        self.fingerprint_of(&self.policy_input())
    }

    /// [`fingerprint`](Self::fingerprint) from an already built
    /// [`policy_input`](Self::policy_input).
    pub fn fingerprint_of(&self, input: &Value) -> String {
        if self.numbers_as_sent.is_empty() {
            return crate::canonical::sha256_hex(input);
        }
        let text = crate::canonical::to_string_with_numbers(input, &self.numbers_as_sent);
        hex::encode(Sha256::digest(text.as_bytes()))
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn expect_string(value: Value, field: &str) -> Result<String, RequestError> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(RequestError::invalid(
            field,
            format!("expected string, got {}", type_name(&other)),
        )),
    }
}

fn expect_object(value: Value, field: &str) -> Result<Map<String, Value>, RequestError> {
    match value {
        Value::Object(map) => Ok(map),
        other => Err(RequestError::invalid(
            field,
            format!("expected object, got {}", type_name(&other)),
        )),
    }
}

fn parse_subject(value: Value) -> Result<BTreeMap<String, String>, RequestError> {
    let subject = expect_object(value, "subject")?;
    check_storable(&subject, "subject", 1)?;
    subject
        .into_iter()
        .map(|(key, value)| {
            let field = format!("subject.{key}");
            let value = expect_string(value, &field)?;
            if key == "patient_id" {
                check_identifier(&field, &value)?;
            }
            Ok((key, value))
        })
        .collect()
}

/// Refuses an identifier that could name one thing two ways: leading or
/// trailing whitespace, control characters, or Unicode format characters
/// (zero-width spaces and joiners, BOM, bidi controls). Otherwise `pat-X`,
/// `pat-X ` and `pat\u{200B}-X` would be three patients to the SMS limit.
/// Look-alike letters and dashes (e.g. U+2010 HYPHEN) are not format
/// characters and are left alone: that is a confusables problem, not this.
fn check_identifier(field: &str, value: &str) -> Result<(), RequestError> {
    if value.trim() != value {
        return Err(RequestError::invalid(
            field,
            "has leading or trailing whitespace",
        ));
    }
    match value.chars().find(|&c| c.is_control() || is_format(c)) {
        Some(c) => Err(RequestError::invalid(
            field,
            format!(
                "contains U+{:04X}, a control or format character",
                u32::from(c)
            ),
        )),
        None => Ok(()),
    }
}

/// Unicode general category Cf (format), as of Unicode 15.1.
fn is_format(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Refuses what the audit trail could not store or read back: U+0000 in a
/// key or string, and nesting deeper than [`MAX_DEPTH`]. `depth` is the
/// level of `map` itself; errors name the path, e.g. `args.lines[2].name`.
/// The path is only built for an error: the walk itself allocates nothing.
fn check_storable(map: &Map<String, Value>, path: &str, depth: usize) -> Result<(), RequestError> {
    unstorable_in_map(map, depth).map_or(Ok(()), |found| {
        let mut field = path.to_owned();
        for step in found.steps.iter().rev() {
            match step {
                Step::Key(key) => {
                    field.push('.');
                    field.push_str(key);
                }
                Step::Index(i) => field.push_str(&format!("[{i}]")),
            }
        }
        Err(RequestError::invalid(field, found.reason))
    })
}

enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// What [`check_storable`] found, with the path to it innermost first.
struct Unstorable<'a> {
    steps: Vec<Step<'a>>,
    reason: String,
}

impl<'a> Unstorable<'a> {
    fn new(reason: impl Into<String>) -> Self {
        Unstorable {
            steps: Vec::new(),
            reason: reason.into(),
        }
    }

    fn under(mut self, step: Step<'a>) -> Self {
        self.steps.push(step);
        self
    }
}

fn too_deep<'a>() -> Unstorable<'a> {
    Unstorable::new(format!("nested deeper than {MAX_DEPTH} levels"))
}

fn unstorable_in_map(map: &Map<String, Value>, depth: usize) -> Option<Unstorable<'_>> {
    if depth > MAX_DEPTH {
        return Some(too_deep());
    }
    map.iter().find_map(|(key, value)| {
        if key.contains('\0') {
            return Some(Unstorable::new(format!("a key {NUL_REASON}")));
        }
        unstorable(value, depth + 1).map(|found| found.under(Step::Key(key)))
    })
}

fn unstorable(value: &Value, depth: usize) -> Option<Unstorable<'_>> {
    match value {
        Value::String(s) if s.contains('\0') => Some(Unstorable::new(NUL_REASON)),
        Value::Object(map) => unstorable_in_map(map, depth),
        Value::Array(_) if depth > MAX_DEPTH => Some(too_deep()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            unstorable(item, depth + 1).map(|found| found.under(Step::Index(i)))
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Value {
        json!({
            "request_id": "r-1",
            "tool": "twilio.send_sms",
            "mode": "ALLOW",
            "role": "nurse",
            "subject": {"patient_id": "p-1"},
            "args": {"text": "hi"},
            "context": {"tenant_id": "t-1"}
        })
    }

    fn field_of(result: Result<VerifyRequest, RequestError>) -> String {
        result.unwrap_err().field().to_owned()
    }

    #[test]
    fn parses_a_valid_body() {
        let req = VerifyRequest::from_value(body()).unwrap();
        assert_eq!(req.tool, Tool::SendSms);
        assert_eq!(req.patient_id(), Some("p-1"));
        assert_eq!(req.to_value(), body());
    }

    #[test]
    fn names_the_field_at_fault() {
        let mut b = body();
        b["mode"] = json!("PANIC");
        assert_eq!(field_of(VerifyRequest::from_value(b)), "mode");
        let mut b = body();
        b.as_object_mut().unwrap().remove("role");
        assert_eq!(field_of(VerifyRequest::from_value(b)), "role");
        let mut b = body();
        b["extra"] = json!(1);
        assert_eq!(field_of(VerifyRequest::from_value(b)), "extra");
        let mut b = body();
        b["subject"] = json!({"patient_id": 7});
        assert_eq!(field_of(VerifyRequest::from_value(b)), "subject.patient_id");
        let mut b = body();
        b["request_id"] = json!("x".repeat(129));
        assert_eq!(field_of(VerifyRequest::from_value(b)), "request_id");
        assert_eq!(field_of(VerifyRequest::from_slice(b"{nope")), "body");
    }

    #[test]
    fn nul_characters_are_refused_naming_the_path() {
        let cases = [
            ("args", json!({"a": [1, {"b": "x\u{0}"}]}), "args.a[1].b"),
            ("args", json!({"k\u{0}": 1}), "args"),
            (
                "context",
                json!({"tenant_id": "\u{0}"}),
                "context.tenant_id",
            ),
            (
                "subject",
                json!({"patient_id": "p\u{0}"}),
                "subject.patient_id",
            ),
            ("request_id", json!("r\u{0}"), "request_id"),
        ];
        for (field, value, path) in cases {
            let mut b = body();
            b[field] = value;
            let err = VerifyRequest::from_value(b).unwrap_err();
            assert_eq!(err.field(), path);
            assert_eq!(err.status(), 422);
        }
    }

    #[test]
    fn nesting_is_bounded() {
        fn nested(levels: usize) -> Value {
            (1..levels).fold(json!({}), |inner, _| json!({ "n": inner }))
        }
        let mut b = body();
        b["args"] = nested(MAX_DEPTH);
        assert!(VerifyRequest::from_value(b).is_ok());
        let mut b = body();
        b["args"] = nested(MAX_DEPTH + 1);
        let err = VerifyRequest::from_value(b).unwrap_err();
        assert!(err.field().starts_with("args.n.n"), "{err}");
        let mut b = body();
        b["context"] = json!({"deep": (0..MAX_DEPTH).fold(json!(1), |inner, _| json!([inner]))});
        assert!(VerifyRequest::from_value(b).is_err());
    }

    #[test]
    fn identifiers_are_spelled_one_way() {
        let spellings = [
            " p-1",
            "p-1 ",
            "p-1\t",
            "p\u{200B}-1",
            "p\u{200D}1",
            "\u{FEFF}p-1",
            "p\u{2060}1",
            "p\u{202E}1",
            "p\u{7}1",
            "p\u{85}1",
        ];
        for bad in spellings {
            for (field, path) in [
                ("request_id", "request_id"),
                ("subject", "subject.patient_id"),
                ("context", "context.tenant_id"),
            ] {
                let mut b = body();
                match field {
                    "subject" => b["subject"] = json!({"patient_id": bad}),
                    "context" => b["context"] = json!({"tenant_id": bad}),
                    _ => b[field] = json!(bad),
                }
                let err = VerifyRequest::from_value(b).unwrap_err();
                assert_eq!(
                    (err.field(), err.status()),
                    (path, 422),
                    "{bad:?} in {field}"
                );
            }
        }
        // Inner spaces and look-alike dashes are not format characters.
        for fine in ["p 1", "p\u{2010}1", "Zoë-東京"] {
            let mut b = body();
            b["subject"] = json!({"patient_id": fine});
            b["request_id"] = json!(fine);
            b["context"] = json!({"tenant_id": fine});
            assert!(VerifyRequest::from_value(b).is_ok(), "{fine:?}");
        }
    }

    #[test]
    fn a_key_twice_is_a_422_naming_it() {
        let err =
            VerifyRequest::from_slice(br#"{"request_id":"r","mode":"KILL_SWITCH","mode":"ALLOW"}"#)
                .unwrap_err();
        assert_eq!((err.field(), err.status()), ("mode", 422));
        assert_eq!(err.body()["reason"], "duplicate key");
    }

    #[test]
    fn numbers_beyond_a_double_fingerprint_as_sent() {
        let with_amount = |amount: &str| {
            let text = body().to_string().replace(
                r#""text":"hi""#,
                &format!(r#""text":"hi","amount":{amount}"#),
            );
            VerifyRequest::from_slice(text.as_bytes()).unwrap()
        };
        let a = with_amount("123456789012345678901234567890");
        let b = with_amount("123456789012345678901234567891");
        // Equal as doubles, and so in the audit payload, but two payloads.
        assert_eq!(a.policy_input(), b.policy_input());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(
            a.fingerprint(),
            with_amount("123456789012345678901234567890").fingerprint()
        );
        // The canonical JSON of the body with the integer as sent, which is
        // what a client with exact integers (Python's json) computes.
        let parsed = crate::canonical::to_string(&a.policy_input());
        let as_sent = parsed.replace("1.2345678901234568e+29", "123456789012345678901234567890");
        assert_ne!(as_sent, parsed);
        assert_eq!(
            a.fingerprint(),
            hex::encode(Sha256::digest(as_sent.as_bytes()))
        );
        // Ordinary bodies fingerprint exactly as before.
        let plain = VerifyRequest::from_slice(body().to_string().as_bytes()).unwrap();
        assert_eq!(
            plain.fingerprint(),
            crate::canonical::sha256_hex(&plain.policy_input())
        );
        assert_eq!(with_amount("12.5").fingerprint(), {
            let r = with_amount("12.5");
            crate::canonical::sha256_hex(&r.policy_input())
        });
    }

    #[test]
    fn missing_patient_is_a_400() {
        let mut b = body();
        b["subject"] = json!({});
        let err = VerifyRequest::from_value(b).unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(err.body(), json!({"detail": "subject.patient_id required"}));
    }

    #[test]
    fn fingerprint_ignores_request_id_and_key_order() {
        let a = VerifyRequest::from_value(body()).unwrap();
        let mut b = body();
        b["request_id"] = json!("r-2");
        let b = VerifyRequest::from_value(b).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut c = body();
        c["args"] = json!({"text": "other"});
        assert_ne!(
            a.fingerprint(),
            VerifyRequest::from_value(c).unwrap().fingerprint()
        );
    }
}
