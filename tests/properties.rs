//! Property tests of everything that reads untrusted input: `/verify`
//! bodies, Envoy CheckRequests, route templates and `PG_DSN`. The invariants
//! are the ones a security gate lives by: no input panics, and an unknown
//! tool, role or mode is never decided.
//!
//! The number of cases is proptest's `PROPTEST_CASES` (256 by default, what
//! CI runs); a longer run is `PROPTEST_CASES=20000 cargo test --test
//! properties`. The canonical-JSON round trip through PostgreSQL's JSONB is in
//! `tests/api/properties_pg.rs`, as it needs the database.

use std::sync::LazyLock;

use casf_verifier::domain::{Mode, Role, Tool, VerifyRequest};
use casf_verifier::ext_authz::routes::RouteMap;
use casf_verifier::ext_authz::translate::{CheckError, tool_call_from};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use proptest::prelude::*;
use serde_json::{Value, json};

/// A wire name from `known`, or (as often) any string at all.
fn wire_name(known: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(known).prop_map(str::to_owned),
        ".{0,24}",
        // Near misses: case, whitespace and look-alikes of real names.
        proptest::sample::select(known).prop_map(|name| name.to_uppercase()),
        proptest::sample::select(known).prop_map(|name| format!(" {name}")),
    ]
}

/// The wire names of one closed enum, for strategies that pick from them.
fn names<T: Copy>(all: &[T], name: fn(T) -> &'static str) -> Vec<&'static str> {
    all.iter().map(|v| name(*v)).collect()
}
static TOOLS: LazyLock<Vec<&'static str>> = LazyLock::new(|| names(Tool::ALL, Tool::as_str));
static ROLES: LazyLock<Vec<&'static str>> = LazyLock::new(|| names(Role::ALL, Role::as_str));
static MODES: LazyLock<Vec<&'static str>> = LazyLock::new(|| names(Mode::ALL, Mode::as_str));
fn tools() -> &'static [&'static str] {
    &TOOLS
}
fn roles() -> &'static [&'static str] {
    &ROLES
}
fn modes() -> &'static [&'static str] {
    &MODES
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A `/verify` body whose enum fields may or may not be real names.
fn verify_body() -> impl Strategy<Value = (Value, String, String, String)> {
    (
        wire_name(tools()),
        wire_name(roles()),
        wire_name(modes()),
        "[a-z0-9-]{1,16}",
        ".{0,16}",
        any_json(),
    )
        .prop_map(|(tool, role, mode, request_id, patient, args)| {
            let body = json!({
                "request_id": request_id, "tool": tool, "mode": mode, "role": role,
                "subject": {"patient_id": patient}, "args": args,
                "context": {"tenant_id": "clinic-a"}});
            (body, tool, role, mode)
        })
}

proptest! {
    #[test]
    fn any_bytes_are_answered_without_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = VerifyRequest::from_slice(&bytes);
    }

    #[test]
    fn an_unknown_tool_role_or_mode_is_never_decided((body, tool, role, mode) in verify_body()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        let known = tools().contains(&tool.as_str())
            && roles().contains(&role.as_str())
            && modes().contains(&mode.as_str());
        match VerifyRequest::from_slice(&bytes) {
            Ok(request) => {
                prop_assert!(known, "decided with tool {tool:?} role {role:?} mode {mode:?}");
                prop_assert_eq!(request.tool.as_str(), tool.as_str());
                prop_assert_eq!(request.role.as_str(), role.as_str());
                prop_assert_eq!(request.mode.as_str(), mode.as_str());
            }
            Err(error) => prop_assert!((400..500).contains(&error.status())),
        }
    }

    #[test]
    fn a_mutated_body_never_panics((body, _, _, _) in verify_body(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let mut bytes = serde_json::to_vec(&body).unwrap();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(request) = VerifyRequest::from_slice(&bytes) {
            prop_assert!(tools().contains(&request.tool.as_str()));
        }
    }
}

fn shipped_routes() -> RouteMap {
    RouteMap::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/envoy/routes.yaml"
    )))
    .unwrap()
}

fn check(method: &str, path: &str, headers: Vec<(String, String)>, body: String) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers: headers.into_iter().collect(),
                    size: body.len() as i64,
                    body,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// A path segment: ordinary, empty, dot-segments, encoded slashes and dots,
/// non-ASCII and invisible characters.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9-]{1,12}",
        Just(String::new()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("a%2Fb".to_owned()),
        Just("%2F".to_owned()),
        Just("pat%E2%80%8B1".to_owned()),
        ".{0,8}",
    ]
}

proptest! {
    #[test]
    fn any_check_request_is_translated_or_refused_without_a_panic(
        method in prop_oneof![Just("GET".to_owned()), Just("POST".to_owned()), Just("DELETE".to_owned()), "[A-Z]{1,7}"],
        prefix in prop_oneof![Just("cliniccloud".to_owned()), Just("twilio".to_owned()), Just("stripe".to_owned()), "[a-z]{1,8}"],
        patient in segment(),
        tail in prop_oneof![Just("appointments".to_owned()), Just("sms".to_owned()), Just("invoices".to_owned()), Just("history".to_owned()), "[a-z]{0,8}"],
        role in wire_name(roles()),
        mode in wire_name(modes()),
        body in any_json(),
    ) {
        let routes = shipped_routes();
        let path = format!("/{prefix}/patients/{patient}/{tail}");
        let headers = vec![
            ("x-request-id".to_owned(), "prop-1".to_owned()),
            ("x-casf-role".to_owned(), role),
            ("x-casf-tenant-id".to_owned(), "clinic-a".to_owned()),
            ("x-casf-mode".to_owned(), mode.clone()),
            ("content-type".to_owned(), "application/json".to_owned()),
        ];
        let result = tool_call_from(&routes, &check(&method, &path, headers, body.to_string()), true);
        // What the route map sees: the path without its query string or
        // fragment (translation drops both).
        let path_only = path.split(['?', '#']).next().unwrap_or_default();
        let resolved = routes.resolve(&method, path_only);
        match result {
            Ok(request) => {
                // Decided only for a mapped route, a real mode, and a
                // patient id that names exactly one thing.
                let hit = resolved.ok().flatten();
                prop_assert!(hit.is_some(), "decided an unmapped {method} {path}");
                prop_assert_eq!(request.tool, hit.unwrap().tool);
                prop_assert!(modes().contains(&request.mode.as_str()));
                let id = request.patient_id().unwrap_or_default();
                prop_assert!(!id.is_empty() && id != "." && id != ".." && !id.contains('/'), "patient {id:?}");
            }
            Err(CheckError::Unmapped { .. }) => {
                prop_assert!(matches!(resolved, Ok(None)));
            }
            Err(_) => {}
        }
    }
}

proptest! {
    #[test]
    fn any_dsn_is_parsed_or_refused_without_a_panic(dsn in ".{0,80}") {
        let _ = casf_verifier::audit::pg_dsn::parse(&dsn);
    }

    #[test]
    fn libpq_quoting_round_trips(
        host in "[a-z][a-z0-9.-]{0,20}",
        port in 1u16..,
        user in "[^\u{0}]{1,16}",
        database in "[^\u{0}]{1,16}",
    ) {
        // libpq: single-quote a value, backslash-escape \ and '.
        let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let dsn = format!(
            "host={host} port={port} user={} dbname={}",
            quote(&user),
            quote(&database)
        );
        let options = casf_verifier::audit::pg_dsn::parse(&dsn).unwrap();
        prop_assert_eq!(options.get_host(), host.as_str());
        prop_assert_eq!(options.get_port(), port);
        prop_assert_eq!(options.get_username(), user.as_str());
        prop_assert_eq!(options.get_database(), Some(database.as_str()));
    }
}
