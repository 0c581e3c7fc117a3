//! Runs the one store conformance suite against every backend: memory, fjall, the log store,
//! the fault
//! wrapper with faults off, and FoundationDB when `FDB_CLUSTER_FILE` is set (feature `fdb`).

use courier_core::store::conformance::{Harness, run_all};
use courier_core::store::fault::{FaultRates, FaultStore};
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::log::{LogOptions, LogStore};
use courier_core::store::memory::MemoryStore;
use courier_core::store::{Store, StoreError};

struct Memory(MemoryStore);

impl Harness for Memory {
    type S = MemoryStore;
    fn store(&self) -> &MemoryStore {
        &self.0
    }
    fn reopen(&mut self) {}
}

struct Fjall {
    /// Before `dir`: fields drop in order, and the store's threads must stop before its
    /// directory goes (or they write into it as it is removed, and it stays behind).
    store: Option<FjallStore>,
    dir: tempfile::TempDir,
}

impl Harness for Fjall {
    type S = FjallStore;
    fn store(&self) -> &FjallStore {
        self.store.as_ref().expect("store is open")
    }
    fn reopen(&mut self) {
        // Close first: fjall locks its directory.
        self.store = None;
        self.store =
            Some(FjallStore::open(self.dir.path(), &FjallOptions::default()).expect("reopen"));
    }
}

struct Log {
    /// Before `dir`, as in [`Fjall`]: the store's thread prepares a spare journal segment
    /// in the directory until the store is dropped.
    store: Option<LogStore>,
    dir: tempfile::TempDir,
    options: LogOptions,
}

impl Log {
    /// A fresh log store in its own temporary directory.
    fn fresh(options: LogOptions) -> Log {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LogStore::open(dir.path(), &options).expect("open log store");
        Log {
            store: Some(store),
            dir,
            options,
        }
    }
}

impl Harness for Log {
    type S = LogStore;
    fn store(&self) -> &LogStore {
        self.store.as_ref().expect("store is open")
    }
    fn reopen(&mut self) {
        // Close first: the store locks its directory. Recovery replays the snapshot (if a
        // checkpoint ran) and the journals.
        self.store = None;
        self.store = Some(LogStore::open(self.dir.path(), &self.options).expect("reopen"));
    }
}

struct Faulty(FaultStore<MemoryStore>);

impl Harness for Faulty {
    type S = FaultStore<MemoryStore>;
    fn store(&self) -> &FaultStore<MemoryStore> {
        &self.0
    }
    fn reopen(&mut self) {
        self.0.reopen();
    }
}

#[test]
fn memory_backend_conforms() {
    run_all(|| Memory(MemoryStore::new()));
}

#[test]
fn fjall_backend_conforms() {
    run_all(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = FjallStore::open(dir.path(), &FjallOptions::default()).expect("open fjall");
        Fjall {
            store: Some(store),
            dir,
        }
    });
}

#[test]
fn log_backend_conforms() {
    run_all(|| Log::fresh(LogOptions::default()));
}

/// The same suite with a checkpoint before every reopen: recovery then starts from a
/// snapshot (and the journal opened with it) instead of the journals alone.
#[test]
fn log_backend_conforms_when_recovering_from_snapshots() {
    run_all(|| LogCheckpointed(Log::fresh(LogOptions::default())));
}

struct LogCheckpointed(Log);

impl Harness for LogCheckpointed {
    type S = LogStore;
    fn store(&self) -> &LogStore {
        self.0.store()
    }
    fn reopen(&mut self) {
        self.0.store().checkpoint().expect("checkpoint");
        self.0.reopen();
    }
}

/// The same suite with journal segments of 512 bytes: commits cross segments all the time.
#[test]
fn log_backend_conforms_with_tiny_journal_segments() {
    run_all(|| {
        Log::fresh(LogOptions {
            journal_segment_bytes: 512,
            ..LogOptions::default()
        })
    });
}

/// The same suite with every write transaction's commit returning before its fsync
/// (`Store::begin_unsynced`, decision 0027): the next write transaction reads the pending
/// commit in front of the map (gets, ranges, clears over it), and a reader syncs first.
#[test]
fn log_backend_conforms_with_unsynced_commits() {
    run_all(|| LogUnsynced(Unsynced(Log::fresh(LogOptions::default()))));
    run_all(|| {
        LogUnsynced(Unsynced(Log::fresh(LogOptions {
            journal_segment_bytes: 512,
            ..LogOptions::default()
        })))
    });
}

/// A log store whose write transactions commit unsynced, and whose readers sync first.
struct Unsynced(Log);

impl Store for Unsynced {
    type Transaction<'a> = <LogStore as Store>::Transaction<'a>;

    fn begin(&self) -> Result<Self::Transaction<'_>, StoreError> {
        self.0.store().begin_unsynced()
    }

    fn begin_read(&self) -> Result<Self::Transaction<'_>, StoreError> {
        self.0.store().sync_through(u64::MAX)?;
        self.0.store().begin_read()
    }
}

struct LogUnsynced(Unsynced);

impl Harness for LogUnsynced {
    type S = Unsynced;
    fn store(&self) -> &Unsynced {
        &self.0
    }
    fn reopen(&mut self) {
        // Unsynced, the last commit is in the page cache: a process restart keeps it.
        self.0.0.reopen();
    }
}

#[test]
fn fault_wrapper_without_faults_conforms() {
    run_all(|| {
        Faulty(FaultStore::new(
            MemoryStore::new(),
            FaultRates::default(),
            1,
        ))
    });
}

/// The FoundationDB run: the same suite on a real cluster, whenever `FDB_CLUSTER_FILE` names
/// one, then the fencing checks that only FoundationDB has. Each case gets a fresh, empty key
/// prefix of its own under `courier-test/`, cleared again when the case ends, so runs can
/// share a cluster with each other and with deployments (which use other prefixes).
#[cfg(feature = "fdb")]
mod foundationdb {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    use courier_core::rng::mix64;
    use courier_core::store::config::FdbConfig;
    use courier_core::store::fdb::{FdbClusters, FdbNetwork, FdbStore, ShardClaim};
    use courier_core::store::{Store, StoreError, Transaction};

    use super::{Harness, run_all};

    const SHARD: u32 = 3;
    const OWNER: u64 = 1;
    const ATTEMPTS_MAX: u32 = 5;

    /// A key prefix no other run uses: time, process and a counter, mixed.
    fn fresh_prefix() -> Vec<u8> {
        static CASES: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64);
        let unique = mix64(nanos ^ mix64(u64::from(std::process::id())))
            ^ CASES.fetch_add(1, Ordering::Relaxed);
        format!("courier-test/{unique:016x}/").into_bytes()
    }

    struct Fdb {
        network: Arc<FdbNetwork>,
        config: FdbConfig,
        claim: ShardClaim,
        clusters: FdbClusters,
        store: FdbStore,
    }

    impl Fdb {
        fn fresh(network: &Arc<FdbNetwork>, cluster_file: &Path) -> Fdb {
            let config = FdbConfig {
                cluster_files: vec![cluster_file.to_path_buf()],
                key_prefix: fresh_prefix(),
                ..FdbConfig::default()
            };
            let clusters = FdbClusters::open(network, &config).expect("open cluster");
            let store = clusters
                .claim_shard(SHARD, OWNER, ATTEMPTS_MAX)
                .expect("claim shard")
                .remove(0);
            Fdb {
                network: Arc::clone(network),
                claim: store.claim(),
                config,
                clusters,
                store,
            }
        }
    }

    impl Harness for Fdb {
        type S = FdbStore;
        fn store(&self) -> &FdbStore {
            &self.store
        }
        fn reopen(&mut self) {
            // A new database handle and store for the same claim, as after a restart that
            // kept its claim.
            self.clusters = FdbClusters::open(&self.network, &self.config).expect("reopen");
            self.store = self.clusters.open_shard(self.claim).remove(0);
        }
    }

    impl Drop for Fdb {
        fn drop(&mut self) {
            // Everything under the prefix as stored (its length byte first), the owner key
            // (after `prefix 0xff`) included: the prefix ends in '/', so incrementing its
            // last byte gives the end of its range. (The configured prefix, without the
            // length byte, matched no key: every case left its keys in the cluster.)
            let prefix = &self.clusters.key_prefix().to_vec();
            let mut end = prefix.clone();
            if let Some(last) = end.last_mut() {
                *last += 1;
            }
            let db = self.store.cluster().database();
            let cleared = db.create_trx().map(|trx| {
                trx.clear_range(prefix, &end);
                futures_executor::block_on(trx.commit())
            });
            if !matches!(cleared, Ok(Ok(_))) {
                eprintln!(
                    "could not clear test prefix {}",
                    String::from_utf8_lossy(prefix)
                );
            }
        }
    }

    #[test]
    fn foundationdb_backend_conforms() {
        let Some(cluster_file) = std::env::var_os("FDB_CLUSTER_FILE").map(PathBuf::from) else {
            eprintln!("skipped: FDB_CLUSTER_FILE is not set");
            return;
        };
        let network = FdbNetwork::start().expect("start the foundationdb network");
        run_all(|| Fdb::fresh(&network, &cluster_file));
        a_new_claim_fences_the_old_owner(&network, &cluster_file);
        a_claim_between_read_and_commit_conflicts_then_fences(&network, &cluster_file);
        read_conflicts_fail_a_commit_that_a_later_write_overtook(&network, &cluster_file);
        // Every store and cluster handle is gone here; the network stops last.
        drop(network);
    }

    /// After a second claim, the first owner can neither read nor commit, and the new owner
    /// can; the epochs increase.
    fn a_new_claim_fences_the_old_owner(network: &Arc<FdbNetwork>, cluster_file: &Path) {
        let old = Fdb::fresh(network, cluster_file);
        let new = old
            .clusters
            .claim_shard(SHARD, OWNER + 1, ATTEMPTS_MAX)
            .expect("second claim")
            .remove(0);
        assert_eq!(new.claim().epoch, old.claim.epoch + 1);

        let mut txn = old.store.begin().expect("begin");
        txn.set(b"k", b"stale");
        assert_eq!(txn.commit(), Err(StoreError::Fenced));
        let mut txn = old.store.begin().expect("begin");
        assert_eq!(txn.get(b"k"), Err(StoreError::Fenced));

        let mut txn = new.begin().expect("begin");
        txn.set(b"k", b"fresh");
        txn.commit().expect("the new owner commits");
        let mut txn = new.begin().expect("begin");
        assert_eq!(txn.get(b"k").expect("get").as_deref(), Some(&b"fresh"[..]));
    }

    /// What the committer's caches rely on (the inbox's last seq, its device records): a key
    /// read, or named as read (`add_read_conflict`, `add_read_conflict_range`), fails the
    /// commit of a transaction that another commit overtook by writing it; a snapshot read
    /// does not; and a commit that failed wrote nothing. The embedded stores serialise their
    /// writers, so only FoundationDB can show this.
    fn read_conflicts_fail_a_commit_that_a_later_write_overtook(
        network: &Arc<FdbNetwork>,
        cluster_file: &Path,
    ) {
        let fdb = Fdb::fresh(network, cluster_file);
        let store = &fdb.store;
        let overtake = |key: &[u8]| {
            let mut other = store.begin().expect("begin");
            other.set(key, b"other");
            other.commit().expect("the other commit");
        };
        let absent = |key: &[u8]| {
            let mut txn = store.begin().expect("begin");
            assert_eq!(
                txn.get(key).expect("get"),
                None,
                "a failed commit wrote nothing"
            );
        };
        let mut txn = store.begin().expect("begin");
        txn.add_read_conflict(b"c/1");
        overtake(b"c/1");
        txn.set(b"w/1", b"stale");
        assert_eq!(txn.commit(), Err(StoreError::Conflict), "named as read");
        absent(b"w/1");
        let mut txn = store.begin().expect("begin");
        txn.add_read_conflict_range(b"r/", b"r0");
        overtake(b"r/inserted");
        txn.set(b"w/2", b"stale");
        assert_eq!(
            txn.commit(),
            Err(StoreError::Conflict),
            "a range named as read"
        );
        absent(b"w/2");
        let mut txn = store.begin().expect("begin");
        assert_eq!(txn.get(b"c/3").expect("get"), None);
        overtake(b"c/3");
        txn.set(b"w/3", b"stale");
        assert_eq!(txn.commit(), Err(StoreError::Conflict), "read");
        absent(b"w/3");
        let mut txn = store.begin().expect("begin");
        assert_eq!(txn.get_snapshot(b"c/4").expect("get"), None);
        overtake(b"c/4");
        txn.set(b"w/4", b"fresh");
        txn.commit()
            .expect("a snapshot read conflicts with nothing");
    }

    /// A claim that lands after a transaction read the owner key, but before it commits,
    /// makes that commit conflict; the retry is fenced.
    fn a_claim_between_read_and_commit_conflicts_then_fences(
        network: &Arc<FdbNetwork>,
        cluster_file: &Path,
    ) {
        let old = Fdb::fresh(network, cluster_file);
        let mut txn = old.store.begin().expect("begin");
        assert_eq!(txn.get(b"k").expect("owner check passes"), None);
        old.clusters
            .claim_shard(SHARD, OWNER + 1, ATTEMPTS_MAX)
            .expect("second claim");
        txn.set(b"k", b"stale");
        assert_eq!(txn.commit(), Err(StoreError::Conflict));
        let mut retry = old.store.begin().expect("begin");
        retry.set(b"k", b"stale");
        assert_eq!(retry.commit(), Err(StoreError::Fenced));
    }
}
