//! `--recovery-capture-stdio`: a recovery command's stdout and stderr, interleaved as they
//! arrive, kept up to `--recovery-capture-bytes` for its audit record. What comes after the
//! limit is read and discarded, so a chatty command never blocks on a full pipe; a
//! grandchild that keeps the pipes open after the command exits is not waited for.

use std::{
    os::fd::OwnedFd,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{io::AsyncReadExt, net::unix::pipe, task::JoinHandle};

/// How long output still arriving after the command exited is collected.
const AFTER_EXIT: Duration = Duration::from_millis(100);

/// Output being collected from one recovery command.
pub struct Capture {
    kept: Arc<Mutex<Kept>>,
    readers: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct Kept {
    bytes: Vec<u8>,
    truncated: bool,
}

/// Gives the command pipes for stdout and stderr when capturing (`limit` bytes).
pub fn prepare(cmd: &mut Command, limit: Option<usize>) {
    if limit.is_some() {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
}

/// Starts reading the spawned command's pipes (set up by [`prepare`]).
pub fn start(child: &mut Child, limit: Option<usize>) -> Option<Capture> {
    let limit = limit?;
    let kept = Arc::new(Mutex::new(Kept::default()));
    let fds = [
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    ];
    let readers = fds
        .into_iter()
        .flatten()
        .filter_map(|fd| pipe::Receiver::from_owned_fd(fd).ok())
        .map(|rx| tokio::spawn(read(rx, kept.clone(), limit)))
        .collect();
    Some(Capture { kept, readers })
}

async fn read(mut rx: pipe::Receiver, kept: Arc<Mutex<Kept>>, limit: usize) {
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = rx.read(&mut buf).await {
        let mut k = kept.lock().expect("poisoned");
        let room = limit.saturating_sub(k.bytes.len());
        k.bytes.extend_from_slice(&buf[..n.min(room)]);
        k.truncated |= n > room;
    }
}

impl Capture {
    /// What was kept, once the command has exited: waits briefly for the pipes to close,
    /// then stops reading.
    pub async fn finish(self) -> String {
        let all = futures_join(self.readers);
        let _ = tokio::time::timeout(AFTER_EXIT, all).await;
        let k = self.kept.lock().expect("poisoned");
        let mut text = String::from_utf8_lossy(&k.bytes).into_owned();
        if k.truncated {
            text.push_str("...");
        }
        text
    }
}

/// Awaits every reader; readers still running when dropped by the caller's timeout are
/// aborted (their pipe ends close).
async fn futures_join(readers: Vec<JoinHandle<()>>) {
    let guards: Vec<AbortOnDrop> = readers.into_iter().map(AbortOnDrop).collect();
    for mut g in guards {
        let _ = (&mut g.0).await;
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
