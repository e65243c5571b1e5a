//! The observer daemon: start-up (signals, sockets, the datapath the kernel and our
//! privileges allow), then the event loop, then shutdown.

mod event_loop;
mod health;
mod http;
mod http_conn;
mod liveness;
mod state;

pub use health::Probes;

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
    let config = match Config::from_command_line(line) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("varta-watch: error: {e}");
            return ExitCode::from(2);
        }
    };
    for (flag, why) in crate::config::warnings(&line.matches) {
        log::warn!("event=flag_ignored flag={flag} reason=\"{why}\"");
    }
    if config.plaintext_udp {
        log::warn!(
            "event=plaintext_udp_unauthenticated addr={} reason=\"plaintext UDP frames are unauthenticated: anyone who can reach this port can claim any pid; use --key-file for secure UDP\"",
            config.udp.map_or("-".to_owned(), |a| a.to_string())
        );
    }
    if let Some(addr) = config.udp
        && !config.secure.is_empty()
        && !addr.ip().is_loopback()
    {
        log::warn!(
            "event=secure_udp_non_loopback addr={addr} reason=\"secure UDP listens beyond this host: any key holder on the network may claim any pid\""
        );
    }
    // Before any thread starts: they inherit it.
    crate::sys::priority::set_nice(config.nice);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(start(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!(
                "event=fatal error=\"{}\"",
                format!("{e:#}").replace('"', "'")
            );
            ExitCode::FAILURE
        }
    }
}

/// The observer's sockets, bound before any datapath is chosen.
struct Sockets {
    uds: UnixDatagram,
    udp: Option<UdpSocket>,
    /// The receive buffer the kernel granted the UDS.
    rcvbuf: u32,
    file: crate::sys::sock::SocketFile,
}

async fn start(mut config: Config) -> Result<()> {
    let fds = crate::sys::fdlimit::raise().context("raising RLIMIT_NOFILE")?;
    log::info!(
        "event=fd_limit soft={} hard={} reserve={} watcher_budget={}",
        fds.soft,
        fds.hard,
        crate::sys::fdlimit::RESERVE,
        fds.watch_budget
    );
    let signals = install_signals(&config)?;
    let sockets = bind(&config)?;
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
    } else {
        state::State::load(&state_path)
    };
    let result = match start_ebpf(&config, &sockets, &drops) {
        Ok(Some((mut datapath, kernel_drops, pins))) => {
            // The filter passes secure-length datagrams up; they are read (or counted) here.
            if let Some(udp) = &sockets.udp {
                let receiver = udp_receiver(&config, udp.try_clone()?, &drops)?;
                datapath.set_secure_udp(receiver);
            }
            let kernel = if pins.resume {
                datapath.kernel_agents()
            } else {
                Vec::new()
            };
            let (resume, dropped) = state::plan(Some(&pins), &kernel, saved, config.clock);
            for key in dropped {
                datapath.restored(key, None);
            }
            event_loop::serve(
                datapath,
                Some(kernel_drops),
                &mut config,
                signals,
                drops,
                sockets.rcvbuf,
                resume,
                state_path,
            )
            .await
        }
        Ok(None) => {
            if config.fresh_state {
                let _ = crate::datapath::ebpf::pins::remove(&config.pin_root, &config.socket);
            }
            let (resume, _) = state::plan(None, &[], saved, config.clock);
            let udp = sockets
                .udp
                .map(|udp| udp_receiver(&config, udp, &drops))
                .transpose()?;
            let datapath = UserspaceDatapath::new(
                sockets.uds,
                udp,
                config.clock,
                config.allow_cross_namespace,
                config.junk_sample_one_in,
                drops.clone(),
            )?;
            event_loop::serve(
                datapath,
                None,
                &mut config,
                signals,
                drops,
                sockets.rcvbuf,
                resume,
                state_path,
            )
            .await
        }
        Err(e) => Err(e),
    };
    remove_socket_file(&sockets.file);
    result
}

/// At exit: the socket file goes, unless another observer's (or anyone's) replaced it.
fn remove_socket_file(file: &crate::sys::sock::SocketFile) {
    if !file.remove() {
        log::warn!(
            "event=socket_file_kept path={} reason=\"it is not the socket this observer bound\"",
            crate::sys::text::LogValue(&file.path().display().to_string())
        );
    }
}

/// The daemon's reader of the UDP socket (secure frames; plaintext ones too on the
/// userspace datapath).
fn udp_receiver(config: &Config, udp: UdpSocket, drops: &Arc<DropCounters>) -> Result<UdpReceiver> {
    let frames = UdpFrames::new(config.plaintext_udp, config.secure.clone());
    Ok(UdpReceiver::new(udp, frames, config.clock, drops.clone())?)
}

fn install_signals(config: &Config) -> Result<Signals> {
    let (signals, installed) =
        signal::install(config.signal_mode).context("installing signal handlers")?;
    log::info!(
        "event=signals_installed mode={} flags={:#x} restorer={} self_test=passed rseq_size={}",
        if installed.direct { "direct" } else { "libc" },
        installed.flags,
        installed
            .restorer
            .map_or("none".to_owned(), |r| format!("{r:#x}")),
        signal::rseq_size()
    );
    Ok(signals)
}

fn bind(config: &Config) -> Result<Sockets> {
    let (uds, file, rcvbuf) =
        crate::sys::sock::bind_uds(&config.socket, config.socket_mode, config.uds_rcvbuf_bytes)
            .with_context(|| format!("binding {}", config.socket.display()))?;
    let udp = config
        .udp
        .map(|addr| {
            let sock = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
            sock.set_nonblocking(true)?;
            anyhow::Ok(sock)
        })
        .transpose()?;
    Ok(Sockets {
        uds,
        udp,
        rcvbuf,
        file,
    })
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
            remove_socket_file(&sockets.file);
            anyhow::bail!("--datapath ebpf: {e}");
        }
        Err(e) => {
            log::warn!("event=datapath_fallback datapath=userspace reason=\"{e}\"");
            crate::datapath::ebpf::detach(&sockets.uds, sockets.udp.as_ref());
            Ok(None)
        }
    }
}
