//! Batched receive: `recvmmsg(2)` takes a socket's whole queue in few system calls, with each
//! datagram's sender credentials (SCM_CREDENTIALS), source address and the time the kernel
//! queued it (SCM_TIMESTAMPNS, asked for with `sock::stamp_arrivals`). All of this module's
//! unsafe code is FFI over buffers it owns, and the CMSG_* walk of the control buffers the
//! kernel filled.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, BorrowedFd},
};

use crate::sys::clock::ClockSource;

/// Datagrams longer than a frame are still read whole enough to know they are too long.
const SLOT_BYTES: usize = 64;
/// Room for exactly an arrival time and SCM_CREDENTIALS (CMSG_SPACE of a `timespec` and a
/// `ucred`), in the order the kernel writes them. The socket always stamps arrivals
/// (`sock::stamp_arrivals` is required), so descriptors a sender attaches (SCM_RIGHTS,
/// written last) find no room and the kernel closes them instead of installing them in the
/// daemon. No room for a pidfd (SO_PASSPIDFD) either: one per datagram cost a third of the
/// daemon's CPU at 20k beats/s; the sender is bound to /proc by its arrival time instead
/// (`datapath::userspace`).
const CMSG_BYTES: usize = 64;

/// One received datagram.
#[derive(Debug)]
pub struct Datagram<'a> {
    pub bytes: &'a [u8],
    /// Longer than the slot: its tail was cut.
    pub truncated: bool,
    /// The sender's pid as the kernel attests it (Unix sockets with SO_PASSCRED).
    pub sender_pid: Option<u32>,
    /// The source address (UDP).
    pub source: Option<SocketAddr>,
}

/// What the control messages of one datagram carried.
#[derive(Debug, Default, PartialEq, Eq)]
struct Control {
    sender_pid: Option<u32>,
    /// When the kernel queued the datagram, CLOCK_REALTIME nanoseconds.
    queued_real_ns: Option<u64>,
}

/// Buffers for one `recvmmsg(2)` call, and the arrival clock of the socket it drains.
pub struct RecvBatch {
    data: Vec<[u8; SLOT_BYTES]>,
    control: Vec<[u64; CMSG_BYTES / 8]>,
    /// Where each datagram's source address goes; empty: not asked for (a Unix socket's
    /// senders are known by their credentials, and the kernel then copies no address).
    names: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    received: usize,
    /// No datagram still queued arrived before this (on the daemon's clock): the last arrival
    /// handed out, or the last time the queue was seen empty.
    floor_ns: u64,
}

// SAFETY: the raw pointers inside `iov` and `headers` point into this struct's own heap
// buffers, which move with it; nothing else aliases them.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// Buffers for `capacity` datagrams with their source addresses (UDP).
    pub fn new(capacity: usize) -> Self {
        Self::with_sources(capacity, true)
    }

    /// Buffers for `capacity` datagrams without their source addresses (Unix sockets).
    pub fn without_sources(capacity: usize) -> Self {
        Self::with_sources(capacity, false)
    }

    fn with_sources(capacity: usize, sources: bool) -> Self {
        let names = if sources { capacity } else { 0 };
        // SAFETY: sockaddr_storage and mmsghdr are plain C structs for which all-zero is valid.
        let (names, headers) = unsafe { (vec![zeroed(); names], vec![zeroed(); capacity]) };
        RecvBatch {
            data: vec![[0; SLOT_BYTES]; capacity],
            control: vec![[0; CMSG_BYTES / 8]; capacity],
            names,
            iov: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                capacity
            ],
            headers,
            received: 0,
            floor_ns: 0,
        }
    }

    /// Receives until the socket would block, or until `budget` datagrams were taken (then
    /// `Ok(true)`: more may be queued), handing each datagram to `each` with its arrival time
    /// on `clock` ([`arrival_ns`]; the receive time when the kernel did not stamp it). The
    /// budget keeps one busy socket from holding the event loop (probes, stall decisions,
    /// the other socket). Returns also how many datagrams were taken.
    pub fn drain(
        &mut self,
        fd: BorrowedFd<'_>,
        clock: ClockSource,
        budget: usize,
        mut each: impl FnMut(Datagram<'_>, u64),
    ) -> io::Result<(bool, usize)> {
        let mut taken = 0;
        loop {
            if taken >= budget {
                return Ok((true, taken));
            }
            // The queue, if the call finds it empty, was empty at some time after this.
            let called = clock.now_ns();
            let n = match self.recv(fd, budget - taken) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.floor_ns = self.floor_ns.max(called);
                    return Ok((false, taken));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let now = clock.now_ns();
            let offset = i128::from(now) - i128::from(realtime_ns());
            for i in 0..n {
                let control = self.control_of(i);
                let at = arrival_ns(control.queued_real_ns, offset, self.floor_ns, now);
                self.floor_ns = at;
                each(self.get(i, control.sender_pid), at);
            }
            taken += n;
            if n < self.data.len().min(budget - (taken - n)) {
                self.floor_ns = self.floor_ns.max(called);
                return Ok((false, taken));
            }
        }
    }

    /// One `recvmmsg(2)` of at most `limit` datagrams.
    fn recv(&mut self, fd: BorrowedFd<'_>, limit: usize) -> io::Result<usize> {
        let n = self.data.len().min(limit);
        for i in 0..n {
            self.iov[i] = libc::iovec {
                iov_base: self.data[i].as_mut_ptr().cast(),
                iov_len: SLOT_BYTES,
            };
            let hdr = &mut self.headers[i].msg_hdr;
            (hdr.msg_name, hdr.msg_namelen) = match self.names.get_mut(i) {
                Some(name) => (
                    (name as *mut libc::sockaddr_storage).cast(),
                    size_of::<libc::sockaddr_storage>() as libc::socklen_t,
                ),
                None => (std::ptr::null_mut(), 0),
            };
            hdr.msg_iov = &mut self.iov[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.control[i].as_mut_ptr().cast();
            // socklen_t on musl, size_t on glibc.
            hdr.msg_controllen = CMSG_BYTES as _;
            hdr.msg_flags = 0;
            self.headers[i].msg_len = 0;
        }
        // SAFETY: every header points at buffers owned by `self` that outlive the call, with
        // their true lengths; the vector length bounds `vlen`.
        let rc = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.headers.as_mut_ptr(),
                n as libc::c_uint,
                // unsigned on musl, int on glibc.
                (libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) as _,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            self.received = 0;
            return Err(io::Error::last_os_error());
        }
        self.received = rc as usize;
        Ok(self.received)
    }

    fn get(&self, i: usize, sender_pid: Option<u32>) -> Datagram<'_> {
        assert!(i < self.received);
        let hdr = &self.headers[i];
        let len = (hdr.msg_len as usize).min(SLOT_BYTES);
        Datagram {
            bytes: &self.data[i][..len],
            truncated: hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            sender_pid,
            source: self.source(i),
        }
    }

    fn control_of(&self, i: usize) -> Control {
        // socklen_t on musl, size_t on glibc.
        let len: usize = self.headers[i].msg_hdr.msg_controllen as _;
        let len = len.min(CMSG_BYTES);
        parse_control(&self.control[i], len)
    }

    fn source(&self, i: usize) -> Option<SocketAddr> {
        let name = self.names.get(i)?;
        match name.ss_family as i32 {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let sin = unsafe {
                    &*(name as *const libc::sockaddr_storage as *const libc::sockaddr_in)
                };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let sin6 = unsafe {
                    &*(name as *const libc::sockaddr_storage as *const libc::sockaddr_in6)
                };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    0,
                    0,
                )))
            }
            _ => None,
        }
    }
}

/// The first credentials and the first arrival time among the control messages in the
/// first `len` bytes of `buf`. A message shorter than its payload is skipped.
fn parse_control(buf: &[u64; CMSG_BYTES / 8], len: usize) -> Control {
    // SAFETY: msghdr is a plain C struct for which all-zero is valid.
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    hdr.msg_control = buf.as_ptr() as *mut libc::c_void;
    hdr.msg_controllen = len.min(CMSG_BYTES) as _;
    let mut found = Control::default();
    // SAFETY: CMSG_FIRSTHDR and CMSG_NXTHDR return only headers that lie whole within
    // `msg_controllen` bytes of `buf` (or null); a payload is read, unaligned, only when the
    // header's length covers it, and that length was checked to lie within the buffer.
    unsafe {
        let end = buf.as_ptr() as usize + len.min(CMSG_BYTES);
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
        while !cmsg.is_null() {
            let (level, kind, cmsg_len) = (
                (*cmsg).cmsg_level,
                (*cmsg).cmsg_type,
                (*cmsg).cmsg_len as usize,
            );
            let data = libc::CMSG_DATA(cmsg);
            let holds = |payload: usize| {
                cmsg_len >= libc::CMSG_LEN(payload as u32) as usize
                    && data as usize + payload <= end
            };
            if level == libc::SOL_SOCKET {
                if kind == libc::SCM_CREDENTIALS
                    && found.sender_pid.is_none()
                    && holds(size_of::<libc::ucred>())
                {
                    let cred = std::ptr::read_unaligned(data as *const libc::ucred);
                    found.sender_pid = u32::try_from(cred.pid).ok().filter(|&p| p != 0);
                } else if kind == libc::SCM_TIMESTAMPNS
                    && found.queued_real_ns.is_none()
                    && holds(size_of::<libc::timespec>())
                {
                    let ts = std::ptr::read_unaligned(data as *const libc::timespec);
                    found.queued_real_ns = u64::try_from(ts.tv_sec)
                        .ok()
                        .and_then(|s| s.checked_mul(1_000_000_000))
                        .and_then(|ns| ns.checked_add(u64::try_from(ts.tv_nsec).ok()?));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
    }
    found
}

/// CLOCK_REALTIME in nanoseconds, the clock of the kernel's receive timestamps.
fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A datagram's arrival on the daemon's clock: the kernel's realtime stamp moved by
/// `offset` (daemon's clock minus realtime, read together at `now`), held between `floor`
/// (nothing still queued arrived earlier) and `now`, so a step of the wall clock can neither
/// date a beat in the future nor before one already received. Unstamped: `now`.
pub fn arrival_ns(queued_real_ns: Option<u64>, offset: i128, floor: u64, now: u64) -> u64 {
    let Some(real) = queued_real_ns else {
        return now;
    };
    let at = i128::from(real) + offset;
    at.clamp(i128::from(floor.min(now)), i128::from(now)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::{
        fd::{AsFd, FromRawFd, OwnedFd},
        unix::net::UnixDatagram,
    };

    fn space(payload: usize) -> usize {
        // SAFETY: CMSG_SPACE only computes a size.
        unsafe { libc::CMSG_SPACE(payload as u32) as usize }
    }

    #[test]
    fn control_room_is_a_time_and_credentials_only() {
        assert_eq!(
            CMSG_BYTES,
            space(size_of::<libc::timespec>()) + space(size_of::<libc::ucred>())
        );
    }

    fn pair() -> (UnixDatagram, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let one = 1i32;
        for opt in [libc::SO_PASSCRED, libc::SO_TIMESTAMPNS] {
            // SAFETY: `one` is a live i32 and the length passed is its size.
            let rc = unsafe {
                libc::setsockopt(
                    b.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&one as *const i32).cast(),
                    size_of::<i32>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
        }
        (a, b)
    }

    #[test]
    fn batch_receive_reports_credentials_truncation_and_arrival() {
        let (client, sock) = pair();
        let clock = ClockSource::Monotonic;
        let sent_at = clock.now_ns();
        client.send(&[1u8; 32]).unwrap();
        client.send(&[2u8; 100]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut batch = RecvBatch::without_sources(8);
        let mut got = Vec::new();
        let drained_at = clock.now_ns();
        let (more, n) = batch
            .drain(sock.as_fd(), clock, 64, |d, at| {
                assert_eq!(d.source, None);
                got.push((d.bytes.len(), d.truncated, d.sender_pid, at))
            })
            .unwrap();
        assert!(!more && n == 2);
        assert_eq!(got[0].0..got[1].0, 32..64);
        assert_eq!((got[0].1, got[1].1), (false, true));
        assert_eq!(got[0].2, Some(std::process::id()));
        for (.., at) in &got {
            // The time the kernel queued it, not the drain's (50 ms later).
            assert!(
                *at >= sent_at.saturating_sub(2_000_000) && *at < drained_at - 40_000_000,
                "arrival {at} sent {sent_at} drained {drained_at}"
            );
        }
        assert!(got[0].3 <= got[1].3);
        // A budget smaller than the batch is kept to.
        for _ in 0..3 {
            client.send(&[3u8; 32]).unwrap();
        }
        let (more, n) = batch.drain(sock.as_fd(), clock, 2, |_, _| {}).unwrap();
        assert!(more && n == 2);
        let (more, n) = batch.drain(sock.as_fd(), clock, 2, |_, _| {}).unwrap();
        assert!(!more && n == 1);
        assert_eq!(
            batch.recv(sock.as_fd(), 8).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    /// A non-blocking pipe: (read end, write end).
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills the two-int array we own.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: the kernel just returned both fds to us.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn descriptors_a_sender_attaches_are_never_kept() {
        // The arrival time and the credentials fill the control room: the kernel closes
        // what a sender attaches rather than install it here.
        let (client, sock) = pair();
        let (read_end, write_end) = pipe();
        let fds = [write_end.as_raw_fd()];
        let mut cbuf = [0u64; 4];
        let mut data = [7u8; 32];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain C; every pointer set below points at a live local buffer
        // of the length given, and the CMSG_* calls stay within `cbuf`.
        unsafe {
            let mut msg: libc::msghdr = zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space(size_of_val(&fds)) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(&fds) as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), 1);
            assert_eq!(libc::sendmsg(client.as_raw_fd(), &msg, 0), 32);
        }
        drop(write_end);
        let mut batch = RecvBatch::without_sources(2);
        assert_eq!(batch.recv(sock.as_fd(), 2).unwrap(), 1);
        let control = batch.control_of(0);
        assert_eq!(control.sender_pid, Some(std::process::id()));
        assert!(control.queued_real_ns.is_some());
        assert_ne!(batch.headers[0].msg_hdr.msg_flags & libc::MSG_CTRUNC, 0);
        // The write end's last copy is gone: the read end sees the end of the pipe.
        let mut byte = [0u8; 1];
        // SAFETY: a 1-byte read into our buffer from the pipe we own (non-blocking).
        let n = unsafe { libc::read(read_end.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        assert_eq!(n, 0, "the passed descriptor is still open in the receiver");
    }

    /// Control messages laid out as the kernel lays them: (level, type, payload).
    fn layout(msgs: &[(i32, i32, Vec<u8>)]) -> ([u64; CMSG_BYTES / 8], usize) {
        let mut buf = [0u64; CMSG_BYTES / 8];
        let bytes: &mut [u8; CMSG_BYTES] =
            // SAFETY: a [u64; 8] is 64 initialized bytes; u8 has no alignment needs.
            unsafe { &mut *(buf.as_mut_ptr() as *mut [u8; CMSG_BYTES]) };
        let mut at = 0;
        for (level, kind, payload) in msgs {
            let len = 16 + payload.len();
            if at + space(payload.len()) > CMSG_BYTES {
                break;
            }
            bytes[at..at + 8].copy_from_slice(&(len as u64).to_ne_bytes());
            bytes[at + 8..at + 12].copy_from_slice(&level.to_ne_bytes());
            bytes[at + 12..at + 16].copy_from_slice(&kind.to_ne_bytes());
            bytes[at + 16..at + len].copy_from_slice(payload);
            at += space(payload.len());
        }
        (buf, at)
    }

    fn cred(pid: i32) -> Vec<u8> {
        [pid.to_ne_bytes(), 0u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat()
    }

    fn stamp(sec: i64, nsec: i64) -> Vec<u8> {
        [sec.to_ne_bytes(), nsec.to_ne_bytes()].concat()
    }

    #[test]
    fn parses_what_the_kernel_writes() {
        let (buf, len) = layout(&[
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, stamp(3, 5)),
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS, cred(42)),
        ]);
        let expect = Control {
            sender_pid: Some(42),
            queued_real_ns: Some(3_000_000_005),
        };
        assert_eq!(parse_control(&buf, len), expect);
        // Cut short: the second message is not there.
        assert_eq!(parse_control(&buf, 32).sender_pid, None);
        assert_eq!(parse_control(&buf, 0), Control::default());
        // pid 0 is no sender; another level is not ours.
        let (buf, len) = layout(&[(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, cred(0))]);
        assert_eq!(parse_control(&buf, len).sender_pid, None);
        let (buf, len) = layout(&[(libc::SOL_IP, libc::SCM_CREDENTIALS, cred(9))]);
        assert_eq!(parse_control(&buf, len).sender_pid, None);
    }

    proptest! {
        #[test]
        fn any_control_bytes_parse_without_reading_past_them(
            words in proptest::array::uniform8(any::<u64>()),
            len in 0usize..=CMSG_BYTES,
        ) {
            // Whatever the lengths claim, the walk stays inside `len` (a payload cut off by
            // it is not read: the kernel never writes one).
            let found = parse_control(&words, len);
            if len < 16 + size_of::<libc::ucred>() {
                prop_assert_eq!(found.sender_pid, None);
            }
            if len < 16 + size_of::<libc::timespec>() {
                prop_assert_eq!(found.queued_real_ns, None);
            }
        }

        #[test]
        fn well_formed_messages_give_the_first_of_each(
            msgs in proptest::collection::vec(
                (prop_oneof![Just(libc::SOL_SOCKET), Just(libc::SOL_IP)],
                 prop_oneof![Just(libc::SCM_CREDENTIALS), Just(libc::SCM_TIMESTAMPNS), Just(libc::SCM_RIGHTS)],
                 1i32..1_000_000, 0i64..1_000_000_000),
                0..4),
        ) {
            let mut laid = Vec::new();
            let (mut pid, mut at, mut used) = (None, None, 0);
            for &(level, kind, p, ns) in &msgs {
                let payload = match kind {
                    libc::SCM_CREDENTIALS => cred(p),
                    libc::SCM_TIMESTAMPNS => stamp(i64::from(p), ns),
                    _ => p.to_ne_bytes().to_vec(),
                };
                if used + space(payload.len()) > CMSG_BYTES {
                    break;
                }
                used += space(payload.len());
                if level == libc::SOL_SOCKET {
                    match kind {
                        libc::SCM_CREDENTIALS => { pid.get_or_insert(p as u32); }
                        libc::SCM_TIMESTAMPNS => {
                            at.get_or_insert(p as u64 * 1_000_000_000 + ns as u64);
                        }
                        _ => {}
                    }
                }
                laid.push((level, kind, payload));
            }
            let (buf, len) = layout(&laid);
            prop_assert_eq!(parse_control(&buf, len), Control { sender_pid: pid, queued_real_ns: at });
        }

        #[test]
        fn an_arrival_is_never_before_the_floor_nor_after_now(
            stamp in proptest::option::of(any::<u64>()),
            offset in any::<i64>(),
            floor in any::<u64>(),
            now in any::<u64>(),
        ) {
            let at = arrival_ns(stamp, i128::from(offset), floor, now);
            prop_assert!(at <= now && at >= floor.min(now));
            if let Some(real) = stamp {
                let moved = i128::from(real) + i128::from(offset);
                if moved >= i128::from(floor) && moved <= i128::from(now) {
                    prop_assert_eq!(i128::from(at), moved);
                }
            } else {
                prop_assert_eq!(at, now);
            }
        }
    }
}
