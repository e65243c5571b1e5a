//! Registers file descriptors with tokio's reactor.

use std::{io, os::fd::AsRawFd};

use tokio::io::{Interest, unix::AsyncFd};

/// Marks the types whose `as_raw_fd` is the one fd they own for their whole life: sockets,
/// `OwnedFd`, aya's maps and log reader.
pub trait OwnsFd: AsRawFd {}
impl OwnsFd for std::os::fd::OwnedFd {}
impl OwnsFd for std::os::unix::net::UnixDatagram {}
impl OwnsFd for std::net::UdpSocket {}
impl OwnsFd for aya::maps::RingBuf<aya::maps::MapData> {}
impl<T> OwnsFd for aya_log::EbpfLogger<T> {}

/// Watches `inner` for readability.
pub fn readable<T: OwnsFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `OwnsFd` types own their fd: it stays open, and `as_raw_fd` returns that same
    // fd, until they are dropped, which the AsyncFd owning them does last.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }.map_err(io::Error::from)
}

/// A socket watched for readability only while asked. Registered with the reactor, a socket
/// wakes the thread on every datagram even when no task waits for it: a datapath draining
/// on a timer unregisters it meanwhile (`epoll_ctl` twice per switch, not a wake-up per
/// datagram). Registering it again reports what is already queued.
pub struct Switchable<T: OwnsFd> {
    watched: Option<AsyncFd<T>>,
    parked: Option<T>,
}

impl<T: OwnsFd> Switchable<T> {
    /// Watched from the start.
    pub fn new(inner: T) -> io::Result<Self> {
        Ok(Switchable {
            watched: Some(readable(inner)?),
            parked: None,
        })
    }

    pub fn get_ref(&self) -> &T {
        match (&self.watched, &self.parked) {
            (Some(watched), _) => watched.get_ref(),
            (None, Some(parked)) => parked,
            (None, None) => unreachable!("a Switchable always holds its socket"),
        }
    }

    /// Watches the socket, or stops watching it.
    pub fn watch(&mut self, on: bool) -> io::Result<()> {
        match (on, self.watched.take(), self.parked.take()) {
            (true, None, Some(parked)) => self.watched = Some(readable(parked)?),
            (false, Some(watched), None) => self.parked = Some(watched.into_inner()),
            (_, watched, parked) => (self.watched, self.parked) = (watched, parked),
        }
        Ok(())
    }

    /// Waits until the watched socket is readable and clears its readiness (a datagram
    /// arriving after this re-arms it); never returns while it is not watched.
    pub async fn readable(&self) -> io::Result<()> {
        match &self.watched {
            Some(watched) => {
                watched.readable().await?.clear_ready();
                Ok(())
            }
            None => std::future::pending().await,
        }
    }
}
