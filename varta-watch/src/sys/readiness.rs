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
