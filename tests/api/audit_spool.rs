//! The audit spool (`CASF_AUDIT_SPOOL`) against a private PostgreSQL cluster
//! that the tests stop and restart: decisions made during an outage are
//! answered with the guide's suffix and spooled, then drained into one valid
//! chain, each exactly once, including what a killed process left behind and
//! an event whose commit landed although its acknowledgement was lost; and a
//! full spool is counted as lost, or fails writes closed when strict.

use std::collections::HashMap;
use std::time::Duration;

use casf_verifier::audit::AuditLog;
use casf_verifier::audit::postgres::PostgresAuditLog;
use casf_verifier::audit::spool::Spool;
use serde_json::Value;

use crate::helpers::{AuditRow, TestApp, request, spawn_app_with, violations};
use crate::pg::{PrivateCluster, Server, cli, connect, printed};
use crate::servers::wait_until;

const SUFFIX: &str = " | audit_append_failed";

async fn rows(cluster: &PrivateCluster) -> Vec<AuditRow> {
    let port = cluster.dsn().rsplit_once("port=").unwrap().1.to_owned();
    let pool = connect(&format!(
        "postgres://postgres:{}@127.0.0.1:{port}/postgres",
        cluster.password()
    ))
    .await;
    let rows = crate::pg::audit_rows(&pool).await;
    pool.close().await;
    rows
}

/// The value of an unlabelled series in a scrape.
fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the scrape"))
}

async fn scrape(app: &TestApp, name: &str) -> f64 {
    metric(&app.get("/metrics").await.1, name)
}

/// How many times each request_id is in the chain.
fn counts(rows: &[AuditRow]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for row in rows {
        *counts.entry(row.request_id.clone()).or_default() += 1;
    }
    counts
}

fn assert_verifies(cluster: &PrivateCluster, events: usize) {
    let verify = cli(&cluster.dsn(), &["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    assert!(
        printed(&verify).contains(&format!("{events} events")),
        "{}",
        printed(&verify)
    );
}

#[tokio::test]
async fn two_replicas_spool_through_an_outage_and_drain_into_one_chain() {
    let cluster = PrivateCluster::migrated();
    let dsn = cluster.dsn();
    let (spool_a, spool_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let replica = |dir: &tempfile::TempDir| {
        let dir = dir.path().display().to_string();
        let dsn = dsn.clone();
        async move { spawn_app_with(&[("PG_DSN", &dsn), ("CASF_AUDIT_SPOOL", &dir)]).await }
    };
    let (a, b) = (replica(&spool_a).await, replica(&spool_b).await);
    let mut answered = Vec::new();
    let before = request("cliniccloud.create_appointment", "ALLOW");
    assert_eq!(a.decide(&before).await["reason"], "OK");
    answered.push(before);

    cluster.halt();
    let tools = [
        "cliniccloud.create_appointment",
        "cliniccloud.list_appointments",
        "twilio.send_sms",
    ];
    for round in 0..4 {
        for (app, tool) in [(&a, tools[round % 3]), (&b, tools[(round + 1) % 3])] {
            let body = request(tool, "ALLOW");
            let decision = app.decide(&body).await;
            let reason = decision["reason"].as_str().unwrap();
            assert!(reason.ends_with(SUFFIX), "{decision}");
            answered.push(body);
        }
    }
    assert_eq!(scrape(&a, "casf_audit_spooled_total").await, 4.0);
    assert_eq!(scrape(&b, "casf_audit_spool_depth").await, 4.0);
    let (status, health) = a.get("/healthz").await;
    assert_eq!(status, 503, "{health}");
    assert!(health.contains("(audit spool depth 4)"), "{health}");

    cluster.resume();
    let drained = std::time::Instant::now();
    for app in [&a, &b] {
        wait_until(Duration::from_secs(30), "the spool drained", || async {
            scrape(app, "casf_audit_spool_depth").await == 0.0
        })
        .await;
    }
    eprintln!(
        "spool: 8 events drained {:?} after the restart",
        drained.elapsed()
    );
    let (status, health) = b.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    let checks: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(checks["checks"]["audit_spool"]["depth"], 0, "{health}");
    let after = request("cliniccloud.summary_history", "ALLOW");
    assert_eq!(b.decide(&after).await["reason"], "OK");
    answered.push(after);

    let rows = rows(&cluster).await;
    let counts = counts(&rows);
    assert_eq!(rows.len(), answered.len());
    for body in &answered {
        assert_eq!(counts.get(body["request_id"].as_str().unwrap()), Some(&1));
    }
    assert_verifies(&cluster, answered.len());
    for app in [&a, &b] {
        assert_eq!(scrape(app, "casf_audit_lost_total").await, 0.0);
    }
}

#[tokio::test]
async fn a_killed_process_leaves_a_spool_that_drains_on_the_next_start_without_duplicates() {
    let cluster = PrivateCluster::migrated();
    let dsn = cluster.dsn();
    let dir = tempfile::tempdir().unwrap();
    let spool_env = [("CASF_AUDIT_SPOOL", dir.path().to_str().unwrap())];
    let server = Server::spawn_with(&dsn, &spool_env);
    cluster.halt();
    let mut answered = Vec::new();
    let mut decided = Vec::new();
    for tool in [
        "cliniccloud.create_appointment",
        "twilio.send_sms",
        "cliniccloud.list_appointments",
    ] {
        let body = request(tool, "ALLOW");
        let decision = server.decide(&body).await;
        assert!(
            decision["reason"].as_str().unwrap().ends_with(SUFFIX),
            "{decision}"
        );
        answered.push(body["request_id"].as_str().unwrap().to_owned());
        decided.push((body, decision));
    }
    drop(server); // SIGKILL: no shutdown, the spool is left as is.

    let (spooled, _) = Spool::open(dir.path(), 1 << 20).unwrap().peek(100).unwrap();
    let spooled_ids: Vec<&str> = spooled.iter().map(|e| e.request_id.as_str()).collect();
    assert_eq!(spooled_ids, answered);
    // The first one's commit landed, its acknowledgement did not.
    cluster.resume();
    let log = PostgresAuditLog::open(&casf_verifier::config::PgDsn::parse(&dsn).expect("DSN"))
        .await
        .unwrap();
    log.append_batch(&spooled[..1]).await.unwrap();
    // `audit verify` passes on what the chain holds, and says what waits.
    let verify = crate::pg::binary(&dsn)
        .env("CASF_AUDIT_SPOOL", dir.path())
        .args(["audit", "verify"])
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    assert!(
        printed(&verify).contains("3 audit events are still spooled"),
        "{}",
        printed(&verify)
    );

    let server = Server::spawn_with(&dsn, &spool_env);
    wait_until(
        Duration::from_secs(30),
        "the left spool drained",
        || async { rows(&cluster).await.len() == 3 },
    )
    .await;
    let rows = rows(&cluster).await;
    let event_ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
    let spooled_event_ids: Vec<&str> = spooled.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(event_ids, spooled_event_ids, "in spool order, each once");
    // The original time is what was hashed.
    assert_eq!(rows[2].ts, spooled[2].ts);
    assert_verifies(&cluster, 3);
    wait_until(Duration::from_secs(10), "the spool emptied", || async {
        std::fs::metadata(dir.path().join("audit-spool.jsonl"))
            .map(|m| m.len())
            .ok()
            == Some(0)
    })
    .await;
    assert!(server.log().contains("audit spool"), "{}", server.log());

    // With embedded state, the restart took the spooled decisions into its
    // replay memory: their replays are answered, not decided again.
    for (body, decision) in &decided {
        let again = server.decide(body).await;
        assert_eq!(again["decision"], decision["decision"], "{again}");
        assert!(violations(&again).is_empty(), "{again}");
    }
    let after = self::rows(&cluster).await;
    let replays = after
        .iter()
        .filter(|r| r.action == "REPLAY_DETECTED")
        .count();
    assert_eq!(replays, decided.len(), "{after:?}");
    for (id, n) in counts(&after) {
        assert_eq!(n, 2, "{id}: one decision and one replay");
    }
    assert_verifies(&cluster, after.len());
}

#[tokio::test]
async fn a_full_spool_fails_writes_closed_when_strict_and_counts_them_lost_otherwise() {
    let cluster = PrivateCluster::migrated();
    let dsn = cluster.dsn();
    let (strict_dir, loose_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let strict = spawn_app_with(&[
        ("PG_DSN", &dsn),
        ("CASF_AUDIT_SPOOL", strict_dir.path().to_str().unwrap()),
        ("CASF_AUDIT_SPOOL_MAX_BYTES", "1"),
        ("CASF_AUDIT_STRICT", "true"),
    ])
    .await;
    let loose = spawn_app_with(&[
        ("PG_DSN", &dsn),
        ("CASF_AUDIT_SPOOL", loose_dir.path().to_str().unwrap()),
        ("CASF_AUDIT_SPOOL_MAX_BYTES", "1"),
    ])
    .await;
    cluster.halt();

    let write = request("cliniccloud.create_appointment", "ALLOW");
    let denied = strict.decide(&write).await;
    assert_eq!(denied["decision"], "DENY", "{denied}");
    assert_eq!(
        denied["violations"],
        serde_json::json!(["FAIL_CLOSED", "Audit_Unrecorded"]),
        "{denied}"
    );
    assert!(
        denied["reason"].as_str().unwrap().ends_with(SUFFIX),
        "{denied}"
    );
    let (_, text) = strict.get("/metrics").await;
    assert!(
        text.contains("casf_fail_closed_total{trigger=\"audit\"} 1"),
        "{text}"
    );
    // Reads keep the guide's behaviour.
    let read = strict
        .decide(&request("cliniccloud.list_appointments", "ALLOW"))
        .await;
    assert_eq!(read["decision"], "ALLOW", "{read}");
    assert_eq!(scrape(&strict, "casf_audit_lost_total").await, 2.0);

    let allowed = loose.decide(&write_again()).await;
    assert_eq!(allowed["decision"], "ALLOW", "{allowed}");
    assert!(
        allowed["reason"].as_str().unwrap().ends_with(SUFFIX),
        "{allowed}"
    );
    assert_eq!(scrape(&loose, "casf_audit_lost_total").await, 1.0);
    assert_eq!(scrape(&loose, "casf_audit_spooled_total").await, 0.0);

    // The strict deny released its claim: once PostgreSQL is back, a retry
    // of the same request gets a real decision, not a replay of the deny.
    cluster.resume();
    wait_until(Duration::from_secs(30), "/healthz back to 200", || async {
        strict.get("/healthz").await.0 == 200
    })
    .await;
    // The writer learns that PostgreSQL is back on its own probe, which on
    // a loaded machine may finish after /healthz's: retried until then.
    // Each retry is decided afresh (a replay would repeat the deny).
    wait_until(Duration::from_secs(30), "the retry allowed", || async {
        let retried = strict.decide(&write).await;
        assert_ne!(
            retried["violations"],
            serde_json::json!(["Inv_ReplayConcurrent"]),
            "{retried}"
        );
        retried["decision"] == "ALLOW" && retried["reason"] == "OK"
    })
    .await;
}

fn write_again() -> Value {
    request("cliniccloud.create_appointment", "ALLOW")
}

/// Drain rate of a large spool left behind, for the README's figure:
/// `cargo test --test api drain_rate -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn drain_rate() {
    const EVENTS: usize = 20_000;
    let cluster = PrivateCluster::migrated();
    let dsn = cluster.dsn();
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let events: Vec<_> = (0..EVENTS)
        .map(|i| {
            let body = request("cliniccloud.create_appointment", "ALLOW");
            casf_verifier::audit::NewEvent::now(
                &format!("drain-{i}"),
                "role:nurse".into(),
                "cliniccloud.create_appointment",
                "ALLOW",
                serde_json::json!({"request": body, "response": {"decision": "ALLOW"}}),
            )
        })
        .collect();
    for chunk in events.chunks(512) {
        spool.append(chunk).unwrap();
    }
    let bytes = std::fs::metadata(spool.path()).unwrap().len();
    drop(spool);
    let started = std::time::Instant::now();
    let _server = Server::spawn_with(&dsn, &[("CASF_AUDIT_SPOOL", dir.path().to_str().unwrap())]);
    wait_until(Duration::from_secs(300), "the spool drained", || async {
        std::fs::metadata(dir.path().join("audit-spool.jsonl"))
            .map(|m| m.len())
            .ok()
            == Some(0)
    })
    .await;
    let elapsed = started.elapsed();
    assert_eq!(rows(&cluster).await.len(), EVENTS);
    eprintln!(
        "drained {EVENTS} events ({} bytes spooled, {} bytes/event) in {elapsed:?} from process start: {:.0} events/s",
        bytes,
        bytes / EVENTS as u64,
        EVENTS as f64 / elapsed.as_secs_f64()
    );
    assert_verifies(&cluster, EVENTS);
}

/// `CASF_AUDIT_SPOOL_MODE=always` on top of `extra`.
fn always<'a>(dir: &'a tempfile::TempDir, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut vars = vec![
        ("CASF_AUDIT_SPOOL", dir.path().to_str().unwrap()),
        ("CASF_AUDIT_SPOOL_MODE", "always"),
    ];
    vars.extend_from_slice(extra);
    vars
}

/// The request_ids of `rows` that are in `sent`, in chain order.
fn in_chain_order(rows: &[AuditRow], sent: &[String]) -> Vec<String> {
    rows.iter()
        .filter(|row| sent.contains(&row.request_id))
        .map(|row| row.request_id.clone())
        .collect()
}

/// One ALLOW decided by `app`, recorded in `sent`.
async fn decide(app: &TestApp, sent: &mut Vec<String>, tool: &str) {
    let body = request(tool, "ALLOW");
    let decision = app.decide(&body).await;
    // The spool took it: the answer is whole, with no suffix.
    assert_eq!(decision["reason"], "OK", "{decision}");
    sent.push(body["request_id"].as_str().unwrap().to_owned());
}

#[tokio::test]
async fn always_mode_two_replicas_answer_through_an_outage_and_ship_into_one_chain_in_order() {
    let cluster = PrivateCluster::migrated();
    let dsn = cluster.dsn();
    let (spool_a, spool_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = spawn_app_with(&always(&spool_a, &[("PG_DSN", &dsn)])).await;
    let b = spawn_app_with(&always(&spool_b, &[("PG_DSN", &dsn)])).await;
    let (mut sent_a, mut sent_b) = (Vec::new(), Vec::new());
    let tools = [
        "cliniccloud.create_appointment",
        "cliniccloud.list_appointments",
        "twilio.send_sms",
    ];
    for round in 0..6 {
        decide(&a, &mut sent_a, tools[round % 3]).await;
        decide(&b, &mut sent_b, tools[(round + 1) % 3]).await;
    }
    for app in [&a, &b] {
        wait_until(Duration::from_secs(30), "the spool shipped", || async {
            scrape(app, "casf_audit_spool_depth").await == 0.0
        })
        .await;
    }
    let (status, health) = a.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    let checks: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(
        checks["checks"]["audit_spool"]["mode"], "always",
        "{health}"
    );
    assert_eq!(checks["checks"]["audit_spool"]["depth"], 0, "{health}");
    let shipped = rows(&cluster).await;
    assert_eq!(in_chain_order(&shipped, &sent_a), sent_a);
    assert_eq!(in_chain_order(&shipped, &sent_b), sent_b);

    // PostgreSQL away: both keep answering in full, from their spools.
    cluster.halt();
    for round in 0..4 {
        decide(&a, &mut sent_a, tools[round % 3]).await;
        decide(&b, &mut sent_b, tools[(round + 2) % 3]).await;
    }
    assert_eq!(scrape(&a, "casf_audit_spool_depth").await, 4.0);
    assert_eq!(scrape(&a, "casf_audit_spooled_total").await, 10.0);
    let (status, health) = b.get("/healthz").await;
    assert_eq!(status, 503, "{health}");
    assert!(health.contains("(audit spool depth 4)"), "{health}");
    wait_until(Duration::from_secs(10), "the lag shows", || async {
        scrape(&a, "casf_audit_spool_lag_seconds").await > 0.0
    })
    .await;

    cluster.resume();
    for app in [&a, &b] {
        wait_until(Duration::from_secs(30), "the spool shipped", || async {
            scrape(app, "casf_audit_spool_depth").await == 0.0
        })
        .await;
        assert_eq!(scrape(app, "casf_audit_lost_total").await, 0.0);
        assert_eq!(scrape(app, "casf_audit_spool_lag_seconds").await, 0.0);
    }
    let rows = rows(&cluster).await;
    assert_eq!(rows.len(), sent_a.len() + sent_b.len());
    let counts = counts(&rows);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    // Each replica's decisions are in the chain in the order it answered them.
    assert_eq!(in_chain_order(&rows, &sent_a), sent_a);
    assert_eq!(in_chain_order(&rows, &sent_b), sent_b);
    assert_verifies(&cluster, rows.len());
}

#[tokio::test]
async fn always_mode_a_restart_ships_the_spool_a_killed_process_left() {
    let cluster = PrivateCluster::migrated();
    let dsn = cluster.dsn();
    let dir = tempfile::tempdir().unwrap();
    let env = always(&dir, &[]);
    let server = Server::spawn_with(&dsn, &env);
    cluster.halt();
    let mut answered = Vec::new();
    for tool in [
        "cliniccloud.create_appointment",
        "twilio.send_sms",
        "cliniccloud.list_appointments",
    ] {
        let body = request(tool, "ALLOW");
        let decision = server.decide(&body).await;
        assert_eq!(decision["reason"], "OK", "{decision}");
        answered.push(body["request_id"].as_str().unwrap().to_owned());
    }
    drop(server); // SIGKILL with PostgreSQL away: all three wait in the spool.
    let (spooled, _) = Spool::open(dir.path(), 1 << 20).unwrap().peek(100).unwrap();
    let spooled_ids: Vec<String> = spooled.iter().map(|e| e.request_id.clone()).collect();
    assert_eq!(spooled_ids, answered);

    cluster.resume();
    let server = Server::spawn_with(&dsn, &env);
    wait_until(
        Duration::from_secs(30),
        "the left spool shipped",
        || async { rows(&cluster).await.len() == 3 },
    )
    .await;
    let rows = rows(&cluster).await;
    let event_ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
    let spooled_event_ids: Vec<&str> = spooled.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(event_ids, spooled_event_ids, "in spool order, each once");
    assert_verifies(&cluster, 3);
    wait_until(Duration::from_secs(10), "the spool emptied", || async {
        std::fs::metadata(dir.path().join("audit-spool.jsonl"))
            .map(|m| m.len())
            .ok()
            == Some(0)
    })
    .await;
    assert!(server.log().contains("audit spool"), "{}", server.log());
}
