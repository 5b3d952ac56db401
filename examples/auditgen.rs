//! Fills an audit store with a valid chain of `--events` synthetic decisions,
//! quickly, for timing `casf-verifier audit verify` on millions of events.
//! It appends whole batches straight through the store (no writer queue, no
//! callers waiting), so the rows are chained exactly as the server chains
//! them. Uses the server's configuration (`PG_DSN`, else `CASF_AUDIT_SQLITE`).
//!
//! ```text
//! CASF_AUDIT_SQLITE=/tmp/1m.db cargo run --release --example auditgen -- --events 1000000
//! time CASF_AUDIT_SQLITE=/tmp/1m.db target/release/casf-verifier audit verify
//! ```

use std::time::Instant;

use casf_verifier::audit::NewEvent;
use casf_verifier::config::Settings;
use casf_verifier::startup::migrate_audit_log;
use casf_verifier::startup::open_audit_log;
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Events to append in all.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events per transaction.
    #[arg(long, default_value_t = 5_000)]
    batch: u64,
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let settings = Settings::from_env().map_err(|e| e.to_string())?;
    migrate_audit_log(&settings.audit)
        .await
        .map_err(|e| e.to_string())?;
    let log = open_audit_log(&settings.audit)
        .await
        .map_err(|e| e.to_string())?;
    let run = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    let mut n = 0;
    while n < args.events {
        let batch: Vec<NewEvent> = (n..args.events.min(n + args.batch.max(1)))
            .map(|i| event(&run, i))
            .collect();
        n += batch.len() as u64;
        log.append_batch(&batch).await.map_err(|e| e.to_string())?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = json!({
        "backend": log.backend(),
        "events": args.events,
        "seconds": (seconds * 1000.0).round() / 1000.0,
    });
    println!("{report}");
    Ok(())
}

/// The same decision shape as `auditbench`, varied per event.
fn event(run: &str, n: u64) -> NewEvent {
    let request_id = format!("{run}-{n}");
    let (role, decision) = if n.is_multiple_of(5) {
        ("nurse", "DENY")
    } else {
        ("receptionist", "ALLOW")
    };
    let payload = json!({
        "request": {"request_id": request_id, "tool": "cliniccloud.create_appointment", "mode": "ALLOW",
                    "role": role, "subject": {"patient_id": format!("p-{n}")},
                    "args": {"slot": "2026-12-01T09:00", "duration_min": 30, "note": "Zoë — 東京", "fee": 12.5},
                    "context": {"tenant_id": "clinic-a"}},
        "response": {"decision": decision, "violations": [], "allowed_outputs": [], "reason": "OK"}
    });
    NewEvent::now(
        &request_id,
        format!("role:{role}"),
        "cliniccloud.create_appointment",
        decision,
        payload,
    )
}
