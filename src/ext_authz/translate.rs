//! From an Envoy `CheckRequest` to a tool call.
//!
//! This builds the same JSON body a `/verify` caller would send and parses it
//! with [`VerifyRequest::from_value`], so both doors accept and reject
//! exactly the same calls. Only the route map decides what a field means;
//! nothing here decides whether the call may run.

use std::collections::HashMap;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use serde_json::{Map, Value, json};

use super::routes::RouteMap;
use crate::domain::{MAX_BODY_BYTES, RequestError, VerifyRequest};
use crate::strict_json::{self, JsonError, NumberAsSent, Parsed};

/// Set by Envoy when `with_request_body` cut the body at `max_request_bytes`.
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";
/// Where `request_id` comes from, first present wins.
pub const REQUEST_ID_HEADERS: [&str; 3] = ["x-casf-request-id", "idempotency-key", "x-request-id"];

/// Why a Check is not a tool call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// No route maps the call: denied with `Route_Unmapped`.
    #[error("no route for {method} {path}")]
    Unmapped { method: String, path: String },
    /// The call maps to a tool but is malformed: a bad request.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The tool call it maps to fails the `/verify` schema: a bad request.
    #[error(transparent)]
    Request(#[from] RequestError),
}

impl CheckError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CheckError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CheckError::Unmapped { .. } => "unmapped",
            CheckError::Invalid { .. } | CheckError::Request(_) => "bad_request",
        }
    }

    /// The field at fault, for bad requests.
    pub fn field(&self) -> &str {
        match self {
            CheckError::Unmapped { .. } => "path",
            CheckError::Invalid { field, .. } => field,
            CheckError::Request(error) => error.field(),
        }
    }

    /// The JSON error body of a bad request: `detail` and `field` always.
    pub fn body(&self) -> Value {
        match self {
            CheckError::Request(RequestError::Invalid { field, reason })
            | CheckError::Invalid { field, reason } => {
                json!({"detail": self.to_string(), "field": field, "reason": reason})
            }
            _ => json!({"detail": self.to_string(), "field": self.field()}),
        }
    }
}

/// The client request's headers, lower-cased names, repeated ones joined by
/// `,` (as Envoy does), whichever of the two encodings Envoy used.
pub fn headers(http: &HttpRequest) -> HashMap<String, String> {
    if !http.headers.is_empty() {
        return http.headers.clone();
    }
    let mut joined: HashMap<String, String> = HashMap::new();
    for header in http.header_map.iter().flat_map(|map| &map.headers) {
        let value = if header.raw_value.is_empty() {
            header.value.clone()
        } else {
            String::from_utf8_lossy(&header.raw_value).into_owned()
        };
        joined
            .entry(header.key.to_ascii_lowercase())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    joined
}

/// The W3C trace context of the client request (`traceparent`), if any and
/// if spans are exported.
pub fn trace_parent(check: &CheckRequest) -> Option<crate::telemetry::TraceParent> {
    if !crate::telemetry::otel_on() {
        return None;
    }
    let http = check.attributes.as_ref()?.request.as_ref()?.http.as_ref()?;
    let headers = headers(http);
    crate::telemetry::TraceParent::from_headers(|name| headers.get(name).map(String::as_str))
}

/// The request id Envoy's caller chose, if any.
pub fn request_id(headers: &HashMap<String, String>) -> Option<&str> {
    REQUEST_ID_HEADERS.iter().find_map(|name| {
        headers
            .get(*name)
            .map(String::as_str)
            .filter(|id| !id.is_empty())
    })
}

/// [`tool_call_from`] a peer that may assert identities.
#[cfg(test)]
pub fn tool_call(routes: &RouteMap, check: &CheckRequest) -> Result<VerifyRequest, CheckError> {
    tool_call_from(routes, check, true)
}

/// Maps a Check to the tool call it stands for. `peer_authenticated` says
/// whether the peer that sent it may assert identities: when it is false,
/// JWT claims and trusted headers are ignored, so the call has no role and
/// is refused as a bad request, as one without identity is.
pub fn tool_call_from(
    routes: &RouteMap,
    check: &CheckRequest,
    peer_authenticated: bool,
) -> Result<VerifyRequest, CheckError> {
    let attributes = check.attributes.as_ref();
    let http = attributes
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .ok_or_else(|| {
            CheckError::invalid(
                "attributes.request.http",
                "missing; only HTTP requests are checked",
            )
        })?;
    let headers = headers(http);
    let (path, query) = split_target(&http.path);
    let route = routes
        .resolve(&http.method, path)
        .map_err(|e| CheckError::invalid(format!("path.{}", e.name), e.to_string()))?
        .ok_or_else(|| CheckError::Unmapped {
            method: http.method.clone(),
            path: path.to_owned(),
        })?;

    let mut subject = Map::new();
    let mut args = Args::default();
    for (name, value) in route.params {
        if routes.is_subject_key(&name) {
            subject.insert(name, Value::String(value));
        } else {
            args.insert(name, Value::String(value))?;
        }
    }
    for (name, value) in query_params(query) {
        args.insert(name, value)?;
    }
    let mut numbers_as_sent = Vec::new();
    if let Some((body, numbers)) = json_body(http, &headers)? {
        for (name, value) in body {
            args.insert(name, value)?;
        }
        numbers_as_sent = numbers;
    }

    let claims = attributes
        .filter(|_| peer_authenticated)
        .and_then(|a| a.metadata_context.as_ref())
        .and_then(|m| {
            m.filter_metadata
                .get(&routes.identity.jwt.metadata_namespace)
        })
        .and_then(|ns| struct_field(ns, &routes.identity.jwt.payload_key));
    let trusted = &routes.identity.headers;
    let identity = |claim: &str, header: &str, field: &str| -> Result<Option<String>, CheckError> {
        if let Some(value) = claims.and_then(|c| c.fields.get(claim)) {
            return match &value.kind {
                Some(Kind::StringValue(s)) => Ok(Some(s.clone())),
                _ => Err(CheckError::invalid(
                    field,
                    format!("JWT claim {claim} is not a string"),
                )),
            };
        }
        Ok((trusted.trusted && peer_authenticated)
            .then(|| headers.get(header).cloned())
            .flatten())
    };
    let role = identity(&routes.identity.jwt.role_claim, &trusted.role, "role")?;
    let tenant = identity(
        &routes.identity.jwt.tenant_claim,
        &trusted.tenant_id,
        "context.tenant_id",
    )?;
    let Some(role) = role else {
        if !peer_authenticated {
            return Err(CheckError::invalid(
                "role",
                "identity is taken only from an authenticated peer (a client certificate \
                 verified against CASF_TLS_CLIENT_CA, or loopback); this peer is neither",
            ));
        }
        let headers_note = if trusted.trusted {
            format!(" nor a {} header", trusted.role)
        } else {
            format!(" ({} is not trusted by the route map)", trusted.role)
        };
        return Err(CheckError::invalid(
            "role",
            format!(
                "no verified JWT claim {}{headers_note}",
                routes.identity.jwt.role_claim
            ),
        ));
    };
    let mut context = Map::new();
    if let Some(tenant) = tenant {
        context.insert("tenant_id".into(), Value::String(tenant));
    }
    let mode = headers
        .get(&routes.mode.header)
        .cloned()
        .unwrap_or_else(|| routes.mode.default.as_str().to_owned());
    let Some(request_id) = request_id(&headers) else {
        return Err(CheckError::invalid(
            "request_id",
            format!(
                "none of the headers {} is set",
                REQUEST_ID_HEADERS.join(", ")
            ),
        ));
    };

    let request = VerifyRequest::from_value(json!({
        "request_id": request_id,
        "tool": route.tool.as_str(),
        "mode": mode,
        "role": role,
        "subject": subject,
        "args": args.0,
        "context": context,
    }))?;
    // The body's keys are `args`, so its numbers are found under `args`.
    Ok(request.with_numbers_as_sent(&["args"], numbers_as_sent))
}

/// `args` gathered from path, query and body; a name given twice is refused
/// rather than silently overwritten, since the audit must show what was sent.
#[derive(Default)]
struct Args(Map<String, Value>);

impl Args {
    fn insert(&mut self, name: String, value: Value) -> Result<(), CheckError> {
        if self.0.contains_key(&name) {
            return Err(CheckError::invalid(
                format!("args.{name}"),
                "given more than once across path, query and body",
            ));
        }
        self.0.insert(name, value);
        Ok(())
    }
}

/// Splits the request target into path and query; the fragment is dropped.
fn split_target(target: &str) -> (&str, &str) {
    let target = target.split_once('#').map_or(target, |(t, _)| t);
    target.split_once('?').unwrap_or((target, ""))
}

/// Query parameters, decoded; a repeated name becomes an array of its values.
fn query_params(query: &str) -> Vec<(String, Value)> {
    let mut params: Vec<(String, Value)> = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = Value::String(value.into_owned());
        match params.iter_mut().find(|(n, _)| *n == name) {
            Some((_, Value::Array(values))) => values.push(value),
            Some((_, existing)) => *existing = Value::Array(vec![existing.take(), value]),
            None => params.push((name.into_owned(), value)),
        }
    }
    params
}

/// A request body's keys, and its numbers kept as sent.
type JsonBody = (Map<String, Value>, Vec<NumberAsSent>);

/// The JSON object body, if there is one, with its numbers kept as sent. A
/// body that Envoy cut short, that is not a JSON object, that holds a key
/// twice, that is larger than `/verify` accepts, or that Envoy did not forward
/// at all is refused: a decision on part of a call, or on one reading of an
/// ambiguous one, is not a decision on the call.
fn json_body(
    http: &HttpRequest,
    headers: &HashMap<String, String>,
) -> Result<Option<JsonBody>, CheckError> {
    let bytes = if http.raw_body.is_empty() {
        http.body.as_bytes()
    } else {
        &http.raw_body
    };
    let size = usize::try_from(http.size).unwrap_or(0).max(bytes.len());
    let over_limit = size > MAX_BODY_BYTES;
    // Envoy's mark, or fewer bytes than the request's content-length: the
    // latter does not depend on a header a client could also send.
    let marked_partial = headers
        .get(PARTIAL_BODY_HEADER)
        .is_some_and(|v| v.split(',').any(|v| v.trim().eq_ignore_ascii_case("true")));
    let short = !bytes.is_empty() && (bytes.len() as i64) < http.size;
    if marked_partial || short {
        let remedy = if over_limit {
            format!("over the {MAX_BODY_BYTES}-byte limit of both doors anyway")
        } else {
            "raise with_request_body.max_request_bytes".to_owned()
        };
        return Err(CheckError::invalid(
            "body",
            format!(
                "cut short by Envoy ({PARTIAL_BODY_HEADER}: true, {} of {} bytes); {remedy}",
                bytes.len(),
                http.size
            ),
        ));
    }
    if over_limit {
        return Err(CheckError::invalid(
            "body",
            format!("{size} bytes, over the {MAX_BODY_BYTES}-byte limit of both doors"),
        ));
    }
    if bytes.is_empty() {
        if http.size > 0 {
            return Err(CheckError::invalid(
                "body",
                format!(
                    "the request has a {}-byte body that Envoy did not forward; enable with_request_body",
                    http.size
                ),
            ));
        }
        return Ok(None);
    }
    match strict_json::parse(bytes) {
        Ok(Parsed {
            value: Value::Object(map),
            numbers,
        }) => Ok(Some((map, numbers))),
        Ok(_) => Err(CheckError::invalid("body", "must be a JSON object")),
        Err(JsonError::DuplicateKey { path }) => {
            Err(CheckError::invalid(format!("body.{path}"), "duplicate key"))
        }
        Err(JsonError::Malformed(e)) => Err(CheckError::invalid("body", format!("not JSON: {e}"))),
    }
}

/// The `sub` claim of the verified JWT in `metadata_context`, if a JWT
/// payload is there at all. A payload whose `sub` is missing or not a string
/// gives `""`, which names no caller: it must not fall back to the peer.
pub fn jwt_subject(routes: &RouteMap, check: &CheckRequest) -> Option<String> {
    let payload = check
        .attributes
        .as_ref()?
        .metadata_context
        .as_ref()?
        .filter_metadata
        .get(&routes.identity.jwt.metadata_namespace)
        .and_then(|ns| struct_field(ns, &routes.identity.jwt.payload_key))?;
    match payload
        .fields
        .get(crate::callers::JWT_SUBJECT_CLAIM)
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(sub)) => Some(sub.clone()),
        _ => Some(String::new()),
    }
}

fn struct_field<'a>(s: &'a Struct, key: &str) -> Option<&'a Struct> {
    match s.fields.get(key) {
        Some(PbValue {
            kind: Some(Kind::StructValue(inner)),
        }) => Some(inner),
        _ => None,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::domain::{Mode, Role, Tool};
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::Request;

    fn routes(trusted: bool) -> RouteMap {
        RouteMap::parse(&format!(
            r#"
identity: {{headers: {{trusted: {trusted}}}}}
mode: {{default: READ_ONLY}}
routes:
  - {{method: DELETE, path: "/c/patients/{{patient_id}}/appointments/{{appointment_id}}", tool: cliniccloud.cancel_appointment}}
  - {{method: POST, path: "/sms/{{patient_id}}", tool: twilio.send_sms}}
"#
        ))
        .unwrap()
    }

    fn check(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> CheckRequest {
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
                        body: body.into(),
                        size: body.len() as i64,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    pub(crate) fn with_claims(mut check: CheckRequest, claims: Value) -> CheckRequest {
        fn pb(value: Value) -> PbValue {
            let kind = match value {
                Value::String(s) => Kind::StringValue(s),
                Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
                Value::Object(map) => Kind::StructValue(Struct {
                    fields: map.into_iter().map(|(k, v)| (k, pb(v))).collect(),
                }),
                other => panic!("unsupported {other}"),
            };
            PbValue { kind: Some(kind) }
        }
        let Some(Kind::StructValue(ns)) = pb(json!({"jwt_payload": claims})).kind else {
            unreachable!()
        };
        check.attributes.as_mut().unwrap().metadata_context = Some(Metadata {
            filter_metadata: [("envoy.filters.http.jwt_authn".to_string(), ns)].into(),
            ..Default::default()
        });
        check
    }

    const ID: (&str, &str) = ("x-request-id", "envoy-1");

    #[test]
    fn path_query_and_body_fill_subject_and_args() {
        let c = check(
            "DELETE",
            "/c/patients/p-1/appointments/a-9?reason=sick&tag=x&tag=y#frag",
            &[ID, ("x-casf-role", "nurse"), ("x-casf-tenant-id", "t-1")],
            r#"{"note": "héllo"}"#,
        );
        let req = tool_call(&routes(true), &c).unwrap();
        assert_eq!(req.tool, Tool::CancelAppointment);
        assert_eq!(req.mode, Mode::ReadOnly, "the configured default");
        assert_eq!(req.role, Role::Nurse);
        assert_eq!(req.patient_id(), Some("p-1"));
        assert_eq!(
            Value::Object(req.args.clone()),
            json!({"appointment_id": "a-9", "reason": "sick", "tag": ["x", "y"], "note": "héllo"})
        );
        assert_eq!(Value::Object(req.context), json!({"tenant_id": "t-1"}));
        assert_eq!(req.request_id.as_str(), "envoy-1");
    }

    #[test]
    fn request_id_and_mode_come_from_headers_in_order() {
        let headers = [
            ID,
            ("idempotency-key", "idem-1"),
            ("x-casf-role", "nurse"),
            ("x-casf-mode", "KILL_SWITCH"),
        ];
        let req = tool_call(&routes(true), &check("POST", "/sms/p", &headers, "")).unwrap();
        assert_eq!(req.request_id.as_str(), "idem-1");
        assert_eq!(req.mode, Mode::KillSwitch);
        let mut headers = headers.to_vec();
        headers.push(("x-casf-request-id", "casf-1"));
        let req = tool_call(&routes(true), &check("POST", "/sms/p", &headers, "")).unwrap();
        assert_eq!(req.request_id.as_str(), "casf-1");
        // An empty header does not count.
        headers.pop();
        headers.push(("x-casf-request-id", ""));
        let req = tool_call(&routes(true), &check("POST", "/sms/p", &headers, "")).unwrap();
        assert_eq!(req.request_id.as_str(), "idem-1");
        let err = tool_call(
            &routes(true),
            &check("POST", "/sms/p", &[("x-casf-role", "nurse")], ""),
        )
        .unwrap_err();
        assert_eq!(err.field(), "request_id");
    }

    #[test]
    fn an_unauthenticated_peer_asserts_no_identity() {
        let headers = [
            ID,
            ("x-casf-role", "doctor"),
            ("x-casf-tenant-id", "clinic-a"),
        ];
        let with_jwt = with_claims(
            check("POST", "/sms/p", &headers, ""),
            json!({"casf_role": "billing", "casf_tenant_id": "clinic-a", "sub": "u"}),
        );
        let plain = check("POST", "/sms/p", &headers, "");
        for c in [&with_jwt, &plain] {
            assert!(tool_call_from(&routes(true), c, true).is_ok());
            let err = tool_call_from(&routes(true), c, false).unwrap_err();
            assert_eq!(err.field(), "role");
            assert!(err.to_string().contains("authenticated peer"), "{err}");
        }
    }

    #[test]
    fn jwt_claims_win_and_untrusted_headers_are_ignored() {
        let headers = [ID, ("x-casf-role", "doctor"), ("x-casf-tenant-id", "evil")];
        let c = with_claims(
            check("POST", "/sms/p", &headers, ""),
            json!({"casf_role": "receptionist", "casf_tenant_id": "clinic-a", "sub": "u"}),
        );
        for trusted in [true, false] {
            let req = tool_call(&routes(trusted), &c).unwrap();
            assert_eq!(req.role, Role::Receptionist);
            assert_eq!(req.context["tenant_id"], "clinic-a");
        }
        // No claims: the role header counts only when trusted.
        let plain = check("POST", "/sms/p", &headers, "");
        assert_eq!(tool_call(&routes(true), &plain).unwrap().role, Role::Doctor);
        let err = tool_call(&routes(false), &plain).unwrap_err();
        assert_eq!(err.field(), "role");
        assert!(err.to_string().contains("not trusted"), "{err}");
        // A claim of the wrong type is refused, not skipped.
        let c = with_claims(check("POST", "/sms/p", &[ID], ""), json!({"casf_role": 7}));
        assert_eq!(tool_call(&routes(true), &c).unwrap_err().field(), "role");
    }

    #[test]
    fn a_missing_tenant_is_left_to_the_policy() {
        let req = tool_call(
            &routes(true),
            &check("POST", "/sms/p", &[ID, ("x-casf-role", "nurse")], ""),
        )
        .unwrap();
        assert!(req.context.is_empty());
    }

    #[test]
    fn bodies_with_a_key_twice_or_over_the_limit_are_bad_requests() {
        let h = [ID, ("x-casf-role", "nurse")];
        let twice = check("POST", "/sms/p", &h, r#"{"text":"a","opts":{"x":1,"x":2}}"#);
        let err = tool_call(&routes(true), &twice).unwrap_err();
        assert_eq!((err.kind(), err.field()), ("bad_request", "body.opts.x"));
        let big = format!(r#"{{"text":"{}"}}"#, "a".repeat(MAX_BODY_BYTES));
        let err = tool_call(&routes(true), &check("POST", "/sms/p", &h, &big)).unwrap_err();
        assert_eq!((err.kind(), err.field()), ("bad_request", "body"));
        assert!(err.to_string().contains("65536-byte limit"), "{err}");
        let fits = format!(r#"{{"text":"{}"}}"#, "a".repeat(MAX_BODY_BYTES - 20));
        assert!(tool_call(&routes(true), &check("POST", "/sms/p", &h, &fits)).is_ok());
    }

    #[test]
    fn body_numbers_are_fingerprinted_as_sent() {
        let h = [ID, ("x-casf-role", "nurse")];
        let call = |body: &str| {
            tool_call(&routes(true), &check("POST", "/sms/p", &h, body))
                .unwrap()
                .fingerprint()
        };
        let a = call(r#"{"n":123456789012345678901234567890}"#);
        assert_ne!(a, call(r#"{"n":123456789012345678901234567891}"#));
        assert_eq!(a, call(r#"{ "n" : 123456789012345678901234567890 }"#));
    }

    #[test]
    fn bodies_that_are_not_whole_json_objects_are_bad_requests() {
        let h = [ID, ("x-casf-role", "nurse")];
        for body in ["not json", "[1, 2]", "{\"a\": "] {
            let err = tool_call(&routes(true), &check("POST", "/sms/p", &h, body)).unwrap_err();
            assert_eq!((err.kind(), err.field()), ("bad_request", "body"), "{body}");
        }
        let partial = [
            ID,
            ("x-casf-role", "nurse"),
            (PARTIAL_BODY_HEADER, "false,true"),
        ];
        let err = tool_call(&routes(true), &check("POST", "/sms/p", &partial, "{}")).unwrap_err();
        assert_eq!(err.field(), "body");
        // Shorter than its content-length, whatever the headers say.
        let mut short = check("POST", "/sms/p", &h, "{}");
        if let Some(http) = short
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
        {
            http.size = 70_000;
        }
        let err = tool_call(&routes(true), &short).unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
        assert!(
            err.to_string().contains("limit of both doors anyway"),
            "{err}"
        );
        let mut not_forwarded = check("POST", "/sms/p", &h, "");
        if let Some(http) = not_forwarded
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
        {
            http.size = 12;
        }
        let err = tool_call(&routes(true), &not_forwarded).unwrap_err();
        assert!(err.to_string().contains("did not forward"), "{err}");
    }

    #[test]
    fn raw_body_bytes_are_used_when_envoy_packs_them() {
        let mut c = check("POST", "/sms/p", &[ID, ("x-casf-role", "nurse")], "");
        if let Some(http) = c
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
        {
            http.raw_body = br#"{"text": "hi"}"#.to_vec();
        }
        let req = tool_call(&routes(true), &c).unwrap();
        assert_eq!(req.args["text"], "hi");
    }

    #[test]
    fn a_name_given_twice_is_refused() {
        let c = check(
            "DELETE",
            "/c/patients/p/appointments/a?appointment_id=b",
            &[ID, ("x-casf-role", "nurse")],
            "",
        );
        let err = tool_call(&routes(true), &c).unwrap_err();
        assert_eq!(err.field(), "args.appointment_id");
        let c = check(
            "POST",
            "/sms/p?text=a",
            &[ID, ("x-casf-role", "nurse")],
            r#"{"text": "b"}"#,
        );
        assert_eq!(
            tool_call(&routes(true), &c).unwrap_err().field(),
            "args.text"
        );
    }

    #[test]
    fn unmapped_and_schema_failures_are_told_apart() {
        let h = [ID, ("x-casf-role", "nurse")];
        let err = tool_call(&routes(true), &check("GET", "/sms/p", &h, "")).unwrap_err();
        assert_eq!(err.kind(), "unmapped");
        let err = tool_call(
            &routes(true),
            &check("POST", "/sms/p", &[ID, ("x-casf-role", "intern")], ""),
        )
        .unwrap_err();
        assert_eq!((err.kind(), err.field()), ("bad_request", "role"));
        assert_eq!(err.body()["field"], "role");
        let err = tool_call(&routes(true), &CheckRequest::default()).unwrap_err();
        assert_eq!(err.field(), "attributes.request.http");
    }
}
