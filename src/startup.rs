//! Assembles backends, pipeline and doors from [`Settings`] into an
//! [`Application`] that binds its listeners up front, so tests can run it on
//! port 0 and learn the port before serving.
//!
//! Two listeners share one pipeline and one runtime: HTTP (`/verify` and the
//! operator endpoints) and gRPC (Envoy ext_authz, health, reflection).
//!
//! Shutdown is explicit: both stop accepting, let in-flight requests finish,
//! then the pipeline is dropped so the audit writer flushes its last batch
//! and exits.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::audit::postgres::{PostgresAuditLog, PostgresChainReader};
use crate::audit::scan::{ChainSource, ReadError};
use crate::audit::spool::{Spool, SpoolMode};
use crate::audit::sqlite::{SqliteAuditLog, SqliteChainReader};
use crate::audit::writer::{AuditWriter, SpoolSetup};
use crate::audit::{AuditError, AuditLog};
use crate::callers::Callers;
use crate::config::{
    AuditBackend, ConfigError, PolicyBackend, Redactor, RoutesFile, Settings, StateBackend,
};
use crate::domain::Mode;
use crate::door_tls::DoorTls;
use crate::ext_authz::routes::{RouteMap, RouteMapError};
use crate::health::Readiness;
use crate::http::{AppState, router};
use crate::metrics::Metrics;
use crate::mode_floor::{FloorSource, ModeFloor, read_floor_file};
use crate::pipeline::{Pipeline, SmsLimit};
use crate::policy::PolicyEngine;
use crate::policy::embedded::{EmbeddedPolicy, PolicyLoadError};
use crate::policy::live::{LivePolicy, SetSource};
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
    #[error("routes: {0}")]
    Routes(#[from] RouteMapError),
    #[error("CASF_CALLERS: {0}")]
    Callers(#[from] crate::callers::CallersError),
    #[error("policy: {0}")]
    PolicySet(String),
    #[error("CASF_POLICY_CANDIDATE_DIR: {0}")]
    Candidate(PolicyLoadError),
    #[error("CASF_MODE_FLOOR_FILE: {0}")]
    ModeFloor(#[from] crate::mode_floor::FloorFileError),
    #[error("audit checkpoints: {0}")]
    Checkpoints(String),
    #[error("door TLS: {0}")]
    DoorTls(#[from] crate::door_tls::DoorTlsError),
    #[error("{var} is set, but this build has no {backend} backend yet")]
    Unsupported {
        var: &'static str,
        backend: &'static str,
    },
}

/// The audit spool (`CASF_AUDIT_SPOOL`), for a PostgreSQL audit trail only:
/// SQLite is a local file already. A spool left by a crash is opened here
/// (its torn tail cut off) and drained by the writer in the background.
fn open_spool(
    settings: &Settings,
    log: Option<&dyn AuditLog>,
    metrics: &Metrics,
) -> Result<Option<SpoolSetup>, StartupError> {
    let (Some(dir), Some(log)) = (&settings.audit_spool, log) else {
        return Ok(None);
    };
    if log.backend() != "postgres" {
        tracing::warn!(
            "CASF_AUDIT_SPOOL is ignored: the spool serves a PostgreSQL audit trail (PG_DSN)"
        );
        return Ok(None);
    }
    let spool = Spool::open(dir, settings.audit_spool_max_bytes)
        .map_err(|e| AuditError::Unavailable(e.to_string()))?;
    if settings.audit_spool_mode == SpoolMode::Always {
        tracing::info!(path = %dir.display(), "audit spool mode always: each decision commits to the local spool, shipped to PostgreSQL in the background");
    }
    Ok(Some(SpoolSetup {
        spool,
        strict: settings.audit_strict,
        metrics: metrics.spool(),
        mode: settings.audit_spool_mode,
    }))
}

/// Stores the decisions waiting in the spool in the embedded replay memory:
/// the writer drains them into the chain only after startup, and a replay
/// of one of them must not be decided again.
async fn reload_spooled(spool: &mut Spool, state: &dyn ReplayGuard, ttl: std::time::Duration) {
    if spool.depth() == 0 {
        return;
    }
    let events = match spool.peek(usize::MAX) {
        Ok((events, _)) => events,
        Err(error) => {
            tracing::warn!(%error, "replay memory not reloaded from the audit spool: replays of its decisions may be decided again");
            return;
        }
    };
    match crate::state::reload::reload_spooled(&events, state, ttl).await {
        Ok(counts) => tracing::info!(
            stored = counts.stored,
            skipped = counts.skipped,
            "replay memory reloaded from the audit spool"
        ),
        Err(error) => tracing::warn!(
            %error,
            "replay memory not reloaded from the audit spool: replays of its decisions may be decided again"
        ),
    }
}

/// Opens the configured audit store (also used by the `audit` subcommands).
pub async fn open_audit_log(backend: &AuditBackend) -> Result<Arc<dyn AuditLog>, StartupError> {
    match backend {
        AuditBackend::Sqlite { path } => Ok(Arc::new(SqliteAuditLog::open(path).await?)),
        AuditBackend::Postgres { dsn } => Ok(Arc::new(PostgresAuditLog::open(dsn).await?)),
    }
}

/// Opens the configured audit store read-only for the `audit` commands:
/// nothing is created, and a missing file or table is refused.
pub async fn open_chain_reader(backend: &AuditBackend) -> Result<Box<dyn ChainSource>, ReadError> {
    match backend {
        AuditBackend::Sqlite { path } => Ok(Box::new(SqliteChainReader::open(path).await?)),
        AuditBackend::Postgres { dsn } => Ok(Box::new(PostgresChainReader::open(dsn).await?)),
    }
}

/// `serve`'s periodic checkpoints, when configured: the signing key is read
/// and the chain opened for reading now, so a bad key refuses to start.
async fn checkpoint_schedule(
    settings: &Settings,
) -> Result<Option<crate::audit::checkpoint::Schedule>, StartupError> {
    let (Some(schedule), Some(key_path)) =
        (&settings.audit_checkpoints, &settings.audit_signing_key)
    else {
        return Ok(None);
    };
    if settings.audit_disabled {
        tracing::warn!(
            "CASF_AUDIT_CHECKPOINT_EVERY is ignored: CASF_DISABLE_AUDIT=1 writes no trail"
        );
        return Ok(None);
    }
    let key = crate::audit::signing::AuditSigningKey::load(key_path)
        .map_err(|e| StartupError::Checkpoints(format!("CASF_AUDIT_SIGNING_KEY: {e}")))?;
    let source = open_chain_reader(&settings.audit)
        .await
        .map_err(|e| StartupError::Checkpoints(e.to_string()))?;
    let backend = match settings.audit {
        AuditBackend::Sqlite { .. } => "sqlite",
        AuditBackend::Postgres { .. } => "postgres",
    };
    tracing::info!(
        every_seconds = schedule.every.as_secs(),
        file = %schedule.file.display(),
        key_id = key.key_id(),
        "signed audit checkpoints on"
    );
    Ok(Some(crate::audit::checkpoint::Schedule {
        every: schedule.every,
        file: schedule.file.clone(),
        key: Arc::new(key),
        source,
        backend,
    }))
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

/// The policy and route map as one reloadable set. The embedded policy's
/// Rego tests must pass, as on every reload.
fn build_live_policy(settings: &Settings) -> Result<Arc<LivePolicy>, StartupError> {
    let (policy_dir, opa): (_, Option<Arc<dyn PolicyEngine>>) = match &settings.policy {
        PolicyBackend::Embedded { dir } => (Some(dir.clone()), None),
        PolicyBackend::Opa { url, tls } => {
            (None, Some(Arc::new(OpaPolicy::new(url.expose(), tls)?)))
        }
    };
    let source = SetSource {
        policy_dir,
        routes: settings.routes.clone(),
    };
    LivePolicy::load(source, opa)
        .map(Arc::new)
        .map_err(StartupError::PolicySet)
}

/// One state store serves both anti-replay and the rate limit.
struct StateStore {
    replay: Arc<dyn ReplayGuard>,
    limiter: Arc<dyn RateLimiter>,
    /// The in-process state, for its key count; `None` with Redis.
    memory: Option<Arc<MemoryState>>,
}

async fn build_state(settings: &Settings) -> Result<StateStore, StartupError> {
    match &settings.state {
        StateBackend::Memory { max_keys } => {
            let state = Arc::new(MemoryState::new(
                settings.anti_replay_ttl,
                settings.pending_ttl,
                *max_keys,
            ));
            Ok(StateStore {
                memory: Some(state.clone()),
                replay: state.clone(),
                limiter: state,
            })
        }
        StateBackend::Redis { url, tls } => {
            let state = Arc::new(
                RedisState::connect(
                    url.expose(),
                    tls,
                    settings.anti_replay_ttl,
                    settings.pending_ttl,
                )
                .await?,
            );
            // Said once at startup; `/healthz` repeats it in its checks.
            match state.persistence().await.map(|p| (p, p.warning())) {
                Some((persistence, Some(warning))) => {
                    tracing::warn!(persistence = persistence.as_str(), "{warning}")
                }
                Some((persistence, None)) => {
                    tracing::info!(
                        persistence = persistence.as_str(),
                        "Redis persists stored decisions"
                    )
                }
                None => {}
            }
            Ok(StateStore {
                replay: state.clone(),
                limiter: state,
                memory: None,
            })
        }
    }
}

/// Loads the ext_authz route map. Only the default path may be missing: then
/// the door runs with no routes, denying every Check as unmapped.
pub(crate) fn load_routes(file: &RoutesFile) -> Result<(RouteMap, String), StartupError> {
    let shown = file.path.display();
    match RouteMap::load(&file.path) {
        Ok(map) => {
            let summary = format!("{shown} ({} routes)", map.len());
            Ok((map, summary))
        }
        Err(RouteMapError::Unreadable { .. }) if !file.explicit && !file.path.exists() => {
            tracing::warn!(path = %shown, "no route map (CASF_ROUTES unset and the default file is missing): every ext_authz Check is denied as unmapped");
            Ok((RouteMap::empty(), format!("none ({shown} not found)")))
        }
        Err(RouteMapError::Unreadable { reason, .. }) => Err(RouteMapError::Unreadable {
            path: crate::config::shown_path(&file.path),
            reason,
        }
        .into()),
        Err(error) => Err(error.into()),
    }
}

pub struct Application {
    listener: TcpListener,
    grpc_listener: TcpListener,
    state: Arc<AppState>,
    /// The policy set, reloaded on SIGHUP and file changes while serving.
    live: Arc<LivePolicy>,
    hangup: crate::policy::live::Hangup,
    routes_summary: String,
    audit_task: Option<JoinHandle<()>>,
    /// The floor and, when `CASF_MODE_FLOOR_FILE` is set, the file it follows.
    mode_floor: (Arc<ModeFloor>, Option<PathBuf>),
    /// `CASF_CALLERS`, followed at run time.
    callers: Option<Arc<Callers>>,
    connections: crate::connections::ConnectionLimits,
    /// `CASF_AUDIT_CHECKPOINT_EVERY`: signed checkpoints of the chain head.
    checkpoints: Option<crate::audit::checkpoint::Schedule>,
    door_tls: Option<Arc<DoorTls>>,
    grpc_insecure_peers: bool,
}

impl Application {
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        crate::tls::install_crypto_provider();
        // Checked alone first, for its own error; the live set parses it again.
        let (_, routes_summary) = load_routes(&settings.routes)?;
        let live = build_live_policy(settings)?;
        let policy: Arc<dyn PolicyEngine> = Arc::new(crate::policy::live::LiveEngine(live.clone()));
        let StateStore {
            replay,
            limiter,
            memory,
        } = build_state(settings).await?;
        let audit_log = if settings.audit_disabled {
            None
        } else {
            Some(open_audit_log(&settings.audit).await?)
        };
        let mut metrics = Metrics::new();
        let mut spool = open_spool(settings, audit_log.as_deref(), &metrics)?;
        // Embedded state starts empty: refill it from the audit trail, and
        // from the spool (decisions the chain does not hold yet), so that a
        // restart does not forget the decisions it must replay.
        if let (Some(state), Some(log), true) = (&memory, &audit_log, settings.anti_replay_enabled)
        {
            let started = std::time::Instant::now();
            match crate::state::reload::reload(
                log.as_ref(),
                state.as_ref(),
                settings.anti_replay_ttl,
            )
            .await
            {
                Ok(counts) => tracing::info!(
                    stored = counts.stored,
                    skipped = counts.skipped,
                    elapsed_ms = started.elapsed().as_millis(),
                    "replay memory reloaded from the audit trail"
                ),
                Err(error) => tracing::warn!(
                    %error,
                    "replay memory not reloaded from the audit trail: replays of earlier decisions may be decided again"
                ),
            }
            if let Some(setup) = &mut spool {
                reload_spooled(&mut setup.spool, state.as_ref(), settings.anti_replay_ttl).await;
            }
        }
        let checkpoints = checkpoint_schedule(settings).await?;
        let spool_view = spool.as_ref().map(|s| crate::health::SpoolView {
            metrics: s.metrics.clone(),
            mode: s.mode,
        });
        let (writer, audit_task) = match &audit_log {
            Some(log) => {
                let (writer, task) =
                    AuditWriter::spawn_with_spool(log.clone(), spool).map_err(|e| {
                        AuditError::Unavailable(format!("cannot start the audit writer: {e}"))
                    })?;
                (Some(writer), Some(task))
            }
            None => (None, None),
        };
        if let Some(state) = memory {
            metrics.track_state_keys(state.max_keys(), move || state.keys_held());
        }
        let metrics = Arc::new(metrics);
        let door_tls = match &settings.door_tls {
            Some(files) => {
                let tls = DoorTls::load(files.clone(), metrics.clone())?;
                tracing::info!(
                    cert = %files.cert.display(),
                    client_certificates = if tls.requires_client_certs() { "required" } else { "not asked for" },
                    "TLS on both doors (HTTPS and gRPC over TLS); the files are re-read every second"
                );
                Some(tls)
            }
            None => None,
        };
        let grpc_insecure_peers = settings.grpc_peers_unauthenticated();
        metrics.grpc_insecure_peers(grpc_insecure_peers);
        if grpc_insecure_peers {
            tracing::warn!(
                grpc = %settings.grpc_addr,
                "CASF_GRPC_INSECURE_PEERS=true: the gRPC door is reachable off loopback without client \
                 certificates, and ANY peer that reaches it may assert any identity (JWT claims, \
                 identity headers). Restrict it by network policy, or set CASF_TLS_CLIENT_CA (mTLS)"
            );
        } else if settings.grpc_insecure_peers {
            tracing::info!(
                "CASF_GRPC_INSECURE_PEERS=true has no effect: the gRPC door's peers are loopback or certified"
            );
        }
        // A floor file that cannot be read refuses to start: the operator
        // asked for a floor, and guessing one could be too low.
        let floor = Arc::new(ModeFloor::new(settings.mode_floor));
        if let Some(path) = &settings.mode_floor_file {
            floor.set(FloorSource::File, read_floor_file(path)?, &metrics);
        }
        let initial_floor = floor.get();
        if initial_floor != Mode::Allow {
            tracing::warn!(floor = %initial_floor, "mode floor in force: no decision runs under a lower mode");
        }
        let pipeline = Pipeline::new(
            policy.clone(),
            settings.anti_replay_enabled.then(|| replay.clone()),
            limiter,
            writer,
            metrics,
            SmsLimit::default(),
        )
        .with_mode_floor(floor.clone())
        .with_live_policy(live.clone())
        .with_enforce(settings.enforce);
        let pipeline = match &settings.policy_candidate_dir {
            Some(dir) => {
                let candidate = EmbeddedPolicy::load(dir).map_err(StartupError::Candidate)?;
                tracing::warn!(dir = %dir.display(), "candidate policy evaluated beside the live one on every decision (CASF_POLICY_CANDIDATE_DIR); it decides nothing");
                pipeline.with_candidate(Arc::new(candidate))
            }
            None => pipeline,
        };
        if !settings.enforce {
            tracing::warn!(
                "SHADOW MODE (CASF_ENFORCE=false): every call is decided and audited but answered ALLOW, unless it failed closed"
            );
        }
        let shadowed_routes = live.current().routes.shadowed_routes();
        if shadowed_routes > 0 {
            tracing::warn!(
                routes = shadowed_routes,
                "shadow: routes with enforce: false are answered ALLOW whatever the decision"
            );
        }
        tracing::info!(hash = %live.current().hash, "policy set loaded");
        // Callers that cannot be read refuse to start: the operator asked
        // for authentication, and serving without it would fail open.
        let callers = match &settings.callers {
            Some(path) => {
                let callers = Arc::new(Callers::load(path)?);
                let set = callers.current();
                tracing::info!(
                    callers = set.len(),
                    operators = set.operators(),
                    "CASF_CALLERS: every call must come from a configured caller, within its grants"
                );
                Some(callers)
            }
            None => {
                tracing::warn!(
                    "CASF_CALLERS is unset: callers are NOT authenticated; anyone who reaches a door may claim any role, tenant or tool, and /admin/mode is not served"
                );
                None
            }
        };
        let pipeline = match &callers {
            Some(callers) => pipeline.with_callers(callers.clone()),
            None => pipeline,
        };
        let readiness = Readiness {
            audit: audit_log,
            state: replay,
            policy,
            redactor: Redactor::new(settings.secrets()),
            spool: spool_view,
            callers: callers.clone(),
            enforcement: Some(crate::health::Enforcement {
                live: live.clone(),
                enforce: settings.enforce,
            }),
        };
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: settings.http_addr,
                source,
            })?;
        let grpc_listener = TcpListener::bind(settings.grpc_addr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: settings.grpc_addr,
                source,
            })?;
        let state = Arc::new(AppState {
            pipeline: Arc::new(pipeline),
            readiness: Arc::new(readiness),
        });
        Ok(Application {
            listener,
            grpc_listener,
            state,
            live,
            hangup: crate::policy::live::catch_hangup(),
            routes_summary,
            audit_task,
            mode_floor: (floor, settings.mode_floor_file.clone()),
            callers,
            connections: settings.connections,
            checkpoints,
            door_tls,
            grpc_insecure_peers,
        })
    }

    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc_listener.local_addr()
    }

    /// The route map in use, for the startup line.
    pub fn routes_summary(&self) -> &str {
        &self.routes_summary
    }

    /// Serves until `shutdown` completes, then drains requests and the audit
    /// queue. If either server stops on its own, the other is stopped too.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Application {
            listener,
            grpc_listener,
            state,
            live,
            hangup,
            audit_task,
            mode_floor: (floor, floor_file),
            callers,
            connections,
            checkpoints,
            door_tls,
            grpc_insecure_peers,
            ..
        } = self;
        let (drain, draining) = watch::channel(false);
        let drain = Arc::new(drain);
        let signal = {
            // Drains when the task ends in any way, a panic in `shutdown`
            // included: the servers must never outlive their stop signal.
            let on_end = DrainOnDrop(drain.clone());
            tokio::spawn(async move {
                let _on_end = on_end;
                shutdown.await;
            })
        };
        let stopped = |mut draining: watch::Receiver<bool>| async move {
            // An error means the sender is gone, which also means stop.
            let _ = draining.wait_for(|draining| *draining).await;
        };
        if let Some(path) = floor_file {
            tokio::spawn(crate::mode_floor::follow_file(
                floor,
                path,
                state.pipeline.metrics().clone(),
                stopped(draining.clone()),
            ));
        }
        if let Some(schedule) = checkpoints {
            tokio::spawn(schedule.run(state.pipeline.metrics().clone(), stopped(draining.clone())));
        }
        if let Some(callers) = callers {
            tokio::spawn(
                callers.follow(state.pipeline.metrics().clone(), stopped(draining.clone())),
            );
        }
        tokio::spawn(crate::policy::live::follow(
            live,
            state.pipeline.metrics().clone(),
            hangup,
            stopped(draining.clone()),
        ));
        if let Some(tls) = &door_tls {
            tokio::spawn(tls.clone().follow(stopped(draining.clone())));
        }
        let grpc = crate::grpc::serve(
            grpc_listener,
            connections,
            crate::grpc::GrpcTransport {
                tls: door_tls.clone(),
                insecure_peers: grpc_insecure_peers,
            },
            state.pipeline.clone(),
            state.readiness.clone(),
            draining.clone(),
            stopped(draining.clone()),
        );
        let http = crate::connections::serve_http(
            listener,
            router(state),
            connections,
            door_tls,
            stopped(draining),
        );
        let (http, grpc) = tokio::join!(
            async {
                let result = http.await;
                drain.send_replace(true);
                result
            },
            async {
                let result = grpc.await;
                drain.send_replace(true);
                result
            }
        );
        signal.abort();
        // Both servers, and with them the last AuditWriter, are gone: the
        // writer commits what is queued and stops.
        if let Some(task) = audit_task
            && let Err(error) = task.await
        {
            tracing::error!(%error, "audit writer ended abnormally");
        }
        http?;
        grpc.map_err(std::io::Error::other)
    }
}

/// Starts the drain of both servers when dropped.
struct DrainOnDrop(Arc<watch::Sender<bool>>);

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        self.0.send_replace(true);
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
