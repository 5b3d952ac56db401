//! Typed configuration from the environment (guide §2 plus this project's
//! `CASF_*` extensions). A variable that is unset selects the embedded
//! backend; one that is set but invalid refuses to start, naming the variable.
//! Values that may hold secrets are never echoed back in errors.
//!
//! [`VARIABLES`] is the one list of variables: `--help` is built from it
//! (through clap's `env` support, see [`ConfigArgs`]), and a test holds the
//! README's Configuration table to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::audit::pg_dsn::PgDsn;
use crate::domain::Mode;
pub use crate::door_tls::DoorTlsFiles;
pub use crate::secret::SecretUrl;
use crate::state::DEFAULT_PENDING_TTL;
pub use crate::telemetry::LogFormat;
pub use crate::tls::ClientTls;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

fn invalid(var: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        reason: reason.into(),
    }
}

/// One environment variable the verifier reads.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    /// The same setting as a command-line flag (it wins over the variable).
    pub flag: &'static str,
    /// What applies when it is unset, as shown in `--help`.
    pub default: &'static str,
    pub meaning: &'static str,
    /// May carry a password: `--help` never shows its value.
    pub secret: bool,
}

const fn var(
    name: &'static str,
    flag: &'static str,
    default: &'static str,
    meaning: &'static str,
) -> Variable {
    Variable {
        name,
        flag,
        default,
        meaning,
        secret: false,
    }
}

const fn secret(variable: Variable) -> Variable {
    Variable {
        secret: true,
        ..variable
    }
}

/// Every variable [`Settings`] reads, in the README's order.
pub const VARIABLES: &[Variable] = &[
    secret(var(
        "PG_DSN",
        "pg-dsn",
        "unset: SQLite audit",
        "PostgreSQL audit trail: a postgres:// URL or libpq key=value pairs",
    )),
    secret(var(
        "REDIS_URL",
        "redis-url",
        "unset: in-process state",
        "redis://[:password@]host:port/db (rediss:// for TLS) for anti-replay and the SMS limit",
    )),
    var(
        "CASF_REDIS_CA",
        "redis-ca",
        "unset: system CA certificates",
        "PEM CA file that signs the rediss:// server's certificate",
    ),
    var(
        "CASF_REDIS_CERT",
        "redis-cert",
        "unset: no client certificate",
        "PEM client certificate for rediss:// (with CASF_REDIS_KEY)",
    ),
    var(
        "CASF_REDIS_KEY",
        "redis-key",
        "unset",
        "PEM private key of CASF_REDIS_CERT",
    ),
    secret(var(
        "OPA_URL",
        "opa-url",
        "unset: embedded regorus",
        "OPA base URL (http:// or https://); one POST /v1/data/casf per decision",
    )),
    var(
        "CASF_OPA_CA",
        "opa-ca",
        "unset: system CA certificates",
        "PEM CA file that signs the https:// OPA server's certificate",
    ),
    var(
        "CASF_OPA_CERT",
        "opa-cert",
        "unset: no client certificate",
        "PEM client certificate for https:// OPA (with CASF_OPA_KEY)",
    ),
    var(
        "CASF_OPA_KEY",
        "opa-key",
        "unset",
        "PEM private key of CASF_OPA_CERT",
    ),
    var(
        "ANTI_REPLAY_ENABLED",
        "anti-replay-enabled",
        "true",
        "true/1/yes or false/0/no",
    ),
    var(
        "ANTI_REPLAY_TTL_SECONDS",
        "anti-replay-ttl-seconds",
        "86400",
        "how long a decision is replayed",
    ),
    var(
        "CASF_DISABLE_AUDIT",
        "disable-audit",
        "false",
        "1 skips audit writes (tests only, never in production)",
    ),
    var(
        "CASF_HTTP_ADDR",
        "http-addr",
        "0.0.0.0:8000",
        "HTTP listener",
    ),
    var(
        "CASF_GRPC_ADDR",
        "grpc-addr",
        "127.0.0.1:9191",
        "gRPC listener: ext_authz, health, reflection; a non-loopback address needs CASF_TLS_CLIENT_CA or CASF_GRPC_INSECURE_PEERS=true",
    ),
    var(
        "CASF_ROUTES",
        "routes",
        "envoy/routes.yaml",
        "ext_authz route map; the default file may be missing (every Check is then unmapped)",
    ),
    var(
        "CASF_POLICY_DIR",
        "policy-dir",
        "policies",
        "directory of .rego files for the embedded engine",
    ),
    var(
        "CASF_AUDIT_SQLITE",
        "audit-sqlite",
        "data/casf-audit.db",
        "SQLite audit file when PG_DSN is unset",
    ),
    var(
        "CASF_REPLAY_PENDING_TTL_SECONDS",
        "replay-pending-ttl-seconds",
        "30",
        "lifetime of an in-progress anti-replay claim",
    ),
    var(
        "CASF_STATE_MAX_KEYS",
        "state-max-keys",
        "2000000",
        "most keys the in-process state holds when REDIS_URL is unset",
    ),
    var(
        "CASF_LOG_FORMAT",
        "log-format",
        "text",
        "log lines on stderr: text or json (one JSON object a line)",
    ),
    var(
        "CASF_DECISION_LOG",
        "decision-log",
        "false",
        "true logs one line per decision (door, tool, role, decision, violations, latency, audit hash; never args or subject)",
    ),
    var(
        "CASF_MODE_FLOOR",
        "mode-floor",
        "ALLOW",
        "the operator's mode floor: every decision runs under the stricter of this and the caller's mode (ALLOW < STEP_UP < READ_ONLY < KILL_SWITCH)",
    ),
    var(
        "CASF_MODE_FLOOR_FILE",
        "mode-floor-file",
        "unset",
        "a file naming a mode, re-read every 200 ms: the floor is the stricter of it and CASF_MODE_FLOOR, changed without a restart",
    ),
    var(
        "CASF_CALLERS",
        "callers",
        "unset: callers not authenticated",
        "YAML file of callers (API key SHA-256, mTLS peer or JWT subject) and the roles, tenants and tools each may claim; re-read on change; enables /admin/mode",
    ),
    var(
        "CASF_AUDIT_SPOOL",
        "audit-spool",
        "unset: no spool",
        "directory of the local spool that keeps PostgreSQL audit events through an outage",
    ),
    var(
        "CASF_AUDIT_SPOOL_MAX_BYTES",
        "audit-spool-max-bytes",
        "268435456",
        "bound of the audit spool file (256 MiB)",
    ),
    var(
        "CASF_AUDIT_SPOOL_MODE",
        "audit-spool-mode",
        "outage",
        "outage: spool only what PostgreSQL cannot take; always: the synced spool is every decision's commit point, shipped to PostgreSQL in the background (needs CASF_AUDIT_SPOOL)",
    ),
    var(
        "CASF_AUDIT_STRICT",
        "audit-strict",
        "false",
        "true: a write whose event is neither appended nor spooled fails closed",
    ),
    var(
        "CASF_HTTP_HEADER_TIMEOUT_SECONDS",
        "http-header-timeout-seconds",
        "10",
        "a connection without a whole HTTP/1 request head or HTTP/2 preface (gRPC) within this is closed",
    ),
    var(
        "CASF_IDLE_TIMEOUT_SECONDS",
        "idle-timeout-seconds",
        "60",
        "a connection (either door) the client sent nothing on for this long is closed",
    ),
    var(
        "CASF_ENFORCE",
        "enforce",
        "true",
        "false is shadow mode: every call is decided, audited and counted, but answered ALLOW with the real decision beside it (never a fail-closed deny)",
    ),
    var(
        "CASF_POLICY_CANDIDATE_DIR",
        "policy-candidate-dir",
        "unset",
        "directory of a candidate Rego policy evaluated beside the live one on every decision, never deciding; disagreements are counted and audited",
    ),
    var(
        "CASF_MAX_CONNECTIONS",
        "max-connections",
        "4096",
        "most open connections per door; one more is closed at once",
    ),
    var(
        "CASF_AUDIT_SIGNING_KEY",
        "audit-signing-key",
        "unset: no signing",
        "PEM PKCS#8 Ed25519 private key (audit keygen) that signs audit checkpoints and digest --sign",
    ),
    var(
        "CASF_AUDIT_CHECKPOINT_EVERY",
        "audit-checkpoint-every",
        "unset: no periodic checkpoints",
        "serve signs a checkpoint of the chain head this often: minutes, or a number with s, m or h (30s, 15m, 1h)",
    ),
    var(
        "CASF_AUDIT_CHECKPOINT_FILE",
        "audit-checkpoint-file",
        "unset",
        "the file serve appends its checkpoints to (with CASF_AUDIT_CHECKPOINT_EVERY)",
    ),
    var(
        "CASF_TLS_CERT",
        "tls-cert",
        "unset: plaintext doors",
        "PEM certificate chain: HTTPS on the HTTP door and TLS on the gRPC door (with CASF_TLS_KEY); re-read every second",
    ),
    var(
        "CASF_TLS_KEY",
        "tls-key",
        "unset",
        "PEM private key of CASF_TLS_CERT",
    ),
    var(
        "CASF_TLS_CLIENT_CA",
        "tls-client-ca",
        "unset: no client certificates",
        "PEM CA file: both doors require a client certificate it signed (mTLS)",
    ),
    var(
        "CASF_GRPC_INSECURE_PEERS",
        "grpc-insecure-peers",
        "false",
        "true lets a non-loopback gRPC door without CASF_TLS_CLIENT_CA start, trusting any peer's JWT claims and identity headers",
    ),
];

/// Variables read by libraries rather than by [`Settings`]; `--help` lists
/// them too.
pub const LIBRARY_VARIABLES: &[Variable] = &[
    var(
        "RUST_LOG",
        "",
        "info",
        "log filter (tracing-subscriber EnvFilter syntax)",
    ),
    var(
        "MIMALLOC_PURGE_DELAY",
        "",
        "10",
        "ms before the allocator returns freed memory; 100 recommended for sidecars",
    ),
    var(
        "MIMALLOC_ARENA_EAGER_COMMIT",
        "",
        "2",
        "0 (recommended) commits the allocator's arenas on demand",
    ),
    var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "",
        "unset: no tracing export",
        "OTLP/gRPC collector for the decision spans (any OTEL_* here turns export on)",
    ),
    var(
        "OTEL_SERVICE_NAME",
        "",
        "casf-verifier",
        "service.name of the exported spans",
    ),
    var(
        "OTEL_TRACES_SAMPLER",
        "",
        "parentbased_always_on",
        "OpenTelemetry sampler (always_on, traceidratio, parentbased_traceidratio, ...)",
    ),
    var(
        "OTEL_TRACES_SAMPLER_ARG",
        "",
        "1.0",
        "the ratio of the traceidratio samplers",
    ),
];

/// The raw values of [`VARIABLES`], from flags or the environment, as clap
/// collected them; [`Settings::from_args`] is their one typed parse.
#[derive(Clone, Default)]
pub struct ConfigArgs {
    values: std::collections::BTreeMap<&'static str, String>,
}

impl ConfigArgs {
    /// Raw values by variable name, for tests.
    pub fn from_pairs(pairs: &[(&'static str, &str)]) -> Self {
        ConfigArgs {
            values: pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        }
    }

    fn get(&self, var: &str) -> Option<String> {
        self.values.get(var).cloned()
    }
}

/// Names only: a value may be a secret.
impl std::fmt::Debug for ConfigArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

impl clap::FromArgMatches for ConfigArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut args = ConfigArgs::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        for variable in VARIABLES {
            if let Some(value) = matches.get_one::<String>(variable.name) {
                self.values.insert(variable.name, value.clone());
            }
        }
        Ok(())
    }
}

impl clap::Args for ConfigArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        VARIABLES.iter().fold(cmd, |cmd, variable| {
            cmd.arg(
                clap::Arg::new(variable.name)
                    .long(variable.flag)
                    .env(variable.name)
                    .hide_env_values(variable.secret)
                    .global(true)
                    .help_heading("Configuration (environment variable or flag)")
                    .help(format!(
                        "{} [default: {}]",
                        variable.meaning, variable.default
                    )),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// The `--help` epilogue: variables that are not settings, and a warning
/// about secrets on a command line.
pub fn help_epilogue() -> String {
    let also: Vec<String> = LIBRARY_VARIABLES
        .iter()
        .map(|v| format!("  {}  {} [default: {}]", v.name, v.meaning, v.default))
        .collect();
    format!(
        "Also read from the environment:\n{}\n\nPass secrets (PG_DSN, REDIS_URL, OPA_URL) in the \
         environment, not as flags: a command line is visible to other users of the host.",
        also.join("\n")
    )
}

/// Where policy is evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyBackend {
    /// `regorus`, loading every `.rego` in the directory.
    Embedded { dir: PathBuf },
    /// An OPA server's REST API at this base URL.
    Opa { url: SecretUrl, tls: ClientTls },
}

/// Where anti-replay and rate-limit state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateBackend {
    /// In-process, holding at most `max_keys` keys (`CASF_STATE_MAX_KEYS`).
    Memory {
        max_keys: usize,
    },
    Redis {
        url: SecretUrl,
        tls: ClientTls,
    },
}

/// Where the audit trail is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditBackend {
    Sqlite {
        path: PathBuf,
    },
    /// `PG_DSN`, parsed once here.
    Postgres {
        dsn: PgDsn,
    },
}

// Debug is derived: the URL and DSN types print no password (see
// `crate::secret`), so neither logs nor panics can show one.

/// The ext_authz route map (`CASF_ROUTES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutesFile {
    pub path: PathBuf,
    /// Set through `CASF_ROUTES`: a file that is missing refuses to start.
    /// The default path may be absent, and then every Check is unmapped.
    pub explicit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub http_addr: SocketAddr,
    /// The gRPC door: Envoy ext_authz, gRPC health and reflection.
    pub grpc_addr: SocketAddr,
    pub routes: RoutesFile,
    pub policy: PolicyBackend,
    pub state: StateBackend,
    pub audit: AuditBackend,
    /// `CASF_DISABLE_AUDIT=1`: no audit writes at all (tests only).
    pub audit_disabled: bool,
    pub anti_replay_enabled: bool,
    pub anti_replay_ttl: Duration,
    /// Lifetime of a claim whose decision was never stored.
    pub pending_ttl: Duration,
    /// `CASF_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `CASF_DECISION_LOG`: one log line per decision.
    pub decision_log: bool,
    /// `CASF_MODE_FLOOR`: the lowest mode any decision runs under.
    pub mode_floor: Mode,
    /// `CASF_MODE_FLOOR_FILE`: followed at run time, never lowering the floor
    /// below `mode_floor`.
    pub mode_floor_file: Option<PathBuf>,
    /// `CASF_CALLERS`: who may call, and what each may claim.
    pub callers: Option<PathBuf>,
    /// `CASF_AUDIT_SPOOL`: where PostgreSQL audit events wait out an outage.
    pub audit_spool: Option<PathBuf>,
    /// `CASF_AUDIT_SPOOL_MAX_BYTES`.
    pub audit_spool_max_bytes: u64,
    /// `CASF_AUDIT_STRICT`.
    pub audit_strict: bool,
    /// `CASF_AUDIT_SPOOL_MODE`; `always` is refused without a spool and a
    /// PostgreSQL audit trail.
    pub audit_spool_mode: crate::audit::spool::SpoolMode,
    /// What one client connection may hold, per door.
    pub connections: crate::connections::ConnectionLimits,
    /// `CASF_TLS_CERT`, `CASF_TLS_KEY`, `CASF_TLS_CLIENT_CA`: TLS on both doors.
    pub door_tls: Option<DoorTlsFiles>,
    /// `CASF_GRPC_INSECURE_PEERS`: any peer of the gRPC door may assert
    /// identities (the operator accepted the risk of a non-loopback,
    /// non-mTLS door).
    pub grpc_insecure_peers: bool,
    /// `CASF_ENFORCE`: false is shadow mode.
    pub enforce: bool,
    /// `CASF_POLICY_CANDIDATE_DIR`.
    pub policy_candidate_dir: Option<PathBuf>,
    /// `CASF_AUDIT_SIGNING_KEY`: the path only; the key is read by what signs.
    pub audit_signing_key: Option<PathBuf>,
    /// `CASF_AUDIT_CHECKPOINT_EVERY` and `CASF_AUDIT_CHECKPOINT_FILE`.
    pub audit_checkpoints: Option<CheckpointSchedule>,
}

impl Settings {
    /// Whether `CASF_GRPC_INSECURE_PEERS` is what lets the gRPC door start:
    /// reachable off loopback, with no client certificates required.
    pub fn grpc_peers_unauthenticated(&self) -> bool {
        self.grpc_insecure_peers
            && !self.grpc_addr.ip().is_loopback()
            && self.door_tls.as_ref().is_none_or(|t| t.client_ca.is_none())
    }
}

/// `serve`'s periodic signed checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSchedule {
    pub every: Duration,
    pub file: PathBuf,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// The settings from what clap collected (flags, then the environment).
    pub fn from_args(args: &ConfigArgs) -> Result<Self, ConfigError> {
        Self::from_lookup(|var| args.get(var))
    }

    /// Reads settings through `lookup`, so tests need not touch the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |var: &'static str| -> Result<Option<String>, ConfigError> {
            debug_assert!(
                VARIABLES.iter().any(|v| v.name == var),
                "{var} is missing from VARIABLES (and so from --help)"
            );
            match lookup(var) {
                Some(value) if value.trim().is_empty() => Err(invalid(
                    var,
                    "is set but empty; unset it for the embedded default",
                )),
                other => Ok(other),
            }
        };
        let http_addr = match get("CASF_HTTP_ADDR")? {
            Some(raw) => raw.parse().map_err(|_| {
                invalid("CASF_HTTP_ADDR", format!("expected HOST:PORT, got {raw:?}"))
            })?,
            None => SocketAddr::from(([0, 0, 0, 0], 8000)),
        };
        let grpc_addr = match get("CASF_GRPC_ADDR")? {
            Some(raw) => raw.parse().map_err(|_| {
                invalid("CASF_GRPC_ADDR", format!("expected HOST:PORT, got {raw:?}"))
            })?,
            // Loopback: the sidecar topology. Anyone who reaches the door
            // may assert identities unless peers are authenticated.
            None => SocketAddr::from(([127, 0, 0, 1], 9191)),
        };
        let door_tls = match (get("CASF_TLS_CERT")?, get("CASF_TLS_KEY")?) {
            (Some(cert), Some(key)) => Some(DoorTlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
                client_ca: get("CASF_TLS_CLIENT_CA")?.map(PathBuf::from),
            }),
            (Some(_), None) => {
                return Err(invalid("CASF_TLS_KEY", "must be set with CASF_TLS_CERT"));
            }
            (None, Some(_)) => {
                return Err(invalid("CASF_TLS_CERT", "must be set with CASF_TLS_KEY"));
            }
            (None, None) => {
                if get("CASF_TLS_CLIENT_CA")?.is_some() {
                    return Err(invalid(
                        "CASF_TLS_CLIENT_CA",
                        "needs CASF_TLS_CERT and CASF_TLS_KEY: client certificates are asked for in a TLS handshake",
                    ));
                }
                None
            }
        };
        let grpc_insecure_peers = parse_bool(
            "CASF_GRPC_INSECURE_PEERS",
            get("CASF_GRPC_INSECURE_PEERS")?,
            false,
        )?;
        let peers_certified = door_tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if !grpc_addr.ip().is_loopback() && !peers_certified && !grpc_insecure_peers {
            return Err(invalid(
                "CASF_GRPC_ADDR",
                format!(
                    "{grpc_addr} is not a loopback address, and without CASF_TLS_CLIENT_CA anyone \
                     who reaches it could assert any identity (JWT claims, identity headers): set \
                     CASF_TLS_CLIENT_CA (mTLS), bind loopback (sidecar), or accept the risk with \
                     CASF_GRPC_INSECURE_PEERS=true"
                ),
            ));
        }
        let routes = match get("CASF_ROUTES")? {
            Some(path) => RoutesFile {
                path: PathBuf::from(path),
                explicit: true,
            },
            None => RoutesFile {
                path: PathBuf::from("envoy/routes.yaml"),
                explicit: false,
            },
        };
        let policy = match get("OPA_URL")? {
            Some(url) => {
                let url = parse_http_url("OPA_URL", &url)?;
                let tls = client_tls(
                    &get,
                    ("CASF_OPA_CA", "CASF_OPA_CERT", "CASF_OPA_KEY"),
                    ("OPA_URL", url.starts_with("https://"), "https://"),
                )?;
                PolicyBackend::Opa {
                    url: SecretUrl::new(url),
                    tls,
                }
            }
            None => PolicyBackend::Embedded {
                dir: get("CASF_POLICY_DIR")?
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("policies")),
            },
        };
        let state = match get("REDIS_URL")? {
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                let tls = client_tls(
                    &get,
                    ("CASF_REDIS_CA", "CASF_REDIS_CERT", "CASF_REDIS_KEY"),
                    ("REDIS_URL", url.starts_with("rediss://"), "rediss://"),
                )?;
                StateBackend::Redis {
                    url: SecretUrl::new(url),
                    tls,
                }
            }
            Some(_) => return Err(invalid("REDIS_URL", "expected a redis:// or rediss:// URL")),
            None => StateBackend::Memory {
                max_keys: parse_positive(
                    "CASF_STATE_MAX_KEYS",
                    get("CASF_STATE_MAX_KEYS")?,
                    crate::state::memory::DEFAULT_MAX_KEYS,
                    "",
                )?,
            },
        };
        let audit = match get("PG_DSN")? {
            Some(dsn) => AuditBackend::Postgres {
                dsn: PgDsn::parse(&dsn).map_err(|e| invalid("PG_DSN", e.to_string()))?,
            },
            None => AuditBackend::Sqlite {
                path: get("CASF_AUDIT_SQLITE")?
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("data/casf-audit.db")),
            },
        };
        let audit_signing_key = get("CASF_AUDIT_SIGNING_KEY")?.map(PathBuf::from);
        let audit_checkpoints = match (
            get("CASF_AUDIT_CHECKPOINT_EVERY")?,
            get("CASF_AUDIT_CHECKPOINT_FILE")?,
        ) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(invalid(
                    "CASF_AUDIT_CHECKPOINT_FILE",
                    "is set but CASF_AUDIT_CHECKPOINT_EVERY is not",
                ));
            }
            (Some(_), None) => {
                return Err(invalid(
                    "CASF_AUDIT_CHECKPOINT_EVERY",
                    "needs CASF_AUDIT_CHECKPOINT_FILE, the file to append to",
                ));
            }
            (Some(every), Some(file)) => {
                if audit_signing_key.is_none() {
                    return Err(invalid(
                        "CASF_AUDIT_CHECKPOINT_EVERY",
                        "needs CASF_AUDIT_SIGNING_KEY, the key that signs them",
                    ));
                }
                Some(CheckpointSchedule {
                    every: parse_interval("CASF_AUDIT_CHECKPOINT_EVERY", &every)?,
                    file: PathBuf::from(file),
                })
            }
        };
        let audit_spool_mode = spool_mode(&get, &audit)?;
        Ok(Settings {
            http_addr,
            grpc_addr,
            door_tls,
            grpc_insecure_peers,
            routes,
            policy,
            state,
            audit,
            audit_disabled: parse_bool("CASF_DISABLE_AUDIT", get("CASF_DISABLE_AUDIT")?, false)?,
            anti_replay_enabled: parse_bool(
                "ANTI_REPLAY_ENABLED",
                get("ANTI_REPLAY_ENABLED")?,
                true,
            )?,
            anti_replay_ttl: parse_seconds(
                "ANTI_REPLAY_TTL_SECONDS",
                get("ANTI_REPLAY_TTL_SECONDS")?,
                Duration::from_secs(86_400),
            )?,
            pending_ttl: parse_seconds(
                "CASF_REPLAY_PENDING_TTL_SECONDS",
                get("CASF_REPLAY_PENDING_TTL_SECONDS")?,
                DEFAULT_PENDING_TTL,
            )?,
            log_format: match get("CASF_LOG_FORMAT")? {
                None => LogFormat::Text,
                Some(raw) => LogFormat::parse(&raw).ok_or_else(|| {
                    invalid(
                        "CASF_LOG_FORMAT",
                        format!("expected text or json, got {raw:?}"),
                    )
                })?,
            },
            decision_log: parse_bool("CASF_DECISION_LOG", get("CASF_DECISION_LOG")?, false)?,
            mode_floor: match get("CASF_MODE_FLOOR")? {
                None => Mode::Allow,
                Some(raw) => Mode::parse(raw.trim())
                    .map_err(|e| invalid("CASF_MODE_FLOOR", e.to_string()))?,
            },
            mode_floor_file: get("CASF_MODE_FLOOR_FILE")?.map(PathBuf::from),
            callers: get("CASF_CALLERS")?.map(PathBuf::from),
            audit_spool: get("CASF_AUDIT_SPOOL")?.map(PathBuf::from),
            audit_spool_max_bytes: parse_positive(
                "CASF_AUDIT_SPOOL_MAX_BYTES",
                get("CASF_AUDIT_SPOOL_MAX_BYTES")?,
                crate::audit::spool::DEFAULT_MAX_BYTES,
                " of bytes",
            )?,
            audit_strict: parse_bool("CASF_AUDIT_STRICT", get("CASF_AUDIT_STRICT")?, false)?,
            enforce: parse_bool("CASF_ENFORCE", get("CASF_ENFORCE")?, true)?,
            policy_candidate_dir: get("CASF_POLICY_CANDIDATE_DIR")?.map(PathBuf::from),
            audit_spool_mode,
            connections: crate::connections::ConnectionLimits {
                header_timeout: parse_seconds(
                    "CASF_HTTP_HEADER_TIMEOUT_SECONDS",
                    get("CASF_HTTP_HEADER_TIMEOUT_SECONDS")?,
                    crate::connections::DEFAULT_HEADER_TIMEOUT,
                )?,
                idle_timeout: parse_seconds(
                    "CASF_IDLE_TIMEOUT_SECONDS",
                    get("CASF_IDLE_TIMEOUT_SECONDS")?,
                    crate::connections::DEFAULT_IDLE_TIMEOUT,
                )?,
                max_connections: parse_positive(
                    "CASF_MAX_CONNECTIONS",
                    get("CASF_MAX_CONNECTIONS")?,
                    crate::connections::DEFAULT_MAX_CONNECTIONS,
                    "",
                )?,
            },
            audit_signing_key,
            audit_checkpoints,
        })
    }

    /// Secret fragments of the configuration (passwords in DSNs and URLs),
    /// to be masked in anything shown to operators.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        if let AuditBackend::Postgres { dsn } = &self.audit {
            secrets.extend(dsn.password_forms());
        }
        if let StateBackend::Redis { url, .. } = &self.state {
            secrets.extend(url.password_forms());
        }
        if let PolicyBackend::Opa { url, .. } = &self.policy {
            secrets.extend(url.password_forms());
        }
        secrets
    }

    /// One line naming the backend of each concern, for the startup log.
    pub fn describe_backends(&self) -> String {
        let policy = match &self.policy {
            PolicyBackend::Embedded { dir } => format!("embedded regorus ({})", dir.display()),
            PolicyBackend::Opa { url, .. } => format!("OPA REST ({})", url.redacted()),
        };
        let state = match &self.state {
            StateBackend::Memory { max_keys } => {
                format!("in-process memory (at most {max_keys} keys)")
            }
            StateBackend::Redis { url, .. } => format!("Redis ({})", url.redacted()),
        };
        let audit = match (&self.audit, self.audit_disabled) {
            (_, true) => "DISABLED (CASF_DISABLE_AUDIT=1, never in production)".to_owned(),
            (AuditBackend::Sqlite { path }, false) => format!("SQLite ({})", path.display()),
            (AuditBackend::Postgres { dsn }, false) => {
                format!("PostgreSQL (PG_DSN, sslmode={})", dsn.ssl_mode())
            }
        };
        let replay = if self.anti_replay_enabled {
            format!("on, ttl {}s", self.anti_replay_ttl.as_secs())
        } else {
            "off".to_owned()
        };
        format!("policy={policy} state={state} audit={audit} anti_replay={replay}")
    }
}

type Lookup<'a> = dyn Fn(&'static str) -> Result<Option<String>, ConfigError> + 'a;

/// A backend's `(CA, CERT, KEY)` variables. They are refused unless the
/// backend's URL (`url_var`) uses TLS (`tls`, scheme `scheme`): a CA that is
/// silently ignored would look like protection that is not there.
fn client_tls(
    get: &Lookup<'_>,
    (ca, cert, key): (&'static str, &'static str, &'static str),
    (url_var, tls, scheme): (&'static str, bool, &'static str),
) -> Result<ClientTls, ConfigError> {
    let files = ClientTls {
        ca: get(ca)?.map(PathBuf::from),
        cert: get(cert)?.map(PathBuf::from),
        key: get(key)?.map(PathBuf::from),
    };
    if !tls && !files.is_empty() {
        let set = [(ca, &files.ca), (cert, &files.cert), (key, &files.key)]
            .into_iter()
            .find_map(|(var, value)| value.as_ref().map(|_| var))
            .unwrap_or(ca);
        return Err(invalid(
            set,
            format!("is set but {url_var} does not use {scheme}"),
        ));
    }
    match (&files.cert, &files.key) {
        (Some(_), None) => Err(invalid(key, format!("must be set with {cert}"))),
        (None, Some(_)) => Err(invalid(cert, format!("must be set with {key}"))),
        _ => Ok(files),
    }
}

/// `CASF_AUDIT_SPOOL_MODE`. `always` makes the spool the commit point, so
/// it needs one (`CASF_AUDIT_SPOOL`) and a PostgreSQL trail to ship to:
/// asked for and silently not given, it would be a promise not kept.
fn spool_mode(
    get: &Lookup<'_>,
    audit: &AuditBackend,
) -> Result<crate::audit::spool::SpoolMode, ConfigError> {
    use crate::audit::spool::SpoolMode;
    const VAR: &str = "CASF_AUDIT_SPOOL_MODE";
    let mode = match get(VAR)? {
        None => return Ok(SpoolMode::default()),
        Some(raw) => SpoolMode::parse(&raw)
            .ok_or_else(|| invalid(VAR, format!("expected outage or always, got {raw:?}")))?,
    };
    if mode == SpoolMode::Always {
        if get("CASF_AUDIT_SPOOL")?.is_none() {
            return Err(invalid(
                VAR,
                "always needs CASF_AUDIT_SPOOL (the directory of the local spool) to be set",
            ));
        }
        if !matches!(audit, AuditBackend::Postgres { .. }) {
            return Err(invalid(
                VAR,
                "always needs a PostgreSQL audit trail (PG_DSN) to ship the spool to",
            ));
        }
    }
    Ok(mode)
}

fn parse_bool(var: &'static str, raw: Option<String>, default: bool) -> Result<bool, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(invalid(
            var,
            format!("expected true/1/yes or false/0/no, got {raw:?}"),
        )),
    }
}

/// A period: whole minutes, or a whole number with `s`, `m` or `h`.
fn parse_interval(var: &'static str, raw: &str) -> Result<Duration, ConfigError> {
    let raw = raw.trim();
    let (digits, unit) = match raw.char_indices().last() {
        Some((at, 's')) => (&raw[..at], 1),
        Some((at, 'm')) => (&raw[..at], 60),
        Some((at, 'h')) => (&raw[..at], 3600),
        _ => (raw, 60),
    };
    match digits.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n.saturating_mul(unit))),
        _ => Err(invalid(
            var,
            format!("expected minutes or a whole number with s, m or h (e.g. 15m), got {raw:?}"),
        )),
    }
}

fn parse_seconds(
    var: &'static str,
    raw: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    parse_positive(var, raw, default.as_secs(), " of seconds").map(Duration::from_secs)
}

/// A whole number above zero, or `default` when unset; `unit` completes
/// the error message.
fn parse_positive<N: std::str::FromStr + Default + PartialOrd>(
    var: &'static str,
    raw: Option<String>,
    default: N,
    unit: &str,
) -> Result<N, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().parse::<N>() {
        Ok(n) if n > N::default() => Ok(n),
        _ => Err(invalid(
            var,
            format!("expected a positive whole number{unit}, got {raw:?}"),
        )),
    }
}

fn parse_http_url(var: &'static str, raw: &str) -> Result<String, ConfigError> {
    if !(raw.starts_with("http://") || raw.starts_with("https://")) {
        return Err(invalid(var, "expected an http:// or https:// URL"));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

/// A path as configured, plus the absolute path it resolved to when it was
/// relative, so an error says where the process really looked.
pub fn shown_path(path: &std::path::Path) -> String {
    if path.is_absolute() {
        return path.display().to_string();
    }
    match std::path::absolute(path) {
        Ok(absolute) => format!("{} ({})", path.display(), absolute.display()),
        Err(_) => path.display().to_string(),
    }
}

/// Masks configured secrets in text that comes from elsewhere (a driver's
/// or a server's error message), as a second line behind the secret types:
/// what this crate prints itself never holds a secret to begin with.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub fn new(secrets: Vec<String>) -> Self {
        Redactor { secrets }
    }

    pub fn redact(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_owned(), |text, secret| {
            text.replace(secret.as_str(), "***")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn checkpoint_schedule_needs_its_file_and_key_and_reads_units() {
        let key = ("CASF_AUDIT_SIGNING_KEY", "k.pem");
        let file = ("CASF_AUDIT_CHECKPOINT_FILE", "cp.jsonl");
        for (every, secs) in [("15", 900), ("30s", 30), ("2m", 120), ("1h", 3600)] {
            let s = settings(&[key, file, ("CASF_AUDIT_CHECKPOINT_EVERY", every)]).unwrap();
            assert_eq!(
                s.audit_checkpoints,
                Some(CheckpointSchedule {
                    every: Duration::from_secs(secs),
                    file: "cp.jsonl".into()
                })
            );
        }
        for (vars, blamed) in [
            (
                vec![key, ("CASF_AUDIT_CHECKPOINT_EVERY", "5")],
                "CASF_AUDIT_CHECKPOINT_EVERY",
            ),
            (vec![key, file], "CASF_AUDIT_CHECKPOINT_FILE"),
            (
                vec![file, ("CASF_AUDIT_CHECKPOINT_EVERY", "5")],
                "CASF_AUDIT_CHECKPOINT_EVERY",
            ),
            (
                vec![key, file, ("CASF_AUDIT_CHECKPOINT_EVERY", "0s")],
                "CASF_AUDIT_CHECKPOINT_EVERY",
            ),
            (
                vec![key, file, ("CASF_AUDIT_CHECKPOINT_EVERY", "5d")],
                "CASF_AUDIT_CHECKPOINT_EVERY",
            ),
        ] {
            assert_eq!(settings(&vars).unwrap_err().var, blamed, "{vars:?}");
        }
        assert_eq!(settings(&[]).unwrap().audit_checkpoints, None);
    }

    #[test]
    fn unset_means_embedded() {
        let s = settings(&[]).unwrap();
        assert_eq!(
            s.policy,
            PolicyBackend::Embedded {
                dir: "policies".into()
            }
        );
        assert_eq!(
            s.state,
            StateBackend::Memory {
                max_keys: crate::state::memory::DEFAULT_MAX_KEYS
            }
        );
        assert_eq!(
            s.audit,
            AuditBackend::Sqlite {
                path: "data/casf-audit.db".into()
            }
        );
        assert!(s.anti_replay_enabled);
        assert_eq!(s.anti_replay_ttl, Duration::from_secs(86_400));
        assert_eq!(s.grpc_addr, SocketAddr::from(([127, 0, 0, 1], 9191)));
        assert_eq!(
            s.routes,
            RoutesFile {
                path: "envoy/routes.yaml".into(),
                explicit: false
            }
        );
    }

    #[test]
    fn the_in_process_state_bound_applies_only_without_redis() {
        let s = settings(&[("CASF_STATE_MAX_KEYS", "5000")]).unwrap();
        assert_eq!(s.state, StateBackend::Memory { max_keys: 5000 });
        let s = settings(&[
            ("CASF_STATE_MAX_KEYS", "5000"),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
        ])
        .unwrap();
        assert!(matches!(s.state, StateBackend::Redis { .. }));
    }

    #[test]
    fn the_always_spool_mode_needs_a_spool_and_postgres() {
        use crate::audit::spool::SpoolMode;
        let pg = ("PG_DSN", "postgres://casf:pw@127.0.0.1:5432/casf");
        let spool = ("CASF_AUDIT_SPOOL", "/var/lib/casf/spool");
        assert_eq!(settings(&[]).unwrap().audit_spool_mode, SpoolMode::Outage);
        let always = ("CASF_AUDIT_SPOOL_MODE", "always");
        assert_eq!(
            settings(&[pg, spool, always]).unwrap().audit_spool_mode,
            SpoolMode::Always
        );
        let no_spool = settings(&[pg, always]).unwrap_err();
        assert_eq!(no_spool.var, "CASF_AUDIT_SPOOL_MODE");
        assert!(
            no_spool.to_string().contains("CASF_AUDIT_SPOOL "),
            "{no_spool}"
        );
        let sqlite = settings(&[spool, always]).unwrap_err();
        assert!(sqlite.to_string().contains("PG_DSN"), "{sqlite}");
        assert_eq!(
            settings(&[pg, spool, ("CASF_AUDIT_SPOOL_MODE", "sometimes")])
                .unwrap_err()
                .var,
            "CASF_AUDIT_SPOOL_MODE"
        );
    }

    #[test]
    fn invalid_values_name_the_variable() {
        assert_eq!(
            settings(&[("ANTI_REPLAY_TTL_SECONDS", "abc")])
                .unwrap_err()
                .var,
            "ANTI_REPLAY_TTL_SECONDS"
        );
        assert_eq!(
            settings(&[("ANTI_REPLAY_ENABLED", "maybe")])
                .unwrap_err()
                .var,
            "ANTI_REPLAY_ENABLED"
        );
        assert_eq!(
            settings(&[("CASF_HTTP_ADDR", "nowhere")]).unwrap_err().var,
            "CASF_HTTP_ADDR"
        );
        assert_eq!(
            settings(&[("CASF_GRPC_ADDR", ":9191")]).unwrap_err().var,
            "CASF_GRPC_ADDR"
        );
        assert_eq!(
            settings(&[("CASF_ROUTES", " ")]).unwrap_err().var,
            "CASF_ROUTES"
        );
        assert_eq!(settings(&[("PG_DSN", "")]).unwrap_err().var, "PG_DSN");
        for bad in ["0", "-1", "many"] {
            assert_eq!(
                settings(&[("CASF_STATE_MAX_KEYS", bad)]).unwrap_err().var,
                "CASF_STATE_MAX_KEYS"
            );
        }
        assert_eq!(
            settings(&[("OPA_URL", "opa:8181")]).unwrap_err().var,
            "OPA_URL"
        );
    }

    #[test]
    fn secrets_are_found_and_never_echoed() {
        let s = settings(&[
            ("PG_DSN", "dbname=casf user=casf password=S3cret host=pg"),
            ("REDIS_URL", "redis://:r3dis@redis:6379/0"),
            ("OPA_URL", "http://u:0pa@opa:8181/"),
        ])
        .unwrap();
        assert_eq!(s.secrets(), vec!["S3cret", "r3dis", "0pa"]);
        let line = s.describe_backends();
        assert!(
            !line.contains("S3cret") && !line.contains("r3dis") && !line.contains("0pa"),
            "{line}"
        );
        // libpq's default, which this build honours: TLS if offered.
        assert!(line.contains("sslmode=prefer"), "{line}");
        let err = settings(&[("REDIS_URL", "http://:pw@x")])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("pw"));
        assert_eq!(
            Redactor::new(s.secrets()).redact("auth failed for S3cret"),
            "auth failed for ***"
        );
        assert_eq!(
            PgDsn::parse("postgres://casf:pw@127.0.0.1/casf")
                .unwrap()
                .password_forms(),
            vec!["pw"]
        );
    }

    #[test]
    fn dsn_secrets_cover_quoted_and_percent_encoded_passwords() {
        let forms = |dsn: &str| PgDsn::parse(dsn).unwrap().password_forms();
        assert_eq!(
            forms("postgres://casf:p%40ss@127.0.0.1/casf"),
            vec!["p%40ss", "p@ss"]
        );
        assert_eq!(
            forms("user=casf password='two words' host=pg"),
            vec!["two words"]
        );
        assert!(forms("user=casf host=pg").is_empty());
        let err = settings(&[("PG_DSN", "host=pg password=hunter2 nonsense=hunter2")]).unwrap_err();
        assert_eq!(err.var, "PG_DSN");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn door_tls_comes_in_pairs_and_guards_a_non_loopback_grpc_door() {
        let var = |vars: &[(&str, &str)]| settings(vars).unwrap_err().var;
        assert_eq!(var(&[("CASF_TLS_CERT", "/c.pem")]), "CASF_TLS_KEY");
        assert_eq!(var(&[("CASF_TLS_KEY", "/k.pem")]), "CASF_TLS_CERT");
        assert_eq!(
            var(&[("CASF_TLS_CLIENT_CA", "/ca.pem")]),
            "CASF_TLS_CLIENT_CA"
        );
        let tls = [("CASF_TLS_CERT", "/c.pem"), ("CASF_TLS_KEY", "/k.pem")];
        let s = settings(&tls).unwrap();
        assert!(s.door_tls.as_ref().is_some_and(|t| t.client_ca.is_none()));
        // Off loopback: refused without mTLS, unless the risk is accepted.
        let open = ("CASF_GRPC_ADDR", "0.0.0.0:9191");
        let err = settings(&[open]).unwrap_err();
        assert_eq!(err.var, "CASF_GRPC_ADDR");
        assert!(err.reason.contains("CASF_GRPC_INSECURE_PEERS"), "{err}");
        assert_eq!(var(&[open, tls[0], tls[1]]), "CASF_GRPC_ADDR");
        let s = settings(&[open, ("CASF_GRPC_INSECURE_PEERS", "true")]).unwrap();
        assert!(s.grpc_peers_unauthenticated());
        let s = settings(&[open, tls[0], tls[1], ("CASF_TLS_CLIENT_CA", "/ca.pem")]).unwrap();
        assert!(!s.grpc_peers_unauthenticated());
        let s = settings(&[("CASF_GRPC_INSECURE_PEERS", "true")]).unwrap();
        assert!(
            !s.grpc_peers_unauthenticated(),
            "loopback needs no risk accepted"
        );
    }

    #[test]
    fn tls_files_need_a_tls_url_and_come_in_pairs() {
        let s = settings(&[
            ("REDIS_URL", "rediss://:pw@redis:6380/0"),
            ("CASF_REDIS_CA", "/etc/casf/redis-ca.pem"),
            ("OPA_URL", "https://opa:8181"),
            ("CASF_OPA_CERT", "/etc/casf/opa.pem"),
            ("CASF_OPA_KEY", "/etc/casf/opa.key"),
        ])
        .unwrap();
        let StateBackend::Redis { tls, .. } = &s.state else {
            panic!("{s:?}")
        };
        assert_eq!(tls.ca.as_deref(), Some("/etc/casf/redis-ca.pem".as_ref()));
        let PolicyBackend::Opa { tls, .. } = &s.policy else {
            panic!("{s:?}")
        };
        assert!(tls.ca.is_none() && tls.cert.is_some() && tls.key.is_some());
        // A CA for a plaintext URL would be silently unused: refused.
        let err = settings(&[
            ("REDIS_URL", "redis://redis:6379/0"),
            ("CASF_REDIS_CA", "/ca.pem"),
        ])
        .unwrap_err();
        assert_eq!(err.var, "CASF_REDIS_CA");
        assert!(err.to_string().contains("rediss://"), "{err}");
        let err = settings(&[("OPA_URL", "http://opa:8181"), ("CASF_OPA_KEY", "/k")]).unwrap_err();
        assert_eq!(err.var, "CASF_OPA_KEY");
        let err =
            settings(&[("OPA_URL", "https://opa:8181"), ("CASF_OPA_CERT", "/c.pem")]).unwrap_err();
        assert_eq!(err.var, "CASF_OPA_KEY");
    }

    #[test]
    fn log_settings_default_off_and_refuse_unknown_formats() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.log_format, LogFormat::Text);
        assert!(!s.decision_log);
        let s = settings(&[("CASF_LOG_FORMAT", "json"), ("CASF_DECISION_LOG", "true")]).unwrap();
        assert_eq!(s.log_format, LogFormat::Json);
        assert!(s.decision_log);
        let err = settings(&[("CASF_LOG_FORMAT", "logfmt")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid CASF_LOG_FORMAT: expected text or json, got \"logfmt\""
        );
        assert_eq!(
            settings(&[("CASF_DECISION_LOG", "sometimes")])
                .unwrap_err()
                .var,
            "CASF_DECISION_LOG"
        );
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let s = settings(&[
            ("PG_DSN", "postgres://casf:S3cret@pg/casf"),
            ("REDIS_URL", "redis://:r3dis@redis:6379/0"),
            ("OPA_URL", "http://u:0pa@opa:8181/"),
        ])
        .unwrap();
        let debug = format!("{s:?}");
        for secret in ["S3cret", "r3dis", "0pa"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        // The libpq form, TLS URLs, percent-encoding, and the alternate Debug.
        let s = settings(&[
            (
                "PG_DSN",
                "host=pg user=casf password='Pg S3cret' sslmode=verify-full sslrootcert=/ca.pem",
            ),
            ("REDIS_URL", "rediss://casf:R3dis%21pw@redis:6380/0"),
            ("CASF_REDIS_CA", "/etc/casf/ca.pem"),
            ("OPA_URL", "https://u:0pa-Pw@opa:8181/"),
        ])
        .unwrap();
        for debug in [format!("{s:?}"), format!("{s:#?}")] {
            for secret in ["Pg S3cret", "R3dis", "0pa-Pw"] {
                assert!(!debug.contains(secret), "{debug}");
            }
            assert!(debug.contains("rediss://casf:***@redis:6380/0"), "{debug}");
            assert!(debug.contains("VerifyFull"), "{debug}");
        }
        assert_eq!(
            s.secrets(),
            vec!["Pg S3cret", "R3dis%21pw", "R3dis!pw", "0pa-Pw"]
        );
        let args = ConfigArgs::from_pairs(&[("PG_DSN", "postgres://casf:S3cret@pg/casf")]);
        assert!(!format!("{args:?}").contains("S3cret"));
        assert!(
            Settings::from_args(&args)
                .unwrap()
                .secrets()
                .contains(&"S3cret".to_owned())
        );
    }

    #[test]
    fn every_variable_is_a_flag_read_from_the_environment() {
        use clap::{Args, FromArgMatches};
        let command = ConfigArgs::augment_args(clap::Command::new("t"));
        let matches = command
            .try_get_matches_from(["t", "--http-addr", "127.0.0.1:1", "--log-format", "json"])
            .unwrap();
        let args = ConfigArgs::from_arg_matches(&matches).unwrap();
        let s = Settings::from_args(&args).unwrap();
        assert_eq!(s.http_addr, SocketAddr::from(([127, 0, 0, 1], 1)));
        assert_eq!(s.log_format, LogFormat::Json);
        let names: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(names.len(), unique.len());
        assert!(VARIABLES.iter().filter(|v| v.secret).map(|v| v.name).eq([
            "PG_DSN",
            "REDIS_URL",
            "OPA_URL"
        ]));
    }
}
