//! `casf-verifier healthcheck`: the container's own liveness probe.
//!
//! The runtime image holds nothing but this binary (no shell, no curl), so
//! Docker's `HEALTHCHECK` and Kubernetes exec probes call the binary itself.
//! It asks `GET /health` on the HTTP door the configured `CASF_HTTP_ADDR`
//! names, exactly what an HTTP probe would, and answers with an exit code.
//! With `--grpc` it asks `grpc.health.v1.Health/Check` on `CASF_GRPC_ADDR`
//! instead, which is SERVING exactly when `/healthz` is ready.
//!
//! With TLS on the doors (`CASF_TLS_CERT`), the probe speaks TLS too, and
//! authenticates the server by pinning: it accepts exactly the leaf
//! certificate in `CASF_TLS_CERT`, whatever names it carries (a mesh
//! certificate names the Service, not the loopback address the probe
//! dials), and no CA is needed to find it. When the doors require client
//! certificates (`CASF_TLS_CLIENT_CA`), the probe presents the server's own
//! certificate and key, so that certificate must be one the client CA signs
//! for client authentication (SPIFFE SVIDs and cert-manager's defaults are).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::door_tls::DoorTlsFiles;

/// How long the probe waits for the whole answer. Below Docker's and
/// Kubernetes' default probe timeouts, so the probe, not its runner, decides.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where to reach a server listening on `listen`: a wildcard listener is
/// reached on loopback of the same family.
pub fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `Ok` when `/health` answers 200 with `{"status":"ok"}`; otherwise what
/// was wrong, for the operator reading `docker inspect`. `tls`: the doors'
/// TLS files, when the doors serve TLS.
pub async fn probe(listen: SocketAddr, tls: Option<&DoorTlsFiles>) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}/health", probe_addr(listen));
    let mut builder = crate::tls::http_client_builder()
        .timeout(PROBE_TIMEOUT)
        .no_proxy();
    if let Some(files) = tls {
        builder = builder.use_preconfigured_tls(probe_tls_config(files, Vec::new())?);
    }
    let client = builder
        .build()
        .map_err(|error| format!("cannot build the HTTP client: {error}"))?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|error| format!("{url}: {}", explained(&error, tls)))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|error| format!("{url}: {status}, body is not JSON: {error}"))?;
    if status.is_success() && body["status"] == "ok" {
        Ok(())
    } else {
        Err(format!("{url}: {status} {body}"))
    }
}

/// `Ok` when the gRPC door's health service answers SERVING for the whole
/// server (service `""`), over TLS when `tls` is given.
pub async fn probe_grpc(listen: SocketAddr, tls: Option<&DoorTlsFiles>) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let addr = probe_addr(listen);
    // tonic is built without TLS of its own: the TLS stream comes from this
    // connector, and tonic speaks HTTP/2 over it as over plain TCP.
    let uri = format!("http://{addr}");
    let shown = match tls {
        Some(_) => format!("grpcs://{addr}"),
        None => uri.clone(),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|error| format!("{shown}: {error}"))?
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(PROBE_TIMEOUT);
    let channel = match tls {
        None => endpoint.connect().await,
        Some(files) => {
            let config = Arc::new(probe_tls_config(files, vec![b"h2".to_vec()])?);
            let connector = tower::service_fn(move |_: tonic::transport::Uri| {
                let config = config.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let name = ServerName::IpAddress(addr.ip().into());
                    let stream = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            });
            endpoint.connect_with_connector(connector).await
        }
    }
    .map_err(|error| format!("{shown}: {}", explained(&error, tls)))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|status| format!("{shown}: {}", explained(&status, tls)))?
        .into_inner();
    match ServingStatus::try_from(answer.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(status) => Err(format!("{shown}: {}", status.as_str_name())),
        Err(_) => Err(format!("{shown}: unknown status {}", answer.status)),
    }
}

/// The probe's TLS client: trusts exactly the served leaf certificate of
/// `CASF_TLS_CERT`, and presents that certificate and its key when the
/// doors require client certificates.
fn probe_tls_config(
    files: &DoorTlsFiles,
    alpn: Vec<Vec<u8>>,
) -> Result<rustls::ClientConfig, String> {
    crate::tls::install_crypto_provider();
    // Never empty: read_certs refuses a file without a certificate.
    let chain = crate::tls::read_certs(&files.cert).map_err(|e| format!("CASF_TLS_CERT: {e}"))?;
    let leaf = chain
        .first()
        .cloned()
        .ok_or_else(|| "CASF_TLS_CERT: no PEM certificate".to_owned())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedLeaf {
        leaf,
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = if files.client_ca.is_some() {
        // Read only to present it; the key is never shown, only its path.
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
            format!(
                "CASF_TLS_KEY {}: no readable PEM private key ({e})",
                files.key.display()
            )
        })?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("CASF_TLS_CERT and CASF_TLS_KEY as a client certificate: {e}"))?
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = alpn;
    Ok(config)
}

const NOT_PINNED: &str = "the server's certificate is not the one in CASF_TLS_CERT \
     (another server on this port, or a rotation not yet served)";

/// Accepts exactly one certificate: the one this server is configured to
/// serve. Not "dangerous" in the usual sense: the handshake signature is
/// still checked against it, so only the holder of `CASF_TLS_KEY` passes.
#[derive(Debug)]
struct PinnedLeaf {
    leaf: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(NOT_PINNED.into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// An error with its sources, which is where the TLS reason is.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text
}

/// The error with its sources and, when the doors require client
/// certificates and the server was not the one at fault, the likely cause:
/// a server certificate the client CA does not accept for client
/// authentication.
fn explained(error: &dyn std::error::Error, tls: Option<&DoorTlsFiles>) -> String {
    let text = chain(error);
    match tls {
        Some(files) if files.client_ca.is_some() && !text.contains(NOT_PINNED) => format!(
            "{text} (the doors require client certificates: the probe presents \
             CASF_TLS_CERT, which CASF_TLS_CLIENT_CA must sign for client authentication)"
        ),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_probed_on_loopback() {
        let cases = [
            ("0.0.0.0:8000", "127.0.0.1:8000"),
            ("[::]:8000", "[::1]:8000"),
            ("10.1.2.3:8001", "10.1.2.3:8001"),
            ("127.0.0.1:8002", "127.0.0.1:8002"),
        ];
        for (listen, probed) in cases {
            assert_eq!(
                probe_addr(listen.parse().unwrap()),
                probed.parse::<SocketAddr>().unwrap(),
                "{listen}"
            );
        }
    }

    #[tokio::test]
    async fn nothing_listening_is_unhealthy_and_says_where_it_looked() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = probe(addr, None).await.unwrap_err();
        assert!(error.contains(&addr.to_string()), "{error}");
    }
}
