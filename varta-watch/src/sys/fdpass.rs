//! Passing open sockets between processes over a Unix stream socket (`SCM_RIGHTS`), and
//! the peer's credentials (`SO_PEERCRED`): what a takeover hands over.
//! All of this module's unsafe code is plain FFI over buffers it owns.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

/// At most this many descriptors travel in one message.
pub const MAX_FDS: usize = 4;

/// The peer's pid and uid as the kernel recorded them at `connect(2)`.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live and writable; `len` holds the size of `cred`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok((cred.pid as u32, cred.uid))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Room for `MAX_FDS` descriptors in one control message, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; 64]);

fn control_len(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic.
    unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as u32) as usize }
}

/// Sends `bytes` (at least one) with `fds` attached; returns how many bytes went (the rest
/// is for a plain write).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    assert!(!bytes.is_empty() && fds.len() <= MAX_FDS);
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control_len(fds.len()) as _;
        // SAFETY: the control buffer holds CMSG_SPACE(n fds) bytes (64 >= CMSG_SPACE(16)),
        // so the first header and its data fit; `fds` is read, not kept.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` and `control`, both live for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives into `buf`, taking any descriptors attached (close-on-exec); `(0, [])` at EOF.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control_len(MAX_FDS) as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `control`, both live and writable.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to `msg_controllen`; the CMSG macros walk
    // within it, and each SCM_RIGHTS descriptor is new in this process, owned from here on.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were cut off (MSG_CTRUNC)"));
    }
    Ok((n, fds))
}

/// A socket's `SO_DOMAIN`, `SO_TYPE` and whether it listens (`SO_ACCEPTCONN`).
pub fn socket_kind(fd: BorrowedFd<'_>) -> io::Result<(i32, i32, bool)> {
    let get = |name| {
        let mut value = 0i32;
        let mut len = size_of::<i32>() as libc::socklen_t;
        // SAFETY: `value` and `len` are live and writable, `len` holds the size of `value`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut i32).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    Ok((
        get(libc::SO_DOMAIN)?,
        get(libc::SO_TYPE)?,
        get(libc::SO_ACCEPTCONN)? != 0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::{fd::AsFd, unix::net::UnixStream};

    #[test]
    fn sockets_travel_with_their_bytes_and_the_peer_is_known() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, y) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let sent = send_with_fds(a.as_fd(), b"hello", &[x.as_fd()]).unwrap();
        assert_eq!(sent, 5);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        let got = std::os::unix::net::UnixDatagram::from(fds.into_iter().next().unwrap());
        y.send(b"beat").unwrap();
        let mut r = [0u8; 8];
        assert_eq!(got.recv(&mut r).unwrap(), 4, "the same socket object");
        let (pid, uid) = peer_cred(b.as_fd()).unwrap();
        assert_eq!(pid, std::process::id());
        // SAFETY: no arguments.
        assert_eq!(uid, unsafe { libc::geteuid() });
        let (domain, ty, listening) = socket_kind(got.as_fd()).unwrap();
        assert_eq!(
            (domain, ty, listening),
            (libc::AF_UNIX, libc::SOCK_DGRAM, false)
        );
    }
}
