//! The guide's hash rule for one audit row, written out independently of
//! the crate (no `casf_verifier::canonical`), so that a chain the crate
//! wrote is checked by a second implementation. Shared by the API tests and
//! the chaos test; a payload that is not JSON recomputes as `null`, which
//! never matches a stored hash.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The guide's hash rule, written out independently of the crate.
pub fn recompute(row: &crate::helpers::AuditRow) -> String {
    fn canonical(v: &Value) -> String {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                let fields: Vec<String> = keys
                    .iter()
                    .map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&map[*k])))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }
            Value::Array(items) => format!(
                "[{}]",
                items.iter().map(canonical).collect::<Vec<_>>().join(",")
            ),
            other => other.to_string(),
        }
    }
    let payload: Value = serde_json::from_str(&row.payload).unwrap_or(Value::Null);
    let text = format!(
        "{}{}{}{}{}{}{}{}",
        row.request_id,
        row.event_id,
        row.ts,
        row.actor,
        row.action,
        row.decision,
        canonical(&payload),
        row.prev_hash
    );
    hex::encode(Sha256::digest(text.as_bytes()))
}
