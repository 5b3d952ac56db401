//! Command line: `serve` (the default), `check` (configuration, policy and
//! route map, for users' CI), `migrate`, `audit verify`, `audit digest`,
//! `audit checkpoint`, `audit keygen`,
//! `healthcheck` (the container's probe) and `dev-token` (a quickstart JWT).
//!
//! Every configuration variable is also a global flag ([`ConfigArgs`]), so
//! `--help` lists them all with their defaults.
//!
//! Exit codes follow the guide §8 for the audit commands: 0 valid, 1 broken
//! chain, 2 connectivity or configuration error. `serve` exits 2 on bad
//! configuration and 1 if it fails after starting; `check` exits 0 or 2;
//! `migrate` exits 0 once the schema is in place and 2 if it cannot be.
//! A refusal is printed once, on stderr.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::NaiveDate;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::audit::EventFilter;
use crate::audit::checkpoint;
use crate::audit::digest::{digest, yesterday};
use crate::audit::scan::walk_watching;
use crate::audit::signing::{AuditPublicKey, AuditSigningKey};
use crate::config::{AuditBackend, ConfigArgs, PolicyBackend, Redactor, Settings};
use crate::domain::Role;
use crate::startup::{Application, migrate_audit_log, open_chain_reader, shutdown_signal};

#[derive(Debug, Parser)]
#[command(
    name = "casf-verifier",
    version,
    about = "Policy enforcement point for AI agents' tool calls"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve /verify and the operator endpoints (the default).
    Serve,
    /// Check the configuration, compile the policy and load the route map,
    /// then exit 0, or 2 with the reason. Contacts no backend.
    Check,
    /// Create the audit schema if missing (PostgreSQL: sql/init.sql); idempotent.
    Migrate,
    /// Check or summarise the audit hash chain.
    Audit {
        #[command(subcommand)]
        action: AuditCommand,
    },
    /// Probe GET /health on CASF_HTTP_ADDR; exit 0 when healthy, 1 otherwise.
    /// For container HEALTHCHECKs and exec probes: the image has no curl.
    /// With CASF_TLS_CERT set, over TLS, trusting exactly that certificate
    /// (and presenting it when CASF_TLS_CLIENT_CA requires client certificates).
    Healthcheck {
        /// Ask gRPC health on CASF_GRPC_ADDR instead (SERVING when ready).
        #[arg(long)]
        grpc: bool,
    },
    /// Print a JWT signed with the public dev key (envoy/dev/jwks.json) that
    /// only the dev Envoy configs trust. For the quickstart; never in production.
    DevToken {
        /// The `casf_role` claim.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The `casf_tenant_id` claim.
        #[arg(long)]
        tenant: String,
        /// The `sub` claim.
        #[arg(long, default_value = "dev-user")]
        subject: String,
        /// Lifetime of the token.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
}

fn parse_role(raw: &str) -> Result<Role, String> {
    Role::parse(raw).map_err(|error| error.to_string())
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute every hash of the whole chain; print the first broken event.
    /// With --checkpoints, also check each signed checkpoint: exit 1 if the
    /// chain no longer holds one (a cut tail, a rewritten or replaced chain).
    Verify {
        /// A checkpoint file (one signed checkpoint a line).
        #[arg(long, requires = "public_key")]
        checkpoints: Option<PathBuf>,
        /// The PEM public key (BEGIN PUBLIC KEY) that signed the checkpoints.
        #[arg(long, requires = "checkpoints")]
        public_key: Option<PathBuf>,
    },
    /// Print the daily digest JSON for a UTC day (default: yesterday).
    Digest {
        /// The day, YYYY-MM-DD.
        date: Option<NaiveDate>,
        /// Sign the digest with CASF_AUDIT_SIGNING_KEY (adds key_id and signature).
        #[arg(long)]
        sign: bool,
    },
    /// Sign a checkpoint of the chain head (last id, last hash, count, time)
    /// with CASF_AUDIT_SIGNING_KEY; append it to --out, or print it.
    Checkpoint {
        /// The checkpoint file to append one line to.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a new Ed25519 key pair: the private key (PKCS#8 PEM, mode 0600,
    /// never overwritten) and its public key (PEM). Prints the key id only.
    Keygen {
        /// Where to write the private key (CASF_AUDIT_SIGNING_KEY).
        #[arg(long)]
        private_key: PathBuf,
        /// Where to write the public key (for `audit verify --public-key`).
        #[arg(long)]
        public_key: PathBuf,
    },
}

const EXIT_BROKEN: u8 = 1;
const EXIT_UNREACHABLE: u8 = 2;

pub fn run() -> ExitCode {
    // Before any backend client exists: sqlx builds its TLS from the default.
    crate::tls::install_crypto_provider();
    let cli = parse();
    let config = cli.config;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => with_settings(&config, serve),
        Command::Check => check(&config),
        Command::Migrate => with_settings(&config, migrate),
        // Needs no configuration and touches no store.
        Command::Audit {
            action:
                AuditCommand::Keygen {
                    private_key,
                    public_key,
                },
        } => keygen(&private_key, &public_key),
        Command::Audit { action } => audit_command(&config, action),
        // These two need no backends, and a probe must not exit 2.
        Command::Healthcheck { grpc } => healthcheck(&config, grpc),
        Command::DevToken {
            role,
            tenant,
            subject,
            ttl_seconds,
        } => dev_token(role, &tenant, &subject, ttl_seconds),
    }
}

/// Parses the command line, with the help epilogue on every command that
/// reads the configuration.
fn parse() -> Cli {
    let epilogue = crate::config::help_epilogue();
    let mut command = Cli::command().after_help(epilogue.clone());
    for name in ["serve", "check", "migrate", "audit", "healthcheck"] {
        command = command.mut_subcommand(name, |sub| sub.after_help(epilogue.clone()));
    }
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

/// Prints a refusal once: as a log event when logging is on (so it reaches a
/// JSON log pipeline as JSON), else as a plain line on stderr.
fn refuse(what: &str, error: &str) -> ExitCode {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{what}: {error}");
    } else {
        eprintln!("casf-verifier: {what}: {error}");
    }
    ExitCode::from(EXIT_UNREACHABLE)
}

/// Runs a command that needs the settings, with logging set up from them,
/// on a multi-threaded runtime.
fn with_settings<F, Fut>(config: &ConfigArgs, command: F) -> ExitCode
where
    F: FnOnce(Settings) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    // Before logging is set up (its format is a setting): a plain line.
    let settings = match Settings::from_args(config) {
        Ok(settings) => settings,
        Err(error) => return refuse("refusing to start", &error.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            crate::telemetry::init(settings.log_format, settings.decision_log, false).shutdown();
            eprintln!("casf-verifier: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the OTLP exporter's channel runs on it.
    let tracing = {
        let _entered = runtime.enter();
        crate::telemetry::init(settings.log_format, settings.decision_log, true)
    };
    let code = runtime.block_on(command(settings));
    // The runtime still runs: the last batched spans are exported.
    tracing.shutdown();
    code
}

/// A line on stdout; a closed pipe (`check | head`) is not worth a panic.
fn say(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// `casf-verifier check`: what `serve` would refuse on, short of the
/// backends and the listeners, each line on stdout naming what was checked.
fn check(config: &ConfigArgs) -> ExitCode {
    let failed = |error: String| {
        eprintln!("casf-verifier: check failed: {error}");
        ExitCode::from(EXIT_UNREACHABLE)
    };
    let settings = match Settings::from_args(config) {
        Ok(settings) => settings,
        Err(error) => return failed(error.to_string()),
    };
    let redactor = Redactor::new(settings.secrets());
    say(format!(
        "configuration: ok: {}",
        settings.describe_backends()
    ));
    match &settings.policy {
        PolicyBackend::Embedded { dir } => {
            match crate::policy::embedded::EmbeddedPolicy::load(dir) {
                Err(error) => return failed(format!("policy: {error}")),
                Ok(policy) => {
                    let results = policy.run_tests();
                    let failures: Vec<String> = results
                        .iter()
                        .filter(|test| !test.passed)
                        .map(|test| match &test.error {
                            Some(error) => format!("{} ({error})", test.name),
                            None => test.name.clone(),
                        })
                        .collect();
                    if !failures.is_empty() {
                        return failed(format!(
                            "policy: Rego tests failed in {}: {}",
                            crate::config::shown_path(dir),
                            failures.join(", ")
                        ));
                    }
                    say(format!(
                        "policy: ok: {} compiled by the embedded engine ({} evaluator), {} Rego tests passed",
                        crate::config::shown_path(dir),
                        policy.evaluator(),
                        results.len()
                    ));
                }
            }
        }
        PolicyBackend::Opa { url, tls } => {
            if let Err(error) = crate::policy::opa::OpaPolicy::new(url.expose(), tls) {
                return failed(redactor.redact(&format!("policy: {error}")));
            }
            say(format!(
                "policy: ok: OPA at {} (configuration only; OPA compiles its own policy)",
                url.redacted()
            ));
        }
    }
    match crate::startup::load_routes(&settings.routes) {
        Ok((_, summary)) => say(format!("routes: ok: {summary}")),
        Err(error) => return failed(error.to_string()),
    }
    if settings.audit_signing_key.is_some() {
        match load_signing_key(&settings) {
            Ok(key) => say(format!("audit signing key: ok: key id {}", key.key_id())),
            Err(error) => return failed(error),
        }
    }
    match &settings.callers {
        None => say("callers: NOT authenticated (CASF_CALLERS unset)".to_owned()),
        Some(path) => match crate::callers::CallerSet::load(path) {
            Ok(set) => say(format!(
                "callers: ok: {} ({} callers, {} operators)",
                crate::config::shown_path(path),
                set.len(),
                set.operators()
            )),
            Err(error) => return failed(format!("CASF_CALLERS: {error}")),
        },
    }
    ExitCode::SUCCESS
}

fn healthcheck(config: &ConfigArgs, grpc: bool) -> ExitCode {
    let outcome = match Settings::from_args(config) {
        Err(error) => Err(error.to_string()),
        Ok(settings) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) if grpc => runtime.block_on(crate::healthcheck::probe_grpc(
                settings.grpc_addr,
                settings.door_tls.as_ref(),
            )),
            Ok(runtime) => runtime.block_on(crate::healthcheck::probe(
                settings.http_addr,
                settings.door_tls.as_ref(),
            )),
            Err(error) => Err(format!("cannot start the async runtime: {error}")),
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("casf-verifier: unhealthy: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn dev_token(role: Role, tenant: &str, subject: &str, ttl_seconds: u64) -> ExitCode {
    let claims = crate::dev_token::DevClaims {
        subject,
        role,
        tenant,
        ttl_seconds,
        now: chrono::Utc::now().timestamp(),
    };
    match crate::dev_token::mint(&claims) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("casf-verifier: {error}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}

async fn serve(settings: Settings) -> ExitCode {
    let stop = shutdown_signal();
    let app = match Application::build(&settings).await {
        Ok(app) => app,
        Err(error) => {
            let error = Redactor::new(settings.secrets()).redact(&error.to_string());
            return refuse("refusing to start", &error);
        }
    };
    match (app.http_addr(), app.grpc_addr()) {
        (Ok(http), Ok(grpc)) => tracing::info!(
            http = %http,
            grpc = %grpc,
            "casf-verifier ready: {} routes={}",
            settings.describe_backends(),
            app.routes_summary()
        ),
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(%error, "listening address unknown")
        }
    }
    match app.run_until_stopped(stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(settings: Settings) -> ExitCode {
    match migrate_audit_log(&settings.audit).await {
        Ok(()) => {
            let store = match settings.audit {
                AuditBackend::Sqlite { .. } => "SQLite",
                AuditBackend::Postgres { .. } => "PostgreSQL",
            };
            println!("audit schema in place ({store})");
            ExitCode::SUCCESS
        }
        Err(error) => {
            let error = Redactor::new(settings.secrets()).redact(&error.to_string());
            eprintln!("casf-verifier: migrate failed: {error}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}

/// Says on stderr (stdout stays the report) when `CASF_AUDIT_SPOOL` still
/// holds events: they are decisions the chain does not show yet.
fn note_spooled(settings: &Settings) {
    let Some(dir) = &settings.audit_spool else {
        return;
    };
    match crate::audit::spool::waiting(dir) {
        Ok(0) => {}
        Ok(n) => eprintln!(
            "casf-verifier: note: {n} audit events are still spooled in {} and not yet in the chain",
            dir.display()
        ),
        Err(error) => eprintln!(
            "casf-verifier: note: cannot read the audit spool {}: {error}",
            dir.display()
        ),
    }
}

/// `audit verify` and `audit digest`: read-only, and every refusal printed
/// once, on stderr, prefixed with the command (exit 2).
fn audit_command(config: &ConfigArgs, action: AuditCommand) -> ExitCode {
    let command = match action {
        AuditCommand::Verify { .. } => "audit verify",
        AuditCommand::Digest { .. } => "audit digest",
        AuditCommand::Checkpoint { .. } => "audit checkpoint",
        AuditCommand::Keygen { .. } => "audit keygen",
    };
    let settings = match Settings::from_args(config) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("casf-verifier: {command}: {error}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    crate::telemetry::init(settings.log_format, settings.decision_log, false).shutdown();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(audit(settings, action, command)),
        Err(error) => {
            eprintln!("casf-verifier: {command}: cannot start the async runtime: {error}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}

async fn audit(settings: Settings, action: AuditCommand, command: &str) -> ExitCode {
    note_spooled(&settings);
    let redactor = Redactor::new(settings.secrets());
    let refuse = |error: String| {
        eprintln!("casf-verifier: {command}: {}", redactor.redact(&error));
        ExitCode::from(EXIT_UNREACHABLE)
    };
    // Keys and checkpoint files first: a refusal should not wait for a walk.
    let signing_key = match &action {
        AuditCommand::Checkpoint { .. } | AuditCommand::Digest { sign: true, .. } => {
            match load_signing_key(&settings) {
                Ok(key) => Some(key),
                Err(error) => return refuse(error),
            }
        }
        _ => None,
    };
    let checkpoints = match &action {
        AuditCommand::Verify {
            checkpoints: Some(file),
            public_key: Some(key),
        } => match (
            checkpoint::read_file(file),
            AuditPublicKey::load(key).map_err(|e| e.to_string()),
        ) {
            (Ok(checkpoints), Ok(key)) => Some((checkpoints, key)),
            (Err(error), _) | (_, Err(error)) => return refuse(error),
        },
        _ => None,
    };
    let source = match open_chain_reader(&settings.audit).await {
        Ok(source) => source,
        Err(error) => return refuse(error.to_string()),
    };
    // Progress only for a person watching; pipes and logs stay clean.
    let progress = std::io::stderr().is_terminal();
    match action {
        AuditCommand::Verify { .. } => {
            let watch = checkpoints
                .as_ref()
                .map(|(checkpoints, _)| checkpoint::watched_ids(checkpoints))
                .unwrap_or_default();
            match walk_watching(source.as_ref(), &EventFilter::default(), progress, watch).await {
                Err(error) => refuse(error.to_string()),
                Ok(chain) => {
                    let mut code = match &chain.first_break {
                        None => {
                            println!(
                                "chain valid: {} events, last hash {}",
                                chain.count,
                                chain.last_hash.as_deref().unwrap_or("-")
                            );
                            ExitCode::SUCCESS
                        }
                        Some(broken) => {
                            println!(
                                "chain broken at event id {} (event_id {}): {}",
                                broken.id, broken.event_id, broken.reason
                            );
                            ExitCode::from(EXIT_BROKEN)
                        }
                    };
                    if let Some((checkpoints, key)) = &checkpoints {
                        let failures = checkpoint::check(checkpoints, key, &chain);
                        for failure in &failures {
                            println!("{failure}");
                        }
                        if failures.is_empty() {
                            println!(
                                "checkpoints hold: {} checked, signed by key {}",
                                checkpoints.len(),
                                key.key_id()
                            );
                        } else {
                            code = ExitCode::from(EXIT_BROKEN);
                        }
                    }
                    code
                }
            }
        }
        AuditCommand::Digest { date, .. } => {
            match digest(source.as_ref(), date.unwrap_or_else(yesterday), progress).await {
                Err(error) => refuse(error.to_string()),
                Ok(digest) => {
                    let mut document = match serde_json::to_value(&digest) {
                        Ok(document) => document,
                        Err(error) => return refuse(format!("cannot render the digest: {error}")),
                    };
                    if let Some(key) = &signing_key {
                        key.sign_document(&mut document);
                    }
                    match serde_json::to_string_pretty(&document) {
                        Ok(text) => println!("{text}"),
                        Err(error) => return refuse(format!("cannot render the digest: {error}")),
                    }
                    if let Some(broken) = &digest.first_broken_event {
                        eprintln!(
                            "chain broken at event id {} (event_id {}): {}",
                            broken.id, broken.event_id, broken.reason
                        );
                        return ExitCode::from(EXIT_BROKEN);
                    }
                    ExitCode::SUCCESS
                }
            }
        }
        AuditCommand::Checkpoint { out } => {
            let Some(key) = &signing_key else {
                return refuse("no signing key".into());
            };
            let backend = audit_backend_name(&settings);
            let document = match checkpoint::make(source.as_ref(), backend, key).await {
                Ok(document) => document,
                Err(error) => return refuse(error.to_string()),
            };
            match out {
                None => say(checkpoint::line(&document)),
                Some(path) => {
                    if let Err(error) = checkpoint::append(&path, &document) {
                        return refuse(format!("cannot append to {}: {error}", path.display()));
                    }
                    say(format!(
                        "checkpoint appended to {}: id {}, {} events, key {}",
                        path.display(),
                        document["last_id"],
                        document["count"],
                        key.key_id()
                    ));
                }
            }
            ExitCode::SUCCESS
        }
        // Dispatched before the settings are read.
        AuditCommand::Keygen { .. } => refuse("keygen needs no store".into()),
    }
}

/// `sqlite` or `postgres`, as a checkpoint records it.
fn audit_backend_name(settings: &Settings) -> &'static str {
    match settings.audit {
        AuditBackend::Sqlite { .. } => "sqlite",
        AuditBackend::Postgres { .. } => "postgres",
    }
}

/// `CASF_AUDIT_SIGNING_KEY`, which the signing commands need.
fn load_signing_key(settings: &Settings) -> Result<AuditSigningKey, String> {
    let Some(path) = &settings.audit_signing_key else {
        return Err(
            "CASF_AUDIT_SIGNING_KEY is not set: point it at the private key \
             (`casf-verifier audit keygen` writes one)"
                .into(),
        );
    };
    AuditSigningKey::load(path).map_err(|e| format!("CASF_AUDIT_SIGNING_KEY: {e}"))
}

/// `audit keygen`: a new key pair; exit 0, or 2 if either file cannot be
/// written (an existing file is never overwritten).
fn keygen(private: &std::path::Path, public: &std::path::Path) -> ExitCode {
    let written = AuditSigningKey::generate().and_then(|key| {
        key.write_pair(private, public)?;
        Ok(key)
    });
    match written {
        Ok(key) => {
            say(format!(
                "wrote the private key {} (mode 0600: keep it away from the audit database) \
                 and the public key {}; key id {}",
                private.display(),
                public.display(),
                key.key_id()
            ));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("casf-verifier: audit keygen: {error}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}
