//! A durable append-only file written by a thread of its own, so that a slow disk, a full
//! disk or fdatasync never holds up the receive path: the event loop hands over whole
//! batches through a bounded channel and never waits. Shared by the export file and the
//! recovery audit file. The queue is bounded in batches and in bytes; records of low
//! priority ([`Sink::write_spare`]) take at most half of either, so a flood of them never
//! costs a record written with [`Sink::write`] its room.
//!
//! - Opened with `O_NOFOLLOW`, mode 0600, and only if it is a regular file.
//! - Rotation at `max_bytes`: `path` -> `path.1` -> ... -> `path.5` (the oldest is removed).
//! - `sync_every` records: fdatasync (timed into `varta_file_sync_seconds{file}`); 0 syncs
//!   only at close.
//! - A failed write (full disk) is cut back to the last whole record, counted
//!   (`varta_file_errors_total{file,op}`, `varta_file_records_lost_total{file}`) and logged
//!   at most once a minute. Once a second the writer checks that `path` still names its open
//!   file; if it vanished (directory removed, file deleted), the old file is closed and a new
//!   one opened when possible: a deleted file is never kept open.
//! - `reopen` (SIGHUP) closes and reopens; a failed reopen leaves no file open.

use crate::sys::logger::event;
use std::{
    fs::File,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub use super::sink_metrics::FileMetrics;
use super::sink_metrics::{FileLabel, FileOpLabel};

/// Rotated generations kept besides the current file.
pub const GENERATIONS: u32 = 5;
/// Batches queued for the writer before new ones are dropped (and counted).
const QUEUE: u64 = 1024;
/// Bytes queued for the writer before new batches are dropped (and counted).
const QUEUE_BYTES: u64 = 8 << 20;
/// How often the writer checks that its path still names its file, and retries an open.
const RECHECK: Duration = Duration::from_secs(1);
/// At most one log line per file and kind of failure in this long.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// How long shutdown waits for a writer to finish what is queued: a hung disk must not
/// hang the observer's exit (the supervisor would SIGKILL it, losing everything else).
const FLUSH_GUARD: Duration = Duration::from_secs(5);

pub use crate::config::SinkOptions;

enum Msg {
    /// Whole records, each ending in a newline.
    Records(Vec<u8>),
    Reopen,
}

/// The event loop's handle on a durable file. Dropping it writes what is queued, syncs and
/// closes the file.
pub struct Sink {
    name: &'static str,
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<()>>,
    metrics: FileMetrics,
    full_logged: Option<Instant>,
    /// Records, bytes and batches queued and not yet written.
    pending: Arc<Pending>,
}

#[derive(Default)]
struct Pending {
    records: AtomicU64,
    bytes: AtomicU64,
    batches: AtomicU64,
}

impl Pending {
    /// Takes a batch in while the queue stays within `batches` and `bytes`.
    fn admit(&self, records: u64, bytes: u64, max_batches: u64, max_bytes: u64) -> bool {
        // Only the event loop adds: the writer's concurrent removals only make room.
        if self.batches.load(Ordering::Relaxed) >= max_batches
            || self.bytes.load(Ordering::Relaxed) + bytes > max_bytes
        {
            return false;
        }
        self.records.fetch_add(records, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn remove(&self, records: u64, bytes: u64) {
        self.records.fetch_sub(records, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.batches.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Opens `path` for appending (`sys::owned_file`: no symlink, FIFO or foreign file), mode
/// 0600.
pub fn open_private(path: &Path) -> io::Result<File> {
    crate::sys::owned_file::open(path, crate::sys::owned_file::Write::Append, 0o600)
}

impl Sink {
    /// Opens the file now (so that an unusable path fails start-up) and starts its writer.
    pub fn open(name: &'static str, opts: SinkOptions, metrics: FileMetrics) -> io::Result<Sink> {
        let file = open_private(&opts.path)?;
        // One more slot than the bound `Pending` keeps: a reopen always finds room.
        let (tx, rx) = sync_channel(QUEUE as usize + 1);
        let pending = Arc::new(Pending::default());
        let mut writer = Writer::new(name, opts, metrics.clone());
        writer.adopt(file)?;
        let written = pending.clone();
        let thread = std::thread::Builder::new()
            .name(format!("varta-{name}"))
            .spawn(move || writer.run(rx, &written))?;
        Ok(Sink {
            name,
            tx: Some(tx),
            thread: Some(thread),
            metrics,
            full_logged: None,
            pending,
        })
    }

    /// Queues whole records (lines); never waits. A full queue drops them, counted.
    pub fn write(&mut self, records: Vec<u8>) {
        self.write_within(records, QUEUE, QUEUE_BYTES);
    }

    /// As [`Sink::write`], for records of low priority: queued only while the queue is at
    /// most half full, so they never take the room of records written with `write`.
    pub fn write_spare(&mut self, records: Vec<u8>) {
        self.write_within(records, QUEUE / 2, QUEUE_BYTES / 2);
    }

    fn write_within(&mut self, records: Vec<u8>, max_batches: u64, max_bytes: u64) {
        if records.is_empty() {
            return;
        }
        let (n, bytes) = (count(&records), records.len() as u64);
        if !self.pending.admit(n, bytes, max_batches, max_bytes) {
            self.lost(n);
            return;
        }
        let Some(tx) = &self.tx else { return };
        if tx.try_send(Msg::Records(records)).is_err() {
            self.pending.remove(n, bytes);
            self.lost(n);
        }
    }

    /// Closes the file and opens `path` again (after an external rotation).
    pub fn reopen(&mut self) {
        if let Some(tx) = &self.tx {
            // Ignored only when the writer is gone or a reopen is queued already.
            let _ = tx.try_send(Msg::Reopen);
        }
    }

    fn lost(&mut self, records: u64) {
        let label = FileLabel { file: self.name };
        self.metrics.lost.get_or_create(&label).inc_by(records);
        if self.full_logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.full_logged = Some(Instant::now());
            event!(
                warn,
                "file_queue_full",
                file = self.name,
                records_lost = records,
            );
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued, sync and exit.
        self.tx.take();
        if let Some(thread) = self.thread.take()
            && !joined_within(thread, FLUSH_GUARD)
        {
            event!(
                warn,
                "file_flush_abandoned",
                file = self.name,
                records_unwritten = self.pending.records.load(Ordering::Relaxed),
                reason = format!(
                    "the writer did not finish within {} s (a hung disk?)",
                    FLUSH_GUARD.as_secs()
                ),
            );
        }
    }
}

/// Joins `thread` if it ends within `guard`; else leaves it running (detached).
fn joined_within(thread: JoinHandle<()>, guard: Duration) -> bool {
    let end = Instant::now() + guard;
    while !thread.is_finished() {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = thread.join();
    true
}

struct Writer {
    name: &'static str,
    opts: SinkOptions,
    metrics: FileMetrics,
    file: Option<File>,
    /// (device, inode) of the open file, to notice that `path` no longer names it.
    ident: (u64, u64),
    size: u64,
    unsynced: u64,
    checked: Instant,
    logged: [Option<Instant>; 4],
}

/// Records in `bytes`: one per line.
fn count(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|b| **b == b'\n').count() as u64
}

const OPS: [&str; 4] = ["open", "write", "sync", "rotate"];

impl Writer {
    fn new(name: &'static str, opts: SinkOptions, metrics: FileMetrics) -> Self {
        Writer {
            name,
            opts,
            metrics,
            file: None,
            ident: (0, 0),
            size: 0,
            unsynced: 0,
            checked: Instant::now(),
            logged: [None; 4],
        }
    }

    fn run(mut self, rx: Receiver<Msg>, pending: &Pending) {
        while let Ok(msg) = rx.recv() {
            match msg {
                Msg::Records(bytes) => {
                    self.append_all(&bytes);
                    pending.remove(count(&bytes), bytes.len() as u64);
                }
                Msg::Reopen => self.reopen(),
            }
        }
        self.close();
    }

    fn adopt(&mut self, file: File) -> io::Result<()> {
        let meta = file.metadata()?;
        self.ident = (meta.dev(), meta.ino());
        self.size = meta.len();
        self.file = Some(file);
        self.checked = Instant::now();
        Ok(())
    }

    fn fail(&mut self, op: &'static str, e: &io::Error, lost: u64) {
        let i = OPS.iter().position(|o| *o == op).unwrap_or(0);
        self.metrics
            .errors
            .get_or_create(&FileOpLabel {
                file: self.name,
                op,
            })
            .inc();
        self.metrics
            .lost
            .get_or_create(&FileLabel { file: self.name })
            .inc_by(lost);
        if self.logged[i].is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.logged[i] = Some(Instant::now());
            event!(
                warn,
                "file_error",
                file = self.name,
                op = op,
                path:% = self.opts.path.display(),
                error:% = e,
                records_lost = lost,
            );
        }
    }

    fn try_open(&mut self) -> bool {
        match open_private(&self.opts.path).and_then(|f| self.adopt(f)) {
            Ok(()) => true,
            Err(e) => {
                self.fail("open", &e, 0);
                false
            }
        }
    }

    /// Once a second: is `path` still our file? If not (or none is open), open it anew.
    fn recheck(&mut self) {
        if self.checked.elapsed() < RECHECK {
            return;
        }
        self.checked = Instant::now();
        let ours = self.file.is_some()
            && std::fs::symlink_metadata(&self.opts.path)
                .is_ok_and(|m| (m.dev(), m.ino()) == self.ident);
        if !ours {
            if self.file.take().is_some() {
                event!(
                    warn,
                    "file_vanished",
                    file = self.name,
                    path:% = self.opts.path.display(),
                );
            }
            if self.try_open() {
                event!(info, "file_reopened", file = self.name, reason = "vanished");
            }
        }
    }

    /// Writes whole records, rotating between two records where the size limit falls.
    fn append_all(&mut self, mut records: &[u8]) {
        self.recheck();
        while !records.is_empty() {
            let room = self
                .opts
                .max_bytes
                .map_or(usize::MAX, |max| max.saturating_sub(self.size) as usize);
            let fits = match records.get(..room) {
                None => records.len(),
                Some(head) => head.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1),
            };
            let take = match fits {
                // Not one more record fits: rotate; a record longer than the limit goes
                // alone into a fresh file.
                0 if self.size > 0 => {
                    self.rotate();
                    continue;
                }
                0 => records
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(records.len(), |i| i + 1),
                n => n,
            };
            let (chunk, rest) = records.split_at(take);
            self.append(chunk);
            records = rest;
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        let n = count(bytes);
        let Some(file) = &mut self.file else {
            self.metrics
                .lost
                .get_or_create(&FileLabel { file: self.name })
                .inc_by(n);
            return;
        };
        if let Err(e) = file.write_all(bytes) {
            // Cut a partial record back off: the file holds whole records only.
            let _ = file.set_len(self.size);
            self.fail("write", &e, n);
            return;
        }
        self.size += bytes.len() as u64;
        self.unsynced += n;
        if self.opts.sync_every > 0 && self.unsynced >= self.opts.sync_every {
            self.sync();
        }
    }

    fn sync(&mut self) {
        let Some(file) = &self.file else { return };
        let started = Instant::now();
        let result = file.sync_data();
        self.metrics
            .sync_seconds
            .get_or_create(&FileLabel { file: self.name })
            .observe(started.elapsed().as_secs_f64());
        self.unsynced = 0;
        if let Err(e) = result {
            self.fail("sync", &e, 0);
        }
    }

    fn rotate(&mut self) {
        self.sync();
        self.file = None;
        let path = &self.opts.path;
        let generation = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
        let _ = std::fs::remove_file(generation(GENERATIONS));
        let mut result = Ok(());
        for n in (1..GENERATIONS).rev() {
            match std::fs::rename(generation(n), generation(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => result = Err(e),
                _ => {}
            }
        }
        result = result.and(std::fs::rename(path, generation(1)));
        self.metrics
            .rotations
            .get_or_create(&FileLabel { file: self.name })
            .inc();
        if let Err(e) = result {
            self.fail("rotate", &e, 0);
        }
        self.try_open();
    }

    fn reopen(&mut self) {
        self.sync();
        self.file = None;
        if self.try_open() {
            event!(info, "file_reopened", file = self.name, reason = "sighup");
        } else {
            event!(
                warn,
                "file_reopen_failed",
                file = self.name,
                path:% = self.opts.path.display(),
            );
        }
    }

    fn close(&mut self) {
        if self.unsynced > 0 {
            self.sync();
        }
        self.file = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_records_never_take_the_room_of_the_others() {
        let p = Pending::default();
        // Spare batches stop at half the bytes...
        assert!(p.admit(1, QUEUE_BYTES / 2, QUEUE / 2, QUEUE_BYTES / 2));
        assert!(!p.admit(1, 1, QUEUE / 2, QUEUE_BYTES / 2));
        // ...where the others still find the other half.
        assert!(p.admit(1, QUEUE_BYTES / 2, QUEUE, QUEUE_BYTES));
        assert!(!p.admit(1, 1, QUEUE, QUEUE_BYTES));
        p.remove(1, QUEUE_BYTES / 2);
        p.remove(1, QUEUE_BYTES / 2);
        // And at half the batches.
        for _ in 0..QUEUE / 2 {
            assert!(p.admit(1, 1, QUEUE / 2, QUEUE_BYTES / 2));
        }
        assert!(!p.admit(1, 1, QUEUE / 2, QUEUE_BYTES / 2));
        assert!(p.admit(1, 1, QUEUE, QUEUE_BYTES));
        assert_eq!(p.records.load(Ordering::Relaxed), QUEUE / 2 + 1);
    }

    #[test]
    fn a_writer_that_does_not_finish_is_left_behind_after_the_guard() {
        let quick = std::thread::spawn(|| {});
        assert!(joined_within(quick, Duration::from_secs(5)));
        let (_hold, hung) = std::sync::mpsc::channel::<()>();
        let stuck = std::thread::spawn(move || {
            let _ = hung.recv();
        });
        let t = Instant::now();
        assert!(!joined_within(stuck, Duration::from_millis(50)));
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("varta-sink-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn rotates_keeping_five_generations_of_whole_records() {
        let d = dir("rotate");
        let path = d.join("f.tsv");
        let opts = SinkOptions {
            path: path.clone(),
            max_bytes: Some(10),
            sync_every: 1,
        };
        let mut sink = Sink::open("test", opts, FileMetrics::default()).unwrap();
        for i in 0..10 {
            sink.write(format!("record{i}\n").into_bytes());
        }
        drop(sink);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "record9\n");
        for n in 1..=GENERATIONS {
            let g = std::fs::read_to_string(format!("{}.{n}", path.display())).unwrap();
            assert_eq!(g, format!("record{}\n", 9 - n));
        }
        assert!(!Path::new(&format!("{}.6", path.display())).exists());
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_a_symlink() {
        let d = dir("symlink");
        std::os::unix::fs::symlink("/etc/hostname", d.join("link")).unwrap();
        let err = open_private(&d.join("link")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
