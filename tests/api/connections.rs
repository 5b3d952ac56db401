//! What client connections may cost (issue 11, item 7): a slowloris flood
//! against a spawned verifier is closed after the header timeout with RSS
//! bounded and `/health` answering, and a door at its connection cap closes
//! one more connection at once and frees slots through the idle timeout.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::spawn_app_with;
use crate::servers::free_port;

/// Slowloris connections held at once; each costs the test one descriptor.
const SLOWLORIS: usize = 2_000;

/// The spawned verifier, killed however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// True once the peer has closed `stream` (EOF or an error), within `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar before the close: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

async fn health_answers(base: &str) -> bool {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    matches!(client.get(format!("{base}/health")).send().await, Ok(r) if r.status() == 200)
}

#[tokio::test]
async fn slowloris_connections_are_closed_after_the_header_timeout_with_rss_bounded() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("RUST_LOG", "info")
        .env("CASF_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("CASF_GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("CASF_AUDIT_SQLITE", dir.path().join("a.db"))
        .env("CASF_HTTP_HEADER_TIMEOUT_SECONDS", "2")
        .env("CASF_IDLE_TIMEOUT_SECONDS", "30")
        .env("CASF_MAX_CONNECTIONS", "4096")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the verifier");
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr");
    let mut child = KillOnDrop(child);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // Drains stderr for the life of the process, so the pipe never fills.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("casf-verifier ready") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a ready line");
    assert!(health_answers(&base).await);
    let rss_before = rss_kib(pid);

    // Every connection sends a partial request head, then a byte more a
    // second later: a slowloris that never finishes its headers.
    let mut held = Vec::with_capacity(SLOWLORIS);
    for _ in 0..SLOWLORIS {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream
            .write_all(b"POST /verify HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("partial head");
        held.push(stream);
    }
    let opened = Instant::now();
    for stream in &mut held {
        let _ = stream.write_all(b"a").await;
    }
    let rss_held = rss_kib(pid);
    assert!(
        health_answers(&base).await,
        "/health answers while {SLOWLORIS} slowloris connections are open"
    );

    // All closed by the verifier, none by us, soon after the 2 s timeout.
    let mut closed = 0;
    for stream in &mut held {
        let left = Duration::from_secs(8).saturating_sub(opened.elapsed());
        if closed_within(stream, left).await {
            closed += 1;
        }
    }
    let closed_after = opened.elapsed();
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after = rss_kib(pid);
    assert!(health_answers(&base).await);
    eprintln!(
        "slowloris: {SLOWLORIS} connections, {closed} closed by the verifier within {:.1} s; \
         VmRSS before {rss_before} KiB, while held {rss_held} KiB, after {rss_after} KiB",
        closed_after.as_secs_f64()
    );
    drop(child.0.kill());

    assert_eq!(closed, SLOWLORIS, "slowloris connections left open");
    // 2,000 half-read heads cost kilobytes each, not the 400 KiB each that
    // the issue measured (243 MiB for 600): 64 MiB is a wide bound.
    assert!(
        rss_held.saturating_sub(rss_before) < 64 * 1024,
        "RSS grew from {rss_before} to {rss_held} KiB"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn a_door_at_its_cap_closes_one_more_connection_and_idle_ones_free_their_slots() {
    let app = spawn_app_with(&[
        ("CASF_MAX_CONNECTIONS", "2"),
        ("CASF_IDLE_TIMEOUT_SECONDS", "1"),
        ("CASF_HTTP_HEADER_TIMEOUT_SECONDS", "5"),
    ])
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    // Two idle connections take both slots.
    let mut first = TcpStream::connect(&addr).await.expect("connect");
    let mut second = TcpStream::connect(&addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(&addr).await.expect("connect");
    let refused_at = Instant::now();
    assert!(
        closed_within(&mut third, Duration::from_millis(500)).await,
        "a connection over the cap is closed at once"
    );
    eprintln!("over the cap: closed after {:?}", refused_at.elapsed());
    // The idle timeout closes the two idle ones and /health gets a slot.
    assert!(closed_within(&mut first, Duration::from_secs(3)).await);
    assert!(closed_within(&mut second, Duration::from_secs(3)).await);
    let (status, _) = app.get("/health").await;
    assert_eq!(status, 200);
}
