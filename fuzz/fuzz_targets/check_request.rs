//! Envoy CheckRequests through the shipped route map: method, path,
//! headers and body from the fuzzer. Invariants: no panic, and a Check
//! that translates names a known tool, role and mode; the tool is the one
//! the route map gives for that method and path.
#![no_main]

use std::sync::LazyLock;

use casf_verifier::domain::{Mode, Role, Tool};
use casf_verifier::ext_authz::routes::RouteMap;
use casf_verifier::ext_authz::translate::tool_call;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use libfuzzer_sys::fuzz_target;

static ROUTES: LazyLock<RouteMap> = LazyLock::new(|| {
    RouteMap::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../envoy/routes.yaml"
    )))
    .expect("the shipped route map loads")
});

fuzz_target!(|input: (String, String, Vec<(String, String)>, String)| {
    let (method, path, headers, body) = input;
    let check = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.clone(),
                    path: path.clone(),
                    headers: headers.into_iter().collect(),
                    size: body.len() as i64,
                    body,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let Ok(request) = tool_call(&ROUTES, &check) else {
        return;
    };
    assert!(Tool::ALL.contains(&request.tool));
    assert!(Role::ALL.contains(&request.role));
    assert!(Mode::ALL.contains(&request.mode));
    // The target as the door splits it: fragment, then query, dropped.
    let route = path.split('#').next().unwrap_or_default();
    let route = route.split('?').next().unwrap_or_default();
    let resolved = ROUTES
        .resolve(&method, route)
        .expect("a translated Check has a good path")
        .expect("a translated Check has a route");
    assert_eq!(resolved.tool, request.tool, "{method} {path}");
});
