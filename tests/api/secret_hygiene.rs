//! Secrets never leave the process: the real binary runs with a PostgreSQL
//! password in `PG_DSN`, a Redis password in `REDIS_URL`, credentials in
//! `OPA_URL` and callers whose API key only the requests carry. Everything
//! it says is collected (its log at debug level through startup, decisions,
//! 401s and each backend going down; `/healthz` and `/metrics` bodies; every
//! subcommand's `--help`; the errors of commands given a wrong password) and
//! searched for each secret. The backends are private instances, so taking
//! them down touches no shared service.

use std::process::Output;
use std::time::Duration;

use crate::callers::{SCHED_KEY, booking, callers_yaml};
use crate::pg::{PrivateCluster, Server, binary, printed};
use crate::servers::{OpaServer, RedisServer};

/// Every place a secret could show up, with where it came from.
struct Said(Vec<(String, String)>);

impl Said {
    fn add(&mut self, source: impl Into<String>, text: impl Into<String>) {
        self.0.push((source.into(), text.into()));
    }

    fn assert_free_of(&self, secrets: &[(&str, &str)]) {
        for (what, secret) in secrets {
            assert!(secret.len() >= 8, "{what}: too short to search for");
            for (source, text) in &self.0 {
                assert!(
                    !text.contains(secret),
                    "the {what} appears in {source}:\n{text}"
                );
            }
        }
    }
}

async fn verify_as(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    client
        .post(format!("{base}/verify"))
        .header("content-type", "application/json")
        .bearer_auth(key)
        .body(body.to_string())
        .send()
        .await
        .expect("POST /verify")
}

/// The `/healthz` body once it answers 503 (bounded).
async fn unready(client: &reqwest::Client, base: &str, what: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = get(client, format!("{base}/healthz")).await;
        if status == 503 {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/healthz never unready with {what}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get(client: &reqwest::Client, url: String) -> (u16, String) {
    let response = client.get(url).send().await.expect("GET");
    (response.status().as_u16(), response.text().await.unwrap())
}

fn output(source: &str, out: &Output, said: &mut Said) {
    said.add(source, printed(out));
}

#[tokio::test]
async fn no_secret_appears_in_logs_health_errors_or_help() {
    let pg = PrivateCluster::start();
    let mut redis = RedisServer::start().await;
    let mut opa = OpaServer::start().await;
    let opa_password = format!("opa-{}", uuid::Uuid::new_v4().simple());
    let opa_url = opa
        .url()
        .replacen("://", &format!("://casf:{opa_password}@"), 1);
    let dsn = format!(
        "postgres://postgres:{}@127.0.0.1:{}/postgres",
        pg.password(),
        pg.port()
    );
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers.yaml");
    std::fs::write(&callers, callers_yaml()).unwrap();
    let env = [
        ("REDIS_URL", redis.url()),
        ("OPA_URL", opa_url.clone()),
        ("CASF_CALLERS", callers.display().to_string()),
        ("RUST_LOG", "debug".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let secrets = [
        ("PostgreSQL password", pg.password().to_owned()),
        ("Redis password", redis.password.clone()),
        ("OPA password", opa_password.clone()),
        ("API key", SCHED_KEY.to_owned()),
    ];
    let secrets: Vec<(&str, &str)> = secrets.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut said = Said(Vec::new());

    let migrated = binary(&dsn).arg("migrate").output().unwrap();
    assert!(migrated.status.success(), "{}", printed(&migrated));
    output("migrate", &migrated, &mut said);

    let mut server = Server::spawn_with(&dsn, &env);
    let client = casf_verifier::tls::http_client_builder().build().unwrap();
    let base = server.base.clone();
    let body = booking("receptionist", "clinic-a", "cliniccloud.create_appointment");
    let allowed = verify_as(&client, &base, SCHED_KEY, &body).await;
    assert_eq!(allowed.status(), 200);
    said.add("a decision", allowed.text().await.unwrap());
    // A wrong key that differs from the real one only at the end.
    let wrong = format!("{}x", &SCHED_KEY[..SCHED_KEY.len() - 1]);
    let refused = verify_as(&client, &base, &wrong, &body).await;
    assert_eq!(refused.status(), 401);
    said.add("a 401", refused.text().await.unwrap());
    for path in ["/healthz", "/metrics", "/admin/mode"] {
        let (_, text) = get(&client, format!("{}{path}", server.base)).await;
        said.add(path, text);
    }

    // Each backend down in turn: /healthz names it, without its secret.
    redis.stop();
    said.add(
        "/healthz, Redis down",
        unready(&client, &base, "Redis down").await,
    );
    redis.restart().await;
    opa.stop();
    said.add(
        "/healthz, OPA down",
        unready(&client, &base, "OPA down").await,
    );
    opa.restart().await;
    pg.halt();
    said.add(
        "/healthz, PostgreSQL down",
        unready(&client, &base, "PostgreSQL down").await,
    );
    // A decision while PostgreSQL is down: its error path logs too.
    let during = verify_as(
        &client,
        &base,
        SCHED_KEY,
        &booking("receptionist", "clinic-a", "cliniccloud.list_appointments"),
    )
    .await;
    said.add("a decision, PostgreSQL down", during.text().await.unwrap());
    pg.resume();
    server.stop();
    said.add("the server's log", server.log());
    assert!(
        server.log().contains("callers"),
        "the log was captured: {}",
        server.log()
    );

    // --help of every subcommand, with every secret in the environment.
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["check", "--help"],
        &["migrate", "--help"],
        &["audit", "--help"],
        &["audit", "verify", "--help"],
        &["healthcheck", "--help"],
        &["dev-token", "--help"],
    ] {
        let out = binary(&dsn)
            .envs(env.iter().copied())
            .args(args)
            .output()
            .unwrap();
        output(&format!("{args:?}"), &out, &mut said);
    }
    // Errors: a wrong password (itself a secret) and an unreachable server.
    let wrong_dsn = dsn.replace(pg.password(), &format!("{}-wrong", pg.password()));
    for args in [&["migrate"][..], &["audit", "verify"]] {
        let out = binary(&wrong_dsn).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} with a wrong password");
        output(&format!("{args:?}, wrong password"), &out, &mut said);
    }
    pg.halt();
    let out = binary(&dsn).arg("migrate").output().unwrap();
    assert!(!out.status.success());
    output("migrate, PostgreSQL down", &out, &mut said);
    said.assert_free_of(&secrets);
}
