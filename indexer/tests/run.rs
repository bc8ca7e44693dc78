//! `indexer run` as a process: follows a devnet node (RPC, REST and ZMQ on 127.0.0.1
//! ephemeral ports) given only by flags, serves gRPC while doing it, answers a deposit as
//! unconfirmed then confirmed, and exits cleanly on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;

const BIN: &str = env!("CARGO_BIN_EXE_indexer");

/// The `indexer run` child, killed if the test fails before it stops it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn rpc(node: &devnet::NodeHandle, method: &str, params: serde_json::Value) -> serde_json::Value {
    let client = indexer::daemon::RpcClient::new(
        &node.rpc_url(),
        indexer::daemon::Auth::Cookie(node.cookie_file().unwrap()),
        Duration::from_secs(60),
    );
    client.call(method, params).unwrap()
}

#[test]
fn run_follows_the_node_serves_grpc_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    // No filler traffic: the node's wallet would spend the watched coinbases.
    let mut config = devnet::Config::new(tmp.path().join("node"));
    config.filler_txs = 0;
    let node = devnet::Node::start(config).unwrap();
    let address = rpc(&node, "getnewaddress", serde_json::json!([]));
    let address = address.as_str().unwrap();
    rpc(
        &node,
        "generatetoaddress",
        serde_json::json!([105, address]),
    );
    let db = tmp.path().join("db");
    let common = ["--db", db.to_str().unwrap(), "--network", "regtest"];
    let added = Command::new(BIN)
        .args(common)
        .args(["watch", "add", "--wallet", "hot", address])
        .output()
        .unwrap();
    assert!(added.status.success());
    let deposit = rpc(&node, "getnewaddress", serde_json::json!([]));
    let deposit = deposit.as_str().unwrap();
    let added = Command::new(BIN)
        .args(common)
        .args(["watch", "add", "--wallet", "deposits", deposit])
        .output()
        .unwrap();
    assert!(added.status.success());

    let zmq = node.zmq_endpoint(devnet::Topic::RawBlock).unwrap();
    let mut run = Running(
        Command::new(BIN)
            .args(common)
            .args(["run", "--grpc", "127.0.0.1:0"])
            .args(["--bitcoind-rpc-url", &node.rpc_url()])
            .args([
                "--bitcoind-cookie-file",
                node.cookie_file().unwrap().to_str().unwrap(),
            ])
            .args(["--bitcoind-rest", "true"])
            .args([
                "--zmq-rawblock",
                &zmq,
                "--zmq-sequence",
                &zmq,
                "--zmq-rawtx",
                &zmq,
            ])
            .env("INDEXER_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(run.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("listening\t").unwrap().to_owned();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut client = rt
        .block_on(IndexerClient::connect(format!("http://{addr}")))
        .unwrap();
    let balance = |client: &mut IndexerClient<_>, wallet: &str| {
        rt.block_on(client.get_balance(pb::GetBalanceRequest {
            target: Some(pb::Target {
                target: Some(pb::target::Target::Wallet(wallet.into())),
            }),
            min_conf: 0,
        }))
        .unwrap()
        .into_inner()
    };
    let until = |client: &mut IndexerClient<_>,
                 wallet: &str,
                 f: &dyn Fn(&pb::GetBalanceResponse) -> bool| {
        let started = Instant::now();
        loop {
            let b = balance(client, wallet);
            if f(&b) {
                return b;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "stuck at {b:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Caught up: 5 mature coinbases of 50 BTC, 100 immature.
    let b = until(&mut client, "hot", &|b| b.height == 105);
    assert_eq!(b.confirmed_sat, 5 * 5_000_000_000, "{b:?}");
    assert_eq!(b.immature_sat, 100 * 5_000_000_000);

    let other = rpc(&node, "getnewaddress", serde_json::json!([]));
    let sent = rpc(&node, "sendtoaddress", serde_json::json!([deposit, 1.5]));
    assert!(sent.is_string());
    let b = until(&mut client, "deposits", &|b| b.unconfirmed_sat > 0);
    assert_eq!((b.unconfirmed_sat, b.confirmed_sat), (150_000_000, 0));
    rpc(&node, "generatetoaddress", serde_json::json!([1, other]));
    let b = until(&mut client, "deposits", &|b| b.height == 106);
    assert_eq!((b.unconfirmed_sat, b.confirmed_sat), (0, 150_000_000));

    // SIGTERM: finishes what it has and exits 0.
    let killed = Command::new("kill")
        .args(["-TERM", &run.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let status = loop {
        if let Some(s) = run.0.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn run_exits_with_one_clear_line_when_bitcoind_never_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let common = ["--db", db.to_str().unwrap(), "--network", "regtest"];
    let added = Command::new(BIN)
        .args(common)
        .args(["watch", "add", "--wallet", "hot"])
        .arg("bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080")
        .output()
        .unwrap();
    assert!(added.status.success());
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cookie = tmp.path().join(".cookie");
    std::fs::write(&cookie, "__cookie__:secret").unwrap();
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(common)
        .args(["run", "--grpc", "127.0.0.1:0"])
        .args(["--bitcoind-rpc-url", &format!("http://127.0.0.1:{port}/")])
        .args(["--bitcoind-cookie-file", cookie.to_str().unwrap()])
        .args(["--bitcoind-startup-wait-secs", "1"])
        .env("INDEXER_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(lines[0].contains("unreachable"), "{stderr}");
    assert!(lines[0].contains("rpc_url"), "{stderr}");
}
