//! The operator's mode floor, pulled to KILL_SWITCH through
//! `CASF_MODE_FLOOR_FILE` under a bounded load: no decision that starts
//! after the verifier shows the new floor is an ALLOW, whatever mode the
//! callers ask for, and the time from the file's change to the first
//! enforced decision is measured (BENCHMARKS.md).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{fresh_id, spawn_app_with};

/// The load: this many callers, each sending writes back to back.
const CALLERS: usize = 4;
/// Bounded in time and count, loopback only.
const MAX_REQUESTS: usize = 4_000;
const MAX_TIME: Duration = Duration::from_secs(20);

struct Answer {
    sent: Instant,
    answered: Instant,
    decision: String,
    violations: Value,
}

#[tokio::test]
async fn a_kill_switch_floor_stops_every_allow_within_a_second_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let floor_file = dir.path().join("floor");
    std::fs::write(&floor_file, "ALLOW\n").unwrap();
    let app = spawn_app_with(&[("CASF_MODE_FLOOR_FILE", floor_file.to_str().unwrap())]).await;
    let app = Arc::new(app);
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let (app, answers, stop) = (app.clone(), answers.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && answers.lock().unwrap().len() < MAX_REQUESTS
                && started.elapsed() < MAX_TIME
            {
                let sent = Instant::now();
                let body = app
                    .decide(&json!({
                        "request_id": fresh_id(), "tool": "cliniccloud.create_appointment",
                        "mode": "ALLOW", "role": "receptionist",
                        "subject": {"patient_id": "pat-floor"}, "args": {"slot": "09:00"},
                        "context": {"tenant_id": "clinic-a"}}))
                    .await;
                answers.lock().unwrap().push(Answer {
                    sent,
                    answered: Instant::now(),
                    decision: body["decision"].as_str().unwrap_or_default().to_owned(),
                    violations: body["violations"].clone(),
                });
            }
        }));
    }
    // Some load under the ALLOW floor first.
    while answers.lock().unwrap().len() < 200 {
        assert!(started.elapsed() < MAX_TIME, "no load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let changed = Instant::now();
    std::fs::write(&floor_file, "KILL_SWITCH\n").unwrap();
    // The verifier shows the floor it enforces.
    while app.metric("casf_mode_floor{mode=\"KILL_SWITCH\"}").await < 1.0 {
        assert!(
            changed.elapsed() < Duration::from_secs(10),
            "the floor never moved"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let observed = Instant::now();
    // More load under the new floor, then stop.
    let after = answers.lock().unwrap().len() + 400;
    while answers.lock().unwrap().len() < after && started.elapsed() < MAX_TIME {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for caller in callers {
        caller.await.unwrap();
    }

    let answers = answers.lock().unwrap();
    let allowed_before = answers
        .iter()
        .filter(|a| a.answered < changed && a.decision == "ALLOW")
        .count();
    assert!(
        allowed_before > 100,
        "the load was allowed before the change"
    );
    let after_observed: Vec<&Answer> = answers.iter().filter(|a| a.sent > observed).collect();
    assert!(
        after_observed.len() >= 100,
        "too little load after the change"
    );
    for answer in &after_observed {
        assert_eq!(answer.decision, "DENY");
        assert_eq!(answer.violations, json!(["Mode_KillSwitch"]));
    }
    let first_enforced = answers
        .iter()
        .filter(|a| a.violations == json!(["Mode_KillSwitch"]))
        .map(|a| a.answered)
        .min()
        .expect("an enforced decision");
    let to_effect = first_enforced.saturating_duration_since(changed);
    let total = answers.len();
    eprintln!(
        "mode floor: {total} requests from {CALLERS} callers; KILL_SWITCH shown {:.0} ms and first enforced {:.0} ms after the file changed; {} answers sent after it was shown, all DENY",
        (observed - changed).as_secs_f64() * 1000.0,
        to_effect.as_secs_f64() * 1000.0,
        after_observed.len()
    );
}
