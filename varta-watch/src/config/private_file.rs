//! Secrets and commands read from files only the observer's user can read: opened once
//! without following a symlink, and checked on the open descriptor (`fstat`), so nothing
//! can swap the file between the check and the read.

use std::{
    fs::OpenOptions,
    io::Read,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::Path,
};

use zeroize::Zeroizing;

/// The whole file, or one line saying why it is refused (the caller names the flag).
pub fn read_private(path: &Path) -> Result<Zeroizing<String>, String> {
    let shown = path.display();
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => format!("{shown} is a symlink; give the file itself"),
            _ => format!("{shown}: {e}"),
        })?;
    let meta = file.metadata().map_err(|e| format!("{shown}: {e}"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if meta.uid() != euid || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{shown} must be owned by uid {euid} with mode 0600 (it is uid {}, mode {:04o})",
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text)
        .map_err(|e| format!("{shown}: {e}"))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, name: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn only_a_private_regular_file_is_read() {
        let dir = std::env::temp_dir().join(format!("varta-private-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = file(&dir, "ok", 0o600);
        assert_eq!(read_private(&ok).unwrap().as_str(), "secret\n");
        let open = file(&dir, "open", 0o644);
        assert!(read_private(&open).unwrap_err().contains("mode 0644"));
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert!(read_private(&link).unwrap_err().contains("symlink"));
        assert!(read_private(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
