//! The OPA REST engine (`OPA_URL`): `POST {OPA_URL}/v1/data/casf` with
//! `{"input": ...}`, for deployments that run policy in an OPA server.
//!
//! One pooled keep-alive client serves the process, with a 350 ms budget per
//! evaluation (guide §6). Every failure is classified into the guide's
//! `kind`s, and an answer is read exactly as the embedded engine reads
//! `data.casf`: an undefined `allow` is `false`, undefined `violations` is
//! empty, anything else malformed is an error (never an allow). Error texts
//! never carry the URL, so credentials in `OPA_URL` cannot leak through them.

use std::error::Error as _;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{PolicyEngine, PolicyError, PolicyVerdict};
use crate::tls::ClientTls;

/// Budget of one evaluation: connect, send, answer (guide §6).
pub const EVALUATION_TIMEOUT: Duration = Duration::from_millis(350);
/// Largest answer read; `data.casf` is a few hundred bytes.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Idle keep-alive connections kept open to OPA.
const MAX_IDLE_CONNECTIONS: usize = 32;
/// The document queried, `data.casf`, with OPA's provenance (its version
/// and the revision of each bundle it serves) in the same answer, so the
/// audit row names the policy that made this decision, not one read later.
const DECISION_PATH: &str = "/v1/data/casf?provenance=true";
/// Longest revision text kept; a bundle revision is a short hash or tag.
const MAX_REVISION_CHARS: usize = 256;

/// Why `OPA_URL` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpaSetupError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    #[error("cannot create the HTTP client for OPA: {0}")]
    Client(String),
}

impl OpaSetupError {
    pub fn kind(&self) -> &'static str {
        match self {
            OpaSetupError::Tls(_) => "tls",
            OpaSetupError::Client(_) => "client",
        }
    }
}

#[derive(Debug)]
pub struct OpaPolicy {
    client: reqwest::Client,
    /// `{OPA_URL}/v1/data/casf`; credentials in it become a basic-auth header.
    endpoint: String,
}

impl OpaPolicy {
    /// `base_url` is `OPA_URL` without its trailing slash (see `config`);
    /// `tls` applies to an `https://` URL.
    pub fn new(base_url: &str, tls: &ClientTls) -> Result<Self, OpaSetupError> {
        let mut builder = crate::tls::http_client_builder();
        if base_url.starts_with("https://") {
            builder = builder
                .tls_backend_preconfigured(crate::tls::client_config("OPA", tls)?)
                .https_only(true);
        }
        let client = builder
            .timeout(EVALUATION_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS)
            .tcp_nodelay(true)
            // OPA never redirects; a redirect is somebody else answering.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| OpaSetupError::Client(describe(e)))?;
        Ok(OpaPolicy {
            client,
            endpoint: format!("{base_url}{DECISION_PATH}"),
        })
    }
}

/// The error and its causes, without the URL (which may hold credentials).
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A transport failure in the guide's kinds: no answer in time is `timeout`,
/// a connection that could not be made (refused, DNS) or broke is `unavailable`.
fn transport_error(error: reqwest::Error) -> PolicyError {
    if error.is_timeout() {
        PolicyError::Timeout
    } else {
        PolicyError::Unavailable(describe(error))
    }
}

/// Reads OPA's answer to `POST /v1/data/casf`.
fn verdict_from_answer(body: &[u8]) -> Result<PolicyVerdict, PolicyError> {
    let answer: Value = serde_json::from_slice(body)
        .map_err(|_| PolicyError::BadResponse("answer is not JSON".into()))?;
    let Some(result) = answer.get("result") else {
        return Err(PolicyError::BadResponse(
            "answer has no `result`: data.casf is undefined".into(),
        ));
    };
    let Value::Object(result) = result else {
        return Err(PolicyError::BadResponse(
            "data.casf is not an object".into(),
        ));
    };
    let allow = match result.get("allow") {
        None => false,
        Some(Value::Bool(allow)) => *allow,
        Some(_) => {
            return Err(PolicyError::BadResponse(
                "data.casf.allow is not a boolean".into(),
            ));
        }
    };
    let mut violations = match result.get("violations") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                PolicyError::BadResponse("data.casf.violations holds a non-string".into())
            })?,
        Some(_) => {
            return Err(PolicyError::BadResponse(
                "data.casf.violations is not a list".into(),
            ));
        }
    };
    // Same order as the embedded engine, whatever order OPA uses for sets.
    violations.sort();
    Ok(PolicyVerdict {
        allow,
        violations,
        revision: revision_of(&answer),
    })
}

/// The policy revision in OPA's `provenance`: each bundle's as
/// `name:revision`, sorted and comma-separated; else the legacy top-level
/// `revision`; else none (OPA serving policies it was given by hand).
/// Never an error: the provenance describes the answer, it is not the answer.
fn revision_of(answer: &Value) -> Option<String> {
    let provenance = answer.get("provenance")?;
    let mut bundles: Vec<String> = provenance
        .get("bundles")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(name, bundle)| {
            let revision = bundle.get("revision")?.as_str()?;
            Some(format!("{name}:{revision}"))
        })
        .collect();
    bundles.sort();
    let revision = match bundles.is_empty() {
        false => bundles.join(","),
        true => provenance
            .get("revision")
            .and_then(Value::as_str)
            .filter(|revision| !revision.is_empty())?
            .to_owned(),
    };
    Some(revision.chars().take(MAX_REVISION_CHARS).collect())
}

#[async_trait]
impl PolicyEngine for OpaPolicy {
    fn backend(&self) -> &'static str {
        "opa"
    }

    async fn evaluate(&self, input: &Value) -> Result<PolicyVerdict, PolicyError> {
        let mut response = self
            .client
            .post(&self.endpoint)
            .json(&json!({ "input": input }))
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        if status.as_u16() >= 400 {
            return Err(PolicyError::BadStatus(status.as_u16()));
        }
        if !status.is_success() {
            return Err(PolicyError::BadResponse(format!(
                "unexpected HTTP {}",
                status.as_u16()
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(PolicyError::BadResponse(format!(
                    "answer larger than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        verdict_from_answer(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn bad_response(body: &str) -> bool {
        matches!(
            verdict_from_answer(body.as_bytes()),
            Err(PolicyError::BadResponse(_))
        )
    }

    /// Answers every connection once with `status` and `body`, like a broken OPA.
    async fn stub(status: &'static str, body: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut request).await;
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn the_revision_is_each_bundles_sorted_else_the_legacy_one_else_none() {
        let revision = |answer: Value| {
            verdict_from_answer(answer.to_string().as_bytes())
                .unwrap()
                .revision
        };
        let result = json!({"allow": true});
        assert_eq!(
            revision(json!({"result": result, "provenance": {"bundles": {
                "zeta": {"revision": "r2"}, "alpha": {"revision": "r1"}, "no-revision": {}
            }}})),
            Some("alpha:r1,zeta:r2".into())
        );
        assert_eq!(
            revision(json!({"result": result, "provenance": {"revision": "legacy-7"}})),
            Some("legacy-7".into())
        );
        for unnamed in [
            json!({"result": result}),
            json!({"result": result, "provenance": {"version": "1.0"}}),
            json!({"result": result, "provenance": {"revision": ""}}),
            json!({"result": result, "provenance": "not an object"}),
        ] {
            assert_eq!(revision(unnamed.clone()), None, "{unnamed}");
        }
        // Kept bounded, whatever OPA sends.
        let long = "x".repeat(10_000);
        assert_eq!(
            revision(json!({"result": result, "provenance": {"revision": long}}))
                .map(|r| r.chars().count()),
            Some(MAX_REVISION_CHARS)
        );
    }

    #[tokio::test]
    async fn answer_without_result_is_bad_response() {
        let opa = OpaPolicy::new(&stub("200 OK", "{}").await, &ClientTls::default()).unwrap();
        let error = opa.evaluate(&json!({"tool": "x"})).await.unwrap_err();
        assert_eq!(
            error.kind(),
            crate::policy::PolicyErrorKind::BadResponse,
            "{error}"
        );
    }

    #[tokio::test]
    async fn http_errors_are_bad_status_and_a_full_answer_is_read() {
        let opa = OpaPolicy::new(
            &stub("503 Service Unavailable", "{}").await,
            &ClientTls::default(),
        )
        .unwrap();
        let error = opa.evaluate(&json!({})).await.unwrap_err();
        assert!(matches!(error, PolicyError::BadStatus(503)), "{error}");

        let answer = r#"{"result": {"allow": false, "violations": ["b", "a"]}}"#;
        let opa = OpaPolicy::new(&stub("200 OK", answer).await, &ClientTls::default()).unwrap();
        assert_eq!(
            opa.evaluate(&json!({})).await.unwrap(),
            PolicyVerdict {
                allow: false,
                violations: vec!["a".into(), "b".into()],
                revision: None,
            }
        );
    }

    #[tokio::test]
    async fn refused_connection_is_unavailable_and_never_shows_credentials() {
        // A port that was just free: nothing listens there.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opa = OpaPolicy::new(
            &format!("http://casf:S3cretPw@127.0.0.1:{port}"),
            &ClientTls::default(),
        )
        .unwrap();
        let error = opa.evaluate(&json!({})).await.unwrap_err();
        assert_eq!(
            error.kind(),
            crate::policy::PolicyErrorKind::Unavailable,
            "{error}"
        );
        let text = error.to_string();
        assert!(
            !text.contains("S3cretPw") && !text.contains("127.0.0.1"),
            "{text}"
        );
    }

    #[test]
    fn undefined_rules_read_like_the_embedded_engine() {
        assert_eq!(
            verdict_from_answer(br#"{"result": {}}"#).unwrap(),
            PolicyVerdict {
                allow: false,
                violations: vec![],
                revision: None,
            }
        );
        assert_eq!(
            verdict_from_answer(br#"{"result": {"allow": true, "other": 1}}"#).unwrap(),
            PolicyVerdict {
                allow: true,
                violations: vec![],
                revision: None,
            }
        );
    }

    #[test]
    fn malformed_answers_are_bad_response_never_allow() {
        for body in [
            "",
            "not json",
            "{}",
            r#"{"decision": {"allow": true}}"#,
            r#"{"result": true}"#,
            r#"{"result": null}"#,
            r#"{"result": {"allow": "true"}}"#,
            r#"{"result": {"allow": null}}"#,
            r#"{"result": {"allow": true, "violations": "x"}}"#,
            r#"{"result": {"allow": true, "violations": [1]}}"#,
        ] {
            assert!(bad_response(body), "{body}");
        }
    }

    #[test]
    fn https_needs_a_readable_ca_file() {
        crate::tls::install_crypto_provider();
        let tls = ClientTls {
            ca: Some("/nonexistent/opa-ca.pem".into()),
            ..ClientTls::default()
        };
        let err = OpaPolicy::new("https://opa:8181", &tls).unwrap_err();
        assert_eq!(err.kind(), "tls");
        assert!(err.to_string().starts_with("OPA TLS:"), "{err}");
    }
}
