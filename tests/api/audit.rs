//! The audit trail after real traffic: one row per decision, a chain that an
//! independent implementation can recompute, and tampering caught by the CLI.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

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

/// The guide's hash rule, written out independently of the crate.
pub(crate) fn recompute(row: &crate::helpers::AuditRow) -> String {
    fn canonical(v: &Value) -> String {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                let fields: Vec<String> = keys
                    .iter()
                    .map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&map[*k])))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }
            Value::Array(items) => format!(
                "[{}]",
                items.iter().map(canonical).collect::<Vec<_>>().join(",")
            ),
            other => other.to_string(),
        }
    }
    let payload: Value = serde_json::from_str(&row.payload).unwrap();
    let text = format!(
        "{}{}{}{}{}{}{}{}",
        row.request_id,
        row.event_id,
        row.ts,
        row.actor,
        row.action,
        row.decision,
        canonical(&payload),
        row.prev_hash
    );
    hex::encode(Sha256::digest(text.as_bytes()))
}

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
