//! How one tool call reaches the verifier, door by door, and what came back.
//!
//! Each door holds one client for the whole run (a pooled HTTP client, or
//! one gRPC channel as Envoy keeps one per worker), cloned per call as a
//! handle, never rebuilt: a new connection per request would measure the
//! load generator, not the verifier.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, socket_address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::google::protobuf::Timestamp;
use tonic::transport::Channel;

use crate::workload::ToolCall;

/// `google.rpc.Code::OK`.
const GRPC_OK: i32 = 0;
/// Where the workload's Check says the client connected, as Envoy would.
const ENVOY_LISTENER: &str = "127.0.0.1:10000";
const CLIENT_PEER: &str = "127.0.0.1:43210";

/// What one response amounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `/verify` said ALLOW; a Check answered OK; through Envoy, the
    /// upstream's 2xx.
    Allow,
    /// A decision body saying DENY or NEEDS_APPROVAL (403 through Envoy, 503
    /// when the verifier failed closed).
    Deny,
    /// Not a decision: a bad request, an unmapped route, an error page.
    Undecided,
}

#[derive(Debug)]
pub struct Reply {
    /// HTTP status the client saw (for the gRPC door: the one Envoy would send).
    pub status: u16,
    pub verdict: Verdict,
    /// For undecided replies only, something to show the operator.
    pub detail: Option<String>,
}

/// The one field of a decision body the tally needs; the rest is skipped
/// unparsed (a full `Value` per response was a tenth of the generator's CPU).
#[derive(serde::Deserialize)]
struct Decision<'a> {
    #[serde(borrow)]
    decision: std::borrow::Cow<'a, str>,
}

/// The verdict a JSON decision body states.
fn body_verdict(body: &[u8]) -> Verdict {
    match serde_json::from_slice::<Decision>(body).map(|d| d.decision) {
        Ok(decision) if decision == "ALLOW" => Verdict::Allow,
        Ok(decision) if decision == "DENY" || decision == "NEEDS_APPROVAL" => Verdict::Deny,
        _ => Verdict::Undecided,
    }
}

fn reply(status: u16, verdict: Verdict, body: &[u8]) -> Reply {
    let detail = (verdict == Verdict::Undecided).then(|| {
        let text = String::from_utf8_lossy(body);
        format!("{status} {}", text.chars().take(300).collect::<String>())
    });
    Reply {
        status,
        verdict,
        detail,
    }
}

#[derive(Clone)]
pub enum DoorClient {
    /// `POST {url}/verify`.
    Http {
        client: reqwest::Client,
        url: String,
    },
    /// `Authorization/Check` on the verifier's gRPC listener.
    Grpc {
        client: AuthorizationClient<Channel>,
    },
    /// The tool call itself, to an Envoy listener in front of an upstream.
    Envoy {
        client: reqwest::Client,
        base: String,
    },
}

impl DoorClient {
    /// `tls`: for an `https://` base, the CA that signs the verifier's
    /// certificate and, for mTLS, a client certificate.
    pub fn http(
        base: &str,
        connections: usize,
        tls: Option<&casf_verifier::tls::ClientTls>,
    ) -> Result<Self, String> {
        let client = match tls {
            None => http_client(connections)?,
            Some(tls) => {
                let config =
                    casf_verifier::tls::client_config("loadgen", tls).map_err(|e| e.to_string())?;
                casf_verifier::tls::http_client_builder()
                    .use_preconfigured_tls(config)
                    .pool_max_idle_per_host(connections)
                    .tcp_nodelay(true)
                    .build()
                    .map_err(|e| e.to_string())?
            }
        };
        Ok(DoorClient::Http {
            client,
            url: format!("{}/verify", base.trim_end_matches('/')),
        })
    }

    pub fn envoy(base: &str, connections: usize) -> Result<Self, String> {
        Ok(DoorClient::Envoy {
            client: http_client(connections)?,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Connects now, so that a wrong address fails the run before it starts.
    pub async fn grpc(url: &str) -> Result<Self, String> {
        let channel = Channel::from_shared(url.to_owned())
            .map_err(|e| format!("{url}: {e}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        Ok(DoorClient::Grpc {
            client: AuthorizationClient::new(channel),
        })
    }

    pub async fn send(&self, call: &ToolCall) -> Result<Reply, String> {
        match self {
            DoorClient::Http { client, url } => {
                let response = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(call.verify_body().to_string())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let body = response.bytes().await.map_err(|e| e.to_string())?;
                // The contract answers every decision with 200.
                let verdict = if status == 200 {
                    body_verdict(&body)
                } else {
                    Verdict::Undecided
                };
                Ok(reply(status, verdict, &body))
            }
            DoorClient::Envoy { client, base } => {
                let method = reqwest::Method::from_bytes(call.tool.method().as_bytes())
                    .map_err(|e| e.to_string())?;
                let mut request = client
                    .request(method, format!("{base}{}", call.target()))
                    .header("x-casf-request-id", &call.request_id)
                    .header("x-casf-role", call.role)
                    .header("x-casf-tenant-id", call.tenant)
                    .header("x-casf-mode", call.mode);
                if let Some(body) = call.http_body() {
                    request = request
                        .header("content-type", "application/json")
                        .body(body);
                }
                let response = request.send().await.map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let body = response.bytes().await.map_err(|e| e.to_string())?;
                let verdict = if (200..300).contains(&status) {
                    Verdict::Allow
                } else {
                    match body_verdict(&body) {
                        // An ALLOW body on an error status is not an allow.
                        Verdict::Allow => Verdict::Undecided,
                        other => other,
                    }
                };
                Ok(reply(status, verdict, &body))
            }
            DoorClient::Grpc { client } => {
                let response = client
                    .clone()
                    .check(check_request(call))
                    .await
                    .map_err(|status| format!("gRPC {:?}: {}", status.code(), status.message()))?
                    .into_inner();
                let code = response.status.as_ref().map(|s| s.code);
                Ok(match (code, response.http_response) {
                    (Some(GRPC_OK), Some(HttpResponse::OkResponse(_))) => Reply {
                        status: 200,
                        verdict: Verdict::Allow,
                        detail: None,
                    },
                    (_, Some(HttpResponse::DeniedResponse(denied))) => {
                        let status = denied
                            .status
                            .map_or(403, |s| u16::try_from(s.code).unwrap_or(0));
                        let verdict = match body_verdict(denied.body.as_bytes()) {
                            Verdict::Allow => Verdict::Undecided,
                            other => other,
                        };
                        reply(status, verdict, denied.body.as_bytes())
                    }
                    (code, other) => Reply {
                        status: 0,
                        verdict: Verdict::Undecided,
                        detail: Some(format!("status {code:?}, http_response {other:?}")),
                    },
                })
            }
        }
    }
}

fn http_client(connections: usize) -> Result<reqwest::Client, String> {
    casf_verifier::tls::http_client_builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| e.to_string())
}

fn peer(addr: &str) -> Option<Peer> {
    let addr: SocketAddr = addr.parse().ok()?;
    let ip: IpAddr = addr.ip();
    Some(Peer {
        address: Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                protocol: socket_address::Protocol::Tcp as i32,
                address: ip.to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                    addr.port(),
                ))),
                ..Default::default()
            })),
        }),
        ..Default::default()
    })
}

/// The Check Envoy's ext_authz filter sends for `call` arriving at the
/// shipped front proxy (`envoy/envoy.yaml`: `with_request_body` with
/// `pack_as_bytes`), with the identity in the route map's trusted headers.
pub fn check_request(call: &ToolCall) -> CheckRequest {
    let target = call.target();
    let body = call.http_body().unwrap_or_default();
    let envoy_request_id = uuid::Uuid::new_v4().to_string();
    let mut headers: HashMap<String, String> = [
        (":authority", "tools.clinic.local"),
        (":method", call.tool.method()),
        (":path", target.as_str()),
        (":scheme", "http"),
        ("accept", "*/*"),
        ("user-agent", "casf-loadgen"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", envoy_request_id.as_str()),
        ("x-casf-request-id", call.request_id.as_str()),
        ("x-casf-role", call.role),
        ("x-casf-tenant-id", call.tenant),
        ("x-casf-mode", call.mode),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if !body.is_empty() {
        headers.insert("content-type".into(), "application/json".into());
        headers.insert("content-length".into(), body.len().to_string());
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: peer(CLIENT_PEER),
            destination: peer(ENVOY_LISTENER),
            request: Some(AttrRequest {
                time: Some(Timestamp {
                    seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
                }),
                http: Some(HttpRequest {
                    id: envoy_request_id,
                    method: call.tool.method().to_owned(),
                    headers,
                    path: target,
                    host: "tools.clinic.local".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    // Envoy sends the content-length, or -1 for none.
                    size: if body.is_empty() {
                        -1
                    } else {
                        body.len() as i64
                    },
                    raw_body: body,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Scenario, Workload};
    use serde_json::Value;

    #[test]
    fn decision_bodies_are_read_and_anything_else_is_undecided() {
        assert_eq!(body_verdict(br#"{"decision":"ALLOW"}"#), Verdict::Allow);
        assert_eq!(body_verdict(br#"{"decision":"DENY"}"#), Verdict::Deny);
        assert_eq!(
            body_verdict(br#"{"decision":"NEEDS_APPROVAL"}"#),
            Verdict::Deny
        );
        assert_eq!(
            body_verdict(br#"{"detail":"role: bad"}"#),
            Verdict::Undecided
        );
        assert_eq!(body_verdict(b"upstream connect error"), Verdict::Undecided);
    }

    #[test]
    fn the_check_of_a_write_carries_the_body_and_the_route_maps_headers() {
        let call = Workload::new(Scenario::WriteAllow).call(3);
        let check = check_request(&call);
        let http = check.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(http.method, "POST");
        assert_eq!(http.path, "/cliniccloud/patients/p-3/appointments");
        assert_eq!(http.size, http.raw_body.len() as i64);
        assert_eq!(http.headers["x-casf-request-id"], call.request_id);
        assert_eq!(http.headers["x-casf-mode"], "ALLOW");
        let body: Value = serde_json::from_slice(&http.raw_body).unwrap();
        assert_eq!(body["slot"], "2026-12-01T09:00");
    }

    /// The gRPC door must carry the very call the HTTP door does, through
    /// the shipped route map with its identity headers trusted.
    #[test]
    fn every_mix_call_maps_back_to_its_verify_body() {
        use casf_verifier::domain::VerifyRequest;
        use casf_verifier::ext_authz::{routes::RouteMap, translate};
        let shipped = include_str!("../../envoy/routes.yaml");
        let trusted = shipped.replace("trusted: false", "trusted: true");
        assert_ne!(trusted, shipped, "the route map's trust setting moved");
        let routes = RouteMap::parse(&trusted).unwrap();
        let workload = Workload::new(Scenario::Mix);
        for n in 0..20 {
            let call = workload.call(n);
            let mapped = translate::tool_call_from(&routes, &check_request(&call), true).unwrap();
            let direct = VerifyRequest::from_value(call.verify_body()).unwrap();
            assert_eq!(mapped, direct, "call {n}: {call:?}");
        }
    }
}
