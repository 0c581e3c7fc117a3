//! A failed fsync leaves bytes in the kernel's page cache that never reached the disk: Linux
//! marks the pages clean after a writeback error and reports the error once, to the caller of
//! that fsync ("fsyncgate"). A store reopened after it, in the same process (the edge reopens
//! a store whose sync failed) or in a restarted one while the machine stays up, must not read
//! those bytes back as a commit: it would answer the sender's retry of the failed commit with
//! "stored", and a power cut would then lose a message that was acknowledged.
//!
//! The disk here fails for real: ext4 on a loop device whose backing file is cut short just
//! past the blocks the store's files use, so that writes of new blocks fail in writeback and
//! reads of what was written still work; then given its size back. Needs root (mount,
//! losetup), as CI has.

use std::path::{Path, PathBuf};
use std::process::Command;

use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::log::{LogOptions, LogStore};
use courier_core::store::{Store, Transaction};

/// The file system's block, and the disk's size.
const BLOCK_BYTES: u64 = 4096;
const DISK_BYTES: u64 = 256 * 1024 * 1024;

/// ext4 on a loop device that can be made to fail its writes.
struct FailingDisk {
    image_dir: tempfile::TempDir,
    mount: tempfile::TempDir,
    device: String,
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {} (this test needs root, loop devices, mkfs.ext4 and \
         filefrag)",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

impl FailingDisk {
    fn new() -> FailingDisk {
        let image_dir = tempfile::tempdir().expect("temp dir");
        let mount = tempfile::tempdir().expect("temp dir");
        let image = image_dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(DISK_BYTES))
            .expect("a sparse disk image");
        let device = run("losetup", &["-f", "--show", text(&image)]);
        // No journal, as this machine's ext4: with one, the failed journal write would turn
        // the file system read-only, a different failure. Its metadata is all written now
        // (not by a background thread later), where the cut below cannot reach it.
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-b",
                "4096",
                "-E",
                "lazy_itable_init=0,nodiscard",
                "-O",
                "^has_journal",
                &device,
            ],
        );
        let disk = FailingDisk {
            image_dir,
            mount,
            device,
        };
        disk.mount();
        disk
    }

    fn mount(&self) {
        run(
            "mount",
            &["-o", "noinit_itable", &self.device, text(self.mount.path())],
        );
    }

    fn dir(&self) -> PathBuf {
        self.mount.path().join("store")
    }

    fn resize(&self, bytes: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.image_dir.path().join("disk.img"))
            .and_then(|file| file.set_len(bytes))
            .expect("resize the disk image");
        run("losetup", &["-c", &self.device]);
    }

    /// From here every block a file gets fails to be written, and what is written reads
    /// back. A filler file takes every free block without writing it (`fallocate`); the
    /// highest of its blocks are given back, and the disk is cut short below them. What the
    /// store writes next goes there, past the disk's end.
    fn fail_new_writes(&self) {
        let filler = self.mount.path().join("filler");
        // As many blocks as the file system gives: what it keeps for itself is not all in
        // `stat -f`, so from the free count down until one fits.
        let free_blocks = run("stat", &["-f", "-c", "%f", text(self.mount.path())])
            .parse::<u64>()
            .expect("free blocks");
        let filled = (0..64u64).any(|step| {
            let bytes = free_blocks.saturating_sub(step * 128) * BLOCK_BYTES;
            Command::new("fallocate")
                .args(["-l", &bytes.to_string(), text(&filler)])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        });
        assert!(filled, "no filler fits");
        let (logical_end, physical_end) = extents(&filler)
            .into_iter()
            .max_by_key(|extent| extent.1)
            .expect("the filler's extents");
        // Room for the next commits, all of it past the cut.
        let given_back = GIVEN_BACK_BLOCKS.min(logical_end + 1);
        run(
            "fallocate",
            &[
                "--punch-hole",
                "-o",
                &((logical_end + 1 - given_back) * BLOCK_BYTES).to_string(),
                "-l",
                &(given_back * BLOCK_BYTES).to_string(),
                text(&filler),
            ],
        );
        self.resize((physical_end + 1 - given_back) * BLOCK_BYTES);
    }

    fn heal(&self) {
        self.resize(DISK_BYTES);
    }

    /// Mounts the file system again: what it holds now is what the disk holds, as after a
    /// power cut.
    fn remount(&self) {
        run("umount", &[text(self.mount.path())]);
        self.mount();
    }
}

/// Blocks given back to the file system below the disk's cut: more than a test commit takes.
const GIVEN_BACK_BLOCKS: u64 = 2048;

/// `file`'s extents as (last logical block, last disk block), from `filefrag -v`.
fn extents(file: &Path) -> Vec<(u64, u64)> {
    // Extent lines: "   0:        0..       0:      33280..     33280:      1: ...".
    run("filefrag", &["-v", text(file)])
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            fields.first()?.trim().parse::<u64>().ok()?;
            let last = |field: &str| field.split("..").nth(1)?.trim().parse::<u64>().ok();
            Some((last(fields.get(1)?)?, last(fields.get(2)?)?))
        })
        .collect()
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount.path()).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// A store that would not open: what the directory and the kernel's log held then. (The log
/// engine's open failed here once in about 90 runs, on 2026-12-07, and the error alone did not
/// say why.)
fn open_failed(dir: &Path, error: &dyn std::fmt::Display) -> ! {
    let listing = Command::new("ls")
        .args(["-la", text(dir)])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    let kernel = Command::new("dmesg")
        .output()
        .map(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        })
        .unwrap_or_default();
    panic!(
        "open the store in {}: {error}\n{listing}\nkernel:\n{kernel}",
        dir.display()
    );
}

fn set<S: Store>(store: &S, key: &[u8], value: &[u8]) -> Result<(), String> {
    let mut txn = store.begin().map_err(|e| e.to_string())?;
    txn.set(key, value);
    txn.commit().map(|_| ()).map_err(|e| e.to_string())
}

fn get<S: Store>(store: &S, key: &[u8]) -> Option<Vec<u8>> {
    store.begin_read().expect("begin").get(key).expect("get")
}

/// The commit whose sync failed is not there after a reopen, in the same process or after
/// the disk is mounted again; the commit before it is, in both.
fn a_commit_whose_sync_failed_is_not_read_back<S: Store>(open: impl Fn(&Path) -> S) {
    let disk = FailingDisk::new();
    let dir = disk.dir();
    std::fs::create_dir_all(&dir).expect("store dir");
    {
        let store = open(&dir);
        set(&store, b"kept", &[7u8; 3000]).expect("the first commit");
        disk.fail_new_writes();
        // More blocks than the filler left free before the disk's cut.
        let failed = set(&store, b"failed", &[9u8; 4_000_000]);
        assert!(failed.is_err(), "the commit whose sync failed reports it");
        disk.heal();
    }
    {
        let store = open(&dir);
        assert_eq!(get(&store, b"kept"), Some(vec![7u8; 3000]));
        assert_eq!(
            get(&store, b"failed"),
            None,
            "a reopen read the failed commit back from the page cache, though the disk \
             never got it"
        );
    }
    disk.remount();
    let store = open(&dir);
    assert_eq!(get(&store, b"kept"), Some(vec![7u8; 3000]));
    assert_eq!(get(&store, b"failed"), None);
}

#[test]
fn the_log_engine_does_not_read_back_a_commit_whose_sync_failed() {
    a_commit_whose_sync_failed_is_not_read_back(|dir| {
        let options = LogOptions {
            // Appended through the page cache: writes of new blocks, which fail here.
            journal_segment_bytes: 0,
            direct_writes: false,
            background_thread: false,
            ..LogOptions::default()
        };
        LogStore::open(dir, &options).unwrap_or_else(|error| open_failed(dir, &error))
    });
}

#[test]
fn fjall_does_not_read_back_a_commit_whose_sync_failed() {
    a_commit_whose_sync_failed_is_not_read_back(|dir| {
        let options = FjallOptions {
            direct_journal_writes: false,
            ..FjallOptions::default()
        };
        FjallStore::open(dir, &options).unwrap_or_else(|error| open_failed(dir, &error))
    });
}
