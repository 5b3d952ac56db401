//! Backend URLs that may carry a password (`REDIS_URL`, `OPA_URL`), held so
//! that the password cannot be printed by accident: `Debug` and
//! [`SecretUrl::redacted`] show the URL with `***` for the password, and
//! the full text is reached only through [`SecretUrl::expose`], at the one
//! place that hands it to a client library.

use secrecy::{ExposeSecret, SecretString};

#[derive(Clone)]
pub struct SecretUrl {
    url: SecretString,
    /// The URL with its password replaced by `***`, computed once.
    redacted: String,
}

impl SecretUrl {
    pub fn new(url: String) -> Self {
        let redacted = redact(&url);
        SecretUrl {
            url: SecretString::from(url),
            redacted,
        }
    }

    /// The URL itself, password included: for the client library only.
    pub fn expose(&self) -> &str {
        self.url.expose_secret()
    }

    /// The URL with any password shown as `***`, for logs and messages.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    pub fn starts_with(&self, prefix: &str) -> bool {
        self.expose().starts_with(prefix)
    }

    /// The password as written and percent-decoded (what a server or a
    /// library error could echo), for masking foreign error text.
    pub fn password_forms(&self) -> Vec<String> {
        let Some((start, end)) = password_span(self.expose()) else {
            return Vec::new();
        };
        let written = &self.expose()[start..end];
        let mut forms = vec![written.to_owned()];
        if let Some(decoded) = percent_decode(written).filter(|d| d != written) {
            forms.push(decoded);
        }
        forms
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SecretUrl").field(&self.redacted).finish()
    }
}

/// Same URL, same secret; compared only by tests and config reloads.
impl PartialEq for SecretUrl {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for SecretUrl {}

/// Byte range of the password in `scheme://user:password@host...`: the
/// authority's userinfo, after its first `:` (RFC 3986; an `@` in the
/// password must be percent-encoded, so the last `@` of the authority ends it).
fn password_span(url: &str) -> Option<(usize, usize)> {
    let authority_start = url.find("://")? + 3;
    let rest = &url[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let at = authority.rfind('@')?;
    let colon = authority[..at].find(':')?;
    (colon + 1 < at).then_some((authority_start + colon + 1, authority_start + at))
}

fn redact(url: &str) -> String {
    match password_span(url) {
        Some((start, end)) => format!("{}***{}", &url[..start], &url[end..]),
        None => url.to_owned(),
    }
}

/// `%XX` escapes decoded; `None` if that is not valid UTF-8.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_shown_only_when_exposed() {
        let url = SecretUrl::new("redis://:6379@redis:6379/0".into());
        // Structural, not by string replacement: the port stays.
        assert_eq!(url.redacted(), "redis://:***@redis:6379/0");
        assert_eq!(
            format!("{url:?}"),
            r#"SecretUrl("redis://:***@redis:6379/0")"#
        );
        assert_eq!(url.expose(), "redis://:6379@redis:6379/0");
        assert_eq!(url.password_forms(), vec!["6379"]);

        let url = SecretUrl::new("https://casf:p%40ss@opa:8181/x?y=z@w".into());
        assert_eq!(url.redacted(), "https://casf:***@opa:8181/x?y=z@w");
        assert_eq!(url.password_forms(), vec!["p%40ss", "p@ss"]);

        for plain in ["http://opa:8181", "redis://user@redis/0", "rediss://:@r/0"] {
            let url = SecretUrl::new(plain.into());
            assert_eq!(url.redacted(), plain);
            assert!(url.password_forms().is_empty());
        }
    }
}
