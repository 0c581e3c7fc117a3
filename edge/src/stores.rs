//! The embedded store on disk: one fjall database per shard.
//!
//! ```text
//! data_dir/stores/layout        "courier store layout 2" and the shard count
//! data_dir/stores/shard-0/      fjall database of shard 0 (the inboxes homed to it)
//! data_dir/stores/shard-1/      ...
//! ```
//!
//! Users are placed on shards by hash (`courier_core::placement::home_shard`), so a data
//! directory's shard count is fixed: an edge with another count refuses to start and says
//! which count to set. A data directory from before per-shard stores (one database in
//! `data_dir/store`) is migrated at start: every key is copied to the store of its inbox's
//! shard, the new layout is renamed into place, and the old database is deleted. A crash
//! during migration leaves the old database untouched and the next start migrates again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use courier_core::keys;
use courier_core::placement::home_shard;
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::log::{LogOptions, LogStore};
use courier_core::store::{Store, StoreError, Transaction};
use tracing::info;

use crate::backend::EmbeddedEngine;

const LAYOUT_FILE: &str = "layout";
/// Written before a first start makes the shards' stores, removed once their layout is:
/// found without a layout, it says those stores never served and may be made again.
const MAKING_FILE: &str = "making";
const LAYOUT_HEADER: &str = "courier store layout 2";
/// What a migration holds in memory at once: per read of the old store, and per commit to a
/// shard's store. Bodies of up to 64 KiB make the bytes the bound that counts: about
/// `(shards + 1) × 16 MiB` at most.
#[derive(Clone, Copy, Debug)]
struct MigrationLimits {
    keys_per_read: usize,
    keys_per_commit: usize,
    bytes_per_commit: usize,
}

const MIGRATION_LIMITS: MigrationLimits = MigrationLimits {
    keys_per_read: 256,
    keys_per_commit: 10_000,
    bytes_per_commit: 16 << 20,
};

/// Where the per-shard stores of a data directory live.
pub fn stores_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("stores")
}

/// The single shared store of data directories written before per-shard stores.
pub fn legacy_store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("store")
}

pub use courier_core::store::allocated_bytes;

/// The directory of shard `shard`'s store under `stores` ([`stores_dir`]).
pub fn shard_dir(stores: &Path, shard: u32) -> PathBuf {
    stores.join(format!("shard-{shard}"))
}

/// Checks, without writing anything, that an edge with `shards` shards of the embedded
/// `engine` (`fjall` or `log`) can open the store in `data_dir`: no store yet, an old single
/// store to migrate, or a layout of that many shards whose stores that engine wrote.
pub fn check_layout(data_dir: &Path, shards: u32, engine: &str) -> Result<(), String> {
    let stores = stores_dir(data_dir);
    if let Some(existing) = read_layout(&stores)?
        && existing != shards
    {
        return Err(shard_count_error(&stores, existing, shards));
    }
    for shard in 0..shards {
        let dir = shard_dir(&stores, shard);
        let written_by = if LogStore::is_log_store(&dir) {
            "log"
        } else if <FjallStore as EmbeddedEngine>::exists(&dir) {
            "fjall"
        } else {
            continue;
        };
        if written_by != engine {
            return Err(format!(
                "{} holds a store of the {written_by} engine, and store.engine is {engine:?}: \
                 set store.engine = \"{written_by}\" (the engines cannot read each other's \
                 files)",
                dir.display()
            ));
        }
    }
    Ok(())
}

fn shard_count_error(stores: &Path, existing: u32, shards: u32) -> String {
    format!(
        "the store in {} was written by an edge with {existing} shards, and this one would run \
         {shards}: users are placed on shards by hash, so the count of a data directory is \
         fixed. Set server.shards = {existing}",
        stores.display()
    )
}

/// Opens (creating or migrating if needed) the store of every shard, in shard order.
pub fn open_embedded(
    data_dir: &Path,
    shards: u32,
    options: &FjallOptions,
) -> Result<Vec<Arc<FjallStore>>, String> {
    let stores = stores_dir(data_dir);
    let legacy = legacy_store_dir(data_dir);
    match read_layout(&stores)? {
        Some(existing) if existing != shards => {
            return Err(shard_count_error(&stores, existing, shards));
        }
        Some(_) => {
            if legacy.exists() {
                // A migration renamed the new layout into place and stopped before it deleted
                // the old database: finish it.
                remove_legacy(&legacy)?;
            }
            remove_making_marker(&stores)?;
        }
        None => {
            if !legacy.exists() {
                return open_new(&stores, shards, options);
            }
            migrate(&legacy, &stores, shards, options)?;
        }
    }
    // A shard directory of the log engine is refused by `EmbeddedEngine::open` for fjall.
    open_shards(&stores, shards, options, Existing::Required)
}

/// A data directory's first start: the shards' stores are made, then the layout that says
/// they exist. From then on a shard store that is missing is refused ([`Existing`]).
fn open_new<E: EmbeddedEngine + Send + Sync>(
    stores: &Path,
    shards: u32,
    options: &E::Options,
) -> Result<Vec<Arc<E>>, String> {
    begin_first_start(stores)?;
    let opened = open_shards(stores, shards, options, Existing::MayBeMade)?;
    create_layout(stores, shards)?;
    remove_making_marker(stores)?;
    Ok(opened)
}

/// Marks `stores` as being made by a first start, after removing what an earlier one that
/// failed or died before its layout left: that never served (the edge serves only once every
/// store is open), so it is made again, with this start's shard count.
fn begin_first_start(stores: &Path) -> Result<(), String> {
    let making = stores.join(MAKING_FILE);
    if making.exists() {
        clear_unfinished_start(stores)?;
    }
    crate::files::replace_file(
        &making,
        &stores.join(format!("{MAKING_FILE}.tmp")),
        b"a first start is making these stores\n",
        0o644,
    )
}

/// Removes what an unfinished first start left in `stores`, its marker last.
fn clear_unfinished_start(stores: &Path) -> Result<(), String> {
    let entries =
        std::fs::read_dir(stores).map_err(|e| format!("cannot list {}: {e}", stores.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", stores.display()))?;
        if entry.file_name() == MAKING_FILE {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| {
            format!(
                "cannot remove {}, left by a first start that did not finish: {e}",
                path.display()
            )
        })?;
    }
    info!(stores = %stores.display(), "removed the stores of a first start that did not finish");
    Ok(())
}

/// Removes the first start's marker once the layout is written (a crash before leaves it, and
/// the next start with a layout removes it).
fn remove_making_marker(stores: &Path) -> Result<(), String> {
    let making = stores.join(MAKING_FILE);
    match std::fs::remove_file(&making) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot remove {}: {e}", making.display())),
    }
    crate::files::sync_dir(stores).map_err(|e| format!("cannot sync {}: {e}", stores.display()))
}

/// Whether an open may make a shard's store where there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    /// The layout exists, so every shard's store was made: one that is missing was lost
    /// (a volume not mounted, files deleted). Made anew, every inbox of the shard would start
    /// again at seq 1, and what it held would be gone from service without a word.
    Required,
    /// A first start, or one that died before it wrote the layout.
    MayBeMade,
}

/// Opens the stores of an existing data directory with the shard count it was written with
/// (for tools and tests; the edge itself uses [`open_embedded`]).
pub fn open_existing<E: EmbeddedEngine + Send + Sync>(
    data_dir: &Path,
    options: &E::Options,
) -> Result<Vec<Arc<E>>, String> {
    let stores = stores_dir(data_dir);
    let shards = read_layout(&stores)?
        .ok_or_else(|| format!("{} holds no Courier store", stores.display()))?;
    open_shards(&stores, shards, options, Existing::Required)
}

/// Opens (creating if needed) the log store of every shard, in shard order
/// (`store.engine = "log"`). A data directory of the other engine is refused, by the log
/// store itself (its directories hold no `FORMAT` file) or here (a store from before
/// per-shard stores, which only the fjall engine migrates).
pub fn open_embedded_log(
    data_dir: &Path,
    shards: u32,
    options: &LogOptions,
) -> Result<Vec<Arc<LogStore>>, String> {
    let stores = stores_dir(data_dir);
    let legacy = legacy_store_dir(data_dir);
    let opened: Vec<Arc<LogStore>> = match read_layout(&stores)? {
        Some(existing) if existing != shards => {
            return Err(shard_count_error(&stores, existing, shards));
        }
        Some(_) => {
            remove_making_marker(&stores)?;
            open_shards(&stores, shards, options, Existing::Required)?
        }
        None if legacy.exists() => {
            return Err(format!(
                "{} holds a store from before per-shard stores, which the log engine cannot \
                 read: start once with store.engine = \"fjall\" to migrate it",
                legacy.display()
            ));
        }
        None => open_new(&stores, shards, options)?,
    };
    for (shard, store) in opened.iter().enumerate() {
        let recovery = store.recovery();
        info!(
            shard,
            keys = recovery.keys,
            from_snapshot = recovery.snapshot,
            journal_bytes = recovery.journal_bytes,
            torn_bytes_cut = recovery.torn_bytes_cut,
            dedupe_moves = recovery.dedupe_moves,
            direct_writes = recovery.direct_writes,
            elapsed_ms = recovery.elapsed.as_millis() as u64,
            "log store recovered"
        );
    }
    Ok(opened)
}

/// Opens the shard stores in parallel: each replays its own journal.
fn open_shards<E: EmbeddedEngine + Send + Sync>(
    stores: &Path,
    shards: u32,
    options: &E::Options,
    existing: Existing,
) -> Result<Vec<Arc<E>>, String> {
    if existing == Existing::Required
        && let Some(missing) = (0..shards).find(|shard| !holds_files(&shard_dir(stores, *shard)))
    {
        return Err(format!(
            "the store of shard {missing} is missing from {}, though {} says this data \
             directory has {shards} shards: restore it from a backup (a volume not mounted, \
             files deleted?). An empty store in its place would start every inbox of the \
             shard again at seq 1. A data directory that never served may be deleted instead",
            shard_dir(stores, missing).display(),
            stores.join(LAYOUT_FILE).display()
        ));
    }
    std::thread::scope(|scope| {
        let opening: Vec<_> = (0..shards)
            .map(|shard| {
                let dir = shard_dir(stores, shard);
                scope.spawn(move || {
                    E::open(&dir, options)
                        .map(Arc::new)
                        .map_err(|e| format!("cannot open the store in {}: {e}", dir.display()))
                })
            })
            .collect();
        let opened: Result<Vec<Arc<E>>, String> = opening
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err("a store failed to open (panic)".into()))
            })
            .collect();
        // The engines sync their own directories, not their entries in `stores`: a shard
        // directory just created must not vanish at a power cut with what it then commits.
        let opened = opened?;
        crate::files::sync_dir(stores)
            .map_err(|e| format!("cannot sync {}: {e}", stores.display()))?;
        Ok(opened)
    })
}

/// Whether `dir` is a directory with something in it (which engine's files is for the engine
/// to tell: it refuses the other's by name) besides the edge's record of its last erase pass,
/// which alone is no store.
fn holds_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| {
        entries.any(|entry| {
            entry.is_ok_and(|entry| {
                let name = entry.file_name();
                name != crate::erase_record::FILE_NAME
                    && name != crate::erase_record::TEMPORARY_NAME
            })
        })
    })
}

/// When the stores of the data directory that holds `store_dir` (a shard's) were made, Unix
/// milliseconds: the time of their layout file, written once at the first start (or at the
/// migration from a single store, which copies live data only). `None` if it cannot be read.
pub fn stores_created_unix_ms(store_dir: &Path) -> Option<u64> {
    let layout = store_dir.parent()?.join(LAYOUT_FILE);
    let modified = std::fs::metadata(layout).ok()?.modified().ok()?;
    let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since_epoch.as_millis()).ok()
}

/// The shard count recorded in `stores`, or `None` if there is no layout yet.
fn read_layout(stores: &Path) -> Result<Option<u32>, String> {
    let path = stores.join(LAYOUT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // A first start that died while writing the layout left only its copy.
            let temporary = stores.join(format!("{LAYOUT_FILE}.tmp"));
            let only_the_copy = std::fs::read_dir(stores)
                .is_ok_and(|entries| entries.flatten().all(|entry| entry.path() == temporary));
            if only_the_copy && temporary.exists() {
                std::fs::remove_file(&temporary)
                    .map_err(|e| format!("cannot remove {}: {e}", temporary.display()))?;
            }
            // A first start that did not finish is no foreign directory: the next start
            // makes its stores again.
            if stores.join(MAKING_FILE).exists() {
                return Ok(None);
            }
            if stores.exists() && std::fs::read_dir(stores).is_ok_and(|mut d| d.next().is_some()) {
                return Err(format!(
                    "{} holds files but no {LAYOUT_FILE} file: it is not a Courier store. Move it \
                     away or set server.data_dir to another directory",
                    stores.display()
                ));
            }
            return Ok(None);
        }
        Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
    };
    let mut lines = text.lines();
    if lines.next() != Some(LAYOUT_HEADER) {
        return Err(format!(
            "{} is not a store layout this version understands (expected the first line \
             \"{LAYOUT_HEADER}\")",
            path.display()
        ));
    }
    let shards = lines
        .find_map(|line| line.strip_prefix("shards = "))
        .and_then(|count| count.trim().parse::<u32>().ok())
        .filter(|count| *count > 0)
        .ok_or_else(|| format!("{} names no shard count", path.display()))?;
    Ok(Some(shards))
}

/// Writes the layout file of a new store directory, atomically and durably.
fn create_layout(stores: &Path, shards: u32) -> Result<(), String> {
    let text = format!("{LAYOUT_HEADER}\nshards = {shards}\n");
    crate::files::replace_file(
        &stores.join(LAYOUT_FILE),
        &stores.join(format!("{LAYOUT_FILE}.tmp")),
        text.as_bytes(),
        0o644,
    )
}

fn remove_legacy(legacy: &Path) -> Result<(), String> {
    std::fs::remove_dir_all(legacy).map_err(|e| {
        format!(
            "migrated the store, but cannot delete the old one in {}: {e}; delete it by hand",
            legacy.display()
        )
    })
}

/// Copies a single shared store into per-shard stores, then swaps them in.
fn migrate(
    legacy: &Path,
    stores: &Path,
    shards: u32,
    options: &FjallOptions,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    let parent = stores.parent().unwrap_or(Path::new("."));
    let staging = parent.join("stores.migrating");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| {
            format!(
                "cannot remove an unfinished migration in {}: {e}",
                staging.display()
            )
        })?;
    }
    info!(from = %legacy.display(), to = %stores.display(), shards, "migrating the store to one database per shard");
    create_layout(&staging, shards)?;
    let copied = {
        let source = FjallStore::open(legacy, options)
            .map_err(|e| format!("cannot open the old store in {}: {e}", legacy.display()))?;
        let targets = open_shards(&staging, shards, options, Existing::MayBeMade)?;
        copy_keys(&source, &targets, MIGRATION_LIMITS).map_err(|e| {
            format!(
                "migrating the store in {} failed (it is left as it was): {e}",
                legacy.display()
            )
        })?
    };
    std::fs::rename(&staging, stores)
        .and_then(|()| crate::files::sync_dir(parent))
        .map_err(|e| {
            format!(
                "cannot move the migrated store into {}: {e}",
                stores.display()
            )
        })?;
    remove_legacy(legacy)?;
    info!(
        keys = copied.keys,
        commits = copied.commits,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store migrated"
    );
    Ok(())
}

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// What a migration copied: keys read, and commits made to the shards' stores.
#[derive(Debug, Default)]
struct Copied {
    keys: u64,
    commits: u64,
}

/// Copies every key of `source` to the target store of its inbox's shard, each shard's pairs
/// committed once they reach `limits`' keys or bytes.
fn copy_keys(
    source: &FjallStore,
    targets: &[Arc<FjallStore>],
    limits: MigrationLimits,
) -> Result<Copied, StoreError> {
    let shards = targets.len() as u32;
    // Per shard: the pairs waiting for its next commit, and their bytes.
    let mut pending: Vec<(Pairs, usize)> = vec![(Vec::new(), 0); targets.len()];
    let mut copied = Copied::default();
    let mut from = Vec::new();
    loop {
        let page = source
            .begin_read()?
            .get_range(&from, &[0xff; 2], limits.keys_per_read)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        from = last.clone();
        from.push(0);
        for (key, value) in page {
            copied.keys += 1;
            // Adds a pair to a shard's pending ones, committed once they reach the limits.
            let mut add = |shard: usize, key: Vec<u8>, value: Vec<u8>| {
                let (pairs, pairs_bytes) = &mut pending[shard];
                *pairs_bytes += key.len() + value.len();
                pairs.push((key, value));
                if pairs.len() >= limits.keys_per_commit || *pairs_bytes >= limits.bytes_per_commit
                {
                    *pairs_bytes = 0;
                    return write_pairs(&targets[shard], std::mem::take(pairs), &mut copied);
                }
                Ok(())
            };
            match shard_of_key(&key, shards)? {
                Some(shard) => add(shard as usize, key, value)?,
                // The clock high-water mark belongs to every shard.
                None => {
                    for shard in 0..targets.len() {
                        add(shard, key.clone(), value.clone())?;
                    }
                }
            }
        }
    }
    for (target, (pairs, _)) in targets.iter().zip(pending) {
        write_pairs(target, pairs, &mut copied)?;
    }
    Ok(copied)
}

fn write_pairs(target: &FjallStore, pairs: Pairs, copied: &mut Copied) -> Result<(), StoreError> {
    if pairs.is_empty() {
        return Ok(());
    }
    let mut txn = target.begin()?;
    for (key, value) in pairs {
        txn.set(&key, &value);
    }
    txn.commit()?;
    copied.commits += 1;
    Ok(())
}

/// The shard whose store holds `key`, or `None` for keys every shard keeps (the clock).
fn shard_of_key(key: &[u8], shards: u32) -> Result<Option<u32>, StoreError> {
    let inbox_at = |offset: usize| -> Result<Option<u32>, StoreError> {
        let bytes: [u8; 8] = key
            .get(offset..offset + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("key too short: {key:02x?}")))?;
        Ok(Some(home_shard(u64::from_be_bytes(bytes), shards)))
    };
    match key.first() {
        Some(&keys::TAG_MESSAGE | &keys::TAG_COUNTER | &keys::TAG_DEVICE) => inbox_at(1),
        Some(&keys::TAG_DEDUPE | &keys::TAG_EXPIRY) => inbox_at(9),
        // Expiry's mark of deleted dedupe records holds for each shard's copy too.
        Some(&keys::TAG_CLOCK | &keys::TAG_DEDUPE_EXPIRED) => Ok(None),
        _ => Err(StoreError::Corrupt(format!(
            "a key this version does not know: {key:02x?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::CoreConfig;
    use courier_core::commit::{Committer, Outcome, Request, SendRequest, read_inbox};

    /// A data directory stays with the engine that wrote it: each engine refuses the other's
    /// and names the setting to change.
    #[test]
    fn each_engine_refuses_the_others_data_directory() {
        let log_dir = tempfile::tempdir().unwrap();
        drop(open_embedded_log(log_dir.path(), 2, &LogOptions::default()).unwrap());
        let error = open_embedded(log_dir.path(), 2, &FjallOptions::default()).unwrap_err();
        assert!(error.contains("store.engine = \"log\""), "{error}");
        // fjall wrote nothing into the log store's directory.
        assert!(
            !shard_dir(&stores_dir(log_dir.path()), 0)
                .join("keyspaces")
                .exists()
        );

        let fjall_dir = tempfile::tempdir().unwrap();
        drop(open_embedded(fjall_dir.path(), 2, &FjallOptions::default()).unwrap());
        let error = open_embedded_log(fjall_dir.path(), 2, &LogOptions::default()).unwrap_err();
        assert!(error.contains("not a log store"), "{error}");
        // Both still open with their own engine.
        drop(open_embedded_log(log_dir.path(), 2, &LogOptions::default()).unwrap());
        drop(open_embedded(fjall_dir.path(), 2, &FjallOptions::default()).unwrap());
    }

    /// The stores' making time (for the erase metric of a store that never completed a
    /// pass) is their layout's, written once: a reopen does not move it.
    #[test]
    fn the_stores_making_time_is_their_layouts_and_a_reopen_keeps_it() {
        let data = tempfile::tempdir().unwrap();
        let before = courier_core::clock::wall_clock_ms();
        drop(open_embedded(data.path(), 2, &FjallOptions::default()).unwrap());
        let shard = shard_dir(&stores_dir(data.path()), 1);
        let made = stores_created_unix_ms(&shard).expect("the layout's time");
        assert!(made + 1_000 >= before, "{made} against {before}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(open_embedded(data.path(), 2, &FjallOptions::default()).unwrap());
        assert_eq!(stores_created_unix_ms(&shard), Some(made));
    }

    /// A shard's store missing from a data directory whose layout says it exists is refused
    /// at start, on both engines, not made anew empty: every inbox of the shard would start
    /// again at seq 1. Once it is back, the edge starts.
    #[test]
    fn a_missing_shard_store_is_refused_not_made_anew() {
        let fjall_dir = tempfile::tempdir().unwrap();
        drop(open_embedded(fjall_dir.path(), 2, &FjallOptions::default()).unwrap());
        let log_dir = tempfile::tempdir().unwrap();
        drop(open_embedded_log(log_dir.path(), 2, &LogOptions::default()).unwrap());
        for (dir, open) in [
            (
                fjall_dir.path(),
                (|data: &Path| open_embedded(data, 2, &FjallOptions::default()).map(drop))
                    as fn(&Path) -> Result<(), String>,
            ),
            (log_dir.path(), |data: &Path| {
                open_embedded_log(data, 2, &LogOptions::default()).map(drop)
            }),
        ] {
            let shard = shard_dir(&stores_dir(dir), 1);
            let away = dir.join("away");
            std::fs::rename(&shard, &away).unwrap();
            let error = open(dir).unwrap_err();
            assert!(error.contains("store of shard 1 is missing"), "{error}");
            assert!(!shard.exists(), "no empty store was made in its place");
            // Only the edge's record of its last erase pass left there (the engine's files
            // deleted, the record not): still missing.
            std::fs::create_dir(&shard).unwrap();
            crate::erase_record::write(&shard, courier_core::clock::wall_clock_ms()).unwrap();
            let error = open(dir).unwrap_err();
            assert!(error.contains("store of shard 1 is missing"), "{error}");
            std::fs::remove_dir_all(&shard).unwrap();
            std::fs::rename(&away, &shard).unwrap();
            open(dir).expect("opens once the store is back");
        }
    }

    fn send(sender: u64, to: u64, client_id: u64) -> Request {
        Request::Send(SendRequest {
            sender,
            to,
            client_id,
            body: format!("hello {to} #{client_id}").into_bytes(),
            ttl_secs: None,
        })
    }

    /// A migration holds a bounded number of bytes, not only of keys: large bodies are
    /// committed to a shard's store well before its key limit (10,000 bodies of 64 KiB
    /// were held whole per shard before).
    #[test]
    fn a_migration_of_large_bodies_commits_by_bytes() {
        let data = tempfile::tempdir().expect("tempdir");
        let options = FjallOptions::default();
        let core = CoreConfig::default();
        let now = 1_000_000;
        let body = vec![7u8; 64 << 10];
        let recipients: Vec<u64> = (1..=40).collect();
        let legacy = FjallStore::open(&legacy_store_dir(data.path()), &options).unwrap();
        let requests: Vec<Request> = recipients
            .iter()
            .map(|to| {
                Request::Send(SendRequest {
                    sender: 99,
                    to: *to,
                    client_id: *to,
                    body: body.clone(),
                    ttl_secs: None,
                })
            })
            .collect();
        let outcomes = Committer::new(&core)
            .commit_batch(&legacy, &requests, now)
            .unwrap();
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Stored { .. })));
        let staging = data.path().join("staging");
        create_layout(&staging, 2).unwrap();
        let targets = open_shards(&staging, 2, &options, Existing::MayBeMade).unwrap();
        let limits = MigrationLimits {
            keys_per_read: 8,
            keys_per_commit: 10_000,
            bytes_per_commit: 256 << 10,
        };
        let copied = copy_keys(&legacy, &targets, limits).unwrap();
        // 40 bodies of 64 KiB, four to a commit of 256 KiB: at least ten commits.
        assert!(copied.commits >= 10, "{copied:?}");
        for to in &recipients {
            let shard = home_shard(*to, 2) as usize;
            let page = read_inbox(&*targets[shard], *to, 0, now, &core).unwrap();
            assert_eq!(page.messages.len(), 1, "inbox {to}");
            assert_eq!(page.messages[0].body, body);
        }
    }

    #[test]
    fn a_single_store_migrates_to_per_shard_stores_with_every_message_and_counter() {
        let data = tempfile::tempdir().expect("tempdir");
        let options = FjallOptions::default();
        let core = CoreConfig::default();
        let now = 1_000_000;
        let recipients: Vec<u64> = (1..=40).collect();
        {
            let legacy = FjallStore::open(&legacy_store_dir(data.path()), &options).unwrap();
            let mut committer = Committer::new(&core);
            let requests: Vec<Request> = recipients
                .iter()
                .flat_map(|to| [send(99, *to, *to * 10), send(99, *to, *to * 10 + 1)])
                .collect();
            let outcomes = committer.commit_batch(&legacy, &requests, now).unwrap();
            assert!(outcomes.iter().all(|o| matches!(o, Outcome::Stored { .. })));
        }
        let stores = open_embedded(data.path(), 3, &options).expect("migrates");
        assert!(!legacy_store_dir(data.path()).exists(), "old store deleted");
        for to in &recipients {
            let shard = home_shard(*to, 3) as usize;
            let page = read_inbox(&*stores[shard], *to, 0, now, &core).unwrap();
            let bodies: Vec<_> = page.messages.iter().map(|m| m.body.clone()).collect();
            assert_eq!(
                bodies,
                vec![
                    format!("hello {to} #{}", to * 10).into_bytes(),
                    format!("hello {to} #{}", to * 10 + 1).into_bytes()
                ]
            );
            assert_eq!(page.covered_up_to, 2);
            for other in (0..3).filter(|s| *s != shard) {
                let page = read_inbox(&*stores[other], *to, 0, now, &core).unwrap();
                assert!(page.messages.is_empty(), "inbox {to} only on shard {shard}");
            }
        }
        // The counter moved too: the next message of an inbox gets seq 3, not 1.
        let to = recipients[0];
        let shard = home_shard(to, 3) as usize;
        let mut committer = Committer::new(&core);
        let outcome = committer
            .commit_batch(&*stores[shard], &[send(7, to, 1)], now + 1)
            .unwrap();
        assert!(
            matches!(outcome[0], Outcome::Stored { seq: 3, .. }),
            "{outcome:?}"
        );
        drop(stores);
        // Reopening finds the layout and keeps everything.
        let again = open_embedded(data.path(), 3, &options).expect("reopens");
        let page = read_inbox(&*again[shard], to, 0, now + 1, &core).unwrap();
        assert_eq!(page.messages.len(), 3);
    }

    #[test]
    fn another_shard_count_is_refused_with_the_count_to_set() {
        let data = tempfile::tempdir().expect("tempdir");
        let options = FjallOptions::default();
        assert!(
            check_layout(data.path(), 4, "fjall").is_ok(),
            "no store yet"
        );
        drop(open_embedded(data.path(), 2, &options).expect("creates"));
        let error = open_embedded(data.path(), 4, &options).expect_err("refused");
        assert!(error.contains("server.shards = 2"), "{error}");
        assert_eq!(
            check_layout(data.path(), 4, "fjall"),
            Err(error),
            "check-config says the same"
        );
        assert!(check_layout(data.path(), 2, "fjall").is_ok());
    }

    /// A first start that died after making its stores and before writing their layout (or
    /// whose last store failed to open) leaves no layout; the next start makes them again, with
    /// its own shard count. Before, it called the data directory foreign ("holds files but no
    /// layout file") for good.
    #[test]
    fn a_first_start_that_did_not_finish_is_made_again() {
        let data = tempfile::tempdir().expect("tempdir");
        let stores = stores_dir(data.path());
        let options = FjallOptions::default();
        // The first start, four shards, dies before its layout.
        begin_first_start(&stores).expect("marked");
        drop(open_shards::<FjallStore>(&stores, 4, &options, Existing::MayBeMade).expect("made"));
        assert!(check_layout(data.path(), 2, "fjall").is_ok());
        let opened = open_embedded(data.path(), 2, &options).expect("made again");
        assert_eq!(opened.len(), 2);
        drop(opened);
        assert!(!stores.join(MAKING_FILE).exists(), "the marker is gone");
        assert!(
            !shard_dir(&stores, 3).exists(),
            "the dead start's stores are gone"
        );
        assert_eq!(read_layout(&stores), Ok(Some(2)));
        // From now on a missing store is refused, not made.
        std::fs::remove_dir_all(shard_dir(&stores, 1)).expect("lose shard 1");
        let error = open_embedded(data.path(), 2, &options).expect_err("refused");
        assert!(error.contains("restore it from a backup"), "{error}");
    }

    /// `check-config` refuses the other engine on a data directory one engine wrote, as the
    /// start would (after making its keys and certificate), with the setting to change.
    #[test]
    fn another_engine_is_refused_with_the_engine_to_set() {
        let data = tempfile::tempdir().expect("tempdir");
        drop(open_embedded(data.path(), 2, &FjallOptions::default()).expect("creates"));
        assert!(check_layout(data.path(), 2, "fjall").is_ok());
        let error = check_layout(data.path(), 2, "log").expect_err("refused");
        assert!(error.contains("store.engine = \"fjall\""), "{error}");
        let logged = tempfile::tempdir().expect("tempdir");
        drop(open_embedded_log(logged.path(), 1, &LogOptions::default()).expect("creates"));
        assert!(check_layout(logged.path(), 1, "log").is_ok());
        let error = check_layout(logged.path(), 1, "fjall").expect_err("refused");
        assert!(error.contains("store.engine = \"log\""), "{error}");
    }

    #[test]
    fn a_foreign_directory_is_refused() {
        let data = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(stores_dir(data.path())).unwrap();
        std::fs::write(stores_dir(data.path()).join("notes.txt"), "mine").unwrap();
        let error = open_embedded(data.path(), 1, &FjallOptions::default()).expect_err("refused");
        assert!(error.contains("not a Courier store"), "{error}");
    }

    /// A first start that died while writing the layout left only `layout.tmp`: the next
    /// start creates the store (it held nothing), instead of calling it a foreign directory.
    #[test]
    fn a_layout_copy_left_by_a_first_start_is_not_a_foreign_directory() {
        let data = tempfile::tempdir().expect("tempdir");
        let stores = stores_dir(data.path());
        std::fs::create_dir_all(&stores).unwrap();
        std::fs::write(stores.join(format!("{LAYOUT_FILE}.tmp")), "cut").unwrap();
        let opened = open_embedded(data.path(), 2, &FjallOptions::default()).expect("creates");
        assert_eq!(opened.len(), 2);
        assert_eq!(read_layout(&stores), Ok(Some(2)));
    }
}
