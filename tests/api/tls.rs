//! TLS to every backend against real servers: PostgreSQL that rejects
//! plaintext, redis-server on a TLS-only port that wants a client
//! certificate, and the OPA-compatible server over HTTPS. The CAs and
//! certificates are made here with the `openssl` CLI; a second CA that
//! signed nothing stands in for a wrong trust anchor (or an impostor).

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{request, spawn_app_with};
use crate::pg::{PrivateCluster, Server, audit_rows, cli, printed};
use crate::pki::TestPki;
use crate::servers::{OpaServer, RedisServer, wait_until};
use casf_verifier::config::Settings;
use casf_verifier::startup::Application;

#[tokio::test]
async fn postgres_with_verify_full_and_no_plaintext() {
    let pki = TestPki::new();
    let cluster = PrivateCluster::start_tls(
        &pki.path("server.pem"),
        &pki.path("server.key"),
        &pki.path("ca.pem"),
    );
    let (pw, port) = (cluster.password().to_owned(), cluster.port());
    let url = |host: &str, query: &str| {
        format!("postgres://postgres:{pw}@{host}:{port}/postgres?{query}")
    };
    let ca = pki.shown("ca.pem");

    // The URL form, verify-full against the test CA.
    let good_url = url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let out = cli(&good_url, &["migrate"]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    // Plaintext is refused by the server: TLS is really in use above.
    let out = cli(&url("127.0.0.1", "sslmode=disable"), &["migrate"]);
    assert_ne!(out.status.code(), Some(0));
    let text = printed(&out);
    assert!(
        text.contains("PostgreSQL") && text.contains("no encryption"),
        "{text}"
    );

    // A CA that did not sign the server's certificate.
    let wrong = url(
        "127.0.0.1",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            pki.shown("wrong-ca.pem")
        ),
    );
    let out = cli(&wrong, &["migrate"]);
    assert_ne!(out.status.code(), Some(0));
    let text = printed(&out);
    assert!(
        text.contains("PostgreSQL") && text.contains("certificate"),
        "{text}"
    );
    assert!(!text.contains(&pw), "{text}");

    // A name the certificate does not carry. (verify-ca is no way around it:
    // with this sqlx and rustls it checks the name too, stricter than libpq.)
    let other_host = format!(
        "host=127.0.0.2 port={port} dbname=postgres user=postgres password={pw} \
         sslmode=verify-full sslrootcert={ca}"
    );
    let out = cli(&other_host, &["migrate"]);
    assert_ne!(out.status.code(), Some(0));
    let text = printed(&out);
    assert!(
        text.contains("PostgreSQL") && text.contains("not valid for name"),
        "{text}"
    );

    // A client certificate instead of a password (pg_hba `cert` for role
    // `client`): sslcert and sslkey are presented.
    let pool = crate::pg::connect(&good_url).await;
    sqlx::query("CREATE ROLE client LOGIN SUPERUSER")
        .execute(&pool)
        .await
        .expect("create role client");
    pool.close().await;
    let as_client = |extra: &str| {
        format!(
            "host=127.0.0.1 port={port} dbname=postgres user=client \
             sslmode=verify-full sslrootcert={ca}{extra}"
        )
    };
    let with_cert = as_client(&format!(
        " sslcert={} sslkey={}",
        pki.shown("client.pem"),
        pki.shown("client.key")
    ));
    let out = cli(&with_cert, &["migrate"]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = cli(&as_client(""), &["migrate"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(printed(&out).contains("PostgreSQL"), "{}", printed(&out));

    // The libpq key=value form serves decisions and writes the audit trail.
    let key_value = format!(
        "host=127.0.0.1 port={port} dbname=postgres user=postgres password={pw} \
         sslmode=verify-full sslrootcert={ca}"
    );
    let mut server = Server::spawn(&key_value);
    let decision = server
        .decide(&request("cliniccloud.list_appointments", "ALLOW"))
        .await;
    assert_eq!(decision["decision"], "ALLOW", "{decision}");
    let pool = crate::pg::connect(&good_url).await;
    wait_until(
        Duration::from_secs(10),
        "the decision is audited",
        || async { !audit_rows(&pool).await.is_empty() },
    )
    .await;
    pool.close().await;
    assert_eq!(server.stop(), Some(0), "{}", server.log());
    assert!(!server.log().contains(&pw));
}

#[tokio::test]
async fn redis_over_tls_with_a_client_certificate() {
    let pki = TestPki::new();
    // Copies, so that the test can swap the served certificate later.
    let (served_cert, served_key) = (pki.path("served.pem"), pki.path("served.key"));
    std::fs::copy(pki.path("server.pem"), &served_cert).expect("copy certificate");
    std::fs::copy(pki.path("server.key"), &served_key).expect("copy key");
    let mut redis =
        RedisServer::start_tls(served_cert.clone(), served_key.clone(), pki.path("ca.pem")).await;
    let url = redis.url();
    assert!(url.starts_with("rediss://"));
    let (ca, cert, key) = (
        pki.shown("ca.pem"),
        pki.shown("client.pem"),
        pki.shown("client.key"),
    );
    let app = spawn_app_with(&[
        ("REDIS_URL", url.as_str()),
        ("CASF_REDIS_CA", ca.as_str()),
        ("CASF_REDIS_CERT", cert.as_str()),
        ("CASF_REDIS_KEY", key.as_str()),
    ])
    .await;
    let body = request("cliniccloud.list_appointments", "ALLOW");
    let first = app.decide(&body).await;
    // The replay is answered from Redis, so the state really went over TLS.
    let again = app.decide(&body).await;
    assert_eq!(first, again);
    let (status, health) = app.get("/healthz").await;
    assert_eq!(status, 200, "{health}");

    // The server turns impostor (its certificate now from another CA): the
    // running verifier reports Redis unhealthy and says why.
    std::fs::copy(pki.path("impostor.pem"), &served_cert).expect("swap certificate");
    std::fs::copy(pki.path("impostor.key"), &served_key).expect("swap key");
    redis.restart().await;
    wait_until(
        Duration::from_secs(10),
        "/healthz names the TLS failure",
        || async {
            let (status, health) = app.get("/healthz").await;
            status == 503 && health.contains("TLS handshake failed")
        },
    )
    .await;
    let (_, health) = app.get("/healthz").await;
    assert!(
        health.contains("redis") && health.contains("certificate"),
        "{health}"
    );
    assert!(!health.contains(&redis.password), "{health}");

    // And a verifier starting now, against the impostor, refuses to start,
    // naming Redis and the certificate.
    let vars = [
        ("REDIS_URL", url.as_str()),
        ("CASF_REDIS_CA", ca.as_str()),
        ("CASF_REDIS_CERT", cert.as_str()),
        ("CASF_REDIS_KEY", key.as_str()),
        ("CASF_HTTP_ADDR", "127.0.0.1:0"),
        ("CASF_GRPC_ADDR", "127.0.0.1:0"),
        ("CASF_DISABLE_AUDIT", "1"),
    ];
    let settings = Settings::from_lookup(|k| {
        vars.iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| (*v).to_owned())
    })
    .expect("settings");
    let Err(error) = Application::build(&settings).await else {
        panic!("a Redis server signed by another CA was accepted");
    };
    let error = error.to_string();
    assert!(
        error.contains("Redis TLS") && error.contains("certificate"),
        "{error}"
    );
    assert!(!error.contains(&redis.password), "{error}");
}

#[tokio::test]
async fn opa_over_https() {
    let pki = TestPki::new();
    let opa = OpaServer::start_tls(pki.path("server.pem"), pki.path("server.key"), None).await;
    let url = opa.url();
    assert!(url.starts_with("https://"));
    let ca = pki.shown("ca.pem");
    let app = spawn_app_with(&[("OPA_URL", url.as_str()), ("CASF_OPA_CA", ca.as_str())]).await;
    let decision = app
        .decide(&request("cliniccloud.list_appointments", "ALLOW"))
        .await;
    assert_eq!(decision["decision"], "ALLOW", "{decision}");
    let (status, health) = app.get("/healthz").await;
    assert_eq!(status, 200, "{health}");

    // A wrong CA: OPA is named unhealthy, with the reason.
    let wrong = pki.shown("wrong-ca.pem");
    let app = spawn_app_with(&[("OPA_URL", url.as_str()), ("CASF_OPA_CA", wrong.as_str())]).await;
    let (status, health) = app.get("/healthz").await;
    assert_eq!(status, 503, "{health}");
    let health: Value = serde_json::from_str(&health).expect("JSON /healthz");
    let text = health.to_string();
    assert!(
        text.contains("opa") && text.contains("certificate"),
        "{text}"
    );
}

#[tokio::test]
async fn opa_over_https_with_a_client_certificate() {
    let pki = TestPki::new();
    let opa = OpaServer::start_tls(
        pki.path("server.pem"),
        pki.path("server.key"),
        Some(pki.path("ca.pem")),
    )
    .await;
    let url = opa.url();
    let (ca, cert, key) = (
        pki.shown("ca.pem"),
        pki.shown("client.pem"),
        pki.shown("client.key"),
    );
    let app = spawn_app_with(&[
        ("OPA_URL", url.as_str()),
        ("CASF_OPA_CA", ca.as_str()),
        ("CASF_OPA_CERT", cert.as_str()),
        ("CASF_OPA_KEY", key.as_str()),
    ])
    .await;
    let decision = app
        .decide(&request("cliniccloud.list_appointments", "ALLOW"))
        .await;
    assert_eq!(decision["decision"], "ALLOW", "{decision}");

    // Without the client certificate OPA refuses the connection: no
    // decision is made from it, and the verifier says OPA is unavailable.
    let app = spawn_app_with(&[("OPA_URL", url.as_str()), ("CASF_OPA_CA", ca.as_str())]).await;
    let (status, health) = app.get("/healthz").await;
    assert_eq!(status, 503, "{health}");
    assert!(health.contains("opa"), "{health}");
}
