//! The binary: ready line, kill -9 and restart from the same data directory, SIGTERM.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use devnet::client::RpcClient;
use serde_json::json;

fn spawn(datadir: &std::path::Path) -> (Child, String) {
    let bin = devnet::binary_path();
    assert!(bin.exists(), "{} not built", bin.display());
    let mut child = Command::new(bin)
        .args([
            "--datadir",
            datadir.to_str().unwrap(),
            "--xor",
            "--zmq",
            "127.0.0.1:0",
            "--fillers",
            "5",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("devnet ready rpc=http://127.0.0.1:"),
        "{line}"
    );
    assert!(line.contains(" zmq=tcp://127.0.0.1:"), "{line}");
    assert!(
        line.trim_end()
            .ends_with(&format!("datadir={}", datadir.display())),
        "{line}"
    );
    let url = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rpc="))
        .unwrap()
        .to_string();
    (child, url)
}

fn client(url: &str, datadir: &std::path::Path) -> RpcClient {
    RpcClient::with_cookie(url, &datadir.join("regtest/.cookie")).unwrap()
}

#[test]
fn kill_and_restart_keeps_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = spawn(dir.path());
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("regtest/devnet.json")).unwrap())
            .unwrap();
    assert_eq!(info["rpc_url"], json!(format!("{url}/")));
    let rpc = client(&url, dir.path());
    let addr = rpc.call("getnewaddress", json!([])).unwrap();
    rpc.call("generatetoaddress", json!([105, addr])).unwrap();
    let best = rpc.call("getbestblockhash", json!([])).unwrap();
    let balance = rpc.call("getbalance", json!([])).unwrap();

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (mut child, url) = spawn(dir.path());
    let rpc = client(&url, dir.path());
    assert_eq!(rpc.call("getblockcount", json!([])).unwrap(), json!(105));
    assert_eq!(rpc.call("getbestblockhash", json!([])).unwrap(), best);
    assert_eq!(
        rpc.call("getbalance", json!([])).unwrap(),
        balance,
        "the wallet survives"
    );
    rpc.call("generatetoaddress", json!([2, addr])).unwrap();
    assert_eq!(rpc.call("getblockcount", json!([])).unwrap(), json!(107));

    // SIGTERM: a clean exit that removes the cookie.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success());
    assert!(!dir.path().join("regtest/.cookie").exists());

    let (mut child, url) = spawn(dir.path());
    let rpc = client(&url, dir.path());
    assert_eq!(rpc.call("getblockcount", json!([])).unwrap(), json!(107));
    assert_eq!(
        rpc.call("stop", json!([])).unwrap(),
        json!("Bitcoin Core stopping")
    );
    assert!(child.wait().unwrap().success());
}
