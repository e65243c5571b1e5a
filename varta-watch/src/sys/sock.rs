//! Socket system calls std does not offer: a Unix datagram socket with SO_PASSCRED and
//! a chosen receive buffer, a classic BPF filter, and batched receive with `recvmmsg(2)`
//! and SCM_CREDENTIALS.
//! All of this module's unsafe code is plain FFI over buffers it owns.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{fs::MetadataExt, net::UnixDatagram},
    },
    path::{Path, PathBuf},
};

use varta_common::cbpf::SockFilter;

use crate::sys::clock::ClockSource;

/// The socket file an observer bound: removed at exit only while it is still the one it
/// bound (another observer, or anyone with write access to the directory, may have put
/// another there since).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time: an inode number freed by an unlink is soon reused.
    id: (u64, u64, i64, i64),
}

fn file_id(meta: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path still names the socket this observer bound.
    pub fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| file_id(&m) == self.id)
    }

    /// The socket file at `path` now (one handed over, or passed by a service manager).
    pub fn current(path: &Path) -> io::Result<SocketFile> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_owned(),
            id: file_id(&meta),
        })
    }

    /// Removes the file if it is still ours; says whether it was.
    pub fn remove(&self) -> bool {
        self.is_ours() && std::fs::remove_file(&self.path).is_ok()
    }
}

/// Binds a Unix datagram socket at `path` with file mode `mode` (set by the umask during
/// bind: no window with another mode, no chmod through a path an attacker could swap), asks
/// for sender credentials and sizes its receive buffer (0 keeps the kernel default).
/// A socket file already there is replaced only when nobody receives on it (a stale one);
/// a live observer's is an `AddrInUse` error. Returns the socket, its file and the receive
/// buffer the kernel granted.
pub fn bind_uds(
    path: &Path,
    mode: u32,
    rcvbuf: u32,
) -> io::Result<(UnixDatagram, SocketFile, u32)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            match UnixDatagram::unbound()?.connect(path) {
                Ok(()) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "{} is the socket of a running observer: stop it first, or choose another --socket",
                            path.display()
                        ),
                    ));
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    std::fs::remove_file(path)?
                }
                Err(e) => return Err(e),
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let sock = bind_with_mode(path, mode)?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_owned(),
        id: file_id(&meta),
    };
    let granted = prepare_uds(&sock, rcvbuf)?;
    Ok((sock, file, granted))
}

/// Makes a Unix datagram socket the observer's, however it got it (bound here, handed over,
/// passed by a service manager): non-blocking, asking for sender credentials, its receive
/// buffer sized (0 keeps what it has). Returns the receive buffer the kernel granted.
pub fn prepare_uds(sock: &UnixDatagram, rcvbuf: u32) -> io::Result<u32> {
    sock.set_nonblocking(true)?;
    setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PASSCRED, 1)?;
    // Linux 6.5 and later: a pidfd of each sender too (`Datagram::sender_pidfd`); before,
    // ENOPROTOOPT, and the credentials alone name the sender.
    let _ = setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PASSPIDFD, 1);
    if rcvbuf > 0 {
        let want = rcvbuf.min(i32::MAX as u32) as i32;
        // SO_RCVBUFFORCE passes rmem_max when we hold CAP_NET_ADMIN; otherwise fall back.
        if setsockopt_int(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            want,
        )
        .is_err()
        {
            setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, want)?;
        }
    }
    let granted = getsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF)?;
    Ok(granted.max(0) as u32)
}

/// `bind(2)` under a umask that leaves exactly `mode` (the socket inode starts at 0777).
fn bind_with_mode(path: &Path, mode: u32) -> io::Result<UnixDatagram> {
    let mask = !mode & 0o777;
    // SAFETY: umask(2) cannot fail; it is restored right after the bind. Start-up binds
    // before any thread that creates files runs.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let bound = UnixDatagram::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

/// Attaches a classic BPF program (`SO_ATTACH_FILTER`) to a socket: any process may do
/// that to its own socket, without a capability, on every kernel.
/// Whether the socket hands each datagram's sender a pidfd (SO_PASSPIDFD took): then a
/// datagram without one comes from a sender that had exited.
pub fn passes_pidfds(sock: &UnixDatagram) -> bool {
    getsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PASSPIDFD).is_ok_and(|v| v != 0)
}

pub fn attach_classic_filter(fd: BorrowedFd<'_>, insns: &[SockFilter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: insns.len() as u16,
        filter: insns.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `SockFilter` is repr(C) with the layout of `struct sock_filter`; `prog` points
    // at `insns`, which outlive the call, and the kernel copies the program during it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live i32 and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(fd: i32, level: i32, name: i32) -> io::Result<i32> {
    let mut value = 0i32;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and writable, `len` holds the size of `value`.
    let rc =
        unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut i32).cast(), &mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Datagrams longer than a frame are still read whole enough to know they are too long.
const SLOT_BYTES: usize = 64;
/// Room for one SCM_CREDENTIALS and one SCM_PIDFD message (CMSG_SPACE of a `ucred` and of an
/// int), which the kernel puts first: descriptors a sender attaches (SCM_RIGHTS) find no
/// room, so the kernel closes them instead of installing them in the daemon. Where no
/// pidfd comes (a kernel before 6.5, a sender gone) one such descriptor fits: it is closed
/// here (`RecvBatch::recv`).
const CMSG_BYTES: usize = 56;
/// `SCM_PIDFD` (include/linux/socket.h; not in the libc crate).
const SCM_PIDFD: i32 = 4;

/// One received datagram.
#[derive(Debug)]
pub struct Datagram<'a> {
    pub bytes: &'a [u8],
    /// Longer than the slot: its tail was cut.
    pub truncated: bool,
    /// The sender's pid as the kernel attests it (Unix sockets with SO_PASSCRED).
    pub sender_pid: Option<u32>,
    /// A pidfd of the sending process itself (SO_PASSPIDFD, Linux 6.5 and later), whatever
    /// holds its pid by now; `None` before 6.5, or when the sender had exited.
    pub sender_pidfd: Option<OwnedFd>,
    /// The source address (UDP).
    pub source: Option<SocketAddr>,
}

/// Buffers for one `recvmmsg(2)` call: a whole queue drained in few system calls.
pub struct RecvBatch {
    data: Vec<[u8; SLOT_BYTES]>,
    control: Vec<[u64; CMSG_BYTES / 8]>,
    names: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    /// The pidfds the last call received, until `get` hands them out.
    pidfds: Vec<Option<OwnedFd>>,
    received: usize,
}

// SAFETY: the raw pointers inside `iov` and `headers` point into this struct's own heap
// buffers, which move with it; nothing else aliases them.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(capacity: usize) -> Self {
        // SAFETY: sockaddr_storage and mmsghdr are plain C structs for which all-zero is valid.
        let (names, headers) = unsafe { (vec![zeroed(); capacity], vec![zeroed(); capacity]) };
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
            pidfds: (0..capacity).map(|_| None).collect(),
            received: 0,
        }
    }

    /// Receives until the socket would block, or until `budget` datagrams were taken (then
    /// `Ok(true)`: more may be queued), handing each datagram to `each` with the time its
    /// batch was received on `clock`. The budget keeps one busy socket from holding the
    /// event loop (probes, stall decisions, the other socket).
    pub fn drain(
        &mut self,
        fd: BorrowedFd<'_>,
        clock: ClockSource,
        budget: usize,
        mut each: impl FnMut(Datagram<'_>, u64),
    ) -> io::Result<bool> {
        let mut taken = 0;
        loop {
            if taken >= budget {
                return Ok(true);
            }
            let n = match self.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let now = clock.now_ns();
            for i in 0..n {
                each(self.get(i), now);
            }
            taken += n;
            if n < self.data.len() {
                return Ok(false);
            }
        }
    }

    fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let n = self.data.len();
        for i in 0..n {
            self.iov[i] = libc::iovec {
                iov_base: self.data[i].as_mut_ptr().cast(),
                iov_len: SLOT_BYTES,
            };
            let hdr = &mut self.headers[i].msg_hdr;
            hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
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
        for i in 0..self.received {
            self.pidfds[i] = self.take_descriptors(i);
        }
        Ok(self.received)
    }

    pub fn get(&mut self, i: usize) -> Datagram<'_> {
        assert!(i < self.received);
        let sender_pidfd = self.pidfds[i].take();
        let hdr = &self.headers[i];
        let len = (hdr.msg_len as usize).min(SLOT_BYTES);
        Datagram {
            bytes: &self.data[i][..len],
            truncated: hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            sender_pid: self.credentials(i),
            sender_pidfd,
            source: self.source(i),
        }
    }

    fn credentials(&self, i: usize) -> Option<u32> {
        let hdr = &self.headers[i].msg_hdr;
        // SAFETY: the CMSG_* macros walk the control buffer the kernel filled for this
        // header, within `msg_controllen`; a ucred payload is read unaligned.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET
                    && (*cmsg).cmsg_type == libc::SCM_CREDENTIALS
                {
                    let cred =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::ucred);
                    return u32::try_from(cred.pid).ok().filter(|&p| p != 0);
                }
                cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
            }
        }
        None
    }

    /// The descriptors the kernel installed with datagram `i`: its sender's pidfd, kept;
    /// any a sender attached itself (SCM_RIGHTS), closed at once.
    fn take_descriptors(&self, i: usize) -> Option<OwnedFd> {
        let hdr = &self.headers[i].msg_hdr;
        let mut pidfd = None;
        // SAFETY: as in `credentials`; each fd in an SCM_PIDFD or SCM_RIGHTS payload was
        // just installed in this process for us (CLOEXEC) and nothing else owns it.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
            while !cmsg.is_null() {
                let data = libc::CMSG_DATA(cmsg);
                let bytes =
                    ((*cmsg).cmsg_len as usize).saturating_sub(data as usize - cmsg as usize);
                let fds = (0..bytes / size_of::<i32>()).map(|k| {
                    let fd = std::ptr::read_unaligned((data as *const i32).add(k));
                    OwnedFd::from_raw_fd(fd)
                });
                match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                    // One descriptor; any before the last would be closed.
                    (libc::SOL_SOCKET, SCM_PIDFD) => fds.for_each(|fd| pidfd = Some(fd)),
                    (libc::SOL_SOCKET, libc::SCM_RIGHTS) => fds.for_each(drop),
                    _ => {}
                }
                cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
            }
        }
        pidfd
    }

    fn source(&self, i: usize) -> Option<SocketAddr> {
        let name = &self.names[i];
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn control_room_is_credentials_and_a_pidfd_only() {
        // SAFETY: CMSG_SPACE only computes a size.
        let (creds, fd) = unsafe {
            (
                libc::CMSG_SPACE(size_of::<libc::ucred>() as u32) as usize,
                libc::CMSG_SPACE(size_of::<i32>() as u32) as usize,
            )
        };
        assert_eq!(CMSG_BYTES, creds + fd);
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

    /// Sends a 32-byte datagram to `path` with `fd` attached (SCM_RIGHTS).
    fn send_with_fd(client: &UnixDatagram, path: &Path, fd: i32) {
        client.connect(path).unwrap();
        let mut data = [1u8; 32];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let mut control = [0u64; 4];
        // SAFETY: msghdr is a plain C struct; the CMSG_* macros write within `control`,
        // which has room for one int (CMSG_SPACE(4) = 24 bytes); every pointer outlives the
        // sendmsg call.
        unsafe {
            let mut msg: libc::msghdr = zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(size_of::<i32>() as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut i32, fd);
            assert_eq!(libc::sendmsg(client.as_raw_fd(), &msg, 0), 32);
        }
    }

    #[test]
    fn batch_receive_reports_credentials_and_truncation() {
        let dir = std::env::temp_dir().join(format!("varta-sock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let (sock, file, granted) = bind_uds(&path, 0o600, 0).unwrap();
        assert!(granted > 0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the mode comes from the umask at bind");
        // A live socket is never replaced; a stale one is.
        let again = bind_uds(&path, 0o600, 0).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AddrInUse, "{again}");
        assert!(file.is_ours());
        let client = UnixDatagram::unbound().unwrap();
        client.send_to(&[1u8; 32], &path).unwrap();
        client.send_to(&[2u8; 100], &path).unwrap();
        let mut batch = RecvBatch::new(8);
        assert_eq!(batch.recv(sock.as_fd()).unwrap(), 2);
        let pidfds = passes_pidfds(&sock);
        let first = batch.get(0);
        assert_eq!((first.bytes.len(), first.truncated), (32, false));
        assert_eq!(first.sender_pid, Some(std::process::id()));
        // Linux 6.5 and later: the sender's own pidfd, of a live process (this one).
        assert_eq!(first.sender_pidfd.is_some(), pidfds);
        if let Some(pidfd) = &first.sender_pidfd {
            assert!(crate::sys::pidfd::ExitWatcher::holds_pid(pidfd));
        }
        assert!(batch.get(1).truncated);
        // A descriptor a sender attaches is never kept: the write end of a pipe sent along
        // is closed once the client closes its own, so the read end sees the end.
        let (read_end, write_end) = pipe();
        send_with_fd(&client, &path, write_end.as_raw_fd());
        drop(write_end);
        assert_eq!(batch.recv(sock.as_fd()).unwrap(), 1);
        drop(batch.get(0));
        let mut byte = [0u8; 1];
        // SAFETY: a 1-byte read into our buffer from the pipe we own (non-blocking).
        let n = unsafe { libc::read(read_end.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        assert_eq!(n, 0, "the passed descriptor is still open in the receiver");
        assert_eq!(
            batch.recv(sock.as_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(sock);
        let (_, replaced, _) = bind_uds(&path, 0o600, 0).expect("a stale socket is replaced");
        assert!(
            !file.is_ours() && !file.remove(),
            "the old file is not ours any more"
        );
        assert!(replaced.remove() && !path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
