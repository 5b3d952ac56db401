//! `grpc.health.v1.Health` backed by the same readiness check as `/healthz`,
//! so a gRPC prober (Kubernetes `grpc:` probes, Envoy health checks) sees
//! NOT_SERVING exactly when `/healthz` answers 503, and also while the
//! process is draining for shutdown.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::health::{Health as Readiness, Readiness as Checks};

/// The services a health client may ask about; `""` is the whole server.
pub const SERVICES: [&str; 2] = ["", "envoy.service.auth.v3.Authorization"];
/// How often a Watch re-checks readiness.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

pub struct GrpcHealth {
    readiness: Arc<Checks>,
    /// Becomes true once shutdown starts.
    draining: watch::Receiver<bool>,
}

impl GrpcHealth {
    pub fn new(readiness: Arc<Checks>, draining: watch::Receiver<bool>) -> Self {
        GrpcHealth {
            readiness,
            draining,
        }
    }

    async fn status(readiness: &Checks, draining: &watch::Receiver<bool>) -> ServingStatus {
        if *draining.borrow() {
            return ServingStatus::NotServing;
        }
        match readiness.check().await {
            Readiness::Ready(_) => ServingStatus::Serving,
            Readiness::NotReady(detail) => {
                tracing::debug!(%detail, "gRPC health: not serving");
                ServingStatus::NotServing
            }
        }
    }
}

fn reply(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for GrpcHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        if !SERVICES.contains(&service.as_str()) {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        let status = Self::status(&self.readiness, &self.draining).await;
        Ok(Response::new(reply(status)))
    }

    type WatchStream = WatchStream;

    /// Sends the status now and on every change. The stream ends once
    /// shutdown starts (after a last NOT_SERVING), so that an open Watch never
    /// holds up a graceful shutdown.
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let known = SERVICES.contains(&service.as_str());
        let (tx, rx) = mpsc::channel(4);
        let readiness = self.readiness.clone();
        let mut draining = self.draining.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let status = if known {
                    Self::status(&readiness, &draining).await
                } else {
                    ServingStatus::ServiceUnknown
                };
                if last != Some(status) {
                    if tx.send(Ok(reply(status))).await.is_err() {
                        return; // the client went away
                    }
                    last = Some(status);
                }
                if *draining.borrow() {
                    if known && last != Some(ServingStatus::NotServing) {
                        let _ = tx.send(Ok(reply(ServingStatus::NotServing))).await;
                    }
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                    _ = draining.changed() => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Redactor;
    use crate::policy::{PolicyEngine, PolicyError, PolicyVerdict};
    use crate::state::memory::MemoryState;
    use async_trait::async_trait;
    use tokio_stream::StreamExt;

    /// A policy engine whose availability the test switches.
    struct Switchable(std::sync::atomic::AtomicBool);

    #[async_trait]
    impl PolicyEngine for Switchable {
        fn backend(&self) -> &'static str {
            "fake"
        }
        async fn evaluate(&self, _: &serde_json::Value) -> Result<PolicyVerdict, PolicyError> {
            if self.0.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(PolicyVerdict {
                    allow: true,
                    violations: vec![],
                    revision: None,
                })
            } else {
                Err(PolicyError::Unavailable("switched off".into()))
            }
        }
    }

    fn health(up: bool) -> (GrpcHealth, Arc<Switchable>, watch::Sender<bool>) {
        let policy = Arc::new(Switchable(up.into()));
        let state = Arc::new(MemoryState::new(
            Duration::from_secs(60),
            Duration::from_secs(5),
            1024,
        ));
        let readiness = Arc::new(Checks {
            audit: None,
            state,
            policy: policy.clone(),
            redactor: Redactor::default(),
            spool: None,
            callers: None,
            enforcement: None,
        });
        let (drain, draining) = watch::channel(false);
        (GrpcHealth::new(readiness, draining), policy, drain)
    }

    async fn check(h: &GrpcHealth, service: &str) -> Result<i32, tonic::Code> {
        h.check(Request::new(HealthCheckRequest {
            service: service.into(),
        }))
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
    }

    #[tokio::test]
    async fn follows_readiness_and_draining() {
        let (h, policy, drain) = health(true);
        assert_eq!(check(&h, "").await, Ok(ServingStatus::Serving as i32));
        policy.0.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(h.readiness.check().await, Readiness::NotReady(_)));
        assert_eq!(check(&h, "").await, Ok(ServingStatus::NotServing as i32));
        assert_eq!(
            check(&h, "envoy.service.auth.v3.Authorization").await,
            Ok(ServingStatus::NotServing as i32)
        );
        policy.0.store(true, std::sync::atomic::Ordering::SeqCst);
        drain.send(true).unwrap();
        assert_eq!(check(&h, "").await, Ok(ServingStatus::NotServing as i32));
        assert_eq!(check(&h, "nope").await, Err(tonic::Code::NotFound));
    }

    #[tokio::test]
    async fn watch_reports_changes_and_ends_on_shutdown() {
        let (h, _policy, drain) = health(true);
        let mut stream = h
            .watch(Request::new(HealthCheckRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::Serving as i32);
        drain.send(true).unwrap();
        let last = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a status after draining")
            .unwrap()
            .unwrap();
        assert_eq!(last.status, ServingStatus::NotServing as i32);
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the stream ends");
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn watch_of_an_unknown_service_says_so() {
        let (h, _policy, _drain) = health(true);
        let mut stream = h
            .watch(Request::new(HealthCheckRequest {
                service: "nope".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::ServiceUnknown as i32);
    }
}
