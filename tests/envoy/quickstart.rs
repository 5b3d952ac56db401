//! The README's quickstart, run as a newcomer runs it: the verifier with its
//! shipped defaults (route map included, so no header is trusted), the demo
//! tool service from `examples/`, Envoy on the shipped `envoy/envoy-dev.yaml`
//! with only its ports moved to free ones, and a token from
//! `casf-verifier dev-token`. ALLOWs and a DENY (the SMS burst limit), each
//! decided on verified JWT claims.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use reqwest::Method;
use serde_json::Value;

use crate::harness::{Envoy, Verifier, read, repo};

/// The demo tool service on a free loopback port.
struct DemoTools {
    child: Child,
    port: u16,
}

impl DemoTools {
    fn start() -> DemoTools {
        let python = std::env::var("CASF_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut child = Command::new(python)
            .arg(repo().join("examples/demo_tools.py"))
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start examples/demo_tools.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        DemoTools { child, port }
    }
}

impl Drop for DemoTools {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `envoy/envoy-dev.yaml` as shipped, but for its four ports.
fn dev_envoy_config(grpc_port: u16, tools_port: u16) -> String {
    let mut config = std::fs::read_to_string(repo().join("envoy/envoy-dev.yaml")).unwrap();
    for (shipped, here) in [(10000, 0), (9901, 0), (9191, grpc_port), (8080, tools_port)] {
        let from = format!("port_value: {shipped} }}");
        assert_eq!(
            config.matches(&from).count(),
            1,
            "envoy-dev.yaml should name port {shipped} once"
        );
        config = config.replace(&from, &format!("port_value: {here} }}"));
    }
    config
}

fn dev_token(role: &str, tenant: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
        .args(["dev-token", "--role", role, "--tenant", tenant])
        .env_clear()
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn the_quickstart_reaches_allow_and_deny_through_envoy_with_dev_tokens() {
    let shipped_routes = std::fs::read_to_string(repo().join("envoy/routes.yaml")).unwrap();
    let verifier = Verifier::start(&shipped_routes);
    let tools = DemoTools::start();
    let dir = tempfile::tempdir().unwrap();
    let access_log = dir.path().join("unused.log");
    let envoy = Envoy::run(
        &dev_envoy_config(verifier.grpc_port, tools.port),
        dir,
        access_log,
    )
    .await;
    let client = casf_verifier::tls::http_client_builder()
        .build()
        .expect("HTTP client");
    let call = |method, path: &str| client.request(method, format!("{}{path}", envoy.url));
    let receptionist = dev_token("receptionist", "clinic-a");

    // ALLOW: a receptionist books an appointment. The client's attempt to
    // pick the mode is overwritten by Envoy (the operator's ALLOW), so the
    // booking is not denied as a kill switch.
    let (status, body, _) = read(
        call(Method::POST, "/cliniccloud/patients/pat-001/appointments")
            .bearer_auth(&receptionist)
            .header("x-casf-mode", "KILL_SWITCH")
            .header("content-type", "application/json")
            .body(r#"{"slot": "2026-12-01T09:00"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["tool_service"], "demo");
    assert_eq!(echoed["casf"]["x-casf-decision"], "ALLOW");

    // DENY: the SMS burst limit. The first reminder to a patient goes out,
    // a second one within the hour is denied.
    let sms = || {
        call(Method::POST, "/twilio/patients/pat-001/sms")
            .bearer_auth(&receptionist)
            .header("content-type", "application/json")
            .body(r#"{"text": "See you tomorrow at 9"}"#)
    };
    let (status, body, _) = read(sms()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = read(sms()).await;
    assert_eq!(status, 403, "{body}");
    let denied: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(denied["decision"], "DENY");
    assert_eq!(denied["violations"], serde_json::json!(["Inv_NoSmsBurst"]));

    // Headers alone are not an identity here: the shipped route map does not
    // trust them, so a call without a token is refused, never allowed.
    let (status, body, _) = read(
        call(Method::POST, "/cliniccloud/patients/pat-001/appointments")
            .header("x-casf-role", "doctor")
            .header("x-casf-tenant-id", "clinic-a")
            .header("content-type", "application/json")
            .body(r#"{"slot": "2026-12-01T10:00"}"#),
    )
    .await;
    assert!(matches!(status, 400 | 403), "{status} {body}");

    // A token signed with another key is refused by Envoy itself.
    let mut forged = receptionist.clone().into_bytes();
    let signature_start = receptionist.rfind('.').unwrap() + 1;
    forged[signature_start] = if forged[signature_start] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let (status, _, _) = read(
        call(Method::GET, "/cliniccloud/patients/pat-001/history")
            .bearer_auth(String::from_utf8(forged).unwrap()),
    )
    .await;
    assert_eq!(status, 401);

    // The three decisions made with a token are in the trail, with the
    // identity from the token's claims, and the trail verifies.
    let rows = verifier.audit_rows().await;
    let decided: Vec<(&str, &str)> = rows
        .iter()
        .take(3)
        .map(|row| (row.0.as_str(), row.2.as_str()))
        .collect();
    assert_eq!(
        decided,
        [
            ("role:receptionist", "ALLOW"),
            ("role:receptionist", "ALLOW"),
            ("role:receptionist", "DENY")
        ],
        "{rows:?}"
    );
    assert_eq!(rows[0].3["request"]["context"]["tenant_id"], "clinic-a");
    let verify = verifier.audit_verify();
    assert!(verify.status.success(), "{verify:?}");
}
