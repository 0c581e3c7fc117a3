//! `courier-edge`: the Courier edge server. See `courier-edge --help`.

/// mimalloc instead of glibc's malloc: glibc grows and trims each thread's arena a page at a
/// time (an `mprotect` per page and TLB shootdowns on every core), which showed as ~1 `mprotect`
/// per delivered message (docs/decisions/0008-per-shard-stores.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    courier_edge::cli::main(std::env::args_os())
}
