//! PostgreSQL for the black-box tests: a fresh database per test on the
//! shared test cluster (`CASF_TEST_PG_DSN`), a private cluster that a test
//! may stop and restart (`CASF_TEST_PG_BIN`), and the real binary run as a
//! server or a command against either.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::helpers::AuditRow;
use crate::servers::{free_port, required_env};

/// The shared cluster's DSN (a `postgres://` URL whose role has CREATEDB).
pub fn shared_dsn() -> String {
    required_env("CASF_TEST_PG_DSN")
}

/// `dsn` pointing at database `name` instead.
fn with_database(dsn: &str, name: &str) -> String {
    let (base, query) = match dsn.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (dsn, String::new()),
    };
    let (server, _) = base.rsplit_once('/').expect("DSN has a /database part");
    format!("{server}/{name}{query}")
}

pub async fn connect(dsn: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(dsn)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"))
}

/// A database of its own on the shared cluster, dropped afterwards.
pub struct TestDb {
    pub name: String,
    /// `postgres://` URL of this database.
    pub dsn: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("casf_t_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&shared_dsn()).await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("CREATE DATABASE");
        admin.close().await;
        TestDb {
            dsn: with_database(&shared_dsn(), &name),
            name,
        }
    }

    /// A fresh database with the schema applied by `casf-verifier migrate`.
    pub async fn migrated() -> Self {
        let db = Self::create().await;
        let out = cli(&db.dsn, &["migrate"]);
        assert_eq!(out.status.code(), Some(0), "migrate: {out:?}");
        db
    }

    /// The same database as a libpq `key=value` DSN (the guide's form).
    pub fn key_value_dsn(&self) -> String {
        let url = shared_dsn();
        let rest = url.split_once("://").expect("URL").1;
        let (userinfo, hostpart) = rest.split_once('@').expect("user@host");
        let (user, password) = userinfo.split_once(':').expect("user:password");
        let hostport = hostpart.split('/').next().expect("host");
        let (host, port) = hostport.rsplit_once(':').expect("host:port");
        format!(
            "dbname={} user={user} password='{password}' host={host} port={port}",
            self.name
        )
    }

    pub async fn pool(&self) -> PgPool {
        connect(&self.dsn).await
    }

    pub async fn rows(&self) -> Vec<AuditRow> {
        let pool = self.pool().await;
        let rows = audit_rows(&pool).await;
        pool.close().await;
        rows
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async code: a thread with its own runtime.
        let name = self.name.clone();
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let admin = connect(&shared_dsn()).await;
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&admin)
                    .await;
                admin.close().await;
            });
        });
        let _ = done.join();
    }
}

/// Every audit row, as an independent reader sees them.
pub async fn audit_rows(pool: &PgPool) -> Vec<AuditRow> {
    sqlx::query(
        "SELECT id, request_id, event_id::text AS event_id, ts, actor, action, decision, \
         payload::text AS payload, prev_hash, hash FROM audit_events ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("select audit rows")
    .iter()
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

fn policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn routes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("envoy/routes.yaml")
}

/// The real binary with a clean environment and `PG_DSN` set.
pub fn binary(dsn: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_casf-verifier"));
    command
        .env_clear()
        .env("PG_DSN", dsn)
        .env("RUST_LOG", "warn")
        .env("CASF_POLICY_DIR", policies())
        .env("CASF_ROUTES", routes())
        // Never the fixed default ports: tests run side by side.
        .env("CASF_HTTP_ADDR", "127.0.0.1:0")
        .env("CASF_GRPC_ADDR", "127.0.0.1:0");
    command
}

/// Runs `casf-verifier <args>` against `dsn`.
pub fn cli(dsn: &str, args: &[&str]) -> Output {
    binary(dsn).args(args).output().expect("run casf-verifier")
}

/// stdout and stderr of a command, for assertions on what it printed.
pub fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `casf-verifier serve` process on a port of its own; killed on drop.
pub struct Server {
    child: Child,
    pub base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the binary and waits (bounded) for its ready line, which
    /// names the address it listens on.
    pub fn spawn(dsn: &str) -> Self {
        Self::spawn_with(dsn, &[])
    }

    /// [`Server::spawn`] with more variables set.
    pub fn spawn_with(dsn: &str, extra: &[(&str, &str)]) -> Self {
        let mut child = binary(dsn)
            .env("RUST_LOG", "info")
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn casf-verifier");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready, addr) = mpsc::channel();
        let lines = log.clone();
        // Keeps draining stderr for the life of the process, so logging
        // never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                if line.contains("casf-verifier ready")
                    && let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("http="))
                {
                    let _ = ready.send(addr.to_owned());
                }
                lines.lock().expect("log lock").push(line);
            }
        });
        let mut server = Server {
            child,
            base: String::new(),
            log,
        };
        match addr.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => server.base = format!("http://{addr}"),
            Err(_) => panic!("no ready line from casf-verifier:\n{}", server.log()),
        }
        server
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// `POST /verify` with `body`; the decision as JSON.
    pub async fn decide(&self, body: &serde_json::Value) -> serde_json::Value {
        casf_verifier::tls::http_client_builder()
            .build()
            .expect("HTTP client")
            .post(format!("{}/verify", self.base))
            .json(body)
            .send()
            .await
            .expect("POST /verify")
            .json()
            .await
            .expect("a JSON decision")
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub fn stop(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL cluster of the test's own, on a free loopback port, so the
/// test can stop and restart it without touching the shared one. It runs as
/// the `postgres` user when the tests run as root (postgres refuses root).
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    password: String,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PrivateCluster {
    /// [`PrivateCluster::start`], with the schema in place (`migrate`).
    pub fn migrated() -> Self {
        let cluster = Self::start();
        let migrate = cli(&cluster.dsn(), &["migrate"]);
        assert_eq!(migrate.status.code(), Some(0), "{}", printed(&migrate));
        cluster
    }

    pub fn start() -> Self {
        let cluster = Self::init();
        cluster.resume();
        cluster
    }

    /// A new cluster, initialised but not started.
    fn init() -> Self {
        let bin = PathBuf::from(required_env("CASF_TEST_PG_BIN"));
        let dir = tempfile::Builder::new()
            .prefix("casf-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        std::fs::write(dir.path().join("pwfile"), &password).expect("pwfile");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown to postgres failed");
        }
        let cluster = PrivateCluster {
            port: free_port(),
            dir,
            bin,
            password,
        };
        let data = cluster.data();
        let pwfile = cluster.dir.path().join("pwfile");
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-locale",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--pwfile",
                path_str(&pwfile),
            ],
        );
        cluster
    }

    /// A cluster that accepts TLS connections only: `ssl = on` with this
    /// certificate and key, and a pg_hba.conf that rejects every connection
    /// over TCP without TLS. Role `client` logs in by a client certificate
    /// signed by `client_ca` (CN=client) instead of a password. It listens on
    /// 127.0.0.1 and 127.0.0.2, so a test can reach it under a name its
    /// certificate does not carry.
    pub fn start_tls(cert: &Path, key: &Path, client_ca: &Path) -> Self {
        // Configured before its first start: no stop and restart, in which
        // its port could be taken.
        let cluster = Self::init();
        let data = cluster.data();
        std::fs::copy(cert, data.join("server.pem")).expect("copy server certificate");
        std::fs::copy(key, data.join("server.key")).expect("copy server key");
        std::fs::copy(client_ca, data.join("client-ca.pem")).expect("copy client CA");
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("postgresql.conf");
        text.push_str(
            "\nssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n\
             ssl_ca_file = 'client-ca.pem'\n",
        );
        std::fs::write(&conf, text).expect("write postgresql.conf");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all client 127.0.0.0/8 cert\n\
             hostssl all all 127.0.0.0/8 scram-sha-256\n\
             hostnossl all all 0.0.0.0/0 reject\n\
             hostnossl all all ::/0 reject\n",
        )
        .expect("write pg_hba.conf");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown to postgres failed");
        }
        // PostgreSQL refuses a key that others may read.
        let status = Command::new("chmod")
            .arg("0600")
            .arg(data.join("server.key"))
            .status()
            .expect("chmod");
        assert!(status.success(), "chmod of the server key failed");
        cluster.resume_on("127.0.0.1,127.0.0.2");
        cluster
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = command.args(args).output().expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}",
            printed(&out),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    /// Starts (or restarts) the server; returns once it accepts connections.
    pub fn resume(&self) {
        self.resume_on("127.0.0.1");
    }

    fn resume_on(&self, listen: &str) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses={listen}",
            self.port,
            path_str(self.dir.path())
        );
        let data = self.data();
        let log = self.dir.path().join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Fast shutdown: sessions are ended, as in an outage or a failover.
    pub fn halt(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "stop",
            ],
        );
    }

    /// Immediate shutdown (`pg_ctl stop -m immediate`): no checkpoint, every
    /// session cut, crash recovery on the next start, as when the host dies.
    #[allow(dead_code)] // used by the chaos test, which includes this module
    pub fn crash(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-m",
                "immediate",
                "-w",
                "-t",
                "60",
                "stop",
            ],
        );
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The guide's libpq `key=value` form.
    pub fn dsn(&self) -> String {
        format!(
            "dbname=postgres user=postgres password={} host=127.0.0.1 port={}",
            self.password, self.port
        )
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.data();
        let exe = self.bin.join("pg_ctl");
        let args = ["-D", path_str(&data), "-m", "immediate", "-w", "stop"];
        let _ = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        };
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}
