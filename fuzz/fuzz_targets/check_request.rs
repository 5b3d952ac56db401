//! Envoy CheckRequests through the shipped route map (envoy/routes.yaml),
//! the ext_authz door's translation to a tool call.
//!
//! The input is a small text format so seeds and the dictionary stay
//! readable and libFuzzer's mutations stay meaningful:
//!
//! ```text
//! METHOD TARGET
//! header-name: value          (any number; Envoy's lower-case header map)
//! @claim name: value          (a verified JWT claim, string)
//! @claimnum name: 1.5         (a verified JWT claim, number)
//! @size: 12                   (the request's size, when not the body's)
//! @unauthenticated            (the peer may not assert identities)
//! @raw                        (the body goes in raw_body, as bytes)
//! @map                        (headers go in header_map, as Envoy sends them
//!                              when configured to: repeated names kept)
//! @rawvalues                  (with @map: values in raw_value, as bytes)
//!                             (blank line)
//! body bytes
//! ```
//!
//! Invariants: nothing panics; a peer that may not assert identities gets
//! no tool call; a translated call is the one the route map names for that
//! method and path, with the JWT's role, the mode header (or the map's
//! default) and the request id header, each as sent; and it is a call the
//! `/verify` door takes unchanged (both doors accept the same calls). In a
//! header_map, a name sent once reads back as its value, whichever field
//! carries it.
#![no_main]

use std::collections::HashMap;
use std::sync::LazyLock;

use casf_verifier::domain::VerifyRequest;
use casf_verifier::ext_authz::routes::RouteMap;
use casf_verifier::ext_authz::translate::{self, tool_call_from};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use libfuzzer_sys::fuzz_target;

static ROUTES: LazyLock<RouteMap> = LazyLock::new(|| {
    RouteMap::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../envoy/routes.yaml"
    )))
    .expect("the shipped route map loads")
});

struct Input {
    check: CheckRequest,
    method: String,
    path: String,
    role_claim: Option<String>,
    authenticated: bool,
    /// With `@map`: the header lines as sent, in order.
    header_lines: Option<Vec<(String, String)>>,
}

fn input(data: &[u8]) -> Input {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &b""[..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n');
    let first = lines.next().unwrap_or_default();
    let (method, path) = first.split_once(' ').unwrap_or((first, ""));
    let mut headers = HashMap::new();
    let mut header_lines = Vec::new();
    let mut claims = Struct::default();
    let mut size = None;
    let mut authenticated = true;
    let mut raw = false;
    let mut map = false;
    let mut raw_values = false;
    for line in lines {
        match line {
            "@unauthenticated" => authenticated = false,
            "@raw" => raw = true,
            "@map" => map = true,
            "@rawvalues" => raw_values = true,
            _ => {
                let (name, value) = line.split_once(": ").unwrap_or((line, ""));
                let kind = if let Some(claim) = name.strip_prefix("@claim ") {
                    Some((claim, Kind::StringValue(value.to_owned())))
                } else if let Some(claim) = name.strip_prefix("@claimnum ") {
                    Some((claim, Kind::NumberValue(value.parse().unwrap_or(0.0))))
                } else if name == "@size" {
                    size = value.parse().ok();
                    None
                } else {
                    headers.insert(name.to_owned(), value.to_owned());
                    header_lines.push((name.to_owned(), value.to_owned()));
                    None
                };
                if let Some((claim, kind)) = kind {
                    claims
                        .fields
                        .insert(claim.to_owned(), PbValue { kind: Some(kind) });
                }
            }
        }
    }
    let jwt = &ROUTES.identity.jwt;
    let role_claim = match claims
        .fields
        .get(&jwt.role_claim)
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(role)) => Some(role.clone()),
        _ => None,
    };
    let metadata_context = (!claims.fields.is_empty()).then(|| {
        let payload = PbValue {
            kind: Some(Kind::StructValue(claims)),
        };
        Metadata {
            filter_metadata: [(
                jwt.metadata_namespace.clone(),
                Struct {
                    fields: [(jwt.payload_key.clone(), payload)].into(),
                },
            )]
            .into(),
            ..Default::default()
        }
    });
    let (body, raw_body) = match (raw, std::str::from_utf8(body)) {
        (false, Ok(text)) => (text.to_owned(), Vec::new()),
        _ => (String::new(), body.to_vec()),
    };
    let header_map = map.then(|| HeaderMap {
        headers: header_lines
            .iter()
            .map(|(key, value)| HeaderValue {
                key: key.clone(),
                value: if raw_values { String::new() } else { value.clone() },
                raw_value: if raw_values { value.clone().into_bytes() } else { Vec::new() },
            })
            .collect(),
    });
    if map {
        headers.clear();
    }
    let check = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    headers,
                    header_map,
                    size: size.unwrap_or(body.len().max(raw_body.len()) as i64),
                    body,
                    raw_body,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            metadata_context,
            ..Default::default()
        }),
    };
    Input {
        check,
        method: method.to_owned(),
        path: path.to_owned(),
        role_claim,
        authenticated,
        header_lines: map.then_some(header_lines),
    }
}

/// The HTTP attributes [`input`] always builds.
fn http_of(check: &CheckRequest) -> &HttpRequest {
    check
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .expect("the input has HTTP attributes")
}

fuzz_target!(|data: &[u8]| {
    let Input {
        check,
        method,
        path,
        role_claim,
        authenticated,
        header_lines,
    } = input(data);
    if let Some(lines) = &header_lines {
        let read = translate::headers(http_of(&check));
        for (name, value) in lines {
            let lower = name.to_ascii_lowercase();
            let sent = lines
                .iter()
                .filter(|(other, _)| other.eq_ignore_ascii_case(name))
                .count();
            if sent == 1 {
                assert_eq!(read.get(&lower), Some(value), "header {name} sent once");
            }
        }
    }
    let _ = translate::jwt_subject(&ROUTES, &check);
    let Ok(request) = tool_call_from(&ROUTES, &check, authenticated) else {
        return;
    };
    assert!(authenticated, "an unauthenticated peer got a tool call");

    // The route map's tool for this method and path, as the door splits the
    // target (fragment, then query, dropped).
    let route = path.split('#').next().unwrap_or_default();
    let route = route.split('?').next().unwrap_or_default();
    let resolved = ROUTES
        .resolve(&method, route)
        .expect("a translated Check has a good path")
        .expect("a translated Check has a route");
    assert_eq!(resolved.tool, request.tool, "{method} {path}");
    for (name, value) in &resolved.params {
        let got = request.subject.get(name).cloned().or_else(|| {
            request
                .args
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        });
        assert_eq!(
            got.as_deref(),
            Some(value.as_str()),
            "path parameter {name}"
        );
    }

    // Identity and mode as sent: the verified claim first, else (only if the
    // map trusts identity headers) the role header.
    let headers = translate::headers(http_of(&check));
    let trusted = &ROUTES.identity.headers;
    let role = role_claim.or_else(|| {
        trusted
            .trusted
            .then(|| headers.get(&trusted.role).cloned())
            .flatten()
    });
    assert_eq!(role.as_deref(), Some(request.role.as_str()));
    let mode = headers
        .get(&ROUTES.mode.header)
        .map_or(ROUTES.mode.default.as_str(), String::as_str);
    assert_eq!(mode, request.mode.as_str());
    assert_eq!(
        translate::request_id(&headers),
        Some(request.request_id.as_str())
    );

    // Both doors accept the same calls: the call as a /verify body is taken
    // unchanged, and its audit payload reads back.
    let text = serde_json::to_string(&request.to_value()).expect("a request serialises");
    let wrapped = format!(r#"{{"row":{{"request":{text}}}}}"#);
    serde_json::from_str::<serde_json::Value>(&wrapped).expect("the audit payload reads back");
    let via_verify = VerifyRequest::from_slice(text.as_bytes()).expect("/verify takes the call");
    assert_eq!(via_verify.policy_input(), request.policy_input());
    assert_eq!(via_verify.request_id, request.request_id);
    let _ = request.fingerprint();
});
