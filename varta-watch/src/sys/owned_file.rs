//! Files the observer writes (export, audit, heartbeat) in directories an operator chose,
//! which others may be able to write to: never through a symlink (`O_NOFOLLOW`), never a
//! FIFO that would block start-up (`O_NONBLOCK`), and only a regular file the observer's
//! user owns with no other name (a hard link planted by someone else would point the
//! observer's writes, or a truncation, at a file they chose).

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// How the file is opened for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Append,
    /// Written in place from the start (the caller truncates or overwrites).
    InPlace,
}

/// Opens (creating with `mode`) `path` for writing, with the checks above; an existing file
/// gets `mode` back if it had another.
pub fn open(path: &Path, how: Write, mode: u32) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
    match how {
        Write::Append => opts.append(true),
        Write::InPlace => opts.write(true).truncate(false),
    };
    let file = opts.open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    // SAFETY: geteuid(2) cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(io::Error::other(format!(
            "owned by uid {}, not by the observer's user ({euid})",
            meta.uid()
        )));
    }
    if meta.nlink() != 1 {
        return Err(io::Error::other(format!(
            "has {} names (hard links): not a file of the observer's own",
            meta.nlink()
        )));
    }
    if meta.mode() & 0o777 != mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_fifos_and_symlinks_are_refused() {
        let dir = std::env::temp_dir().join(format!("varta-owned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("export");
        assert!(open(&file, Write::Append, 0o600).is_ok());
        let mode = std::fs::metadata(&file).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::hard_link(&file, dir.join("link")).unwrap();
        let e = open(&file, Write::Append, 0o600).unwrap_err();
        assert!(e.to_string().contains("hard links"), "{e}");
        std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join("sym")).unwrap();
        assert!(open(&dir.join("sym"), Write::InPlace, 0o644).is_err());
        let fifo = std::ffi::CString::new(dir.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Without O_NONBLOCK this open would wait for a reader forever.
        assert!(open(&dir.join("fifo"), Write::InPlace, 0o644).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
