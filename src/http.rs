//! The standalone door: `POST /verify` plus the operator endpoints.
//!
//! Handlers translate JSON to domain types and back; every decision is the
//! pipeline's.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::domain::VerifyRequest;
use crate::health::{Health, Readiness};
use crate::metrics::Door;
use crate::pipeline::Pipeline;

/// Largest accepted `/verify` body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct AppState {
    pub pipeline: Arc<Pipeline>,
    pub readiness: Arc<Readiness>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/verify", post(verify))
        .route("/health", get(health))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn verify(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
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
        Ok(request) => request,
        Err(error) => {
            let status =
                StatusCode::from_u16(error.status()).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
            return json_response(status, error.body());
        }
    };
    // The pipeline finishes the decision even if this handler is dropped
    // because the client went away.
    let verdict = state.pipeline.decide(request, Door::Http).await;
    (StatusCode::OK, axum::Json(verdict.response)).into_response()
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
