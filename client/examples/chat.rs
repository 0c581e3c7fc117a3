//! Chat in a terminal. Run the edge, mint a token for each person, then in two terminals:
//!
//! ```sh
//! cargo run --release -p courier-client --example chat -- --token "$(cargo run -q --release -p courier-edge -- token --user 1)" --to 2
//! cargo run --release -p courier-client --example chat -- --token "$(cargo run -q --release -p courier-edge -- token --user 2)" --to 1
//! ```
//!
//! Each line you type is sent to `--to`; messages for you are printed as they arrive, and the
//! ones that arrived while you were away are printed when you connect.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use courier_client::{ConnectOptions, Connector, Incoming};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(about = "Chat through a Courier edge")]
struct Args {
    /// The edge's QUIC address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    addr: SocketAddr,
    /// PEM certificate to trust (the edge writes its development certificate here).
    #[arg(long, default_value = "courier-data/tls/cert.pem")]
    cert: PathBuf,
    /// Server name to check the certificate against.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Token from `courier-edge token --user N`.
    #[arg(long)]
    token: String,
    /// Device number the token was minted for.
    #[arg(long, default_value_t = 0)]
    device: u32,
    /// User to send each line to.
    #[arg(long)]
    to: u64,
}

#[tokio::main]
async fn main() {
    if let Err(error) = run(Args::parse()).await {
        eprintln!("chat: {error}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let pem = std::fs::read(&args.cert)
        .map_err(|e| format!("cannot read {}: {e}", args.cert.display()))?;
    let connector = Connector::new(&pem, &args.server_name).map_err(|e| e.to_string())?;
    let mut client = connector
        .connect(ConnectOptions::new(
            args.addr,
            args.token.trim(),
            args.device,
        ))
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "connected as user {}; type a line and press enter to send it to {}",
        client.user(),
        args.to
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line.map_err(|e| e.to_string())? {
                Some(line) if !line.is_empty() => {
                    let receipt = client.send(args.to, line.into_bytes()).await.map_err(|e| e.to_string())?;
                    eprintln!("  (stored as #{} in {}'s inbox)", receipt.seq, args.to);
                }
                Some(_) => {}
                None => return Ok(()),
            },
            incoming = client.recv() => match incoming {
                Some(Incoming::Message(message)) => {
                    println!("{}: {}", message.from, String::from_utf8_lossy(&message.body));
                }
                Some(Incoming::Signal { from, kind, .. }) => eprintln!("  ({from}: {kind:?})"),
                None => return Err("connection closed".into()),
            },
        }
    }
}
