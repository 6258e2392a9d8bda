//! The HTTP server loop. It accepts connections itself (rather than through `axum::serve`) so
//! that no client can hold a connection, or a slot, by being slow:
//!
//! - a connection must deliver a request's headers within `HEADER_READ_TIMEOUT` of opening, or
//!   of the previous answer: the same timer closes idle keep-alive connections and half-sent
//!   headers (a slowloris);
//! - a request's body must arrive within `BODY_READ_TIMEOUT` of its headers: past it, 408
//!   `REQUEST_TIMEOUT` (the deadline rides on the request as a [`BodyDeadline`], read by
//!   [`super::extract::read_body`]);
//! - one source address holds at most `MAX_CONNECTIONS_PER_ADDRESS` connections at once; a
//!   connection past it is closed as soon as it is accepted, before a byte is read;
//! - a write that stays pending for `WRITE_STALL_TIMEOUT` closes the connection
//!   ([`StallGuard`]): a client that stops reading fills its socket's buffers, hyper then stops
//!   polling the response body, and nothing else would ever notice (an event stream would hold
//!   its slot for good).
//!
//! Shutdown: when `stop` fires the listener is dropped (new connections are refused), every open
//! connection finishes its request in flight and closes, and [`serve`] returns.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// When the body of a request must have arrived; set by [`serve`] as the headers are read.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub tokio::time::Instant);

/// The bounds [`serve`] puts on every connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// From a connection's opening, or its previous answer, to the end of the next headers.
    pub header_read_timeout: Duration,
    /// From the end of a request's headers to the end of its body.
    pub body_read_timeout: Duration,
    /// Connections one source address may hold open at once.
    pub max_per_address: usize,
    /// How long one write may stay pending (the peer reads nothing) before the connection is
    /// closed.
    pub write_stall_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` fires, then drains open connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
) {
    let open = Arc::new(OpenConnections::new(limits.max_per_address));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, or a connection reset before it was accepted: wait
                // a moment rather than spin, and keep serving the open connections.
                tracing::warn!(error = %err, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = open.enter(peer.ip()) else {
            // Closed before a byte is read: the address already holds its share.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let body_read_timeout = limits.body_read_timeout;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let deadline = tokio::time::Instant::now() + body_read_timeout;
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(BodyDeadline(deadline));
            app.clone().oneshot(request.map(Body::new))
        });
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(StallGuard::new(stream, limits.write_stall_timeout)),
                service,
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection's IO whose writes fail with `TimedOut` once one has stayed pending for
/// `bound`: hyper then ends the connection, dropping the response body (and with it an event
/// stream's slot). The timer is armed only when a write is refused for want of room, so a
/// connection whose writes go through costs one branch per write.
struct StallGuard<T> {
    io: T,
    bound: Duration,
    /// Made at the first stall, re-armed at each later one.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the last write was left pending, and so the timer runs.
    stalled: bool,
}

impl<T> StallGuard<T> {
    fn new(io: T, bound: Duration) -> Self {
        Self {
            io,
            bound,
            timer: None,
            stalled: false,
        }
    }

    /// What a write's outcome becomes: a pending write arms the timer (registering the task
    /// with it, so the connection is polled again when it fires) unless it is armed already;
    /// past the bound it is an error. Any progress disarms it.
    fn watch<R>(
        &mut self,
        polled: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        let deadline = Instant::now() + self.bound;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !std::mem::replace(&mut self.stalled, true) {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer read nothing for the write stall timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    // A TCP stream's flush and shutdown never wait for the peer: only writes are watched.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Open connections per source address, bounded.
struct OpenConnections {
    max_per_address: usize,
    by_address: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of an address; leaving it (on drop) frees the address's slot.
struct Slot {
    open: Arc<OpenConnections>,
    address: IpAddr,
}

impl OpenConnections {
    fn new(max_per_address: usize) -> Self {
        Self {
            max_per_address,
            by_address: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more connection from `address`, or `None` when it holds its maximum.
    fn enter(self: &Arc<Self>, address: IpAddr) -> Option<Slot> {
        let mut by_address = self.by_address.lock().expect("never poisoned");
        let count = by_address.entry(address).or_insert(0);
        if *count >= self.max_per_address {
            return None;
        }
        *count += 1;
        Some(Slot {
            open: self.clone(),
            address,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_address = self.open.by_address.lock().expect("never poisoned");
        if let Some(count) = by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_it_back_on_close() {
        let open = Arc::new(OpenConnections::new(2));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let first = open.enter(a).unwrap();
        let _second = open.enter(a).unwrap();
        assert!(open.enter(a).is_none());
        assert!(open.enter(b).is_some(), "another address is not affected");
        drop(first);
        assert!(open.enter(a).is_some());
    }

    /// Writes into a pipe of 16 bytes whose reader `peer` reads only when told.
    fn guarded_pipe(
        bound: Duration,
    ) -> (StallGuard<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (ours, peer) = tokio::io::duplex(16);
        (StallGuard::new(ours, bound), peer)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_pending_past_the_bound_fails() {
        use tokio::io::AsyncWriteExt as _;
        let (mut guarded, _peer) = guarded_pipe(Duration::from_secs(2));
        guarded.write_all(&[0; 16]).await.unwrap();
        let started = Instant::now();
        let err = guarded.write_all(b"more").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_now_and_then_is_never_timed_out() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut guarded, mut peer) = guarded_pipe(Duration::from_secs(2));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buffer = [0u8; 8];
            while got < 160 {
                // Each wait is under the bound; together they are far over it.
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                got += peer.read(&mut buffer).await.unwrap();
            }
        });
        let started = Instant::now();
        guarded.write_all(&[0; 160]).await.unwrap();
        reader.await.unwrap();
        assert!(started.elapsed() > Duration::from_secs(20));
    }

    #[test]
    fn a_closed_address_leaves_no_entry() {
        let open = Arc::new(OpenConnections::new(1));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        drop(open.enter(a));
        assert!(open.by_address.lock().unwrap().is_empty());
    }
}
