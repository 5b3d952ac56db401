//! TLS to the backends (Redis, OPA; PostgreSQL through sqlx), on one rustls
//! crypto provider, ring, for the whole process: mixing providers would
//! double the audited crypto and the build's C dependencies.
//!
//! A CA file, when given, is the only trust anchor for that backend (a
//! private CA must not be widened to every public one); without it the
//! system's roots apply. Verification is never switched off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Installs ring as the process's rustls provider, for libraries that build
/// their TLS configuration from the process default (sqlx). Idempotent.
pub fn install_crypto_provider() {
    // Err only means a provider is installed already: the same one, as this
    // build compiles no other.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A reqwest client builder. reqwest is built without a crypto provider of
/// its own (its default would be aws-lc), so every client, even a plain
/// `http://` one, needs the process provider installed first.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}

/// The TLS files of one backend, as configured (paths, never contents).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM file of the CA certificates that may sign the server's certificate.
    pub ca: Option<PathBuf>,
    /// PEM client certificate (chain) and its key, for servers that ask.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTls {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }
}

/// Why a backend's TLS configuration cannot be built; names the file, never
/// its contents (the key file is a secret).
#[derive(Debug, thiserror::Error)]
#[error("{backend} TLS: {reason}")]
pub struct TlsSetupError {
    pub backend: &'static str,
    pub reason: String,
}

/// A rustls client configuration for `backend` (named in errors).
pub fn client_config(
    backend: &'static str,
    tls: &ClientTls,
) -> Result<rustls::ClientConfig, TlsSetupError> {
    let fail = |reason: String| TlsSetupError { backend, reason };
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca {
        Some(path) => {
            for cert in read_certs(path).map_err(fail)? {
                roots
                    .add(cert)
                    .map_err(|e| fail(format!("CA file {}: {e}", path.display())))?;
            }
        }
        None => {
            // The system's roots; unreadable ones are skipped, as by libpq.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(fail(
                    "no CA file configured and no system CA certificates found".into(),
                ));
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| fail(e.to_string()))?
    .with_root_certificates(roots);
    match (&tls.cert, &tls.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert).map_err(fail)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                fail(format!(
                    "client key {}: no readable PEM private key ({e})",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| fail(format!("client certificate and key: {e}")))
        }
        _ => Err(fail(
            "a client certificate needs both the certificate and the key file".into(),
        )),
    }
}

/// How a startup TLS probe of a backend ended, when it did not succeed.
#[derive(Debug)]
pub enum ProbeError {
    /// No TCP connection (or no answer in time): an outage, retried later.
    Unreachable(String),
    /// The handshake failed: certificates or protocol, a configuration
    /// error (or an impostor) that waiting will not fix.
    Handshake(String),
}

/// One TLS handshake with `host:port` under `config`, so a certificate that
/// does not verify is reported at startup rather than as endless
/// reconnecting. Blocking: run it off the async threads.
pub fn probe_handshake(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
    timeout: std::time::Duration,
) -> Result<(), ProbeError> {
    use std::net::ToSocketAddrs;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| ProbeError::Handshake(format!("{host:?} is not a valid server name: {e}")))?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| ProbeError::Unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| ProbeError::Unreachable(format!("{host} has no address")))?;
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| ProbeError::Unreachable(e.to_string()))?;
    let unreachable = |e: std::io::Error| ProbeError::Unreachable(e.to_string());
    tcp.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    tcp.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    let mut conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| ProbeError::Handshake(e.to_string()))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                ProbeError::Unreachable(format!("no TLS answer within {timeout:?}"))
            }
            _ => ProbeError::Handshake(e.to_string()),
        })?;
    }
    conn.send_close_notify();
    // Best effort: the server learns we are done; nothing depends on it.
    let _ = conn.complete_io(&mut tcp);
    Ok(())
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no PEM certificate in {}", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_and_half_client_certs_are_named() {
        install_crypto_provider();
        let tls = ClientTls {
            ca: Some("/nonexistent/ca.pem".into()),
            ..ClientTls::default()
        };
        let err = client_config("Redis", &tls).unwrap_err().to_string();
        assert!(
            err.starts_with("Redis TLS:") && err.contains("/nonexistent/ca.pem"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let tls = ClientTls {
            ca: Some(empty),
            ..ClientTls::default()
        };
        assert!(
            client_config("OPA", &tls)
                .unwrap_err()
                .to_string()
                .contains("no PEM certificate")
        );
    }
}
