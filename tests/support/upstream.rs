//! A stand-in tool service for the Envoy tests: a real HTTP server on a
//! loopback port that answers 200 to everything and records each request it
//! got, so a test can see exactly what Envoy let through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Lower-case names; repeated headers joined by `,`.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

type Log = Arc<Mutex<Vec<Recorded>>>;

pub struct Upstream {
    pub port: u16,
    log: Log,
    server: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let log: Log = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let port = listener.local_addr().expect("upstream address").port();
        let app = axum::Router::new().fallback(record).with_state(log.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { port, log, server }
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().expect("upstream log").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn record(
    State(log): State<Log>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> &'static str {
    let mut joined: HashMap<String, String> = HashMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        joined
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    log.lock().expect("upstream log").push(Recorded {
        method: method.to_string(),
        path: uri.to_string(),
        headers: joined,
        body: body.to_vec(),
    });
    "{\"upstream\": \"ok\"}"
}
