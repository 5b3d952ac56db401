//! A `/verify` client that goes away mid-decision. The pipeline owns the
//! decision, so it is still finished: audited once, and stored for replays,
//! so that the client's retry gets the stored answer rather than
//! `Inv_ReplayConcurrent` or a second decision.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::{request, spawn_app_with, violations};
use crate::servers::{OpaServer, wait_until};

const DEADLINE: Duration = Duration::from_secs(10);
/// Slower than a poll of `/metrics`, faster than the 350 ms OPA budget, so the
/// decision is under way, and still undecided, when the client hangs up.
const OPA_DELAY_MS: u64 = 300;

#[tokio::test]
async fn a_client_that_disconnects_mid_decision_still_gets_it_audited_and_stored() {
    let opa = OpaServer::start().await;
    let app = spawn_app_with(&[("OPA_URL", opa.url().as_str())]).await;
    opa.fault("slow", OPA_DELAY_MS).await;

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
    let rows_for = |rows: Vec<crate::helpers::AuditRow>| {
        rows.into_iter()
            .filter(|r| r.request_id == request_id)
            .collect::<Vec<_>>()
    };
    assert!(
        rows_for(app.audit_rows().await).is_empty(),
        "the client left before the decision was audited"
    );

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
    opa.fault("ok", 0).await;
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
