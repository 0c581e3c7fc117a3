//! Writing files so that a crash never leaves a torn one: the data directory's keys,
//! certificates, saved TLS sessions and store layout.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes a new file readable by its owner only, creating its directory; fails if it exists.
/// Written and synced under a temporary name, then linked to `path`: a crash leaves no file or
/// the whole one (before, a crash during a first start could leave a short key file, which
/// every later start refused).
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), String> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".writing");
    let temporary = path.with_file_name(name);
    match std::fs::remove_file(&temporary) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot remove {}: {e}", temporary.display()));
        }
        _ => {}
    }
    write_new_file(&temporary, contents, 0o600)?;
    // A link, not a rename: it fails if `path` exists, as creating it would.
    let linked = std::fs::hard_link(&temporary, path);
    let _ = std::fs::remove_file(&temporary);
    linked.map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    sync_dir(dir).map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

/// Replaces `path` with `contents` in one step, creating its directory: written with `mode`
/// and synced under `temporary` (a leftover there from a crash is removed first), renamed over
/// `path`, and the directory synced. A crash leaves the old file or the new one, never a torn
/// one.
pub fn replace_file(
    path: &Path,
    temporary: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), String> {
    match std::fs::remove_file(temporary) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot remove {}: {e}", temporary.display()));
        }
        _ => {}
    }
    write_new_file(temporary, contents, mode)?;
    std::fs::rename(temporary, path).map_err(|e| {
        format!(
            "cannot rename {} to {}: {e}",
            temporary.display(),
            path.display()
        )
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    sync_dir(dir).map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

/// Makes the entries of `dir` (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `path` (not there before) with `mode`, its directory too, and syncs its contents.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A private file appears whole, owner-only, never over an existing one; the temporary a
    /// crash left behind is replaced, not linked.
    #[test]
    fn a_private_file_appears_whole_and_never_replaces_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys").join("signing.key");
        std::fs::create_dir_all(path.parent().unwrap()).expect("dir");
        std::fs::write(path.with_file_name("signing.key.writing"), b"torn").expect("leftover");
        write_private_file(&path, b"the whole key").expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), b"the whole key");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!path.with_file_name("signing.key.writing").exists());
        let error = write_private_file(&path, b"another").expect_err("exists");
        assert!(error.contains("exists"), "{error}");
        assert_eq!(std::fs::read(&path).expect("read"), b"the whole key");
    }
}
