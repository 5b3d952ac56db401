//! The production profile: PostgreSQL audit, Redis state and the OPA REST
//! policy together, as operators deploy them, decided exactly like the
//! embedded profile and audited into one verifiable chain.

use serde_json::{Value, json};

use crate::pg::{TestDb, cli, printed};
use crate::servers::spawn_app_on_services;

#[tokio::test]
async fn every_contract_row_through_postgres_redis_and_opa() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on_services(&[("PG_DSN", db.dsn.as_str())]).await;

    let (status, health) = app.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    let mut checks = serde_json::from_str::<Value>(&health).unwrap()["checks"].clone();
    // The test Redis runs without persistence: a warning, not a failure.
    let persistence = checks["redis_persistence"].take();
    assert!(
        persistence
            .as_str()
            .is_some_and(|p| p.starts_with("none (warning: ")),
        "{persistence}"
    );
    checks.as_object_mut().unwrap().remove("redis_persistence");
    assert!(
        checks
            .as_object_mut()
            .unwrap()
            .remove("policy_hash")
            .is_some_and(|h| h.is_string())
    );
    assert_eq!(
        checks,
        json!({"postgres": "ok", "redis": "ok", "opa": "ok", "callers": {"authenticated": false, "warning": "CASF_CALLERS is unset: callers are not authenticated and may claim any role, tenant or tool"}, "shadow": "off"})
    );

    let decided = crate::contract::assert_decision_table(&app).await
        + crate::contract::assert_stateful_rows(&app).await;

    let rows = db.rows().await;
    assert_eq!(rows.len(), decided, "one audit row per decision");
    for row in &rows {
        assert_eq!(crate::audit::recompute(row), row.hash, "row {}", row.id);
    }
    let verify = cli(&db.dsn, &["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    assert!(
        printed(&verify).contains(&format!("{decided} events")),
        "{}",
        printed(&verify)
    );
}
