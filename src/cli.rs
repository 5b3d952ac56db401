//! Command line: `serve` (the default), `migrate`, `audit verify`,
//! `audit digest`, `healthcheck` (the container's probe) and `dev-token`
//! (a quickstart JWT).
//!
//! Exit codes follow the guide §8 for the audit commands: 0 valid, 1 broken
//! chain, 2 connectivity or configuration error. `serve` exits 2 on bad
//! configuration and 1 if it fails after starting; `migrate` exits 0 once the
//! schema is in place and 2 if it cannot be.

use std::io::IsTerminal;
use std::process::ExitCode;

use chrono::NaiveDate;
use clap::{Parser, Subcommand};

use crate::audit::EventFilter;
use crate::audit::digest::{digest, yesterday};
use crate::audit::scan::walk;
use crate::config::{AuditBackend, Redactor, Settings};
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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve /verify and the operator endpoints (the default).
    Serve,
    /// Create the audit schema if missing (PostgreSQL: sql/init.sql); idempotent.
    Migrate,
    /// Check or summarise the audit hash chain.
    Audit {
        #[command(subcommand)]
        action: AuditCommand,
    },
    /// Probe GET /health on CASF_HTTP_ADDR; exit 0 when healthy, 1 otherwise.
    /// For container HEALTHCHECKs and exec probes: the image has no curl.
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
    Verify,
    /// Print the daily digest JSON for a UTC day (default: yesterday).
    Digest {
        /// The day, YYYY-MM-DD.
        date: Option<NaiveDate>,
    },
}

const EXIT_BROKEN: u8 = 1;
const EXIT_UNREACHABLE: u8 = 2;

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => with_settings(serve),
        Command::Migrate => with_settings(migrate),
        Command::Audit { action } => audit_command(action),
        // These two need no backend settings, and a probe must not exit 2.
        Command::Healthcheck { grpc } => healthcheck(grpc),
        Command::DevToken {
            role,
            tenant,
            subject,
            ttl_seconds,
        } => dev_token(role, &tenant, &subject, ttl_seconds),
    }
}

/// Runs a command that needs the settings, on a multi-threaded runtime.
fn with_settings<F, Fut>(command: F) -> ExitCode
where
    F: FnOnce(Settings) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            tracing::error!("refusing to start: {error}");
            eprintln!("casf-verifier: {error}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    runtime.block_on(command(settings))
}

fn healthcheck(grpc: bool) -> ExitCode {
    let outcome = match Settings::from_env() {
        Err(error) => Err(error.to_string()),
        Ok(settings) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) if grpc => {
                runtime.block_on(crate::healthcheck::probe_grpc(settings.grpc_addr))
            }
            Ok(runtime) => runtime.block_on(crate::healthcheck::probe(settings.http_addr)),
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
            tracing::error!("refusing to start: {error}");
            eprintln!("casf-verifier: {error}");
            return ExitCode::from(EXIT_UNREACHABLE);
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

/// `audit verify` and `audit digest`: read-only, and every refusal printed
/// once, on stderr, prefixed with the command (exit 2).
fn audit_command(action: AuditCommand) -> ExitCode {
    let command = match action {
        AuditCommand::Verify => "audit verify",
        AuditCommand::Digest { .. } => "audit digest",
    };
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("casf-verifier: {command}: {error}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
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
    let redactor = Redactor::new(settings.secrets());
    let refuse = |error: String| {
        eprintln!("casf-verifier: {command}: {}", redactor.redact(&error));
        ExitCode::from(EXIT_UNREACHABLE)
    };
    let source = match open_chain_reader(&settings.audit).await {
        Ok(source) => source,
        Err(error) => return refuse(error.to_string()),
    };
    // Progress only for a person watching; pipes and logs stay clean.
    let progress = std::io::stderr().is_terminal();
    match action {
        AuditCommand::Verify => {
            match walk(source.as_ref(), &EventFilter::default(), progress).await {
                Err(error) => refuse(error.to_string()),
                Ok(chain) => match &chain.first_break {
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
                },
            }
        }
        AuditCommand::Digest { date } => {
            match digest(source.as_ref(), date.unwrap_or_else(yesterday), progress).await {
                Err(error) => refuse(error.to_string()),
                Ok(digest) => {
                    match serde_json::to_string_pretty(&digest) {
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
    }
}
