//! A `/verify` client that goes away mid-decision. The pipeline owns the
//! decision, so it is still finished: audited once, and stored for replays,
//! so that the client's retry gets the stored answer rather than
//! `Inv_ReplayConcurrent` or a second decision.

use std::time::Duration;

use sqlx::Connection;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::{request, spawn_app_with, violations};
use crate::servers::wait_until;

const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_client_that_disconnects_mid_decision_still_gets_it_audited_and_stored() {
    let app = spawn_app_with(&[]).await;
    // The test holds the audit file's write lock, so the decision stops at
    // its audit append (the writer waits out SQLite's 5 s busy timeout)
    // until the client has gone: no race against a budget.
    let mut lock = sqlx::SqliteConnection::connect(&format!("sqlite://{}", app.audit_db.display()))
        .await
        .expect("open the audit file");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .expect("take the write lock");

    let body = request("cliniccloud.create_appointment", "ALLOW");
    let request_id = body["request_id"].as_str().expect("id").to_owned();
    let text = body.to_string();
    let addr = app.base.strip_prefix("http://").expect("http base");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /verify HTTP/1.1\r\nhost: verifier\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        text.len()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(text.as_bytes()).await.expect("body");

    // Hang up once the decision is in flight and before it is audited.
    wait_until(DEADLINE, "decision in flight", || async {
        app.metric("casf_verify_in_flight").await >= 1.0
    })
    .await;
    drop(stream);
    let (audited,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM audit_events WHERE request_id = ?")
            .bind(&request_id)
            .fetch_one(&mut lock)
            .await
            .expect("count");
    assert_eq!(
        audited, 0,
        "the client left before the decision was audited"
    );
    sqlx::query("ROLLBACK")
        .execute(&mut lock)
        .await
        .expect("release the write lock");
    let rows_for = |rows: Vec<crate::helpers::AuditRow>| {
        rows.into_iter()
            .filter(|r| r.request_id == request_id)
            .collect::<Vec<_>>()
    };

    // The decision finishes without its client: audited, then stored.
    wait_until(DEADLINE, "abandoned decision finished", || async {
        app.metric("casf_verify_in_flight").await == 0.0
    })
    .await;
    let rows = rows_for(app.audit_rows().await);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].action.as_str(), rows[0].decision.as_str()),
        ("cliniccloud.create_appointment", "ALLOW")
    );

    // The retry is a replay of the stored decision, not a pending claim.
    let retry = app.decide(&body).await;
    assert_eq!(retry["decision"], "ALLOW", "{retry}");
    assert!(violations(&retry).is_empty(), "{retry}");
    assert_eq!(app.metric("casf_replay_hit_total").await, 1.0);
    let rows = rows_for(app.audit_rows().await);
    let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        ["cliniccloud.create_appointment", "REPLAY_DETECTED"],
        "exactly one decision, then the audited replay"
    );
}
