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
//!   then: on the HTTP door, a request head not complete in that time closes
//!   the connection (hyper enforces it); on the gRPC door, the 24-byte
//!   HTTP/2 client preface not received in that time does (checked here:
//!   hyper's HTTP/2 server has no such timeout, and a dribbled preface would
//!   hold a slot forever). With TLS, the handshake must finish within that
//!   time too, and the preface's time starts after it.
//!
//! The preface check counts bytes, not their meaning (h2 rejects a wrong
//! preface itself) and costs no timer of its own: until the preface is in,
//! the idle timer of [`Limited`] is capped at the preface deadline.

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

/// The HTTP/2 client connection preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const H2_PREFACE_LEN: usize = 24;

/// A connection that holds one of its door's slots until it is dropped, and
/// fails its reads once the client has sent nothing for `idle`, or, while a
/// `cap` is set, once the cap has passed however much the client sends.
pub struct Limited {
    inner: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The gRPC door's preface deadline, until the preface is in.
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
    /// Bytes of the HTTP/2 preface still to come (gRPC door), else 0.
    preface_left: usize,
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
                preface_left: 0,
            });
        };
        let failure = match tokio::time::timeout(timeout, tls.acceptor(door).accept(io)).await {
            Ok(Ok(stream)) => {
                let peer = tls.peer_identity(stream.get_ref().1, Some(remote));
                return Some(DoorStream {
                    io: DoorIo::Tls(Box::new(stream)),
                    peer,
                    preface_left: 0,
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
    /// passed without the 24 bytes of the HTTP/2 client preface, counted as
    /// decrypted; the gRPC door's header timeout.
    fn expect_h2_preface(&mut self, within: Duration) {
        self.preface_left = H2_PREFACE_LEN;
        self.limited().set_cap(Instant::now() + within);
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
        if self.preface_left > 0 && matches!(read, Poll::Ready(Ok(()))) {
            let got = buf.filled().len() - before;
            self.preface_left = self.preface_left.saturating_sub(got);
            if self.preface_left == 0 {
                self.limited().lift_cap();
            }
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
/// With `tls`, every connection is HTTPS.
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
            let io = tokio::select! {
                opened = opened => match opened {
                    Some(io) => io,
                    None => return,
                },
                _ = stopping.wait_for(|stop| *stop) => return,
            };
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
                    io.expect_h2_preface(limits.header_timeout);
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

    const PREFACE: &[u8; H2_PREFACE_LEN] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// A client socket and the server side of it as the gRPC door holds it.
    async fn grpc_pair(header_timeout: Duration) -> (TcpStream, DoorStream) {
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
        let io = Slots::new(limits, "grpc").admit(stream).expect("a slot");
        let mut door = DoorStream::open(io, remote, None, header_timeout)
            .await
            .expect("plaintext opens");
        door.expect_h2_preface(header_timeout);
        (client, door)
    }

    #[tokio::test]
    async fn a_dribbled_preface_fails_reads_at_the_header_timeout_not_the_idle_one() {
        let header_timeout = Duration::from_millis(200);
        let (mut client, mut door) = grpc_pair(header_timeout).await;
        let opened = Instant::now();
        // One byte every 20 ms, never the 24th: never idle for long.
        let dribble = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(20));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for byte in &PREFACE[..H2_PREFACE_LEN - 1] {
                every.tick().await;
                if client.write_all(&[*byte]).await.is_err() {
                    break;
                }
            }
            client
        });
        let mut got = 0;
        let mut buf = [0u8; 64];
        // Bounded far below the 60 s idle timeout, so only the cap ends it.
        let error = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match door.read(&mut buf).await {
                    Ok(0) => panic!("the client never closes"),
                    Ok(n) => got += n,
                    Err(error) => return error,
                }
            }
        })
        .await
        .expect("reads fail long before the idle timeout");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("preface"), "{error}");
        assert!(got < H2_PREFACE_LEN);
        assert!(opened.elapsed() >= header_timeout);
        drop(dribble.await);
    }

    #[tokio::test]
    async fn a_complete_preface_leaves_only_the_idle_timeout() {
        let header_timeout = Duration::from_millis(100);
        let (mut client, mut door) = grpc_pair(header_timeout).await;
        client.write_all(PREFACE).await.expect("preface");
        let mut preface = [0u8; H2_PREFACE_LEN];
        door.read_exact(&mut preface).await.expect("the preface");
        assert_eq!(&preface, PREFACE);
        // Well past the header timeout, the connection is still open.
        let mut buf = [0u8; 8];
        let waited = tokio::time::timeout(header_timeout * 5, door.read(&mut buf)).await;
        assert!(waited.is_err(), "read ended: {waited:?}");
        client.write_all(b"x").await.expect("one more byte");
        assert_eq!(door.read(&mut buf).await.expect("read"), 1);
    }

    #[tokio::test]
    async fn without_the_preface_check_a_connection_waits_for_the_idle_timeout() {
        // The HTTP door's streams: hyper's header timeout covers them.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (stream, remote) = listener.accept().await.expect("accept");
        let limits = ConnectionLimits {
            header_timeout: Duration::from_millis(50),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1,
        };
        let io = Slots::new(limits, "http").admit(stream).expect("a slot");
        let mut door = DoorStream::open(io, remote, None, limits.header_timeout)
            .await
            .expect("plaintext opens");
        client.write_all(b"PRI").await.expect("write");
        let mut buf = [0u8; 8];
        assert_eq!(door.read(&mut buf).await.expect("read"), 3);
        let waited = tokio::time::timeout(Duration::from_millis(300), door.read(&mut buf)).await;
        assert!(waited.is_err(), "read ended: {waited:?}");
    }
}
