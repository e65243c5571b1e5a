//! Socket system calls std does not offer: a Unix datagram socket with SO_PASSCRED and a
//! chosen receive buffer, a classic BPF filter, and arrival timestamps
//! (batched receive is `sys::recv`).
//! All of this module's unsafe code is plain FFI over buffers it owns.

use std::{
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd, BorrowedFd},
        unix::{fs::MetadataExt, net::UnixDatagram},
    },
    path::{Path, PathBuf},
};

use varta_common::cbpf::SockFilter;

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
    // No pidfd per datagram (`sys::recv`): off, in case an observer that asked for them
    // handed this socket over. ENOPROTOOPT before Linux 6.5: never on there.
    let _ = setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PASSPIDFD, 0);
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

/// Asks the kernel to stamp each datagram with the time it was queued (`SO_TIMESTAMPNS`,
/// CLOCK_REALTIME), delivered with it as `SCM_TIMESTAMPNS` (`sys::recv` reads it): a beat's
/// time is its arrival, however late the daemon drains it.
pub fn stamp_arrivals(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

/// How many datagrams a Unix datagram socket created now may hold queued: one more than
/// `net.unix.max_dgram_qlen` of this network namespace (the kernel makes a sender wait, or
/// refuses its frame with EAGAIN, only past it). The kernel's default, 10, when unreadable.
pub fn uds_queue_limit() -> u64 {
    std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(10)
        + 1
}

/// The receive buffer the kernel granted a socket (`SO_RCVBUF`).
pub fn rcvbuf(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let granted = getsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF)?;
    Ok(granted.max(0) as u32)
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

/// How many datagrams the kernel dropped at this socket (`SO_MEMINFO`'s
/// `SK_MEMINFO_DROPS`, 32 bits that wrap): its receive queue full, its filter refusing
/// them, a bad checksum.
pub fn kernel_drops(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SK_MEMINFO_VARS (include/uapi/linux/sock_diag.h; not in the libc crate).
    let mut info = [0u32; 9];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` and `len` are live and writable, `len` holds the size of `info`; the
    // kernel writes at most that much.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[libc::SK_MEMINFO_DROPS as usize])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_with_its_mode_and_replaces_only_a_stale_socket() {
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
