//! A stand-in tool service for benchmarking through Envoy: answers every
//! request with `200 {"upstream": "ok"}` and keeps nothing, so that a long
//! run costs it no memory and what is measured is Envoy and the verifier.
//! (`tests/support/upstream.rs` is the recording one the tests use.)
//!
//! It prints one line, `LISTENING <port>`, once it accepts connections.
//! Loopback only; it runs until killed.
//!
//! ```text
//! cargo run --release --example upstream -- --addr 127.0.0.1:8080
//! ```

use std::net::SocketAddr;

use axum::body::Bytes;
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// Loopback address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
}

/// Drains the request body (so the connection can be reused) and says ok.
async fn ok(_body: Bytes) -> ([(&'static str, &'static str); 1], &'static str) {
    (
        [("content-type", "application/json")],
        "{\"upstream\": \"ok\"}",
    )
}

// One thread: the machine's cores belong to Envoy and the verifier.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    if !args.addr.ip().is_loopback() {
        return Err(format!("{} is not a loopback address", args.addr));
    }
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("bind {}: {e}", args.addr))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    println!("LISTENING {port}");
    let app = axum::Router::new().fallback(ok);
    axum::serve(listener, app).await.map_err(|e| e.to_string())
}
