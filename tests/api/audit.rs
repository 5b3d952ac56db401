//! The audit trail after real traffic: one row per decision, a chain that an
//! independent implementation can recompute, and tampering caught by the CLI.

use casf_verifier::audit::sqlite::SqliteAuditLog;
use casf_verifier::audit::{AppendReceipt, AuditLog, NewEvent};
use serde_json::{Value, json};

use crate::helpers::{TestApp, request, spawn_app, spawn_app_with};

pub(crate) async fn mixed_traffic(app: &TestApp) -> usize {
    let replayed = request("cliniccloud.create_appointment", "ALLOW");
    let mut unicode = request("stripe.generate_invoice", "ALLOW");
    unicode["args"] = json!({"amount": 12.5, "lines": [{"name": "Zoë — 東京", "qty": 2}], "nested": {"b": 1, "a": [true, null]}});
    let bodies = [
        replayed.clone(),
        replayed,
        unicode,
        request("twilio.send_sms", "ALLOW"),
        request("twilio.send_sms", "READ_ONLY"),
        request("cliniccloud.list_appointments", "READ_ONLY"),
        request("cliniccloud.summary_history", "KILL_SWITCH"),
    ];
    for body in &bodies {
        app.decide(body).await;
    }
    bodies.len()
}

pub(crate) use crate::chain_rule::recompute;

/// What every backend's rows must show after `mixed_traffic`: one row per
/// decision, linked from genesis, each hash recomputable from its columns,
/// the contract's column formats, and the replay recorded as such.
pub(crate) fn assert_chain_rows(rows: &[crate::helpers::AuditRow], decisions: usize) {
    assert_eq!(rows.len(), decisions);
    assert_eq!(rows[0].prev_hash, "");
    for pair in rows.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    for row in rows {
        assert_eq!(recompute(row), row.hash, "row {}", row.id);
        assert_eq!(row.actor, "role:nurse");
        assert!(uuid::Uuid::parse_str(&row.event_id).is_ok());
        assert_eq!(
            row.ts.len(),
            "2026-02-09T10:00:00.000000Z".len(),
            "{}",
            row.ts
        );
        assert!(row.ts.ends_with('Z'));
        let payload: Value = serde_json::from_str(&row.payload).unwrap();
        assert_eq!(payload["request"]["request_id"], row.request_id.as_str());
        assert_eq!(payload["response"]["decision"], row.decision.as_str());
    }
    assert_eq!(rows[1].action, "REPLAY_DETECTED");
}

#[tokio::test]
async fn every_decision_is_one_row_and_the_chain_recomputes_from_columns() {
    let app = spawn_app().await;
    let decisions = mixed_traffic(&app).await;
    let rows = app.audit_rows().await;
    assert_chain_rows(&rows, decisions);
}

#[tokio::test]
async fn audit_verify_and_digest_pass_after_mixed_traffic() {
    let app = spawn_app().await;
    let decisions = mixed_traffic(&app).await;
    let last_hash = app.audit_rows().await.last().unwrap().hash.clone();

    let verify = app.audit_cli(&["verify"]);
    assert_eq!(verify.status.code(), Some(0), "{verify:?}");
    assert!(String::from_utf8_lossy(&verify.stdout).contains(&format!("{decisions} events")));

    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let digest = app.audit_cli(&["digest", &today]);
    assert_eq!(digest.status.code(), Some(0), "{digest:?}");
    let digest: Value = serde_json::from_slice(&digest.stdout).unwrap();
    assert_eq!(digest["window"], today.as_str());
    assert_eq!(digest["event_count"], decisions);
    assert_eq!(digest["chain_valid"], true);
    assert_eq!(digest["last_hash"], last_hash.as_str());
    assert_eq!(digest["digest_hash"].as_str().unwrap().len(), 64);

    let empty = app.audit_cli(&["digest", "2001-01-01"]);
    assert_eq!(empty.status.code(), Some(0));
    let empty: Value = serde_json::from_slice(&empty.stdout).unwrap();
    assert_eq!(empty["event_count"], 0);
    assert_eq!(empty["first_hash"], Value::Null);
}

#[tokio::test]
async fn a_payload_changed_in_sqlite_fails_verify_naming_the_event() {
    let app = spawn_app().await;
    mixed_traffic(&app).await;
    let rows = app.audit_rows().await;
    let victim = &rows[2];

    let pool = app.audit_db().await;
    // The table refuses updates; an attacker with file access drops the guard.
    let refused = sqlx::query("UPDATE audit_events SET decision = 'ALLOW' WHERE id = ?")
        .bind(victim.id)
        .execute(&pool)
        .await;
    assert!(
        refused.is_err(),
        "append-only trigger should refuse updates"
    );
    sqlx::query("DROP TRIGGER audit_events_no_update")
        .execute(&pool)
        .await
        .unwrap();
    let forged = victim.payload.replace("12.5", "1.25");
    assert_ne!(forged, victim.payload);
    sqlx::query("UPDATE audit_events SET payload = ? WHERE id = ?")
        .bind(&forged)
        .bind(victim.id)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let verify = app.audit_cli(&["verify"]);
    assert_eq!(verify.status.code(), Some(1), "{verify:?}");
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(out.contains(&format!("event id {}", victim.id)), "{out}");
    assert!(out.contains(&victim.event_id), "{out}");

    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let digest = app.audit_cli(&["digest", &today]);
    assert_eq!(digest.status.code(), Some(1));
    let digest: Value = serde_json::from_slice(&digest.stdout).unwrap();
    assert_eq!(digest["chain_valid"], false);
    assert_eq!(digest["first_broken_event"]["id"], victim.id);
}

#[tokio::test]
async fn an_unreachable_audit_store_exits_2() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
        .args(["audit", "verify"])
        .env_clear()
        .env("CASF_AUDIT_SQLITE", "/proc/no-such-dir/audit.db")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

#[tokio::test]
async fn disabled_audit_writes_nothing() {
    let app = spawn_app_with(&[("CASF_DISABLE_AUDIT", "1")]).await;
    app.decide(&request("cliniccloud.create_appointment", "ALLOW"))
        .await;
    assert!(!app.audit_db.exists());
}

#[tokio::test]
async fn shutdown_flushes_queued_audit_events() {
    let mut app = spawn_app().await;
    let decisions = mixed_traffic(&app).await;
    let db = app.audit_db.clone();
    app.shutdown().await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count as usize, decisions);
}

/// `casf-verifier audit <args>` on the SQLite file `db`, from `cwd`.
fn audit_on(db: &std::path::Path, cwd: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
        .arg("audit")
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("CASF_AUDIT_SQLITE", db)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run casf-verifier audit")
}

/// Exit 2 with `needle` in one refusal line on stderr, nothing on stdout.
fn assert_refused_once(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
}

#[test]
fn audit_commands_on_a_missing_database_exit_2_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("mistyped");
    let db = parent.join("casf-audit.db");
    let beside = dir.path().join("casf-audit.db");
    for args in [&["verify"][..], &["digest"], &["digest", "2026-02-09"]] {
        // Absolute, and relative to the working directory: the message
        // gives the absolute path either way.
        let out = audit_on(&db, dir.path(), args);
        assert_refused_once(&out, &format!("no audit database at {}", db.display()));
        let out = audit_on(
            std::path::Path::new("mistyped/casf-audit.db"),
            dir.path(),
            args,
        );
        assert_refused_once(&out, &format!("no audit database at {}", db.display()));
        let out = audit_on(&beside, dir.path(), args);
        assert_refused_once(&out, &beside.display().to_string());
    }
    assert!(!parent.exists(), "the parent directory was created");
    for file in ["casf-audit.db", "casf-audit.db-wal", "casf-audit.db-shm"] {
        assert!(!dir.path().join(file).exists(), "{file} was created");
    }
}

#[test]
fn audit_commands_on_an_unmigrated_sqlite_file_exit_2_naming_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("other.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE unrelated (x INTEGER)")
        .unwrap();
    for args in [&["verify"][..], &["digest"]] {
        let out = audit_on(&db, dir.path(), args);
        assert_refused_once(&out, &format!("audit schema missing in {}", db.display()));
        assert_refused_once(&out, "run `casf-verifier migrate`");
    }
    let tables: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'audit_events'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 0, "the audit commands created the schema");
}

/// `count` synthetic events appended through the store, as the writer would.
pub(crate) async fn append_synthetic(log: &dyn AuditLog, count: usize) -> Vec<AppendReceipt> {
    let mut receipts = Vec::with_capacity(count);
    let events: Vec<NewEvent> = (0..count)
        .map(|i| {
            NewEvent::now(
                &format!("deep-{i}"),
                "role:nurse".into(),
                "twilio.send_sms",
                "ALLOW",
                json!({"i": i, "note": "Zoë — 東京", "fee": 12.5, "nested": {"b": [1, 2.5], "a": null}}),
            )
        })
        .collect();
    for batch in events.chunks(4000) {
        receipts.extend(log.append_batch(batch).await.unwrap());
    }
    receipts
}

#[tokio::test]
async fn a_break_deep_in_a_long_sqlite_chain_is_reported_at_its_exact_id() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = SqliteAuditLog::open(&db).await.unwrap();
    let receipts = append_synthetic(&log, 20_000).await;
    drop(log);

    let valid = audit_on(&db, dir.path(), &["verify"]);
    assert_eq!(valid.status.code(), Some(0), "{valid:?}");
    let last = &receipts.last().unwrap().hash;
    assert_eq!(
        String::from_utf8_lossy(&valid.stdout).trim(),
        format!("chain valid: 20000 events, last hash {last}")
    );
    // Piped, so no progress line.
    assert!(valid.stderr.is_empty(), "{valid:?}");

    // Mid-batch for the walk's 1,024-row batches, and past a 4,000-row append.
    let victim = receipts[10_500].id;
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("DROP TRIGGER audit_events_no_update")
        .unwrap();
    conn.execute(
        "UPDATE audit_events SET payload = replace(payload, '12.5', '1.25') WHERE id = ?1",
        [victim],
    )
    .unwrap();
    // A later linkage break must not hide the earlier one.
    conn.execute(
        "UPDATE audit_events SET prev_hash = 'x' WHERE id = ?1",
        [receipts[15_000].id],
    )
    .unwrap();
    drop(conn);
    let event_id: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT event_id FROM audit_events WHERE id = ?1",
            [victim],
            |r| r.get(0),
        )
        .unwrap();

    let broken = audit_on(&db, dir.path(), &["verify"]);
    assert_eq!(broken.status.code(), Some(1), "{broken:?}");
    assert_eq!(
        String::from_utf8_lossy(&broken.stdout).trim(),
        format!(
            "chain broken at event id {victim} (event_id {event_id}): \
             hash does not match the recomputed hash of the stored columns"
        )
    );
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let digest = audit_on(&db, dir.path(), &["digest", &today]);
    assert_eq!(digest.status.code(), Some(1), "{digest:?}");
    let digest: Value = serde_json::from_slice(&digest.stdout).unwrap();
    assert_eq!(digest["event_count"], 20_000);
    assert_eq!(digest["first_broken_event"]["id"], victim);
    assert_eq!(digest["last_hash"], last.as_str());
}
