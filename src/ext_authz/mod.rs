//! The mesh door: Envoy's `envoy.service.auth.v3.Authorization/Check`.
//!
//! A Check is mapped to a tool call by the route map ([`routes`],
//! [`translate`]), decided by the same [`Pipeline`] as `POST /verify`, and
//! answered as a `CheckResponse` ([`respond`]). Every outcome is an explicit
//! `CheckResponse`: a bare gRPC error would leave the outcome to Envoy's
//! `failure_mode_allow`, so even an internal error becomes a deny here.

pub mod respond;
pub mod routes;
pub mod translate;

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};

use crate::domain::{Decision, VerifyResponse, violation};
use crate::metrics::{Door, DoorRejection, Trigger};
use crate::pipeline::{Pipeline, Verdict};
use routes::RouteMap;
use translate::CheckError;

/// What became of one Check before it was put into words for Envoy.
enum Outcome {
    Decided {
        request_id: String,
        verdict: Verdict,
    },
    Refused {
        request_id: String,
        error: CheckError,
    },
}

pub struct ExtAuthz {
    pipeline: Arc<Pipeline>,
    routes: Arc<RouteMap>,
}

impl ExtAuthz {
    pub fn new(pipeline: Arc<Pipeline>, routes: Arc<RouteMap>) -> Self {
        ExtAuthz { pipeline, routes }
    }

    /// Decides one Check. Runs as its own task (see [`Authorization::check`]).
    async fn decide(
        pipeline: Arc<Pipeline>,
        routes: Arc<RouteMap>,
        check: CheckRequest,
    ) -> Outcome {
        let request_id = check
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .and_then(|http| translate::request_id(&translate::headers(http)).map(str::to_owned))
            .unwrap_or_default();
        match translate::tool_call(&routes, &check) {
            Ok(request) => Outcome::Decided {
                request_id: request.request_id.as_str().to_owned(),
                verdict: pipeline.decide(&request, Door::ExtAuthz).await,
            },
            Err(error) => Outcome::Refused { request_id, error },
        }
    }

    fn answer(&self, outcome: Outcome) -> CheckResponse {
        match outcome {
            Outcome::Decided {
                request_id,
                verdict,
            } => respond::decision(
                &verdict.response,
                &request_id,
                verdict.audit.as_ref().map(|receipt| receipt.hash.as_str()),
                &self.routes.identity.headers,
            ),
            Outcome::Refused {
                request_id,
                error: error @ CheckError::Unmapped { .. },
            } => {
                self.pipeline
                    .metrics()
                    .door_rejected(Door::ExtAuthz, DoorRejection::Unmapped);
                tracing::info!(%error, request_id, "Check denied: route unmapped");
                respond::door_denial(
                    &VerifyResponse::deny(violation::ROUTE_UNMAPPED),
                    &request_id,
                )
            }
            Outcome::Refused { request_id, error } => {
                self.pipeline
                    .metrics()
                    .door_rejected(Door::ExtAuthz, DoorRejection::BadRequest);
                tracing::info!(%error, request_id, "Check refused: bad request");
                respond::bad_request(&error.body(), &error.to_string(), &request_id)
            }
        }
    }

    /// The verifier could not decide: deny, fail closed, and say so.
    fn internal_error(&self, error: &dyn std::fmt::Display, started: Instant) -> CheckResponse {
        tracing::error!(%error, "ext_authz Check failed internally: denied (fail closed)");
        let metrics = self.pipeline.metrics();
        metrics.fail_closed(Trigger::Rules);
        metrics.decided(Door::ExtAuthz, Decision::Deny, started.elapsed());
        let response = VerifyResponse::from_violations(
            vec![
                violation::FAIL_CLOSED.to_owned(),
                violation::INTERNAL_ERROR.to_owned(),
            ],
            Vec::new(),
        );
        respond::door_denial(&response, "")
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        // Its own task, for two reasons: a panic anywhere in deciding becomes
        // a deny below instead of a dropped stream, and a decision that has
        // started is finished (audited, stored for replays) even when Envoy
        // gives up waiting and cancels the call.
        let decided = tokio::spawn(Self::decide(
            self.pipeline.clone(),
            self.routes.clone(),
            request.into_inner(),
        ))
        .await;
        let response = match decided {
            Ok(outcome) => self.answer(outcome),
            Err(error) => self.internal_error(&error, started),
        };
        Ok(Response::new(response))
    }
}
