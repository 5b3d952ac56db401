//! TLS on the doors over real sockets, with certificates made here by the
//! `openssl` CLI: `/verify` over HTTPS, client certificates required by
//! `CASF_TLS_CLIENT_CA` (and their SANs reaching the request as a
//! `PeerIdentity`), certificate rotation under a request loop, the expiry
//! metric, and the startup rules of the gRPC door's bind address.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use casf_verifier::config::{ClientTls, DoorTlsFiles, Settings};
use casf_verifier::connections::{ConnectionLimits, serve_http};
use casf_verifier::door_tls::{DoorTls, RELOAD_INTERVAL};
use casf_verifier::metrics::Metrics;
use casf_verifier::peer::PeerIdentity;
use rustls::pki_types::ServerName;

use crate::helpers::{TestApp, metric_value, request, spawn_app_with};
use crate::pki::TestPki;

const SCHEDULER: &str = "spiffe://clinic/ns/agents/sa/scheduler";

fn pki() -> TestPki {
    let pki = TestPki::new();
    pki.issue(
        "scheduler",
        &format!(
            "subjectAltName=URI:{SCHEDULER},DNS:scheduler.agents\nextendedKeyUsage=clientAuth\n"
        ),
        "ca",
    );
    // A client certificate from a CA the verifier does not trust.
    pki.issue(
        "stranger",
        "subjectAltName=URI:spiffe://elsewhere/x\nextendedKeyUsage=clientAuth\n",
        "wrong-ca",
    );
    pki
}

/// An HTTPS client trusting the test CA, presenting `client` (a name in the
/// PKI) if given. `fresh`: a new connection, so a new handshake, per request.
fn client(pki: &TestPki, client: Option<&str>, fresh: bool) -> reqwest::Client {
    let tls = ClientTls {
        ca: Some(pki.path("ca.pem")),
        cert: client.map(|c| pki.path(&format!("{c}.pem"))),
        key: client.map(|c| pki.path(&format!("{c}.key"))),
    };
    let config = casf_verifier::tls::client_config("test", &tls).expect("client TLS");
    let mut builder = casf_verifier::tls::http_client_builder()
        .use_preconfigured_tls(config)
        .timeout(Duration::from_secs(10));
    if fresh {
        builder = builder.pool_max_idle_per_host(0);
    }
    builder.build().expect("HTTPS client")
}

fn https(app: &TestApp) -> String {
    app.base.replacen("http://", "https://", 1)
}

fn door_tls_vars<'a>(pki: &'a TestPki, cert: &'a str, key: &'a str) -> Vec<(&'static str, String)> {
    vec![
        ("CASF_TLS_CERT", cert.to_owned()),
        ("CASF_TLS_KEY", key.to_owned()),
        ("CASF_TLS_CLIENT_CA", pki.shown("ca.pem")),
    ]
}

async fn spawn(vars: &[(&'static str, String)]) -> TestApp {
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    spawn_app_with(&pairs).await
}

async fn decide(client: &reqwest::Client, base: &str) -> Result<serde_json::Value, String> {
    let response = client
        .post(format!("{base}/verify"))
        .header("content-type", "application/json")
        .body(request("cliniccloud.list_appointments", "ALLOW").to_string())
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    response.json().await.map_err(|e| e.to_string())
}

async fn metrics(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

#[tokio::test]
async fn verify_over_https_requires_a_client_certificate_from_the_client_ca() {
    let pki = pki();
    let mut app = spawn(&door_tls_vars(
        &pki,
        &pki.shown("server.pem"),
        &pki.shown("server.key"),
    ))
    .await;
    let base = https(&app);
    let with_cert = client(&pki, Some("scheduler"), false);
    let decision = decide(&with_cert, &base).await.expect("decided over mTLS");
    assert_eq!(decision["decision"], "ALLOW", "{decision}");
    let failed = |text: &str| metric_value(text, "casf_tls_handshake_failed_total{door=\"http\"}");
    let before = failed(&metrics(&with_cert, &base).await);

    // No certificate, or one from a CA the verifier does not trust: no
    // handshake, so no answer at all.
    for (who, c) in [
        ("no certificate", client(&pki, None, false)),
        (
            "an untrusted CA's certificate",
            client(&pki, Some("stranger"), false),
        ),
    ] {
        let error = decide(&c, &base).await.expect_err(who);
        assert!(!error.starts_with("status"), "{who}: {error}");
    }
    // Plaintext to the HTTPS door gets no answer either.
    assert!(
        app.client
            .get(format!("{}/health", app.base))
            .send()
            .await
            .is_err()
    );
    let after = failed(&metrics(&with_cert, &base).await);
    assert!(
        after >= before + 3.0,
        "handshake failures {before} -> {after}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn the_client_certificate_sans_reach_the_request_as_its_peer_identity() {
    use axum::routing::get;
    let pki = pki();
    let files = DoorTlsFiles {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.pem")),
    };
    let tls = DoorTls::load(files, Arc::new(Metrics::new())).expect("door TLS");
    // A router that answers with what the connection layer handed it.
    let app = axum::Router::new().route(
        "/peer",
        get(
            |axum::Extension(peer): axum::Extension<PeerIdentity>| async move {
                axum::Json(serde_json::json!({
                    "sans": peer.sans,
                    "loopback": peer.is_loopback(),
                    "certified": peer.is_certified(),
                }))
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_http(
        listener,
        app,
        ConnectionLimits::default(),
        Some(tls),
        async {
            let _ = stopped.await;
        },
    ));
    let peer: serde_json::Value = client(&pki, Some("scheduler"), false)
        .get(format!("https://localhost:{port}/peer"))
        .send()
        .await
        .expect("GET /peer over mTLS")
        .json()
        .await
        .unwrap();
    assert_eq!(
        peer,
        serde_json::json!({"sans": [SCHEDULER, "scheduler.agents"], "loopback": true, "certified": true})
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// The leaf certificate a fresh handshake with `port` is served.
async fn served_certificate(pki: &TestPki, port: u16) -> Vec<u8> {
    let tls = ClientTls {
        ca: Some(pki.path("ca.pem")),
        cert: Some(pki.path("scheduler.pem")),
        key: Some(pki.path("scheduler.key")),
    };
    let config = casf_verifier::tls::client_config("test", &tls).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn rotated_files_are_served_within_the_interval_without_a_failed_request() {
    let pki = pki();
    pki.issue_for_days("rotated", crate::pki::SERVER_EXT, "ca", 30);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(pki.path("server.pem"), &cert).unwrap();
    std::fs::copy(pki.path("server.key"), &key).unwrap();
    let mut app = spawn(&door_tls_vars(
        &pki,
        &cert.display().to_string(),
        &key.display().to_string(),
    ))
    .await;
    let base = https(&app);
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(served_certificate(&pki, port).await, pki.der("server.pem"));
    let expiry = |text: &str, cert: &str| {
        metric_value(
            text,
            &format!("casf_tls_cert_expiry_timestamp_seconds{{cert=\"{cert}\"}}"),
        ) as i64
    };
    let kept = client(&pki, Some("scheduler"), false);
    let text = metrics(&kept, &base).await;
    assert_eq!(expiry(&text, "server"), pki.not_after("server.pem"));
    assert_eq!(expiry(&text, "client_ca"), pki.not_after("ca.pem"));

    // Two request loops through the rotation: one on a kept-alive
    // connection, one with a new handshake per request.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let loops: Vec<_> = [false, true]
        .into_iter()
        .map(|fresh| {
            let c = client(&pki, Some("scheduler"), fresh);
            let (base, stop, done, failures) =
                (base.clone(), stop.clone(), done.clone(), failures.clone());
            tokio::spawn(async move {
                // Bounded: stops when told, or after 2000 requests.
                for _ in 0..2000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match decide(&c, &base).await {
                        Ok(_) => done.fetch_add(1, Ordering::SeqCst),
                        Err(error) => {
                            eprintln!("request failed during rotation: {error}");
                            failures.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            })
        })
        .collect();

    // The rotation as cert-manager does it: new files moved into place.
    let (new_cert, new_key) = (dir.path().join("new.crt"), dir.path().join("new.key"));
    std::fs::copy(pki.path("rotated.pem"), &new_cert).unwrap();
    std::fs::copy(pki.path("rotated.key"), &new_key).unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    std::fs::rename(&new_cert, &cert).unwrap();
    let rotated = Instant::now();
    let deadline = RELOAD_INTERVAL * 5;
    loop {
        if served_certificate(&pki, port).await == pki.der("rotated.pem") {
            break;
        }
        assert!(
            rotated.elapsed() < deadline,
            "still the old certificate after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let switched_in = rotated.elapsed();
    let text = metrics(&kept, &base).await;
    assert_eq!(expiry(&text, "server"), pki.not_after("rotated.pem"));
    assert_eq!(
        metric_value(&text, "casf_tls_reload_total{result=\"ok\"}"),
        1.0
    );

    // A broken pair (the old key with the new certificate) is refused, and
    // the rotated certificate stays in use. (The rotation itself may have
    // been refused once, between the two renames: count from here.)
    let refused = |text: &str| metric_value(text, "casf_tls_reload_total{result=\"refused\"}");
    let refused_before = refused(&text);
    std::fs::copy(pki.path("server.key"), &key).unwrap();
    let refused_at = Instant::now();
    loop {
        let text = metrics(&kept, &base).await;
        if refused(&text) > refused_before {
            break;
        }
        assert!(
            refused_at.elapsed() < deadline,
            "the broken pair was not looked at"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served_certificate(&pki, port).await, pki.der("rotated.pem"));

    stop.store(true, Ordering::SeqCst);
    for handle in loops {
        handle.await.unwrap();
    }
    eprintln!(
        "rotation: switched in {switched_in:?}; {} requests, {} failed",
        done.load(Ordering::SeqCst),
        failures.load(Ordering::SeqCst)
    );
    assert!(done.load(Ordering::SeqCst) > 0);
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "requests failed during the rotation"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn door_tls_files_that_do_not_load_refuse_to_start_naming_the_variable() {
    let pki = pki();
    // The key of another certificate.
    let vars = door_tls_vars(&pki, &pki.shown("server.pem"), &pki.shown("client.key"));
    let settings = Settings::from_lookup(|k| {
        vars.iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.clone())
            .or_else(|| (k == "CASF_DISABLE_AUDIT").then(|| "1".to_owned()))
            .or_else(|| k.ends_with("_ADDR").then(|| "127.0.0.1:0".to_owned()))
    })
    .unwrap();
    let Err(error) = casf_verifier::startup::Application::build(&settings).await else {
        panic!("started with a key that does not match the certificate")
    };
    let error = error.to_string();
    assert!(error.contains("CASF_TLS_KEY"), "{error}");
    let key_pem = std::fs::read_to_string(pki.path("client.key")).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap();
    assert!(
        !error.contains(key_body),
        "the key leaked into the error: {error}"
    );
}

#[tokio::test]
async fn a_non_loopback_grpc_door_needs_mtls_or_an_accepted_risk() {
    let lookup = |vars: &'static [(&'static str, &'static str)]| {
        Settings::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    };
    let error = lookup(&[("CASF_GRPC_ADDR", "0.0.0.0:0")]).unwrap_err();
    assert_eq!(error.var, "CASF_GRPC_ADDR");
    let mut app = spawn_app_with(&[
        ("CASF_GRPC_ADDR", "0.0.0.0:0"),
        ("CASF_GRPC_INSECURE_PEERS", "true"),
    ])
    .await;
    assert_eq!(app.metric("casf_grpc_insecure_peers").await, 1.0);
    app.shutdown().await;
    let mut app = spawn_app_with(&[]).await;
    assert_eq!(app.metric("casf_grpc_insecure_peers").await, 0.0);
    app.shutdown().await;
}

/// `/verify` over HTTPS with mTLS and `CASF_CALLERS`: the client
/// certificate's SAN is the caller (`peer:`), an API key is a caller too, a
/// call with neither is 401, and the grants bound what each may claim.
#[tokio::test]
async fn over_mtls_the_client_certificate_or_an_api_key_is_the_caller() {
    use sha2::Digest;
    let pki = pki();
    let key = "desk-key-over-tls";
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers.yaml");
    std::fs::write(
        &callers,
        format!(
            "callers:
  - name: scheduler-by-cert
    peer: {SCHEDULER}
    roles: [receptionist]
    tenants: [clinic-a]
  - name: desk-by-key
    api_key_sha256: {}
    roles: [nurse]
    tenants: [clinic-a]
",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        ),
    )
    .unwrap();
    let mut vars = door_tls_vars(&pki, &pki.shown("server.pem"), &pki.shown("server.key"));
    vars.push(("CASF_CALLERS", callers.to_str().unwrap().to_owned()));
    let app = spawn(&vars).await;
    let base = https(&app);
    let scheduler = client(&pki, Some("scheduler"), false);
    let booking = |role: &str| {
        serde_json::json!({
            "request_id": crate::helpers::fresh_id(), "tool": "cliniccloud.create_appointment",
            "mode": "ALLOW", "role": role, "subject": {"patient_id": "pat-1"},
            "args": {"slot": "09:00"}, "context": {"tenant_id": "clinic-a"}
        })
    };
    let post = |body: serde_json::Value, bearer: Option<&str>| {
        let mut request = scheduler
            .post(format!("{base}/verify"))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        request.send()
    };

    // The certificate alone names the scheduler: inside its grants, ALLOW.
    let allowed: serde_json::Value = post(booking("receptionist"), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(allowed["decision"], "ALLOW", "{allowed}");
    // Claiming a role it was not granted: an audited DENY.
    let denied: serde_json::Value = post(booking("doctor"), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(denied["decision"], "DENY", "{denied}");
    assert!(
        denied["violations"]
            .as_array()
            .unwrap()
            .contains(&"Caller_RoleNotGranted".into()),
        "{denied}"
    );

    // A key over the same mTLS connection names its own caller.
    let by_key: serde_json::Value = post(booking("nurse"), Some(key))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(by_key["decision"].is_string(), "{by_key}");
    // A wrong key is 401, not a decision.
    let wrong = post(booking("receptionist"), Some("not-a-configured-key"))
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // A certificate from the client CA whose SAN names no caller: 401.
    pki.issue(
        "nobody",
        "subjectAltName=URI:spiffe://clinic/ns/agents/sa/nobody\nextendedKeyUsage=clientAuth\n",
        "ca",
    );
    let nobody = client(&pki, Some("nobody"), true)
        .post(format!("{base}/verify"))
        .header("content-type", "application/json")
        .body(booking("receptionist").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(nobody.status(), 401);

    let callers: Vec<String> = app
        .audit_rows()
        .await
        .iter()
        .map(|row| {
            let payload: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
            payload["caller"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(
        callers,
        ["scheduler-by-cert", "scheduler-by-cert", "desk-by-key"],
        "three decisions, each naming its caller; the 401s are not decisions"
    );
}

/// `casf-verifier healthcheck [--grpc]` as the image's HEALTHCHECK runs it:
/// the binary, with the server's own TLS variables, against `app`.
fn healthcheck(
    app: &TestApp,
    pki: &TestPki,
    cert: &str,
    key: &str,
    grpc: bool,
) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_casf-verifier"));
    command.arg("healthcheck");
    if grpc {
        command.arg("--grpc");
    }
    command
        .env_clear()
        .env("CASF_HTTP_ADDR", app.base.trim_start_matches("http://"))
        .env("CASF_GRPC_ADDR", app.grpc.trim_start_matches("http://"))
        .env("CASF_TLS_CERT", pki.path(cert))
        .env("CASF_TLS_KEY", pki.path(key))
        .env("CASF_TLS_CLIENT_CA", pki.path("ca.pem"))
        .output()
        .expect("run casf-verifier healthcheck")
}

// Multi-threaded: the probe runs as a blocking child process while the
// server it probes runs on this test's runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_probes_both_tls_doors_with_the_servers_own_certificate() {
    let pki = pki();
    // A server certificate the client CA also signs for client
    // authentication, as SPIFFE SVIDs and cert-manager's defaults are.
    pki.issue(
        "dual",
        "subjectAltName=DNS:casf-verifier.casf.svc\nextendedKeyUsage=serverAuth,clientAuth\n",
        "ca",
    );
    let mut app = spawn(&door_tls_vars(
        &pki,
        &pki.shown("dual.pem"),
        &pki.shown("dual.key"),
    ))
    .await;
    // The certificate names the Service, not 127.0.0.1: pinning, not name
    // checking, is what lets the probe in.
    for grpc in [false, true] {
        let out = healthcheck(&app, &pki, "dual.pem", "dual.key", grpc);
        assert!(out.status.success(), "grpc={grpc}: {out:?}");
    }

    // Another certificate than the one served (an impostor on the port, or
    // a rotation not yet served) is unhealthy, and says so.
    for grpc in [false, true] {
        let out = healthcheck(&app, &pki, "impostor.pem", "impostor.key", grpc);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "grpc={grpc}: {out:?}");
        assert!(
            stderr.contains("unhealthy")
                && stderr.contains("not the one in CASF_TLS_CERT")
                && !stderr.contains("must sign"),
            "grpc={grpc}: {stderr}"
        );
    }
    // Plaintext against the TLS door: unhealthy.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
        .arg("healthcheck")
        .env_clear()
        .env("CASF_HTTP_ADDR", app.base.trim_start_matches("http://"))
        .output()
        .expect("run casf-verifier healthcheck");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    app.shutdown().await;

    // A server certificate for server authentication only cannot be the
    // probe's client certificate: the door refuses it, and the probe's
    // error points at the cause.
    let mut app = spawn(&door_tls_vars(
        &pki,
        &pki.shown("server.pem"),
        &pki.shown("server.key"),
    ))
    .await;
    for grpc in [false, true] {
        let out = healthcheck(&app, &pki, "server.pem", "server.key", grpc);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "grpc={grpc}: {out:?}");
        assert!(
            stderr.contains("CASF_TLS_CLIENT_CA must sign"),
            "grpc={grpc}: {stderr}"
        );
    }
    app.shutdown().await;
}
