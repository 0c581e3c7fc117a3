//! Which store a process runs on, and the FoundationDB settings.
//!
//! The edge's config file chooses the backend with `store = "embedded" | "foundationdb"`; for
//! FoundationDB a `[foundationdb]` table lists the cluster files and the options of
//! [`FdbConfig`] (docs/foundationdb.md shows a complete example). The edge maps its file onto
//! these types and calls [`StoreConfig::validate`] at start-up, which says clearly when the
//! binary was built without the `fdb` feature and when a batch could outgrow a FoundationDB
//! transaction.

use std::path::PathBuf;
use std::str::FromStr;

use courier_protocol::BODY_BYTES_MAX;

use crate::shard::PURGES_PER_BATCH_MAX;
use crate::{CoreConfig, envelope, keys};

/// FoundationDB's hard limit on the bytes of one transaction (its default `size_limit`).
pub const FDB_TRANSACTION_BYTES_LIMIT: usize = 10_000_000;
/// FoundationDB's limit on the bytes of one value.
pub const FDB_VALUE_BYTES_MAX: usize = 100_000;
/// Clusters one process may open. Each is a client connection with its own monitoring; a
/// deployment that needs more should split into several deployments first.
pub const CLUSTERS_MAX: usize = 64;
/// Bytes of the key prefix. Every key carries it, so it adds to every transaction.
pub const KEY_PREFIX_BYTES_MAX: usize = 64;
/// Bytes FoundationDB counts per mutation and per conflict range on top of their keys and
/// values: the size of the in-memory struct (`MutationRef`, `KeyRangeRef`: 32–56 bytes in 7.x),
/// rounded up so the estimates below stay upper bounds.
const FDB_ITEM_OVERHEAD_BYTES: usize = 64;

// A stored message (envelope header plus body) must fit one FoundationDB value.
const _: () = assert!(BODY_BYTES_MAX + 1024 < FDB_VALUE_BYTES_MAX);

/// The first byte, after the key prefix, of the FoundationDB backend's own keys (the owner
/// keys). The store's data keys all start with a lower byte (the tags of [`crate::keys`]),
/// so the backend's keys lie outside every range the commit logic reads or clears, as
/// FoundationDB keeps its own system keys under `0xff`.
pub const FDB_METADATA_BYTE: u8 = 0xff;

/// The bytes every key of a deployment starts with in FoundationDB: the prefix's length, then
/// the prefix. Self-delimiting: of two prefixes where one starts with the other (`courier/`
/// and `courier/global/`), neither deployment's ranges reach the other's keys. Plain
/// concatenation let the shorter one's expiry and membership scans read (and its membership
/// change rewrite) the longer one's keys.
pub fn fdb_key_prefix(key_prefix: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(1 + key_prefix.len());
    stored.push(u8::try_from(key_prefix.len()).unwrap_or(u8::MAX));
    stored.extend_from_slice(key_prefix);
    stored
}

/// Where the FoundationDB backend keeps the owner epoch of `shard`:
/// `{key_prefix} 0xff o {shard}` ([`keys::owner`] after the metadata byte).
pub fn fdb_owner_key(key_prefix: &[u8], shard: crate::placement::ShardId) -> Vec<u8> {
    [key_prefix, &[FDB_METADATA_BYTE], &keys::owner(shard)].concat()
}

/// Whether `key_prefix` can hold a deployment: not empty (the owner keys follow it with
/// `0xff`, which without a prefix would be FoundationDB's system keys), at most
/// [`KEY_PREFIX_BYTES_MAX`] bytes, and not starting with `0xff`.
pub fn key_prefix_is_valid(key_prefix: &[u8]) -> bool {
    (1..=KEY_PREFIX_BYTES_MAX).contains(&key_prefix.len()) && key_prefix[0] != 0xff
}

/// The backend named by the `store` config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// fjall on local disk, one store per shard: the default.
    Embedded,
    /// FoundationDB, one or several clusters (needs the `fdb` feature).
    FoundationDb,
}

impl StoreKind {
    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Embedded => "embedded",
            StoreKind::FoundationDb => "foundationdb",
        }
    }
}

impl FromStr for StoreKind {
    type Err = StoreConfigError;

    fn from_str(value: &str) -> Result<StoreKind, StoreConfigError> {
        match value {
            "embedded" => Ok(StoreKind::Embedded),
            "foundationdb" => Ok(StoreKind::FoundationDb),
            other => Err(StoreConfigError::UnknownStore(other.to_string())),
        }
    }
}

/// The store a process runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded store: each shard opens its own fjall store in a directory under `dir`.
    Embedded { dir: PathBuf },
    /// FoundationDB.
    FoundationDb(FdbConfig),
}

/// Settings of the FoundationDB backend. The defaults suit one deployment per key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbConfig {
    /// One cluster file per FoundationDB cluster. Inbox `u` lives on cluster
    /// `placement::cluster_of(u, cluster_files.len())`, so the order is part of the data
    /// layout: only ever append, following the migration in docs/foundationdb.md.
    pub cluster_files: Vec<PathBuf>,
    /// Every key is stored under this prefix, so several deployments (and test runs) can share
    /// a cluster. 1 to 64 bytes, not starting with `0xff` (FoundationDB's system keys).
    pub key_prefix: Vec<u8>,
    /// A transaction that has not committed after this long is cancelled; if the commit was in
    /// flight its result is unknown and the Committer retries it (the dedupe record keeps the
    /// retry idempotent). FoundationDB ends every transaction after 5 s anyway.
    pub transaction_timeout_ms: u32,
    /// Upper bound of the backoff FoundationDB waits after a retryable error before the
    /// Committer retries.
    pub retry_delay_ms_max: u32,
    /// What one transaction may carry, as FoundationDB counts it (keys, values, conflict
    /// ranges). [`FdbConfig::validate`] checks that the largest batch and expiry pass that the
    /// core config allows stay under it; FoundationDB itself refuses transactions over twice
    /// this ([`FdbConfig::transaction_bytes_limit`]), so a wrong estimate fails loudly instead
    /// of slowing the cluster. FoundationDB advises staying under 1 MB.
    pub transaction_bytes_max: usize,
}

impl Default for FdbConfig {
    fn default() -> FdbConfig {
        FdbConfig {
            cluster_files: Vec::new(),
            key_prefix: b"courier/".to_vec(),
            transaction_timeout_ms: 3_000,
            retry_delay_ms_max: 1_000,
            transaction_bytes_max: 1_000_000,
        }
    }
}

/// A store configuration that cannot work, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreConfigError {
    #[error("store: expected \"embedded\" or \"foundationdb\", got {0:?}")]
    UnknownStore(String),
    #[error(
        "store = \"foundationdb\" needs the `fdb` feature, and this binary was built without it: \
         rebuild with `cargo build --release -p courier-edge --features fdb`"
    )]
    FdbNotBuilt,
    #[error("{field}: {expected}")]
    Invalid {
        field: &'static str,
        expected: String,
    },
    #[error(
        "foundationdb: a batch may need {needed_bytes} bytes in one transaction, over \
         transaction_bytes_max ({budget_bytes}): lower batch_requests_max to {requests_fitting} \
         or less, or lower batch_bytes_max"
    )]
    BatchTooLarge {
        needed_bytes: usize,
        budget_bytes: usize,
        requests_fitting: usize,
    },
    #[error(
        "foundationdb: an expiry pass may need {needed_bytes} bytes in one transaction, over \
         transaction_bytes_max ({budget_bytes}): lower expire_scan_keys_max to {keys_fitting} \
         or less"
    )]
    ExpireTooLarge {
        needed_bytes: usize,
        budget_bytes: usize,
        keys_fitting: usize,
    },
}

impl StoreConfig {
    pub fn kind(&self) -> StoreKind {
        match self {
            StoreConfig::Embedded { .. } => StoreKind::Embedded,
            StoreConfig::FoundationDb(_) => StoreKind::FoundationDb,
        }
    }

    /// Checks the store configuration against this build and the core's limits; the runtime
    /// calls this at start-up, after [`CoreConfig::validate`].
    pub fn validate(&self, core: &CoreConfig) -> Result<(), StoreConfigError> {
        match self {
            StoreConfig::Embedded { dir } => {
                if dir.as_os_str().is_empty() {
                    return Err(invalid("store.dir", "a directory for the embedded store"));
                }
                Ok(())
            }
            StoreConfig::FoundationDb(fdb) => {
                if !cfg!(feature = "fdb") {
                    return Err(StoreConfigError::FdbNotBuilt);
                }
                fdb.validate(core)
            }
        }
    }
}

fn invalid(field: &'static str, expected: impl Into<String>) -> StoreConfigError {
    StoreConfigError::Invalid {
        field,
        expected: expected.into(),
    }
}

/// FoundationDB's size of a point read: its read conflict range `[key, key\0)`.
fn read_bytes(key: usize) -> usize {
    2 * key + 1 + FDB_ITEM_OVERHEAD_BYTES
}

/// FoundationDB's size of a range read: its read conflict range (at most `[begin, end)`).
fn range_read_bytes(begin: usize, end: usize) -> usize {
    begin + end + FDB_ITEM_OVERHEAD_BYTES
}

/// FoundationDB's size of a `set` (or atomic mutation): the mutation and its write conflict
/// range `[key, key\0)`.
fn set_bytes(key: usize, value: usize) -> usize {
    key + value + FDB_ITEM_OVERHEAD_BYTES + 2 * key + 1 + FDB_ITEM_OVERHEAD_BYTES
}

/// FoundationDB's size of a range clear: the mutation and its write conflict range. A single
/// key clear is the range `[key, key\0)`.
fn clear_range_bytes(begin: usize, end: usize) -> usize {
    2 * (begin + end + FDB_ITEM_OVERHEAD_BYTES)
}

impl FdbConfig {
    /// The hard limit set on every transaction: twice [`FdbConfig::transaction_bytes_max`],
    /// at most FoundationDB's own limit.
    pub fn transaction_bytes_limit(&self) -> usize {
        (2 * self.transaction_bytes_max).min(FDB_TRANSACTION_BYTES_LIMIT)
    }

    /// An upper bound of the bytes FoundationDB counts for the largest batch `core` allows:
    /// `batch_requests_max` sends, each to a new inbox (two dedupe reads, a counter read, the
    /// message, dedupe record, counter and expiry entry writes) plus their bodies, and
    /// `batch_requests_max` links and acks together, each to a new inbox (a counter read, a
    /// device read, two reads of the inbox's devices, a read of its first message, the device
    /// write, one forgotten device and one range clear of messages), plus the owner check.
    pub fn batch_transaction_bytes_max(&self, core: &CoreConfig) -> usize {
        let (fixed, per_request) = self.batch_costs();
        fixed + core.batch_requests_max * per_request + core.batch_bytes_max
    }

    /// Bytes of the owner check, and of one send and one link or ack without the body.
    fn batch_costs(&self) -> (usize, usize) {
        let prefixed = |key_len: usize| 1 + self.key_prefix.len() + key_len;
        let message_key = prefixed(keys::message(0, 0).len());
        let dedupe_key = prefixed(keys::dedupe(0, 0, 0, 0).len());
        let counter_key = prefixed(keys::counter(0).len());
        let expiry_key = prefixed(keys::expiry(0, 0).len());
        let envelope_header = envelope::HEADER_BYTES;
        // The dedupe record: seq, commit time, expiry, u64 each (commit.rs; 20 bytes on the
        // embedded stores when the lifetime fits, never on FoundationDB).
        let dedupe_record = 24;
        let send = 2 * read_bytes(dedupe_key)
            + read_bytes(counter_key)
            + set_bytes(message_key, envelope_header)
            + set_bytes(dedupe_key, dedupe_record)
            + set_bytes(counter_key, 8)
            + set_bytes(expiry_key, 0);
        let device_key = prefixed(keys::device(0, 0).len());
        let (devices_start, devices_end) = keys::device_range(0);
        // Link and ack cost the same: both move a device's cursor and delete up to the lowest.
        let devices_read =
            range_read_bytes(prefixed(devices_start.len()), prefixed(devices_end.len()));
        // A link of a new device reads the inbox's devices once more (is it the first?) and
        // the first message after its cursor.
        let device_update = read_bytes(counter_key)
            + read_bytes(device_key)
            + 2 * devices_read
            + range_read_bytes(message_key, message_key)
            + set_bytes(device_key, 16)
            + clear_range_bytes(device_key, device_key + 1)
            + clear_range_bytes(message_key, message_key);
        // A forget (decision 0011) costs less than a device update: a clear of its `g` record,
        // a counter read, a range read of its messages, a counter clear. A purge clears
        // ranges instead: messages (and the last seq's key), devices, three dedupe buckets, and
        // the same keys as a forget. The seq floor is read and raised at most once per batch.
        let dedupe_inbox = prefixed(keys::dedupe_inbox_range(0, 0).0.len());
        let emptied_key = prefixed(keys::emptied(0).len());
        let purge = clear_range_bytes(message_key, message_key)
            + clear_range_bytes(message_key, message_key + 1)
            + clear_range_bytes(prefixed(devices_start.len()), prefixed(devices_end.len()))
            + 3 * clear_range_bytes(dedupe_inbox, dedupe_inbox)
            + clear_range_bytes(emptied_key, emptied_key + 1)
            + read_bytes(counter_key)
            + clear_range_bytes(counter_key, counter_key + 1);

        let clock = set_bytes(prefixed(keys::clock().len()), 8);
        let floor_key = prefixed(keys::floor().len());
        let floor = read_bytes(floor_key) + set_bytes(floor_key, 8);
        (
            self.owner_check_bytes() + clock + floor + PURGES_PER_BATCH_MAX * purge,
            send + device_update,
        )
    }

    fn owner_check_bytes(&self) -> usize {
        read_bytes(fdb_owner_key(&fdb_key_prefix(&self.key_prefix), 0).len())
    }

    /// An upper bound of the bytes FoundationDB counts for one `commit::expire` pass under
    /// `core`: it reads at most `expire_scan_keys_max` keys (at least 4), at most half of them
    /// expiry index entries (each a range read of messages, a clear and an emptied-inbox mark)
    /// and the rest messages (a clear each) or device records its sweep looks at (a counter
    /// read and a clear each), plus one dedupe range clear (FoundationDB clears it without
    /// reading, so it writes no `k` mark), the read of that mark, the round's mark in the
    /// index, the sweep's mark, the list of emptied inboxes and the owner check.
    pub fn expire_transaction_bytes_max(&self, core: &CoreConfig) -> usize {
        let (fixed, per_key) = self.expire_costs();
        fixed + core.expire_scan_keys_max.max(4) * per_key
    }

    /// Bytes of the fixed part of an expiry pass, and per scanned key (the average of an
    /// index entry and a message, both rounded up).
    fn expire_costs(&self) -> (usize, usize) {
        let prefixed = |key_len: usize| 1 + self.key_prefix.len() + key_len;
        let message_key = prefixed(keys::message(0, 0).len());
        let expiry_key = prefixed(keys::expiry(0, 0).len());
        let bucket_key = prefixed(keys::dedupe_bucket_start(0).len());
        let emptied_key = prefixed(keys::emptied(0).len());
        let device_key = prefixed(keys::device(0, 0).len());
        let counter_key = prefixed(keys::counter(0).len());
        let tag_key = prefixed(1);
        // The dedupe clear and the read of its mark, the read of the index, the list of
        // emptied inboxes, and one entry rewritten with where the next pass goes on.
        let fixed = self.owner_check_bytes()
            + clear_range_bytes(bucket_key, bucket_key)
            + read_bytes(prefixed(keys::dedupe_expired_below().len()))
            + range_read_bytes(bucket_key, bucket_key)
            + range_read_bytes(tag_key, tag_key)
            + set_bytes(expiry_key, 9)
            // The round's mark in the expiry index, read and moved.
            + read_bytes(tag_key)
            + set_bytes(tag_key, expiry_key)
            // The device sweep's mark, read and moved, and its range read's bounds.
            + read_bytes(tag_key)
            + set_bytes(tag_key, device_key)
            + range_read_bytes(device_key, device_key);
        // Each budget unit is an index entry, a message read, or the emptiness check after an
        // entry's scan. An entry costs its first page's read, its clear and the emptied mark;
        // the check a range read; a message its clear and its share of a page's read. An
        // entry and its check take two units, so per unit the pass costs at most the larger of
        // their average and a message.
        let page_read = range_read_bytes(message_key, message_key);
        let entry =
            page_read + clear_range_bytes(expiry_key, expiry_key + 1) + set_bytes(emptied_key, 0);
        let check = range_read_bytes(message_key, message_key);
        let message = clear_range_bytes(message_key, message_key + 1)
            + page_read.div_ceil(crate::commit::EXPIRY_PAGE_KEYS);
        // A device record the sweep looks at: its share of the range read, its inbox's
        // counter read, and its clear. At most `DEVICE_SWEEP_KEYS_MAX` units of a pass are
        // device records: what they cost beyond another unit is fixed.
        let device = range_read_bytes(device_key, device_key)
            + read_bytes(counter_key)
            + clear_range_bytes(device_key, device_key + 1);
        let unit = (entry + check).div_ceil(2).max(message);
        let fixed = fixed + crate::commit::DEVICE_SWEEP_KEYS_MAX * device.saturating_sub(unit);
        (fixed, unit)
    }

    /// Checks the settings, and that the largest batch and expiry pass of `core` fit
    /// [`FdbConfig::transaction_bytes_max`]. Independent of the `fdb` feature.
    pub fn validate(&self, core: &CoreConfig) -> Result<(), StoreConfigError> {
        if self.cluster_files.is_empty() || self.cluster_files.len() > CLUSTERS_MAX {
            return Err(invalid(
                "foundationdb.cluster_files",
                format!("between 1 and {CLUSTERS_MAX} cluster files"),
            ));
        }
        for (at, file) in self.cluster_files.iter().enumerate() {
            if self.cluster_files[..at].contains(file) {
                return Err(invalid(
                    "foundationdb.cluster_files",
                    format!("each cluster once; {} is listed twice", file.display()),
                ));
            }
        }
        if !key_prefix_is_valid(&self.key_prefix) {
            return Err(invalid(
                "foundationdb.key_prefix",
                format!("1 to {KEY_PREFIX_BYTES_MAX} bytes, not starting with 0xff (system keys)"),
            ));
        }
        if !(1..=60_000).contains(&self.transaction_timeout_ms) {
            return Err(invalid(
                "foundationdb.transaction_timeout_ms",
                "between 1 and 60000",
            ));
        }
        if self.retry_delay_ms_max > 60_000 {
            return Err(invalid("foundationdb.retry_delay_ms_max", "at most 60000"));
        }
        if !(10_000..=FDB_TRANSACTION_BYTES_LIMIT / 2).contains(&self.transaction_bytes_max) {
            return Err(invalid(
                "foundationdb.transaction_bytes_max",
                format!(
                    "between 10000 and {} (half of FoundationDB's limit)",
                    FDB_TRANSACTION_BYTES_LIMIT / 2
                ),
            ));
        }
        let budget = self.transaction_bytes_max;
        let batch_bytes = self.batch_transaction_bytes_max(core);
        if batch_bytes > budget {
            let (fixed, per_request) = self.batch_costs();
            return Err(StoreConfigError::BatchTooLarge {
                needed_bytes: batch_bytes,
                budget_bytes: budget,
                requests_fitting: budget.saturating_sub(fixed + core.batch_bytes_max) / per_request,
            });
        }
        let expire_bytes = self.expire_transaction_bytes_max(core);
        if expire_bytes > budget {
            let (fixed, per_key) = self.expire_costs();
            return Err(StoreConfigError::ExpireTooLarge {
                needed_bytes: expire_bytes,
                budget_bytes: budget,
                keys_fitting: budget.saturating_sub(fixed) / per_key,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Deployments whose prefixes start with one another keep apart: no stored prefix starts
    /// with another, so no range of one reaches the other's keys.
    #[test]
    fn stored_key_prefixes_never_nest() {
        let prefixes: [&[u8]; 5] = [b"courier/", b"courier/global/", b"courier/g", b"c", b"co"];
        for a in prefixes {
            for b in prefixes {
                if a != b {
                    assert!(
                        !fdb_key_prefix(b).starts_with(&fdb_key_prefix(a)),
                        "{:?} inside {:?}",
                        String::from_utf8_lossy(a),
                        String::from_utf8_lossy(b)
                    );
                }
            }
            assert!(fdb_key_prefix(a).ends_with(a));
        }
    }
    use crate::commit::{self, Committer, Request, SendRequest};
    use crate::store::memory::{MemoryStore, MemoryTransaction};
    use crate::store::{CommitVersion, KeyValue, Store, StoreError, Transaction};

    fn fdb_config() -> FdbConfig {
        FdbConfig {
            cluster_files: vec!["/etc/foundationdb/fdb.cluster".into()],
            ..FdbConfig::default()
        }
    }

    /// The core limits docs/foundationdb.md recommends for FoundationDB.
    fn fdb_core_config() -> CoreConfig {
        CoreConfig {
            batch_requests_max: 160,
            expire_scan_keys_max: 2_000,
            ..CoreConfig::default()
        }
    }

    #[test]
    fn store_kinds_parse_by_their_config_names() {
        for kind in [StoreKind::Embedded, StoreKind::FoundationDb] {
            assert_eq!(kind.name().parse::<StoreKind>(), Ok(kind));
        }
        let error = "fdb".parse::<StoreKind>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "store: expected \"embedded\" or \"foundationdb\", got \"fdb\""
        );
    }

    /// A binary built without the `fdb` feature refuses `store = "foundationdb"` at start-up
    /// and says how to rebuild, instead of failing later or silently using another store.
    #[cfg(not(feature = "fdb"))]
    #[test]
    fn foundationdb_without_the_feature_is_a_clear_error() {
        let config = StoreConfig::FoundationDb(fdb_config());
        let error = config.validate(&fdb_core_config()).unwrap_err();
        assert_eq!(error, StoreConfigError::FdbNotBuilt);
        assert!(
            error
                .to_string()
                .contains("rebuild with `cargo build --release -p courier-edge --features fdb`"),
            "{error}"
        );
    }

    #[cfg(feature = "fdb")]
    #[test]
    fn foundationdb_with_the_feature_is_accepted() {
        let config = StoreConfig::FoundationDb(fdb_config());
        assert_eq!(config.validate(&fdb_core_config()), Ok(()));
    }

    #[test]
    fn embedded_needs_a_directory() {
        let core = CoreConfig::default();
        let good = StoreConfig::Embedded {
            dir: "/var/lib/courier".into(),
        };
        assert_eq!(good.validate(&core), Ok(()));
        assert_eq!(good.kind(), StoreKind::Embedded);
        let empty = StoreConfig::Embedded { dir: "".into() };
        assert!(empty.validate(&core).is_err());
    }

    /// The default core limits (1,000 requests, 512 KiB of bodies) can outgrow 1 MB on
    /// FoundationDB; the error names the value to lower and a value that fits, and the
    /// recommended limits fit.
    #[test]
    fn default_batches_are_too_large_for_foundationdb_and_the_advice_fits() {
        let fdb = fdb_config();
        let error = fdb.validate(&CoreConfig::default()).unwrap_err();
        let StoreConfigError::BatchTooLarge {
            requests_fitting, ..
        } = error
        else {
            panic!("expected BatchTooLarge, got {error:?}");
        };
        assert!(error.to_string().contains("lower batch_requests_max"));
        let fitted = CoreConfig {
            batch_requests_max: requests_fitting,
            ..CoreConfig::default()
        };
        assert!(fdb.batch_transaction_bytes_max(&fitted) <= fdb.transaction_bytes_max);
        let too_many = CoreConfig {
            batch_requests_max: requests_fitting + 1,
            ..CoreConfig::default()
        };
        assert!(fdb.batch_transaction_bytes_max(&too_many) > fdb.transaction_bytes_max);
        // With the batch fixed, the default expiry pass (10,000 keys) is next.
        assert!(matches!(
            fdb.validate(&fitted),
            Err(StoreConfigError::ExpireTooLarge { .. })
        ));
        assert_eq!(fdb.validate(&fdb_core_config()), Ok(()));
        // The recommendation holds for prefixes of up to 16 bytes; every key carries the
        // prefix, so a 64-byte one needs smaller batches.
        let prefix_16 = FdbConfig {
            key_prefix: vec![b'p'; 16],
            ..fdb_config()
        };
        assert_eq!(prefix_16.validate(&fdb_core_config()), Ok(()));
        let prefix_64 = FdbConfig {
            key_prefix: vec![b'p'; KEY_PREFIX_BYTES_MAX],
            ..fdb_config()
        };
        assert!(matches!(
            prefix_64.validate(&fdb_core_config()),
            Err(StoreConfigError::BatchTooLarge { .. })
        ));
    }

    #[test]
    fn bad_foundationdb_settings_are_refused() {
        let core = fdb_core_config();
        let cases = [
            FdbConfig {
                cluster_files: Vec::new(),
                ..fdb_config()
            },
            FdbConfig {
                cluster_files: vec!["a.cluster".into(), "b.cluster".into(), "a.cluster".into()],
                ..fdb_config()
            },
            FdbConfig {
                key_prefix: b"\xffsystem".to_vec(),
                ..fdb_config()
            },
            FdbConfig {
                key_prefix: Vec::new(),
                ..fdb_config()
            },
            FdbConfig {
                transaction_timeout_ms: 0,
                ..fdb_config()
            },
            FdbConfig {
                transaction_bytes_max: FDB_TRANSACTION_BYTES_LIMIT,
                ..fdb_config()
            },
        ];
        for case in cases {
            assert!(
                matches!(case.validate(&core), Err(StoreConfigError::Invalid { .. })),
                "{case:?}"
            );
        }
        assert_eq!(fdb_config().transaction_bytes_limit(), 2_000_000);
    }

    /// A store that counts what each committed transaction would weigh in FoundationDB:
    /// every mutation and conflict range with its keys, values and struct overhead, under the
    /// key prefix, plus the owner check the FoundationDB backend adds to every transaction.
    struct Weighing {
        inner: MemoryStore,
        prefix_bytes: usize,
        committed_bytes: Mutex<Vec<usize>>,
    }

    struct WeighedTransaction<'a> {
        store: &'a Weighing,
        inner: MemoryTransaction<'a>,
        bytes: usize,
    }

    impl Store for Weighing {
        type Transaction<'a> = WeighedTransaction<'a>;
        fn begin(&self) -> Result<WeighedTransaction<'_>, StoreError> {
            Ok(WeighedTransaction {
                store: self,
                inner: self.inner.begin()?,
                bytes: read_bytes(self.prefix_bytes + 1 + keys::owner(0).len()),
            })
        }
    }

    impl Transaction for WeighedTransaction<'_> {
        fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.bytes += read_bytes(self.store.prefix_bytes + key.len());
            self.inner.get(key)
        }
        fn add_read_conflict(&mut self, key: &[u8]) {
            // A read conflict range, as a read's.
            self.bytes += read_bytes(self.store.prefix_bytes + key.len());
            self.inner.add_read_conflict(key);
        }
        fn add_read_conflict_range(&mut self, begin: &[u8], end: &[u8]) {
            // A read conflict range, as a range read's.
            let p = self.store.prefix_bytes;
            self.bytes += range_read_bytes(p + begin.len(), p + end.len());
            self.inner.add_read_conflict_range(begin, end);
        }
        fn get_range(
            &mut self,
            begin: &[u8],
            end: &[u8],
            limit: usize,
        ) -> Result<Vec<KeyValue>, StoreError> {
            let p = self.store.prefix_bytes;
            self.bytes += range_read_bytes(p + begin.len(), p + end.len());
            self.inner.get_range(begin, end, limit)
        }
        fn set(&mut self, key: &[u8], value: &[u8]) {
            self.bytes += set_bytes(self.store.prefix_bytes + key.len(), value.len());
            self.inner.set(key, value);
        }
        fn clear(&mut self, key: &[u8]) {
            let key_bytes = self.store.prefix_bytes + key.len();
            self.bytes += clear_range_bytes(key_bytes, key_bytes + 1);
            self.inner.clear(key);
        }
        fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
            let p = self.store.prefix_bytes;
            self.bytes += clear_range_bytes(p + begin.len(), p + end.len());
            self.inner.clear_range(begin, end);
        }
        // `scan_range`, `clear_range_bounded` and `clear_range_with_keys`: the trait's
        // defaults, which go through the weighed `get_range` and `clear_range` above, weigh
        // them as FoundationDB counts them (a range read; one range clear, no reads).
        fn atomic_add(&mut self, key: &[u8], delta: u64) {
            self.bytes += set_bytes(self.store.prefix_bytes + key.len(), 8);
            self.inner.atomic_add(key, delta);
        }
        fn atomic_max(&mut self, key: &[u8], value: u64) {
            self.bytes += set_bytes(self.store.prefix_bytes + key.len(), 8);
            self.inner.atomic_max(key, value);
        }
        fn commit(self) -> Result<CommitVersion, StoreError> {
            self.store
                .committed_bytes
                .lock()
                .expect("weighing lock")
                .push(self.bytes);
            self.inner.commit()
        }
    }

    /// The estimates are upper bounds of what the commit logic really does, and close to it:
    /// the largest batch (every send to a new inbox, bodies filling `batch_bytes_max`, as many
    /// acks as sends) and the largest expiry pass (half index entries, half messages) are
    /// weighed as FoundationDB would count them. If the commit logic starts writing more, this
    /// fails before a cluster refuses a transaction.
    #[test]
    fn estimates_bound_the_largest_batch_and_expiry_pass() {
        let fdb = fdb_config();
        let core = CoreConfig {
            batch_requests_max: 50,
            batch_bytes_max: 100_000,
            expire_scan_keys_max: 200,
            retention_ms: 5 * 24 * 3600 * 1000,
            ..CoreConfig::default()
        };
        let store = Weighing {
            inner: MemoryStore::new(),
            prefix_bytes: fdb_key_prefix(&fdb.key_prefix).len(),
            committed_bytes: Mutex::new(Vec::new()),
        };
        let now = 10 * core.dedupe_window_ms;
        // The acked inboxes hold a message, the acking device, and a device unseen for longer
        // than the retention, so each ack reads a counter, deletes a message and forgets a
        // device.
        let setup: Vec<Request> = (1..=core.batch_requests_max as u64)
            .flat_map(|inbox| {
                [
                    Request::Send(SendRequest {
                        sender: 3,
                        client_id: inbox,
                        to: inbox + 1_000,
                        body: vec![2],
                        ttl_secs: None,
                    }),
                    Request::Link {
                        inbox: inbox + 1_000,
                        device: 1,
                        acked_up_to: 0,
                    },
                    Request::Link {
                        inbox: inbox + 1_000,
                        device: 0,
                        acked_up_to: 0,
                    },
                ]
            })
            .collect();
        Committer::new(&core)
            .commit_batch(&store, &setup, 0)
            .unwrap();
        let body_bytes = core.batch_bytes_max / core.batch_requests_max;
        let mut batch: Vec<Request> = (1..=core.batch_requests_max as u64)
            .map(|to| {
                Request::Send(SendRequest {
                    sender: 1,
                    client_id: to,
                    to,
                    body: vec![0; body_bytes],
                    ttl_secs: Some(1),
                })
            })
            .collect();
        batch.extend(
            (1..=core.batch_requests_max as u64).map(|inbox| Request::Ack {
                inbox: inbox + 1_000,
                device: 0,
                up_to_seq: 7,
            }),
        );
        // And as many purges as a batch carries.
        batch.extend(
            (1..=PURGES_PER_BATCH_MAX as u64).map(|inbox| Request::Purge {
                inbox: inbox + 5_000,
            }),
        );
        let mut committer = Committer::new(&core);
        committer.commit_batch(&store, &batch, now).unwrap();
        let weighed = store.committed_bytes.lock().unwrap()[1];
        let estimate = fdb.batch_transaction_bytes_max(&core);
        assert!(weighed <= estimate, "batch {weighed} > estimate {estimate}");
        assert!(
            weighed * 100 >= estimate * 95,
            "loose: {weighed} of {estimate}"
        );

        // Many more inboxes than one pass reads, in stores of their own: with one expired
        // message each, and (the largest pass) with nothing left, as after every message was
        // acked, so each entry costs its clear, its reads and an emptied mark.
        let later = now + 2 * core.expiry_bucket_ms;
        let mut weighed_passes = Vec::new();
        for with_messages in [true, false] {
            let store = Weighing {
                inner: MemoryStore::new(),
                prefix_bytes: fdb_key_prefix(&fdb.key_prefix).len(),
                committed_bytes: Mutex::new(Vec::new()),
            };
            let inboxes = (1..=4 * core.expire_scan_keys_max as u64).map(|i| i + 10_000);
            if with_messages {
                let mut committer = Committer::new(&core);
                let messages: Vec<Request> = inboxes
                    .map(|to| {
                        Request::Send(SendRequest {
                            sender: 2,
                            client_id: to,
                            to,
                            body: vec![1],
                            ttl_secs: Some(1),
                        })
                    })
                    .collect();
                for chunk in messages.chunks(core.batch_requests_max) {
                    committer.commit_batch(&store, chunk, now).unwrap();
                }
            } else {
                let mut txn = store.begin().unwrap();
                for inbox in inboxes {
                    txn.set(&keys::expiry(now / core.expiry_bucket_ms, inbox), &[]);
                }
                txn.commit().unwrap();
            }
            store.committed_bytes.lock().unwrap().clear();
            let report = commit::expire(&store, later, &core).unwrap();
            assert!(report.more);
            weighed_passes.push(store.committed_bytes.lock().unwrap()[0]);
        }
        let estimate = fdb.expire_transaction_bytes_max(&core);
        for weighed in &weighed_passes {
            assert!(
                *weighed <= estimate,
                "expiry {weighed} > estimate {estimate}"
            );
        }
        let weighed = weighed_passes.iter().copied().max().unwrap_or(0);
        assert!(
            weighed * 100 >= estimate * 90,
            "loose: {weighed} of {estimate}"
        );
    }
}
