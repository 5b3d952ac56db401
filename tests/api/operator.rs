//! What operators probe: `/health`, `/healthz`, `/metrics`, and the startup
//! behaviour of the real binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::helpers::{metric_value, request, spawn_app, spawn_app_with};

#[tokio::test]
async fn health_is_always_ok() {
    let app = spawn_app().await;
    let (status, body) = app.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status": "ok"})
    );
}

#[tokio::test]
async fn healthz_lists_each_embedded_component() {
    let app = spawn_app().await;
    let (status, body) = app.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status": "ok", "checks": {"sqlite": "ok", "memory": "ok", "regorus": "ok"}})
    );
    let app = spawn_app_with(&[("CASF_DISABLE_AUDIT", "1")]).await;
    let (_, body) = app.get("/healthz").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["checks"]["audit"],
        "disabled"
    );
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly() {
    let app = spawn_app().await;
    let (_, before) = app.get("/metrics").await;

    let allow = request("cliniccloud.create_appointment", "ALLOW");
    app.decide(&allow).await; // ALLOW
    app.decide(&allow).await; // replay hit: ALLOW
    app.decide(&request("twilio.send_sms", "KILL_SWITCH")).await; // DENY
    let mut mismatch = allow.clone();
    mismatch["args"] = json!({"other": true});
    app.decide(&mismatch).await; // DENY, mismatch
    let mut rejected = request("twilio.send_sms", "ALLOW");
    rejected["tool"] = json!("nope");
    assert_eq!(app.verify(&rejected).await.0, 422); // not a decision

    let (status, after) = app.get("/metrics").await;
    assert_eq!(status, 200);
    let delta = |series: &str| metric_value(&after, series) - metric_value(&before, series);
    assert_eq!(delta("casf_verify_total"), 4.0);
    assert_eq!(delta("casf_verify_decision_total{decision=\"ALLOW\"}"), 2.0);
    assert_eq!(delta("casf_verify_decision_total{decision=\"DENY\"}"), 2.0);
    assert_eq!(
        delta("casf_verify_decision_total{decision=\"NEEDS_APPROVAL\"}"),
        0.0
    );
    assert_eq!(delta("casf_verify_duration_seconds_count"), 4.0);
    assert_eq!(
        delta("casf_verify_duration_seconds_bucket{le=\"+Inf\"}"),
        4.0
    );
    assert_eq!(delta("casf_replay_hit_total"), 1.0);
    assert_eq!(delta("casf_replay_mismatch_total"), 1.0);
    assert_eq!(
        delta("casf_door_decision_total{door=\"http\",decision=\"ALLOW\"}"),
        2.0
    );
    for trigger in ["redis", "opa", "rules"] {
        assert_eq!(
            delta(&format!("casf_fail_closed_total{{trigger=\"{trigger}\"}}")),
            0.0
        );
    }
    assert_eq!(metric_value(&after, "casf_verify_in_flight"), 0.0);
}

#[tokio::test]
async fn metrics_have_the_guide_types_and_buckets_and_no_unbounded_labels() {
    let app = spawn_app().await;
    app.decide(&request("twilio.send_sms", "ALLOW")).await;
    let (_, text) = app.get("/metrics").await;
    for line in [
        "# TYPE casf_verify_total counter",
        "# TYPE casf_verify_decision_total counter",
        "# TYPE casf_verify_duration_seconds histogram",
        "# TYPE casf_verify_in_flight gauge",
        "# TYPE casf_fail_closed_total counter",
        "# TYPE casf_opa_error_total counter",
        "# TYPE casf_replay_hit_total counter",
        "# TYPE casf_replay_mismatch_total counter",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}\n{text}");
    }
    let buckets: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("casf_verify_duration_seconds_bucket{le=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert_eq!(
        buckets,
        [
            "0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1", "2.5",
            "+Inf"
        ]
    );
    // Only closed label sets: no tenant, patient or request id ever becomes a label.
    let allowed = ["decision", "trigger", "kind", "door", "reason", "le"];
    // casf_build_info's two labels have one value per binary.
    for sample in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("casf_build_info{"))
    {
        let Some(labels) = sample
            .split_once('{')
            .map(|(_, rest)| rest.split('}').next().unwrap_or_default())
        else {
            continue;
        };
        for pair in labels.split(',') {
            let name = pair.split('=').next().unwrap_or_default();
            assert!(
                allowed.contains(&name),
                "unexpected label {name:?} in {sample:?}"
            );
        }
    }
}

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_casf-verifier"));
    command.env_clear().env("RUST_LOG", "info");
    command
}

#[test]
fn invalid_configuration_refuses_to_start_naming_the_variable() {
    let output = binary()
        .env("ANTI_REPLAY_TTL_SECONDS", "abc")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ANTI_REPLAY_TTL_SECONDS"), "{stderr}");
}

#[test]
fn startup_names_the_backends_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = binary()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CASF_HTTP_ADDR", "127.0.0.1:0")
        .env("CASF_GRPC_ADDR", "127.0.0.1:0")
        .env("CASF_AUDIT_SQLITE", dir.path().join("a.db"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let ready = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.contains("casf-verifier ready"))
        .expect("a ready line");
    assert!(ready.contains("policy=embedded regorus"), "{ready}");
    assert!(ready.contains("state=in-process memory"), "{ready}");
    assert!(ready.contains("audit=SQLite"), "{ready}");
    assert!(
        ready.contains("routes=envoy/routes.yaml (6 routes)"),
        "{ready}"
    );
    assert!(ready.contains("grpc"), "{ready}");
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let app = spawn_app().await;
    let (status, body) = app.get("/x").await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"detail": "not found: /x"})
    );
    let response = app
        .client
        .get(format!("{}/verify", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"detail": "method not allowed"})
    );
}

#[tokio::test]
async fn verify_rejections_are_counted_by_reason() {
    let app = spawn_app().await;
    let series =
        |reason: &str| format!("casf_door_rejected_total{{door=\"http\",reason=\"{reason}\"}}");
    let (_, before) = app.get("/metrics").await;
    let mut invalid = request("twilio.send_sms", "ALLOW");
    invalid["tool"] = json!("nope");
    assert_eq!(app.verify(&invalid).await.0, 422);
    let mut no_patient = request("twilio.send_sms", "ALLOW");
    no_patient["subject"] = json!({});
    assert_eq!(app.verify(&no_patient).await.0, 400);
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(70 * 1024));
    assert_eq!(app.post_raw(big).await.status(), 413);
    app.decide(&request("twilio.send_sms", "ALLOW")).await;
    let (_, after) = app.get("/metrics").await;
    let delta = |reason: &str| {
        metric_value(&after, &series(reason)) - metric_value(&before, &series(reason))
    };
    assert_eq!(delta("unprocessable"), 1.0);
    assert_eq!(delta("bad_request"), 1.0);
    assert_eq!(delta("too_large"), 1.0);
    assert_eq!(delta("unsupported_media_type"), 0.0);
}
