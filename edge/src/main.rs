//! `courier-edge`: the Courier edge server. See `courier-edge --help`.

fn main() -> std::process::ExitCode {
    courier_edge::cli::main(std::env::args_os())
}
