//! Command line: `serve` (the default), `migrate`, `audit verify`,
//! `audit digest`.
//!
//! Exit codes follow the guide §8 for the audit commands: 0 valid, 1 broken
//! chain, 2 connectivity or configuration error. `serve` exits 2 on bad
//! configuration and 1 if it fails after starting; `migrate` exits 0 once the
//! schema is in place and 2 if it cannot be.

use std::process::ExitCode;

use chrono::NaiveDate;
use clap::{Parser, Subcommand};

use crate::audit::EventFilter;
use crate::audit::digest::{digest, walk, yesterday};
use crate::config::{AuditBackend, Redactor, Settings};
use crate::startup::{Application, migrate_audit_log, open_audit_log, shutdown_signal};

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
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime.block_on(serve(settings)),
        Command::Migrate => runtime.block_on(migrate(settings)),
        Command::Audit { action } => runtime.block_on(audit(settings, action)),
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

async fn audit(settings: Settings, action: AuditCommand) -> ExitCode {
    let redactor = Redactor::new(settings.secrets());
    let unreachable = |error: String| {
        eprintln!(
            "casf-verifier: audit store unreachable: {}",
            redactor.redact(&error)
        );
        ExitCode::from(EXIT_UNREACHABLE)
    };
    let log = match open_audit_log(&settings.audit).await {
        Ok(log) => log,
        Err(error) => return unreachable(error.to_string()),
    };
    match action {
        AuditCommand::Verify => match walk(log.as_ref(), &EventFilter::default()).await {
            Err(error) => unreachable(error.to_string()),
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
        },
        AuditCommand::Digest { date } => {
            match digest(log.as_ref(), date.unwrap_or_else(yesterday)).await {
                Err(error) => unreachable(error.to_string()),
                Ok(digest) => {
                    match serde_json::to_string_pretty(&digest) {
                        Ok(text) => println!("{text}"),
                        Err(error) => return unreachable(error.to_string()),
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
