//! `devnet-cli`: calls a running devnet's JSON-RPC like `bitcoin-cli -regtest`, finding it
//! through the `devnet.json` it writes into its data directory.
//!
//! `devnet-cli --datadir DIR METHOD [ARG...]`: each ARG is taken as JSON when it parses
//! (numbers, booleans, arrays, objects), else as a string. A string result prints bare,
//! anything else as JSON; an RPC error prints to stderr with its code and exits 1.

use std::path::PathBuf;

use clap::Parser;
use devnet::client::{ClientError, RpcClient};
use serde_json::Value;

/// Calls a devnet node's JSON-RPC.
#[derive(Parser, Debug)]
#[command(name = "devnet-cli", version)]
struct Args {
    /// The node's data directory (as given to `devnet --datadir`).
    #[arg(long)]
    datadir: PathBuf,
    /// RPC method.
    method: String,
    /// Positional parameters.
    params: Vec<String>,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(Value::String(s)) => println!("{s}"),
        Ok(Value::Null) => {}
        Ok(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        ),
        Err(e) => {
            eprintln!("devnet-cli: {e}");
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<Value, Box<dyn std::error::Error>> {
    let info_path = args.datadir.join("regtest").join("devnet.json");
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(&info_path)
            .map_err(|e| format!("{}: {e} (is the devnet running?)", info_path.display()))?,
    )?;
    let url = info["rpc_url"]
        .as_str()
        .ok_or_else(|| format!("{}: no rpc_url", info_path.display()))?;
    let client = match info["cookie_file"].as_str() {
        Some(cookie) => RpcClient::with_cookie(url, cookie.as_ref())?,
        None => return Err("the node uses user/password auth; use its RPC directly".into()),
    };
    let params: Vec<Value> = args
        .params
        .iter()
        .map(|p| serde_json::from_str(p).unwrap_or_else(|_| Value::String(p.clone())))
        .collect();
    match client.call(&args.method, Value::Array(params)) {
        Ok(v) => Ok(v),
        Err(e @ ClientError::Rpc { .. }) => Err(e.into()),
        Err(e) => Err(format!("{url}: {e}").into()),
    }
}
