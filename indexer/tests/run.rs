//! `indexer run` as a process: follows a devnet node (RPC, REST and ZMQ on 127.0.0.1
//! ephemeral ports) given only by flags, serves gRPC while doing it, answers a deposit as
//! unconfirmed then confirmed, and exits cleanly on SIGTERM; its metrics endpoint shows
//! what it does, and its JSON logs parse.

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

/// Sends SIGTERM and waits for the exit.
fn terminate(run: &mut Running) -> std::process::ExitStatus {
    let killed = Command::new("kill")
        .args(["-TERM", &run.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    loop {
        if let Some(s) = run.0.try_wait().unwrap() {
            return s;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `indexer run` with `common` flags, following `node` over RPC, REST and ZMQ, serving
/// gRPC on an ephemeral port and printing to a pipe.
fn run_command(node: &devnet::NodeHandle, common: &[&str]) -> Command {
    let zmq = node.zmq_endpoint(devnet::Topic::RawBlock).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(common)
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
        .stdout(Stdio::piped());
    cmd
}

fn rpc(node: &devnet::NodeHandle, method: &str, params: serde_json::Value) -> serde_json::Value {
    let client = bitcoind::RpcClient::new(
        &node.rpc_url(),
        bitcoind::Auth::Cookie(node.cookie_file().unwrap()),
        Duration::from_secs(60),
    );
    client.call(method, params).unwrap()
}

/// A devnet node in `dir` at height 105, its blocks paid to the returned address, which an
/// index at `dir/db` watches as wallet `hot`.
fn node_at_105(dir: &std::path::Path) -> (devnet::NodeHandle, String) {
    // No filler traffic: the node's wallet would spend the watched coinbases.
    let mut config = devnet::Config::new(dir.join("node"));
    config.filler_txs = 0;
    let node = devnet::Node::start(config).unwrap();
    let address = rpc(&node, "getnewaddress", serde_json::json!([]));
    let address = address.as_str().unwrap().to_owned();
    rpc(
        &node,
        "generatetoaddress",
        serde_json::json!([105, address]),
    );
    let db = dir.join("db");
    let added = Command::new(BIN)
        .args(["--db", db.to_str().unwrap(), "--network", "regtest"])
        .args(["watch", "add", "--wallet", "hot", &address])
        .output()
        .unwrap();
    assert!(added.status.success());
    (node, address)
}

#[test]
fn run_follows_the_node_serves_grpc_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let (node, _) = node_at_105(tmp.path());
    let db = tmp.path().join("db");
    let common = ["--db", db.to_str().unwrap(), "--network", "regtest"];
    let deposit = rpc(&node, "getnewaddress", serde_json::json!([]));
    let deposit = deposit.as_str().unwrap();
    let added = Command::new(BIN)
        .args(common)
        .args(["watch", "add", "--wallet", "deposits", deposit])
        .output()
        .unwrap();
    assert!(added.status.success());

    let mut run = Running(
        run_command(&node, &common)
            .env("INDEXER_LOG", "warn")
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
    let status = terminate(&mut run);
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

/// `indexer run --metrics-listen 127.0.0.1:0 --log-format json` on a node at height 105:
/// 1. it prints `metrics<TAB>ADDR`; `/health` answers 200 "ok" and `/ready` 200 once the
///    index has caught up;
/// 2. every key series is there, at the node's height with no lag;
/// 3. a `GetTip` call shows in the latency histogram of its method, an open `Subscribe` in
///    the subscribers until it is dropped;
/// 4. three blocks mined: the height and the blocks connected go up by exactly 3, the
///    transactions by the blocks' own count;
/// 5. the last two blocks invalidated and three mined on another branch: one reorg of depth
///    2, two blocks disconnected, at least one reconciliation;
/// 6. after SIGTERM, every line on stderr is a JSON object with a level and a message, and
///    none holds the node's cookie secret.
#[test]
fn run_serves_metrics_that_follow_the_chain_and_logs_json() {
    use system_tests::observe::{self, Scrape};
    let tmp = tempfile::tempdir().unwrap();
    let (node, miner) = node_at_105(tmp.path());
    let miner = miner.as_str();
    let db = tmp.path().join("db");
    let common = ["--db", db.to_str().unwrap(), "--network", "regtest"];
    let stderr = tmp.path().join("stderr");
    let mut run = Running(
        run_command(&node, &common)
            .args(["--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
            .env("INDEXER_LOG", "info")
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let observe::Announced { metrics, grpc } = observe::announced(run.0.stdout.take().unwrap());

    // 1.
    assert_eq!(observe::get(&metrics, "/health"), (200, "ok\n".to_owned()));
    observe::wait_for_status(&metrics, "/ready", 200, Duration::from_secs(60));

    // 2.
    let at = |height: f64| move |s: &Scrape| s.value("indexer_indexed_height") == height;
    let before = observe::wait_for(&metrics, Duration::from_secs(30), at(105.0));
    assert_eq!(before.value("indexer_bitcoind_height"), 105.0);
    assert_eq!(before.value("indexer_tip_lag_blocks"), 0.0);
    for series in [
        "indexer_blocks_connected_total",
        "indexer_transactions_total",
        "indexer_blocks_disconnected_total",
        "indexer_reorgs_total",
        "indexer_reorg_depth_count",
        "indexer_tip_latency_seconds_count",
        "indexer_reconciles_total",
        "indexer_subscribers",
        "indexer_pipeline_queue_depth{stage=\"parse\"}",
        "indexer_pipeline_queue_depth{stage=\"filter\"}",
        "indexer_pipeline_queue_depth{stage=\"apply\"}",
        "indexer_pipeline_queue_depth{stage=\"write\"}",
        "indexer_zmq_gaps_total{topic=\"rawblock\"}",
        "indexer_zmq_gaps_total{topic=\"sequence\"}",
    ] {
        before.value(series); // panics when absent
    }

    // 3.
    let get_tip =
        "indexer_grpc_request_duration_seconds_count{method=\"/indexer.v1.Indexer/GetTip\"}";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut client = rt
        .block_on(IndexerClient::connect(format!("http://{grpc}")))
        .unwrap();
    let tip = rt
        .block_on(client.get_tip(pb::GetTipRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(tip.height, 105);
    let called = Scrape::from(&metrics);
    assert_eq!(called.value(get_tip), before.value_or_zero(get_tip) + 1.0);
    let stream = rt
        .block_on(client.subscribe(pb::SubscribeRequest {
            from_offset: 0,
            ..Default::default()
        }))
        .unwrap();
    observe::wait_for(&metrics, Duration::from_secs(30), |s| {
        s.value("indexer_subscribers") == 1.0
    });
    drop(stream);
    observe::wait_for(&metrics, Duration::from_secs(30), |s| {
        s.value("indexer_subscribers") == 0.0
    });

    // 4.
    let mined = rpc(&node, "generatetoaddress", serde_json::json!([3, miner]));
    let txs: f64 = mined
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            rpc(&node, "getblockheader", serde_json::json!([h]))["nTx"]
                .as_f64()
                .unwrap()
        })
        .sum();
    // A block's latency is observed just after it is readable: wait for both.
    let latencies = "indexer_tip_latency_seconds_count";
    let after = observe::wait_for(&metrics, Duration::from_secs(30), |s| {
        at(108.0)(s) && s.value(latencies) >= before.value(latencies) + 3.0
    });
    let grew = |series: &str| after.value(series) - before.value(series);
    assert_eq!(grew("indexer_blocks_connected_total"), 3.0);
    // Each came over ZMQ and extended the tip: one latency each, none of them zero.
    assert_eq!(grew(latencies), 3.0, "{}", after.text);
    assert!(grew("indexer_tip_latency_seconds_sum") > 0.0);
    assert_eq!(grew("indexer_transactions_total"), txs);
    assert_eq!(after.value("indexer_bitcoind_height"), 108.0);

    // 5.
    let doomed = rpc(&node, "getblockhash", serde_json::json!([107]));
    rpc(&node, "invalidateblock", serde_json::json!([doomed]));
    // Another payee, or the node would mine the invalidated blocks again.
    let other = rpc(&node, "getnewaddress", serde_json::json!([]));
    rpc(&node, "generatetoaddress", serde_json::json!([3, other]));
    let reorged = observe::wait_for(&metrics, Duration::from_secs(30), |s| {
        s.value("indexer_indexed_height") == 109.0
            && s.value("indexer_blocks_connected_total")
                == after.value("indexer_blocks_connected_total") + 3.0
    });
    let grew = |series: &str| reorged.value(series) - after.value(series);
    assert_eq!(grew("indexer_reorgs_total"), 1.0);
    assert_eq!(grew("indexer_reorg_depth_count"), 1.0);
    assert_eq!(grew("indexer_reorg_depth_sum"), 2.0);
    assert_eq!(grew("indexer_blocks_disconnected_total"), 2.0);
    assert!(grew("indexer_reconciles_total") >= 1.0, "{}", reorged.text);

    // 6.
    let status = terminate(&mut run);
    assert!(status.success(), "{status:?}");
    let logged = std::fs::read_to_string(&stderr).unwrap();
    let cookie = std::fs::read_to_string(node.cookie_file().unwrap()).unwrap();
    let secret = cookie.trim().split_once(':').unwrap().1;
    let messages = observe::json_log_messages(&logged, secret);
    assert!(
        messages.iter().any(|m| m == "connected to bitcoind"),
        "{logged}"
    );
    // Off a terminal, the catch-up's progress is logged, ending with the node's height.
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("caught up: height 105 ")),
        "{messages:?}"
    );
}

/// 1. bitcoind serves no REST (its default, `-rest=0`: 404 under `/rest/`) while the
///    indexer is told `rest = true`.
/// 2. `indexer run` says so once at warn, shows it in `indexer_blocks_over_rest` (0) and
///    in its startup line, and catches up over RPC `getblock` instead of retrying forever.
/// 3. Blocks mined after that are indexed too.
#[test]
fn run_against_a_node_without_rest_warns_once_and_fetches_blocks_over_rpc() {
    use system_tests::observe::{self, Scrape};
    let tmp = tempfile::tempdir().unwrap();
    let (node, miner) = node_at_105(tmp.path());
    rpc(&node, "devnet_setrest", serde_json::json!([false]));
    let db = tmp.path().join("db");
    let common = ["--db", db.to_str().unwrap(), "--network", "regtest"];
    let stderr = tmp.path().join("stderr");
    let mut run = Running(
        run_command(&node, &common)
            .args(["--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
            .env("INDEXER_LOG", "info")
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let observe::Announced { metrics, .. } = observe::announced(run.0.stdout.take().unwrap());
    let at = |height: f64| move |s: &Scrape| s.value("indexer_indexed_height") == height;
    let caught_up = observe::wait_for(&metrics, Duration::from_secs(30), at(105.0));
    assert_eq!(caught_up.value("indexer_blocks_over_rest"), 0.0);
    // Block 106 can only come over RPC when a catch-up fetches it (ZMQ may bring it
    // first); either way it is indexed.
    rpc(&node, "generatetoaddress", serde_json::json!([3, miner]));
    observe::wait_for(&metrics, Duration::from_secs(30), at(108.0));
    let status = terminate(&mut run);
    assert!(status.success(), "{status:?}");
    let logged = std::fs::read_to_string(&stderr).unwrap();
    let cookie = std::fs::read_to_string(node.cookie_file().unwrap()).unwrap();
    let secret = cookie.trim().split_once(':').unwrap().1;
    let messages = observe::json_log_messages(&logged, secret);
    let warned = messages
        .iter()
        .filter(|m| m.starts_with("bitcoind does not serve REST"))
        .count();
    assert_eq!(warned, 1, "{messages:?}");
    let started = logged
        .lines()
        .find(|l| l.contains("connected to bitcoind"))
        .unwrap();
    assert!(started.contains("rpc getblock"), "{started}");
}
