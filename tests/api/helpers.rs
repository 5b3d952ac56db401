//! `spawn_app()` and request builders shared by the API tests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Output;

use casf_verifier::config::Settings;
use casf_verifier::startup::Application;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestApp {
    pub base: String,
    /// `http://127.0.0.1:<port>` of the gRPC listener.
    pub grpc: String,
    pub client: reqwest::Client,
    pub audit_db: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// Starts the app with embedded backends and default settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Starts the app with extra environment-style settings on top of the test defaults.
pub async fn spawn_app_with(extra: &[(&str, &str)]) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let audit_db = dir.path().join("audit.db");
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut vars: HashMap<String, String> = HashMap::from([
        ("CASF_HTTP_ADDR".into(), "127.0.0.1:0".into()),
        ("CASF_GRPC_ADDR".into(), "127.0.0.1:0".into()),
        ("CASF_AUDIT_SQLITE".into(), audit_db.display().to_string()),
        ("CASF_POLICY_DIR".into(), policies.display().to_string()),
    ]);
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let settings = Settings::from_lookup(|k| vars.get(k).cloned()).expect("test settings");
    let app = Application::build(&settings).await.expect("app builds");
    let addr = app.http_addr().expect("bound address");
    let grpc = app.grpc_addr().expect("bound gRPC address");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        base: format!("http://{addr}"),
        grpc: format!("http://{grpc}"),
        client: casf_verifier::tls::http_client_builder()
            .build()
            .expect("HTTP client"),
        audit_db,
        stop: Some(stop),
        server: Some(server),
        _dir: dir,
    }
}

impl TestApp {
    pub async fn post_raw(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(format!("{}/verify", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST /verify")
    }

    /// POSTs a decision request and returns the status and JSON body.
    pub async fn verify(&self, body: &Value) -> (u16, Value) {
        let response = self.post_raw(body.to_string()).await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// POSTs a request that must be decided (HTTP 200) and returns the decision.
    pub async fn decide(&self, body: &Value) -> Value {
        let (status, decision) = self.verify(body).await;
        assert_eq!(status, 200, "not decided: {decision}");
        decision
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET");
        (
            response.status().as_u16(),
            response.text().await.expect("body"),
        )
    }

    /// Current value of one exposition line, e.g. `casf_verify_total`.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        metric_value(&text, series)
    }

    /// Stops serving and waits until the audit queue is flushed.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server ran");
        }
    }

    /// Runs the real binary's `audit` subcommand against this app's database.
    pub fn audit_cli(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
            .arg("audit")
            .args(args)
            .env_clear()
            .env("CASF_AUDIT_SQLITE", &self.audit_db)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run casf-verifier audit")
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .trim()
        .parse()
        .expect("numeric sample")
}

/// The violation codes of a decision, for comparison with string slices.
pub fn violations(decision: &Value) -> Vec<&str> {
    decision["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .map(|v| v.as_str().expect("code"))
        .collect()
}

/// A unique request id per call, so tests never collide on anti-replay.
pub fn fresh_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A well-formed request for `tool` in `mode` by a nurse of tenant t-1.
pub fn request(tool: &str, mode: &str) -> Value {
    json!({
        "request_id": fresh_id(),
        "tool": tool,
        "mode": mode,
        "role": "nurse",
        "subject": {"patient_id": format!("p-{}", fresh_id())},
        "args": {"note": "héllo", "n": 3},
        "context": {"tenant_id": "t-1"}
    })
}

pub const WRITE_TOOLS: [&str; 4] = [
    "cliniccloud.create_appointment",
    "cliniccloud.cancel_appointment",
    "twilio.send_sms",
    "stripe.generate_invoice",
];
pub const READ_TOOLS: [&str; 2] = [
    "cliniccloud.list_appointments",
    "cliniccloud.summary_history",
];

/// One audit row as stored.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: i64,
    pub request_id: String,
    pub event_id: String,
    pub ts: String,
    pub actor: String,
    pub action: String,
    pub decision: String,
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
}

impl TestApp {
    /// Opens the app's audit database directly, as an operator's tool would.
    pub async fn audit_db(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&format!("sqlite://{}", self.audit_db.display()))
            .await
            .expect("open audit db")
    }

    pub async fn audit_rows(&self) -> Vec<AuditRow> {
        use sqlx::Row;
        let pool = self.audit_db().await;
        let rows = sqlx::query("SELECT * FROM audit_events ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("select");
        pool.close().await;
        rows.iter()
            .map(|r| AuditRow {
                id: r.get("id"),
                request_id: r.get("request_id"),
                event_id: r.get("event_id"),
                ts: r.get("ts"),
                actor: r.get("actor"),
                action: r.get("action"),
                decision: r.get("decision"),
                payload: r.get("payload"),
                prev_hash: r.get("prev_hash"),
                hash: r.get("hash"),
            })
            .collect()
    }
}
