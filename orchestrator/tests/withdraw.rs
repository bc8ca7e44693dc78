//! A withdrawal end to end on real parts over 127.0.0.1: the devnet node, the indexer
//! following it and serving gRPC, the saga database, the key-file signer and the executor.
//! Submit -> RESERVED -> SIGNED -> BROADCAST -> CONFIRMING -> COMPLETED -> settled; the
//! destination receives exactly the amount and the wallet drops by amount + fee.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::consensus::deserialize;
use bitcoin::hex::FromHex;
use bitcoin::key::{CompressedPublicKey, PrivateKey};
use bitcoin::secp256k1::Secp256k1;
use bitcoin::{Address, Amount, Network, NetworkKind, Transaction};
use indexer::follow::FollowOptions;
use orchestrator::executor::{Executor, Policy};
use orchestrator::saga::{FeeRate, Request, State, Withdrawal};
use orchestrator::signer::KeyFileSigner;
use orchestrator::store::SagaStore;
use proto::indexer::v1 as ipb;
use proto::indexer::v1::indexer_client::IndexerClient;
use serde_json::json;
use system_tests::harness::TestWallet;
use system_tests::live::{Devnet, Following, Served};

const WAIT: Duration = Duration::from_secs(30);

fn wait_for(store: &SagaStore, id: u64, ok: impl Fn(&Withdrawal) -> bool) -> Withdrawal {
    let started = Instant::now();
    loop {
        let w = store.get(id).unwrap().unwrap();
        if ok(&w) {
            return w;
        }
        assert!(started.elapsed() < WAIT, "stuck at {w:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_withdrawal_is_paid_exactly_once_and_completes() {
    use std::os::unix::fs::PermissionsExt;
    let node = Devnet::start(|c| c.filler_txs = 0);
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);

    // The hot wallet: one key in a private key file, funded by the node.
    let secp = Secp256k1::new();
    let key = PrivateKey::new(
        bitcoin::secp256k1::SecretKey::from_slice(&[11; 32]).unwrap(),
        NetworkKind::Test,
    );
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("hot.keys");
    std::fs::write(&key_path, key.to_wif()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let hot = Address::p2wpkh(
        &CompressedPublicKey(key.public_key(&secp).inner),
        Network::Regtest,
    );
    for btc in [0.3, 0.5, 1.0] {
        node.call("sendtoaddress", json!([hot.to_string(), btc]));
    }
    node.mine_to(1, &miner);

    let db = tempfile::tempdir().unwrap();
    let wallets = vec![TestWallet {
        name: "hot".into(),
        scripts: BTreeSet::from([hot.script_pubkey()]),
    }];
    let f = Following::start(
        node.daemon(true),
        Some(&node.zmq()),
        db.path(),
        &wallets,
        FollowOptions::default(),
    );
    assert!(f.wait_for(node.best().1, WAIT));
    let served = Served::start(&f, indexer::grpc::Access::default());
    let balance = || {
        let mut client = IndexerClient::new(served.channel.clone());
        served
            .runtime
            .block_on(client.get_balance(ipb::GetBalanceRequest {
                target: Some(ipb::Target {
                    target: Some(ipb::target::Target::Wallet("hot".into())),
                }),
                min_conf: 0,
            }))
            .unwrap()
            .into_inner()
    };
    assert_eq!(balance().confirmed_sat, 180_000_000);

    let sagas = dir.path().join("sagas");
    let store = Arc::new(SagaStore::open(&sagas).unwrap());
    let executor = Executor::new(
        store.clone(),
        IndexerClient::new(served.channel.clone()),
        Arc::new(node.daemon(false)),
        Arc::new(KeyFileSigner::open(&key_path, Network::Regtest).unwrap()),
        Network::Regtest,
        hot.script_pubkey(),
        Policy {
            confirmations: 2,
            settle_at: 3,
            ..Policy::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    served.runtime.spawn(executor.run(async {
        let _ = stopped.await;
    }));

    let destination = node.new_address("bech32m");
    let request = Request {
        request_id: "payout-1".into(),
        wallet: "hot".into(),
        destination: destination.clone(),
        amount: Amount::from_sat(40_000_000),
        fee_rate: FeeRate::SatPerVb(5.0),
        max_fee: Amount::from_sat(50_000),
    };
    let id = store.submit(request.clone(), 0).unwrap().withdrawal.id;
    let sent = wait_for(&store, id, |w| w.state == State::Broadcast);
    assert_eq!(sent.attempts.len(), 1);
    // A resubmission changes nothing.
    let again = store.submit(request, 1).unwrap();
    assert!(!again.created);
    assert_eq!(again.withdrawal.id, id);

    node.mine_to(1, &miner);
    let w = wait_for(&store, id, |w| w.state == State::Confirming);
    assert_eq!(w.confirmations, 1);
    node.mine_to(1, &miner);
    let done = wait_for(&store, id, |w| w.state == State::Completed);
    assert!(store.reserved().unwrap().len() == done.coins.len() && !done.settled);
    node.mine_to(1, &miner);
    let settled = wait_for(&store, id, |w| w.settled);
    assert!(store.reserved().unwrap().is_empty());
    let _ = stop.send(());

    // Paid exactly once, exactly the amount, and the wallet dropped by amount + fee.
    let txid = settled.confirmed.unwrap();
    assert_eq!(Some(txid), settled.current().map(|a| a.txid));
    let raw = node.call("getrawtransaction", json!([txid.to_string()]));
    let tx: Transaction =
        deserialize(&Vec::<u8>::from_hex(raw.as_str().unwrap()).unwrap()).unwrap();
    let to_destination: Vec<_> = tx
        .output
        .iter()
        .filter(|o| {
            o.script_pubkey
                == Address::from_str(&destination)
                    .unwrap()
                    .assume_checked()
                    .script_pubkey()
        })
        .collect();
    assert_eq!(to_destination.len(), 1);
    assert_eq!(to_destination[0].value, Amount::from_sat(40_000_000));
    let fee = settled.current().unwrap().fee.to_sat();
    assert!(fee > 0 && fee <= 50_000);
    let after = balance();
    assert_eq!(after.confirmed_sat, 180_000_000 - 40_000_000 - fee);
}
