//! `/verify` bodies on arbitrary bytes: the strict JSON parser (duplicate
//! keys, numbers as sent) and the request parser behind it. Invariants:
//! - nothing panics;
//! - the strict parser agrees with serde_json on what is JSON, and takes
//!   the same value; it refuses only duplicate keys on top;
//! - a body that parses is decided on what was sent: tool, role and mode
//!   are known wire names, verbatim, and its audit payload is storable
//!   (no U+0000, readable back when nested two levels deeper);
//! - the request, written back as a body, parses to the same request
//!   (what the audit row shows is what was decided).
#![no_main]

use casf_verifier::domain::{Mode, Role, Tool, VerifyRequest};
use casf_verifier::strict_json::{self, JsonError};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let plain = serde_json::from_slice::<Value>(data);
    match strict_json::parse(data) {
        Ok(parsed) => {
            assert_eq!(
                plain.as_ref().ok(),
                Some(&parsed.value),
                "strict took non-JSON"
            );
        }
        Err(JsonError::DuplicateKey { .. }) => {
            assert!(plain.is_ok(), "duplicate key reported in non-JSON");
        }
        Err(JsonError::Malformed(_)) => {
            assert!(plain.is_err(), "strict refused JSON as malformed");
        }
    }

    let Ok(request) = VerifyRequest::from_slice(data) else {
        return;
    };
    let sent = plain.expect("a body the strict parser took is JSON");
    for (field, known) in [
        (
            "tool",
            Tool::ALL.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        ),
        ("role", Role::ALL.iter().map(|r| r.as_str()).collect()),
        ("mode", Mode::ALL.iter().map(|m| m.as_str()).collect()),
    ] {
        let raw = sent[field].as_str().expect("closed fields are strings");
        assert!(known.contains(&raw), "{field} {raw:?} decided");
    }
    assert_eq!(sent["tool"], request.tool.as_str());
    assert_eq!(sent["role"], request.role.as_str());
    assert_eq!(sent["mode"], request.mode.as_str());
    assert_eq!(sent["request_id"], request.request_id.as_str());

    // The audit payload: storable, and the same request when read back.
    let fingerprint = request.fingerprint();
    assert_eq!(fingerprint.len(), 64);
    let text = serde_json::to_string(&request.to_value()).expect("a request serialises");
    assert!(
        !text.contains("\\u0000"),
        "U+0000 reached the audit payload"
    );
    let wrapped = format!(r#"{{"row":{{"request":{text}}}}}"#);
    serde_json::from_str::<Value>(&wrapped).expect("the audit payload reads back");
    let again = VerifyRequest::from_slice(text.as_bytes()).expect("the audit payload re-parses");
    assert_eq!(
        (&again.request_id, again.tool, again.mode, again.role),
        (
            &request.request_id,
            request.tool,
            request.mode,
            request.role
        )
    );
    assert_eq!(again.subject, request.subject);
    assert_eq!(again.args, request.args);
    assert_eq!(again.context, request.context);
    assert_eq!(again.policy_input(), request.policy_input());
});
