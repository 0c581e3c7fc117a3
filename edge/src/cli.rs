//! The `courier-edge` command line. `main.rs` calls [`main`]; the load generator calls it too,
//! to run an edge in a child process of its own binary.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::{auth, server};

#[derive(Parser)]
#[command(
    name = "courier-edge",
    version,
    about = "Courier chat-messaging edge gateway"
)]
struct Cli {
    /// Log lines as `text` (colours only on a terminal) or `json` (one object per line);
    /// overrides `log.format`. Which events: `RUST_LOG` (overrides `log.filter`).
    #[arg(long, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge. Without --config it runs on built-in defaults: QUIC on 127.0.0.1:4433,
    /// data in ./courier-data, the embedded store, one shard per core.
    Serve {
        /// TOML config file (see `print-default-config`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Mint a token signed with the configured key (the development key by default).
    Token {
        #[arg(long)]
        config: Option<PathBuf>,
        /// User id (a positive 64-bit number).
        #[arg(long)]
        user: u64,
        /// Device number of the user, 0 to 63.
        #[arg(long, default_value_t = 0)]
        device: u32,
        /// `user` or `agent`.
        #[arg(long, default_value = "user")]
        role: auth::Role,
        /// Lifetime, like 90s, 30m, 24h or 7d.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// Generate a new token-signing key (Ed25519) into a new file readable only by its owner,
    /// and print its public key with the steps to rotate to it.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// The key id it will be known by (`auth.signing_key_id`, `auth.verify_keys`).
        #[arg(long)]
        key_id: u32,
    },
    /// Print the `[[auth.verify_keys]]` entry of an existing token-signing key: what the
    /// edges keep accepting while tokens it signed are still valid, after a rotation made
    /// another key the signing key.
    PublicKey {
        /// The signing key file (as `auth.signing_key_path` names it).
        #[arg(long)]
        key: PathBuf,
        /// The id tokens it signed carry (its `auth.signing_key_id`).
        #[arg(long)]
        key_id: u32,
    },
    /// Print the built-in configuration as TOML, every key with its default.
    PrintDefaultConfig,
    /// Check a config file and exit 0 if it is valid.
    CheckConfig { path: PathBuf },
    /// Ask a running edge, over its local control socket (`control.socket`, by default
    /// `control.sock` in the data directory).
    Ctl {
        /// The edge's config file, to find its control socket.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The control socket itself (overrides --config).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the edge's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: CtlAction,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Each shard's connections, queued requests and state.
    Status,
    /// Drain and stop the edge, as SIGTERM does: refuse new connections, finish commits,
    /// tell clients to reconnect.
    Drain,
    /// List a user's connections: shard, device, peer address, how long open.
    Connections {
        #[arg(long)]
        user: u64,
    },
    /// Close every connection of a user with `Disconnected` (not retryable: the app decides
    /// whether to log in again). Revoke the user's tokens too if they must stay out.
    Disconnect {
        #[arg(long)]
        user: u64,
    },
    /// Erasure on request: disconnect a user, then delete their inbox (every stored message
    /// to them), their device records, dedupe records and inbox counter. Gone from disk within
    /// `retention.erase_within_secs`. Messages they sent to others stay in those inboxes.
    Purge {
        #[arg(long)]
        user: u64,
        /// Confirm: a purge cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

/// Parses `args` (program name first) and runs the command.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        // `--help` and `--version` print and succeed. A usage error exits 1, as any other
        // that needs an operator: clap's own 2 is `serve`'s "shutdown incomplete", which a
        // supervisor restarts (into the same error).
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(1);
        }
    };
    // `serve` logs as its config says; a config that does not load is reported below.
    let log = match &cli.command {
        Command::Serve { config: Some(path) } => {
            Config::load(path).map(|c| c.log).unwrap_or_default()
        }
        _ => crate::config::LogSection::default(),
    };
    let format = cli
        .log_format
        .or_else(|| log.format.parse().ok())
        .unwrap_or(LogFormat::Text);
    init_logging(format, &log.filter);
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("courier-edge: {error}");
            ExitCode::from(1)
        }
    }
}

/// Replaces the log filter while the edge runs (SIGHUP), when `RUST_LOG` does not set it.
type SetLogFilter = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;
static SET_LOG_FILTER: std::sync::OnceLock<SetLogFilter> = std::sync::OnceLock::new();

/// Applies `filter` (RUST_LOG syntax) to the running logger. `RUST_LOG`, when set, wins.
pub fn set_log_filter(filter: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("log.filter {filter:?}: {e}"))?;
    match SET_LOG_FILTER.get() {
        Some(set) => set(filter),
        None => Ok(()),
    }
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` or else `filter`. Colours only when
/// stderr is a terminal: a file or a log collector gets plain text.
fn init_logging(format: LogFormat, filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match format {
        LogFormat::Text => {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = SET_LOG_FILTER.set(Box::new(move |filter| {
                handle.reload(filter).map_err(|e| e.to_string())
            }));
            builder.init();
        }
        LogFormat::Json => {
            let builder = tracing_subscriber::fmt()
                .json()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = SET_LOG_FILTER.set(Box::new(move |filter| {
                handle.reload(filter).map_err(|e| e.to_string())
            }));
            builder.init();
        }
    }
}

fn load(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(path) => Config::load(path).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

/// Runs `courier-edge ctl`: one request to the running edge, its answer printed.
fn ctl(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    json: bool,
    action: CtlAction,
) -> Result<(), String> {
    use crate::control::{Answer, Command as Request};
    let socket = match socket {
        Some(socket) => socket,
        None => load(config.as_ref())?.control_socket_path(),
    };
    let request = match action {
        CtlAction::Status => Request::Status,
        CtlAction::Drain => Request::Drain,
        CtlAction::Connections { user } => Request::Connections { user },
        CtlAction::Disconnect { user } => Request::Disconnect { user },
        CtlAction::Purge { user, yes } => {
            if !yes {
                return Err(format!(
                    "a purge erases every message to user {user} and their devices for good; \
                     run it again with --yes"
                ));
            }
            Request::Purge { user }
        }
    };
    let answer = crate::control::request(&socket, &request)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).map_err(|e| e.to_string())?
        );
        return match answer {
            Answer::Error { message } => Err(message),
            _ => Ok(()),
        };
    }
    match answer {
        Answer::Status { version, shards } => {
            println!("courier-edge {version}, {} shard(s)", shards.len());
            println!("shard  connections  unauthenticated  queued  state");
            for s in shards {
                let state = match (s.draining, s.store_recovering) {
                    (true, _) => "draining",
                    (false, true) => "store reopening",
                    (false, false) => "serving",
                };
                println!(
                    "{:>5}  {:>11}  {:>15}  {:>6}  {state}",
                    s.shard, s.connections, s.unauthenticated, s.queued_requests
                );
            }
        }
        Answer::Draining => println!("draining: the edge stops once its commits are done"),
        Answer::Connections { user, connections } => {
            println!("user {user}: {} connection(s)", connections.len());
            for c in connections {
                println!(
                    "  shard {} device {} from {} open {} s",
                    c.shard, c.device, c.peer, c.open_secs
                );
            }
        }
        Answer::Disconnected { user, connections } => {
            println!("user {user}: closed {connections} connection(s)")
        }
        Answer::Purged {
            user,
            connections_closed,
        } => println!(
            "user {user}: closed {connections_closed} connection(s) and erased the inbox \
             (gone from disk within retention.erase_within_secs); its devices start again \
             after the erased messages"
        ),
        Answer::Error { message } => return Err(message),
    }
    Ok(())
}

fn try_main(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Ctl {
            config,
            socket,
            json,
            action,
        } => ctl(config, socket, json, action),
        Command::Serve { config } => server::serve(load(config.as_ref())?, config),
        Command::Token {
            config,
            user,
            device,
            role,
            ttl,
        } => {
            let config = load(config.as_ref())?;
            if user == 0 {
                return Err("--user must be positive: 0 is reserved".into());
            }
            if device > courier_protocol::DEVICE_ID_MAX {
                return Err(format!(
                    "--device must be at most {}",
                    courier_protocol::DEVICE_ID_MAX
                ));
            }
            let ttl_secs = auth::parse_duration_secs(&ttl)?;
            let (key, generated) = auth::load_or_create_signing_key(&config)?;
            if generated {
                eprintln!(
                    "generated a development token-signing key in {}",
                    auth::signing_key_path(&config).display()
                );
            }
            let now_secs = courier_core::clock::wall_clock_ms() / 1000;
            let claims = auth::Claims {
                key_id: config.auth.signing_key_id,
                user,
                device,
                role,
                expires_at_secs: now_secs.saturating_add(ttl_secs),
            };
            println!("{}", auth::mint(&key, &claims));
            Ok(())
        }
        Command::Keygen { out, key_id } => {
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
            let key = courier_protocol::token::SigningKey::from_bytes(&seed);
            crate::files::write_private_file(
                &out,
                courier_protocol::token::signing_key_to_base64(&key).as_bytes(),
            )?;
            let public = courier_protocol::token::verifying_key_to_base64(&key.verifying_key());
            println!(
                "wrote a new token-signing key to {} (readable by its owner only)\n\
                 \n\
                 To rotate to it (docs/operations.md, \"Rotating the token-signing key\"):\n\
                 1. On every edge, accept tokens it signs, then send the edge SIGHUP:\n\
                 \n\
                 [[auth.verify_keys]]\n\
                 id = {key_id}\n\
                 public_key = \"{public}\"\n\
                 \n\
                 2. Where tokens are minted, set auth.signing_key_path = \"{}\" and\n\
                 \x20  auth.signing_key_id = {key_id} (the entry above may stay), and add the\n\
                 \x20  old key's entry, which `courier-edge public-key --key OLD_KEY_FILE\n\
                 \x20  --key-id OLD_ID` prints, so that its tokens are still accepted.\n\
                 3. Once every token signed with the old key has expired, remove its entry.",
                out.display(),
                out.display()
            );
            Ok(())
        }
        Command::PublicKey { key, key_id } => {
            let key = auth::read_signing_key(&key)?;
            let public = courier_protocol::token::verifying_key_to_base64(&key.verifying_key());
            println!("[[auth.verify_keys]]\nid = {key_id}\npublic_key = \"{public}\"");
            Ok(())
        }
        Command::PrintDefaultConfig => {
            print!("{}", Config::default_toml());
            Ok(())
        }
        Command::CheckConfig { path } => {
            let config = Config::load(&path).map_err(|e| e.to_string())?;
            // Everything `serve` checks before it starts: files, keys, the data directory, and
            // the store's layout (fixed once written).
            server::preflight(&config)?;
            println!("{}: ok", path.display());
            Ok(())
        }
    }
}
