//! The backend services the integration tests talk to: the shared ones from
//! `scripts/services.sh` (found through `CASF_TEST_*`), and private Redis and
//! OPA instances that fault tests may stop and restart without disturbing
//! other tests. A private server keeps its port across restarts, so the app
//! under test reconnects to the same address, and is killed on drop.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{TestApp, spawn_app_with};

/// How long a private server may take to start listening.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A `CASF_TEST_*` variable; missing means the services were never started.
pub fn required_env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: these tests need the backend services; run ./scripts/test.sh")
    })
}

/// The app on the shared Redis and the shared OPA server, plus `extra`.
pub async fn spawn_app_on_services(extra: &[(&str, &str)]) -> TestApp {
    let redis = required_env("CASF_TEST_REDIS_URL");
    let opa = required_env("CASF_TEST_OPA_URL");
    let mut vars = vec![("REDIS_URL", redis.as_str()), ("OPA_URL", opa.as_str())];
    vars.extend_from_slice(extra);
    spawn_app_with(&vars).await
}

/// A direct client to a Redis server, to inspect what the verifier stored.
pub async fn redis_client(url: &str) -> fred::prelude::Client {
    use fred::prelude::{Builder, ClientLike, Config};
    let client = Builder::from_config(Config::from_url(url).expect("Redis URL"))
        .build()
        .expect("Redis client");
    tokio::time::timeout(Duration::from_secs(5), client.init())
        .await
        .expect("Redis answers within 5s")
        .expect("Redis connection");
    client
}

/// Polls `check` every 50 ms until it holds; fails after `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where [`free_port`] looks: below Linux's ephemeral range (32768–60999).
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port nothing listens on right now, for a server the test
/// starts on it. Not from the ephemeral range: a port from there can be
/// taken, before the server binds it, as the local port of any outgoing
/// connection the tests make. That is how a private PostgreSQL listening on
/// 127.0.0.1 and 127.0.0.2 came up on 127.0.0.2 only, and a test got
/// "connection refused" (CI, 2026-12-03).
pub fn free_port() -> u16 {
    for _ in 0..1_000 {
        let offset = (uuid::Uuid::new_v4().as_u128() % u128::from(PORTS.len() as u16)) as u16;
        let port = PORTS.start + offset;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {PORTS:?}")
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A private `redis-server` with a password, no persistence, on a fixed port.
pub struct RedisServer {
    pub port: u16,
    pub password: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `(certificate, key, client CA)`: serve TLS only, on `port`.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Persist every write to an append-only file fsync'd before the reply
    /// (`appendfsync always`), so a SIGKILL forgets nothing it answered.
    pub aof: bool,
}

impl RedisServer {
    /// Starts a server and waits until it answers.
    pub async fn start() -> Self {
        let mut server = RedisServer::on_port(free_port());
        server.restart().await;
        server
    }

    /// A server that speaks TLS only (no plaintext port), requiring a
    /// client certificate signed by `client_ca`.
    pub async fn start_tls(cert: PathBuf, key: PathBuf, client_ca: PathBuf) -> Self {
        let mut server = RedisServer::on_port(free_port());
        server.tls = Some((cert, key, client_ca));
        server.restart().await;
        server
    }

    /// A server for `port` that is not running yet (see [`RedisServer::restart`]).
    pub fn on_port(port: u16) -> Self {
        RedisServer {
            port,
            password: format!("pw-{}", uuid::Uuid::new_v4().simple()),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
            tls: None,
            aof: false,
        }
    }

    /// `redis://:<password>@127.0.0.1:<port>/0` (`rediss://` with TLS)
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://:{}@127.0.0.1:{}/0", self.password, self.port)
    }

    /// Kills the server (as a crash would); the port stays ours to reuse.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts (again) on the same port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let mut command = Command::new(required_env("CASF_TEST_REDIS_SERVER"));
        command.args(["--bind", "127.0.0.1"]);
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((cert, key, ca)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "yes"]),
        };
        let child = command
            .args(["--requirepass", &self.password])
            .args(["--save", ""])
            .args(if self.aof {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let port = self.port;
        if self.tls.is_some() {
            wait_until(START_DEADLINE, "private Redis listens", || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            })
            .await;
            return;
        }
        wait_until(START_DEADLINE, "private Redis answers PING", || {
            redis_answers(port)
        })
        .await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True once the server replies to PING at all (NOAUTH counts: it is serving).
async fn redis_answers(port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read(&mut reply)).await,
        Ok(Ok(1)) if reply[0] == b'+' || reply[0] == b'-'
    )
}

/// A private `tests/support/opa_server.py` (the real OPA engine) on a fixed port.
pub struct OpaServer {
    pub port: u16,
    child: Option<Child>,
    client: reqwest::Client,
    /// Its stderr: tracebacks of requests the app gave up on are expected noise.
    log: tempfile::NamedTempFile,
    /// `(certificate, key, client CA)`: serve HTTPS, requiring a client
    /// certificate when a client CA is given.
    tls: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
}

impl OpaServer {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// The server over HTTPS with this certificate and key, requiring a
    /// client certificate signed by `client_ca` if given.
    pub async fn start_tls(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> Self {
        Self::start_with(Some((cert, key, client_ca))).await
    }

    async fn start_with(tls: Option<(PathBuf, PathBuf, Option<PathBuf>)>) -> Self {
        let mut server = OpaServer {
            port: free_port(),
            child: None,
            client: casf_verifier::tls::http_client_builder()
                .build()
                .expect("HTTP client"),
            log: tempfile::NamedTempFile::new().expect("log file"),
            tls,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts (again) on the same port and waits for its `LISTENING` line.
    pub async fn restart(&mut self) {
        self.stop();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut command = Command::new(required_env("CASF_TEST_PYTHON"));
        command
            .arg(root.join("tests/support/opa_server.py"))
            .arg("--policies")
            .arg(root.join("policies"))
            .args(["--addr", &format!("127.0.0.1:{}", self.port)]);
        if let Some((cert, key, client_ca)) = &self.tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
            if let Some(ca) = client_ca {
                command.arg("--tls-client-ca").arg(ca);
            }
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(self.log.reopen().expect("log file"))
            .spawn()
            .expect("spawn opa_server.py");
        let stdout = child.stdout.take().expect("piped stdout");
        self.child = Some(child);
        let first_line = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout).lines().next().and_then(Result::ok)
        });
        let line = tokio::time::timeout(START_DEADLINE, first_line)
            .await
            .expect("opa_server.py prints LISTENING in time")
            .expect("reader task");
        assert_eq!(
            line.as_deref(),
            Some(format!("LISTENING {}", self.port).as_str()),
            "opa_server.py did not start:\n{}",
            std::fs::read_to_string(self.log.path()).unwrap_or_default()
        );
    }

    /// Sets the fault mode: `ok`, `status500`, `nonjson` or `slow`.
    pub async fn fault(&self, mode: &str, delay_ms: u64) {
        let response = self
            .client
            .post(format!("{}/__fault", self.url()))
            .json(&json!({"mode": mode, "delay_ms": delay_ms}))
            .send()
            .await
            .expect("POST /__fault");
        assert_eq!(response.status(), 200, "fault {mode} not accepted");
    }
}

impl Drop for OpaServer {
    fn drop(&mut self) {
        self.stop();
    }
}
