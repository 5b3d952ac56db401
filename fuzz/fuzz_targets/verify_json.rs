//! `/verify` bodies: the strict JSON parser (duplicate keys, numbers as
//! sent) and the domain request parser behind it, on arbitrary bytes.
//! Invariants: no panic, and a body that parses names a known tool, role
//! and mode exactly as sent (an unknown one is never decided).
#![no_main]

use casf_verifier::domain::{Mode, Role, Tool, VerifyRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = casf_verifier::strict_json::parse(data);
    let Ok(request) = VerifyRequest::from_slice(data) else {
        return;
    };
    // What was decided on is what was sent: the body is valid JSON with
    // one value per key, and each closed field is a wire name, verbatim.
    let sent: serde_json::Value =
        serde_json::from_slice(data).expect("a body the strict parser took is JSON");
    for (field, known) in [
        ("tool", Tool::ALL.iter().map(|t| t.as_str()).collect::<Vec<_>>()),
        ("role", Role::ALL.iter().map(|r| r.as_str()).collect()),
        ("mode", Mode::ALL.iter().map(|m| m.as_str()).collect()),
    ] {
        let raw = sent[field].as_str().expect("closed fields are strings");
        assert!(known.contains(&raw), "{field} {raw:?} decided");
    }
    assert_eq!(sent["tool"], request.tool.as_str());
    assert_eq!(sent["role"], request.role.as_str());
    assert_eq!(sent["mode"], request.mode.as_str());
});
