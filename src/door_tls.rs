//! TLS on the doors: HTTPS on the HTTP door and TLS on the gRPC door
//! (`CASF_TLS_CERT`, `CASF_TLS_KEY`), with a client certificate required and
//! verified against `CASF_TLS_CLIENT_CA` when that is set (mTLS).
//!
//! The files are watched (every [`RELOAD_INTERVAL`]) rather than read once,
//! because cert-manager and SPIFFE agents rotate them in place and a restart
//! would drop every connection. Each handshake takes the configuration in
//! force when it starts, so connections already open keep theirs. A new set
//! of files that does not load (unreadable, a key that does not match the
//! certificate, an empty CA) is refused and logged, and the old one stays.
//!
//! The accept loops are this crate's own (see `connections`), not tonic's or
//! axum-server's TLS, which load their certificates once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::metrics::Metrics;
use crate::peer::PeerIdentity;

/// How often the certificate, key and client CA files are re-read.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The door TLS files, as configured (paths, never contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoorTlsFiles {
    /// `CASF_TLS_CERT`: PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// `CASF_TLS_KEY`: its PEM private key.
    pub key: PathBuf,
    /// `CASF_TLS_CLIENT_CA`: PEM CA certificates that sign client
    /// certificates; set, a client without such a certificate is refused.
    pub client_ca: Option<PathBuf>,
}

/// Why the door TLS files do not load; names the variable and the file,
/// never a file's contents (the key is a secret).
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct DoorTlsError {
    pub var: &'static str,
    pub reason: String,
}

/// Which door a handshake is for: they differ in ALPN only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsDoor {
    Http,
    Grpc,
}

impl TlsDoor {
    pub const ALL: [TlsDoor; 2] = [TlsDoor::Http, TlsDoor::Grpc];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsDoor::Http => "http",
            TlsDoor::Grpc => "grpc",
        }
    }
}

/// Which certificate `casf_tls_cert_expiry_timestamp_seconds` is about.
pub const EXPIRY_CERTS: [&str; 2] = ["server", "client_ca"];

/// The server configurations built from one reading of the files.
struct Material {
    http: Arc<ServerConfig>,
    grpc: Arc<ServerConfig>,
    /// notAfter of the server's leaf certificate, Unix seconds.
    server_not_after: Option<i64>,
    /// The earliest notAfter among the client CA certificates.
    client_ca_not_after: Option<i64>,
}

/// The door TLS in force, and the watch that replaces it.
pub struct DoorTls {
    files: DoorTlsFiles,
    current: RwLock<Arc<Material>>,
    /// Digest of the files last looked at, loaded or refused, so that a
    /// refused set is logged once rather than every interval.
    seen: Mutex<[u8; 32]>,
    metrics: Arc<Metrics>,
}

/// What one look at the files found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Loaded,
    Refused(String),
}

impl DoorTls {
    /// Loads the files, refusing to start if they do not make a server
    /// configuration.
    pub fn load(files: DoorTlsFiles, metrics: Arc<Metrics>) -> Result<Arc<Self>, DoorTlsError> {
        crate::tls::install_crypto_provider();
        let (contents, digest) = read_files(&files)?;
        let material = build(&files, &contents)?;
        let tls = DoorTls {
            files,
            current: RwLock::new(Arc::new(material)),
            seen: Mutex::new(digest),
            metrics,
        };
        tls.publish_expiry();
        Ok(Arc::new(tls))
    }

    /// Whether clients must present a certificate signed by the client CA.
    pub fn requires_client_certs(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self, door: TlsDoor) -> TlsAcceptor {
        let material = self.material();
        TlsAcceptor::from(match door {
            TlsDoor::Http => material.http.clone(),
            TlsDoor::Grpc => material.grpc.clone(),
        })
    }

    fn material(&self) -> Arc<Material> {
        // A poisoned lock still holds a complete configuration: the writer
        // swaps one Arc for another.
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn handshake_failed(&self, door: TlsDoor) {
        self.metrics.tls_handshake_failed(door);
    }

    /// Re-reads the files; a changed set that loads replaces the old one.
    pub fn reload(&self) -> Reload {
        let (contents, digest) = match read_files(&self.files) {
            Ok(read) => read,
            // Mid-rotation a file may be briefly missing: refused until it is back.
            Err(error) => return self.refused(None, error),
        };
        {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == digest {
                return Reload::Unchanged;
            }
        }
        match build(&self.files, &contents) {
            Ok(material) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
                *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = digest;
                self.publish_expiry();
                self.metrics.tls_reloaded(true);
                tracing::info!(
                    cert = %self.files.cert.display(),
                    "door TLS certificate reloaded: new handshakes use it, open connections keep theirs"
                );
                Reload::Loaded
            }
            Err(error) => self.refused(Some(digest), error),
        }
    }

    fn refused(&self, digest: Option<[u8; 32]>, error: DoorTlsError) -> Reload {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // An unreadable file has no digest: log it once until it changes.
        let digest = digest.unwrap_or_else(|| Sha256::digest(error.to_string()).into());
        if *seen != digest {
            *seen = digest;
            self.metrics.tls_reloaded(false);
            tracing::error!(
                %error,
                "door TLS files changed but do not load: the previous certificate stays in use"
            );
        }
        Reload::Refused(error.to_string())
    }

    fn publish_expiry(&self) {
        let material = self.material();
        if let Some(at) = material.server_not_after {
            self.metrics.tls_cert_expiry("server", at);
        }
        if let Some(at) = material.client_ca_not_after {
            self.metrics.tls_cert_expiry("client_ca", at);
        }
    }

    /// Re-reads the files every [`RELOAD_INTERVAL`] until `stop` resolves.
    pub async fn follow(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return,
            }
            let tls = self.clone();
            // File reads and key parsing are blocking work.
            if let Err(error) = tokio::task::spawn_blocking(move || tls.reload()).await {
                tracing::error!(%error, "door TLS reload task failed");
            }
        }
    }

    /// What the handshake proved about the peer: the URI and DNS SANs of its
    /// certificate when a client CA verified it, and its address.
    pub fn peer_identity(
        &self,
        connection: &rustls::ServerConnection,
        remote: Option<SocketAddr>,
    ) -> PeerIdentity {
        let sans = match (self.requires_client_certs(), connection.peer_certificates()) {
            (true, Some([leaf, ..])) => certificate_sans(leaf),
            _ => Vec::new(),
        };
        PeerIdentity { sans, remote }
    }
}

/// The URI SANs, then the DNS SANs, of a certificate.
pub fn certificate_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(cert) => cert
            .valid_uri_names()
            .chain(cert.valid_dns_names())
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    }
}

struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read_files(files: &DoorTlsFiles) -> Result<(Contents, [u8; 32]), DoorTlsError> {
    let read = |var: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| DoorTlsError {
            var,
            reason: format!("cannot read {}: {e}", path.display()),
        })
    };
    let contents = Contents {
        cert: read("CASF_TLS_CERT", &files.cert)?,
        key: read("CASF_TLS_KEY", &files.key)?,
        client_ca: match &files.client_ca {
            Some(path) => Some(read("CASF_TLS_CLIENT_CA", path)?),
            None => None,
        },
    };
    let mut digest = Sha256::new();
    for part in [&contents.cert, &contents.key] {
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    if let Some(ca) = &contents.client_ca {
        digest.update(ca);
    }
    Ok((contents, digest.finalize().into()))
}

fn certs(
    var: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, DoorTlsError> {
    let fail = |reason: String| DoorTlsError { var, reason };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(fail(format!("no PEM certificate in {}", path.display())));
    }
    Ok(certs)
}

fn build(files: &DoorTlsFiles, contents: &Contents) -> Result<Material, DoorTlsError> {
    let chain = certs("CASF_TLS_CERT", &files.cert, &contents.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| DoorTlsError {
        var: "CASF_TLS_KEY",
        reason: format!(
            "no readable PEM private key in {} ({e})",
            files.key.display()
        ),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DoorTlsError {
            var: "CASF_TLS_CERT",
            reason: e.to_string(),
        })?;
    let (builder, client_ca_not_after) = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let cas = certs("CASF_TLS_CLIENT_CA", path, pem)?;
            let earliest = cas.iter().filter_map(|c| not_after(c)).min();
            let mut roots = rustls::RootCertStore::empty();
            for ca in cas {
                roots.add(ca).map_err(|e| DoorTlsError {
                    var: "CASF_TLS_CLIENT_CA",
                    reason: format!("{}: {e}", path.display()),
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| DoorTlsError {
                var: "CASF_TLS_CLIENT_CA",
                reason: format!("{}: {e}", path.display()),
            })?;
            (builder.with_client_cert_verifier(verifier), earliest)
        }
        _ => (builder.with_no_client_auth(), None),
    };
    let server_not_after = not_after(&chain[0]);
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| DoorTlsError {
            var: "CASF_TLS_KEY",
            reason: format!("{} and {}: {e}", files.cert.display(), files.key.display()),
        })?;
    let mut http = config.clone();
    http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut grpc = config;
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Material {
        http: Arc::new(http),
        grpc: Arc::new(grpc),
        server_not_after,
        client_ca_not_after,
    })
}

/// One DER element: tag, contents, and what follows it.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A certificate's notAfter, Unix seconds: read for the expiry metric only
/// (rustls verifies validity itself), so a certificate this cannot read just
/// has no series.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, cert, _) = der_next(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der_next(cert)? else {
        return None;
    };
    // [0] version (optional), serial, signature algorithm, issuer, validity.
    let (tag, _, mut rest) = der_next(tbs)?;
    let skip = if tag == 0xa0 { 3 } else { 2 };
    for _ in 0..skip {
        rest = der_next(rest)?.2;
    }
    let (SEQUENCE, validity, _) = der_next(rest)? else {
        return None;
    };
    let (_, _, after) = der_next(validity)?;
    let (tag, time, _) = der_next(after)?;
    let time = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let full = match tag {
        // UTCTime, YYMMDDHHMMSSZ: years 50-99 are 19xx (RFC 5280).
        0x17 => {
            let yy: u32 = time.get(..2)?.parse().ok()?;
            format!("{}{time}", if yy >= 50 { "19" } else { "20" })
        }
        // GeneralizedTime, YYYYMMDDHHMMSSZ.
        0x18 => time.to_owned(),
        _ => return None,
    };
    chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%S")
        .ok()
        .map(|t| t.and_utc().timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_that_overrun_are_refused() {
        assert_eq!(der_next(&[0x30, 0x03, 1, 2]), None);
        assert_eq!(der_next(&[0x30, 0x82, 0x00]), None);
        assert_eq!(
            der_next(&[0x30, 0x01, 7, 9]),
            Some((0x30, &[7][..], &[9][..]))
        );
        assert_eq!(not_after(b"not a certificate"), None);
        assert_eq!(not_after(&[]), None);
    }

    #[test]
    fn missing_files_name_their_variable() {
        let files = DoorTlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
        };
        let Err(error) = DoorTls::load(files, Arc::new(Metrics::new())) else {
            panic!("loaded without files")
        };
        assert_eq!(error.var, "CASF_TLS_CERT");
        assert!(error.reason.contains("/nonexistent/cert.pem"), "{error}");
    }
}
