//! `casf-verifier healthcheck`: the container's own liveness probe.
//!
//! The runtime image holds nothing but this binary (no shell, no curl), so
//! Docker's `HEALTHCHECK` and Kubernetes exec probes call the binary itself.
//! It asks `GET /health` on the HTTP door the configured `CASF_HTTP_ADDR`
//! names, exactly what an HTTP probe would, and answers with an exit code.
//! With `--grpc` it asks `grpc.health.v1.Health/Check` on `CASF_GRPC_ADDR`
//! instead, which is SERVING exactly when `/healthz` is ready.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

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
/// was wrong, for the operator reading `docker inspect`.
pub async fn probe(listen: SocketAddr) -> Result<(), String> {
    let url = format!("http://{}/health", probe_addr(listen));
    let client = crate::tls::http_client_builder()
        .timeout(PROBE_TIMEOUT)
        .no_proxy()
        .build()
        .map_err(|error| format!("cannot build the HTTP client: {error}"))?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|error| format!("{url}: {error}"))?;
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
/// server (service `""`).
pub async fn probe_grpc(listen: SocketAddr) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let uri = format!("http://{}", probe_addr(listen));
    let channel = tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|error| format!("{uri}: {error}"))?
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(PROBE_TIMEOUT)
        .connect()
        .await
        .map_err(|error| format!("{uri}: {error}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|status| format!("{uri}: {status}"))?
        .into_inner();
    match ServingStatus::try_from(answer.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(status) => Err(format!("{uri}: {}", status.as_str_name())),
        Err(_) => Err(format!("{uri}: unknown status {}", answer.status)),
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
        let error = probe(addr).await.unwrap_err();
        assert!(error.contains(&addr.to_string()), "{error}");
    }
}
