//! Changing policy safely: hot reload of the policy directory and route map,
//! the policy hash in every audit row, shadow decisions and the candidate
//! policy, through real sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{TestApp, metric_value, request, spawn_app_with};
use crate::servers::{free_port, wait_until};

const RELOAD_DEADLINE: Duration = Duration::from_secs(15);

/// A policy directory and route map of the test's own, copied from the
/// shipped ones.
struct PolicyFiles {
    _dir: tempfile::TempDir,
    policies: PathBuf,
    routes: PathBuf,
}

impl PolicyFiles {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        for name in ["casf.rego", "casf_test.rego"] {
            std::fs::copy(root.join("policies").join(name), policies.join(name)).unwrap();
        }
        let routes = dir.path().join("routes.yaml");
        std::fs::copy(root.join("envoy/routes.yaml"), &routes).unwrap();
        PolicyFiles {
            _dir: dir,
            policies,
            routes,
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CASF_POLICY_DIR", self.policies.display().to_string()),
            ("CASF_ROUTES", self.routes.display().to_string()),
        ]
    }

    /// Replaces a file whole (write aside, then rename), as operators should.
    fn put(&self, path: &Path, text: &str) {
        let aside = path.with_extension("tmp-new");
        std::fs::write(&aside, text).unwrap();
        std::fs::rename(&aside, path).unwrap();
    }

    fn put_policy(&self, name: &str, text: &str) {
        self.put(&self.policies.join(name), text);
    }

    /// The documented formula, computed independently of the verifier.
    fn expected_hash(&self) -> String {
        let mut names: Vec<String> = std::fs::read_dir(&self.policies)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".rego"))
            .collect();
        names.sort();
        let mut hasher = Sha256::new();
        for name in names {
            let bytes = std::fs::read(self.policies.join(&name)).unwrap();
            hasher.update(format!("policy {name}\n{}\n", bytes.len()));
            hasher.update(&bytes);
        }
        let routes = std::fs::read(&self.routes).unwrap();
        hasher.update(format!("routes {}\n", routes.len()));
        hasher.update(&routes);
        hex::encode(hasher.finalize())
    }
}

async fn spawn(files: &PolicyFiles, extra: &[(&str, &str)]) -> TestApp {
    let env = files.env();
    let mut vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    vars.extend_from_slice(extra);
    spawn_app_with(&vars).await
}

async fn metrics(app: &TestApp) -> String {
    app.get("/metrics").await.1
}

/// The hash `casf_policy_info` exports (exactly one series).
async fn live_hash(app: &TestApp) -> String {
    let text = metrics(app).await;
    let hashes: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("casf_policy_info{hash=\""))
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    assert_eq!(hashes.len(), 1, "one live hash: {hashes:?}");
    hashes[0].to_owned()
}

async fn reloads(app: &TestApp, result: &str) -> f64 {
    metric_value(
        &metrics(app).await,
        &format!("casf_policy_reload_total{{result=\"{result}\"}}"),
    )
}

fn payload(row: &crate::helpers::AuditRow) -> Value {
    serde_json::from_str(&row.payload).unwrap()
}

/// Adds a rule that denies every call of tenant `t-frozen`: an observable
/// change that keeps the shipped Rego tests passing.
const STRICTER: &str = "package casf\n\nviolations contains \"Test_TenantFrozen\" if input.context.tenant_id == \"t-frozen\"\n";

fn billing_invoice() -> Value {
    let mut body = request("stripe.generate_invoice", "ALLOW");
    body["role"] = json!("billing");
    body["context"]["tenant_id"] = json!("t-frozen");
    body
}

#[tokio::test]
async fn the_policy_hash_in_audit_rows_changes_exactly_at_the_reload() {
    let files = PolicyFiles::new();
    let app = spawn(&files, &[]).await;
    let old = files.expected_hash();
    assert_eq!(live_hash(&app).await, old, "the documented formula");
    let before = app.decide(&billing_invoice()).await;
    assert_eq!(before["decision"], "ALLOW", "{before}");

    files.put_policy("frozen.rego", STRICTER);
    let new = files.expected_hash();
    assert_ne!(new, old);
    wait_until(RELOAD_DEADLINE, "the new policy is live", || async {
        live_hash(&app).await == new
    })
    .await;
    assert_eq!(reloads(&app, "ok").await, 1.0);
    let after = app.decide(&billing_invoice()).await;
    assert_eq!(after["violations"], json!(["Test_TenantFrozen"]), "{after}");

    let rows = app.audit_rows().await;
    let hashes: Vec<String> = rows
        .iter()
        .map(|r| payload(r)["policy"]["hash"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(hashes, vec![old.clone(), new.clone()]);
    let stamp = &payload(&rows[0])["policy"];
    assert_eq!(stamp["version"], env!("CARGO_PKG_VERSION"));
    assert!(stamp["commit"].is_string(), "{stamp}");

    // `audit digest` lists both, in order of first use.
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let out = app.audit_cli(&["digest", &today]);
    assert!(out.status.success(), "{out:?}");
    let digest: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(digest["policies"][0]["hash"], json!(hashes_of(&rows)[0]));
    assert_eq!(digest["policies"][1]["hash"], json!(hashes_of(&rows)[1]));
    assert_eq!(digest["policies"][1]["first_id"], json!(rows[1].id));
    assert_eq!(digest["policies"][1]["count"], 1);
}

fn hashes_of(rows: &[crate::helpers::AuditRow]) -> Vec<String> {
    rows.iter()
        .map(|r| payload(r)["policy"]["hash"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_broken_policy_or_route_map_is_refused_and_the_old_one_keeps_deciding() {
    let files = PolicyFiles::new();
    let app = spawn(&files, &[]).await;
    let old = live_hash(&app).await;

    // Does not compile.
    files.put_policy("broken.rego", "package casf\n\nallow if {\n");
    wait_until(RELOAD_DEADLINE, "the broken policy is refused", || async {
        reloads(&app, "refused").await == 1.0
    })
    .await;
    assert_eq!(live_hash(&app).await, old);
    assert_eq!(app.decide(&billing_invoice()).await["decision"], "ALLOW");

    // Compiles, but a Rego test in the directory fails.
    std::fs::remove_file(files.policies.join("broken.rego")).unwrap();
    files.put_policy(
        "failing_test.rego",
        "package casf_failing_test\n\nimport data.casf\n\ntest_everything_is_denied if not casf.allow with input as {\"tool\": \"cliniccloud.list_appointments\", \"mode\": \"ALLOW\", \"role\": \"doctor\", \"subject\": {}, \"args\": {}, \"context\": {\"tenant_id\": \"t\"}}\n",
    );
    wait_until(RELOAD_DEADLINE, "the failing test is refused", || async {
        reloads(&app, "refused").await == 2.0
    })
    .await;
    std::fs::remove_file(files.policies.join("failing_test.rego")).unwrap();

    // A route map that does not parse.
    files.put(
        &files.routes,
        "mode: {default: ALLOW}\nroutes: [{method: get}]\n",
    );
    wait_until(
        RELOAD_DEADLINE,
        "the broken route map is refused",
        || async { reloads(&app, "refused").await == 3.0 },
    )
    .await;
    assert_eq!(live_hash(&app).await, old);
    assert_eq!(reloads(&app, "ok").await, 0.0);
    for row in app.audit_rows().await {
        assert_eq!(payload(&row)["policy"]["hash"], json!(old));
    }
    assert_eq!(app.decide(&billing_invoice()).await["decision"], "ALLOW");
}

/// Decides calls from `workers` loops while `during` runs, and `after`
/// more once it has finished (so the load always spans the change, however
/// fast the machine), never more than `cap` in all; returns each call's
/// start and latency, and how many failed.
async fn load<F: std::future::Future<Output = ()>>(
    app: &Arc<TestApp>,
    workers: usize,
    after: usize,
    cap: usize,
    during: F,
) -> (Vec<(Instant, Duration)>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let stop_at = Arc::new(AtomicUsize::new(cap));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (app, next, stop_at) = (app.clone(), next.clone(), stop_at.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut failed = 0;
            while next.fetch_add(1, Ordering::SeqCst) < stop_at.load(Ordering::SeqCst) {
                let started = Instant::now();
                let (status, body) = app.verify(&billing_invoice()).await;
                seen.push((started, started.elapsed()));
                if status != 200 || !body["decision"].is_string() {
                    failed += 1;
                }
            }
            (seen, failed)
        }));
    }
    during.await;
    stop_at.fetch_min(next.load(Ordering::SeqCst) + after, Ordering::SeqCst);
    let mut latencies = Vec::new();
    let mut failed = 0;
    for task in tasks {
        let (seen, f) = task.await.unwrap();
        latencies.extend(seen);
        failed += f;
    }
    (latencies, failed)
}

#[tokio::test]
async fn a_reload_under_load_fails_no_request() {
    let files = PolicyFiles::new();
    let app = Arc::new(spawn(&files, &[]).await);
    let old = live_hash(&app).await;
    // At least 100 calls before the change and 200 after it is live.
    let (after, cap) = (200, 20_000);
    let swapped_at = Arc::new(std::sync::Mutex::new(None));
    let written_at = Arc::new(std::sync::Mutex::new(None));
    let during = {
        let (app, swapped_at, old) = (app.clone(), swapped_at.clone(), old.clone());
        let written_at = written_at.clone();
        let files = &files;
        async move {
            // Let the loop run first, then change the policy under it.
            wait_until(RELOAD_DEADLINE, "load started", || async {
                metric_value(&metrics(&app).await, "casf_verify_total") >= 100.0
            })
            .await;
            files.put_policy("frozen.rego", STRICTER);
            *written_at.lock().unwrap() = Some(Instant::now());
            wait_until(RELOAD_DEADLINE, "the new policy is live", || async {
                live_hash(&app).await != old
            })
            .await;
            *swapped_at.lock().unwrap() = Some(Instant::now());
        }
    };
    let (latencies, failed) = load(&app, 4, after, cap, during).await;
    let total = latencies.len();
    assert_eq!(failed, 0, "no request fails during the reload");
    assert!(total < cap, "the load stopped by itself after the reload");
    assert_eq!(reloads(&app, "ok").await, 1.0);

    let rows = app.audit_rows().await;
    assert_eq!(rows.len(), total, "one audit row per decision");
    let new = files.expected_hash();
    let hashes = hashes_of(&rows);
    assert!(hashes.iter().all(|h| *h == old || *h == new));
    assert_eq!(hashes.first(), Some(&old));
    assert_eq!(hashes.last(), Some(&new));
    // Every decision on the new policy denies; every one on the old allows.
    for row in &rows {
        let expected = if payload(row)["policy"]["hash"] == json!(new) {
            "DENY"
        } else {
            "ALLOW"
        };
        assert_eq!(row.decision, expected, "row {}", row.id);
    }

    // Figures for BENCHMARKS.md (no timed assertion): latencies of the
    // requests before the file changed, against those in flight between
    // the change and the moment the new hash was seen (the reload window).
    let written = written_at.lock().unwrap().unwrap();
    let swapped = swapped_at.lock().unwrap().unwrap();
    let mut before: Vec<Duration> = latencies
        .iter()
        .filter(|(start, took)| *start + *took < written)
        .map(|(_, took)| *took)
        .collect();
    before.sort();
    let p99 = before[before.len() * 99 / 100];
    let during: Vec<Duration> = latencies
        .iter()
        .filter(|(start, took)| *start + *took >= written && *start <= swapped)
        .map(|(_, took)| *took)
        .collect();
    eprintln!(
        "reload under load: {total} requests, 4 workers, 0 failed; before the change: {} requests, p99 {p99:?}, max {:?}; during the reload ({:?} from the write to the new hash seen): {} requests, max {:?}",
        before.len(),
        before.last().unwrap(),
        swapped - written,
        during.len(),
        during.iter().max().unwrap()
    );
}

#[tokio::test]
async fn global_shadow_answers_allow_with_the_real_decision_and_stores_the_real_one() {
    let files = PolicyFiles::new();
    let app = spawn(&files, &[("CASF_ENFORCE", "false")]).await;
    let text = metrics(&app).await;
    assert_eq!(
        metric_value(&text, "casf_shadow_mode{scope=\"global\"}"),
        1.0
    );
    let (status, health) = app.get("/healthz").await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&health).unwrap();
    assert!(
        health["checks"]["shadow"]
            .as_str()
            .is_some_and(|s| s.starts_with("on")),
        "{health}"
    );

    let mut denied = request("cliniccloud.summary_history", "ALLOW");
    denied["context"] = json!({});
    let response = app.post_raw(denied.to_string()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-casf-shadow-decision"],
        "DENY",
        "header"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["decision"], "ALLOW", "{body}");
    assert_eq!(body["violations"], json!([]));
    assert_eq!(body["shadow_decision"], "DENY");
    assert_eq!(
        body["shadow_violations"],
        json!(["BadRequest_MissingTenantId"])
    );

    // Audited and counted as what it really was.
    let rows = app.audit_rows().await;
    let row = rows.last().unwrap();
    assert_eq!(row.decision, "DENY");
    let stored = payload(row);
    assert_eq!(stored["shadow"], true);
    assert_eq!(stored["response"]["decision"], "DENY");
    let text = metrics(&app).await;
    assert_eq!(
        metric_value(&text, "casf_shadow_decision_total{decision=\"DENY\"}"),
        1.0
    );
    assert_eq!(
        metric_value(&text, "casf_verify_decision_total{decision=\"DENY\"}"),
        1.0
    );

    // A replay answers from the stored real decision, shadowed again.
    let replay = app.decide(&denied).await;
    assert_eq!(replay["decision"], "ALLOW", "{replay}");
    assert_eq!(replay["shadow_decision"], "DENY");
    let rows = app.audit_rows().await;
    assert_eq!(rows.last().unwrap().action, "REPLAY_DETECTED");
    assert_eq!(payload(rows.last().unwrap())["shadow"], true);

    // A real ALLOW says so too.
    let allowed = app
        .decide(&request("cliniccloud.summary_history", "ALLOW"))
        .await;
    assert_eq!(allowed["decision"], "ALLOW");
    assert_eq!(allowed["shadow_decision"], "ALLOW");
}

#[tokio::test]
async fn shadow_never_hides_a_fail_closed_deny() {
    let files = PolicyFiles::new();
    // An OPA nobody answers at: writes fail closed, reads go on rules-only.
    let opa = format!("http://127.0.0.1:{}", free_port());
    let app = spawn(
        &files,
        &[("CASF_ENFORCE", "false"), ("OPA_URL", opa.as_str())],
    )
    .await;
    let response = app
        .post_raw(request("twilio.send_sms", "ALLOW").to_string())
        .await;
    assert!(response.headers().get("x-casf-shadow-decision").is_none());
    let write: Value = response.json().await.unwrap();
    assert_eq!(write["decision"], "DENY", "{write}");
    assert_eq!(
        write["violations"],
        json!(["FAIL_CLOSED", "OPA_Unavailable"])
    );
    assert!(write.get("shadow_decision").is_none(), "{write}");
    let row = app.audit_rows().await.pop().unwrap();
    assert!(payload(&row).get("shadow").is_none());
    let read = app
        .decide(&request("cliniccloud.summary_history", "ALLOW"))
        .await;
    assert_eq!(read["decision"], "ALLOW");
}

#[tokio::test]
async fn a_route_with_enforce_false_shadows_its_tool_only_and_reloads() {
    let files = PolicyFiles::new();
    let routes = std::fs::read_to_string(&files.routes).unwrap();
    let shadowed = routes.replace(
        "tool: twilio.send_sms",
        "tool: twilio.send_sms\n    enforce: false",
    );
    assert_ne!(shadowed, routes, "the shipped map names twilio.send_sms");
    files.put(&files.routes, &shadowed);
    let app = spawn(&files, &[]).await;
    assert_eq!(
        metric_value(&metrics(&app).await, "casf_shadow_mode{scope=\"routes\"}"),
        1.0
    );
    let mut sms = request("twilio.send_sms", "KILL_SWITCH");
    sms["role"] = json!("nurse");
    let answer = app.decide(&sms).await;
    assert_eq!(answer["decision"], "ALLOW", "{answer}");
    assert_eq!(answer["shadow_decision"], "DENY");
    let other = app
        .decide(&request("stripe.generate_invoice", "KILL_SWITCH"))
        .await;
    assert_eq!(other["decision"], "DENY", "{other}");
    assert!(other.get("shadow_decision").is_none());

    // Enforcing it again is a route map reload.
    files.put(&files.routes, &routes);
    wait_until(RELOAD_DEADLINE, "the route map is reloaded", || async {
        metric_value(&metrics(&app).await, "casf_shadow_mode{scope=\"routes\"}") == 0.0
    })
    .await;
    let answer = app.decide(&request("twilio.send_sms", "KILL_SWITCH")).await;
    assert_eq!(answer["decision"], "DENY", "{answer}");
}

#[tokio::test]
async fn candidate_disagreements_are_counted_and_audited_without_deciding() {
    let files = PolicyFiles::new();
    let candidate = tempfile::tempdir().unwrap();
    let mut rego = std::fs::read_to_string(files.policies.join("casf.rego")).unwrap();
    rego.push_str("\nviolations contains \"Candidate_NoInvoices\" if input.tool == \"stripe.generate_invoice\"\n");
    std::fs::write(candidate.path().join("casf.rego"), rego).unwrap();
    let dir = candidate.path().display().to_string();
    let app = spawn(&files, &[("CASF_POLICY_CANDIDATE_DIR", dir.as_str())]).await;

    let agreed = app
        .decide(&request("cliniccloud.summary_history", "ALLOW"))
        .await;
    assert_eq!(agreed["decision"], "ALLOW");
    let differs = app.decide(&billing_invoice()).await;
    assert_eq!(
        differs["decision"], "ALLOW",
        "the candidate decides nothing"
    );

    let text = metrics(&app).await;
    assert_eq!(
        metric_value(
            &text,
            "casf_policy_disagreement_total{live=\"ALLOW\",candidate=\"DENY\"}"
        ),
        1.0
    );
    let rows = app.audit_rows().await;
    assert!(payload(&rows[0]).get("candidate").is_none());
    assert_eq!(
        payload(&rows[1])["candidate"],
        json!({"decision": "DENY", "violations": ["Candidate_NoInvoices"], "live_decision": "ALLOW"})
    );
}

#[tokio::test]
async fn sighup_reloads_the_policy_of_the_running_binary() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let files = PolicyFiles::new();
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
        .env_clear()
        .env("RUST_LOG", "info")
        .env("CASF_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("CASF_GRPC_ADDR", "127.0.0.1:0")
        .env("CASF_AUDIT_SQLITE", dir.path().join("a.db"))
        .envs(files.env())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    lines
        .by_ref()
        .map_while(Result::ok)
        .find(|line| line.contains("casf-verifier ready"))
        .expect("a ready line");
    let kill = |signal: &str| {
        assert!(
            Command::new("kill")
                .arg(signal)
                .arg(child.id().to_string())
                .status()
                .unwrap()
                .success()
        );
    };
    // Unchanged files: SIGHUP rebuilds anyway, and says so.
    kill("-HUP");
    let reloaded = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|line| line.contains("policy reloaded"));
    assert!(reloaded.is_some(), "no reload line after SIGHUP");
    let metrics = casf_verifier::tls::http_client_builder()
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{http}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_value(&metrics, "casf_policy_reload_total{result=\"ok\"}"),
        1.0
    );
    kill("-TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
