//! The standalone door: `POST /verify` plus the operator endpoints.
//!
//! Handlers translate JSON to domain types and back; every decision is the
//! pipeline's.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::callers::{Caller, Unauthenticated};
use crate::domain::{Mode, VerifyRequest};
use crate::ext_authz::respond::{MODE_APPLIED_HEADER, SHADOW_DECISION_HEADER};
use crate::health::{Health, Readiness};
use crate::metrics::{Door, DoorRejection};
use crate::mode_floor::{FloorSource, FloorState};
use crate::peer::PeerIdentity;
use crate::pipeline::Pipeline;
use axum::Extension;

/// Largest accepted `/verify` body; the Envoy door holds bodies to the same.
pub use crate::domain::MAX_BODY_BYTES;

pub struct AppState {
    pub pipeline: Arc<Pipeline>,
    pub readiness: Arc<Readiness>,
}

pub fn router(state: Arc<AppState>) -> Router {
    let router = Router::new();
    // The floor is an operator's to change: with no callers there is no
    // operator to authenticate, so the endpoint does not exist.
    let router = match state.pipeline.callers() {
        Some(_) => router.route("/admin/mode", get(admin_mode_get).put(admin_mode_put)),
        None => router,
    };
    router
        .route("/verify", post(verify))
        .route("/health", get(health))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        // After the routes: it applies to those registered before it.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost, so it sees every /verify answer, body limits included.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_verify_rejections,
        ))
        .with_state(state)
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Whether the request says its body is JSON: `application/json`, with no
/// parameter but an optional `charset=utf-8`. A body sent as `text/plain` or
/// a form is refused, not decided: a browser form could send it cross-site.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = value.split(';').map(str::trim);
    let media_type_is_json = parts
        .next()
        .is_some_and(|t| t.eq_ignore_ascii_case("application/json"));
    media_type_is_json
        && parts.filter(|p| !p.is_empty()).all(|param| {
            param.split_once('=').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("charset")
                    && value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
            })
        })
}

/// The caller of a request under `CASF_CALLERS`, or why it has none
/// (counted; answered with [`unauthorized`], never a decision). `Ok(None)`
/// when callers are not configured.
fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<&PeerIdentity>,
) -> Result<Option<Arc<Caller>>, Unauthenticated> {
    let Some(callers) = state.pipeline.callers() else {
        return Ok(None);
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    match callers.current().authenticate_http(authorization, peer) {
        Ok(caller) => Ok(Some(caller)),
        Err(reason) => {
            state.pipeline.metrics().caller_rejected(Door::Http, reason);
            tracing::debug!(
                reason = reason.as_str(),
                "call refused: caller not authenticated"
            );
            Err(reason)
        }
    }
}

/// 401 with a JSON `detail` and `WWW-Authenticate: Bearer`.
fn unauthorized(reason: Unauthenticated) -> Response {
    let mut answer = json_response(StatusCode::UNAUTHORIZED, json!({"detail": reason.detail()}));
    answer.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"casf-verifier\""),
    );
    answer
}

async fn verify(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<PeerIdentity>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // Who is asking comes before what is asked: an unauthenticated call
    // learns nothing about its body.
    let caller = match authenticate(&state, &headers, peer.as_deref()) {
        Ok(caller) => caller,
        Err(reason) => return unauthorized(reason),
    };
    if !is_json(&headers) {
        return json_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            json!({"detail": "content-type must be application/json"}),
        );
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"detail": format!("request body exceeds {MAX_BODY_BYTES} bytes")}),
            );
        }
        Err(rejection) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"detail": rejection.body_text()}),
            );
        }
    };
    let request = match VerifyRequest::from_slice(&body) {
        Ok(request) => match caller {
            Some(caller) => request.with_caller(caller),
            None => request,
        },
        Err(error) => {
            let status =
                StatusCode::from_u16(error.status()).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
            return json_response(status, error.body());
        }
    };
    // The pipeline finishes the decision even if this handler is dropped
    // because the client went away.
    let parent = crate::telemetry::TraceParent::from_headers(|name| {
        headers.get(name).and_then(|value| value.to_str().ok())
    });
    let verdict = state
        .pipeline
        .decide_traced(request, Door::Http, parent)
        .await;
    let shadow = verdict.response.shadow_decision.filter(|_| verdict.shadow);
    let mut answer = (StatusCode::OK, axum::Json(verdict.response)).into_response();
    if let Some(real) = shadow {
        answer.headers_mut().insert(
            SHADOW_DECISION_HEADER,
            header::HeaderValue::from_static(real.as_str()),
        );
    }
    if let Some(mode) = verdict.floor_applied {
        answer.headers_mut().insert(
            MODE_APPLIED_HEADER,
            header::HeaderValue::from_static(mode.as_str()),
        );
    }
    answer
}

/// `GET /admin/mode`: the floor in force and each source of it.
async fn admin_mode_get(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<PeerIdentity>>,
    headers: HeaderMap,
) -> Response {
    if let Err(answer) = operator(&state, &headers, peer.as_deref()) {
        return *answer;
    }
    json_response(
        StatusCode::OK,
        floor_body(state.pipeline.mode_floor().state()),
    )
}

/// `PUT /admin/mode` `{"mode": ...}`: the operator's source of the floor.
/// The floor in force stays the stricter of it, `CASF_MODE_FLOOR` and
/// `CASF_MODE_FLOOR_FILE`, so an operator's ALLOW lifts only its own raise.
async fn admin_mode_put(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<PeerIdentity>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let caller = match operator(&state, &headers, peer.as_deref()) {
        Ok(caller) => caller,
        Err(answer) => return *answer,
    };
    if !is_json(&headers) {
        return json_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            json!({"detail": "content-type must be application/json"}),
        );
    }
    let Ok(body) = body else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"detail": "unreadable request body"}),
        );
    };
    let mode = match parse_mode_body(&body) {
        Ok(mode) => mode,
        Err((field, reason)) => {
            return json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"detail": format!("{field}: {reason}"), "field": field, "reason": reason}),
            );
        }
    };
    let floor = state.pipeline.mode_floor();
    let before = floor.state();
    let after = floor.set(FloorSource::Admin, mode, state.pipeline.metrics());
    tracing::warn!(
        caller = %caller.name,
        requested = %mode,
        from = %before.effective,
        to = %after.effective,
        "mode floor set through PUT /admin/mode"
    );
    json_response(StatusCode::OK, floor_body(after))
}

/// The caller, if it is an operator; else the 401 or 403 that answers it.
fn operator(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<&PeerIdentity>,
) -> Result<Arc<Caller>, Box<Response>> {
    match authenticate(state, headers, peer) {
        Ok(Some(caller)) if caller.operator => Ok(caller),
        Ok(Some(caller)) => {
            tracing::warn!(caller = %caller.name, "refused /admin/mode: not an operator");
            Err(Box::new(json_response(
                StatusCode::FORBIDDEN,
                json!({"detail": format!("caller {} is not an operator", caller.name)}),
            )))
        }
        Err(reason) => Err(Box::new(unauthorized(reason))),
        // Not reached: the route exists only with callers.
        Ok(None) => Err(Box::new(not_found_path("/admin/mode"))),
    }
}

/// `{"mode": "<MODE>"}` and nothing else.
fn parse_mode_body(body: &[u8]) -> Result<Mode, (String, String)> {
    let parsed = crate::strict_json::parse(body)
        .map_err(|e| ("body".to_owned(), e.to_string()))?
        .value;
    let serde_json::Value::Object(mut map) = parsed else {
        return Err(("body".into(), "must be a JSON object".into()));
    };
    let raw = map
        .remove("mode")
        .ok_or_else(|| ("mode".to_owned(), "field required".to_owned()))?;
    if let Some(unknown) = map.keys().next() {
        return Err((unknown.clone(), "unknown field".into()));
    }
    let raw = raw
        .as_str()
        .ok_or_else(|| ("mode".to_owned(), "expected string".to_owned()))?;
    Mode::parse(raw).map_err(|e| ("mode".to_owned(), e.to_string()))
}

fn floor_body(state: FloorState) -> serde_json::Value {
    json!({
        "mode": state.effective.as_str(),
        "sources": {
            "env": state.env.as_str(),
            "file": state.file.map(Mode::as_str),
            "admin": state.admin.as_str(),
        },
    })
}

/// This door's OpenAPI 3.1 contract, the file checked in under `docs/`.
pub const OPENAPI: &str = include_str!("../docs/openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn health() -> Response {
    json_response(StatusCode::OK, json!({"status": "ok"}))
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.readiness.check().await {
        Health::Ready(checks) => {
            json_response(StatusCode::OK, json!({"status": "ok", "checks": checks}))
        }
        Health::NotReady(detail) => {
            json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"detail": detail}))
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.pipeline.metrics().encode(),
    )
        .into_response()
}

/// Errors are JSON on every path, unknown ones included.
async fn not_found(uri: axum::http::Uri) -> Response {
    not_found_path(uri.path())
}

fn not_found_path(path: &str) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        json!({"detail": format!("not found: {path}")}),
    )
}

/// axum adds the `Allow` header to this answer.
async fn method_not_allowed() -> Response {
    json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({"detail": "method not allowed"}),
    )
}

/// Counts `/verify` calls answered without a decision (400, 413, 415, 422),
/// as the Envoy door counts its own, without the handler knowing.
async fn count_verify_rejections(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let is_verify = request.uri().path() == "/verify";
    let response = next.run(request).await;
    if is_verify && let Some(reason) = DoorRejection::from_http_status(response.status().as_u16()) {
        state.pipeline.metrics().door_rejected(Door::Http, reason);
    }
    response
}
