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

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};

use crate::callers::Unauthenticated;
use crate::domain::{Decision, VerifyResponse, violation};
use crate::metrics::{Door, DoorRejection, Trigger};
use crate::peer::PeerIdentity;
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
    /// `CASF_CALLERS` is set and the Check names no caller.
    Unauthenticated {
        request_id: String,
        reason: Unauthenticated,
    },
}

/// The route map is the pipeline's live one (reloaded with the policy), read
/// once per Check so that translation and decision use the same policy set.
pub struct ExtAuthz {
    pipeline: Arc<Pipeline>,
    /// `CASF_GRPC_INSECURE_PEERS`: every peer may assert identities.
    insecure_peers: bool,
}

impl ExtAuthz {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        ExtAuthz {
            pipeline,
            insecure_peers: false,
        }
    }

    /// Accept JWT claims and trusted headers from any peer, as the operator
    /// chose with `CASF_GRPC_INSECURE_PEERS=true`.
    pub fn trusting_insecure_peers(mut self, insecure_peers: bool) -> Self {
        self.insecure_peers = insecure_peers;
        self
    }

    /// Whether this peer may assert who the caller is (JWT claims in
    /// `metadata_context`, `identity.headers.trusted`): only one that proved
    /// itself with a client certificate, one on loopback (the sidecar
    /// topology), or any when the operator accepted the risk. Anyone else
    /// who reaches the port could claim to be anyone.
    fn may_assert_identity(&self, peer: Option<&PeerIdentity>) -> bool {
        self.insecure_peers || peer.is_some_and(|p| p.is_certified() || p.is_loopback())
    }

    /// The caller's request id, for answers that have no tool call.
    fn request_id(check: &CheckRequest) -> String {
        check
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .and_then(|http| translate::request_id(&translate::headers(http)).map(str::to_owned))
            .unwrap_or_default()
    }

    fn answer(&self, outcome: Outcome, routes: &RouteMap) -> CheckResponse {
        match outcome {
            Outcome::Decided {
                request_id,
                verdict,
            } => {
                let answer = respond::decision(
                    &verdict.response,
                    &request_id,
                    verdict.audit.as_ref().map(|receipt| receipt.hash.as_str()),
                    &routes.identity.headers,
                );
                let answer = match verdict.floor_applied {
                    Some(mode) => respond::with_mode_applied(answer, mode),
                    None => answer,
                };
                match verdict.response.shadow_decision {
                    Some(real) if verdict.shadow => {
                        respond::with_shadow_decision(answer, real, &verdict.response)
                    }
                    _ => answer,
                }
            }
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
            Outcome::Unauthenticated { request_id, reason } => {
                self.pipeline
                    .metrics()
                    .caller_rejected(Door::ExtAuthz, reason);
                tracing::info!(
                    reason = reason.as_str(),
                    request_id,
                    "Check denied: caller not authenticated"
                );
                respond::unauthenticated(reason.detail(), &request_id)
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
    fn internal_error(
        &self,
        error: &dyn std::fmt::Display,
        request_id: &str,
        started: Instant,
    ) -> CheckResponse {
        tracing::error!(%error, request_id, "ext_authz Check failed internally: denied (fail closed)");
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
        respond::door_denial(&response, request_id)
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        let peer = request.extensions().get::<PeerIdentity>().cloned();
        let trusted = self.may_assert_identity(peer.as_ref());
        let check = request.into_inner();
        let request_id = Self::request_id(&check);
        let set = self.pipeline.live().current();
        let routes = set.routes.clone();
        // Who is calling, before what the call means: the verified JWT's
        // subject, else the peer's certificate (see `crate::callers`).
        let caller = match self.pipeline.callers() {
            None => None,
            Some(callers) => {
                // A JWT subject counts only from a peer that may assert
                // identities, as the claims themselves do.
                let subject = trusted
                    .then(|| translate::jwt_subject(&routes, &check))
                    .flatten();
                match callers
                    .current()
                    .authenticate_envoy(subject.as_deref(), peer.as_ref())
                {
                    Ok(caller) => Some(caller),
                    Err(reason) => {
                        let outcome = Outcome::Unauthenticated { request_id, reason };
                        return Ok(Response::new(self.answer(outcome, &routes)));
                    }
                }
            }
        };
        // Translation is synchronous, so a panic in it is caught right here
        // and answered as an explicit deny rather than a dropped stream. The
        // decision itself runs in the pipeline's own task, which turns its
        // panics into fail-closed denies and finishes even when Envoy cancels.
        let translated = std::panic::catch_unwind(AssertUnwindSafe(|| {
            translate::tool_call_from(&routes, &check, trusted)
        }));
        let outcome = match translated {
            Ok(Ok(request)) => Outcome::Decided {
                request_id: request.request_id.as_str().to_owned(),
                verdict: self
                    .pipeline
                    .decide_with(
                        match caller {
                            Some(caller) => request.with_caller(caller),
                            None => request,
                        },
                        Door::ExtAuthz,
                        translate::trace_parent(&check),
                        set,
                    )
                    .await,
            },
            Ok(Err(error)) => Outcome::Refused { request_id, error },
            Err(_) => {
                let response =
                    self.internal_error(&"panic while translating the Check", &request_id, started);
                return Ok(Response::new(response));
            }
        };
        Ok(Response::new(self.answer(outcome, &routes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::SmsLimit;
    use crate::policy::{PolicyEngine, PolicyError, PolicyVerdict};
    use crate::state::memory::MemoryState;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Request as AttrRequest,
    };
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use std::time::Duration;

    /// A policy engine with a bug.
    struct Panics;

    #[async_trait::async_trait]
    impl PolicyEngine for Panics {
        fn backend(&self) -> &'static str {
            "panics"
        }
        async fn evaluate(&self, _: &serde_json::Value) -> Result<PolicyVerdict, PolicyError> {
            panic!("bug in the policy engine")
        }
    }

    /// A pipeline deciding with `policy` over in-process state, without
    /// audit, behind a one-route map that trusts identity headers.
    fn pipeline_over(
        policy: Arc<dyn PolicyEngine>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Pipeline> {
        let state = Arc::new(MemoryState::new(
            Duration::from_secs(60),
            Duration::from_secs(5),
            1024,
        ));
        let routes = RouteMap::parse(
            "identity: {headers: {trusted: true}}\nmode: {default: ALLOW}\nroutes: [{method: GET, path: \"/h/{patient_id}\", tool: cliniccloud.summary_history}]",
        )
        .unwrap();
        let live = crate::policy::live::LivePolicy::fixed(crate::policy::live::PolicySet::fixed(
            policy.clone(),
            routes,
        ));
        Arc::new(
            Pipeline::new(policy, None, state, None, metrics, SmsLimit::default())
                .with_live_policy(Arc::new(live)),
        )
    }

    #[tokio::test]
    async fn a_panic_while_deciding_is_an_explicit_fail_closed_deny() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let door = ExtAuthz::new(pipeline_over(Arc::new(Panics), metrics.clone()));
        let check = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/h/p-1".into(),
                        headers: [
                            ("x-request-id".to_owned(), "r-1".to_owned()),
                            ("x-casf-role".to_owned(), "nurse".to_owned()),
                        ]
                        .into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let mut request = Request::new(check);
        request.extensions_mut().insert(PeerIdentity {
            sans: vec![],
            remote: Some("127.0.0.1:40000".parse().unwrap()),
        });
        let response = door
            .check(request)
            .await
            .expect("a CheckResponse, not a gRPC error")
            .into_inner();
        assert_eq!(response.status.as_ref().unwrap().code, 14, "UNAVAILABLE");
        let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
            panic!("not denied: {response:?}")
        };
        assert_eq!(denied.status.as_ref().unwrap().code, 503);
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(
            body["violations"],
            serde_json::json!(["FAIL_CLOSED", "Verifier_InternalError"])
        );
        let request_id = &response.dynamic_metadata.as_ref().unwrap().fields["request_id"];
        assert_eq!(
            request_id.kind,
            Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                "r-1".into()
            ))
        );
        let text = metrics.encode();
        for line in [
            "casf_fail_closed_total{trigger=\"rules\"} 1",
            "casf_door_decision_total{door=\"ext_authz\",decision=\"DENY\"} 1",
            "casf_verify_in_flight 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?}");
        }
    }

    /// A policy that allows everything, so the identity alone decides
    /// whether a Check is decided.
    struct AllowAll;

    #[async_trait::async_trait]
    impl PolicyEngine for AllowAll {
        fn backend(&self) -> &'static str {
            "allow-all"
        }
        async fn evaluate(&self, _: &serde_json::Value) -> Result<PolicyVerdict, PolicyError> {
            Ok(PolicyVerdict {
                allow: true,
                violations: vec![],
                revision: None,
            })
        }
    }

    #[tokio::test]
    async fn claims_from_an_uncertified_peer_off_loopback_are_not_an_identity() {
        let pipeline = pipeline_over(Arc::new(AllowAll), Arc::new(crate::metrics::Metrics::new()));
        let check = |n: u32| {
            translate::tests::with_claims(
                CheckRequest {
                    attributes: Some(AttributeContext {
                        request: Some(AttrRequest {
                            http: Some(HttpRequest {
                                method: "GET".into(),
                                path: "/h/p-1".into(),
                                headers: [
                                    ("x-request-id".to_owned(), format!("r-{n}")),
                                    ("x-casf-role".to_owned(), "doctor".to_owned()),
                                ]
                                .into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                },
                serde_json::json!({"casf_role": "nurse", "casf_tenant_id": "clinic-a"}),
            )
        };
        let off_loopback = Some("10.0.0.7:40000".parse().unwrap());
        let uncertified = PeerIdentity {
            sans: vec![],
            remote: off_loopback,
        };
        let certified = PeerIdentity {
            sans: vec!["spiffe://clinic/ns/mesh/sa/envoy".into()],
            remote: off_loopback,
        };
        let status = |response: &CheckResponse| match &response.http_response {
            Some(HttpResponse::DeniedResponse(denied)) => denied.status.as_ref().unwrap().code,
            Some(HttpResponse::OkResponse(_)) => 200,
            _ => panic!("no HTTP answer: {response:?}"),
        };
        let mut cases = vec![
            (Some(uncertified.clone()), false, 400),
            (None, false, 400),
            (Some(certified), false, 200),
            (Some(uncertified), true, 200),
        ];
        for (n, (peer, insecure, expected)) in cases.drain(..).enumerate() {
            let door = ExtAuthz::new(pipeline.clone()).trusting_insecure_peers(insecure);
            let mut request = Request::new(check(n as u32));
            if let Some(peer) = peer.clone() {
                request.extensions_mut().insert(peer);
            }
            let response = door.check(request).await.unwrap().into_inner();
            assert_eq!(
                status(&response),
                expected,
                "peer {peer:?}, insecure {insecure}"
            );
            if expected == 400 {
                let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
                    unreachable!()
                };
                let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
                assert_eq!(body["field"], "role", "{body}");
            }
        }
    }
}
