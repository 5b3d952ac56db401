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
    let mut body = serde_json::from_str::<Value>(&body).unwrap();
    let checks = body["checks"].as_object_mut().unwrap();
    assert!(checks.remove("policy_hash").is_some_and(|h| h.is_string()));
    assert_eq!(
        body,
        json!({"status": "ok", "checks": {"sqlite": "ok", "memory": "ok", "regorus": "ok", "callers": {"authenticated": false, "warning": "CASF_CALLERS is unset: callers are not authenticated and may claim any role, tenant or tool"}, "shadow": "off"}})
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
    let allowed = [
        "decision",
        "trigger",
        "kind",
        "door",
        "reason",
        "le",
        "mode",
        "result",
        "scope",
        "live",
        "candidate",
        "cert",
    ];
    // casf_build_info's two labels have one value per binary, and
    // casf_policy_info's hash one series (the live policy's).
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("casf_policy_info{"))
            .count(),
        1
    );
    for sample in text.lines().filter(|l| {
        !l.starts_with('#')
            && !l.starts_with("casf_build_info{")
            && !l.starts_with("casf_policy_info{")
    }) {
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

/// The variables of the README's Configuration table.
fn readme_variables() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Configuration section");
    let vars: Vec<String> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_owned)
        .collect();
    assert!(vars.len() >= 15, "{vars:?}");
    vars
}

#[test]
fn serve_help_lists_every_variable_and_no_secret() {
    let output = binary()
        .args(["serve", "--help"])
        .env("PG_DSN", "postgres://casf:HelpS3cret@127.0.0.1/casf")
        .env("REDIS_URL", "redis://:HelpR3dis@127.0.0.1:6379/0")
        .env("OPA_URL", "http://u:HelpOp4@127.0.0.1:8181")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for var in readme_variables() {
        assert!(
            help.contains(&var),
            "{var} missing from serve --help:\n{help}"
        );
    }
    for secret in ["HelpS3cret", "HelpR3dis", "HelpOp4"] {
        assert!(!help.contains(secret), "{secret} shown:\n{help}");
    }
    assert!(help.contains("[default: 0.0.0.0:8000]"), "{help}");
}

fn check(envs: &[(&str, &std::path::Path)]) -> (Option<i32>, String, String) {
    let mut command = binary();
    command.current_dir(env!("CARGO_MANIFEST_DIR")).arg("check");
    for (var, value) in envs {
        command.env(var, value);
    }
    let output = command.output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_passes_the_shipped_configuration() {
    let (code, stdout, stderr) = check(&[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("configuration: ok"), "{stdout}");
    assert!(stdout.contains("policy: ok: policies ("), "{stdout}");
    assert!(stdout.contains("Rego tests passed"), "{stdout}");
    assert!(
        stdout.contains("routes: ok: envoy/routes.yaml (6 routes)"),
        "{stdout}"
    );
}

#[test]
fn check_refuses_broken_policy_routes_and_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("broken.rego"), "package casf\nallow if {\n").unwrap();
    let (code, _, stderr) = check(&[("CASF_POLICY_DIR", &policies)]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("broken.rego"), "{stderr}");

    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        "routes: [{method: GET, path: /x, tool: no.such_tool}]\n",
    )
    .unwrap();
    let (code, _, stderr) = check(&[("CASF_ROUTES", &routes)]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("routes.yaml"), "{stderr}");

    let (code, _, stderr) = check(&[("ANTI_REPLAY_TTL_SECONDS", std::path::Path::new("0"))]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid ANTI_REPLAY_TTL_SECONDS"),
        "{stderr}"
    );
}

#[test]
fn a_refusal_is_printed_once_with_the_absolute_path_it_tried() {
    let dir = tempfile::tempdir().unwrap();
    let output = binary()
        .current_dir(dir.path())
        .env("CASF_POLICY_DIR", "no-such-policies")
        .env("CASF_AUDIT_SQLITE", dir.path().join("a.db"))
        .env("CASF_HTTP_ADDR", "127.0.0.1:0")
        .env("CASF_GRPC_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let absolute = dir.path().canonicalize().unwrap().join("no-such-policies");
    assert_eq!(
        stderr.matches("cannot read policy directory").count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains(&absolute.display().to_string())
            || stderr.contains(&dir.path().join("no-such-policies").display().to_string()),
        "{stderr}"
    );
}

#[test]
fn json_logs_are_one_object_a_line_and_bad_formats_refuse_to_start() {
    let output = binary().env("CASF_LOG_FORMAT", "xml").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("CASF_LOG_FORMAT").count(), 1, "{stderr}");

    let (mut child, logs, _dir) = serve_with_json_logs(&[]);
    let ready = logs.next_matching(|line| {
        line["message"]
            .as_str()
            .is_some_and(|m| m.contains("casf-verifier ready"))
    });
    assert_eq!(ready["level"], "INFO");
    assert!(ready["http"].as_str().is_some(), "{ready}");
    let _ = child.kill();
    let _ = child.wait();
}

/// The server binary on loopback ports with JSON logs (and `extra`
/// settings), and its log lines as JSON values.
pub(crate) fn serve_with_json_logs(
    extra: &[(&str, &str)],
) -> (std::process::Child, JsonLines, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = binary()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CASF_LOG_FORMAT", "json")
        .env("CASF_HTTP_ADDR", "127.0.0.1:0")
        .env("CASF_GRPC_ADDR", "127.0.0.1:0")
        .env("CASF_AUDIT_SQLITE", dir.path().join("a.db"))
        .envs(extra.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<Value>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(serde_json::from_str(&line).expect("a JSON log line"));
        }
    });
    (child, JsonLines(lines_rx), dir)
}

pub(crate) struct JsonLines(std::sync::mpsc::Receiver<Value>);

impl JsonLines {
    /// The next line that `pred` accepts, within 30 s.
    pub(crate) fn next_matching(&self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let line = self
                .0
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("the expected log line");
            if pred(&line) {
                return line;
            }
        }
    }
}

/// With `CASF_DECISION_LOG=true`, each decision is one log line that names
/// its request (through the decision's span) and carries no patient data.
#[tokio::test]
async fn the_decision_log_has_one_line_per_decision_without_patient_data() {
    let (mut child, logs, _dir) = serve_with_json_logs(&[("CASF_DECISION_LOG", "true")]);
    let ready = logs.next_matching(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("casf-verifier ready"))
    });
    let http = ready["http"].as_str().unwrap().to_owned();

    let request_id = format!("decision-log-{}", uuid::Uuid::new_v4());
    let response = casf_verifier::tls::http_client_builder()
        .build()
        .unwrap()
        .post(format!("http://{http}/verify"))
        .json(&json!({
            "request_id": request_id, "tool": "twilio.send_sms", "mode": "ALLOW",
            "role": "nurse", "subject": {"patient_id": "pat-secret-9"},
            "args": {"text": "private-reminder-text"}, "context": {"tenant_id": "clinic-a"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let line = logs.next_matching(|l| l["target"] == "casf_decision");
    assert_eq!(line["span"]["request_id"], request_id.as_str(), "{line}");
    assert_eq!(line["door"], "http");
    assert_eq!(line["tool"], "twilio.send_sms");
    assert_eq!(line["role"], "nurse");
    assert_eq!(line["decision"], "ALLOW");
    assert_eq!(
        line["audit_hash"].as_str().map(str::len),
        Some(64),
        "{line}"
    );
    let text = line.to_string();
    for private in ["pat-secret-9", "private-reminder-text", "clinic-a"] {
        assert!(
            !text.contains(private),
            "{private} in the decision log: {text}"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `GET /openapi.json` is the contract checked in under `docs/`, which
/// `scripts/check_openapi.sh` validates and tests the live server against.
#[tokio::test]
async fn the_served_openapi_document_is_the_checked_in_one() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served: Value = response.json().await.unwrap();
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap();
    let checked_in: Value = serde_json::from_str(&file).unwrap();
    assert_eq!(served, checked_in);
    // Every route the door serves is in it.
    for path in [
        "/verify",
        "/health",
        "/healthz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            served["paths"][path].is_object(),
            "{path} is not documented"
        );
    }
}
