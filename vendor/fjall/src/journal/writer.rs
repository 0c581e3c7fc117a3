// Copyright (c) 2024-present, fjall-rs
// This source code is licensed under both the Apache 2.0 and MIT License
// (found in the LICENSE-* files in the repository)

use super::entry::{serialize_marker_item, Entry};
use crate::{
    batch::item::Item as BatchItem, direct_journal::DirectJournal, file::fsync_directory,
    journal::recovery::JournalId, keyspace::InternalKeyspaceId,
};
use lsm_tree::{CompressionType, SeqNo, ValueType};
use std::{
    fs::{File, OpenOptions},
    hash::Hasher,
    io::{BufWriter, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

// TODO: this should be a database configuration
pub const PRE_ALLOCATED_BYTES: u64 = 64 * 1_024 * 1_024;

pub const JOURNAL_BUFFER_BYTES: usize = 8 * 1_024;

pub struct Writer {
    pub(crate) path: PathBuf,
    file: Sink,
    buf: Vec<u8>,
    is_buffer_dirty: bool,

    compression: CompressionType,
    compression_threshold: usize,
}

/// The persist mode allows setting the durability guarantee of previous writes
#[derive(Copy, Clone, Debug, Eq, PartialEq)]
pub enum PersistMode {
    /// Flushes data to OS buffers. This allows the OS to write out data in case of an
    /// application crash.
    ///
    /// When this function returns, data is **not** guaranteed to be persisted in case
    /// of a power loss event or OS crash.
    Buffer,

    /// Flushes data using `fdatasync`.
    ///
    /// Use if you know that `fdatasync` is sufficient for your file system and/or operating system.
    SyncData,

    /// Flushes data + metadata using `fsync`.
    SyncAll,
}

impl Writer {
    pub fn set_compression(&mut self, comp: CompressionType, threshold: usize) {
        self.compression = comp;
        self.compression_threshold = threshold;
    }

    /// Courier's: with `true`, the journal's bytes go around the page cache from the first
    /// write on, where the file system takes direct writes (`Sink`).
    pub fn set_direct_writes(&mut self, direct_writes: bool) {
        self.file.set_direct_writes(direct_writes);
    }

    /// Courier's: whether the journal's next bytes go around the page cache (opened for it,
    /// or to be opened at the next write), not only whether they were asked to.
    pub fn writes_directly(&self) -> bool {
        matches!(self.file.direct, Direct::On { .. } | Direct::Wanted)
    }

    pub fn pos(&mut self) -> crate::Result<u64> {
        self.file.position().map_err(Into::into)
    }

    pub fn len(&self) -> crate::Result<u64> {
        Ok(self.file.buffered.get_ref().metadata()?.len())
    }

    pub fn rotate(&mut self) -> crate::Result<(PathBuf, PathBuf)> {
        self.persist(PersistMode::SyncAll)?;

        log::debug!(
            "Sealing active journal at {}, len={}B",
            self.path.display(),
            self.path
                .metadata()
                .inspect_err(|e| {
                    log::error!(
                        "Failed to get file metadata of journal file at {}: {e:?}",
                        self.path.display()
                    );
                })?
                .len(),
        );

        let prev_path = self.path.clone();

        let folder = self
            .path
            .parent()
            .expect("should have parent")
            .to_path_buf();

        let Some(basename) = self
            .path
            .file_name()
            .expect("should be valid file name")
            .to_str()
            .expect("should be valid utf-8")
            .strip_suffix(".jnl")
        else {
            log::error!("Invalid journal file name: {}", self.path.display());
            return Err(crate::Error::JournalRecovery(
                crate::JournalRecoveryError::InvalidFileName,
            ));
        };

        let journal_id = basename.parse::<JournalId>().map_err(|_| {
            log::error!("Invalid journal file name: {}", self.path.display());
            crate::Error::JournalRecovery(crate::JournalRecoveryError::InvalidFileName)
        })?;

        let new_path = folder.join(format!("{}.jnl", journal_id + 1));
        log::debug!("Rotating active journal to {}", new_path.display());

        let comp = self.compression;
        let compt = self.compression_threshold;
        // What was configured, not what this journal ended with: a journal that fell back to
        // the page cache (a record past its length, or a write the kernel refused) kept every
        // later journal there for the life of the process.
        let direct_writes = self.file.direct_configured;
        *self = Self::create_new(new_path.clone())?;
        self.set_compression(comp, compt);
        self.set_direct_writes(direct_writes);

        // IMPORTANT: fsync folder on Unix
        fsync_directory(&folder)?;

        Ok((prev_path, new_path))
    }

    pub fn create_new<P: Into<PathBuf>>(path: P) -> crate::Result<Self> {
        let path = path.into();

        let file = File::create_new(&path).inspect_err(|e| {
            log::error!("Failed to create journal file at {}: {e:?}", path.display());
        })?;

        file.set_len(PRE_ALLOCATED_BYTES).inspect_err(|e| {
            log::error!(
                "Failed to set journal file size to {PRE_ALLOCATED_BYTES}B at {}: {e:?}",
                path.display(),
            );
        })?;

        file.sync_all().inspect_err(|e| {
            log::error!("Failed to fsync journal file at {}: {e:?}", path.display());
        })?;

        Ok(Self {
            file: Sink::new(BufWriter::new(file), path.clone(), true),
            path,
            buf: Vec::new(),
            is_buffer_dirty: false,
            compression: CompressionType::None,
            compression_threshold: 0,
        })
    }

    pub fn from_file<P: AsRef<Path>>(path: P) -> crate::Result<Self> {
        let path = path.as_ref();

        if !path.try_exists()? {
            let file = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(path)
                .inspect_err(|e| {
                    log::error!("Failed to create journal file at {}: {e:?}", path.display());
                })?;

            file.set_len(PRE_ALLOCATED_BYTES).inspect_err(|e| {
                log::error!(
                    "Failed to set journal file size to {PRE_ALLOCATED_BYTES}B at {}: {e:?}",
                    path.display(),
                );
            })?;

            file.sync_all().inspect_err(|e| {
                log::error!("Failed to fsync journal file at {}: {e:?}", path.display());
            })?;

            return Ok(Self {
                path: path.into(),
                file: Sink::new(
                    BufWriter::with_capacity(JOURNAL_BUFFER_BYTES, file),
                    path.into(),
                    true,
                ),
                buf: Vec::new(),
                is_buffer_dirty: false,
                compression: CompressionType::None,
                compression_threshold: 0,
            });
        }

        // Not `append`: a direct write rewrites the last block, and the sink starts at the
        // file's end at its first write (after the replay has cut off a torn tail).
        let file = OpenOptions::new().write(true).open(path).inspect_err(|e| {
            log::error!("Failed to open journal file at {}: {e:?}", path.display());
        })?;

        Ok(Self {
            path: path.into(),
            file: Sink::new(
                BufWriter::with_capacity(JOURNAL_BUFFER_BYTES, file),
                path.into(),
                false,
            ),
            buf: Vec::new(),
            is_buffer_dirty: false,
            compression: CompressionType::None,
            compression_threshold: 0,
        })
    }

    /// Persists the journal file.
    pub(crate) fn persist(&mut self, mode: PersistMode) -> std::io::Result<()> {
        log::trace!(
            "Persisting journal at {} with mode={mode:?}",
            self.path.display(),
        );

        if self.is_buffer_dirty {
            self.file.flush().inspect_err(|e| {
                log::error!(
                    "Failed to flush journal IO buffers at {}: {e:?}",
                    self.path.display(),
                );
            })?;
            self.is_buffer_dirty = false;
        }

        match mode {
            PersistMode::SyncAll => self.file.buffered.get_mut().sync_all().inspect_err(|e| {
                log::error!(
                    "Failed to fsync journal file at {}: {e:?}",
                    self.path.display(),
                );
            }),
            PersistMode::SyncData => self.file.buffered.get_mut().sync_data().inspect_err(|e| {
                log::error!(
                    "Failed to fsyncdata journal file at {}: {e:?}",
                    self.path.display(),
                );
            }),
            PersistMode::Buffer => Ok(()),
        }
    }

    /// Writes a batch start marker to the journal
    fn write_start(&mut self, item_count: u32, seqno: SeqNo) -> Result<usize, crate::Error> {
        debug_assert!(self.buf.is_empty());

        Entry::Start { item_count, seqno }.encode_into(&mut self.buf)?;

        self.file.write_all(&self.buf)?;

        Ok(self.buf.len())
    }

    /// Writes a batch end marker to the journal
    fn write_end(&mut self, checksum: u64) -> Result<usize, crate::Error> {
        debug_assert!(self.buf.is_empty());

        Entry::End(checksum).encode_into(&mut self.buf)?;

        self.file.write_all(&self.buf)?;

        Ok(self.buf.len())
    }

    pub(crate) fn write_raw(
        &mut self,
        keyspace_id: InternalKeyspaceId,
        key: &[u8],
        value: &[u8],
        value_type: ValueType,
        seqno: u64,
    ) -> crate::Result<usize> {
        self.is_buffer_dirty = true;

        let mut hasher = xxhash_rust::xxh3::Xxh3::default();
        let mut byte_count = 0;

        self.buf.clear();
        byte_count += self.write_start(1, seqno)?;
        self.buf.clear();

        serialize_marker_item(
            &mut self.buf,
            keyspace_id,
            key,
            value,
            value_type,
            if self.compression_threshold > 0 && value.len() >= self.compression_threshold {
                self.compression
            } else {
                CompressionType::None
            },
        )?;

        self.file.write_all(&self.buf)?;

        hasher.update(&self.buf);
        byte_count += self.buf.len();

        self.buf.clear();
        let checksum = hasher.finish();
        byte_count += self.write_end(checksum)?;

        Ok(byte_count)
    }

    pub(crate) fn write_clear(
        &mut self,
        keyspace_id: InternalKeyspaceId,
        seqno: SeqNo,
    ) -> crate::Result<usize> {
        self.is_buffer_dirty = true;

        let mut hasher = xxhash_rust::xxh3::Xxh3::default();
        let mut byte_count = 0;

        self.buf.clear();
        byte_count += self.write_start(1, seqno)?;
        self.buf.clear();

        Entry::Clear { keyspace_id }.encode_into(&mut self.buf)?;
        self.file.write_all(&self.buf)?;
        hasher.update(&self.buf);
        byte_count += self.buf.len();

        self.buf.clear();
        let checksum = hasher.finish();
        byte_count += self.write_end(checksum)?;

        Ok(byte_count)
    }

    pub fn write_batch<'a>(
        &mut self,
        items: impl Iterator<Item = &'a BatchItem>,
        batch_size: usize,
        seqno: SeqNo,
    ) -> crate::Result<usize> {
        if batch_size == 0 {
            return Ok(0);
        }

        self.is_buffer_dirty = true;

        self.buf.clear();

        // NOTE: entries.len() is surely never > u32::MAX
        #[expect(clippy::cast_possible_truncation)]
        let item_count = batch_size as u32;

        let mut hasher = xxhash_rust::xxh3::Xxh3::default();
        let mut byte_count = 0;

        byte_count += self.write_start(item_count, seqno)?;
        self.buf.clear();

        for item in items {
            debug_assert!(self.buf.is_empty());

            serialize_marker_item(
                &mut self.buf,
                item.keyspace.id,
                &item.key,
                &item.value,
                item.value_type,
                if self.compression_threshold > 0 && item.value.len() >= self.compression_threshold
                {
                    self.compression
                } else {
                    CompressionType::None
                },
            )?;

            self.file.write_all(&self.buf)?;

            hasher.update(&self.buf);
            byte_count += self.buf.len();

            self.buf.clear();
        }

        let checksum = hasher.finish();
        byte_count += self.write_end(checksum)?;

        Ok(byte_count)
    }
}

/// Bytes gathered for direct writes before they are written without waiting for a flush.
const DIRECT_PENDING_BYTES_MAX: usize = 1 << 20;

/// Flushes of more than this go through the page cache even with direct writes on. Direct
/// writes pay where a commit is small (at a pace, a message or a few): the page cache writes
/// back whole 4 KiB pages for it. For larger flushes that rounding costs little, the zeros
/// written ahead of direct writes would cost as much again, and a direct write waits for the
/// device before the fdatasync starts: measured, batches of 100 messages (~35 KB) committed
/// 13–23% slower written directly, batches of ~1,000 25% slower (docs/decisions/0033).
const DIRECT_FLUSH_BYTES_MAX: usize = 8 * 1024;

/// Zeros a direct write carries after its records when they pass what is allocated
/// (`DirectJournal::write_at_zeroing_to`): up to the next multiple of this, so that the next
/// writes overwrite allocated blocks instead of each allocating in the file's hole. In the
/// same write, so no commit waits for a separate one.
const DIRECT_ZERO_AHEAD_BYTES: u64 = 64 * 1024;

/// The file system's block: what a byte written anywhere in it allocates whole.
const FILE_SYSTEM_BLOCK_BYTES: u64 = 4096;

/// Where the journal's bytes go (Courier's change, vendor/README.md): through the page cache
/// (upstream's `BufWriter`), or, with direct writes on, gathered in memory and written around
/// the page cache (`DirectJournal`) at each flush, as the blocks they touch. The file holds
/// zeros past its records either way (a sparse file's hole), so it reads the same, and the
/// journal's recovery is unchanged. A journal that outgrows its preallocated length is grown
/// by another `PRE_ALLOCATED_BYTES`; where the kernel refuses a direct write, the rest of the
/// journal goes through the page cache (the next one starts direct again).
struct Sink {
    buffered: BufWriter<File>,
    path: PathBuf,
    /// Whether the buffered file's position is the journal's end. A recovered journal's is
    /// found at the first write: the replay truncates a torn tail after the writer opened.
    positioned: bool,
    direct: Direct,
    /// Whether direct writes were asked for: the next journal starts with them even where
    /// this one fell back to the page cache.
    direct_configured: bool,
}

enum Direct {
    Off,
    /// Opened at the first write, once the journal's end is known.
    Wanted,
    On {
        journal: DirectJournal,
        /// Written, not yet sent to the file.
        pending: Vec<u8>,
        /// The file's length: direct writes stay within it.
        capacity: u64,
        /// Up to here the file's blocks are allocated (written, records or zeros).
        zeroed_end: u64,
    },
}

impl Sink {
    fn new(buffered: BufWriter<File>, path: PathBuf, positioned: bool) -> Sink {
        Sink {
            buffered,
            path,
            positioned,
            direct: Direct::Off,
            direct_configured: false,
        }
    }

    fn set_direct_writes(&mut self, direct_writes: bool) {
        self.direct_configured = direct_writes;
        match (&self.direct, direct_writes) {
            (Direct::Off, true) => self.direct = Direct::Wanted,
            (Direct::Wanted, false) => self.direct = Direct::Off,
            // Once opened, the journal stays as it is until it is rotated.
            _ => {}
        }
    }

    /// The journal's logical end: what was written, flushed or not.
    fn position(&mut self) -> std::io::Result<u64> {
        match &self.direct {
            Direct::On {
                journal, pending, ..
            } => Ok(journal.next_offset() + pending.len() as u64),
            _ if !self.positioned => Ok(self.buffered.get_ref().metadata()?.len()),
            _ => self.buffered.stream_position(),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if !self.positioned {
            let end = self.buffered.get_ref().metadata()?.len();
            self.buffered.seek(SeekFrom::Start(end))?;
            self.positioned = true;
        }
        if matches!(self.direct, Direct::Wanted) {
            self.open_direct()?;
        }
        match &mut self.direct {
            Direct::On { pending, .. } => {
                pending.extend_from_slice(bytes);
                if pending.len() >= DIRECT_PENDING_BYTES_MAX {
                    self.flush_direct()?;
                }
                Ok(())
            }
            _ => self.buffered.write_all(bytes),
        }
    }

    /// Opens the journal for direct writes from where the buffered file stands (nothing is
    /// buffered yet: this runs at the first write), or leaves it to the page cache.
    fn open_direct(&mut self) -> std::io::Result<()> {
        let offset = self.buffered.stream_position()?;
        let file = self.buffered.get_ref();
        let length = file.metadata()?.len();
        if length < PRE_ALLOCATED_BYTES {
            // A recovered journal, cut to its records: give it back its room (a hole, which
            // reads as zeros) so that commits write within the file instead of growing it.
            file.set_len(PRE_ALLOCATED_BYTES)?;
        }
        let capacity = length.max(PRE_ALLOCATED_BYTES);
        self.direct = match DirectJournal::open_at(&self.path, offset) {
            Some(journal) => Direct::On {
                journal,
                pending: Vec::new(),
                capacity,
                // The block the records end in holds bytes written already.
                zeroed_end: offset.div_ceil(FILE_SYSTEM_BLOCK_BYTES) * FILE_SYSTEM_BLOCK_BYTES,
            },
            None => Direct::Off,
        };
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_direct()?;
        self.buffered.flush()
    }

    /// Writes the pending bytes around the page cache, or, where they do not fit the file in
    /// whole blocks or the kernel refuses them, through it, and the rest of the journal too.
    fn flush_direct(&mut self) -> std::io::Result<()> {
        let Direct::On {
            journal,
            pending,
            capacity,
            zeroed_end,
        } = &mut self.direct
        else {
            return Ok(());
        };
        if pending.is_empty() {
            return Ok(());
        }
        let offset = journal.next_offset();
        if pending.len() > DIRECT_FLUSH_BYTES_MAX {
            self.buffered.seek(SeekFrom::Start(offset))?;
            self.buffered.write_all(pending)?;
            self.buffered.flush()?;
            journal.wrote_elsewhere(pending, offset)?;
            // The page cache's write-back allocates the blocks it writes.
            let end = offset + pending.len() as u64;
            *zeroed_end =
                (*zeroed_end).max(end.div_ceil(FILE_SYSTEM_BLOCK_BYTES) * FILE_SYSTEM_BLOCK_BYTES);
            pending.clear();
            return Ok(());
        }
        if !journal.fits(offset, pending.len() as u64, *capacity) {
            // Past the preallocated length: fjall seals a journal only at its next flush, and
            // under a sustained load it grows well past it first (100 MB seen). Grown to the
            // next multiple of the preallocation, the journal goes on around the page cache;
            // before, it left it for the rest of the journal.
            let grown = (offset + pending.len() as u64).next_multiple_of(PRE_ALLOCATED_BYTES);
            self.buffered.get_ref().set_len(grown)?;
            *capacity = grown;
        }
        if journal.fits(offset, pending.len() as u64, *capacity) {
            let end = offset + pending.len() as u64;
            let zeros_to = if end > *zeroed_end {
                (end.div_ceil(DIRECT_ZERO_AHEAD_BYTES) * DIRECT_ZERO_AHEAD_BYTES)
                    .min(*capacity / FILE_SYSTEM_BLOCK_BYTES * FILE_SYSTEM_BLOCK_BYTES)
            } else {
                0
            };
            match journal.write_at_zeroing_to(pending, offset, zeros_to) {
                Ok(()) => {
                    *zeroed_end = (*zeroed_end).max(zeros_to);
                    pending.clear();
                    return Ok(());
                }
                // Refused before any byte was written: the page cache takes it.
                Err(error) if error.kind() == std::io::ErrorKind::InvalidInput => {
                    log::warn!(
                        "journal {}: direct write refused ({error}); going on through the page cache",
                        self.path.display()
                    );
                }
                Err(error) => return Err(error),
            }
        }
        let pending = std::mem::take(pending);
        self.direct = Direct::Off;
        self.buffered.seek(SeekFrom::Start(offset))?;
        self.buffered.write_all(&pending)
    }
}

impl Drop for Sink {
    /// As `BufWriter` does on drop: what was written goes to the file, errors ignored.
    fn drop(&mut self) {
        let _ = self.flush_direct();
    }
}
