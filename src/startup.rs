//! Assembles backends, pipeline and doors from [`Settings`] into an
//! [`Application`] that binds its listeners up front, so tests can run it on
//! port 0 and learn the port before serving.
//!
//! Shutdown is explicit: stop accepting, let in-flight requests finish, then
//! drop the pipeline so the audit writer flushes its last batch and exits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::audit::postgres::PostgresAuditLog;
use crate::audit::sqlite::SqliteAuditLog;
use crate::audit::writer::AuditWriter;
use crate::audit::{AuditError, AuditLog};
use crate::config::{AuditBackend, ConfigError, PolicyBackend, Redactor, Settings, StateBackend};
use crate::health::Readiness;
use crate::http::{AppState, router};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, SmsLimit};
use crate::policy::PolicyEngine;
use crate::policy::embedded::{EmbeddedPolicy, PolicyLoadError};
use crate::policy::opa::{OpaPolicy, OpaSetupError};
use crate::state::memory::MemoryState;
use crate::state::redis::{RedisSetupError, RedisState};
use crate::state::{RateLimiter, ReplayGuard};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("policy: {0}")]
    Policy(#[from] PolicyLoadError),
    #[error("policy: {0}")]
    Opa(#[from] OpaSetupError),
    #[error("state: {0}")]
    Redis(#[from] RedisSetupError),
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{var} is set, but this build has no {backend} backend yet")]
    Unsupported {
        var: &'static str,
        backend: &'static str,
    },
}

/// Opens the configured audit store (also used by the `audit` subcommands).
pub async fn open_audit_log(backend: &AuditBackend) -> Result<Arc<dyn AuditLog>, StartupError> {
    match backend {
        AuditBackend::Sqlite { path } => Ok(Arc::new(SqliteAuditLog::open(path).await?)),
        AuditBackend::Postgres { dsn } => Ok(Arc::new(PostgresAuditLog::open(dsn).await?)),
    }
}

/// Creates or completes the audit store's schema (`casf-verifier migrate`).
pub async fn migrate_audit_log(backend: &AuditBackend) -> Result<(), StartupError> {
    match backend {
        // Opening a SQLite file creates its table.
        AuditBackend::Sqlite { path } => SqliteAuditLog::open(path).await.map(drop)?,
        AuditBackend::Postgres { dsn } => PostgresAuditLog::migrate(dsn).await.map(drop)?,
    }
    Ok(())
}

fn build_policy(backend: &PolicyBackend) -> Result<Arc<dyn PolicyEngine>, StartupError> {
    match backend {
        PolicyBackend::Embedded { dir } => Ok(Arc::new(EmbeddedPolicy::load(dir)?)),
        PolicyBackend::Opa { url } => Ok(Arc::new(OpaPolicy::new(url)?)),
    }
}

/// One state store serves both anti-replay and the rate limit.
struct StateStore {
    replay: Arc<dyn ReplayGuard>,
    limiter: Arc<dyn RateLimiter>,
}

async fn build_state(settings: &Settings) -> Result<StateStore, StartupError> {
    match &settings.state {
        StateBackend::Memory => {
            let state = Arc::new(MemoryState::new(
                settings.anti_replay_ttl,
                settings.pending_ttl,
            ));
            Ok(StateStore {
                replay: state.clone(),
                limiter: state,
            })
        }
        StateBackend::Redis { url } => {
            let state = Arc::new(
                RedisState::connect(url, settings.anti_replay_ttl, settings.pending_ttl).await?,
            );
            Ok(StateStore {
                replay: state.clone(),
                limiter: state,
            })
        }
    }
}

pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    audit_task: Option<JoinHandle<()>>,
}

impl Application {
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        let policy = build_policy(&settings.policy)?;
        let StateStore { replay, limiter } = build_state(settings).await?;
        let audit_log = if settings.audit_disabled {
            None
        } else {
            Some(open_audit_log(&settings.audit).await?)
        };
        let (writer, audit_task) = match &audit_log {
            Some(log) => {
                let (writer, task) = AuditWriter::spawn(log.clone()).map_err(|e| {
                    AuditError::Unavailable(format!("cannot start the audit writer: {e}"))
                })?;
                (Some(writer), Some(task))
            }
            None => (None, None),
        };
        let metrics = Arc::new(Metrics::new());
        let pipeline = Pipeline::new(
            policy.clone(),
            settings.anti_replay_enabled.then(|| replay.clone()),
            limiter,
            writer,
            metrics,
            SmsLimit::default(),
        );
        let readiness = Readiness {
            audit: audit_log,
            state: replay,
            policy,
            redactor: Redactor::new(settings.secrets()),
        };
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: settings.http_addr,
                source,
            })?;
        let state = Arc::new(AppState {
            pipeline: Arc::new(pipeline),
            readiness: Arc::new(readiness),
        });
        Ok(Application {
            listener,
            state,
            audit_task,
        })
    }

    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then drains requests and the audit queue.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Application {
            listener,
            state,
            audit_task,
        } = self;
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown)
            .await?;
        // The router, and with it the last AuditWriter, is gone: the writer
        // commits what is queued and stops.
        if let Some(task) = audit_task
            && let Err(error) = task.await
        {
            tracing::error!(%error, "audit writer ended abnormally");
        }
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives
/// right after the ready line is not missed.
#[cfg(unix)]
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).ok();
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(terminate.take()) => {},
            _ = wait(interrupt.take()) => {},
        }
        tracing::info!("shutdown requested: draining in-flight requests and the audit queue");
    }
}

#[cfg(not(unix))]
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested: draining in-flight requests and the audit queue");
    }
}
