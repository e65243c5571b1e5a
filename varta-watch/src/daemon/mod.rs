//! The observer daemon: start-up (signals, sockets, the datapath the kernel and our
//! privileges allow), then the event loop, then shutdown.

mod event_loop;
mod health;
mod hold;
mod http;
mod http_conn;
mod liveness;
mod state;
mod takeover;

pub use health::Probes;

use crate::sys::logger::event;
use std::{net::UdpSocket, os::unix::net::UnixDatagram, process::ExitCode, sync::Arc};

use anyhow::{Context, Result};

use crate::{
    config::{Config, cli::CommandLine, cli::DatapathMode},
    datapath::{
        ebpf::{EbpfDatapath, PinRequest, pins::Pins},
        secure::UdpFrames,
        udp::UdpReceiver,
        userspace::UserspaceDatapath,
    },
    signal::{self, Signals},
    vocab::drops::{DropCounters, KernelDrops},
};

/// Runs the daemon to its end; the exit code says how it ended.
pub fn run(line: &CommandLine) -> ExitCode {
    crate::sys::memory::map_large_allocations();
    let config = match Config::from_command_line(line) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("varta-watch: error: {e}");
            return ExitCode::from(2);
        }
    };
    for (flag, why) in crate::config::warnings(&line.matches) {
        event!(warn, "flag_ignored", flag = flag, reason:% = why);
    }
    if config.plaintext_udp {
        event!(
            warn,
            "plaintext_udp_unauthenticated",
            addr = config.udp.map(|a| a.to_string()),
            reason = "plaintext UDP frames are unauthenticated: anyone who can reach this port \
                      can claim any pid; use --key-file for secure UDP",
        );
    }
    if let Some(addr) = config.udp
        && !config.secure.is_empty()
        && !addr.ip().is_loopback()
    {
        event!(
            warn,
            "secure_udp_non_loopback",
            addr:% = addr,
            reason = "secure UDP listens beyond this host: any key holder on the network may \
                      claim any pid",
        );
    }
    // Before any thread starts: they inherit it.
    crate::sys::priority::set_nice(config.nice);
    // Sockets a service manager passed (socket activation), also before any thread starts:
    // taking them unsets its variables.
    let passed = crate::sys::listen_fds::take();
    // One thread for the event loop; /metrics is encoded on a few blocking threads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .build();
    let result = runtime.context("starting the runtime").and_then(|rt| {
        rt.block_on(async {
            // Held (`--after-handover hold`): everything of the observer is gone by now.
            match start(config, passed).await? {
                Some(held) => held.run().await,
                None => Ok(()),
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            event!(error, "fatal", error = format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The observer's sockets, bound (or handed over, or passed by a service manager) before any
/// datapath is chosen.
struct Sockets {
    uds: UnixDatagram,
    udp: Option<UdpSocket>,
    /// The receive buffer the kernel granted the UDS.
    rcvbuf: u32,
    file: crate::sys::sock::SocketFile,
    /// The socket file is the service manager's (socket activation): it stays at exit.
    activated: bool,
    /// The sockets were handed over by a running observer.
    handed: bool,
    /// The metrics endpoint's listener, when handed over or passed.
    metrics: Option<std::net::TcpListener>,
}

/// Runs the observer; `Some` when it handed over and holds (`daemon::hold`).
async fn start(
    mut config: Config,
    passed: Vec<crate::sys::listen_fds::Passed>,
) -> Result<Option<hold::Held>> {
    let fds = crate::sys::fdlimit::raise().context("raising RLIMIT_NOFILE")?;
    event!(
        info,
        "fd_limit",
        soft = fds.soft,
        hard = fds.hard,
        reserve = crate::sys::fdlimit::RESERVE,
        watcher_budget = fds.watch_budget,
    );
    let mut signals = install_signals(&config)?;
    // A container restarted in a pod that handed over: it must not take the node back.
    if hold::marked(&config) {
        return Ok(Some(hold::from_start(&config, signals)));
    }
    let activated = sys_activated(&config, passed)?;
    // An observer running on this socket hands over its sockets and state, then exits
    // (unless the service manager passed the socket: it holds it between runs).
    let mut received = if activated.uds.is_some() {
        None
    } else {
        takeover::request(&config.socket, config.no_takeover)?
    };
    let sockets = bind(&config, received.as_mut(), activated)?;
    let handover = received.as_ref().map(|r| (r.peer_pid, r.version));
    // Port 0 becomes the port the kernel chose: the ready line names the real address.
    if let Some(udp) = &sockets.udp {
        config.udp = Some(udp.local_addr()?);
    }
    let drops = Arc::new(DropCounters::default());
    let state_path = state::path_for(&config.socket);
    if config.fresh_state {
        let _ = std::fs::remove_file(&state_path);
    }
    let saved = if config.fresh_state {
        Ok(None)
    } else if let Some(r) = received.as_mut() {
        Ok(Some(std::mem::take(&mut r.state)))
    } else {
        state::State::load(&state_path)
    };
    // The secure UDP replay sessions go on with the sockets, whatever else is resumed.
    let sessions = match &saved {
        Ok(Some(state)) => state.secure.clone(),
        _ => Vec::new(),
    };
    let result = async {
        let mut ebpf = start_ebpf(&config, &sockets, &drops)?;
        let kernel = match &mut ebpf {
            Some((datapath, _, pins)) if pins.resume => datapath.kernel_agents(),
            _ => Vec::new(),
        };
        if ebpf.is_none() && config.fresh_state {
            let _ = crate::datapath::ebpf::pins::remove(&config.pin_root, &config.socket);
        }
        let pins = ebpf.as_ref().map(|(_, _, pins)| pins);
        let (resume, dropped) = state::plan(pins, &kernel, saved, config.clock, handover);
        let run = event_loop::Run {
            signals: &mut signals,
            drops: drops.clone(),
            rcvbuf: sockets.rcvbuf,
            resume,
            state_path,
            succession: succession(&config.socket, received, &sockets)?,
        };
        let udp = sockets
            .udp
            .as_ref()
            .map(|udp| udp_receiver(&config, udp.try_clone()?, &drops, &sessions))
            .transpose()?;
        match ebpf {
            Some((mut datapath, kernel_drops, _)) => {
                for key in dropped {
                    datapath.restored(key, None);
                }
                // The filter passes secure-length datagrams up; they are read (or counted) here.
                if let Some(receiver) = udp {
                    datapath.set_secure_udp(receiver);
                }
                event_loop::serve(datapath, Some(kernel_drops), &mut config, run).await
            }
            None => {
                let datapath = UserspaceDatapath::new(
                    sockets.uds.try_clone()?,
                    udp,
                    config.clock,
                    config.allow_cross_namespace,
                    config.junk_sample_one_in,
                    config.limits.per_pid_rate,
                    drops.clone(),
                )?;
                event_loop::serve(datapath, None, &mut config, run).await
            }
        }
    }
    .await;
    match result {
        // The successor receives on this socket now: its file stays.
        Ok(event_loop::Ended::HandedOver { peer_pid, metrics }) => {
            Ok(config.hold.as_ref().map(|hold| {
                let probes = metrics.map(std::net::TcpListener::from);
                hold::after_handover(hold, signals, peer_pid, probes)
            }))
        }
        // The service manager's file stays; so does the file of an observer that was to
        // hand over (it carries on when this one fails before confirming).
        _ if sockets.activated => result.map(|_| None),
        Err(e) if sockets.handed => Err(e),
        _ => {
            remove_socket_file(&sockets.file);
            result.map(|_| None)
        }
    }
}

/// Once this observer receives: the previous one (if it handed over) is told to exit, and
/// the control socket a successor will ask is bound.
fn succession(
    socket: &std::path::Path,
    received: Option<takeover::Received>,
    sockets: &Sockets,
) -> Result<event_loop::Succession> {
    if let Some(received) = received {
        received.confirm();
    }
    let control = match takeover::Control::listen(socket) {
        Ok(control) => Some(control),
        Err(e) => {
            event!(warn, "takeover_unavailable", reason = format!("{e:#}"));
            None
        }
    };
    Ok(event_loop::Succession {
        control,
        fds: takeover::Handed {
            uds: std::os::fd::AsFd::as_fd(&sockets.uds).try_clone_to_owned()?,
            udp: sockets
                .udp
                .as_ref()
                .map(|u| std::os::fd::AsFd::as_fd(u).try_clone_to_owned())
                .transpose()?,
            metrics: None,
        },
        metrics: sockets
            .metrics
            .as_ref()
            .map(std::net::TcpListener::try_clone)
            .transpose()?,
    })
}

/// At exit: the socket file goes, unless another observer's (or anyone's) replaced it.
fn remove_socket_file(file: &crate::sys::sock::SocketFile) {
    if !file.remove() {
        event!(
            warn,
            "socket_file_kept",
            path:% = file.path().display(),
            reason = "it is not the socket this observer bound",
        );
    }
}

/// The daemon's reader of the UDP socket (secure frames; plaintext ones too on the
/// userspace datapath).
fn udp_receiver(
    config: &Config,
    udp: UdpSocket,
    drops: &Arc<DropCounters>,
    sessions: &[crate::datapath::secure::SavedSession],
) -> Result<UdpReceiver> {
    let mut frames = UdpFrames::new(config.plaintext_udp, config.secure.clone());
    frames.restore_sessions(sessions);
    Ok(UdpReceiver::new(udp, frames, config.clock, drops.clone())?)
}

fn install_signals(config: &Config) -> Result<Signals> {
    let (signals, installed) =
        signal::install(config.signal_mode).context("installing signal handlers")?;
    event!(
        info,
        "signals_installed",
        mode = if installed.direct { "direct" } else { "libc" },
        flags = format!("{:#x}", installed.flags),
        restorer = installed
            .restorer
            .map_or("none".to_owned(), |r| format!("{r:#x}")),
        self_test = "passed",
        rseq_size = signal::rseq_size(),
    );
    Ok(signals)
}

/// The observer's sockets: handed over by the observer this one takes over from, else passed
/// by a service manager, else bound here.
fn bind(
    config: &Config,
    received: Option<&mut takeover::Received>,
    mut activated: Activated,
) -> Result<Sockets> {
    use crate::sys::sock::{SocketFile, prepare_uds};
    let mut handed = received.map(|r| (r.uds.take(), r.udp.take(), r.metrics.take()));
    let (uds, file, rcvbuf, is_activated) = match (
        handed.as_mut().and_then(|h| h.0.take()),
        activated.uds.take(),
    ) {
        (Some(uds), _) | (None, Some(uds)) => {
            let from_manager = handed.is_none();
            let rcvbuf = prepare_uds(&uds, config.uds_rcvbuf_bytes)?;
            let file = SocketFile::current(&config.socket)
                .with_context(|| format!("{}", config.socket.display()))?;
            (uds, file, rcvbuf, from_manager)
        }
        (None, None) => {
            let (uds, file, rcvbuf) = crate::sys::sock::bind_uds(
                &config.socket,
                config.socket_mode,
                config.uds_rcvbuf_bytes,
            )
            .with_context(|| format!("binding {}", config.socket.display()))?;
            (uds, file, rcvbuf, false)
        }
    };
    // A handed-over (or passed) socket serves when it is the configured address (port 0
    // takes whatever the previous observer had); another address is bound anew.
    let fits = |want: std::net::SocketAddr, have: std::io::Result<std::net::SocketAddr>| {
        have.is_ok_and(|have| {
            (want.port() == 0 || want.port() == have.port())
                && (want.ip().is_unspecified() || want.ip() == have.ip())
        })
    };
    let handed_udp = handed.as_mut().and_then(|h| h.1.take());
    let udp = match config.udp {
        None => None,
        Some(addr) => {
            let sock = match [handed_udp, activated.udp.take()]
                .into_iter()
                .flatten()
                .find(|s| fits(addr, s.local_addr()))
            {
                Some(sock) => sock,
                None => UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?,
            };
            sock.set_nonblocking(true)?;
            Some(sock)
        }
    };
    let handed_metrics = handed.as_mut().and_then(|h| h.2.take());
    let metrics = config.prom_addr.and_then(|addr| {
        [handed_metrics, activated.metrics.take()]
            .into_iter()
            .flatten()
            .find(|l| fits(addr, l.local_addr()))
    });
    Ok(Sockets {
        uds,
        udp,
        rcvbuf,
        file,
        activated: is_activated,
        handed: handed.is_some(),
        metrics,
    })
}

/// Sockets passed by a service manager, sorted by kind; one line names what was taken.
#[derive(Default)]
struct Activated {
    uds: Option<UnixDatagram>,
    udp: Option<UdpSocket>,
    metrics: Option<std::net::TcpListener>,
}

fn sys_activated(
    config: &Config,
    passed: Vec<crate::sys::listen_fds::Passed>,
) -> Result<Activated> {
    use std::os::fd::AsFd;
    let mut out = Activated::default();
    if passed.is_empty() {
        return Ok(out);
    }
    let mut taken = Vec::new();
    for p in passed {
        let kind = crate::sys::fdpass::socket_kind(p.fd.as_fd())?;
        let name = &p.name;
        match kind {
            (libc::AF_UNIX, libc::SOCK_DGRAM, _) if out.uds.is_none() => {
                let uds = UnixDatagram::from(p.fd);
                let path = uds
                    .local_addr()?
                    .as_pathname()
                    .map(std::path::Path::to_owned);
                if path.as_deref() != Some(config.socket.as_path()) {
                    anyhow::bail!(
                        "the service manager passed the Unix socket {} ({name}), not --socket {}",
                        path.map_or("(unnamed)".to_owned(), |p| p.display().to_string()),
                        config.socket.display()
                    );
                }
                taken.push(format!("uds:{name}"));
                out.uds = Some(uds);
            }
            (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM, _) if out.udp.is_none() => {
                taken.push(format!("udp:{name}"));
                out.udp = Some(UdpSocket::from(p.fd));
            }
            (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM, true) if out.metrics.is_none() => {
                taken.push(format!("metrics:{name}"));
                out.metrics = Some(std::net::TcpListener::from(p.fd));
            }
            _ => event!(
                warn,
                "listen_fd_ignored",
                name = name,
                reason = "not a socket this observer uses",
            ),
        }
    }
    event!(info, "socket_activation", sockets = taken.join(","));
    Ok(out)
}

/// The eBPF datapath when configured and possible; `None` means the userspace datapath
/// (after one line saying why, unless it was asked for).
fn start_ebpf(
    config: &Config,
    sockets: &Sockets,
    drops: &Arc<DropCounters>,
) -> Result<Option<(EbpfDatapath, KernelDrops, Pins)>> {
    if config.datapath == DatapathMode::Userspace {
        return Ok(None);
    }
    let started = EbpfDatapath::start(
        sockets.uds.try_clone()?,
        sockets.udp.as_ref().map(UdpSocket::try_clone).transpose()?,
        config,
        drops.clone(),
        PinRequest {
            root: &config.pin_root,
            socket: &config.socket,
            fresh: config.fresh_state,
        },
    );
    match started {
        Ok(started) => {
            // The kernel BTF parsed while loading is freed by now: give it back.
            crate::sys::memory::release_free_heap();
            Ok(Some(started))
        }
        Err(e) if config.datapath == DatapathMode::Ebpf => {
            if !sockets.activated && !sockets.handed {
                remove_socket_file(&sockets.file);
            }
            anyhow::bail!("--datapath ebpf: {e}");
        }
        Err(e) => {
            event!(warn, "datapath_fallback", datapath = "userspace", reason:% = e);
            crate::datapath::ebpf::detach(&sockets.uds, sockets.udp.as_ref());
            Ok(None)
        }
    }
}
