//! Proving the trail: signed checkpoints catch what a valid chain cannot
//! show (a cut tail, a consistently rewritten prefix, a replaced database),
//! on SQLite and PostgreSQL; signed digests and checkpoints verify with the
//! documented openssl command; and the Python reference verifier
//! (docs/verify_chain.py, standard library only) agrees with `audit verify`
//! on trails holding 1e16, 1.5e-7, integers beyond 2^64 and non-ASCII text.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use casf_verifier::audit::chain::link;
use casf_verifier::audit::checkpoint::Head;
use casf_verifier::audit::postgres::{PostgresAuditLog, PostgresChainReader};
use casf_verifier::audit::scan::ChainSource;
use casf_verifier::audit::sqlite::{SqliteAuditLog, SqliteChainReader};
use casf_verifier::audit::{AuditLog, NewEvent};
use casf_verifier::config::PgDsn;
use serde_json::{Value, json};

use crate::helpers::{AuditRow, request, spawn_app_with};
use crate::pg::{self, TestDb, printed};

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_casf-verifier"));
    command.env_clear().env("RUST_LOG", "warn");
    command
}

/// The payload numbers `json.dumps` gets wrong, and text it must not escape.
fn event(tag: &str, i: usize) -> NewEvent {
    let payload: Value = serde_json::from_str(&format!(
        r#"{{"request": {{"args": {{"amount": 1e16, "tiny": 1.5e-7,
            "big": 123456789012345678901234567890, "neg": -18446744073709551617,
            "name": "Zoë — 東京 😀 \u0001", "price": 12.50, "i": {i}}},
            "tool": "stripe.generate_invoice", "tag": "{tag}"}},
            "response": {{"decision": "ALLOW"}}}}"#
    ))
    .unwrap();
    NewEvent::now(
        &format!("{tag}-{i}"),
        "role:nurse".into(),
        "stripe.generate_invoice",
        "ALLOW",
        payload,
    )
}

fn events(tag: &str, range: std::ops::Range<usize>) -> Vec<NewEvent> {
    range.map(|i| event(tag, i)).collect()
}

/// One audit store under test, and how an attacker with DDL rights edits it.
enum Store {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Pg(TestDb),
}

impl Store {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        Store::Sqlite { _dir: dir, path }
    }

    async fn pg() -> Self {
        Store::Pg(TestDb::migrated().await)
    }

    async fn log(&self) -> Box<dyn AuditLog> {
        match self {
            Store::Sqlite { path, .. } => Box::new(SqliteAuditLog::open(path).await.unwrap()),
            Store::Pg(db) => Box::new(
                PostgresAuditLog::open(&PgDsn::parse(&db.dsn).unwrap())
                    .await
                    .unwrap(),
            ),
        }
    }

    async fn append(&self, events: &[NewEvent]) {
        self.log().await.append_batch(events).await.unwrap();
    }

    /// The audit commands' read-only view of this store.
    async fn reader(&self) -> Box<dyn ChainSource> {
        match self {
            Store::Sqlite { path, .. } => Box::new(SqliteChainReader::open(path).await.unwrap()),
            Store::Pg(db) => Box::new(
                PostgresChainReader::open(&PgDsn::parse(&db.dsn).unwrap())
                    .await
                    .unwrap(),
            ),
        }
    }

    /// `casf-verifier <args>` on this store.
    fn cli(&self, args: &[&str], extra: &[(&str, &Path)]) -> Output {
        let mut command = match self {
            Store::Sqlite { path, .. } => {
                let mut command = binary();
                command.env("CASF_AUDIT_SQLITE", path);
                command
            }
            Store::Pg(db) => pg::binary(&db.dsn),
        };
        for (var, value) in extra {
            command.env(var, value);
        }
        command.args(args).output().unwrap()
    }

    /// The reference verifier on this store.
    fn python(&self, args: &[&str]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/verify_chain.py");
        let mut command = Command::new("python3");
        command.arg(script);
        match self {
            Store::Sqlite { path, .. } => command.arg("--sqlite").arg(path),
            Store::Pg(db) => {
                // psql from the test cluster's binaries when they are known.
                if let Ok(bin) = std::env::var("CASF_TEST_PG_BIN") {
                    let path = std::env::var("PATH").unwrap_or_default();
                    command.env("PATH", format!("{bin}:{path}"));
                }
                command.arg("--psql").arg(&db.dsn)
            }
        };
        command.args(args).output().expect("run python3")
    }

    async fn rows(&self) -> Vec<AuditRow> {
        match self {
            Store::Sqlite { path, .. } => {
                let pool = sqlite_pool(path).await;
                let rows: Vec<AuditRow> = sqlx::query_as::<_, SqliteRow>(
                    "SELECT id, request_id, event_id, ts, actor, action, decision, payload, \
                     prev_hash, hash FROM audit_events ORDER BY id",
                )
                .fetch_all(&pool)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.0)
                .collect();
                pool.close().await;
                rows
            }
            Store::Pg(db) => db.rows().await,
        }
    }

    /// Runs `statements` with the append-only guard switched off, the way
    /// an attacker with DDL rights would. `?`/`$n` binds are not used: the
    /// values are formatted in (test data only).
    async fn tamper(&self, statements: &[String]) {
        match self {
            Store::Sqlite { path, .. } => {
                let pool = sqlite_pool(path).await;
                for drop in ["audit_events_no_update", "audit_events_no_delete"] {
                    sqlx::query(&format!("DROP TRIGGER IF EXISTS {drop}"))
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                for statement in statements {
                    sqlx::query(statement).execute(&pool).await.unwrap();
                }
                pool.close().await;
            }
            Store::Pg(db) => {
                let pool = db.pool().await;
                sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER USER")
                    .execute(&pool)
                    .await
                    .unwrap();
                for statement in statements {
                    sqlx::query(statement).execute(&pool).await.unwrap();
                }
                pool.close().await;
            }
        }
    }

    fn payload_literal(&self, text: &str) -> String {
        let quoted = format!("'{}'", text.replace('\'', "''"));
        match self {
            Store::Sqlite { .. } => quoted,
            Store::Pg(_) => format!("{quoted}::jsonb"),
        }
    }
}

struct SqliteRow(AuditRow);

impl<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> for SqliteRow {
    fn from_row(r: &'r sqlx::sqlite::SqliteRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(SqliteRow(AuditRow {
            id: r.try_get("id")?,
            request_id: r.try_get("request_id")?,
            event_id: r.try_get("event_id")?,
            ts: r.try_get("ts")?,
            actor: r.try_get("actor")?,
            action: r.try_get("action")?,
            decision: r.try_get("decision")?,
            payload: r.try_get("payload")?,
            prev_hash: r.try_get("prev_hash")?,
            hash: r.try_get("hash")?,
        }))
    }
}

async fn sqlite_pool(path: &Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

struct Keys {
    _dir: tempfile::TempDir,
    private: PathBuf,
    public: PathBuf,
    checkpoints: PathBuf,
}

fn keygen() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("audit-signing.pem");
    let public = dir.path().join("audit-signing.pub.pem");
    let out = binary()
        .args(["audit", "keygen", "--private-key"])
        .arg(&private)
        .arg("--public-key")
        .arg(&public)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let said = printed(&out);
    let secret = std::fs::read_to_string(&private).unwrap();
    let body = secret.lines().nth(1).unwrap();
    assert!(
        !said.contains(body),
        "keygen printed the private key: {said}"
    );
    Keys {
        checkpoints: dir.path().join("checkpoints.jsonl"),
        _dir: dir,
        private,
        public,
    }
}

fn checkpoint(store: &Store, keys: &Keys) {
    let out = store.cli(
        &[
            "audit",
            "checkpoint",
            "--out",
            keys.checkpoints.to_str().unwrap(),
        ],
        &[("CASF_AUDIT_SIGNING_KEY", &keys.private)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

fn verify_with_checkpoints(store: &Store, keys: &Keys) -> Output {
    store.cli(
        &[
            "audit",
            "verify",
            "--checkpoints",
            keys.checkpoints.to_str().unwrap(),
            "--public-key",
            keys.public.to_str().unwrap(),
        ],
        &[],
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lines naming a chain break or a failed checkpoint.
fn verdicts(out: &Output) -> Vec<String> {
    stdout(out)
        .lines()
        .filter(|l| l.starts_with("chain ") || l.contains(" fails: "))
        .map(str::to_owned)
        .collect()
}

/// `audit verify` and the Python verifier on the same store: the same exit
/// code and the same verdict lines, with and without checkpoints.
fn assert_agree(store: &Store, keys: &Keys) -> (i32, String) {
    let plain = store.cli(&["audit", "verify"], &[]);
    let python = store.python(&[]);
    assert_eq!(
        plain.status.code(),
        python.status.code(),
        "{}\n{}",
        printed(&plain),
        printed(&python)
    );
    assert_eq!(verdicts(&plain), verdicts(&python));

    let rust = verify_with_checkpoints(store, keys);
    let python = store.python(&[
        "--checkpoints",
        keys.checkpoints.to_str().unwrap(),
        "--public-key",
        keys.public.to_str().unwrap(),
    ]);
    assert_eq!(
        rust.status.code(),
        python.status.code(),
        "{}\n{}",
        printed(&rust),
        printed(&python)
    );
    assert_eq!(verdicts(&rust), verdicts(&python));
    (rust.status.code().unwrap(), stdout(&rust))
}

/// A trail of 10 events with checkpoints after the 6th and the 10th.
/// The chain alone still verifies: `audit verify` without checkpoints
/// exits 0, which is why the checkpoints are needed.
fn valid_without_checkpoints(store: &Store, why: &str) {
    let plain = store.cli(&["audit", "verify"], &[]);
    assert_eq!(plain.status.code(), Some(0), "{why}: {}", printed(&plain));
}

/// Both verifiers, with the checkpoints, exit 1 and say each of `says`.
fn caught(store: &Store, keys: &Keys, says: &[&str]) -> String {
    let (code, out) = assert_agree(store, keys);
    assert_eq!(code, 1, "{out}");
    for said in says {
        assert!(out.contains(said), "{said:?} not in: {out}");
    }
    out
}

async fn checkpointed(store: &Store, keys: &Keys) {
    // A new trail, a new checkpoint file.
    let _ = std::fs::remove_file(&keys.checkpoints);
    store.append(&events("a", 0..6)).await;
    checkpoint(store, keys);
    store.append(&events("a", 6..10)).await;
    checkpoint(store, keys);
    let out = verify_with_checkpoints(store, keys);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        stdout(&out).contains("chain valid: 10 events"),
        "{}",
        printed(&out)
    );
    assert!(
        stdout(&out).contains("checkpoints hold: 2 checked"),
        "{}",
        printed(&out)
    );
    assert_eq!(assert_agree(store, keys).0, 0);
}

/// Each tampering leaves a chain that `audit verify` alone calls valid
/// (exit 0), which is why checkpoints exist: with them it is exit 1,
/// naming the checkpoint the trail no longer holds.
async fn tampering_is_caught_only_with_checkpoints(make: impl AsyncFn() -> Store) {
    let keys = keygen();

    // 1. The last K rows deleted.
    let store = make().await;
    checkpointed(&store, &keys).await;
    store
        .tamper(&[
            "DELETE FROM audit_events WHERE id > (SELECT MAX(id) - 3 FROM audit_events)".into(),
        ])
        .await;
    valid_without_checkpoints(&store, "a cut tail is a valid chain");
    let out = caught(
        &store,
        &keys,
        &["checkpoint at line 2 (id", "its tail was cut off"],
    );
    assert!(
        !out.contains("checkpoint at line 1"),
        "the first still holds: {out}"
    );

    // 2. The prefix rewritten and every hash recomputed.
    let store = make().await;
    checkpointed(&store, &keys).await;
    let rows = store.rows().await;
    let mut forged: Vec<NewEvent> = rows.iter().map(new_event).collect();
    forged[0].decision = "DENY".into();
    let links = link("", &forged);
    let statements: Vec<String> = rows
        .iter()
        .zip(&forged)
        .zip(&links)
        .map(|((row, event), l)| {
            format!(
                "UPDATE audit_events SET decision = '{}', payload = {}, prev_hash = '{}', hash = '{}' WHERE id = {}",
                event.decision,
                store.payload_literal(&l.payload),
                l.prev_hash,
                l.hash,
                row.id
            )
        })
        .collect();
    store.tamper(&statements).await;
    valid_without_checkpoints(&store, "a rehashed chain is valid");
    caught(
        &store,
        &keys,
        &["checkpoint at line 1 (id", "rewritten or replaced"],
    );

    // 3. A fresh database swapped in, as long as the old one.
    let fresh = make().await;
    fresh.append(&events("fresh", 0..10)).await;
    valid_without_checkpoints(&fresh, "a swapped-in database is valid");
    caught(
        &fresh,
        &keys,
        &["checkpoint at line 1 (id", "checkpoint at line 2 (id"],
    );

    // 4. One row edited in place: the chain itself breaks, in both verifiers.
    let store = make().await;
    checkpointed(&store, &keys).await;
    let victim = &store.rows().await[3];
    let edited = victim.payload.replace("Zoë", "Zoe");
    assert_ne!(edited, victim.payload);
    store
        .tamper(&[format!(
            "UPDATE audit_events SET payload = {} WHERE id = {}",
            store.payload_literal(&edited),
            victim.id
        )])
        .await;
    caught(
        &store,
        &keys,
        &[&format!("chain broken at event id {}", victim.id)],
    );

    // 5. A forged checkpoint (its count changed) does not verify.
    let store = make().await;
    checkpointed(&store, &keys).await;
    let text = std::fs::read_to_string(&keys.checkpoints).unwrap();
    std::fs::write(
        &keys.checkpoints,
        text.replacen("\"count\":6", "\"count\":5", 1),
    )
    .unwrap();
    let out = verify_with_checkpoints(&store, &keys);
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        stdout(&out).contains("checkpoint at line 1 (id"),
        "{}",
        printed(&out)
    );
    assert!(
        stdout(&out).contains("does not verify"),
        "{}",
        printed(&out)
    );
}

fn new_event(row: &AuditRow) -> NewEvent {
    NewEvent {
        request_id: row.request_id.clone(),
        event_id: row.event_id.clone(),
        ts: row.ts.clone(),
        actor: row.actor.clone(),
        action: row.action.clone(),
        decision: row.decision.clone(),
        payload: serde_json::from_str(&row.payload).unwrap(),
    }
}

#[tokio::test]
async fn sqlite_tampering_is_caught_only_with_checkpoints() {
    tampering_is_caught_only_with_checkpoints(async || Store::sqlite()).await;
}

#[tokio::test]
async fn postgres_tampering_is_caught_only_with_checkpoints() {
    tampering_is_caught_only_with_checkpoints(Store::pg).await;
}

/// The Python verifier recomputes what `json.dumps` cannot: every row here
/// carries 1e16, 1.5e-7 and integers beyond 2^64, and both stores agree.
#[tokio::test]
async fn the_python_verifier_agrees_on_both_stores() {
    let keys = keygen();
    for store in [Store::sqlite(), Store::pg().await] {
        checkpointed(&store, &keys).await;
        let rust = store.cli(&["audit", "verify"], &[]);
        let python = store.python(&[]);
        assert_eq!(python.status.code(), Some(0), "{}", printed(&python));
        assert_eq!(stdout(&rust), stdout(&python));
        // The naive recomputation fails on these rows: the reason for the rules.
        let naive = Command::new("python3")
            .args(["-c", NAIVE])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs"))
            .arg(&store.rows().await[0].payload)
            .output()
            .unwrap();
        assert_eq!(stdout(&naive).trim(), "differs", "{}", printed(&naive));
    }
    let vectors = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/verify_chain.py"))
        .arg("--vectors")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/audit-vectors.json"))
        .output()
        .unwrap();
    assert_eq!(vectors.status.code(), Some(0), "{}", printed(&vectors));
}

/// `json.dumps(json.loads(p), sort_keys=True, separators=(",", ":"),
/// ensure_ascii=False)`, the naive recomputation, against the published
/// rules (docs/verify_chain.py); argv: the script's folder, the payload.
const NAIVE: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
import verify_chain
p = sys.argv[2]
naive = json.dumps(json.loads(p), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
print("same" if naive == verify_chain.canonical_payload(p) else "differs")
"#;

/// The documented one-liner: jq and openssl, no casf-verifier.
const OPENSSL_CHECK: &str = "jq -cSj 'del(.signature)' signed.json > signed.msg && \
    jq -r .signature signed.json | base64 -d > signed.sig && \
    openssl pkeyutl -verify -pubin -inkey audit-signing.pub.pem -rawin -in signed.msg -sigfile signed.sig";

fn openssl_check(dir: &Path, document: &str) -> Output {
    std::fs::write(dir.join("signed.json"), document).unwrap();
    Command::new("bash")
        .arg("-c")
        .arg(OPENSSL_CHECK)
        .current_dir(dir)
        .output()
        .expect("bash")
}

#[tokio::test]
async fn signed_digests_and_checkpoints_verify_with_openssl_alone() {
    let keys = keygen();
    let dir = keys.public.parent().unwrap().to_owned();
    let store = Store::sqlite();
    store.append(&events("d", 0..5)).await;
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();

    let out = store.cli(
        &["audit", "digest", &today, "--sign"],
        &[("CASF_AUDIT_SIGNING_KEY", &keys.private)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let digest: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(digest["event_count"], 5);
    assert!(digest["signature"].is_string(), "{digest}");
    let checked = openssl_check(&dir, &stdout(&out));
    assert_eq!(checked.status.code(), Some(0), "{}", printed(&checked));
    assert!(printed(&checked).contains("Signature Verified Successfully"));
    let mut forged = digest.clone();
    forged["event_count"] = json!(4);
    let checked = openssl_check(&dir, &forged.to_string());
    assert_ne!(checked.status.code(), Some(0), "{}", printed(&checked));

    // A checkpoint printed to stdout (for shipping elsewhere), same check.
    let out = store.cli(
        &["audit", "checkpoint"],
        &[("CASF_AUDIT_SIGNING_KEY", &keys.private)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["count"], 5);
    assert_eq!(line["last_id"], 5);
    let checked = openssl_check(&dir, &stdout(&out));
    assert_eq!(checked.status.code(), Some(0), "{}", printed(&checked));

    // The key id is what openssl computes from the public key.
    let der = Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(&keys.public)
        .output()
        .unwrap();
    let id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&der.stdout));
    assert_eq!(line["key_id"], id.as_str());
    assert_eq!(digest["key_id"], id.as_str());

    // A key made by openssl signs too; one that is not a private key is
    // refused (exit 2) without quoting the file.
    let openssl_key = dir.join("openssl.pem");
    let made = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&openssl_key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", printed(&made));
    let out = store.cli(
        &["audit", "checkpoint"],
        &[("CASF_AUDIT_SIGNING_KEY", &openssl_key)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let not_a_key = dir.join("not-a-key.pem");
    std::fs::write(&not_a_key, "SECRET-LOOKING-CONTENT\n").unwrap();
    let out = store.cli(
        &["audit", "checkpoint"],
        &[("CASF_AUDIT_SIGNING_KEY", &not_a_key)],
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("CASF_AUDIT_SIGNING_KEY"),
        "{}",
        printed(&out)
    );
    assert!(
        !printed(&out).contains("SECRET-LOOKING"),
        "{}",
        printed(&out)
    );
    let out = store.cli(&["audit", "checkpoint"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));

    // `check` reads the key too, so CI catches a bad one before serve does.
    let out = store.cli(&["check"], &[("CASF_AUDIT_SIGNING_KEY", &keys.private)]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        stdout(&out).contains(&format!("audit signing key: ok: key id {id}")),
        "{}",
        printed(&out)
    );
    let out = store.cli(&["check"], &[("CASF_AUDIT_SIGNING_KEY", &not_a_key)]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
}

/// A checkpoint that cannot be written (here its file is a directory) is
/// counted as failed; decisions go on.
#[tokio::test]
async fn serve_counts_checkpoints_it_cannot_write_and_keeps_deciding() {
    let keys = keygen();
    let private = keys.private.display().to_string();
    let not_a_file = keys.checkpoints.with_extension("d");
    std::fs::create_dir_all(&not_a_file).unwrap();
    let not_a_file = not_a_file.display().to_string();
    let app = spawn_app_with(&[
        ("CASF_AUDIT_SIGNING_KEY", private.as_str()),
        ("CASF_AUDIT_CHECKPOINT_EVERY", "1s"),
        ("CASF_AUDIT_CHECKPOINT_FILE", not_a_file.as_str()),
    ])
    .await;
    let failed = r#"casf_audit_checkpoint_total{result="failed"}"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.metric(failed).await < 1.0 {
        assert!(Instant::now() < deadline, "no failed checkpoint counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.metric(r#"casf_audit_checkpoint_total{result="written"}"#)
            .await,
        0.0
    );
    assert_eq!(
        app.metric("casf_audit_checkpoint_last_timestamp_seconds")
            .await,
        0.0
    );
    let decision = app.decide(&request("twilio.send_sms", "ALLOW")).await;
    assert_eq!(decision["decision"], "ALLOW", "{decision}");
}

/// `serve` with CASF_AUDIT_CHECKPOINT_EVERY appends signed checkpoints that
/// `audit verify --checkpoints` then holds the trail to.
#[tokio::test]
async fn serve_writes_periodic_checkpoints() {
    let keys = keygen();
    let private = keys.private.display().to_string();
    let file = keys.checkpoints.display().to_string();
    let mut app = spawn_app_with(&[
        ("CASF_AUDIT_SIGNING_KEY", private.as_str()),
        ("CASF_AUDIT_CHECKPOINT_EVERY", "1s"),
        ("CASF_AUDIT_CHECKPOINT_FILE", file.as_str()),
    ])
    .await;
    let checkpoint_of = |count: u64| {
        let file = keys.checkpoints.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                if text
                    .lines()
                    .any(|l| l.contains(&format!("\"count\":{count},")))
                {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "no checkpoint of {count} events: {text:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for _ in 0..3 {
        app.decide(&request("twilio.send_sms", "ALLOW")).await;
    }
    checkpoint_of(3).await;
    // After the first, each checkpoint counts from the last one written.
    for _ in 0..2 {
        app.decide(&request("cliniccloud.list_appointments", "ALLOW"))
            .await;
    }
    checkpoint_of(5).await;
    // Counted, and when: an operator alerts on a trail no longer anchored.
    assert!(
        app.metric(r#"casf_audit_checkpoint_total{result="written"}"#)
            .await
            >= 1.0
    );
    assert_eq!(
        app.metric(r#"casf_audit_checkpoint_total{result="failed"}"#)
            .await,
        0.0
    );
    let last = app
        .metric("casf_audit_checkpoint_last_timestamp_seconds")
        .await;
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - 60.0..=now + 1.0).contains(&last),
        "last checkpoint at {last}, now {now}"
    );
    app.shutdown().await;
    let out = app.audit_cli(&[
        "verify",
        "--checkpoints",
        &file,
        "--public-key",
        keys.public.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        stdout(&out).contains("checkpoints hold"),
        "{}",
        printed(&out)
    );
}

/// `serve`'s checkpoints after the first count only the rows since the last
/// one: the same head as a full count while that head is still in the
/// chain, and none (so a full count) once it is not.
async fn counting_from_the_last_checkpoint(store: Store) {
    store.append(&events("a", 0..3)).await;
    let reader = store.reader().await;
    let first = reader
        .head_since(&Head::EMPTY)
        .await
        .unwrap()
        .expect("from genesis");
    assert_eq!(first, reader.head().await.unwrap());
    assert_eq!(first.count, 3);
    store.append(&events("b", 3..7)).await;
    let second = reader
        .head_since(&first)
        .await
        .unwrap()
        .expect("the first head is in the chain");
    assert_eq!(second, reader.head().await.unwrap());
    assert_eq!(second.count, 7, "3 counted before, 4 since");
    assert_eq!(
        reader.head_since(&second).await.unwrap(),
        Some(second.clone())
    );
    // A head the chain does not hold: rewritten below it, or another chain.
    let rewritten = Head {
        last_hash: "0".repeat(64),
        ..first.clone()
    };
    assert_eq!(reader.head_since(&rewritten).await.unwrap(), None);
    let cut = Head {
        last_id: second.last_id + 100,
        ..second
    };
    assert_eq!(reader.head_since(&cut).await.unwrap(), None);
}

#[tokio::test]
async fn sqlite_checkpoints_count_from_the_last_one() {
    counting_from_the_last_checkpoint(Store::sqlite()).await;
}

#[tokio::test]
async fn postgres_checkpoints_count_from_the_last_one() {
    counting_from_the_last_checkpoint(Store::pg().await).await;
}
