//! Following a live node: the devnet (bitcoind's RPC, REST and ZMQ, on 127.0.0.1 ephemeral
//! ports) mines, reorganises and loses notifications; the follower must end on exactly the
//! state a fresh index of the node's own block files gives.
//!
//! Scenarios:
//! 1. 1,000 blocks with transactions (fillers of every script type, payments and coinbases
//!    to watched addresses), caught up over REST and then followed live over ZMQ, with
//!    XOR-obfuscated block files: digest == `rescan --blocks-dir` of the node's files; the
//!    serving threads yield to the catch-up, and only to it.
//! 2. random reorgs (depth 1..20; `FOLLOW_REORGS`, default 200), some while the follower is
//!    still catching up, with ZMQ messages randomly dropped, reordered or garbled: after
//!    each, the follower reaches the node's tip; every 25 and at the end, digest == fresh.
//! 3. without ZMQ (polling), and over RPC hex instead of REST: same digest.
//! 4. a gRPC subscriber that disconnects after a random number of events and resumes from
//!    where it stopped, while the node mines, pays watched addresses and reorganises,
//!    receives every event of the log exactly once, in order.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indexer::follow::FollowOptions;
use indexer::serve_priority;
use indexer::store::Reader;
use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;
use rand::{Rng, SeedableRng};
use serde_json::json;
use system_tests::harness::{script_of, TestWallet};
use system_tests::live::{fresh_digest, Devnet, Following, Indexer};

const WAIT: Duration = Duration::from_secs(60);

/// Node addresses of every kind, split into two wallets sharing one address.
fn watched(node: &Devnet) -> (Vec<String>, Vec<TestWallet>) {
    let kinds = ["bech32", "bech32m", "legacy", "p2sh-segwit"];
    let addresses: Vec<String> = (0..8).map(|i| node.new_address(kinds[i % 4])).collect();
    let mut a = BTreeSet::new();
    let mut b = BTreeSet::new();
    for (i, addr) in addresses.iter().enumerate() {
        if i % 2 == 0 || i == 1 {
            a.insert(script_of(addr));
        }
        if i % 2 == 1 {
            b.insert(script_of(addr));
        }
    }
    let wallets = vec![
        TestWallet {
            name: "hot".into(),
            scripts: a,
        },
        TestWallet {
            name: "cold".into(),
            scripts: b,
        },
    ];
    (addresses, wallets)
}

/// Mines `n` blocks to rotating watched addresses, paying some of them from the node's
/// wallet on the way.
fn activity(node: &Devnet, addresses: &[String], rng: &mut impl Rng, n: u32) {
    let mut left = n;
    while left > 0 {
        let step = rng.gen_range(1..=5).min(left);
        if rng.gen_bool(0.5) {
            let to = &addresses[rng.gen_range(0..addresses.len())];
            let btc = rng.gen_range(1..200) as f64 / 100.0;
            // May fail while the node's wallet has no mature coins yet.
            let _ = node.try_call("sendtoaddress", json!([to, btc]));
        }
        node.mine_to(step, &addresses[rng.gen_range(0..addresses.len())]);
        left -= step;
    }
}

#[test]
fn follows_a_thousand_blocks_to_the_digest_of_the_nodes_own_block_files() {
    let node = Devnet::start(|c| {
        c.xor_blocks = true;
        c.filler_txs = 8;
    });
    let (addresses, wallets) = watched(&node);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    // A backlog to catch up on (coinbases to watched addresses fund the fillers).
    activity(&node, &addresses, &mut rng, 300);
    // A catch-up this long runs with the serving threads yielding the CPU to it.
    let runs = serve_priority::flat_out_runs();
    let db = tempfile::tempdir().unwrap();
    let f = Following::start(
        node.daemon(true),
        Some(&node.zmq()),
        db.path(),
        &wallets,
        FollowOptions::default(),
    );
    assert!(f.wait_for(node.best().1, WAIT), "caught up");
    assert!(
        serve_priority::flat_out_runs() > runs,
        "the catch-up never asked the serving threads to yield"
    );
    // ... and only while it runs.
    let until = std::time::Instant::now() + WAIT;
    while serve_priority::indexing_flat_out() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !serve_priority::indexing_flat_out(),
        "the serving threads still yield after the catch-up"
    );
    // Then live, a few blocks at a time.
    activity(&node, &addresses, &mut rng, 700);
    let (height, tip) = node.best();
    assert_eq!(height, 1000);
    assert!(f.wait_for(tip, WAIT), "followed to the tip");
    let utxos = f.store.utxos().unwrap().len();
    assert!(utxos > 100, "watched activity: {utxos} utxos");
    assert_eq!(
        f.store.digest().unwrap(),
        fresh_digest(&node.blocks_dir(), &wallets)
    );
    f.stop().unwrap();
}

#[test]
fn random_reorgs_and_lost_notifications_end_on_the_fresh_index() {
    let reorgs: u32 = std::env::var("FOLLOW_REORGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let node = Devnet::start(|c| c.filler_txs = 3);
    let (addresses, wallets) = watched(&node);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    activity(&node, &addresses, &mut rng, 150);
    let db = tempfile::tempdir().unwrap();
    let f = Following::start(
        node.daemon(true),
        Some(&node.zmq()),
        db.path(),
        &wallets,
        FollowOptions {
            // Lost messages with no later ones are found by the silence check.
            zmq_silence: Duration::from_millis(500),
            ..FollowOptions::default()
        },
    );
    for i in 0..reorgs {
        let (height, _) = node.best();
        let depth = rng.gen_range(1..=20).min(height - 1);
        let fork_child = node.hash_at(height - depth + 1);
        match rng.gen_range(0..4) {
            0 => node.call(
                "devnet_zmqfaults",
                json!([{"drop_next": rng.gen_range(1..4)}]),
            ),
            1 => node.call("devnet_zmqfaults", json!([{"reorder_next": 2}])),
            2 => node.call("devnet_zmqfaults", json!([{"garbage_next": 1}])),
            _ => json!(null),
        };
        node.call("invalidateblock", json!([fork_child.to_string()]));
        let longer = depth + rng.gen_range(1..=3);
        activity(&node, &addresses, &mut rng, longer);
        // The first ones land while the follower is still catching up.
        if i >= 3 {
            let (h, tip) = node.best();
            assert!(f.wait_for(tip, WAIT), "reorg {i}: reached tip {h} {tip}");
        }
        if i % 25 == 24 {
            let (_, tip) = node.best();
            assert!(f.wait_for(tip, WAIT));
            assert_eq!(
                f.store.digest().unwrap(),
                fresh_digest(&node.blocks_dir(), &wallets),
                "after reorg {i}"
            );
        }
    }
    let (_, tip) = node.best();
    assert!(f.wait_for(tip, WAIT));
    assert_eq!(
        f.store.digest().unwrap(),
        fresh_digest(&node.blocks_dir(), &wallets)
    );
    f.stop().unwrap();
}

#[test]
fn polling_over_rpc_hex_reaches_the_same_state() {
    let node = Devnet::start(|c| c.filler_txs = 5);
    let (addresses, wallets) = watched(&node);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    activity(&node, &addresses, &mut rng, 150);
    let db = tempfile::tempdir().unwrap();
    let f = Following::start(
        node.daemon(false),
        None,
        db.path(),
        &wallets,
        FollowOptions {
            poll_interval: Duration::from_millis(50),
            ..FollowOptions::default()
        },
    );
    for _ in 0..5 {
        activity(&node, &addresses, &mut rng, 10);
        let (height, _) = node.best();
        let depth = rng.gen_range(1..=5);
        node.call(
            "invalidateblock",
            json!([node.hash_at(height - depth + 1).to_string()]),
        );
        activity(&node, &addresses, &mut rng, depth + 1);
        assert!(f.wait_for(node.best().1, WAIT));
    }
    assert_eq!(
        f.store.digest().unwrap(),
        fresh_digest(&node.blocks_dir(), &wallets)
    );
    f.stop().unwrap();
}

/// A free port on 127.0.0.1 (bound, then released for the node to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The devnet binary as a separate process that can be killed, restarted on its ports.
struct NodeProcess {
    child: std::process::Child,
}

impl NodeProcess {
    fn spawn(datadir: &std::path::Path, rpc: u16, zmq: u16) -> NodeProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(devnet::binary_path())
            .args(["--datadir", datadir.to_str().unwrap()])
            .args(["--rpc-bind", &format!("127.0.0.1:{rpc}")])
            .args(["--zmq", &format!("127.0.0.1:{zmq}")])
            .args(["--fillers", "3", "--warmup-secs", "1"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("devnet ready"), "devnet said {line:?}");
        NodeProcess { child }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_killed_and_restarted_node_with_a_new_cookie_is_followed_without_loss() {
    use bitcoind::{Auth, Daemon, RpcClient};
    use indexer::zmq_feed::{Topic, ZmqEndpoints};
    let dir = tempfile::tempdir().unwrap();
    let (rpc_port, zmq_port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{rpc_port}/");
    let cookie = dir.path().join("regtest/.cookie");
    let zmq = format!("tcp://127.0.0.1:{zmq_port}");
    let endpoints = ZmqEndpoints {
        topics: [Topic::RawBlock, Topic::Sequence, Topic::RawTx]
            .into_iter()
            .map(|t| (t, zmq.clone()))
            .collect(),
    };
    let client = || RpcClient::new(&url, Auth::Cookie(cookie.clone()), Duration::from_secs(60));
    let call = |method: &str, params: serde_json::Value| {
        // The node answers -28 while warming up, like bitcoind loading its index.
        for _ in 0..200 {
            match client().call::<serde_json::Value>(method, params.clone()) {
                Ok(v) => return v,
                Err(e) if e.is_transient() => std::thread::sleep(Duration::from_millis(25)),
                Err(e) => panic!("{method}: {e}"),
            }
        }
        panic!("{method}: the node stayed unavailable");
    };
    let best = || {
        let info = call("getblockchaininfo", json!([]));
        bitcoin::BlockHash::from_str(info["bestblockhash"].as_str().unwrap()).unwrap()
    };

    let node = NodeProcess::spawn(dir.path(), rpc_port, zmq_port);
    let address = call("getnewaddress", json!([]))
        .as_str()
        .unwrap()
        .to_owned();
    let wallets = vec![TestWallet {
        name: "hot".into(),
        scripts: BTreeSet::from([script_of(&address)]),
    }];
    call("generatetoaddress", json!([120, address]));
    let db = tempfile::tempdir().unwrap();
    let f = Following::start(
        Daemon::new(
            &url,
            Auth::Cookie(cookie.clone()),
            true,
            Duration::from_secs(10),
        ),
        Some(&endpoints),
        db.path(),
        &wallets,
        FollowOptions {
            max_backoff: Duration::from_millis(500),
            zmq_silence: Duration::from_secs(1),
            ..FollowOptions::default()
        },
    );
    assert!(f.wait_for(best(), WAIT));
    let first_cookie = std::fs::read_to_string(&cookie).unwrap();

    // kill -9: the follower keeps retrying; the restarted node has a new cookie, warms up,
    // and its ZMQ sequence numbers start again at 0.
    drop(node);
    std::thread::sleep(Duration::from_millis(1500));
    let _node = NodeProcess::spawn(dir.path(), rpc_port, zmq_port);
    assert_ne!(std::fs::read_to_string(&cookie).unwrap(), first_cookie);
    call("generatetoaddress", json!([10, address]));
    let height = call("getblockcount", json!([])).as_u64().unwrap();
    let fork = call("getblockhash", json!([height - 4]));
    call("invalidateblock", json!([fork]));
    call("generatetoaddress", json!([8, address]));
    assert!(f.wait_for(best(), WAIT), "followed the restarted node");
    assert_eq!(
        f.store.digest().unwrap(),
        fresh_digest(&dir.path().join("regtest/blocks"), &wallets)
    );
    f.stop().unwrap();
}

#[test]
fn a_subscriber_resuming_at_random_offsets_gets_every_event_once_in_order_across_reorgs() {
    let node = Devnet::start(|c| c.filler_txs = 3);
    let (addresses, wallets) = watched(&node);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    activity(&node, &addresses, &mut rng, 30);
    let db = tempfile::tempdir().unwrap();
    let f = Indexer::caught_up(&node, db.path(), &wallets);
    let served = &f;

    // Where the consumer may stop: unknown until the node is done.
    let end = Arc::new(AtomicU64::new(u64::MAX));
    let consumer = served.runtime.spawn({
        let (channel, end) = (served.channel.clone(), end.clone());
        async move {
            let mut client = IndexerClient::new(channel);
            let mut rng = rand::rngs::StdRng::seed_from_u64(4);
            let mut got: Vec<pb::Event> = Vec::new();
            while (got.len() as u64) < end.load(Ordering::Relaxed) {
                let mut stream = client
                    .subscribe(pb::SubscribeRequest {
                        from_offset: got.len() as u64,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                // At most 10 events a connection: the log is read in many resumed pieces,
                // some of them starting inside a reorg's run of events.
                for _ in 0..rng.gen_range(1..=10) {
                    let next = tokio::time::timeout(Duration::from_millis(200), stream.message());
                    // Nothing new for now: disconnect and come back.
                    let Ok(Ok(Some(e))) = next.await else { break };
                    assert_eq!(e.offset, got.len() as u64, "the next offset, once");
                    got.push(e);
                }
            }
            got
        }
    });

    for i in 0..6 {
        let (height, _) = node.best();
        let depth = rng.gen_range(1..=6);
        node.call(
            "invalidateblock",
            json!([node.hash_at(height - depth + 1).to_string()]),
        );
        let longer = depth + rng.gen_range(1..=3);
        activity(&node, &addresses, &mut rng, longer);
        let (h, tip) = node.best();
        assert!(f.wait_for(tip, WAIT), "reorg {i}: reached tip {h} {tip}");
    }
    // Events after this (the mempool's) may follow; the check covers the log up to here.
    let total = f.store.next_event().unwrap();
    end.store(total, Ordering::Relaxed);
    let got = served.runtime.block_on(consumer).unwrap();

    // The same log read in one go.
    let mut client = IndexerClient::new(served.channel.clone());
    let mut whole = served
        .runtime
        .block_on(client.subscribe(pb::SubscribeRequest::default()))
        .unwrap()
        .into_inner();
    let mut log = Vec::new();
    while (log.len() as u64) < total {
        log.push(served.runtime.block_on(whole.message()).unwrap().unwrap());
    }
    assert_eq!(got[..total as usize], log[..]);
    assert!(total > 100, "a log of {total} events");
    let disconnects = log
        .iter()
        .filter(|e| e.kind == pb::EventKind::BlockDisconnected as i32)
        .count();
    assert!(disconnects >= 6, "{disconnects} blocks disconnected");
    assert!(log
        .iter()
        .any(|e| e.kind == pb::EventKind::TransferReorgedOut as i32));
}

/// 5. A mempool transaction's `rawtx` message is lost, so the follower asks for it over
///    RPC, and the node answers with another implementation's error code (-1) instead of
///    Core's -5. The follower takes the transaction as gone and goes on: the next block,
///    which confirms it, is indexed.
#[test]
fn an_unexpected_rpc_error_for_a_mempool_transaction_does_not_stop_following() {
    let node = Devnet::start(|c| c.filler_txs = 0);
    let deposit = node.new_address("bech32");
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);
    let wallets = vec![TestWallet {
        name: "hot".into(),
        scripts: BTreeSet::from([script_of(&deposit)]),
    }];
    let db = tempfile::tempdir().unwrap();
    let f = Following::caught_up(&node, db.path(), &wallets);
    let fault = json!({"code": -1, "message": "No such mempool transaction", "count": 100});
    node.call("devnet_rpcfault", json!(["getrawtransaction", fault]));
    node.call("devnet_zmqfaults", json!([{"drop_next": 1}]));
    let txid = node.call("sendtoaddress", json!([deposit, 0.3]));
    let asked = std::time::Instant::now();
    while node.call("devnet_rpcfaults", json!([]))["getrawtransaction"]["count"] == 100 {
        assert!(
            asked.elapsed() < WAIT,
            "the follower never asked for the transaction"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let block = node.mine_to(1, &miner)[0];
    assert!(f.wait_for(block, WAIT), "following stopped");
    let txid: bitcoin::Txid = txid.as_str().unwrap().parse().unwrap();
    assert!(f.store.has_transfer(&txid).unwrap());
    f.stop().unwrap();
}

/// 6. bitcoind's ZMQ publisher sends hostile bodies under valid headers (proof of work
///    covers only the header): a block claiming 2^64-1 transactions, then one of three
///    transactions with its last repeated (the same merkle root, CVE-2012-2459). The
///    follower refuses both, takes the real blocks over RPC, confirms no transfer twice,
///    and ends on the state a fresh index of the node's files gives.
#[test]
fn hostile_block_bodies_over_zmq_are_refused_and_the_real_blocks_indexed() {
    let node = Devnet::start(|c| c.filler_txs = 2);
    let (addresses, wallets) = watched(&node);
    node.mine_to(110, &addresses[0]);
    let db = tempfile::tempdir().unwrap();
    let f = Following::caught_up(&node, db.path(), &wallets);
    for faults in [
        json!({"huge_count_next": 1}),
        json!({"duplicate_tail_next": 1}),
    ] {
        node.call("devnet_zmqfaults", json!([faults]));
        let block = node.mine_to(1, &addresses[1])[0];
        let txs = node.call("getblock", json!([block.to_string(), 1]))["nTx"].clone();
        assert_eq!(
            txs, 3,
            "a coinbase and two fillers, so a repeated tail keeps the root"
        );
        assert!(f.wait_for(block, WAIT), "{faults}: following stopped");
    }
    let events = indexer::query::Query::new(&f.store, bitcoin::Network::Regtest)
        .unwrap()
        .events(0, 1_000_000)
        .unwrap();
    let mut confirmed = std::collections::HashSet::new();
    for (_, e) in events {
        if e.kind == indexer::types::EventKind::TransferConfirmed {
            assert!(
                confirmed.insert((e.txid, e.block_hash)),
                "{:?} confirmed twice in one block",
                e.txid
            );
        }
    }
    assert_eq!(
        f.store.digest().unwrap(),
        fresh_digest(&node.blocks_dir(), &wallets)
    );
    f.stop().unwrap();
}

/// 7. The look-ahead live: a wallet of `wpkh(tpub/0/*)` with a gap of 3 watches indices
///    0..3. A payment to index 2 in one block grows it to 0..6; a payment to index 5 in
///    the next block is found; one to index 9 (past the end) is not.
#[test]
fn the_look_ahead_grows_while_following_live() {
    use bitcoin::bip32::{Xpriv, Xpub};
    let secp = bitcoin::secp256k1::Secp256k1::new();
    let master = Xpriv::new_master(bitcoin::Network::Regtest, &[5; 32]).unwrap();
    let descriptor = format!("wpkh({}/0/*)", Xpub::from_priv(&secp, &master));
    let address = |i: u32| {
        let script = indexer::descriptors::derive(&descriptor, 0, i..i + 1)
            .unwrap()
            .remove(0);
        bitcoin::Address::from_script(&script, bitcoin::Network::Regtest)
            .unwrap()
            .to_string()
    };
    let node = Devnet::start(|c| c.filler_txs = 0);
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);
    let db = tempfile::tempdir().unwrap();
    let store =
        Arc::new(indexer::store::Store::open(db.path(), bitcoin::Network::Regtest).unwrap());
    indexer::wallets::add(
        &store,
        bitcoin::Network::Regtest,
        "deposits",
        std::slice::from_ref(&descriptor),
        None,
        3,
    )
    .unwrap();
    let f = Following::resume(
        node.daemon(true),
        Some(&node.zmq()),
        store,
        FollowOptions::default(),
    );
    assert!(f.wait_for(node.best().1, WAIT));
    let mut paid = std::collections::HashMap::new();
    for i in [2u32, 5, 9] {
        let txid = node.call("sendtoaddress", json!([address(i), 0.1]));
        paid.insert(i, txid.as_str().unwrap().parse::<bitcoin::Txid>().unwrap());
        let block = node.mine_to(1, &miner)[0];
        assert!(f.wait_for(block, WAIT));
    }
    let found = |i: u32| f.store.has_transfer(&paid[&i]).unwrap();
    assert!(found(2) && found(5), "2 grew the range over 5");
    assert!(!found(9), "9 is past the end of what 5 grew");
    f.stop().unwrap();
}
