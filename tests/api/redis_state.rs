//! Anti-replay and the SMS limit in Redis (`REDIS_URL`), decided with the
//! OPA server (`OPA_URL`): the contract's rows on the shared services, and
//! fail-closed behaviour and recovery on a private Redis that is stopped.

use std::time::Duration;

use casf_verifier::config::Settings;
use casf_verifier::domain::{RequestId, VerifyRequest, VerifyResponse};
use casf_verifier::state::redis::RedisState;
use casf_verifier::state::{Claim, RateLimiter, ReplayGuard};
use fred::prelude::KeysInterface;
use serde_json::{Value, json};

use crate::helpers::{
    READ_TOOLS, TestApp, WRITE_TOOLS, fresh_id, metric_value, request, spawn_app_with, violations,
};
use crate::servers::{
    RedisServer, free_port, redis_client, required_env, spawn_app_on_services, wait_until,
};

/// Generous bound for the client to notice a stopped or restarted Redis.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(20);

fn replay_key(body: &Value) -> String {
    format!(
        "casf:req:{}",
        body["request_id"].as_str().expect("request_id")
    )
}

fn fingerprint(body: &Value) -> String {
    VerifyRequest::from_value(body.clone())
        .expect("valid request")
        .fingerprint()
}

fn request_id(body: &Value) -> RequestId {
    RequestId::parse(body["request_id"].as_str().expect("request_id")).expect("request id")
}

/// The app's own state store on the shared Redis, built from `vars` the way
/// startup builds it: stands in for another verifier process.
async fn state_like_the_app(vars: &[(&str, &str)]) -> RedisState {
    let settings = Settings::from_lookup(|k| {
        vars.iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
    })
    .expect("settings");
    RedisState::connect(
        &required_env("CASF_TEST_REDIS_URL"),
        &Default::default(),
        settings.anti_replay_ttl,
        settings.pending_ttl,
    )
    .await
    .expect("Redis state")
}

async fn healthz(app: &TestApp) -> (u16, Value) {
    let (status, body) = app.get("/healthz").await;
    (status, serde_json::from_str(&body).expect("JSON /healthz"))
}

#[tokio::test]
async fn redis_state_mirrors_the_memory_store() {
    let state = state_like_the_app(&[]).await;
    let id = RequestId::parse(&fresh_id()).unwrap();
    let allow = VerifyResponse::from_violations(vec![], vec![]);

    assert_eq!(state.claim(&id, "f1").await.unwrap(), Claim::Claimed);
    assert_eq!(state.claim(&id, "f1").await.unwrap(), Claim::Pending);
    assert_eq!(state.claim(&id, "f2").await.unwrap(), Claim::Mismatch);
    // Releasing someone else's claim leaves it in place.
    state.release(&id, "f2").await.unwrap();
    assert_eq!(state.claim(&id, "f1").await.unwrap(), Claim::Pending);
    state.complete(&id, "f1", &allow).await.unwrap();
    assert_eq!(
        state.claim(&id, "f1").await.unwrap(),
        Claim::Cached(allow.clone())
    );
    assert_eq!(state.claim(&id, "f2").await.unwrap(), Claim::Mismatch);
    // A stored decision is never released.
    state.release(&id, "f1").await.unwrap();
    assert_eq!(state.claim(&id, "f1").await.unwrap(), Claim::Cached(allow));

    let other = RequestId::parse(&fresh_id()).unwrap();
    state.claim(&other, "f").await.unwrap();
    state.release(&other, "f").await.unwrap();
    assert_eq!(state.claim(&other, "g").await.unwrap(), Claim::Claimed);

    let counter = format!("sms:p-{}", fresh_id());
    let hour = Duration::from_secs(3600);
    assert_eq!(state.hit(&counter, hour).await.unwrap(), 1);
    assert_eq!(state.hit(&counter, hour).await.unwrap(), 2);
    assert_eq!(
        state.hit(&format!("{counter}-other"), hour).await.unwrap(),
        1
    );
    state.ping().await.unwrap();
}

#[tokio::test]
async fn replay_through_redis_returns_the_identical_decision() {
    let app = spawn_app_on_services(&[]).await;
    let hits = app.metric("casf_replay_hit_total").await;
    let body = request("cliniccloud.create_appointment", "ALLOW");
    let first = app.decide(&body).await;
    assert_eq!(first["decision"], "ALLOW", "{first}");
    assert_eq!(app.decide(&body).await, first);
    assert_eq!(app.metric("casf_replay_hit_total").await, hits + 1.0);
    let actions: Vec<String> = app
        .audit_rows()
        .await
        .into_iter()
        .map(|r| r.action)
        .collect();
    assert_eq!(
        actions,
        ["cliniccloud.create_appointment", "REPLAY_DETECTED"]
    );
}

#[tokio::test]
async fn replay_through_redis_with_a_different_payload_is_denied() {
    let app = spawn_app_on_services(&[]).await;
    crate::contract::assert_reused_id_with_new_payload_denied(&app).await;
}

#[tokio::test]
async fn concurrent_duplicates_through_redis_are_decided_exactly_once() {
    let app = spawn_app_on_services(&[]).await;
    crate::contract::assert_duplicates_decided_once(&app).await;
}

#[tokio::test]
async fn second_sms_within_the_hour_is_denied_through_redis() {
    let app = spawn_app_on_services(&[]).await;
    let first = request("twilio.send_sms", "ALLOW");
    let mut second = first.clone();
    second["request_id"] = json!(fresh_id());
    let mut other_patient = request("twilio.send_sms", "ALLOW");
    other_patient["args"] = first["args"].clone();

    assert_eq!(app.decide(&first).await["decision"], "ALLOW");
    let denied = app.decide(&second).await;
    assert_eq!(denied["decision"], "DENY");
    assert_eq!(violations(&denied), ["Inv_NoSmsBurst"]);
    assert_eq!(app.decide(&other_patient).await["decision"], "ALLOW");

    let redis = redis_client(&required_env("CASF_TEST_REDIS_URL")).await;
    let counter = format!("sms:{}", first["subject"]["patient_id"].as_str().unwrap());
    assert_eq!(redis.get::<i64, _>(&counter).await.unwrap(), 2);
    let ttl: i64 = redis.ttl(&counter).await.unwrap();
    assert!((1..=3600).contains(&ttl), "window TTL {ttl}");
}

#[tokio::test]
async fn decided_key_outlives_the_pending_ttl_and_del_allows_reprocessing() {
    let app = spawn_app_on_services(&[("ANTI_REPLAY_TTL_SECONDS", "600")]).await;
    let body = request("cliniccloud.cancel_appointment", "ALLOW");
    assert_eq!(app.decide(&body).await["decision"], "ALLOW");

    let redis = redis_client(&required_env("CASF_TEST_REDIS_URL")).await;
    let key = replay_key(&body);
    let ttl: i64 = redis.ttl(&key).await.unwrap();
    // Longer than the 30 s pending TTL: the decision was stored for replays.
    assert!(ttl > 30 && ttl <= 600, "TTL of {key} is {ttl}");

    let mut changed = body.clone();
    changed["args"] = json!({"slot": "later"});
    assert_eq!(
        violations(&app.decide(&changed).await),
        ["Inv_ReplayPayloadMismatch"]
    );
    // The guide's runbook: DEL casf:req:<id> lets the id be decided afresh.
    let deleted: i64 = redis.del(&key).await.unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(app.decide(&changed).await["decision"], "ALLOW");
    let actions: Vec<String> = app
        .audit_rows()
        .await
        .into_iter()
        .map(|r| r.action)
        .collect();
    assert_eq!(
        actions,
        [
            "cliniccloud.cancel_appointment",
            "REPLAY_DETECTED",
            "cliniccloud.cancel_appointment"
        ]
    );
}

#[tokio::test]
async fn a_claim_in_progress_elsewhere_is_concurrent_and_a_new_payload_a_mismatch() {
    let app = spawn_app_on_services(&[]).await;
    let other_verifier = state_like_the_app(&[]).await;
    let body = request("cliniccloud.create_appointment", "ALLOW");
    assert_eq!(
        other_verifier
            .claim(&request_id(&body), &fingerprint(&body))
            .await
            .unwrap(),
        Claim::Claimed
    );
    assert_eq!(
        violations(&app.decide(&body).await),
        ["Inv_ReplayConcurrent"]
    );
    let mut changed = body.clone();
    changed["args"] = json!({"other": true});
    assert_eq!(
        violations(&app.decide(&changed).await),
        ["Inv_ReplayPayloadMismatch"]
    );
}

#[tokio::test]
async fn abandoned_claim_expires_after_the_pending_ttl() {
    let vars = [("CASF_REPLAY_PENDING_TTL_SECONDS", "1")];
    let app = spawn_app_on_services(&vars).await;
    let redis = redis_client(&required_env("CASF_TEST_REDIS_URL")).await;
    // A verifier that claimed the id and died before deciding it.
    let crashed = state_like_the_app(&vars).await;
    let body = request("stripe.generate_invoice", "ALLOW");
    assert_eq!(
        crashed
            .claim(&request_id(&body), &fingerprint(&body))
            .await
            .unwrap(),
        Claim::Claimed
    );
    drop(crashed);
    let pttl: i64 = redis.pttl(replay_key(&body)).await.unwrap();
    assert!((1..=1000).contains(&pttl), "pending claim lives {pttl} ms");

    // Denied as concurrent while the claim lives, decided once it expired.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let decision = app.decide(&body).await;
        if decision["decision"] == "ALLOW" {
            break;
        }
        assert_eq!(
            violations(&decision),
            ["Inv_ReplayConcurrent"],
            "{decision}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned claim did not expire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Decided now, and stored for the full replay TTL.
    let ttl: i64 = redis.ttl(replay_key(&body)).await.unwrap();
    assert!(ttl > 1, "TTL after the decision is {ttl}");
}

/// Fail-closed counters and OPA error counters from one `/metrics` page.
async fn counters(app: &TestApp) -> impl Fn(&str) -> f64 {
    let (_, text) = app.get("/metrics").await;
    move |series: &str| metric_value(&text, series)
}

const FAIL_CLOSED_REDIS: &str = "casf_fail_closed_total{trigger=\"redis\"}";

#[tokio::test]
async fn redis_down_fails_writes_closed_lets_reads_through_and_recovers_without_restart() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let app = spawn_app_with(&[("REDIS_URL", url.as_str())]).await;
    let (status, body) = healthz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["redis"], "ok");
    let (_, metrics) = app.get("/metrics").await;
    assert!(
        !metrics.contains("casf_state_keys"),
        "Redis holds the keys; the in-process gauge is not exported"
    );
    let before_outage = request("cliniccloud.create_appointment", "ALLOW");
    assert_eq!(app.decide(&before_outage).await["decision"], "ALLOW");

    redis.stop();
    wait_until(RECOVERY_DEADLINE, "/healthz reports Redis down", || async {
        healthz(&app).await.0 == 503
    })
    .await;
    let (_, body) = healthz(&app).await;
    let detail = body["detail"].as_str().expect("detail");
    assert!(detail.starts_with("redis: "), "{body}");
    assert!(!body.to_string().contains(&redis.password), "{body}");

    let before = counters(&app).await;
    let mut denied = Vec::new();
    for tool in WRITE_TOOLS {
        let body = request(tool, "ALLOW");
        let decision = app.decide(&body).await;
        assert_eq!(decision["decision"], "DENY", "{tool}");
        assert_eq!(
            violations(&decision),
            ["FAIL_CLOSED", "Inv_ReplayCheckUnavailable"],
            "{tool}"
        );
        denied.push(body);
    }
    for tool in READ_TOOLS {
        let decision = app.decide(&request(tool, "ALLOW")).await;
        assert_eq!(decision["decision"], "ALLOW", "{tool}: {decision}");
    }
    let after = counters(&app).await;
    assert_eq!(
        after(FAIL_CLOSED_REDIS) - before(FAIL_CLOSED_REDIS),
        WRITE_TOOLS.len() as f64
    );

    redis.restart().await;
    wait_until(
        RECOVERY_DEADLINE,
        "/healthz recovers with Redis",
        || async { healthz(&app).await.0 == 200 },
    )
    .await;
    assert_eq!(
        app.decide(&request("cliniccloud.create_appointment", "ALLOW"))
            .await["decision"],
        "ALLOW"
    );
    // A fail-closed deny was not stored: the retry gets a real decision.
    assert_eq!(app.decide(&denied[0]).await["decision"], "ALLOW");
}

#[tokio::test]
async fn redis_down_with_anti_replay_off_fails_sms_closed_on_the_rate_limit() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let app = spawn_app_with(&[
        ("REDIS_URL", url.as_str()),
        ("ANTI_REPLAY_ENABLED", "false"),
    ])
    .await;
    assert_eq!(
        app.decide(&request("twilio.send_sms", "ALLOW")).await["decision"],
        "ALLOW"
    );
    redis.stop();
    wait_until(RECOVERY_DEADLINE, "/healthz reports Redis down", || async {
        healthz(&app).await.0 == 503
    })
    .await;

    let before = counters(&app).await;
    let decision = app.decide(&request("twilio.send_sms", "ALLOW")).await;
    assert_eq!(decision["decision"], "DENY");
    assert_eq!(violations(&decision), ["FAIL_CLOSED", "Inv_NoSmsBurst"]);
    // Other writes need no Redis when anti-replay is off.
    let decision = app
        .decide(&request("cliniccloud.create_appointment", "ALLOW"))
        .await;
    assert_eq!(decision["decision"], "ALLOW", "{decision}");
    let after = counters(&app).await;
    assert_eq!(after(FAIL_CLOSED_REDIS) - before(FAIL_CLOSED_REDIS), 1.0);
}

#[tokio::test]
async fn redis_unreachable_at_boot_starts_degraded_and_recovers() {
    let mut redis = RedisServer::on_port(free_port());
    let url = redis.url();
    let app = tokio::time::timeout(
        Duration::from_secs(15),
        spawn_app_with(&[("REDIS_URL", url.as_str())]),
    )
    .await
    .expect("startup does not wait for Redis");
    let (status, body) = healthz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"].as_str().unwrap().starts_with("redis: "),
        "{body}"
    );
    assert!(!body.to_string().contains(&redis.password), "{body}");
    assert_eq!(
        violations(&app.decide(&request("twilio.send_sms", "ALLOW")).await),
        ["FAIL_CLOSED", "Inv_ReplayCheckUnavailable"]
    );

    redis.restart().await;
    wait_until(RECOVERY_DEADLINE, "/healthz once Redis is up", || async {
        healthz(&app).await.0 == 200
    })
    .await;
    assert_eq!(
        app.decide(&request("twilio.send_sms", "ALLOW")).await["decision"],
        "ALLOW"
    );
}

#[tokio::test]
async fn a_claim_that_timed_out_but_ran_late_does_not_block_the_retry() {
    use fred::prelude::ClientLike;
    use fred::types::CustomCommand;

    let redis = RedisServer::start().await;
    let url = redis.url();
    let app = spawn_app_with(&[("REDIS_URL", url.as_str())]).await;
    let admin = redis_client(&url).await;
    let body = request("cliniccloud.create_appointment", "ALLOW");
    // Loads the claim script, so the paused claim is an EVALSHA that Redis
    // runs late (on an empty script cache it would fail with NOSCRIPT).
    let warm_up = request("cliniccloud.create_appointment", "ALLOW");
    assert_eq!(app.decide(&warm_up).await["decision"], "ALLOW");

    // Redis holds every command for 700 ms: the claim times out on our side
    // (200 ms), the write fails closed, and Redis runs the claim afterwards.
    let pause = CustomCommand::new_static("CLIENT", None::<u16>, false);
    admin
        .custom::<fred::prelude::Value, _>(pause, vec!["PAUSE", "700", "ALL"])
        .await
        .expect("CLIENT PAUSE");
    let denied = app.decide(&body).await;
    assert_eq!(
        violations(&denied),
        ["FAIL_CLOSED", "Inv_ReplayCheckUnavailable"]
    );

    // Once Redis is back, a retry gets a real decision well within the
    // 30 s pending TTL that the late claim would otherwise have held.
    let started = std::time::Instant::now();
    let retried = loop {
        let decision = app.decide(&body).await;
        if decision["decision"] == "ALLOW" || started.elapsed() > Duration::from_secs(10) {
            break decision;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(retried["decision"], "ALLOW", "{retried}");
    assert!(violations(&retried).is_empty(), "{retried}");
}

/// Median of `samples`, in milliseconds.
fn p50_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

/// `READS` reads, one after the other; their latencies.
async fn timed_reads(app: &TestApp, reads: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(reads);
    for i in 0..reads {
        let tool = READ_TOOLS[i % READ_TOOLS.len()];
        let started = std::time::Instant::now();
        let decision = app.decide(&request(tool, "ALLOW")).await;
        samples.push(started.elapsed());
        assert_eq!(decision["decision"], "ALLOW", "{tool}: {decision}");
    }
    samples
}

const STATE_DOWN: &str = "casf_state_error_total{kind=\"down\"}";
const STATE_TIMEOUT: &str = "casf_state_error_total{kind=\"timeout\"}";
const STATE_UNAVAILABLE: &str = "casf_state_error_total{kind=\"unavailable\"}";

#[tokio::test]
async fn reads_skip_a_redis_known_down_without_waiting_and_writes_fail_closed_at_once() {
    const READS: usize = 60;
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let app = spawn_app_with(&[("REDIS_URL", url.as_str())]).await;
    // This Redis runs with no persistence: a warning, not a failure.
    let (status, body) = healthz(&app).await;
    assert_eq!(status, 200, "{body}");
    let persistence = body["checks"]["redis_persistence"]
        .as_str()
        .unwrap_or_default();
    assert!(persistence.starts_with("none (warning: "), "{body}");
    let up = p50_ms(timed_reads(&app, READS).await);

    redis.stop();
    // Known down: the client has seen its connection go and is reconnecting,
    // so even a probe is not tried.
    wait_until(
        RECOVERY_DEADLINE,
        "the client knows Redis is down",
        || async {
            let (status, body) = healthz(&app).await;
            status == 503 && body.to_string().contains("not connected")
        },
    )
    .await;

    let before = counters(&app).await;
    let down = p50_ms(timed_reads(&app, READS).await);
    let mut denied = Vec::new();
    for tool in WRITE_TOOLS {
        let body = request(tool, "ALLOW");
        let decision = app.decide(&body).await;
        assert_eq!(
            violations(&decision),
            ["FAIL_CLOSED", "Inv_ReplayCheckUnavailable"],
            "{tool}"
        );
        denied.push(body);
    }
    let after = counters(&app).await;
    let delta = |series: &str| after(series) - before(series);
    // Every read and write skipped the store; none waited for a budget.
    assert_eq!(delta(STATE_DOWN), (READS + WRITE_TOOLS.len()) as f64);
    assert_eq!(delta(STATE_TIMEOUT), 0.0);
    assert_eq!(delta(STATE_UNAVAILABLE), 0.0);
    assert_eq!(delta(FAIL_CLOSED_REDIS), WRITE_TOOLS.len() as f64);
    eprintln!(
        "read p50 over {READS} sequential reads: Redis up {up:.2} ms, Redis killed {down:.2} ms"
    );

    redis.restart().await;
    wait_until(
        RECOVERY_DEADLINE,
        "/healthz recovers with Redis",
        || async { healthz(&app).await.0 == 200 },
    )
    .await;
    // The fail-closed denies were not stored: retries get real decisions.
    for body in &denied {
        let decision = app.decide(body).await;
        assert!(
            !violations(&decision).contains(&"FAIL_CLOSED"),
            "{decision}"
        );
    }
}

/// A private Redis that persists every write, and a state store on it with
/// the default pending TTL.
async fn persistent_redis() -> (RedisServer, RedisState) {
    let mut redis = RedisServer::on_port(free_port());
    redis.aof = true;
    redis.restart().await;
    let state = RedisState::connect(
        &redis.url(),
        &Default::default(),
        Duration::from_secs(3600),
        casf_verifier::state::DEFAULT_PENDING_TTL,
    )
    .await
    .expect("Redis state");
    (redis, state)
}

#[tokio::test]
async fn a_decision_redis_could_not_take_is_stored_once_it_is_back() {
    // Redis dies between a write's claim and the store of its audited
    // decision. Without the background retry the claim stays pending, and a
    // retry after the pending TTL would be decided again: a second ALLOW.
    let (mut redis, state) = persistent_redis().await;
    let id = RequestId::parse(&fresh_id()).expect("request_id");
    assert_eq!(state.claim(&id, "f").await.expect("claim"), Claim::Claimed);
    redis.stop();
    let allow = VerifyResponse::from_violations(vec![], vec![]);
    assert!(state.complete(&id, "f", &allow).await.is_err());
    redis.restart().await;
    wait_until(RECOVERY_DEADLINE, "the decision is stored", || async {
        matches!(state.claim(&id, "f").await, Ok(Claim::Cached(ref r)) if *r == allow)
    })
    .await;
}

#[tokio::test]
async fn a_claim_redis_could_not_release_is_released_once_it_is_back() {
    // The fail-closed answer's claim: left pending, every retry after
    // recovery would be `Inv_ReplayConcurrent` for the pending TTL.
    let (mut redis, state) = persistent_redis().await;
    let id = RequestId::parse(&fresh_id()).expect("request_id");
    assert_eq!(state.claim(&id, "f").await.expect("claim"), Claim::Claimed);
    redis.stop();
    assert!(state.release(&id, "f").await.is_err());
    redis.restart().await;
    wait_until(RECOVERY_DEADLINE, "the claim is released", || async {
        matches!(state.claim(&id, "f").await, Ok(Claim::Claimed))
    })
    .await;
}
