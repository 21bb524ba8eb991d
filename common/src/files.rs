//! Files holding secrets (keys, token secrets).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `contents` to `path` readable by its owner only (0600), atomically: a temporary file
/// next to it is written, synced and renamed over it. Parent directories are created.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Makes `path` a file only its owner can read and write (0600): created empty if missing,
/// narrowed if it exists with wider permissions. For files other code writes (an SQLite
/// database: SQLite gives its -wal and -shm files the database file's permissions).
pub fn ensure_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        let mode = meta.permissions().mode() & !0o077;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_files_are_0600_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/key.pem");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!p.with_extension("tmp").exists());
    }

    #[test]
    fn existing_files_are_narrowed_to_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        std::fs::write(&p, b"data").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        ensure_private_file(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"data", "contents kept");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let fresh = dir.path().join("new");
        ensure_private_file(&fresh).unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
