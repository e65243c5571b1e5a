//! Takeover: a second observer started on the socket of a running one takes over from it,
//! the way Envoy and HAProxy reload. The running one listens on a control socket next to
//! its socket (`<socket>.ctl`, mode 0600, peers of another uid refused by `SO_PEERCRED`).
//!
//! 1. The newcomer connects and says which handover versions it speaks, and its network
//!    namespace (a field older builds ignore):
//!    `varta-takeover versions=MIN-MAX pid=PID netns=DEV:INO\n`.
//! 2. The running one picks the highest version both speak (or answers
//!    `refused reason=...\n` and carries on), stops receiving, takes in and processes what
//!    is already queued, then answers `ok version=V uds=1 udp=0|1 metrics=0|1 state_bytes=N
//!    pid=PID netns=DEV:INO\n` with its sockets attached (the UDP and metrics ones are
//!    used only within the same network namespace) (`SCM_RIGHTS`: the very same socket objects, so
//!    connected clients keep working), followed by its state (`daemon::state`, the state
//!    file's content: agents, surfaced stalls, counters).
//! 3. The newcomer starts receiving on those sockets (on eBPF: attaches its program to them
//!    and reopens the pins), then answers `taken\n`; the running one exits 0. Without that
//!    answer (the newcomer failed) it carries on as before.
//!
//! Whatever arrives between 2 and 3 waits in the sockets' queues (and on eBPF in the pinned
//! ring buffer): nothing the kernel accepted is lost.

use std::{
    io::{self, Read, Write},
    net::{TcpListener, UdpSocket},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::net::{UnixDatagram, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::state::State;
use crate::sys::{fdpass, logger::event, sock::SocketFile};

/// The handover versions this build speaks. Version 1: the exchange above, with the state
/// as `daemon::state` encodes it (`varta-state 1`).
const MIN_VERSION: u32 = 1;
const MAX_VERSION: u32 = 1;

/// How long the newcomer waits for the handover, and the running one for `taken` (the
/// newcomer loads and attaches its eBPF programs meanwhile).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a peer may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// The versions this process speaks: this build's, or (a test hook, hidden: to play a newer
/// or an incompatible build) `VARTA_TAKEOVER_VERSIONS=MIN-MAX`.
fn versions() -> (u32, u32) {
    std::env::var("VARTA_TAKEOVER_VERSIONS")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((MIN_VERSION, MAX_VERSION))
}

pub fn ctl_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// This process's network namespace (`/proc/self/ns/net`'s device and inode): a metrics or
/// UDP socket from another one (a pod of its own, hostNetwork false) is unreachable here.
fn netns() -> String {
    netns_of("self").unwrap_or_else(|| "-".to_owned())
}

/// A process's network namespace, as [`netns`] names it; `None` when unreadable.
fn netns_of(pid: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    Some(format!("{}:{}", m.dev(), m.ino()))
}

fn euid() -> u32 {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() }
}

/// What a running observer handed over.
pub struct Received {
    pub peer_pid: u32,
    pub version: u32,
    /// The sockets, taken by `daemon::bind`.
    pub uds: Option<UnixDatagram>,
    pub udp: Option<UdpSocket>,
    pub metrics: Option<TcpListener>,
    pub state: State,
    stream: UnixStream,
}

impl Received {
    /// Tells the previous observer this one receives now: it exits.
    pub fn confirm(mut self) {
        if let Err(e) = self.stream.write_all(b"taken\n") {
            event!(
                warn,
                "takeover_confirm_failed",
                peer_pid = self.peer_pid,
                error:% = e,
            );
        }
    }
}

/// Whether an observer receives on `socket` now (a stale socket file refuses).
fn live(socket: &Path) -> bool {
    std::fs::symlink_metadata(socket)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        && UnixDatagram::unbound().is_ok_and(|s| s.connect(socket).is_ok())
}

/// Asks the observer running on `socket` for its sockets and state; `None` when none runs.
/// `refuse` (`--no-takeover`): an error instead.
pub fn request(socket: &Path, refuse: bool) -> Result<Option<Received>> {
    if !live(socket) {
        return Ok(None);
    }
    let shown = socket.display();
    if refuse {
        bail!(
            "{shown} is the socket of a running observer and --no-takeover refuses to take over from it: stop it first, or choose another --socket"
        );
    }
    let ctl = ctl_path(socket);
    let mut stream = UnixStream::connect(&ctl).with_context(|| {
        format!(
            "{shown} is the socket of a running observer that offers no takeover ({}; an older build?): stop it first, or choose another --socket",
            ctl.display()
        )
    })?;
    let (peer_pid, uid) = fdpass::peer_cred(stream.as_fd())?;
    if uid != euid() {
        bail!(
            "{} belongs to uid {uid}, not this observer's ({}): no takeover",
            ctl.display(),
            euid()
        );
    }
    stream.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    let (min, max) = versions();
    writeln!(
        stream,
        "varta-takeover versions={min}-{max} pid={} netns={}",
        std::process::id(),
        netns()
    )?;
    // The header line, with the sockets attached to its first bytes.
    let mut buf = vec![0u8; 4096];
    let mut have = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let header = loop {
        let (n, mut got) = fdpass::recv_with_fds(stream.as_fd(), &mut buf)
            .with_context(|| format!("waiting for the handover from pid {peer_pid}"))?;
        fds.append(&mut got);
        if n == 0 {
            bail!("the running observer (pid {peer_pid}) closed the control connection");
        }
        have.extend_from_slice(&buf[..n]);
        if let Some(end) = have.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&have[..end]).into_owned();
            have.drain(..=end);
            break line;
        }
        if have.len() > 4096 {
            bail!("the running observer (pid {peer_pid}) sent no handover header");
        }
    };
    if let Some(reason) = header.strip_prefix("refused reason=") {
        bail!(
            "the running observer (pid {peer_pid}) refused the takeover: {reason}; this one exits (it cannot receive on a socket another observer holds): stop that one first, and this build resumes its pins and state file"
        );
    }
    let field = |key: &str| {
        header
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (Some(version), Some(state_bytes)) = (field("version"), field("state_bytes")) else {
        bail!("the running observer (pid {peer_pid}) sent no handover: {header}");
    };
    if header.split_whitespace().next() != Some("ok")
        || !(min as u64..=max as u64).contains(&version)
        || state_bytes > 256 << 20
    {
        bail!(
            "the running observer (pid {peer_pid}) sent a handover this build cannot read: {header}"
        );
    }
    let mut text = have;
    if (text.len() as u64) < state_bytes {
        let mut rest = vec![0u8; state_bytes as usize - text.len()];
        stream
            .read_exact(&mut rest)
            .context("reading the handed-over state")?;
        text.extend_from_slice(&rest);
    }
    text.truncate(state_bytes as usize);
    let state = State::decode(&String::from_utf8_lossy(&text))
        .map_err(|e| anyhow::anyhow!("the handed-over state: {e}"))?;
    // The sockets, in the order the header names them.
    let mut fds = fds.into_iter();
    let mut next = |present: bool, what: &str| -> Result<Option<OwnedFd>> {
        if !present {
            return Ok(None);
        }
        fds.next()
            .map(Some)
            .with_context(|| format!("the handover lacks the {what} socket"))
    };
    let uds = next(true, "Unix")?.expect("present");
    let mut udp = next(field("udp") == Some(1), "UDP")?;
    let mut metrics = next(field("metrics") == Some(1), "metrics")?;
    let theirs = header
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("netns="))
        .unwrap_or("-");
    if theirs != netns() && (udp.is_some() || metrics.is_some()) {
        // Another network namespace (a pod of its own): its IP sockets serve only there.
        event!(
            info,
            "takeover_network_sockets_not_taken",
            reason = "the running observer is in another network namespace: UDP and metrics \
                      are bound here anew",
        );
        udp = None;
        metrics = None;
    }
    expect_kind(uds.as_fd(), libc::SOCK_DGRAM, false, "Unix")?;
    if let Some(fd) = &udp {
        expect_kind(fd.as_fd(), libc::SOCK_DGRAM, false, "UDP")?;
    }
    if let Some(fd) = &metrics {
        expect_kind(fd.as_fd(), libc::SOCK_STREAM, true, "metrics")?;
    }
    Ok(Some(Received {
        peer_pid,
        version: version as u32,
        uds: Some(UnixDatagram::from(uds)),
        udp: udp.map(UdpSocket::from),
        metrics: metrics.map(TcpListener::from),
        state,
        stream,
    }))
}

fn expect_kind(fd: BorrowedFd<'_>, ty: i32, listening: bool, what: &str) -> Result<()> {
    let (_, got, l) = fdpass::socket_kind(fd)?;
    if got != ty || l != listening {
        bail!("the handed-over {what} socket is not one (type {got}, listening {l})");
    }
    Ok(())
}

/// A newcomer that asked to take over, and the version both speak.
pub struct Request {
    pub peer_pid: u32,
    pub version: u32,
    /// It runs in this observer's network namespace, so it takes the metrics listener.
    pub shares_network: bool,
    stream: UnixStream,
}

/// The running side: the control socket, and the requests taken from it.
pub struct Control {
    requests: tokio::sync::mpsc::Receiver<Request>,
    file: SocketFile,
    task: tokio::task::JoinHandle<()>,
}

impl Control {
    /// Binds `<socket>.ctl` (0600; a stale one replaced) and takes requests from it.
    pub fn listen(socket: &Path) -> Result<Control> {
        let path = ctl_path(socket);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                std::fs::remove_file(&path)?;
            }
            Ok(_) => bail!("{} exists and is not a socket", path.display()),
            Err(_) => {}
        }
        // SAFETY: umask(2) cannot fail; restored right after the bind.
        let old = unsafe { libc::umask(0o177) };
        let bound = std::os::unix::net::UnixListener::bind(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.with_context(|| format!("binding {}", path.display()))?;
        let file = SocketFile::current(&path)?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let (tx, requests) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if let Some(request) = hello(stream).await
                    && tx.send(request).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(Control {
            requests,
            file,
            task,
        })
    }

    /// The next newcomer that asked to take over.
    pub async fn next(&mut self) -> Request {
        match self.requests.recv().await {
            Some(request) => request,
            None => std::future::pending().await,
        }
    }

    /// At exit: the control socket goes, unless a successor's replaced it.
    pub fn remove(&self) {
        self.task.abort();
        self.file.remove();
    }
}

/// Reads and checks a newcomer's hello; refused ones are answered and logged here.
async fn hello(stream: tokio::net::UnixStream) -> Option<Request> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let cred = stream.peer_cred().ok()?;
    let peer_pid = cred.pid().unwrap_or(0) as u32;
    let mut stream = tokio::io::BufReader::new(stream);
    let refuse = async |stream: &mut tokio::io::BufReader<tokio::net::UnixStream>, why: String| {
        event!(
            warn,
            "takeover_refused",
            peer_pid = peer_pid,
            reason = why.as_str()
        );
        let _ = stream
            .get_mut()
            .write_all(format!("refused reason={}\n", why.replace('\n', " ")).as_bytes())
            .await;
    };
    if cred.uid() != euid() {
        refuse(
            &mut stream,
            format!("uid {} is not this observer's ({})", cred.uid(), euid()),
        )
        .await;
        return None;
    }
    let mut line = String::new();
    match tokio::time::timeout(HELLO_TIMEOUT, stream.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 && n < 512 => {}
        _ => return None,
    }
    let field = |key: &str| {
        line.strip_prefix("varta-takeover ")?
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    };
    // A newcomer of an older build does not say: its namespace is read from /proc (this
    // observer sees its pid: the same pid namespace, or the newcomer could not reach it).
    let shares_network = match field("netns") {
        Some(theirs) => theirs == netns(),
        None => netns_of(&peer_pid.to_string()).is_none_or(|theirs| theirs == netns()),
    };
    let theirs = field("versions").and_then(|v| {
        let (a, b) = v.split_once('-')?;
        Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
    });
    let (min, max) = versions();
    let Some((their_min, their_max)) = theirs else {
        refuse(&mut stream, "not a takeover request".to_owned()).await;
        return None;
    };
    let version = max.min(their_max);
    if version < min.max(their_min) {
        refuse(
            &mut stream,
            format!(
                "it speaks handover versions {their_min}-{their_max}, this observer {min}-{max}"
            ),
        )
        .await;
        return None;
    }
    let stream = stream.into_inner().into_std().ok()?;
    stream.set_nonblocking(false).ok()?;
    Some(Request {
        peer_pid,
        version,
        shares_network,
        stream,
    })
}

/// The running side's sockets, kept to be handed over.
pub struct Handed {
    pub uds: OwnedFd,
    pub udp: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
}

/// Sends the sockets and the state to the newcomer and waits for it to confirm; `Ok(())`
/// when it took over (this observer exits then).
pub fn hand_over(request: Request, fds: &Handed, state: &State) -> io::Result<()> {
    let Request {
        peer_pid,
        version,
        mut stream,
        ..
    } = request;
    let text = state.encode();
    let header = format!(
        "ok version={version} uds=1 udp={} metrics={} state_bytes={} pid={} netns={}\n",
        fds.udp.is_some() as u8,
        fds.metrics.is_some() as u8,
        text.len(),
        std::process::id(),
        netns()
    );
    let mut attached = vec![fds.uds.as_fd()];
    attached.extend(fds.udp.as_ref().map(AsFd::as_fd));
    attached.extend(fds.metrics.as_ref().map(AsFd::as_fd));
    let mut message = header.into_bytes();
    message.extend_from_slice(text.as_bytes());
    let sent = fdpass::send_with_fds(stream.as_fd(), &message, &attached)?;
    stream.write_all(&message[sent..])?;
    stream.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    let mut answer = [0u8; 6];
    match stream.read_exact(&mut answer) {
        Ok(()) if &answer == b"taken\n" => Ok(()),
        Ok(()) => Err(io::Error::other(format!(
            "pid {peer_pid} answered {:?}",
            String::from_utf8_lossy(&answer)
        ))),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("pid {peer_pid} did not confirm: {e}"),
        )),
    }
}
