//! Request JSON with one meaning.
//!
//! `serde_json` keeps the last of two equal keys and reads every number that
//! is not a 64-bit integer as a double. Another component reading the same
//! bytes (a gateway, a WAF, the agent's own log) may keep the first key, and
//! two amounts that differ beyond a double's precision would be one amount to
//! the replay fingerprint. So request bodies are parsed here: duplicate keys,
//! anywhere, are refused, and numbers whose text a double does not give back
//! are kept as sent, for the fingerprint.
//!
//! `serde_json` parses first (syntax, UTF-8, nesting limit); a second pass over
//! the bytes, already known to be valid JSON, finds what it cannot report. It
//! allocates nothing for an ordinary body. `arbitrary_precision` would keep
//! numbers as text instead, but it changes `serde_json::Number` for the whole
//! dependency graph (the policy engine included) and the canonical JSON of
//! existing audit rows, so it is not used.

use std::borrow::Cow;

use serde_json::Value;

/// Keys an object may hold before duplicates are looked for by sorting at
/// its end rather than by comparing each new key with the earlier ones.
const LINEAR_KEYS: usize = 32;

/// Why a body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// A key given twice in one object; `path` names it, e.g. `args.mode`.
    #[error("{path}: duplicate key")]
    DuplicateKey { path: String },
}

/// A number whose text a double does not give back, e.g. an integer beyond
/// 2^64 or `1.50`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberAsSent {
    /// Where it is: a JSON array of keys and indices from the body's root.
    pub path: Vec<Value>,
    pub text: String,
}

/// A parsed body and the numbers that its `Value` does not hold exactly.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub value: Value,
    pub numbers: Vec<NumberAsSent>,
}

/// Parses `bytes`, refusing duplicate keys.
pub fn parse(bytes: &[u8]) -> Result<Parsed, JsonError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| JsonError::Malformed(e.to_string()))?;
    let numbers = Scanner::new(bytes).scan()?;
    Ok(Parsed { value, numbers })
}

enum Frame<'a> {
    /// An open object: its keys start at `keys[first_key]`; `key` is the
    /// one whose value is being read.
    Object {
        first_key: usize,
        key: Option<Cow<'a, str>>,
    },
    Array {
        index: usize,
    },
}

struct Scanner<'a> {
    bytes: &'a [u8],
    frames: Vec<Frame<'a>>,
    /// Keys of every open object, innermost last.
    keys: Vec<Cow<'a, str>>,
    numbers: Vec<NumberAsSent>,
}

impl<'a> Scanner<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Scanner {
            bytes,
            frames: Vec::new(),
            keys: Vec::new(),
            numbers: Vec::new(),
        }
    }

    /// Walks valid JSON (checked by `serde_json` first), so it only needs to
    /// tell tokens apart, never to report syntax errors.
    fn scan(mut self) -> Result<Vec<NumberAsSent>, JsonError> {
        let bytes = self.bytes;
        let mut expect_key = false;
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'{' => {
                    self.frames.push(Frame::Object {
                        first_key: self.keys.len(),
                        key: None,
                    });
                    expect_key = true;
                    i += 1;
                }
                b'}' => {
                    if let Some(Frame::Object { first_key, .. }) = self.frames.pop() {
                        self.check_sorted(first_key)?;
                        self.keys.truncate(first_key);
                    }
                    expect_key = false;
                    i += 1;
                }
                b'[' => {
                    self.frames.push(Frame::Array { index: 0 });
                    i += 1;
                }
                b']' => {
                    self.frames.pop();
                    i += 1;
                }
                b',' => {
                    match self.frames.last_mut() {
                        Some(Frame::Array { index }) => *index += 1,
                        Some(Frame::Object { .. }) => expect_key = true,
                        None => {}
                    }
                    i += 1;
                }
                b'"' => {
                    let end = string_end(bytes, i);
                    if expect_key {
                        self.key(&bytes[i..=end])?;
                        expect_key = false;
                    }
                    i = end + 1;
                }
                b'-' | b'0'..=b'9' => {
                    let mut end = i;
                    while end < bytes.len()
                        && matches!(bytes[end], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                    {
                        end += 1;
                    }
                    let token = &bytes[i..end];
                    if !exact(token) {
                        self.numbers.push(NumberAsSent {
                            path: self.path(),
                            text: String::from_utf8_lossy(token).into_owned(),
                        });
                    }
                    i = end;
                }
                _ => i += 1,
            }
        }
        Ok(self.numbers)
    }

    /// Records the key `quoted` (with its quotes) of the innermost object,
    /// comparing it with the object's earlier keys while there are few.
    fn key(&mut self, quoted: &'a [u8]) -> Result<(), JsonError> {
        let inner = &quoted[1..quoted.len() - 1];
        let key: Cow<'a, str> = if inner.contains(&b'\\') {
            // Escapes spell the same key differently: compare decoded.
            Cow::Owned(
                serde_json::from_slice::<String>(quoted)
                    .map_err(|e| JsonError::Malformed(e.to_string()))?,
            )
        } else {
            Cow::Borrowed(
                std::str::from_utf8(inner).map_err(|e| JsonError::Malformed(e.to_string()))?,
            )
        };
        let Some(Frame::Object {
            first_key,
            key: current,
        }) = self.frames.last_mut()
        else {
            return Ok(());
        };
        let first_key = *first_key;
        let earlier = &self.keys[first_key..];
        if earlier.len() < LINEAR_KEYS && earlier.contains(&key) {
            *current = Some(key);
            return Err(self.duplicate());
        }
        *current = Some(key.clone());
        self.keys.push(key);
        Ok(())
    }

    /// Duplicates in a large object, found by sorting its keys at its end.
    fn check_sorted(&mut self, first_key: usize) -> Result<(), JsonError> {
        let keys = &self.keys[first_key..];
        if keys.len() <= LINEAR_KEYS {
            return Ok(());
        }
        let mut sorted: Vec<&str> = keys.iter().map(|k| k.as_ref()).collect();
        sorted.sort_unstable();
        let Some(twice) = sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]) else {
            return Ok(());
        };
        let mut path = self.dotted_path();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(twice);
        Err(JsonError::DuplicateKey { path })
    }

    fn duplicate(&self) -> JsonError {
        JsonError::DuplicateKey {
            path: self.dotted_path(),
        }
    }

    /// The current position as keys and indices.
    fn path(&self) -> Vec<Value> {
        self.frames
            .iter()
            .filter_map(|frame| match frame {
                Frame::Object { key, .. } => key.as_ref().map(|k| Value::from(k.as_ref())),
                Frame::Array { index } => Some(Value::from(*index)),
            })
            .collect()
    }

    /// The current position as `args.lines[2].name`, for error messages.
    fn dotted_path(&self) -> String {
        let mut out = String::new();
        for frame in &self.frames {
            match frame {
                Frame::Object { key: Some(key), .. } => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(key);
                }
                Frame::Object { key: None, .. } => {}
                Frame::Array { index } => out.push_str(&format!("[{index}]")),
            }
        }
        out
    }
}

/// Index of the closing quote of the string opening at `start`.
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut j = start + 1;
    while j < bytes.len() {
        match bytes[j] {
            b'\\' => j += 2,
            b'"' => return j,
            _ => j += 1,
        }
    }
    bytes.len().saturating_sub(1)
}

/// Whether the value `serde_json` reads from `token` is written back (in
/// canonical JSON) as exactly `token`. Short integers are, without a look.
fn exact(token: &[u8]) -> bool {
    let integer = !token.iter().any(|c| matches!(c, b'.' | b'e' | b'E'));
    let digits = token.len() - usize::from(token.first() == Some(&b'-'));
    if integer && digits <= 18 && !token.starts_with(b"-0") {
        return true;
    }
    serde_json::from_slice::<Value>(token)
        .is_ok_and(|value| crate::canonical::to_string(&value).as_bytes() == token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn duplicate(body: &str) -> Option<String> {
        match parse(body.as_bytes()) {
            Err(JsonError::DuplicateKey { path }) => Some(path),
            Ok(_) => None,
            Err(other) => panic!("{body}: {other}"),
        }
    }

    #[test]
    fn duplicate_keys_anywhere_are_named() {
        assert_eq!(
            duplicate(r#"{"mode":"KILL_SWITCH","mode":"ALLOW"}"#).as_deref(),
            Some("mode")
        );
        assert_eq!(
            duplicate(r#"{"args":{"a":1,"b":{"c":[{"d":1,"d":2}]}}}"#).as_deref(),
            Some("args.b.c[0].d")
        );
        // An escape spells the same key.
        assert_eq!(
            duplicate(r#"{"mode":1,"\u006dode":2}"#).as_deref(),
            Some("mode")
        );
        // Equal keys in different objects, or a key equal to a value, are fine.
        assert_eq!(
            duplicate(r#"{"a":{"a":"a"},"b":{"a":1},"c":["a","a"]}"#),
            None
        );
        assert_eq!(duplicate(r#"{"a\"b":1,"a":2,"s":"x\\\"{"}"#), None);
    }

    #[test]
    fn duplicates_in_large_objects_are_found_too() {
        let mut keys: Vec<String> = (0..200).map(|i| format!("\"k{i}\":{i}")).collect();
        assert_eq!(duplicate(&format!("{{{}}}", keys.join(","))), None);
        keys.push("\"k150\":0".into());
        let body = format!("{{\"args\":{{{}}}}}", keys.join(","));
        assert_eq!(duplicate(&body).as_deref(), Some("args.k150"));
    }

    /// A tiny deterministic generator: no dependency, same cases every run.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, below: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % below
        }

        fn text(&mut self) -> String {
            const PIECES: [&str; 9] = ["a", "\"", "\\", "{", "}", "[", ",", "é", "\u{200B}"];
            (0..self.next(4))
                .map(|_| PIECES[self.next(PIECES.len() as u64) as usize])
                .collect()
        }

        fn value(&mut self, depth: u32) -> Value {
            match self.next(if depth > 4 { 4 } else { 6 }) {
                0 => Value::Null,
                1 => Value::from(self.next(1000) as i64 - 500),
                2 => Value::from(self.next(1000) as f64 / 8.0),
                3 => Value::from(self.text()),
                4 => Value::Array((0..self.next(4)).map(|_| self.value(depth + 1)).collect()),
                _ => Value::Object(
                    (0..self.next(5))
                        .map(|_| (self.text(), self.value(depth + 1)))
                        .collect(),
                ),
            }
        }
    }

    #[test]
    fn generated_documents_read_like_serde_json_and_a_repeated_key_is_always_found() {
        let mut rng = Lcg(11);
        for case in 0..2_000 {
            let value = rng.value(0);
            let text = serde_json::to_string(&value).unwrap();
            let parsed = parse(text.as_bytes()).unwrap_or_else(|e| panic!("{case}: {text}: {e}"));
            assert_eq!(parsed.value, value, "{case}: {text}");
            assert_eq!(parsed.numbers, [], "{case}: {text}");

            // The same document as the value of a key given twice.
            let key = serde_json::to_string(&rng.text()).unwrap();
            let twice = format!("{{{key}:{text},\"x\":1,{key}:2}}");
            assert!(
                matches!(parse(twice.as_bytes()), Err(JsonError::DuplicateKey { .. })),
                "{case}: {twice}"
            );
        }
    }

    #[test]
    fn malformed_json_is_malformed() {
        assert!(matches!(parse(b"{\"a\":"), Err(JsonError::Malformed(_))));
    }

    #[test]
    fn numbers_a_double_gives_back_are_not_kept() {
        let parsed =
            parse(br#"{"a":[1,-7,30.5,0.1,1.0,18446744073709551615,-9223372036854775808]}"#)
                .unwrap();
        assert_eq!(parsed.numbers, []);
    }

    #[test]
    fn other_numbers_are_kept_as_sent_with_their_path() {
        let parsed =
            parse(br#"{"args":{"amount":123456789012345678901234567890,"x":[1.50]},"b":1e20}"#)
                .unwrap();
        assert_eq!(
            parsed.numbers,
            [
                NumberAsSent {
                    path: vec![json!("args"), json!("amount")],
                    text: "123456789012345678901234567890".into()
                },
                NumberAsSent {
                    path: vec![json!("args"), json!("x"), json!(0)],
                    text: "1.50".into()
                },
                NumberAsSent {
                    path: vec![json!("b")],
                    text: "1e20".into()
                },
            ]
        );
    }
}
