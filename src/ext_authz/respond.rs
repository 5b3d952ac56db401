//! From a decision to a `CheckResponse`.
//!
//! Envoy allows a request whose `CheckResponse` has no status, so every
//! response built here sets one, and only an ALLOW sets `OK`. Denials always
//! use `denied_response`, never `error_response`: Envoy treats the latter as
//! a failure of the authorizer, which `failure_mode_allow` would let through.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value as PbValue, value::Kind};
use envoy_types::pb::google::rpc::Status;
use serde_json::Value;

use super::routes::IdentityHeaders;
use crate::domain::{Decision, Mode, VerifyResponse, violation};

/// Headers the verifier sets on requests it lets through.
pub const DECISION_HEADER: &str = "x-casf-decision";
pub const REQUEST_ID_HEADER: &str = "x-casf-request-id";
pub const ALLOWED_OUTPUTS_HEADER: &str = "x-casf-allowed-outputs";
/// The mode a decision ran under when the operator's floor raised the
/// caller's (also on `/verify` answers).
pub const MODE_APPLIED_HEADER: &str = "x-casf-mode-applied";

/// `google.rpc.Code` values used here.
mod code {
    pub const OK: i32 = 0;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// What the `dynamic_metadata` of every response says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary<'a> {
    pub decision: &'a str,
    pub violations: &'a [String],
    pub request_id: &'a str,
    /// The audit event's hash; `None` when nothing was audited.
    pub audit_hash: Option<&'a str>,
}

impl Summary<'_> {
    fn to_struct(&self) -> Struct {
        let string = |s: &str| PbValue {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        let audit_hash = match self.audit_hash {
            Some(hash) => string(hash),
            None => PbValue {
                kind: Some(Kind::NullValue(0)),
            },
        };
        let violations = PbValue {
            kind: Some(Kind::ListValue(ListValue {
                values: self.violations.iter().map(|v| string(v)).collect(),
            })),
        };
        Struct {
            fields: [
                ("decision".to_owned(), string(self.decision)),
                ("violations".to_owned(), violations),
                ("request_id".to_owned(), string(self.request_id)),
                ("audit_hash".to_owned(), audit_hash),
            ]
            .into(),
        }
    }
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            ..Default::default()
        }),
        // A client must not be able to pre-set any of these.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn status(code: i32, message: impl Into<String>) -> Option<Status> {
    Some(Status {
        code,
        message: message.into(),
        details: Vec::new(),
    })
}

/// A pipeline decision, for Envoy. ALLOW goes upstream with the `x-casf-*`
/// headers and without the identity headers; anything else is answered with
/// the `/verify` body: 503 when a dependency failed closed, 403 otherwise.
pub fn decision(
    response: &VerifyResponse,
    request_id: &str,
    audit_hash: Option<&str>,
    identity: &IdentityHeaders,
) -> CheckResponse {
    let summary = Summary {
        decision: response.decision.as_str(),
        violations: &response.violations,
        request_id,
        audit_hash,
    };
    if response.decision == Decision::Allow {
        let mut headers = vec![
            header(DECISION_HEADER, response.decision.as_str()),
            header(REQUEST_ID_HEADER, request_id),
        ];
        // A client must not be able to pose as a shadowed call either.
        let mut headers_to_remove = vec![
            identity.role.clone(),
            identity.tenant_id.clone(),
            SHADOW_DECISION_HEADER.to_owned(),
        ];
        if response.allowed_outputs.is_empty() {
            headers_to_remove.push(ALLOWED_OUTPUTS_HEADER.to_owned());
        } else {
            headers.push(header(
                ALLOWED_OUTPUTS_HEADER,
                &response.allowed_outputs.join(","),
            ));
        }
        return CheckResponse {
            status: status(code::OK, ""),
            dynamic_metadata: Some(summary.to_struct()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers,
                headers_to_remove,
                ..Default::default()
            })),
        };
    }
    let failed_closed = response
        .violations
        .iter()
        .any(|v| v == violation::FAIL_CLOSED);
    let (code, http) = if failed_closed {
        (code::UNAVAILABLE, 503)
    } else {
        (code::PERMISSION_DENIED, 403)
    };
    let body = serde_json::to_string(response).unwrap_or_else(|_| fallback_body(response));
    denied(code, &response.reason, http, body, &summary)
}

/// A Check that is not a valid tool call: 400 naming the field.
pub fn bad_request(error_body: &Value, detail: &str, request_id: &str) -> CheckResponse {
    let summary = Summary {
        decision: Decision::Deny.as_str(),
        violations: &[],
        request_id,
        audit_hash: None,
    };
    denied(
        code::INVALID_ARGUMENT,
        detail,
        400,
        error_body.to_string(),
        &summary,
    )
}

/// A Check from no configured caller (`CASF_CALLERS`): 401 with a JSON
/// `detail` and `WWW-Authenticate`, no decision.
pub fn unauthenticated(detail: &str, request_id: &str) -> CheckResponse {
    let summary = Summary {
        decision: Decision::Deny.as_str(),
        violations: &[],
        request_id,
        audit_hash: None,
    };
    let mut response = denied(
        code::UNAUTHENTICATED,
        detail,
        401,
        serde_json::json!({"detail": detail}).to_string(),
        &summary,
    );
    if let Some(HttpResponse::DeniedResponse(denied)) = &mut response.http_response {
        denied
            .headers
            .push(header("www-authenticate", "Bearer realm=\"casf-verifier\""));
    }
    response
}

/// A call that no route maps, or the verifier failing to decide: an
/// explicit deny with the `/verify` body, never a bare gRPC error.
pub fn door_denial(response: &VerifyResponse, request_id: &str) -> CheckResponse {
    decision(response, request_id, None, &IdentityHeaders::default())
}

fn denied(
    code: i32,
    message: &str,
    http: i32,
    body: String,
    summary: &Summary<'_>,
) -> CheckResponse {
    CheckResponse {
        status: status(code, message),
        dynamic_metadata: Some(summary.to_struct()),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: http }),
            headers: vec![header("content-type", "application/json")],
            body,
        })),
    }
}

/// The real decision of a call in shadow, on the request sent upstream
/// (and on `/verify` answers).
pub const SHADOW_DECISION_HEADER: &str = "x-casf-shadow-decision";

/// An ALLOW answered because the call is in shadow: the upstream gets
/// [`SHADOW_DECISION_HEADER`] with the real decision, and the dynamic
/// metadata gains `shadow_decision` and `shadow_violations`.
pub fn with_shadow_decision(
    mut response: CheckResponse,
    real: Decision,
    answered: &VerifyResponse,
) -> CheckResponse {
    if let Some(HttpResponse::OkResponse(ok)) = &mut response.http_response {
        ok.headers_to_remove.retain(|h| h != SHADOW_DECISION_HEADER);
        ok.headers
            .push(header(SHADOW_DECISION_HEADER, real.as_str()));
    }
    if let Some(metadata) = &mut response.dynamic_metadata {
        let string = |s: &str| PbValue {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        metadata
            .fields
            .insert("shadow_decision".to_owned(), string(real.as_str()));
        let violations = answered.shadow_violations.as_deref().unwrap_or_default();
        metadata.fields.insert(
            "shadow_violations".to_owned(),
            PbValue {
                kind: Some(Kind::ListValue(ListValue {
                    values: violations.iter().map(|v| string(v)).collect(),
                })),
            },
        );
    }
    response
}

/// `response` with [`MODE_APPLIED_HEADER`]: to the upstream on ALLOW, to
/// the caller otherwise.
pub fn with_mode_applied(mut response: CheckResponse, mode: Mode) -> CheckResponse {
    let applied = header(MODE_APPLIED_HEADER, mode.as_str());
    match &mut response.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok.headers.push(applied),
        Some(HttpResponse::DeniedResponse(denied)) => denied.headers.push(applied),
        _ => {}
    }
    response
}

/// Serialising a `VerifyResponse` cannot fail; this keeps the deny JSON anyway.
fn fallback_body(response: &VerifyResponse) -> String {
    format!(
        r#"{{"decision":"{}","violations":[],"allowed_outputs":[],"reason":"denied"}}"#,
        response.decision.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn identity() -> IdentityHeaders {
        IdentityHeaders::default()
    }

    fn headers_of(ok: &OkHttpResponse) -> Vec<(String, String, i32)> {
        ok.headers
            .iter()
            .map(|h| {
                let hv = h.header.as_ref().unwrap();
                (hv.key.clone(), hv.value.clone(), h.append_action)
            })
            .collect()
    }

    fn meta(response: &CheckResponse) -> Value {
        fn json_of(v: &PbValue) -> Value {
            match v.kind.as_ref().unwrap() {
                Kind::StringValue(s) => json!(s),
                Kind::NullValue(_) => Value::Null,
                Kind::ListValue(l) => Value::Array(l.values.iter().map(json_of).collect()),
                other => panic!("unexpected {other:?}"),
            }
        }
        let s = response.dynamic_metadata.as_ref().unwrap();
        Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), json_of(v)))
                .collect(),
        )
    }

    #[test]
    fn allow_is_ok_with_overwritten_headers_and_no_identity_headers() {
        let response = VerifyResponse::from_violations(vec![], vec!["slots_aggregated".into()]);
        let r = decision(&response, "r-1", Some("abc"), &identity());
        assert_eq!(r.status.as_ref().unwrap().code, code::OK);
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
            panic!("not ok: {r:?}")
        };
        let overwrite = HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
        assert_eq!(
            headers_of(ok),
            vec![
                ("x-casf-decision".into(), "ALLOW".into(), overwrite),
                ("x-casf-request-id".into(), "r-1".into(), overwrite),
                (
                    "x-casf-allowed-outputs".into(),
                    "slots_aggregated".into(),
                    overwrite
                ),
            ]
        );
        assert_eq!(
            ok.headers_to_remove,
            vec!["x-casf-role", "x-casf-tenant-id", "x-casf-shadow-decision"]
        );
        assert_eq!(
            meta(&r),
            json!({"decision": "ALLOW", "violations": [], "request_id": "r-1", "audit_hash": "abc"})
        );
    }

    #[test]
    fn a_shadowed_allow_carries_the_real_decision_upstream_and_in_metadata() {
        let answered = VerifyResponse::deny("Mode_KillSwitch").shadowed();
        let r = with_shadow_decision(
            decision(&answered, "r-1", None, &IdentityHeaders::default()),
            Decision::Deny,
            &answered,
        );
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
            panic!("not allowed: {r:?}")
        };
        assert!(ok.headers.iter().any(|h| {
            h.header
                .as_ref()
                .is_some_and(|h| h.key == SHADOW_DECISION_HEADER && h.value == "DENY")
        }));
        assert!(
            !ok.headers_to_remove
                .iter()
                .any(|h| h == SHADOW_DECISION_HEADER)
        );
        let meta = meta(&r);
        assert_eq!(meta["decision"], "ALLOW");
        assert_eq!(meta["shadow_decision"], "DENY");
        assert_eq!(meta["shadow_violations"], json!(["Mode_KillSwitch"]));
    }

    #[test]
    fn allow_without_outputs_strips_a_client_sent_outputs_header() {
        let r = decision(
            &VerifyResponse::from_violations(vec![], vec![]),
            "r",
            None,
            &identity(),
        );
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
            panic!()
        };
        assert!(
            ok.headers_to_remove
                .contains(&"x-casf-allowed-outputs".to_owned())
        );
        assert_eq!(meta(&r)["audit_hash"], Value::Null);
    }

    #[test]
    fn deny_is_403_with_the_verify_body() {
        let response = VerifyResponse::deny("Mode_ReadOnly_NoWrite");
        let r = decision(&response, "r-2", Some("h"), &identity());
        assert_eq!(r.status.as_ref().unwrap().code, code::PERMISSION_DENIED);
        let Some(HttpResponse::DeniedResponse(denied)) = &r.http_response else {
            panic!("not denied: {r:?}")
        };
        assert_eq!(denied.status.as_ref().unwrap().code, 403);
        assert_eq!(
            serde_json::from_str::<Value>(&denied.body).unwrap(),
            serde_json::to_value(&response).unwrap()
        );
        let ct = denied.headers[0].header.as_ref().unwrap();
        assert_eq!(
            (ct.key.as_str(), ct.value.as_str()),
            ("content-type", "application/json")
        );
        assert_eq!(
            meta(&r),
            json!({"decision": "DENY", "violations": ["Mode_ReadOnly_NoWrite"], "request_id": "r-2", "audit_hash": "h"})
        );
    }

    #[test]
    fn fail_closed_is_503_and_unavailable() {
        let response = VerifyResponse::from_violations(
            vec!["FAIL_CLOSED".into(), "OPA_Unavailable".into()],
            vec![],
        );
        let r = decision(&response, "r", None, &identity());
        assert_eq!(r.status.as_ref().unwrap().code, code::UNAVAILABLE);
        let Some(HttpResponse::DeniedResponse(denied)) = &r.http_response else {
            panic!()
        };
        assert_eq!(denied.status.as_ref().unwrap().code, 503);
        assert!(denied.body.contains("OPA_Unavailable"));
    }

    #[test]
    fn needs_approval_is_not_an_allow() {
        let mut response = VerifyResponse::deny("x");
        response.decision = Decision::NeedsApproval;
        let r = decision(&response, "r", None, &identity());
        assert_ne!(r.status.as_ref().unwrap().code, code::OK);
        assert!(matches!(
            r.http_response,
            Some(HttpResponse::DeniedResponse(_))
        ));
    }

    #[test]
    fn bad_request_is_400_invalid_argument_naming_the_field() {
        let body = json!({"detail": "mode: unknown", "field": "mode"});
        let r = bad_request(&body, "mode: unknown", "r");
        assert_eq!(r.status.as_ref().unwrap().code, code::INVALID_ARGUMENT);
        let Some(HttpResponse::DeniedResponse(denied)) = &r.http_response else {
            panic!()
        };
        assert_eq!(denied.status.as_ref().unwrap().code, 400);
        assert_eq!(serde_json::from_str::<Value>(&denied.body).unwrap(), body);
        assert_eq!(meta(&r)["decision"], "DENY");
    }
}
