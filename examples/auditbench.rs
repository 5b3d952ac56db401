//! The audit writer alone: how many events per second the group-committing
//! writer makes durable, with `--concurrency` callers each waiting for their
//! own commit, as requests do. Uses the server's configuration (`PG_DSN`,
//! else `CASF_AUDIT_SQLITE`); run two at once against one database to check
//! the chain under concurrent writers (`casf-verifier audit verify` after).
//!
//! ```text
//! PG_DSN=postgres://… cargo run --release --example auditbench -- --events 50000
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use casf_verifier::audit::NewEvent;
use casf_verifier::audit::writer::AuditWriter;
use casf_verifier::config::Settings;
use casf_verifier::startup::open_audit_log;
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Events to append in all.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Callers appending at once.
    #[arg(long, default_value_t = 256)]
    concurrency: u64,
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let settings = Settings::from_env().map_err(|e| e.to_string())?;
    let log = open_audit_log(&settings.audit)
        .await
        .map_err(|e| e.to_string())?;
    let backend = log.backend();
    let (writer, task) = AuditWriter::spawn(log).map_err(|e| e.to_string())?;
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let run = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    let callers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (writer, next, failed, run) = (writer.clone(), next.clone(), failed.clone(), run.clone());
            let total = args.events;
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    let request_id = format!("{run}-{n}");
                    let payload = json!({
                        "request": {"request_id": request_id, "tool": "cliniccloud.create_appointment", "mode": "ALLOW",
                                    "role": "receptionist", "subject": {"patient_id": format!("p-{n}")},
                                    "args": {"slot": "2026-12-01T09:00", "duration_min": 30}, "context": {"tenant_id": "clinic-a"}},
                        "response": {"decision": "ALLOW", "violations": [], "allowed_outputs": [], "reason": "OK"}
                    });
                    let event = NewEvent::now(&request_id, "role:receptionist".into(), "cliniccloud.create_appointment", "ALLOW", payload);
                    if writer.append(event).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.map_err(|e| e.to_string())?;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(writer);
    task.await.map_err(|e| e.to_string())?;
    let report = json!({
        "backend": backend,
        "events": args.events,
        "failed": failed.load(Ordering::Relaxed),
        "concurrency": args.concurrency,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "events_per_s": (args.events as f64 / seconds).round(),
    });
    println!("{report}");
    Ok(())
}
