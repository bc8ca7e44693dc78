//! `devnet`: a bitcoind-compatible regtest node for tests and demos.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use devnet::{Config, Node, RpcAuth, Topic, ZmqBind};

/// A bitcoind-compatible regtest node.
#[derive(Parser, Debug)]
#[command(name = "devnet", version)]
struct Args {
    /// Data directory (state in DIR/regtest/).
    #[arg(long)]
    datadir: PathBuf,
    /// RPC and REST address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    rpc_bind: SocketAddr,
    /// One ZMQ address for all topics (host:port or tcp://host:port; port 0 picks one;
    /// "none" disables ZMQ).
    #[arg(long, default_value = "127.0.0.1:0")]
    zmq: String,
    /// XOR-obfuscate block files with a random xor.dat key.
    #[arg(long)]
    xor: bool,
    /// RPC user (with --rpcpassword) instead of the cookie file.
    #[arg(long, requires = "rpcpassword")]
    rpcuser: Option<String>,
    /// RPC password.
    #[arg(long, requires = "rpcuser")]
    rpcpassword: Option<String>,
    /// Seconds during which every RPC call answers -28 (loading).
    #[arg(long, default_value_t = 0)]
    warmup_secs: u64,
    /// Filler transactions per mined block.
    #[arg(long, default_value_t = 20)]
    fillers: usize,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVNET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("devnet: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::new(&args.datadir);
    config.rpc_bind = args.rpc_bind;
    config.zmq_bind = match args.zmq.as_str() {
        "none" => None,
        z if z.contains("://") => Some(ZmqBind::All(z.to_string())),
        z => Some(ZmqBind::All(format!("tcp://{z}"))),
    };
    config.xor_blocks = args.xor;
    if let (Some(user), Some(password)) = (args.rpcuser, args.rpcpassword) {
        config.rpc_auth = RpcAuth::UserPass { user, password };
    }
    config.warmup = Duration::from_secs(args.warmup_secs);
    config.filler_txs = args.fillers;

    let mut node = Node::start(config)?;
    let zmq = node
        .zmq_endpoint(Topic::RawBlock)
        .unwrap_or_else(|| "none".into());
    println!(
        "devnet ready rpc={} zmq={} datadir={}",
        node.rpc_url().trim_end_matches('/'),
        zmq,
        args.datadir.display()
    );
    use std::io::Write;
    std::io::stdout().flush()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut stop = node.stop_requested();
    runtime.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        Ok::<(), std::io::Error>(())
    })?;
    node.shutdown();
    Ok(())
}
