//! Bounds on HTTP connections, so that anyone who can connect (any pod can reach the
//! DaemonSet's port) can neither take the daemon's descriptors nor keep the kubelet's
//! probes and Prometheus's scrapes waiting:
//! - every connection is accepted at once (none waits in the kernel's backlog behind idle
//!   ones);
//! - at most [`MAX_CONNECTIONS`] are held, at most [`PER_SOURCE`] from one address; a new
//!   connection over either bound takes the place of a held one (of that source, or of
//!   all): the one idle longest, else the one whose request has been in flight longest
//!   (over [`FIRST_BYTE_TIMEOUT`]); when every held one is serving a fresh request the new
//!   one is closed;
//! - a connection that sends nothing for [`FIRST_BYTE_TIMEOUT`] after it is accepted, or
//!   for [`IDLE_TIMEOUT`] between requests, or lives longer than [`MAX_LIFETIME`] (a client
//!   that does not read), is closed.

use crate::sys::logger::event;
use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::{Instant, Sleep, sleep},
};

pub const MAX_CONNECTIONS: usize = 64;
pub const PER_SOURCE: usize = 8;
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(1);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_LIFETIME: Duration = Duration::from_secs(30);

/// What the listener knows of a held connection, shared with the connection itself.
#[derive(Debug)]
struct Slot {
    source: IpAddr,
    state: Mutex<SlotState>,
}

#[derive(Debug)]
struct SlotState {
    /// Bytes were read since hyper last flushed. Hyper flushes as soon as it has taken in
    /// what arrived (before answering), so this is true only while a read is being taken
    /// in: eviction in effect takes the connection whose last activity is oldest, and a
    /// handover waits on `unread`, not on this.
    busy: bool,
    /// Since when `busy` has been what it is.
    idle_since: Instant,
    /// Nothing read yet since it was accepted.
    unread: bool,
    /// The listener needs the place: the connection ends at its next poll.
    evicted: bool,
    waker: Option<Waker>,
}

pub struct LimitedListener {
    inner: TcpListener,
    held: Held,
}

/// The connections a listener holds, shared with whoever must know when they are done (a
/// handover waits for the requests in flight before the process exits), and whether the
/// listener accepts.
#[derive(Clone, Debug)]
pub struct Held {
    slots: Arc<Mutex<Vec<Weak<Slot>>>>,
    accepting: Arc<watch::Sender<bool>>,
}

impl Default for Held {
    fn default() -> Self {
        Held {
            slots: Arc::default(),
            accepting: Arc::new(watch::Sender::new(true)),
        }
    }
}

impl Held {
    /// Accepts nothing more until [`Held::resume_accepting`]: the connections queued in the
    /// kernel stay there for whoever holds the listening socket next. The held connections
    /// are served on: stopping the server task instead would shut down the ones whose
    /// request is not read yet without an answer (hyper's graceful shutdown closes a
    /// connection it counts as idle).
    pub fn stop_accepting(&self) {
        self.accepting.send_replace(false);
    }

    pub fn resume_accepting(&self) {
        self.accepting.send_replace(true);
    }

    /// Connections accepted less than [`FIRST_BYTE_TIMEOUT`] ago and not read from yet.
    pub fn unread(&self) -> usize {
        let Ok(held) = self.slots.lock() else {
            return 0;
        };
        held.iter()
            .filter_map(Weak::upgrade)
            .filter(|s| {
                s.state
                    .lock()
                    .is_ok_and(|st| st.unread && st.idle_since.elapsed() < FIRST_BYTE_TIMEOUT)
            })
            .count()
    }
}

impl LimitedListener {
    pub fn new(inner: TcpListener, held: Held) -> Self {
        LimitedListener { inner, held }
    }

    /// Makes room for a connection from `source`: `false` when none can be made.
    fn admit(&mut self, source: IpAddr) -> bool {
        let Ok(mut registry) = self.held.slots.lock() else {
            return false;
        };
        registry.retain(|w| w.strong_count() > 0);
        let held: Vec<Arc<Slot>> = registry.iter().filter_map(Weak::upgrade).collect();
        drop(registry);
        let same_source = held.iter().filter(|s| s.source == source).count();
        let full = if same_source >= PER_SOURCE {
            Some(Some(source))
        } else if held.len() >= MAX_CONNECTIONS {
            Some(None)
        } else {
            None
        };
        let Some(among) = full else { return true };
        // Idle ones first, longest idle first; then requests in flight for more than
        // FIRST_BYTE_TIMEOUT (a trickled request, a client that does not read), oldest
        // first: a real request is served in milliseconds.
        let now = Instant::now();
        let victim = held
            .iter()
            .filter(|s| among.is_none_or(|ip| s.source == ip))
            .filter_map(|s| {
                let st = s.state.lock().ok()?;
                let stuck = now.duration_since(st.idle_since) > FIRST_BYTE_TIMEOUT;
                (!st.evicted && (!st.busy || stuck)).then_some(((st.busy, st.idle_since), s))
            })
            .min_by_key(|(key, _)| *key)
            .map(|(_, s)| s.clone());
        match victim {
            Some(slot) => {
                slot.evict();
                true
            }
            None => false,
        }
    }
}

impl Slot {
    fn evict(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.evicted = true;
            if let Some(w) = st.waker.take() {
                w.wake();
            }
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        let mut failures = 0u64;
        // The sender lives in `self.held`: the waits below end only by a change of value.
        let mut accepting = self.held.accepting.subscribe();
        loop {
            if accepting.wait_for(|on| *on).await.is_err() {
                // Unreachable while `self.held` holds the sender; never spin.
                std::future::pending::<()>().await;
            }
            let accepted = tokio::select! {
                biased;
                _ = accepting.wait_for(|on| !*on) => continue,
                accepted = self.inner.accept() => accepted,
            };
            match accepted {
                Ok((stream, addr)) => {
                    if !self.admit(addr.ip()) {
                        // Every held connection is serving a request: this one waits for
                        // none of them (dropping it closes it).
                        continue;
                    }
                    let slot = Arc::new(Slot {
                        source: addr.ip(),
                        state: Mutex::new(SlotState {
                            busy: false,
                            idle_since: Instant::now(),
                            unread: true,
                            evicted: false,
                            waker: None,
                        }),
                    });
                    if let Ok(mut registry) = self.held.slots.lock() {
                        registry.push(Arc::downgrade(&slot));
                    }
                    return (Conn::new(stream, slot), addr);
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning; log once per
                    // thousand.
                    if failures.is_multiple_of(1000) {
                        event!(warn, "metrics_accept_failed", error:% = e);
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

/// An accepted connection with its place among the held ones and its deadlines.
pub struct Conn {
    stream: TcpStream,
    slot: Arc<Slot>,
    idle: Pin<Box<Sleep>>,
    end: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(stream: TcpStream, slot: Arc<Slot>) -> Self {
        Conn {
            stream,
            slot,
            idle: Box::pin(sleep(FIRST_BYTE_TIMEOUT)),
            end: Box::pin(sleep(MAX_LIFETIME)),
        }
    }

    /// Pending I/O: an error once a deadline has passed or the place was taken (hyper then
    /// closes).
    fn expired(&mut self, cx: &mut Context<'_>, reading: bool) -> bool {
        if let Ok(mut st) = self.slot.state.lock() {
            if st.evicted {
                return true;
            }
            st.waker = Some(cx.waker().clone());
        }
        self.end.as_mut().poll(cx).is_ready() || (reading && self.idle.as_mut().poll(cx).is_ready())
    }

    fn set_busy(&self, busy: bool) {
        if let Ok(mut st) = self.slot.state.lock() {
            if busy {
                st.unread = false;
            }
            if st.busy != busy {
                st.busy = busy;
                st.idle_since = Instant::now();
            }
        }
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
        if self.slot.state.lock().is_ok_and(|st| st.evicted) {
            return Poll::Ready(Err(timed_out()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.set_busy(true);
                }
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
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        if flushed.is_ready() {
            // The response is out: until the next request, this place may be taken.
            self.set_busy(false);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
