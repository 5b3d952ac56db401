//! Embedded state survives a verifier restart (issue 11, item 6): startup
//! refills the replay memory from the audit trail, so a replay after the
//! restart gets the stored decision and is not decided again.

use std::collections::HashMap;

use crate::helpers::{WRITE_TOOLS, request, spawn_app_with};

#[tokio::test]
async fn decisions_replay_after_a_restart_on_the_same_audit_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("audit.db");
    let vars = [("CASF_AUDIT_SQLITE", db.to_str().expect("UTF-8 path"))];

    let mut first = spawn_app_with(&vars).await;
    let mut decided = Vec::new();
    for tool in WRITE_TOOLS {
        let body = request(tool, "ALLOW");
        let answer = first.decide(&body).await;
        decided.push((body, answer));
    }
    first.shutdown().await;

    let mut second = spawn_app_with(&vars).await;
    second.audit_db = db.clone();
    let hits = second.metric("casf_replay_hit_total").await;
    for (body, answer) in &decided {
        assert_eq!(&second.decide(body).await, answer, "{body}");
    }
    assert_eq!(
        second.metric("casf_replay_hit_total").await,
        hits + decided.len() as f64,
        "every replay answered from the reloaded memory"
    );
    // Exactly one decision per request_id; the rest are replays.
    let mut decisions: HashMap<String, usize> = HashMap::new();
    for row in second.audit_rows().await {
        if row.action != "REPLAY_DETECTED" {
            *decisions.entry(row.request_id).or_default() += 1;
        }
    }
    assert_eq!(decisions.len(), decided.len());
    assert!(decisions.values().all(|&n| n == 1), "{decisions:?}");
    second.shutdown().await;
}

/// The startup cost of the reload, for BENCHMARKS.md: `cargo test --release
/// --test api reload_cost -- --ignored --nocapture` (`RELOAD_ROWS`, default
/// 100,000 audited decisions).
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn reload_cost() {
    use casf_verifier::audit::sqlite::SqliteAuditLog;
    use casf_verifier::audit::{AuditLog, NewEvent};
    use casf_verifier::state::memory::MemoryState;
    use std::time::{Duration, Instant};

    let rows: usize = std::env::var("RELOAD_ROWS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let log = SqliteAuditLog::open(&dir.path().join("audit.db"))
        .await
        .expect("audit file");
    let allow = serde_json::json!({"decision": "ALLOW", "violations": [], "allowed_outputs": [], "reason": "OK"});
    let batch: Vec<usize> = (0..rows).collect();
    for chunk in batch.chunks(1_000) {
        let events: Vec<NewEvent> = chunk
            .iter()
            .map(|i| {
                let mut body = request("cliniccloud.create_appointment", "ALLOW");
                body["request_id"] = format!("reload-{i}").into();
                NewEvent::now(
                    &format!("reload-{i}"),
                    "role:receptionist".into(),
                    "cliniccloud.create_appointment",
                    "ALLOW",
                    serde_json::json!({"request": body, "response": allow}),
                )
            })
            .collect();
        log.append_batch(&events).await.expect("append");
    }
    let state = MemoryState::new(
        Duration::from_secs(86_400),
        Duration::from_secs(30),
        2 * rows,
    );
    let started = Instant::now();
    let counts = casf_verifier::state::reload::reload(&log, &state, Duration::from_secs(86_400))
        .await
        .expect("reload");
    let elapsed = started.elapsed();
    assert_eq!(counts.stored, rows as u64);
    eprintln!(
        "reload: {rows} rows in {:.2} s, {:.1} s per million rows",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1_000_000.0 / rows as f64
    );
}
