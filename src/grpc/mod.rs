//! The gRPC listener (`CASF_GRPC_ADDR`): Envoy's ext_authz `Check`, gRPC
//! health and server reflection, served by tonic on the same runtime as the
//! HTTP door.

pub mod health;

use std::future::Future;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::pb::health_server::HealthServer;

use crate::ext_authz::ExtAuthz;
use crate::health::Readiness;
use crate::pipeline::Pipeline;
use health::GrpcHealth;

/// `envoy.service.auth.v3` and everything it imports, for reflection.
/// Regenerate with `scripts/ext-authz-descriptor.py`.
pub const EXT_AUTHZ_DESCRIPTOR_SET: &[u8] = include_bytes!("../../proto/ext_authz_v3.binpb");

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("reflection descriptors: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl GrpcError {
    pub fn kind(&self) -> &'static str {
        match self {
            GrpcError::Reflection(_) => "reflection",
            GrpcError::Transport(_) => "transport",
        }
    }
}

/// How long a keep-alive ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How the gRPC door is exposed: TLS, and whether identities asserted by
/// unauthenticated peers are accepted (`CASF_GRPC_INSECURE_PEERS`).
#[derive(Clone, Default)]
pub struct GrpcTransport {
    pub tls: Option<Arc<crate::door_tls::DoorTls>>,
    pub insecure_peers: bool,
}

/// Serves until `shutdown` resolves, then drains open calls. `draining`
/// turns gRPC health to NOT_SERVING as soon as shutdown starts.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    limits: crate::connections::ConnectionLimits,
    transport: GrpcTransport,
    pipeline: Arc<Pipeline>,
    readiness: Arc<Readiness>,
    draining: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(EXT_AUTHZ_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    // grpcurl and older clients still ask v1alpha first.
    let reflection_v1alpha = reflection().build_v1alpha()?;
    tonic::transport::Server::builder()
        // A peer gone silent is found by pings, then closed by the idle timeout.
        .http2_keepalive_interval(Some(limits.idle_timeout / 2))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(AuthorizationServer::new(
            ExtAuthz::new(pipeline).trusting_insecure_peers(transport.insecure_peers),
        ))
        .add_service(HealthServer::new(GrpcHealth::new(readiness, draining)))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // TCP_NODELAY: a response is several HTTP/2 frames, and Nagle would
        // hold the later ones back until the client's delayed ACK (~40 ms).
        .serve_with_incoming_shutdown(
            crate::connections::grpc_incoming(listener, limits, transport.tls),
            shutdown,
        )
        .await?;
    Ok(())
}
