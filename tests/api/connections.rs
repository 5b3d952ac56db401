//! What client connections may cost (issue 11, item 7): slowloris floods
//! against a spawned verifier, on the HTTP door (request heads never
//! finished) and on the gRPC door (HTTP/2 prefaces never finished), are
//! closed after the header timeout with RSS bounded and both doors' health
//! checks answering; with TLS, the preface is counted decrypted, after the
//! handshake; an unfinished preface on the HTTP door (HTTP/2 with prior
//! knowledge) is closed too; and a door at its connection cap closes one more connection
//! at once and frees slots through the idle timeout.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::spawn_app_with;
use crate::servers::free_port;

/// Slowloris connections held at once; each costs the test one descriptor.
const SLOWLORIS: usize = 2_000;

/// The header timeout the floods run against, and how long after opening
/// the flood every connection must be closed: four times the timeout, so a
/// loaded 2-core machine has room; still far below the 30 s idle timeout,
/// the only other thing that would close them.
const HEADER_TIMEOUT_SECONDS: u64 = 2;
const CLOSE_WINDOW: Duration = Duration::from_secs(8);

/// One flood at a time: the two together would need 4,000 descriptors in
/// this process and share two cores.
static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The spawned verifier, killed however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A verifier binary with the flood's limits, ready.
struct Verifier {
    child: KillOnDrop,
    pid: u32,
    http: SocketAddr,
    grpc: SocketAddr,
    _dir: tempfile::TempDir,
}

fn spawn_verifier() -> Verifier {
    let dir = tempfile::tempdir().expect("temp dir");
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_casf-verifier"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("RUST_LOG", "info")
        .env("CASF_HTTP_ADDR", http.to_string())
        .env("CASF_GRPC_ADDR", grpc.to_string())
        .env("CASF_AUDIT_SQLITE", dir.path().join("a.db"))
        .env(
            "CASF_HTTP_HEADER_TIMEOUT_SECONDS",
            HEADER_TIMEOUT_SECONDS.to_string(),
        )
        .env("CASF_IDLE_TIMEOUT_SECONDS", "30")
        .env("CASF_MAX_CONNECTIONS", "4096")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the verifier");
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr");
    let child = KillOnDrop(child);
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
    Verifier {
        child,
        pid,
        http,
        grpc,
        _dir: dir,
    }
}

/// A `/proc/<pid>/status` figure in KiB: `VmRSS` now, `VmHWM` its peak.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect(field)
}

/// True once the peer has closed `stream` (EOF or an error), within `wait`.
async fn closed_within(stream: &mut (impl AsyncRead + Unpin), wait: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408, an HTTP/2 GOAWAY or ping before the close: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

/// True when the peer closed `stream` within `wait` without sending a byte:
/// refused, not served.
async fn refused_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 512];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn health_answers(http: SocketAddr) -> bool {
    let client = casf_verifier::tls::http_client_builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    matches!(client.get(format!("http://{http}/health")).send().await, Ok(r) if r.status() == 200)
}

/// A real `grpc.health.v1.Health/Check`, as `casf-verifier healthcheck --grpc` asks it.
async fn grpc_health_answers(grpc: SocketAddr) -> bool {
    casf_verifier::healthcheck::probe_grpc(grpc, None)
        .await
        .is_ok()
}

/// Polls `check` until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a flood showed; printed, then asserted on.
struct Flood {
    rss_before: u64,
    /// The peak while the flood was open (the first connections may time
    /// out before the last are opened, so "now" would undercount).
    rss_peak: u64,
    rss_after: u64,
    closed: usize,
    closed_after: Duration,
    health_held: bool,
    grpc_health_held: bool,
}

/// Opens [`SLOWLORIS`] connections to `target`, each sending `partial` and
/// then `one_more` byte once all are open, checks both health answers while
/// they are held, and counts those the verifier closes within
/// [`CLOSE_WINDOW`] of the flood being open.
async fn flood(verifier: &Verifier, target: SocketAddr, partial: &[u8], one_more: u8) -> Flood {
    assert!(health_answers(verifier.http).await);
    assert!(grpc_health_answers(verifier.grpc).await);
    let rss_before = status_kib(verifier.pid, "VmRSS");
    let mut held = Vec::with_capacity(SLOWLORIS);
    for _ in 0..SLOWLORIS {
        let mut stream = TcpStream::connect(target).await.expect("connect");
        stream.write_all(partial).await.expect("partial");
        held.push(stream);
    }
    let opened = Instant::now();
    for stream in &mut held {
        let _ = stream.write_all(&[one_more]).await;
    }
    let health_held = health_answers(verifier.http).await;
    let grpc_health_held = grpc_health_answers(verifier.grpc).await;

    let mut closed = 0;
    for stream in &mut held {
        let left = CLOSE_WINDOW.saturating_sub(opened.elapsed());
        if closed_within(stream, left).await {
            closed += 1;
        }
    }
    let closed_after = opened.elapsed();
    drop(held);
    let rss_peak = status_kib(verifier.pid, "VmHWM");
    let rss_after = status_kib(verifier.pid, "VmRSS");
    Flood {
        rss_before,
        rss_peak,
        rss_after,
        closed,
        closed_after,
        health_held,
        grpc_health_held,
    }
}

impl Flood {
    /// Asserts what must hold, with at most `kib_each` of RSS growth per
    /// connection: the issue measured 400 KiB each (243 MiB for 600).
    fn check(&self, door: &str, kib_each: u64) {
        eprintln!(
            "slowloris on the {door} door: {SLOWLORIS} connections, {} closed by the verifier \
             within {:.1} s of opening (header timeout {HEADER_TIMEOUT_SECONDS} s); \
             VmRSS before {} KiB, peak while held {} KiB, after {} KiB",
            self.closed,
            self.closed_after.as_secs_f64(),
            self.rss_before,
            self.rss_peak,
            self.rss_after,
        );
        assert!(
            self.health_held,
            "/health answers while {SLOWLORIS} slowloris connections are open"
        );
        assert!(
            self.grpc_health_held,
            "gRPC Health/Check answers while {SLOWLORIS} slowloris connections are open"
        );
        assert_eq!(self.closed, SLOWLORIS, "slowloris connections left open");
        let bound = kib_each * SLOWLORIS as u64;
        assert!(
            self.rss_peak.saturating_sub(self.rss_before) < bound,
            "RSS grew from {} to {} KiB, more than {bound} KiB",
            self.rss_before,
            self.rss_peak
        );
    }
}

#[tokio::test]
async fn slowloris_connections_are_closed_after_the_header_timeout_with_rss_bounded() {
    let _one_flood = FLOODS.lock().await;
    let started = Instant::now();
    let verifier = spawn_verifier();
    // A request head that never ends.
    let flood = flood(
        &verifier,
        verifier.http,
        b"POST /verify HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        b'a',
    )
    .await;
    assert!(health_answers(verifier.http).await);
    drop(verifier.child);
    // A half-read head costs kilobytes: 32 KiB each (64 MiB) is a wide bound.
    flood.check("HTTP", 32);
    eprintln!(
        "HTTP flood test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn grpc_preface_slowloris_connections_are_closed_after_the_header_timeout() {
    let _one_flood = FLOODS.lock().await;
    let started = Instant::now();
    let verifier = spawn_verifier();
    // 16 of the preface's 24 bytes, then one more: never idle, never done.
    let flood = flood(&verifier, verifier.grpc, b"PRI * HTTP/2.0\r\n", b'\r').await;
    assert!(grpc_health_answers(verifier.grpc).await);
    drop(verifier.child);
    // An HTTP/2 connection starts with its read and write buffers, about
    // 32 KiB measured: 64 KiB each (125 MiB) bounds it.
    flood.check("gRPC", 64);
    eprintln!(
        "gRPC flood test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Sends a keep-alive `GET /health` on `stream` and reads the whole answer;
/// its status, or `None` when the connection ended instead.
async fn keep_alive_health(stream: &mut TcpStream) -> Option<u16> {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let head_end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    // The body too, so that the next answer starts clean.
    while got.len() < head_end + length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Some(status)
}

/// One HTTP/2 frame: type, flags, payload.
async fn h2_frame(stream: &mut (impl AsyncRead + Unpin)) -> Option<(u8, u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await.ok()?;
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await.ok()?;
    Some((header[3], header[4], payload))
}

const H2_SETTINGS: u8 = 0x4;
const H2_PING: u8 = 0x6;
const H2_ACK: u8 = 0x1;

/// An HTTP/2 connection the server has answered: preface and SETTINGS sent,
/// the server's SETTINGS read.
async fn h2_open(addr: SocketAddr) -> Option<TcpStream> {
    let stream = TcpStream::connect(addr).await.ok()?;
    h2_start(stream).await
}

async fn h2_start<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> Option<S> {
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .ok()?;
    loop {
        let (kind, flags, _) = h2_frame(&mut stream).await?;
        if kind == H2_SETTINGS && flags & H2_ACK == 0 {
            return Some(stream);
        }
    }
}

/// True when the server acknowledges a PING on `stream`: it is still open.
async fn h2_ping(stream: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> bool {
    let payload = *b"casfcap!";
    let mut frame = vec![0, 0, 8, H2_PING, 0, 0, 0, 0, 0];
    frame.extend_from_slice(&payload);
    if stream.write_all(&frame).await.is_err() {
        return false;
    }
    loop {
        match h2_frame(stream).await {
            None => return false,
            Some((H2_PING, flags, got)) if flags & H2_ACK != 0 && got == payload => return true,
            Some(_) => {}
        }
    }
}

/// Generous bounds for things that happen at once or after the 3 s idle
/// timeout; only reached when something is wrong.
const AT_ONCE: Duration = Duration::from_secs(5);
const IDLE_CLOSE: Duration = Duration::from_secs(15);

async fn http_door_at_its_cap(http: SocketAddr) {
    // Two connections provably admitted: each is served.
    let mut first = TcpStream::connect(http).await.expect("connect");
    assert_eq!(keep_alive_health(&mut first).await, Some(200));
    let mut second = TcpStream::connect(http).await.expect("connect");
    assert_eq!(keep_alive_health(&mut second).await, Some(200));
    // A third, with a whole request, is closed without an answer: refused,
    // not timed out (an admitted one would be answered).
    let mut third = TcpStream::connect(http).await.expect("connect");
    let _ = third
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let refused_at = Instant::now();
    assert!(
        refused_within(&mut third, AT_ONCE).await,
        "a connection over the HTTP door's cap is closed unanswered"
    );
    eprintln!(
        "HTTP door over the cap: closed after {:?}",
        refused_at.elapsed()
    );
    // Both slots were still held then: both connections still answer.
    assert_eq!(keep_alive_health(&mut first).await, Some(200));
    assert_eq!(keep_alive_health(&mut second).await, Some(200));
    // The idle timeout closes them and /health gets a slot again.
    assert!(closed_within(&mut first, IDLE_CLOSE).await);
    assert!(closed_within(&mut second, IDLE_CLOSE).await);
    assert!(eventually(AT_ONCE, || health_answers(http)).await);
}

async fn grpc_door_at_its_cap(grpc: SocketAddr) {
    let mut first = h2_open(grpc).await.expect("first admitted");
    let mut second = h2_open(grpc).await.expect("second admitted");
    let mut third = TcpStream::connect(grpc).await.expect("connect");
    let _ = third.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let refused_at = Instant::now();
    assert!(
        refused_within(&mut third, AT_ONCE).await,
        "a connection over the gRPC door's cap is closed without a SETTINGS frame"
    );
    eprintln!(
        "gRPC door over the cap: closed after {:?}",
        refused_at.elapsed()
    );
    assert!(h2_ping(&mut first).await, "first still open");
    assert!(h2_ping(&mut second).await, "second still open");
    assert!(closed_within(&mut first, IDLE_CLOSE).await);
    assert!(closed_within(&mut second, IDLE_CLOSE).await);
    assert!(eventually(AT_ONCE, || grpc_health_answers(grpc)).await);
}

#[tokio::test]
async fn a_door_at_its_cap_closes_one_more_connection_and_idle_ones_free_their_slots() {
    let app = spawn_app_with(&[
        ("CASF_MAX_CONNECTIONS", "2"),
        ("CASF_IDLE_TIMEOUT_SECONDS", "3"),
        ("CASF_HTTP_HEADER_TIMEOUT_SECONDS", "5"),
    ])
    .await;
    let http = app
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let grpc = app
        .grpc
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    tokio::join!(http_door_at_its_cap(http), grpc_door_at_its_cap(grpc));
}

/// A TLS connection to the gRPC door, handshake done.
async fn tls_to(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    connector.connect(name, tcp).await.expect("handshake")
}

#[tokio::test]
async fn with_tls_the_grpc_preface_is_counted_decrypted_after_the_handshake() {
    let pki = crate::pki::TestPki::new();
    let app = spawn_app_with(&[
        ("CASF_TLS_CERT", &pki.shown("server.pem")),
        ("CASF_TLS_KEY", &pki.shown("server.key")),
        ("CASF_HTTP_HEADER_TIMEOUT_SECONDS", "1"),
        ("CASF_IDLE_TIMEOUT_SECONDS", "30"),
    ])
    .await;
    let grpc: SocketAddr = app
        .grpc
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let tls = casf_verifier::config::ClientTls {
        ca: Some(pki.path("ca.pem")),
        cert: None,
        key: None,
    };
    let config = casf_verifier::tls::client_config("test", &tls).expect("client TLS");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));

    // Part of the preface inside TLS records: closed by the header timeout,
    // long before the idle one.
    let mut slow = tls_to(&connector, grpc).await;
    slow.write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("partial");
    slow.flush().await.expect("flush");
    assert!(
        closed_within(&mut slow, Duration::from_secs(10)).await,
        "a TLS connection without the preface is closed"
    );

    // The whole preface: open past the header timeout, until idle.
    let past_the_header_timeout = Duration::from_secs(3);
    let mut done = h2_start(tls_to(&connector, grpc).await)
        .await
        .expect("the server's SETTINGS");
    assert!(
        !closed_within(&mut done, past_the_header_timeout).await,
        "open {past_the_header_timeout:?} after a complete preface"
    );
    assert!(h2_ping(&mut done).await, "still answering");
}

#[tokio::test]
async fn an_unfinished_h2_preface_on_the_http_door_is_closed_by_the_header_timeout() {
    let app = spawn_app_with(&[
        ("CASF_HTTP_HEADER_TIMEOUT_SECONDS", "1"),
        ("CASF_IDLE_TIMEOUT_SECONDS", "30"),
    ])
    .await;
    let http: SocketAddr = app
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    // The HTTP door serves HTTP/2 with prior knowledge too, and hyper's
    // header timeout starts only once the preface has told HTTP/2 from
    // HTTP/1: 23 of its 24 bytes would otherwise hold the connection until
    // the idle timeout (and a byte now and then, for ever).
    let mut slow = TcpStream::connect(http).await.expect("connect");
    slow.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r")
        .await
        .expect("partial");
    assert!(
        closed_within(&mut slow, Duration::from_secs(10)).await,
        "closed long before the 30 s idle timeout"
    );
    // HTTP/1 and HTTP/2 requests are still served.
    let (status, _) = app.get("/health").await;
    assert_eq!(status, 200);
    let mut h2 = h2_open(http).await.expect("HTTP/2 with prior knowledge");
    assert!(h2_ping(&mut h2).await);
}
