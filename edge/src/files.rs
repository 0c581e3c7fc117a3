//! Writing files so that a crash never leaves a torn one: the data directory's keys,
//! certificates, saved TLS sessions and store layout.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes a new file readable by its owner only, creating its directory; fails if it exists.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), String> {
    write_new_file(path, contents, 0o600)
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
