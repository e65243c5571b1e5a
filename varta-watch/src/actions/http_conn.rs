//! Bounds on /metrics connections, so scrapers (or anyone who can connect) cannot take
//! the daemon's descriptors or hold its server: at most [`MAX_CONNECTIONS`] accepted at
//! once (more wait in the kernel's listen backlog, costing the daemon nothing); a
//! connection that sends nothing for [`IDLE_TIMEOUT`] (slow headers, idle keep-alive) or
//! lives longer than [`MAX_LIFETIME`] (a client that does not read) is closed.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep, sleep},
};

pub const MAX_CONNECTIONS: usize = 16;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_LIFETIME: Duration = Duration::from_secs(30);

pub struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl LimitedListener {
    pub fn new(inner: TcpListener) -> Self {
        LimitedListener {
            inner,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut failures = 0u64;
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => return (Conn::new(stream, permit), addr),
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning; log once per
                    // thousand.
                    if failures.is_multiple_of(1000) {
                        log::warn!("event=metrics_accept_failed error=\"{e}\"");
                    }
                    failures += 1;
                    sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection holding its permit, with an idle and a lifetime deadline.
pub struct Conn {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
    end: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit) -> Self {
        Conn {
            stream,
            _permit: permit,
            idle: Box::pin(sleep(IDLE_TIMEOUT)),
            end: Box::pin(sleep(MAX_LIFETIME)),
        }
    }

    /// Pending I/O: an error once a deadline has passed (hyper then closes).
    fn expired(&mut self, cx: &mut Context<'_>, reading: bool) -> bool {
        self.end.as_mut().poll(cx).is_ready() || (reading && self.idle.as_mut().poll(cx).is_ready())
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "metrics connection deadline")
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                self.idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
                Poll::Ready(result)
            }
            Poll::Pending if self.expired(cx, true) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Pending if self.expired(cx, false) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
