//! Runs the one store conformance suite against every backend: memory, fjall, the fault
//! wrapper with faults off, and FoundationDB when `FDB_CLUSTER_FILE` is set (feature `fdb`).

use courier_core::store::conformance::{Harness, run_all};
use courier_core::store::fault::{FaultRates, FaultStore};
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::memory::MemoryStore;

struct Memory(MemoryStore);

impl Harness for Memory {
    type S = MemoryStore;
    fn store(&self) -> &MemoryStore {
        &self.0
    }
    fn reopen(&mut self) {}
}

struct Fjall {
    dir: tempfile::TempDir,
    store: Option<FjallStore>,
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
            dir,
            store: Some(store),
        }
    });
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
