//! `PG_DSN` parsing: the guide's libpq `key=value` form
//! (`dbname=casf user=casf password=SECRET host=pg port=5432`) as well as
//! `postgres://` URLs, into sqlx connect options.
//!
//! sqlx only reads URLs, so the `key=value` form is parsed here with libpq's
//! quoting rules. Errors name the offending key, never a value: the value
//! might be the password.

use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgSslMode};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DsnError(String);

/// `PG_DSN`, parsed once at configuration time into connect options. The
/// text is kept only as a secret, for masking foreign error text; `Debug`
/// shows where it connects and how, never the password.
#[derive(Clone)]
pub struct PgDsn {
    /// Boxed: the options are large, and `AuditBackend` is mostly moved.
    options: Box<PgConnectOptions>,
    raw: SecretString,
}

impl PgDsn {
    pub fn parse(dsn: &str) -> Result<Self, DsnError> {
        Ok(PgDsn {
            options: Box::new(parse(dsn)?),
            raw: SecretString::from(dsn.to_owned()),
        })
    }

    /// The connect options, password included: for sqlx only.
    pub fn options(&self) -> &PgConnectOptions {
        &self.options
    }

    /// The `sslmode` in effect, in libpq's words, for the startup line.
    pub fn ssl_mode(&self) -> &'static str {
        match self.options.get_ssl_mode() {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::VerifyFull => "verify-full",
        }
    }

    /// Every form in which the password could show up in text: as written,
    /// and percent-decoded for URLs (what the server and driver see).
    pub fn password_forms(&self) -> Vec<String> {
        let raw = self.raw.expose_secret().trim();
        if raw.contains("://") {
            crate::secret::SecretUrl::new(raw.to_owned()).password_forms()
        } else {
            password_of_pairs(raw).into_iter().collect()
        }
    }
}

impl std::fmt::Debug for PgDsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.options;
        f.debug_struct("PgDsn")
            .field("host", &o.get_host())
            .field("port", &o.get_port())
            .field("database", &o.get_database())
            .field("user", &o.get_username())
            .field("ssl_mode", &o.get_ssl_mode())
            .finish_non_exhaustive()
    }
}

/// Same text, same DSN; compared only by tests.
impl PartialEq for PgDsn {
    fn eq(&self, other: &Self) -> bool {
        self.raw.expose_secret() == other.raw.expose_secret()
    }
}

impl Eq for PgDsn {}

/// Connect options for `dsn`, in either form.
pub fn parse(dsn: &str) -> Result<PgConnectOptions, DsnError> {
    let dsn = dsn.trim();
    if let Some((scheme, _)) = dsn.split_once("://") {
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(DsnError(
                "a URL DSN must start with postgres:// or postgresql://".into(),
            ));
        }
        // sqlx's URL errors come from the `url` crate and never quote the input.
        return PgConnectOptions::from_str(dsn)
            .map_err(|e| DsnError(format!("not a valid postgres:// URL: {e}")));
    }
    from_pairs(&pairs(dsn)?)
}

/// The password in a `key=value` DSN, exactly as the server will see it.
pub fn password_of_pairs(dsn: &str) -> Option<String> {
    pairs(dsn)
        .ok()?
        .into_iter()
        .rev()
        .find(|(key, _)| key == "password")
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

fn from_pairs(pairs: &[(String, String)]) -> Result<PgConnectOptions, DsnError> {
    // Like libpq, PG* environment variables (PGPASSWORD included) fill in
    // what the DSN leaves out; ~/.pgpass is not read.
    let mut options = PgConnectOptions::new_without_pgpass();
    for (key, value) in pairs {
        options = match key.as_str() {
            "host" | "hostaddr" if value.contains(',') => {
                return Err(DsnError(format!("{key}: several hosts are not supported")));
            }
            "host" | "hostaddr" if value.starts_with('/') => options.socket(value),
            "host" | "hostaddr" => options.host(value),
            "port" => options.port(
                value
                    .parse()
                    .map_err(|_| DsnError("port: expected a number 1..=65535".into()))?,
            ),
            "dbname" => options.database(value),
            "user" => options.username(value),
            "password" => options.password(value),
            "sslmode" => options.ssl_mode(PgSslMode::from_str(value).map_err(|_| {
                DsnError(
                    "sslmode: expected disable, allow, prefer, require, verify-ca or verify-full"
                        .into(),
                )
            })?),
            "sslrootcert" => options.ssl_root_cert(value),
            "sslcert" => options.ssl_client_cert(value),
            "sslkey" => options.ssl_client_key(value),
            "application_name" => options.application_name(value),
            // The pool's own acquire timeout bounds connecting; accepted so
            // that DSNs written for libpq keep working.
            "connect_timeout" => options,
            other => return Err(DsnError(format!("unsupported key {other:?}"))),
        };
    }
    Ok(options)
}

/// Splits a libpq connection string into `(key, value)` pairs: whitespace
/// separated `key = value`, values optionally single-quoted, `\` escaping
/// the next character.
fn pairs(dsn: &str) -> Result<Vec<(String, String)>, DsnError> {
    let mut out = Vec::new();
    let mut chars = dsn.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(DsnError(format!(
                "expected key=value pairs or a postgres:// URL; {key:?} has no '='"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(DsnError(format!("{key}: unterminated quoted value"))),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(DsnError("a key=value pair has an empty key".into()));
        }
        out.push((key, value));
    }
    if out.is_empty() {
        return Err(DsnError(
            "expected key=value pairs or a postgres:// URL".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_guides_key_value_example() {
        let o = parse("dbname=casf user=casf password=SECRET host=pg port=5432").unwrap();
        assert_eq!(o.get_host(), "pg");
        assert_eq!(o.get_port(), 5432);
        assert_eq!(o.get_username(), "casf");
        assert_eq!(o.get_database(), Some("casf"));
    }

    #[test]
    fn parses_urls() {
        let o = parse("postgres://u:p%40ss@127.0.0.1:55432/audit").unwrap();
        assert_eq!(o.get_host(), "127.0.0.1");
        assert_eq!(o.get_port(), 55432);
        assert_eq!(o.get_database(), Some("audit"));
        assert!(parse("postgresql://u@h/db").is_ok());
        assert!(parse("mysql://u:p@h/db").is_err());
    }

    #[test]
    fn follows_libpq_quoting() {
        let p =
            pairs(r"password='it\'s a \\ secret' user = casf  host=/run/pg dbname=x\ y").unwrap();
        assert_eq!(
            p,
            vec![
                ("password".into(), r"it's a \ secret".into()),
                ("user".into(), "casf".into()),
                ("host".into(), "/run/pg".into()),
                ("dbname".into(), "x y".into()),
            ]
        );
        assert_eq!(
            password_of_pairs(r"user=casf password='it\'s a \\ secret'").as_deref(),
            Some(r"it's a \ secret")
        );
        let o = parse("host=/run/pg dbname=x password=''").unwrap();
        assert_eq!(
            o.get_socket().map(|p| p.display().to_string()).as_deref(),
            Some("/run/pg")
        );
    }

    #[test]
    fn a_parsed_dsn_never_shows_its_password() {
        for (text, forms) in [
            (
                "dbname=casf user=casf password='S3 cret' host=pg sslmode=verify-full",
                vec!["S3 cret"],
            ),
            (
                "postgres://casf:S3%40cret@pg:5432/casf?sslmode=require",
                vec!["S3%40cret", "S3@cret"],
            ),
        ] {
            let dsn = PgDsn::parse(text).unwrap();
            let debug = format!("{dsn:?}");
            assert!(!debug.contains("S3"), "{debug}");
            assert!(
                debug.contains("\"pg\"") && debug.contains("ssl_mode"),
                "{debug}"
            );
            assert_eq!(dsn.password_forms(), forms);
        }
        assert!(PgDsn::parse("host=pg").unwrap().password_forms().is_empty());
    }

    #[test]
    fn errors_name_the_key_but_never_echo_a_value() {
        for (dsn, key) in [
            ("password=hunter2 bogus=hunter2", "bogus"),
            ("password=hunter2 port=hunter2", "port"),
            ("password=hunter2 sslmode=hunter2", "sslmode"),
            ("password='hunter2", "password"),
            ("host=a,b password=hunter2", "host"),
        ] {
            let err = parse(dsn).unwrap_err().to_string();
            assert!(err.contains(key), "{dsn}: {err}");
            assert!(!err.contains("hunter2"), "{dsn}: {err}");
        }
        let err = parse("hunter2").unwrap_err().to_string();
        assert!(err.contains("key=value"), "{err}");
        let err = parse("postgres://u:hunter2@[::1/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
