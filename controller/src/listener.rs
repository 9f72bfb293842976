//! What every port of the controller does with a connection before a server sees it, so that no
//! client can hold the process hostage with connections alone (`docs/limits.md`):
//!
//! - **A cap on connections** per port: at the cap the port accepts nothing more until one
//!   closes (the kernel's backlog queues, then refuses), rather than opening descriptors until
//!   the process has none left for its own files, Consul and the other ports.
//! - **First bytes within a deadline**: a connection whose client has not sent anything (the
//!   HTTP/2 preface, a request line) within `first_bytes` after it was accepted — after the TLS
//!   handshake on TLS ports — is closed, so idle connections cannot fill the cap.
//! - **An accept loop that backs off**: an accept that fails (out of file descriptors) waits,
//!   with the one backoff policy, and says so once, instead of spinning at 100 % CPU.
//!
//! [`Guarded`] carries a connection's place under the cap and its first-bytes deadline; the
//! servers read and write through it.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::IntoResponse as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::Connected;
use tracing::{info, warn};
use vmesh_retry::Backoff;
use vmesh_runtime::Shutdown;

/// The limits of one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// How long after it is accepted (after the TLS handshake, on a TLS port) a connection may
    /// stay silent.
    pub first_bytes: Duration,
    /// How long a TLS port's handshake may take.
    pub handshake: Duration,
}

/// The limits of an HTTP/2 (gRPC) server on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrpcLimits {
    /// Concurrent streams one client may open on one connection.
    pub max_streams_per_connection: u32,
    /// The largest message a client may send.
    pub max_message_bytes: usize,
}

/// How much a client may send on one stream, and on one connection, before the server reads it
/// (HTTP/2 flow-control windows). A larger message still arrives, as the server reads; the
/// windows bound what HTTP/2 buffers, not what a message may be.
pub const STREAM_WINDOW_BYTES: u32 = 1 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 2 << 20;

/// The largest request head (all header fields) an HTTP/2 client may send.
pub const MAX_HTTP2_HEADER_BYTES: u32 = 64 * 1024;

impl GrpcLimits {
    /// A tonic server with these limits (the message size is set per service), request headers
    /// of at most [`MAX_HTTP2_HEADER_BYTES`], the flow-control windows above, and at most 32
    /// streams a client opened and reset before the server saw them (HTTP/2 "rapid reset").
    pub fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(self.max_streams_per_connection)
            .http2_max_header_list_size(MAX_HTTP2_HEADER_BYTES)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .http2_max_pending_accept_reset_streams(Some(32))
    }
}

/// One accepted connection: its place under the port's cap (given back when it closes) and the
/// deadline for its first bytes.
pub struct Guarded<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
    /// Until the first byte is read.
    deadline: Option<Pin<Box<Sleep>>>,
    /// When the connection ends, if it has an end (its client certificate's expiry).
    lifetime: Option<Pin<Box<Sleep>>>,
    /// How long a write may wait for the client to read, when bounded.
    write_stall: Option<Duration>,
    /// Since when a write has been waiting.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> Guarded<T> {
    pub fn new(inner: T, permit: OwnedSemaphorePermit, first_bytes: Duration) -> Self {
        Guarded {
            inner,
            _permit: permit,
            deadline: Some(Box::pin(tokio::time::sleep(first_bytes))),
            lifetime: None,
            write_stall: None,
            stalled: None,
        }
    }

    /// Ends the connection (reads fail) after `lifetime`: a connection lives no longer than
    /// the client certificate it was opened with, so the client opens a new one with its
    /// renewed certificate (HTTP/2 clients otherwise keep one connection, and its handshake's
    /// certificate, for ever).
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(Box::pin(tokio::time::sleep(lifetime)));
        self
    }

    /// Closes the connection (with an error) when a write waits longer than `limit` for the
    /// client to read: a client that asks and never reads the answer does not keep its place.
    pub fn with_write_stall(mut self, limit: Duration) -> Self {
        self.write_stall = Some(limit);
        self
    }

    fn check_stall<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let Some(limit) = self.write_stall else {
            return polled;
        };
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stalled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing in time",
            )));
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(lifetime) = self.lifetime.as_mut() {
            if lifetime.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the client certificate of this connection expired",
                )));
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Some(deadline) = self.deadline.as_mut() {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => self.deadline = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing in time",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check_stall(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check_stall(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check_stall(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: Connected> Connected for Guarded<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A port's listener with its cap: accepts one connection at a time, waiting for room under the
/// cap and backing off when accepting fails.
pub struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    limits: Limits,
    /// The port's name, for the log.
    port: &'static str,
    backoff: Backoff,
    /// Whether the port is said to be full or failing (said once, until it recovers).
    full_said: bool,
    failing_said: bool,
}

impl Acceptor {
    pub fn new(listener: TcpListener, limits: Limits, port: &'static str) -> Self {
        Acceptor {
            listener,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            port,
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_secs(1)),
            full_said: false,
            failing_said: false,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection, with its place under the cap (waits for room; never fails).
    pub async fn accept(&mut self) -> (TcpStream, std::net::SocketAddr, OwnedSemaphorePermit) {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !self.full_said {
                    warn!(
                        port = self.port,
                        max = self.limits.max_connections,
                        "connection limit reached; new connections wait until one closes"
                    );
                    self.full_said = true;
                }
                // The semaphore is never closed.
                let Ok(p) = self.slots.clone().acquire_owned().await else {
                    return std::future::pending().await;
                };
                p
            }
        };
        if self.full_said && self.slots.available_permits() > self.limits.max_connections / 10 {
            info!(port = self.port, "below the connection limit again");
            self.full_said = false;
        }
        loop {
            match self.listener.accept().await {
                Ok((tcp, peer)) => {
                    if self.failing_said {
                        info!(port = self.port, "accepting connections again");
                        self.failing_said = false;
                    }
                    self.backoff.reset();
                    let _ = tcp.set_nodelay(true);
                    return (tcp, peer, permit);
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    let wait = self.backoff.next_delay();
                    if !self.failing_said {
                        warn!(port = self.port, error = %e, "cannot accept connections; retrying with backoff");
                        self.failing_said = true;
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// The next connection as a [`Guarded`] stream.
    pub async fn accept_guarded(&mut self) -> (Guarded<TcpStream>, std::net::SocketAddr) {
        let (tcp, peer, permit) = self.accept().await;
        (Guarded::new(tcp, permit, self.limits.first_bytes), peer)
    }
}

/// The connections of a plaintext gRPC port, for `serve_with_incoming`.
pub fn incoming(
    acceptor: Acceptor,
) -> Pin<Box<dyn futures::Stream<Item = io::Result<Guarded<TcpStream>>> + Send>> {
    Box::pin(futures::stream::unfold(
        acceptor,
        |mut acceptor| async move {
            let (io, _) = acceptor.accept_guarded().await;
            Some((Ok(io), acceptor))
        },
    ))
}

/// The limits of an HTTP/1 server (the admin port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// How long a client may take to send a request's headers (and how long a kept-alive
    /// connection may wait for its next request), how long a handler may take, and how long a
    /// response may wait for the client to read it.
    pub request_timeout: Duration,
}

/// The largest request head (request line and headers) the admin port reads.
pub const MAX_HTTP_HEAD_BYTES: usize = 64 * 1024;

/// Serves `router` over HTTP/1 on `acceptor`'s connections until `shutdown`, then lets requests
/// in flight finish (for at most one request timeout). Unlike `axum::serve`, every stage of a
/// request is bounded in time ([`HttpLimits`]) and its head in size ([`MAX_HTTP_HEAD_BYTES`]).
pub async fn serve_http1(
    mut acceptor: Acceptor,
    router: axum::Router,
    limits: HttpLimits,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout)
        .max_buf_size(MAX_HTTP_HEAD_BYTES);
    let service = TowerToHyperService::new(router);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (io, _) = tokio::select! {
            accepted = acceptor.accept_guarded() => accepted,
            () = shutdown.requested() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let service = service.clone();
        let handler = hyper::service::service_fn(move |request| {
            let answer = hyper::service::Service::call(&service, request);
            async move {
                match tokio::time::timeout(limits.request_timeout, answer).await {
                    Ok(answered) => answered,
                    Err(_) => Ok((
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "the request took too long\n",
                    )
                        .into_response()),
                }
            }
        });
        let connection = builder.serve_connection(
            TokioIo::new(io.with_write_stall(limits.request_timeout)),
            handler,
        );
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.requested() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    let drained = tokio::time::timeout(limits.request_timeout, async {
        while connections.join_next().await.is_some() {}
    });
    let _ = drained.await;
    Ok(())
}

/// Raises the soft limit on open files as far as the hard limit allows (up to `want`), and says
/// so: the default soft limit (1,024) is less than one port's connection cap.
pub fn raise_open_file_limit(want: u64) {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft);
    match rlimit::increase_nofile_limit(want) {
        Ok(now) => match before {
            Ok(before) if now > before => {
                info!(
                    from = before,
                    to = now,
                    "raised the soft limit on open files"
                )
            }
            _ => info!(limit = now, "the soft limit on open files"),
        },
        Err(e) => warn!(error = %e, "cannot raise the soft limit on open files"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn acceptor(max_connections: usize, first_bytes: Duration) -> Acceptor {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Acceptor::new(
            listener,
            Limits {
                max_connections,
                first_bytes,
                handshake: Duration::from_secs(10),
            },
            "test",
        )
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_first_bytes_deadline() {
        let mut acceptor = acceptor(4, Duration::from_millis(200)).await;
        let addr = acceptor.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (mut conn, _) = acceptor.accept_guarded().await;
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn a_connection_that_spoke_in_time_may_then_stay_quiet() {
        let mut acceptor = acceptor(4, Duration::from_millis(100)).await;
        let addr = acceptor.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut conn, _) = acceptor.accept_guarded().await;
        client.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        // Well past the deadline, the connection still reads what comes.
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.write_all(b"yo").await.unwrap();
            client
        });
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"yo");
        drop(later.await.unwrap());
    }

    #[tokio::test]
    async fn at_the_cap_the_next_connection_waits_until_one_closes() {
        let mut acceptor = acceptor(2, Duration::from_secs(10)).await;
        let addr = acceptor.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let (first, _) = acceptor.accept_guarded().await;
        let (_second, _) = acceptor.accept_guarded().await;
        let mut acceptor = tokio::spawn(async move {
            let (third, _) = acceptor.accept_guarded().await;
            (acceptor, third)
        });
        // The third is not accepted while two are open ...
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut acceptor)
                .await
                .is_err(),
            "a third connection was accepted over a cap of two"
        );
        // ... and is once one of them closes.
        drop(first);
        let accepted = tokio::time::timeout(Duration::from_secs(5), acceptor).await;
        assert!(
            accepted.is_ok(),
            "the waiting connection was never accepted"
        );
    }

    #[tokio::test]
    async fn a_write_the_client_never_reads_is_given_up_after_the_stall_limit() {
        let mut acceptor = acceptor(4, Duration::from_secs(10)).await;
        let addr = acceptor.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (conn, _) = acceptor.accept_guarded().await;
        let mut conn = conn.with_write_stall(Duration::from_millis(200));
        let chunk = vec![0u8; 64 * 1024];
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = conn.write_all(&chunk).await {
                    return e;
                }
            }
        })
        .await
        .expect("the stalled write was never given up");
        assert_eq!(outcome.kind(), io::ErrorKind::TimedOut);
    }

    /// An admin-like server with one slow handler, and a raw client.
    async fn http_server(
        request_timeout: Duration,
    ) -> (std::net::SocketAddr, vmesh_runtime::Supervisor) {
        let acceptor = acceptor(4, Duration::from_secs(10)).await;
        let addr = acceptor.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/fast", axum::routing::get(|| async { "fast\n" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    "slow\n"
                }),
            );
        let mut tasks = vmesh_runtime::Supervisor::new();
        let shutdown = tasks.shutdown();
        tasks.spawn(
            "http",
            serve_http1(acceptor, router, HttpLimits { request_timeout }, shutdown),
        );
        (addr, tasks)
    }

    async fn read_all(client: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
            .await
            .expect("the server never closed the connection");
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn a_handler_that_takes_too_long_is_answered_503() {
        let (addr, _tasks) = http_server(Duration::from_millis(300)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\nGET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_all(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains("fast\n"), "{answer}");
        assert!(answer.contains("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("the request took too long"), "{answer}");
    }

    #[tokio::test]
    async fn headers_sent_a_byte_at_a_time_do_not_hold_the_connection() {
        let (addr, _tasks) = http_server(Duration::from_millis(500)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET /fast HTTP/1.1\r\n").await.unwrap();
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 256];
        // One header byte every 100 ms: the connection is closed at the request timeout anyway.
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the trickling client was never cut off"
            );
            if client.write_all(b"x").await.is_err() {
                break;
            }
            // Closed (or answered, which ends the request as well).
            if let Ok(_read) =
                tokio::time::timeout(Duration::from_millis(100), client.read(&mut buf)).await
            {
                break;
            }
        }
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn a_kept_alive_connection_with_no_next_request_is_closed() {
        let (addr, _tasks) = http_server(Duration::from_millis(300)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_all(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    }
}
