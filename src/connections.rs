//! What one client connection may cost, on both doors. Without limits a
//! client holding unfinished headers, or many idle keep-alive connections,
//! keeps memory and file descriptors for as long as it likes, until
//! `/health` stops answering. So each door has:
//!
//! - a cap on open connections (`CASF_MAX_CONNECTIONS`): one more is
//!   accepted and closed at once, so the backlog never fills with clients
//!   that wait forever; slots come back as connections end or time out;
//! - an idle timeout (`CASF_IDLE_TIMEOUT_SECONDS`): a connection the client
//!   sent nothing on for that long is closed (HTTP keep-alive, a gRPC peer
//!   gone silent; Envoy's HTTP/2 pings answer count as traffic);
//! - a header read timeout (`CASF_HTTP_HEADER_TIMEOUT_SECONDS`), against
//!   slowloris clients that are never idle because they send a byte now and
//!   then: an HTTP/1 request head not complete in that time closes the
//!   connection (hyper enforces it), and so does an HTTP/2 client preface
//!   (`PRI * HTTP/2.0…`, 24 bytes) on either door (checked here: hyper has
//!   no such timeout, and a dribbled preface would hold a slot forever; on
//!   the HTTP door, hyper's HTTP/1 timer starts only once the first bytes
//!   differ from the preface). With TLS, the handshake must finish within
//!   that time too, and the preface's time starts after it.
//!
//! The preface check costs no timer of its own: until the preface is in,
//! the idle timer of [`Limited`] is capped at the preface deadline. On the
//! HTTP door, bytes that stop matching the preface lift the cap (HTTP/1);
//! on the gRPC door they do not (h2 refuses a wrong preface anyway).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};

use crate::door_tls::{DoorTls, TlsDoor};
use crate::peer::PeerIdentity;

pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// How long the accept loop pauses after an error such as EMFILE, so that
/// it does not spin while no descriptor is free.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Per door.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection that holds one of its door's slots until it is dropped, and
/// fails its reads once the client has sent nothing for `idle`, or, while a
/// `cap` is set, once the cap has passed however much the client sends.
pub struct Limited {
    inner: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The HTTP/2 preface deadline, until the preface is in (or, on the
    /// HTTP door, turns out to be HTTP/1).
    cap: Option<Instant>,
    _slot: OwnedSemaphorePermit,
}

impl Limited {
    fn new(inner: TcpStream, idle: Duration, slot: OwnedSemaphorePermit) -> Self {
        Limited {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            cap: None,
            _slot: slot,
        }
    }

    /// Reads fail from `at` on, whatever arrives, until [`Self::lift_cap`].
    fn set_cap(&mut self, at: Instant) {
        self.cap = Some(at);
        let next = self.deadline.deadline().min(at);
        self.deadline.as_mut().reset(next);
    }

    /// Back to the idle timeout alone, counted from now.
    fn lift_cap(&mut self) {
        self.cap = None;
        let next = Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let now = Instant::now();
                    let mut next = now + self.idle;
                    if let Some(cap) = self.cap {
                        // Bytes that keep coming (TLS records with no
                        // preface in them) do not stretch the cap.
                        if now >= cap {
                            return Poll::Ready(Err(no_preface()));
                        }
                        next = next.min(cap);
                    }
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) if self.cap.is_some() => Poll::Ready(Err(no_preface())),
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "idle connection closed",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

fn no_preface() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "HTTP/2 preface not received within the header timeout",
    )
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An admitted connection, in plaintext or TLS, with what the transport
/// proved about its peer. The gRPC door hands the [`PeerIdentity`] to each
/// call as its connect info; the HTTP door puts it in each request's
/// extensions.
pub struct DoorStream {
    io: DoorIo,
    peer: PeerIdentity,
    preface: Preface,
}

/// How far a connection is through the HTTP/2 preface, while its
/// [`Limited`] has a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preface {
    /// No cap (any more).
    Done,
    /// `seen` bytes of the preface are in; `or_http1`: bytes that differ
    /// from it lift the cap (the HTTP door, where hyper then times HTTP/1).
    Awaited { seen: usize, or_http1: bool },
    /// Bytes that are not the preface, on the gRPC door: the cap stays.
    Wrong,
}

enum DoorIo {
    Plain(Limited),
    Tls(Box<tokio_rustls::server::TlsStream<Limited>>),
}

impl DoorStream {
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// `io` as is, or after a TLS handshake that must end within `timeout`
    /// (the header timeout: a stalled handshake is a slowloris too). `None`
    /// when the handshake fails: no certificate, a wrong one, plaintext.
    async fn open(
        io: Limited,
        remote: SocketAddr,
        tls: Option<(&DoorTls, TlsDoor)>,
        timeout: Duration,
    ) -> Option<DoorStream> {
        let Some((tls, door)) = tls else {
            return Some(DoorStream {
                io: DoorIo::Plain(io),
                peer: PeerIdentity {
                    sans: Vec::new(),
                    remote: Some(remote),
                },
                preface: Preface::Done,
            });
        };
        let failure = match tokio::time::timeout(timeout, tls.acceptor(door).accept(io)).await {
            Ok(Ok(stream)) => {
                let peer = tls.peer_identity(stream.get_ref().1, Some(remote));
                return Some(DoorStream {
                    io: DoorIo::Tls(Box::new(stream)),
                    peer,
                    preface: Preface::Done,
                });
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("not complete within {timeout:?}"),
        };
        tls.handshake_failed(door);
        tracing::debug!(door = door.as_str(), %remote, error = %failure, "TLS handshake failed");
        None
    }
}

impl DoorStream {
    /// From now (after any TLS handshake), reads fail once `within` has
    /// passed without the HTTP/2 client preface, read as decrypted; with
    /// `or_http1`, unless the first bytes are not the preface.
    fn expect_h2_preface(&mut self, within: Duration, or_http1: bool) {
        self.preface = Preface::Awaited { seen: 0, or_http1 };
        self.limited().set_cap(Instant::now() + within);
    }

    /// Follows the preface through `got`, the bytes just read.
    fn saw(&mut self, got: &[u8]) {
        let Preface::Awaited { seen, or_http1 } = self.preface else {
            return;
        };
        let want = &H2_PREFACE[seen..];
        let n = got.len().min(want.len());
        self.preface = if got[..n] != want[..n] {
            if or_http1 {
                Preface::Done
            } else {
                Preface::Wrong
            }
        } else if seen + n == H2_PREFACE.len() {
            Preface::Done
        } else {
            Preface::Awaited {
                seen: seen + n,
                or_http1,
            }
        };
        if self.preface == Preface::Done {
            self.limited().lift_cap();
        }
    }

    fn limited(&mut self) -> &mut Limited {
        match &mut self.io {
            DoorIo::Plain(io) => io,
            DoorIo::Tls(io) => io.get_mut().0,
        }
    }
}

impl AsyncRead for DoorStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = match &mut self.io {
            DoorIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            DoorIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        };
        if matches!(self.preface, Preface::Awaited { .. }) && matches!(read, Poll::Ready(Ok(()))) {
            self.saw(&buf.filled()[before..]);
        }
        read
    }
}

impl AsyncWrite for DoorStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            DoorIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            DoorIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            DoorIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            DoorIo::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            DoorIo::Plain(io) => io.is_write_vectored(),
            DoorIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            DoorIo::Plain(io) => Pin::new(io).poll_flush(cx),
            DoorIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            DoorIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            DoorIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// tonic puts this into every call's extensions, so the ext_authz door reads
/// the peer with `request.extensions().get::<PeerIdentity>()`.
impl tonic::transport::server::Connected for DoorStream {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

/// The HTTP door's service for one connection: the router, with the
/// connection's [`PeerIdentity`] added to each request's extensions.
struct WithPeer {
    inner: TowerToHyperService<Router>,
    peer: PeerIdentity,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for WithPeer {
    type Response = <TowerToHyperService<Router> as hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
    >>::Response;
    type Error = <TowerToHyperService<Router> as hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
    >>::Error;
    type Future = <TowerToHyperService<Router> as hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
    >>::Future;

    fn call(&self, mut request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.peer.clone());
        self.inner.call(request)
    }
}

/// A door's slots: a connection past the cap is closed as it is accepted.
#[derive(Clone)]
pub struct Slots {
    semaphore: Arc<Semaphore>,
    limits: ConnectionLimits,
    door: &'static str,
}

impl Slots {
    pub fn new(limits: ConnectionLimits, door: &'static str) -> Self {
        Slots {
            semaphore: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            door,
        }
    }

    /// The accepted stream with its slot, or `None` (and the stream closed)
    /// when every slot is taken.
    pub fn admit(&self, stream: TcpStream) -> Option<Limited> {
        // TCP_NODELAY, so that no part of a response waits for the client's ACK.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set on a connection");
        }
        match self.semaphore.clone().try_acquire_owned() {
            Ok(slot) => Some(Limited::new(stream, self.limits.idle_timeout, slot)),
            Err(_) => {
                tracing::debug!(
                    door = self.door,
                    max = self.limits.max_connections,
                    "connection refused: the door is at CASF_MAX_CONNECTIONS"
                );
                None
            }
        }
    }

    /// Waits until every admitted connection has ended.
    async fn all_returned(&self) {
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        let _ = self.semaphore.acquire_many(all).await;
    }
}

/// Serves `app` on `listener` with `limits` until `shutdown` resolves, then
/// lets open requests finish (idle keep-alive connections close at once).
/// With `tls`, every connection is HTTPS. A connection that starts an
/// HTTP/2 preface must finish it within the header timeout.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<Arc<DoorTls>>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let slots = Slots::new(limits, "http");
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: the listener itself is fine.
                    tracing::debug!(%error, "HTTP accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(io) = slots.admit(stream) else {
            continue;
        };
        let builder = builder.clone();
        let app = app.clone();
        let tls = tls.clone();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let tls = tls.as_deref().map(|tls| (tls, TlsDoor::Http));
            let opened = DoorStream::open(io, remote, tls, limits.header_timeout);
            let mut io = tokio::select! {
                opened = opened => match opened {
                    Some(io) => io,
                    None => return,
                },
                _ = stopping.wait_for(|stop| *stop) => return,
            };
            io.expect_h2_preface(limits.header_timeout, true);
            let service = WithPeer {
                inner: TowerToHyperService::new(app),
                peer: io.peer().clone(),
            };
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(connection);
            let mut draining = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::trace!(%error, "HTTP connection ended");
                        }
                        break;
                    }
                    _ = stopping.wait_for(|stop| *stop), if !draining => {
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    stop.send_replace(true);
    slots.all_returned().await;
    Ok(())
}

/// The gRPC door's accepted connections, each holding a slot, for tonic;
/// with `tls`, after their handshake. Handshakes run in their own tasks, so
/// a slow one does not hold up the next accept. Each must then deliver the
/// HTTP/2 preface within the header timeout.
pub fn grpc_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: Option<Arc<DoorTls>>,
) -> impl tokio_stream::Stream<Item = io::Result<DoorStream>> {
    let slots = Slots::new(limits, "grpc");
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<DoorStream>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // tonic dropped the stream: it stopped accepting.
                () = tx.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Passed on: tonic logs it and keeps accepting.
                    if tx.send(Err(error)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Some(io) = slots.admit(stream) else {
                continue;
            };
            let tx = tx.clone();
            let handshake = tls.is_some();
            let tls = tls.clone();
            let open = async move {
                let tls = tls.as_deref().map(|tls| (tls, TlsDoor::Grpc));
                if let Some(mut io) = DoorStream::open(io, remote, tls, limits.header_timeout).await
                {
                    io.expect_h2_preface(limits.header_timeout, false);
                    let _ = tx.send(Ok(io)).await;
                }
            };
            if handshake {
                tokio::spawn(open);
            } else {
                open.await;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client socket and the server side of it as a door holds it:
    /// `or_http1` false for the gRPC door, true for the HTTP door.
    async fn pair(header_timeout: Duration, or_http1: bool) -> (TcpStream, DoorStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (stream, remote) = listener.accept().await.expect("accept");
        let limits = ConnectionLimits {
            header_timeout,
            idle_timeout: Duration::from_secs(60),
            max_connections: 1,
        };
        let io = Slots::new(limits, "test").admit(stream).expect("a slot");
        let mut door = DoorStream::open(io, remote, None, header_timeout)
            .await
            .expect("plaintext opens");
        door.expect_h2_preface(header_timeout, or_http1);
        (client, door)
    }

    /// Reads until an error, bounded far below the 60 s idle timeout so that
    /// only the preface cap can end it; the error and the bytes read.
    async fn read_until_failure(door: &mut DoorStream) -> (io::Error, usize) {
        let mut got = 0;
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match door.read(&mut buf).await {
                    Ok(0) => panic!("the client never closes"),
                    Ok(n) => got += n,
                    Err(error) => return (error, got),
                }
            }
        })
        .await
        .expect("reads fail long before the idle timeout")
    }

    /// True when `door` is still open `wait` after the header timeout.
    async fn still_open(door: &mut DoorStream, wait: Duration) -> bool {
        let mut buf = [0u8; 8];
        tokio::time::timeout(wait, door.read(&mut buf))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_dribbled_preface_fails_reads_at_the_header_timeout_not_the_idle_one() {
        for or_http1 in [false, true] {
            let header_timeout = Duration::from_millis(200);
            let (mut client, mut door) = pair(header_timeout, or_http1).await;
            let opened = Instant::now();
            // One byte every 20 ms, never the 24th: never idle for long.
            let dribble = tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(20));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for byte in &H2_PREFACE[..H2_PREFACE.len() - 1] {
                    every.tick().await;
                    if client.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                }
                client
            });
            let (error, got) = read_until_failure(&mut door).await;
            assert_eq!(error.kind(), io::ErrorKind::TimedOut);
            assert!(error.to_string().contains("preface"), "{error}");
            assert!(got < H2_PREFACE.len());
            assert!(opened.elapsed() >= header_timeout);
            drop(dribble.await);
        }
    }

    #[tokio::test]
    async fn a_complete_preface_leaves_only_the_idle_timeout() {
        for or_http1 in [false, true] {
            let header_timeout = Duration::from_millis(100);
            let (mut client, mut door) = pair(header_timeout, or_http1).await;
            client.write_all(H2_PREFACE).await.expect("preface");
            let mut preface = [0u8; H2_PREFACE.len()];
            door.read_exact(&mut preface).await.expect("the preface");
            assert_eq!(&preface, H2_PREFACE);
            assert!(still_open(&mut door, header_timeout * 5).await);
            client.write_all(b"x").await.expect("one more byte");
            let mut buf = [0u8; 8];
            assert_eq!(door.read(&mut buf).await.expect("read"), 1);
        }
    }

    #[tokio::test]
    async fn on_the_http_door_http1_bytes_lift_the_cap_for_hypers_own_timeout() {
        let header_timeout = Duration::from_millis(100);
        let (mut client, mut door) = pair(header_timeout, true).await;
        // "PO" differs from "PR": HTTP/1, whose head hyper times.
        client.write_all(b"PO").await.expect("write");
        let mut buf = [0u8; 8];
        let mut got = 0;
        while got < 2 {
            got += door.read(&mut buf).await.expect("read");
        }
        assert!(still_open(&mut door, header_timeout * 5).await);
    }

    #[tokio::test]
    async fn on_the_grpc_door_bytes_that_are_not_the_preface_keep_the_cap() {
        let header_timeout = Duration::from_millis(100);
        let (mut client, mut door) = pair(header_timeout, false).await;
        client
            .write_all(b"POST / HTTP/1.1\r\n")
            .await
            .expect("write");
        let (error, _) = read_until_failure(&mut door).await;
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
