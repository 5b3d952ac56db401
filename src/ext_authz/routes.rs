//! The route map (`CASF_ROUTES`, YAML): which HTTP calls are which tool
//! calls, and where identity and mode come from.
//!
//! The map is declarative so that operators, not code, say what an Envoy
//! request means. It is checked in full at startup (unknown tools, fields or
//! modes, overlapping routes), because a map that guesses is a map that
//! allows the wrong call.

use std::collections::BTreeSet;
use std::path::Path;

use percent_encoding::percent_decode_str;
use serde::Deserialize;

use crate::domain::{Mode, Tool};

/// Why a route map was refused.
#[derive(Debug, thiserror::Error)]
pub enum RouteMapError {
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

impl RouteMapError {
    pub fn kind(&self) -> &'static str {
        match self {
            RouteMapError::Unreadable { .. } => "unreadable",
            RouteMapError::Invalid { .. } => "invalid",
        }
    }
}

/// Verified JWT claims, as Envoy's `jwt_authn` filter leaves them in
/// `metadata_context.filter_metadata[namespace][payload_key]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtClaims {
    #[serde(default = "default_jwt_namespace")]
    pub metadata_namespace: String,
    /// `payload_in_metadata` of the jwt_authn provider.
    #[serde(default = "default_jwt_payload_key")]
    pub payload_key: String,
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
}

impl Default for JwtClaims {
    fn default() -> Self {
        JwtClaims {
            metadata_namespace: default_jwt_namespace(),
            payload_key: default_jwt_payload_key(),
            role_claim: default_role_claim(),
            tenant_claim: default_tenant_claim(),
        }
    }
}

/// Identity headers, honoured only when `trusted` (a proxy in front sets
/// them and strips client copies). A client must not name its own role.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityHeaders {
    #[serde(default)]
    pub trusted: bool,
    #[serde(default = "default_role_header")]
    pub role: String,
    #[serde(default = "default_tenant_header")]
    pub tenant_id: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            trusted: false,
            role: default_role_header(),
            tenant_id: default_tenant_header(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    #[serde(default)]
    pub jwt: JwtClaims,
    #[serde(default)]
    pub headers: IdentityHeaders,
}

/// The operational mode: a header, else the configured default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeSource {
    pub header: String,
    pub default: Mode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMode {
    #[serde(default = "default_mode_header")]
    header: String,
    default: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    method: String,
    path: String,
    tool: String,
    /// `false` puts the route's tool in shadow: decided and audited, but
    /// answered ALLOW (see `crate::pipeline`).
    #[serde(default = "enforce_by_default")]
    enforce: bool,
}

fn enforce_by_default() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteMap {
    #[serde(default)]
    identity: Identity,
    mode: RawMode,
    #[serde(default = "default_subject_keys")]
    subject_keys: Vec<String>,
    routes: Vec<RawRoute>,
}

fn default_jwt_namespace() -> String {
    "envoy.filters.http.jwt_authn".into()
}
fn default_jwt_payload_key() -> String {
    "jwt_payload".into()
}
fn default_role_claim() -> String {
    "casf_role".into()
}
fn default_tenant_claim() -> String {
    "casf_tenant_id".into()
}
fn default_role_header() -> String {
    "x-casf-role".into()
}
fn default_tenant_header() -> String {
    "x-casf-tenant-id".into()
}
fn default_mode_header() -> String {
    "x-casf-mode".into()
}
fn default_subject_keys() -> Vec<String> {
    vec!["patient_id".into()]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

#[derive(Debug, Clone)]
struct Route {
    method: String,
    template: String,
    segments: Vec<Segment>,
    tool: Tool,
    enforce: bool,
}

/// A request path matched to a tool, with its path parameters decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    pub tool: Tool,
    /// `(name, value)` in template order.
    pub params: Vec<(String, String)>,
}

/// A path parameter that cannot name anything: a bad request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path parameter {name} {reason}")]
pub struct BadPathParam {
    pub name: String,
    pub reason: &'static str,
}

/// Why a decoded path parameter is refused, if it is. `.` and `..`, and a `/`
/// that was `%2F`, would name another path than the one matched if anything
/// downstream normalised it; that is safe only while Envoy normalises first.
fn bad_param(raw: &str, decoded: Result<&str, ()>) -> Option<&'static str> {
    match decoded {
        Err(()) => Some("is not valid UTF-8 once percent-decoded"),
        _ if raw.is_empty() => Some("is empty"),
        Ok("." | "..") => Some("is a dot segment (. or ..)"),
        Ok(value) if value.contains('/') => Some("contains a percent-encoded /"),
        Ok(_) => None,
    }
}

#[derive(Debug, Clone)]
pub struct RouteMap {
    routes: Vec<Route>,
    pub identity: Identity,
    pub mode: ModeSource,
    subject_keys: BTreeSet<String>,
}

impl RouteMap {
    /// A map with no routes: every Check is denied as unmapped.
    pub fn empty() -> Self {
        RouteMap {
            routes: Vec::new(),
            identity: Identity::default(),
            mode: ModeSource {
                header: default_mode_header(),
                default: Mode::Allow,
            },
            subject_keys: default_subject_keys().into_iter().collect(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, RouteMapError> {
        let text = std::fs::read_to_string(path).map_err(|e| RouteMapError::Unreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|reason| RouteMapError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawRouteMap = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        let mode = ModeSource {
            header: header_name(&raw.mode.header, "mode.header")?,
            default: Mode::parse(&raw.mode.default).map_err(|e| format!("mode.default: {e}"))?,
        };
        let mut identity = raw.identity;
        identity.headers.role = header_name(&identity.headers.role, "identity.headers.role")?;
        identity.headers.tenant_id =
            header_name(&identity.headers.tenant_id, "identity.headers.tenant_id")?;
        let mut routes: Vec<Route> = Vec::with_capacity(raw.routes.len());
        for (index, raw_route) in raw.routes.into_iter().enumerate() {
            let route = parse_route(raw_route).map_err(|e| format!("routes[{index}]: {e}"))?;
            if let Some(other) = routes.iter().find(|r| r.overlaps(&route)) {
                return Err(format!(
                    "routes[{index}]: {} {} overlaps {} {}; every call must map to one tool",
                    route.method, route.template, other.method, other.template
                ));
            }
            // `/verify` has no route, only a tool: shadow is per tool, so
            // every route of a tool must say the same.
            if let Some(other) = routes
                .iter()
                .find(|r| r.tool == route.tool && r.enforce != route.enforce)
            {
                return Err(format!(
                    "routes[{index}]: enforce: {} for {}, but {} {} says enforce: {}; every route of a tool must agree",
                    route.enforce,
                    route.tool.as_str(),
                    other.method,
                    other.template,
                    other.enforce
                ));
            }
            routes.push(route);
        }
        Ok(RouteMap {
            routes,
            identity,
            mode,
            subject_keys: raw.subject_keys.into_iter().collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// False when the routes of `tool` say `enforce: false` (the tool is in
    /// shadow); a tool no route names is enforced.
    pub fn enforced(&self, tool: Tool) -> bool {
        self.routes
            .iter()
            .find(|route| route.tool == tool)
            .is_none_or(|route| route.enforce)
    }

    /// How many routes say `enforce: false`.
    pub fn shadowed_routes(&self) -> usize {
        self.routes.iter().filter(|route| !route.enforce).count()
    }

    /// Whether a path parameter of this name belongs in `subject`.
    pub fn is_subject_key(&self, name: &str) -> bool {
        self.subject_keys.contains(name)
    }

    /// The route for `method` and `path` (without query), if any. Literal
    /// segments compare after percent-decoding, as Envoy normalises them.
    pub fn resolve(&self, method: &str, path: &str) -> Result<Option<RouteMatch>, BadPathParam> {
        let Some(rest) = path.strip_prefix('/') else {
            return Ok(None);
        };
        let raw: Vec<&str> = rest.split('/').collect();
        for route in &self.routes {
            if route.method != method || route.segments.len() != raw.len() {
                continue;
            }
            let mut params = Vec::new();
            let mut bad = None;
            let mut matched = true;
            for (segment, raw) in route.segments.iter().zip(&raw) {
                let decoded = percent_decode_str(raw).decode_utf8();
                match segment {
                    Segment::Literal(literal) => {
                        if decoded.as_deref().ok() != Some(literal.as_str()) {
                            matched = false;
                            break;
                        }
                    }
                    Segment::Param(name) => {
                        let value = decoded.as_deref().map_err(drop);
                        match bad_param(raw, value) {
                            Some(reason) => {
                                bad.get_or_insert(BadPathParam {
                                    name: name.clone(),
                                    reason,
                                });
                            }
                            None => {
                                params.push((name.clone(), value.unwrap_or_default().to_owned()))
                            }
                        }
                    }
                }
            }
            // A bad parameter is reported only for the route the path matches.
            if matched {
                return match bad {
                    Some(bad) => Err(bad),
                    None => Ok(Some(RouteMatch {
                        tool: route.tool,
                        params,
                    })),
                };
            }
        }
        Ok(None)
    }
}

impl Route {
    /// True if some request would match both routes.
    fn overlaps(&self, other: &Route) -> bool {
        self.method == other.method
            && self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|pair| match pair {
                    (Segment::Literal(a), Segment::Literal(b)) => a == b,
                    _ => true,
                })
    }
}

fn header_name(raw: &str, field: &str) -> Result<String, String> {
    let name = raw.trim().to_ascii_lowercase();
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(name)
    } else {
        Err(format!("{field}: {raw:?} is not an HTTP header name"))
    }
}

fn parse_route(raw: RawRoute) -> Result<Route, String> {
    let method = raw.method.trim().to_owned();
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "method {:?} must be an upper-case HTTP method",
            raw.method
        ));
    }
    let tool = Tool::parse(&raw.tool).map_err(|e| e.to_string())?;
    let Some(rest) = raw.path.strip_prefix('/') else {
        return Err(format!("path {:?} must start with '/'", raw.path));
    };
    if raw.path.contains(['?', '#']) {
        return Err(format!(
            "path {:?} must not hold a query or fragment",
            raw.path
        ));
    }
    let mut names = BTreeSet::new();
    let segments = rest
        .split('/')
        .map(|segment| {
            if segment.is_empty() {
                return Err(format!("path {:?} has an empty segment", raw.path));
            }
            match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => {
                    let valid = !name.is_empty()
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    if !valid {
                        return Err(format!("path parameter {{{name}}} is not a plain name"));
                    }
                    if !names.insert(name.to_owned()) {
                        return Err(format!("path parameter {{{name}}} appears twice"));
                    }
                    Ok(Segment::Param(name.to_owned()))
                }
                None if segment.contains(['{', '}']) => Err(format!(
                    "segment {segment:?} mixes text and a parameter; use a whole segment"
                )),
                None => Ok(Segment::Literal(segment.to_owned())),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Route {
        method,
        template: raw.path,
        segments,
        tool,
        enforce: raw.enforce,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#"
mode: {default: ALLOW}
routes:
  - {method: POST, path: "/c/patients/{patient_id}/appointments", tool: cliniccloud.create_appointment}
  - {method: DELETE, path: "/c/patients/{patient_id}/appointments/{appointment_id}", tool: cliniccloud.cancel_appointment}
  - {method: GET, path: "/c/patients/{patient_id}/appointments", tool: cliniccloud.list_appointments}
"#;

    fn map() -> RouteMap {
        RouteMap::parse(MAP).unwrap()
    }

    #[test]
    fn the_shipped_map_covers_the_six_tools_once_each() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/routes.yaml");
        let map = RouteMap::load(&path).unwrap();
        let tools: BTreeSet<&str> = map.routes.iter().map(|r| r.tool.as_str()).collect();
        let all: BTreeSet<&str> = Tool::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(tools, all);
        assert_eq!(map.len(), Tool::ALL.len());
        assert!(
            !map.identity.headers.trusted,
            "headers must not be trusted by default"
        );
        assert_eq!(map.mode.default, Mode::Allow);
    }

    #[test]
    fn resolves_method_and_template_with_decoded_params() {
        let m = map();
        let hit = m
            .resolve("DELETE", "/c/patients/p%2D1/appointments/a%20b")
            .unwrap()
            .unwrap();
        assert_eq!(hit.tool, Tool::CancelAppointment);
        assert_eq!(
            hit.params,
            vec![
                ("patient_id".into(), "p-1".into()),
                ("appointment_id".into(), "a b".into())
            ]
        );
        assert_eq!(
            m.resolve("GET", "/c/patients/p1/appointments")
                .unwrap()
                .unwrap()
                .tool,
            Tool::ListAppointments
        );
        assert_eq!(
            m.resolve("POST", "/%63/patients/p1/appointments")
                .unwrap()
                .unwrap()
                .tool,
            Tool::CreateAppointment
        );
    }

    #[test]
    fn anything_else_is_unmapped() {
        let m = map();
        for (method, path) in [
            ("PUT", "/c/patients/p1/appointments"),
            ("POST", "/c/patients/p1/appointments/"),
            ("POST", "/c/patients/p1"),
            ("POST", "/c/patients//other"),
            ("POST", "c/patients/p1/appointments"),
            ("post", "/c/patients/p1/appointments"),
            ("POST", ""),
        ] {
            assert_eq!(m.resolve(method, path).unwrap(), None, "{method} {path}");
        }
    }

    #[test]
    fn a_param_that_is_not_utf8_is_named() {
        let err = map()
            .resolve("POST", "/c/patients/%FF/appointments")
            .unwrap_err();
        assert_eq!(err.name, "patient_id");
    }

    #[test]
    fn params_that_name_no_single_thing_are_refused() {
        for (path, reason) in [
            ("/c/patients//appointments", "is empty"),
            ("/c/patients/./appointments", "is a dot segment (. or ..)"),
            ("/c/patients/../appointments", "is a dot segment (. or ..)"),
            (
                "/c/patients/%2e%2e/appointments",
                "is a dot segment (. or ..)",
            ),
            ("/c/patients/%2E/appointments", "is a dot segment (. or ..)"),
            (
                "/c/patients/p%2F1/appointments",
                "contains a percent-encoded /",
            ),
            (
                "/c/patients/%2f/appointments",
                "contains a percent-encoded /",
            ),
        ] {
            let err = map().resolve("POST", path).unwrap_err();
            assert_eq!(
                (err.name.as_str(), err.reason),
                ("patient_id", reason),
                "{path}"
            );
        }
        // Dots inside a value are fine.
        let hit = map().resolve("POST", "/c/patients/p.1..x/appointments");
        assert_eq!(hit.unwrap().unwrap().params[0].1, "p.1..x");
    }

    #[test]
    fn refuses_maps_that_guess() {
        let cases = [
            (
                "mode: {default: ALLOW}\nroutes: [{method: GET, path: /a, tool: nope}]",
                "routes[0]",
            ),
            ("mode: {default: YOLO}\nroutes: []", "mode.default"),
            (
                "mode: {default: ALLOW}\nroutes: []\nextra: 1",
                "unknown field",
            ),
            (
                "mode: {default: ALLOW}\nidentity: {headers: {trustd: true}}\nroutes: []",
                "unknown field",
            ),
            (
                "mode: {default: ALLOW}\nroutes:\n  - {method: GET, path: \"/a/{x}\", tool: cliniccloud.summary_history}\n  - {method: GET, path: /a/b, tool: cliniccloud.list_appointments}",
                "overlaps",
            ),
            (
                "mode: {default: ALLOW}\nroutes: [{method: GET, path: \"/a/{x}/{x}\", tool: cliniccloud.summary_history}]",
                "twice",
            ),
            (
                "mode: {default: ALLOW}\nroutes: [{method: GET, path: \"/a/p{x}\", tool: cliniccloud.summary_history}]",
                "mixes",
            ),
            (
                "mode: {default: ALLOW}\nroutes: [{method: get, path: /a, tool: cliniccloud.summary_history}]",
                "upper-case",
            ),
            ("routes: []", "mode"),
        ];
        for (text, expected) in cases {
            let err = RouteMap::parse(text).unwrap_err();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn enforce_false_puts_a_tool_in_shadow_and_routes_of_a_tool_must_agree() {
        let shadow = RouteMap::parse(
            "mode: {default: ALLOW}\nroutes:\n- {method: GET, path: /a, tool: twilio.send_sms, enforce: false}\n- {method: POST, path: /a, tool: twilio.send_sms, enforce: false}\n- {method: GET, path: /b, tool: stripe.generate_invoice}",
        )
        .unwrap();
        assert!(!shadow.enforced(Tool::SendSms));
        assert!(shadow.enforced(Tool::GenerateInvoice));
        assert!(shadow.enforced(Tool::SummaryHistory), "no route: enforced");
        assert_eq!(shadow.shadowed_routes(), 2);
        assert_eq!(map().shadowed_routes(), 0);
        let err = RouteMap::parse(
            "mode: {default: ALLOW}\nroutes:\n- {method: GET, path: /a, tool: twilio.send_sms, enforce: false}\n- {method: POST, path: /a, tool: twilio.send_sms}",
        )
        .unwrap_err();
        assert!(
            err.contains("routes[1]") && err.contains("must agree"),
            "{err}"
        );
    }
}
