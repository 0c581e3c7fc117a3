//! Journal records written around the page cache (`O_DIRECT`): a commit sends the disk only
//! the blocks its record touches. Courier's addition to this vendored crate (vendor/README.md):
//! fjall's journal writer uses it, and so does Courier's log engine (`courier_core::store::log`).
//!
//! Through the page cache, the fdatasync after a 300-byte record writes back the whole 4 KiB
//! page around it: at a pace, where each commit is one message, that is 4.6 kB for the disk per
//! message. A direct write of the same record is one or two 512-byte blocks, and skips copying
//! into the cache and its write-back: measured on this project's VM (docs/benchmarks.md,
//! thirtieth session), 1.0 kB per commit instead of 4.6, 15–25% less CPU per commit, and the
//! same fsync latency or lower. The fdatasync stays: it is what flushes the disk's cache.
//! (Courier's docs/decisions/0032 and 0033.)
//!
//! The block a record starts in usually holds the end of the record before it. The writer
//! keeps those bytes (the tail) and writes them again in front of the record, then pads the
//! last block with zeros. Records go only into a file that holds zeros past its end of records
//! (zero-filled, or a hole, which a sparse file reads as zeros), so the file reads as it would
//! have through the page cache: records, then zeros, and recovery is unchanged. Rewriting the
//! tail's block puts the records before it at the
//! same risk as the page cache's write-back of their page does: a device that tears a block
//! it overwrites can damage them either way.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Largest alignment taken from the file system; a larger one is not trusted.
const ALIGN_BYTES_MAX: usize = 64 * 1024;
/// A buffer grown past this for a large record is not kept for the next.
pub const BUFFER_KEPT_BYTES_MAX: usize = 1 << 20;

/// One journal segment open for direct writes, written front to back.
#[derive(Debug)]
pub struct DirectJournal {
    file: File,
    /// Alignment of a direct write's file offset and length: the device's logical block.
    block_bytes: usize,
    /// Alignment of a direct write's buffer in memory.
    memory_align: usize,
    /// Holds the aligned window, which starts at `window_at`.
    buffer: Vec<u8>,
    window_at: usize,
    /// Bytes of the block the next record starts in that are written already: the window
    /// starts with them.
    tail_bytes: usize,
    /// Where the next record must start: the end of the last one.
    next_offset: u64,
}

impl DirectJournal {
    /// Opens `path`, a segment that nothing was written to yet, for direct writes; `None`
    /// where its file system does not take them (it reports no alignment for direct I/O, or
    /// refuses the open), and then the journal goes through the page cache as before.
    pub fn open(path: &Path) -> Option<DirectJournal> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        let (block_bytes, memory_align) = direct_io_alignment(&file)?;
        let mut journal = DirectJournal {
            file,
            block_bytes,
            memory_align,
            buffer: Vec::new(),
            window_at: 0,
            tail_bytes: 0,
            next_offset: 0,
        };
        journal.reserve(block_bytes);
        Some(journal)
    }

    /// Opens `path` for direct writes that go on from `offset`, where its records end (the
    /// file holds zeros past it): the bytes of the block `offset` falls in are read back to
    /// start the next write. `None` where the file system does not take direct writes, or the
    /// read fails.
    pub fn open_at(path: &Path, offset: u64) -> Option<DirectJournal> {
        let mut journal = DirectJournal::open(path)?;
        let tail_bytes = (offset % journal.block_bytes as u64) as usize;
        let mut tail = vec![0u8; tail_bytes];
        File::open(path)
            .ok()?
            .read_exact_at(&mut tail, offset - tail_bytes as u64)
            .ok()?;
        let window_at = journal.window_at;
        journal.buffer[window_at..window_at + tail_bytes].copy_from_slice(&tail);
        journal.tail_bytes = tail_bytes;
        journal.next_offset = offset;
        Some(journal)
    }

    /// Where the next record must start: the end of the last one written.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Bytes of memory the writer holds for its aligned window (bounded between records).
    pub fn buffer_bytes(&self) -> usize {
        self.buffer.len()
    }

    /// Whether `record_bytes` at `offset` fits in a segment of `capacity` bytes once padded
    /// to whole blocks.
    pub fn fits(&self, offset: u64, record_bytes: u64, capacity: u64) -> bool {
        let block = self.block_bytes as u64;
        offset == self.next_offset && (offset + record_bytes).div_ceil(block) * block <= capacity
    }

    /// Writes `record` at `offset`, which must be where the last record ended (0 for the
    /// first), in one system call. An error of kind `InvalidInput` means the kernel took
    /// nothing (it refused the alignment): the caller may write the record through the page
    /// cache instead and leave this journal. Any other error may have written part of it.
    pub fn write_at(&mut self, record: &[u8], offset: u64) -> io::Result<()> {
        self.write_at_zeroing_to(record, offset, 0)
    }

    /// `write_at`, with zeros after the record up to `zeros_to` (a multiple of the block size)
    /// in the same write, where that is past the record's last block: in a sparse file, the
    /// records written there later then overwrite allocated blocks instead of each allocating
    /// in the hole (whose fdatasync also commits the file system's metadata). The caller
    /// checks that `zeros_to` is within the file.
    pub fn write_at_zeroing_to(
        &mut self,
        record: &[u8],
        offset: u64,
        zeros_to: u64,
    ) -> io::Result<()> {
        if offset != self.next_offset {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a direct write at {offset}, where the journal ends at {}",
                    self.next_offset
                ),
            ));
        }
        let block = self.block_bytes;
        let bytes = self.tail_bytes + record.len();
        let start = offset - self.tail_bytes as u64;
        let padded = (bytes.div_ceil(block) * block)
            .max(zeros_to.saturating_sub(start) as usize / block * block);
        self.reserve(padded);
        let window = &mut self.buffer[self.window_at..self.window_at + padded];
        window[self.tail_bytes..bytes].copy_from_slice(record);
        window[bytes..].fill(0);
        let written = loop {
            match self.file.write_at(window, start) {
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if written != padded {
            return Err(io::Error::other(format!(
                "a direct write of {padded} bytes wrote {written}"
            )));
        }
        // The last block, if the record ends inside it, starts the next write.
        let tail_bytes = bytes % block;
        window.copy_within(bytes - tail_bytes..bytes, 0);
        self.tail_bytes = tail_bytes;
        self.next_offset = offset + record.len() as u64;
        if padded > BUFFER_KEPT_BYTES_MAX {
            let tail = self.window()[..tail_bytes].to_vec();
            self.buffer = Vec::new();
            self.window_at = 0;
            self.reserve(block);
            self.buffer[self.window_at..self.window_at + tail_bytes].copy_from_slice(&tail);
        }
        Ok(())
    }

    /// Records that `bytes` were written at `offset`, the journal's end, some other way
    /// (through the page cache): the next direct write goes on after them, rewriting the
    /// block they end in from memory.
    pub fn wrote_elsewhere(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        if offset != self.next_offset {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bytes written at {offset}, where the journal ends at {}",
                    self.next_offset
                ),
            ));
        }
        let block = self.block_bytes;
        let end = offset + bytes.len() as u64;
        let tail_bytes = (end % block as u64) as usize;
        let window_at = self.window_at;
        if tail_bytes <= bytes.len() {
            let tail = &bytes[bytes.len() - tail_bytes..];
            self.buffer[window_at..window_at + tail_bytes].copy_from_slice(tail);
        } else {
            // Still inside the block the last write ended in: the old tail goes on.
            let kept = self.tail_bytes;
            self.buffer[window_at + kept..window_at + tail_bytes].copy_from_slice(bytes);
        }
        self.tail_bytes = tail_bytes;
        self.next_offset = end;
        Ok(())
    }

    fn window(&self) -> &[u8] {
        &self.buffer[self.window_at..]
    }

    /// Makes the aligned window at least `bytes` long, keeping the tail at its start.
    fn reserve(&mut self, bytes: usize) {
        if self.buffer.len() >= self.window_at + bytes {
            return;
        }
        let window_bytes = bytes.max(2 * (self.buffer.len() - self.window_at));
        let mut buffer = vec![0u8; window_bytes + self.memory_align];
        let window_at = buffer.as_ptr().align_offset(self.memory_align);
        let tail_bytes = self.tail_bytes;
        if !self.buffer.is_empty() {
            buffer[window_at..window_at + tail_bytes].copy_from_slice(&self.window()[..tail_bytes]);
        }
        self.buffer = buffer;
        self.window_at = window_at;
    }
}

/// The alignment direct I/O on `file` needs, `(file offsets and lengths, memory)`, as the
/// file system reports it (`statx`, Linux 6.1 and later); `None` if it reports none.
fn direct_io_alignment(file: &File) -> Option<(usize, usize)> {
    let mut status = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx on a descriptor this function borrows, with an empty path and
    // AT_EMPTY_PATH (the descriptor itself); it writes only into `status`, which is large
    // enough and zero-initialized, so a field it leaves alone reads as zero.
    #[allow(unsafe_code)]
    let status = unsafe {
        let done = libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            status.as_mut_ptr(),
        );
        if done != 0 {
            return None;
        }
        status.assume_init()
    };
    if status.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let usable = |align: u32| {
        let align = align as usize;
        (align.is_power_of_two() && align <= ALIGN_BYTES_MAX).then_some(align)
    };
    Some((
        usable(status.stx_dio_offset_align)?,
        usable(status.stx_dio_mem_align)?,
    ))
}
