//! Canonical JSON: the one byte form that fingerprints and audit hashes use.
//!
//! Keys sorted by code point, no insignificant whitespace, UTF-8 left
//! unescaped (as Python's `json.dumps(sort_keys=True, separators=(",", ":"),
//! ensure_ascii=False)`). Keys are sorted here rather than trusting
//! `serde_json::Map`'s order, which a dependency's `preserve_order` feature
//! could silently change.
//!
//! Numbers are written so that a PostgreSQL `JSONB` round trip gives the same
//! bytes again. JSONB keeps a number's value and its digits after the point
//! but prints no exponent, so:
//! - integers (within i64/u64) as integers;
//! - other numbers (floats) in serde_json's shortest round-trip form, which
//!   reads back as the same double because parsing is correctly rounded
//!   (serde_json's `float_roundtrip` feature);
//! - except integral floats of magnitude 1e16 up to 2^64, which serde_json
//!   would write as `1e+16`: JSONB prints those as plain digits, which would
//!   read back as an integer. They are written as digits plus `.0`
//!   (`10000000000000000.0`), as serde_json already does below 1e16;
//! - `-0.0` as `0.0` (JSONB's numeric has no negative zero).

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Canonical JSON text of `value`.
pub fn to_string(value: &Value) -> String {
    let mut out = String::with_capacity(256);
    write_value(&mut out, value);
    out
}

/// SHA-256 hex of the canonical JSON of `value`.
pub fn sha256_hex(value: &Value) -> String {
    hex::encode(Sha256::digest(to_string(value).as_bytes()))
}

/// Canonical JSON of `value`, except that the numbers at the given paths
/// (JSON arrays of keys and indices) are written with the given text: the
/// numbers as a client sent them, where a double would lose what they say
/// (see [`crate::strict_json`]). For an integer beyond 2^64 this is what a
/// client computing canonical JSON with exact integers (Python) writes.
pub fn to_string_with_numbers(value: &Value, numbers: &[(Vec<Value>, String)]) -> String {
    if numbers.is_empty() {
        return to_string(value);
    }
    let mut out = String::with_capacity(256);
    let mut path = Vec::new();
    write_value_at(&mut out, value, &mut path, numbers);
    out
}

/// [`write_value`] that knows where it is, for [`to_string_with_numbers`].
fn write_value_at(
    out: &mut String,
    value: &Value,
    path: &mut Vec<Value>,
    numbers: &[(Vec<Value>, String)],
) {
    match value {
        Value::Number(n) => match numbers.iter().find(|(at, _)| at == path) {
            Some((_, text)) => out.push_str(text),
            None => write_number(out, n),
        },
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                path.push(Value::from(i));
                write_value_at(out, item, path, numbers);
                path.pop();
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(out, key);
                out.push(':');
                path.push(Value::from(key.as_str()));
                write_value_at(out, item, path, numbers);
                path.pop();
            }
            out.push('}');
        }
        other => write_value(out, other),
    }
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(out, key);
                out.push(':');
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

/// 2^64: integral floats below this could be read back as integers.
const INTEGER_READ_LIMIT: f64 = 18_446_744_073_709_551_616.0;

fn write_number(out: &mut String, n: &serde_json::Number) {
    match n.as_f64() {
        Some(f) if n.is_f64() && f == 0.0 => out.push_str("0.0"),
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < INTEGER_READ_LIMIT => {
            // Exact: an integral double below 2^64 fits an i128.
            out.push_str(&format!("{}.0", f as i128));
        }
        _ => out.push_str(&n.to_string()),
    }
}

fn write_str(out: &mut String, s: &str) {
    // serde_json escapes only `"`, `\` and control characters, leaving other
    // UTF-8 as is, which is exactly the canonical form.
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serialising a &str cannot fail; keep a total function regardless.
        Err(_) => out.push_str("\"\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_recursively_and_drops_whitespace() {
        let v = json!({"b": 1, "a": {"z": [1, 2], "y": "x"}});
        assert_eq!(to_string(&v), r#"{"a":{"y":"x","z":[1,2]},"b":1}"#);
    }

    #[test]
    fn leaves_unicode_unescaped_and_escapes_controls() {
        let v = json!({"name": "Zoë 東京", "nl": "a\nb\u{1}"});
        assert_eq!(
            to_string(&v),
            "{\"name\":\"Zoë 東京\",\"nl\":\"a\\nb\\u0001\"}"
        );
    }

    #[test]
    fn numbers_survive_a_reparse() {
        for text in [
            "1",
            "-7",
            "1.5",
            "0.1",
            "1e20",
            "1.0",
            "123456789012345678901234567890",
            "-0.0",
        ] {
            let v: Value = serde_json::from_str(text).unwrap();
            let once = to_string(&v);
            let again = to_string(&serde_json::from_str(&once).unwrap());
            assert_eq!(once, again, "{text}");
        }
        assert_eq!(to_string(&json!(-0.0)), "0.0");
    }

    #[test]
    fn integral_floats_keep_a_point_so_they_never_read_back_as_integers() {
        for (text, canonical) in [
            ("1e16", "10000000000000000.0"),
            ("-1.5e17", "-150000000000000000.0"),
            ("1.0", "1.0"),
            ("1500.0", "1500.0"),
            ("1e20", "1e+20"),
            ("18446744073709551615", "18446744073709551615"),
        ] {
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(to_string(&v), canonical, "{text}");
            // What JSONB prints for it (plain digits) reads back the same.
            let reread: Value = serde_json::from_str(canonical).unwrap();
            assert_eq!(to_string(&reread), canonical, "{text}");
        }
    }

    #[test]
    fn numbers_as_sent_are_written_in_place() {
        let v: Value =
            serde_json::from_str(r#"{"b":[1,123456789012345678901234567890],"a":2}"#).unwrap();
        let numbers = vec![(
            vec![json!("b"), json!(1)],
            "123456789012345678901234567890".to_owned(),
        )];
        assert_eq!(
            to_string_with_numbers(&v, &numbers),
            r#"{"a":2,"b":[1,123456789012345678901234567890]}"#
        );
        assert_eq!(to_string_with_numbers(&v, &[]), to_string(&v));
    }

    /// The published vectors (docs/audit-vectors.json), which the Python
    /// reference verifier checks too: the rules as documented are the rules
    /// as implemented.
    #[test]
    fn the_published_vectors_hold() {
        let vectors: Value =
            serde_json::from_str(include_str!("../docs/audit-vectors.json")).unwrap();
        let mut checked = 0;
        for group in ["canonical", "unparsable"] {
            for vector in vectors[group].as_array().unwrap() {
                let input = vector["input"].as_str().unwrap();
                let columns = ["r", "e", "t", "a", "x", "d"];
                // The hash rule: stored text parsed and rendered again.
                let rendered = match serde_json::from_str::<Value>(input) {
                    Ok(value) => to_string(&value),
                    Err(_) => to_string(&Value::String(input.to_owned())),
                };
                assert_eq!(rendered, vector["canonical"].as_str().unwrap(), "{input}");
                let expected = hex::encode(Sha256::digest(format!("retaxd{rendered}").as_bytes()));
                assert!(crate::audit::chain::stored_hash_holds(
                    columns, input, "", &expected
                ));
                checked += 1;
            }
        }
        for vector in vectors["chain"].as_array().unwrap() {
            let c = &vector["columns"];
            let col = |name: &str| c[name].as_str().unwrap();
            let hashed = format!(
                "{}{}{}{}{}{}{}{}",
                col("request_id"),
                col("event_id"),
                col("ts"),
                col("actor"),
                col("action"),
                col("decision"),
                to_string(&serde_json::from_str(col("payload")).unwrap()),
                col("prev_hash")
            );
            assert_eq!(hashed, vector["hashed"].as_str().unwrap());
            assert!(crate::audit::chain::stored_hash_holds(
                [
                    col("request_id"),
                    col("event_id"),
                    col("ts"),
                    col("actor"),
                    col("action"),
                    col("decision")
                ],
                col("payload"),
                col("prev_hash"),
                vector["hash"].as_str().unwrap()
            ));
            checked += 1;
        }
        assert!(checked >= 17, "{checked}");
    }

    #[test]
    fn key_order_is_by_code_point() {
        let v = json!({"é": 1, "z": 2, "A": 3});
        assert_eq!(to_string(&v), r#"{"A":3,"z":2,"é":1}"#);
    }
}
