//! The PostgreSQL audit trail (`PG_DSN`) against a real server: one row per
//! decision with a chain an independent reader recomputes, JSONB round trips
//! that keep every hash verifiable, several verifier processes sharing one
//! chain, tampering caught by the CLI, and an outage that degrades auditing
//! without stopping decisions and heals by itself.

use std::time::Duration;

use casf_verifier::audit::pg_dsn::PgDsn;
use casf_verifier::audit::postgres::{APPEND_FUNCTION, PostgresAuditLog};
use casf_verifier::audit::{AppendReceipt, AuditLog, NewEvent};
use casf_verifier::canonical;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::audit::{assert_chain_rows, mixed_traffic};
use crate::helpers::{AuditRow, TestApp, fresh_id, request, spawn_app_with};
use crate::pg::{PrivateCluster, Server, TestDb, binary, cli, connect, printed, shared_dsn};
use crate::servers::{free_port, wait_until};

async fn app_on(dsn: &str) -> TestApp {
    spawn_app_with(&[("PG_DSN", dsn)]).await
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

#[tokio::test]
async fn every_decision_is_one_postgres_row_and_the_chain_recomputes_from_columns() {
    let db = TestDb::migrated().await;
    let app = app_on(&db.dsn).await;
    let (status, health) = app.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(
        serde_json::from_str::<Value>(&health).unwrap()["checks"]["postgres"],
        "ok"
    );

    let decisions = mixed_traffic(&app).await;
    let rows = db.rows().await;
    assert_chain_rows(&rows, decisions);

    let verify = cli(&db.dsn, &["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{verify:?}");
    assert!(printed(&verify).contains(&format!("{decisions} events")));
    let digest = cli(&db.dsn, &["audit", "digest", &today()]);
    assert_eq!(digest.status.code(), Some(0), "{digest:?}");
    let digest: Value = serde_json::from_slice(&digest.stdout).unwrap();
    assert_eq!(digest["event_count"], decisions);
    assert_eq!(digest["chain_valid"], true);
    assert_eq!(digest["first_hash"], rows[0].hash.as_str());
    assert_eq!(digest["last_hash"], rows[decisions - 1].hash.as_str());
}

/// Values that JSONB stores differently from how they were sent: key order,
/// number spelling, escapes, non-BMP characters.
const AWKWARD_ARGS: &str = r#"{
    "zeta": 1, "alpha": {"nested": {"deeper": [1, {"b": 2, "a": 1}, []]}}, "empty": {},
    "unicode": "Zoë — 東京 — 😀 — \ud83d\ude00 — \u00e9 — e\u0301",
    "controls": "tab\tnewline\nquote\"backslash\\ bell\u0007 del\u007f esc\u001b",
    "ints": [0, -1, 1, 9007199254740993, -9007199254740993, 18446744073709551615,
             -9223372036854775808, 123456789012345678901234567890, -123456789012345678901234567890],
    "decimals": [0.1, 1.0, 1e20, 1.5e-7, -0.0, 0.0, 2.50, 1E+2, 1e16, -1e16, 1.5e17,
                 9.999e18, 1e19, 1.7976931348623157e308, 5e-324, 123.456e5, 0.30000000000000004,
                 -2.2250738585072014e-308],
    "mixed": [true, false, null, "", "\/slash"],
    "keys": {"é": 1, "E": 2, "e": 3, "😀": 4, "": 5, "a b": 6}
}"#;

fn awkward_body() -> String {
    format!(
        r#"{{"request_id": "{}", "tool": "stripe.generate_invoice", "mode": "ALLOW",
            "role": "billing", "subject": {{"patient_id": "pât-😀"}},
            "args": {AWKWARD_ARGS}, "context": {{"tenant_id": "t-ü", "depth": {}}}}}"#,
        fresh_id(),
        nested(60)
    )
}

/// `[[[ ... ]]]` nested `levels` deep around a number.
fn nested(levels: usize) -> String {
    format!("{}1.5{}", "[".repeat(levels), "]".repeat(levels))
}

#[tokio::test]
async fn jsonb_round_trips_keep_every_hash_verifiable() {
    let db = TestDb::migrated().await;
    let app = app_on(&db.dsn).await;
    let body = awkward_body();
    let response = app.post_raw(body.clone()).await;
    assert_eq!(response.status().as_u16(), 200);
    let decision: Value = response.json().await.unwrap();
    assert_eq!(decision["reason"], "OK", "{decision}");

    let rows = db.rows().await;
    assert_eq!(rows.len(), 1);
    // What JSONB gives back canonicalises to exactly what was hashed.
    let sent: Value = serde_json::from_str(&body).unwrap();
    let stored: Value = serde_json::from_str(&rows[0].payload).unwrap();
    assert_eq!(
        canonical::to_string(&stored["request"]),
        canonical::to_string(&sent)
    );
    assert_ne!(
        rows[0].payload,
        canonical::to_string(&stored),
        "JSONB should have reformatted the payload, or this test proves nothing"
    );
    let pool = db.pool().await;
    let (emoji, big): (String, String) = sqlx::query_as(
        "SELECT payload #>> '{request,args,unicode}', payload #>> '{request,args,ints,3}' \
         FROM audit_events",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(emoji.contains("😀 — 😀"), "{emoji}");
    assert_eq!(big, "9007199254740993");
    pool.close().await;

    let verify = cli(&db.dsn, &["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    let digest = cli(&db.dsn, &["audit", "digest", &today()]);
    assert_eq!(digest.status.code(), Some(0), "{}", printed(&digest));
}

/// A deterministic xorshift64* stream, seeded per run and reported on failure.
struct Numbers(u64);

impl Numbers {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[tokio::test]
async fn canonical_numbers_survive_postgres_jsonb_unchanged() {
    let seed = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
    let mut rng = Numbers(seed);
    let mut values: Vec<Value> = Vec::new();
    for _ in 0..20_000 {
        let bits = rng.next();
        // Every finite double, from random bit patterns (all exponents).
        if let Some(n) = serde_json::Number::from_f64(f64::from_bits(bits)) {
            values.push(Value::Number(n));
        }
        // Integral doubles around the 2^53..2^64 region, where a reader
        // could take a JSONB integer for an int.
        let scale = 10f64.powi((bits % 24) as i32);
        values.push(json!((bits >> 11) as f64 * scale / 1e3));
        values.push(json!(rng.next() as i64));
        values.push(json!(rng.next()));
        // Short decimals as clients type them.
        let text = format!("{}.{}e{}", bits % 1000, bits % 97, (bits % 41) as i64 - 20);
        values.push(serde_json::from_str(&text).unwrap());
    }
    let pool = connect(&shared_dsn()).await;
    for chunk in values.chunks(5_000) {
        let sent = Value::Array(chunk.to_vec());
        let back: String = sqlx::query_scalar("SELECT ($1::text)::jsonb::text")
            .bind(canonical::to_string(&sent))
            .fetch_one(&pool)
            .await
            .unwrap();
        let back: Vec<Value> = serde_json::from_str(&back).unwrap();
        for (sent, back) in chunk.iter().zip(&back) {
            assert_eq!(
                canonical::to_string(back),
                canonical::to_string(sent),
                "seed {seed}: {sent} came back from JSONB as {back}"
            );
        }
    }
    pool.close().await;
}

async fn requests_from(base: &str, tenant: &str, count: usize) -> Vec<Value> {
    let client = casf_verifier::tls::http_client_builder()
        .build()
        .expect("HTTP client");
    futures::stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            let mut body = request(
                if i % 2 == 0 {
                    "cliniccloud.create_appointment"
                } else {
                    "cliniccloud.list_appointments"
                },
                "ALLOW",
            );
            body["context"]["tenant_id"] = json!(tenant);
            async move {
                let response = client
                    .post(format!("{base}/verify"))
                    .json(&body)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await
                    .expect("POST /verify");
                assert_eq!(response.status().as_u16(), 200);
                response.json::<Value>().await.expect("JSON decision")
            }
        })
        .buffer_unordered(8)
        .collect()
        .await
}

#[tokio::test]
async fn two_verifier_processes_append_to_one_valid_chain() {
    const EACH: usize = 200;
    let db = TestDb::migrated().await;
    let mut a = Server::spawn(&db.dsn);
    let mut b = Server::spawn(&db.dsn);
    let (from_a, from_b) = tokio::time::timeout(
        Duration::from_secs(180),
        futures::future::join(
            requests_from(&a.base, "tenant-a", EACH),
            requests_from(&b.base, "tenant-b", EACH),
        ),
    )
    .await
    .expect("400 decisions within 3 minutes");
    for decision in from_a.iter().chain(&from_b) {
        assert_eq!(decision["reason"], "OK", "{decision}");
    }
    assert_eq!(a.stop(), Some(0), "{}", a.log());
    assert_eq!(b.stop(), Some(0), "{}", b.log());

    let rows = db.rows().await;
    assert_eq!(rows.len(), 2 * EACH);
    // The two processes really did interleave their batches.
    let tenants: Vec<String> = rows
        .iter()
        .map(|row| {
            let payload: Value = serde_json::from_str(&row.payload).unwrap();
            payload["request"]["context"]["tenant_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let switches = tenants.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches >= 2,
        "writers did not interleave: {switches} switches"
    );

    let verify = cli(&db.dsn, &["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    assert!(printed(&verify).contains(&format!("{} events", 2 * EACH)));
}

fn events(tag: &str, count: usize) -> Vec<NewEvent> {
    (0..count)
        .map(|i| {
            NewEvent::now(
                &format!("{tag}-{i}"),
                format!("role:{tag}"),
                "cliniccloud.create_appointment",
                "ALLOW",
                json!({"tag": tag, "i": i, "amount": 12.5}),
            )
        })
        .collect()
}

/// Receipts name exactly the rows that were written, in chain order.
fn assert_receipts_match(rows: &[AuditRow], receipts: &[AppendReceipt]) {
    for receipt in receipts {
        let row = rows
            .iter()
            .find(|row| row.id == receipt.id)
            .unwrap_or_else(|| panic!("no row {}", receipt.id));
        assert_eq!(row.hash, receipt.hash);
    }
    for pair in receipts.windows(2) {
        assert_eq!(pair[1].id, pair[0].id + 1, "one batch is contiguous");
    }
}

#[tokio::test]
async fn stores_sharing_a_database_rechain_after_the_other_moved_the_head() {
    let db = TestDb::migrated().await;
    let a = PostgresAuditLog::open(&PgDsn::parse(&db.dsn).expect("DSN"))
        .await
        .expect("open a");
    let b = PostgresAuditLog::open(&PgDsn::parse(&db.dsn).expect("DSN"))
        .await
        .expect("open b");
    let mut receipts = Vec::new();
    // Every batch after the first finds the head moved by the other store
    // since its own last commit, so each one is re-chained before it lands.
    for round in 0..4 {
        for (store, tag) in [(&a, "a"), (&b, "b")] {
            let batch = events(&format!("{tag}{round}"), 1 + round);
            let got = store.append_batch(&batch).await.expect("append");
            assert_eq!(got.len(), batch.len());
            receipts.push(got);
        }
    }
    let rows = db.rows().await;
    assert_eq!(rows.len(), 2 * (1 + 2 + 3 + 4));
    assert_eq!(rows[0].prev_hash, "");
    for pair in rows.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash, "row {}", pair[1].id);
    }
    for batch in &receipts {
        assert_receipts_match(&rows, batch);
    }
    let verify = cli(&db.dsn, &["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
}

#[tokio::test]
async fn a_database_initialised_without_the_append_function_still_chains() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    sqlx::query(&format!("DROP FUNCTION {APPEND_FUNCTION}"))
        .execute(&pool)
        .await
        .expect("drop the function");
    pool.close().await;

    let store = PostgresAuditLog::open(&PgDsn::parse(&db.dsn).expect("DSN"))
        .await
        .expect("open");
    let first = store.append_batch(&events("x", 3)).await.expect("append");
    let app = app_on(&db.dsn).await;
    let decisions = mixed_traffic(&app).await;
    let second = store.append_batch(&events("y", 2)).await.expect("append");

    let rows = db.rows().await;
    assert_eq!(rows.len(), 3 + decisions + 2);
    assert_eq!(rows[0].prev_hash, "");
    for pair in rows.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash, "row {}", pair[1].id);
    }
    assert_receipts_match(&rows, &first);
    assert_receipts_match(&rows, &second);
    let verify = cli(&db.dsn, &["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
}

/// A database with some audited traffic and the app already stopped.
async fn audited_db() -> (TestDb, Vec<AuditRow>) {
    let db = TestDb::migrated().await;
    let mut app = app_on(&db.dsn).await;
    mixed_traffic(&app).await;
    app.shutdown().await;
    let rows = db.rows().await;
    assert!(rows.len() >= 6);
    (db, rows)
}

/// Both `audit verify` and `audit digest` exit 1 naming `first_bad`.
fn assert_caught(db: &TestDb, first_bad: &AuditRow) {
    let verify = cli(&db.dsn, &["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(1), "{}", printed(&verify));
    let out = printed(&verify);
    assert!(out.contains(&format!("event id {}", first_bad.id)), "{out}");
    assert!(out.contains(&first_bad.event_id), "{out}");

    let day = &first_bad.ts[..10];
    let digest = cli(&db.dsn, &["audit", "digest", day]);
    assert_eq!(digest.status.code(), Some(1), "{}", printed(&digest));
    let digest: Value = serde_json::from_slice(&digest.stdout).unwrap();
    assert_eq!(digest["chain_valid"], false);
    assert_eq!(
        digest["first_broken_event"]["event_id"],
        first_bad.event_id.as_str()
    );
}

/// What an attacker with table rights does first: switch the guard off.
async fn disable_append_only_guard(pool: &sqlx::PgPool) {
    sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER USER")
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_updated_payload_is_caught_by_verify_and_digest() {
    let (db, rows) = audited_db().await;
    let pool = db.pool().await;
    for refused in [
        "UPDATE audit_events SET decision = 'ALLOW'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ] {
        let error = sqlx::query(refused).execute(&pool).await.unwrap_err();
        assert!(
            error.to_string().contains("append-only"),
            "{refused}: {error}"
        );
    }
    let victim = rows.iter().find(|r| r.decision == "DENY").unwrap();
    disable_append_only_guard(&pool).await;
    sqlx::query(
        "UPDATE audit_events SET payload = jsonb_set(payload, '{response,decision}', '\"ALLOW\"') \
         WHERE id = $1",
    )
    .bind(victim.id)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert_caught(&db, victim);
}

#[tokio::test]
async fn a_deleted_middle_row_is_caught_at_its_successor() {
    let (db, rows) = audited_db().await;
    let pool = db.pool().await;
    disable_append_only_guard(&pool).await;
    sqlx::query("DELETE FROM audit_events WHERE id = $1")
        .bind(rows[3].id)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert_caught(&db, &rows[4]);
}

#[tokio::test]
async fn swapped_hashes_are_caught_at_the_first_swapped_row() {
    let (db, rows) = audited_db().await;
    let pool = db.pool().await;
    disable_append_only_guard(&pool).await;
    // `hash` is UNIQUE, so the swap goes through a placeholder.
    for (id, hash) in [
        (rows[1].id, "placeholder"),
        (rows[4].id, rows[1].hash.as_str()),
        (rows[1].id, rows[4].hash.as_str()),
    ] {
        sqlx::query("UPDATE audit_events SET hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    assert_caught(&db, &rows[1]);
}

/// Sum of `casf_audit_append_failed_total` over its kinds.
async fn audit_failures(app: &TestApp) -> f64 {
    let (_, text) = app.get("/metrics").await;
    text.lines()
        .filter(|l| l.starts_with("casf_audit_append_failed_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_first_probe_after_a_restart_answers_although_the_pool_holds_cut_connections() {
    let cluster = PrivateCluster::migrated();
    let dsn = cluster.dsn();
    let log = PostgresAuditLog::open(&PgDsn::parse(&dsn).expect("DSN"))
        .await
        .expect("open");
    // Reads side by side leave several idle connections in the pool.
    let ids = [uuid::Uuid::new_v4().to_string()];
    let (a, b, c) = tokio::join!(
        log.present_event_ids(&ids),
        log.present_event_ids(&ids),
        log.present_event_ids(&ids)
    );
    assert!(a.is_ok() && b.is_ok() && c.is_ok());

    cluster.halt();
    cluster.resume();
    // Every pooled connection was cut by the restart; the server is back.
    log.ping().await.expect("the server is back");
    log.ping().await.expect("and stays so");
}

#[tokio::test]
async fn a_postgres_outage_degrades_auditing_and_heals_without_a_restart() {
    let cluster = PrivateCluster::migrated();
    let dsn = cluster.dsn();
    let app = app_on(&dsn).await;

    let before = request("cliniccloud.create_appointment", "ALLOW");
    assert_eq!(app.decide(&before).await["reason"], "OK");
    let failures_before = audit_failures(&app).await;

    cluster.halt();
    let probed = std::time::Instant::now();
    let (status, body) = app.get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    // The guide's "503 immediately": a refused connection, not a 2 s timeout.
    assert!(
        probed.elapsed() < Duration::from_secs(1),
        "{:?}",
        probed.elapsed()
    );
    let detail = serde_json::from_str::<Value>(&body).unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.starts_with("postgres: "), "{detail}");
    assert!(!body.contains(cluster.password()), "{body}");

    let during = [
        request("cliniccloud.create_appointment", "ALLOW"),
        request("cliniccloud.list_appointments", "ALLOW"),
    ];
    for body in &during {
        let decision = app.decide(body).await;
        assert_eq!(decision["decision"], "ALLOW", "{decision}");
        assert!(
            decision["reason"]
                .as_str()
                .unwrap()
                .ends_with(" | audit_append_failed"),
            "{decision}"
        );
    }
    assert_eq!(audit_failures(&app).await - failures_before, 2.0);

    cluster.resume();
    wait_until(Duration::from_secs(30), "/healthz back to 200", || async {
        app.get("/healthz").await.0 == 200
    })
    .await;
    // The writer finds the store again on a probe of its own; a decision
    // that races that probe on a loaded machine is answered as during the
    // outage (suffix, no row). Healing means a clean answer soon, without
    // a restart, and rows for exactly the clean answers.
    let healing = std::time::Instant::now();
    let mut raced = 0;
    let after = loop {
        let body = request("cliniccloud.summary_history", "ALLOW");
        let reason = app.decide(&body).await["reason"].clone();
        if reason == "OK" {
            break body;
        }
        assert_eq!(reason, "OK | audit_append_failed");
        assert!(healing.elapsed() < Duration::from_secs(30), "not healed");
        raced += 1;
    };
    eprintln!("{raced} decisions raced the writer's probe after /healthz was 200");

    // Decisions made during the outage have no row: a gap, not a break.
    let pool = connect(&format!(
        "postgres://postgres:{}@127.0.0.1:{}/postgres",
        cluster.password(),
        dsn.rsplit_once("port=").unwrap().1
    ))
    .await;
    let audited: Vec<String> = crate::pg::audit_rows(&pool)
        .await
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    pool.close().await;
    assert_eq!(
        audited,
        [&before, &after].map(|b| b["request_id"].as_str().unwrap().to_owned())
    );
    let verify = cli(&dsn, &["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    assert!(printed(&verify).contains("2 events"));
}

#[tokio::test]
async fn an_unreachable_database_exits_2_without_printing_the_password() {
    let port = free_port();
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    for dsn in [
        format!("postgres://casf:{password}@127.0.0.1:{port}/casf"),
        format!("dbname=casf user=casf password={password} host=127.0.0.1 port={port}"),
    ] {
        for args in [
            &["audit", "verify"][..],
            &["audit", "digest"],
            &["migrate"],
            &[],
        ] {
            let out = binary(&dsn).args(args).output().unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", printed(&out));
            assert!(
                !printed(&out).contains(&password),
                "{args:?}: {}",
                printed(&out)
            );
            assert!(
                printed(&out).contains("PostgreSQL"),
                "{args:?}: {}",
                printed(&out)
            );
        }
    }
    // Reachable, but the password is wrong: the server's refusal is shown, the password is not.
    let db = TestDb::create().await;
    let wrong = db
        .dsn
        .replacen(":casf-test-secret@", &format!(":{password}@"), 1);
    assert_ne!(wrong, db.dsn, "unexpected CASF_TEST_PG_DSN shape");
    let out = cli(&wrong, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("authentication"),
        "{}",
        printed(&out)
    );
    assert!(!printed(&out).contains(&password), "{}", printed(&out));
}

#[tokio::test]
async fn serve_refuses_an_unmigrated_database_and_migrate_is_idempotent() {
    let db = TestDb::create().await;
    let refused = binary(&db.dsn).output().unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", printed(&refused));
    assert!(
        printed(&refused).contains("casf-verifier migrate"),
        "{}",
        printed(&refused)
    );

    // Two at once (the guide's key=value DSN form), then once more.
    let kv = db.key_value_dsn();
    let racing: Vec<_> = (0..2)
        .map(|_| {
            binary(&kv)
                .arg("migrate")
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in racing {
        assert_eq!(child.wait().unwrap().code(), Some(0));
    }
    let again = cli(&db.dsn, &["migrate"]);
    assert_eq!(again.status.code(), Some(0), "{}", printed(&again));

    let pool = db.pool().await;
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'audit_events'::regclass AND NOT tgisinternal",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(triggers, 2);
    pool.close().await;
    let app = app_on(&kv).await;
    app.decide(&request("twilio.send_sms", "ALLOW")).await;
    assert_eq!(db.rows().await.len(), 1);
}

#[tokio::test]
async fn a_nul_character_is_refused_before_it_can_reach_jsonb() {
    let db = TestDb::migrated().await;
    let app = app_on(&db.dsn).await;
    let nul = "a\u{0}b";
    let mut in_value = request("cliniccloud.create_appointment", "ALLOW");
    in_value["args"] = json!({"list": ["ok", {"note": nul}]});
    let mut in_key = request("cliniccloud.create_appointment", "ALLOW");
    in_key["context"] = json!({"tenant_id": "t-1", nul: 1});
    let mut in_subject = request("cliniccloud.create_appointment", "ALLOW");
    in_subject["subject"]["patient_id"] = json!(nul);
    let mut in_id = request("cliniccloud.create_appointment", "ALLOW");
    in_id["request_id"] = json!(nul);
    for (body, field) in [
        (in_value, "args.list[1].note"),
        (in_key, "context"),
        (in_subject, "subject.patient_id"),
        (in_id, "request_id"),
    ] {
        let (status, error) = app.verify(&body).await;
        assert_eq!(status, 422, "{error}");
        assert_eq!(error["field"], field, "{error}");
    }
    // The same request without the NUL is decided and audited as usual.
    app.decide(&request("cliniccloud.create_appointment", "ALLOW"))
        .await;
    assert_eq!(db.rows().await.len(), 1);
}

#[tokio::test]
async fn audit_commands_on_an_unmigrated_database_exit_2_naming_migrate() {
    let db = TestDb::create().await;
    for args in [&["audit", "verify"][..], &["audit", "digest"]] {
        let out = cli(&db.dsn, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", printed(&out));
        assert_eq!(stderr.lines().count(), 1, "printed once: {stderr}");
        assert!(
            stderr.contains(&format!(
                "audit schema missing in PostgreSQL database \"{}\"",
                db.name
            )),
            "{stderr}"
        );
        assert!(stderr.contains("run `casf-verifier migrate`"), "{stderr}");
        assert!(!stderr.contains("casf-test-secret"), "{stderr}");
    }
    // Read-only: nothing was created on the way.
    let pool = db.pool().await;
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('audit_events')::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(table, None);
    pool.close().await;
}

#[tokio::test]
async fn a_break_deep_in_a_long_postgres_chain_is_reported_at_its_exact_id() {
    let db = TestDb::migrated().await;
    let log = PostgresAuditLog::open(&PgDsn::parse(&db.dsn).expect("DSN"))
        .await
        .unwrap();
    let receipts = crate::audit::append_synthetic(&log, 20_000).await;
    drop(log);
    let last = &receipts.last().unwrap().hash;
    let valid = cli(&db.dsn, &["audit", "verify"]);
    assert_eq!(valid.status.code(), Some(0), "{}", printed(&valid));
    assert_eq!(
        printed(&valid).trim(),
        format!("chain valid: 20000 events, last hash {last}")
    );

    let victim = receipts[10_500].id;
    let pool = db.pool().await;
    disable_append_only_guard(&pool).await;
    sqlx::query(
        "UPDATE audit_events SET payload = jsonb_set(payload, '{fee}', '1.25') WHERE id = $1",
    )
    .bind(victim)
    .execute(&pool)
    .await
    .unwrap();
    let event_id: String =
        sqlx::query_scalar("SELECT event_id::text FROM audit_events WHERE id = $1")
            .bind(victim)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;

    let broken = cli(&db.dsn, &["audit", "verify"]);
    assert_eq!(broken.status.code(), Some(1), "{}", printed(&broken));
    assert_eq!(
        printed(&broken).trim(),
        format!(
            "chain broken at event id {victim} (event_id {event_id}): \
             hash does not match the recomputed hash of the stored columns"
        )
    );
    let digest = cli(&db.dsn, &["audit", "digest", &today()]);
    assert_eq!(digest.status.code(), Some(1), "{}", printed(&digest));
    let digest: Value = serde_json::from_slice(&digest.stdout).unwrap();
    assert_eq!(digest["event_count"], 20_000);
    assert_eq!(digest["first_broken_event"]["id"], victim);
}
