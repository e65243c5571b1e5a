//! Where the filter's maps live across daemon restarts: a bpffs directory per observer socket
//! and per map-layout version (`<root>/<socket>/v<LAYOUT_VERSION>/<MAP NAME>`). The kernel
//! keeps pinned maps (and the ring buffer's queued beats) while no daemon runs, and the old
//! socket's filter, alive while connected clients hold that socket, keeps feeding them; a
//! successor on the same socket path opens the same maps and drains the same ring.

use crate::sys::logger::event;
use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use varta_common::filter::{LAYOUT_VERSION, map};

/// `statfs(2)` `f_type` of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What the daemon found in its pin directory.
#[derive(Debug)]
pub struct Pins {
    /// `<root>/<socket>/v<LAYOUT_VERSION>`; `None` when pinning is not possible here.
    pub dir: Option<PathBuf>,
    /// The maps of a previous instance are there (and match this build's layouts).
    pub resume: bool,
    /// Why the maps start empty (when `resume` is false).
    pub fresh_reason: String,
    /// Beats waiting in the resumed ring (accepted by the kernel while no daemon ran).
    pub queued: Option<u64>,
}

impl Pins {
    fn fresh(dir: Option<PathBuf>, reason: impl Into<String>) -> Self {
        Pins {
            dir,
            resume: false,
            fresh_reason: reason.into(),
            queued: None,
        }
    }
}

/// The directory of one observer socket under `root`: its file name (for people listing the
/// directory) and a hash of its absolute path (two sockets never share it).
pub fn socket_dir(root: &Path, socket: &Path) -> PathBuf {
    let absolute = std::path::absolute(socket).unwrap_or_else(|_| socket.to_owned());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a 64
    for &b in absolute.as_os_str().as_bytes() {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let name: String = absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            // bpffs refuses names with a dot (they are its own files').
            if c.is_ascii_alphanumeric() || "_-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    root.join(format!("{name}-{hash:016x}"))
}

/// Prepares the pin directory for `socket` under `root`: mounts bpffs when none is there,
/// removes pins of other layout versions (and everything with `fresh`), and says whether the
/// maps of a previous instance can be resumed.
pub fn prepare(root: &Path, socket: &Path, fresh: bool, object: &[u8]) -> Pins {
    if let Err(e) = ensure_bpffs(root) {
        return Pins::fresh(
            None,
            format!("no bpffs at {} ({e}): maps are not pinned", root.display()),
        );
    }
    let socket_dir = socket_dir(root, socket);
    let dir = socket_dir.join(format!("v{LAYOUT_VERSION}"));
    if fresh {
        let _ = std::fs::remove_dir_all(&socket_dir);
        return match create_dir(&dir) {
            Ok(()) => Pins::fresh(Some(dir), "--fresh-state"),
            Err(e) => Pins::fresh(None, format!("creating {}: {e}", dir.display())),
        };
    }
    // Pins of another layout: an older or newer build's. Never read them.
    let mut others = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&socket_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != format!("v{LAYOUT_VERSION}") {
                others.push(name);
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    if let Err(e) = create_dir(&dir) {
        return Pins::fresh(None, format!("creating {}: {e}", dir.display()));
    }
    if !dir.join(map::EVENTS).exists() {
        let reason = if others.is_empty() {
            "no pinned maps".to_owned()
        } else {
            format!(
                "pinned maps of another layout ({}; this build uses v{LAYOUT_VERSION}) were removed",
                others.join(",")
            )
        };
        return Pins::fresh(Some(dir), reason);
    }
    match check_layouts(&dir, object) {
        Ok(()) => Pins {
            queued: queued_records(&dir),
            dir: Some(dir),
            resume: true,
            fresh_reason: String::new(),
        },
        Err(why) => {
            let _ = std::fs::remove_dir_all(&dir);
            match create_dir(&dir) {
                Ok(()) => Pins::fresh(
                    Some(dir),
                    format!("pinned maps do not match this build ({why}) and were removed"),
                ),
                Err(e) => Pins::fresh(None, format!("creating {}: {e}", dir.display())),
            }
        }
    }
}

/// The pinned ring buffer's size: a resumed ring keeps the size it was created with.
pub fn pinned_ring_bytes(dir: &Path) -> Option<u32> {
    aya::maps::MapInfo::from_pin(dir.join(map::EVENTS))
        .ok()
        .map(|info| info.max_entries())
}

/// How many records wait in the pinned ring buffer (queued while no daemon ran): its
/// producer position (page 1) less its consumer position (page 0), read-only mappings.
pub fn queued_records(dir: &Path) -> Option<u64> {
    use std::os::fd::{AsFd, AsRawFd};
    let map = aya::maps::MapData::from_pin(dir.join(map::EVENTS)).ok()?;
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: no arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let read = |offset: usize| -> Option<u64> {
        // SAFETY: a read-only shared mapping of one page of the ring's metadata, read once
        // and unmapped.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            );
            if p == libc::MAP_FAILED {
                return None;
            }
            let v = std::ptr::read_volatile(p as *const u64);
            libc::munmap(p, page);
            Some(v)
        }
    };
    let consumer = read(0)?;
    let producer = read(page)?;
    Some(producer.saturating_sub(consumer) / varta_common::filter::RING_RECORD_BYTES as u64)
}

/// Every pinned map has the key, value, flags and size this build's object declares (the
/// ring buffer's size excepted: it is resumed at its own).
fn check_layouts(dir: &Path, object: &[u8]) -> Result<(), String> {
    let object = aya_obj::Object::parse(object).map_err(|e| format!("parsing the object: {e}"))?;
    for name in map::ALL {
        let want = object
            .maps
            .get(name)
            .ok_or_else(|| format!("the object has no map {name}"))?;
        let have = aya::maps::MapInfo::from_pin(dir.join(name))
            .map_err(|e| format!("opening the pinned {name}: {e}"))?;
        let mut differs = Vec::new();
        if have.key_size() != want.key_size() {
            differs.push(format!("key {} != {}", have.key_size(), want.key_size()));
        }
        if have.value_size() != want.value_size() {
            differs.push(format!(
                "value {} != {}",
                have.value_size(),
                want.value_size()
            ));
        }
        if have.map_flags() != want.map_flags() {
            differs.push(format!(
                "flags {:#x} != {:#x}",
                have.map_flags(),
                want.map_flags()
            ));
        }
        if name != map::EVENTS && have.max_entries() != want.max_entries() {
            differs.push(format!(
                "entries {} != {}",
                have.max_entries(),
                want.max_entries()
            ));
        }
        if !differs.is_empty() {
            return Err(format!("{name}: {}", differs.join(", ")));
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

use std::os::unix::fs::DirBuilderExt;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string and a zeroed out-parameter of the right type.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// `root` is a directory on a bpffs afterwards. A root that cannot be created (under
/// `/sys/fs/bpf`, a sysfs directory until something is mounted there) gets bpffs mounted on
/// its parent; a root on another filesystem gets it mounted on itself.
fn ensure_bpffs(root: &Path) -> io::Result<()> {
    if root.is_dir() && is_bpffs(root) {
        return Ok(());
    }
    if !root.exists() {
        if let Some(parent) = root.parent().filter(|p| p.is_dir() && !is_bpffs(p))
            && create_dir(root).is_err()
        {
            mount_bpffs(parent)?;
        }
        create_dir(root)?;
        if is_bpffs(root) {
            return Ok(());
        }
    }
    mount_bpffs(root)
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = CString::new(at.as_os_str().as_bytes())?;
    // SAFETY: valid C strings; no mount data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Only root may look inside (the maps hold every agent's pid and beat times).
    let _ = std::fs::set_permissions(at, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    event!(
        info,
        "bpffs_mounted",
        path:% = at.display(),
        reason = "no bpffs was mounted there; the filter's maps are pinned under it",
    );
    Ok(())
}

/// Removes the pins of `socket` under `root` (every layout version).
pub fn remove(root: &Path, socket: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(socket_dir(root, socket)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_socket_path_has_its_own_directory() {
        let root = Path::new("/sys/fs/bpf/varta");
        let a = socket_dir(root, Path::new("/run/varta/varta.sock"));
        let b = socket_dir(root, Path::new("/tmp/x/varta.sock"));
        assert_ne!(a, b);
        assert_eq!(a, socket_dir(root, Path::new("/run/varta/varta.sock")));
        assert!(
            a.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("varta_sock-")
        );
        let odd = socket_dir(root, Path::new("/tmp/a b/\u{e9} x.sock"));
        let name = odd.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("__x_sock-"), "{name}");
    }
}
