//! What the two simulations (`simulation.rs`, one edge; `cluster_simulation.rs`, several)
//! share: how seeds are chosen and run, and the simulated token check.

use std::panic::{AssertUnwindSafe, catch_unwind};

#[allow(dead_code)] // Only the embedded stores' expiry tests send in bulk.
pub mod bulk_sends;
#[allow(dead_code)] // Only the step-by-step tests drive one shard.
pub mod one_shard;

use courier_core::UserId;
use courier_core::session::{AuthFailure, Authenticator};
use courier_protocol::ErrorCode;

/// Runs `run_seed` over the seeds the environment asks for, on every core:
/// - `SIM_SEED=<n>` replays that one seed, prints its stats and returns `None`;
/// - otherwise `SIM_SEEDS=<count>` seeds (default `seeds_default`) from seed
///   `SIM_SEEDS_FROM` (default 0, so that a run with a larger count explores seeds no run
///   before it tried), and returns their count and stats.
///
/// A failing seed (an `Err`, or a panic) fails the test with the first failure and how to
/// replay it.
#[allow(dead_code)] // Not every test file that shares this module runs seeds.
pub fn run_seeds<S: Send + std::fmt::Debug>(
    name: &str,
    seeds_default: u64,
    run_seed: fn(u64) -> Result<S, String>,
) -> Option<(u64, Vec<S>)> {
    run_seeds_counted_by(name, "SIM_SEEDS", seeds_default, run_seed)
}

/// [`run_seeds`], with the count of seeds read from `count_variable` instead of `SIM_SEEDS`.
#[allow(dead_code)]
pub fn run_seeds_counted_by<S: Send + std::fmt::Debug>(
    name: &str,
    count_variable: &str,
    seeds_default: u64,
    run_seed: fn(u64) -> Result<S, String>,
) -> Option<(u64, Vec<S>)> {
    let run = move |seed: u64| match catch_unwind(AssertUnwindSafe(|| run_seed(seed))) {
        Ok(result) => result,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())),
    };
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let seed: u64 = seed.parse().expect("SIM_SEED must be a number");
        let stats = run(seed).unwrap_or_else(|failure| panic!("SIM_SEED={seed} failed: {failure}"));
        eprintln!("{name}: seed {seed}: {stats:?}");
        return None;
    }
    let seeds: u64 = std::env::var(count_variable)
        .map(|count| {
            count
                .parse()
                .unwrap_or_else(|_| panic!("{count_variable} must be a number"))
        })
        .unwrap_or(seeds_default);
    let first: u64 = std::env::var("SIM_SEEDS_FROM").map_or(0, |first| {
        first
            .parse()
            .unwrap_or_else(|_| panic!("SIM_SEEDS_FROM must be a number"))
    });
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let results: Vec<(u64, Result<S, String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|worker| {
                scope.spawn(move || {
                    (first..first.saturating_add(seeds))
                        .filter(|seed| seed % threads == worker)
                        .map(|seed| (seed, run(seed)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    let mut failed: Vec<u64> = results
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(seed, _)| *seed)
        .collect();
    failed.sort_unstable();
    let first = failed.first().copied();
    if let Some((seed, Err(failure))) = results.iter().find(|(seed, _)| Some(*seed) == first) {
        let listed: Vec<String> = failed.iter().take(20).map(u64::to_string).collect();
        panic!(
            "{} of {seeds} seeds failed ({}{}); first: seed {seed}: {failure}\nreplay with SIM_SEED={seed}",
            failed.len(),
            listed.join(", "),
            if failed.len() > listed.len() {
                ", ..."
            } else {
                ""
            },
        );
    }
    let stats = results
        .into_iter()
        .map(|(_, result)| result.expect("no failures"))
        .collect();
    Some((seeds, stats))
}

/// Tokens in the simulations are `user:device` in decimal.
pub struct SimAuth;

impl Authenticator for SimAuth {
    fn authenticate(&self, token: &[u8], device: u32, _now: u64) -> Result<UserId, AuthFailure> {
        std::str::from_utf8(token)
            .ok()
            .and_then(|t| t.split_once(':'))
            .filter(|(_, d)| d.parse() == Ok(device))
            .and_then(|(u, _)| u.parse().ok())
            .ok_or(AuthFailure {
                code: ErrorCode::Unauthenticated,
                reason: "bad simulated token".into(),
            })
    }
}

/// Every committed pair whose key starts with `prefix` (a checker looking, past any fault).
#[allow(dead_code)] // Only the simulations read the store directly.
pub fn dump_prefix<S: courier_core::store::Store>(
    store: &S,
    prefix: &[u8],
) -> Vec<courier_core::store::KeyValue> {
    // The first key past the prefix: its last byte below 0xff raised by one.
    let mut end = prefix.to_vec();
    while end.last() == Some(&0xff) {
        end.pop();
    }
    let Some(last) = end.last_mut() else {
        panic!("a prefix of 0xff bytes only has no end: {prefix:?}");
    };
    *last += 1;
    use courier_core::store::Transaction;
    store
        .begin_read()
        .and_then(|mut transaction| transaction.get_range(prefix, &end, usize::MAX))
        .expect("read the store")
}
