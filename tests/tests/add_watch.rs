//! `AddWatch` while following a devnet node: scripts added between blocks are indexed
//! from the next block on (their mempool deposits too), the end state equals a fresh index
//! of the node's blk files for the same wallets, and bad or unauthorized requests change
//! nothing.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bitcoin::{Network, ScriptBuf};
use indexer::config::Settings;
use indexer::follow::FollowOptions;
use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;
use serde_json::json;
use service::auth::BearerToken;
use system_tests::harness::{script_of, TestWallet};
use system_tests::live::{fresh_digest, Devnet, Following, Indexer};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

const TOKEN: &str = "s3cret-token-of-32-characters-xy";
const WAIT: Duration = Duration::from_secs(30);

/// Puts the bearer token on a request.
fn authorized<T>(mut req: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    let value = MetadataValue::try_from(format!("Bearer {token}")).unwrap();
    req.metadata_mut().insert("authorization", value);
    req
}

/// Calls to `indexer run` guarded by the token, each with the token or without.
struct Api<'a> {
    served: &'a Indexer,
}

impl Api<'_> {
    fn backfills(&self) -> Vec<pb::Backfill> {
        let mut client = IndexerClient::new(self.served.channel.clone());
        let req = authorized(tonic::Request::new(pb::ListBackfillsRequest {}), TOKEN);
        self.served
            .runtime
            .block_on(client.list_backfills(req))
            .unwrap()
            .into_inner()
            .backfills
    }

    fn add(
        &self,
        token: Option<&str>,
        wallet: &str,
        descriptors: &[&str],
        birth_height: Option<u32>,
    ) -> Result<pb::AddWatchResponse, tonic::Status> {
        let mut req = tonic::Request::new(pb::AddWatchRequest {
            wallet: wallet.into(),
            descriptors: descriptors.iter().map(|d| d.to_string()).collect(),
            birth_height,
        });
        if let Some(t) = token {
            req = authorized(req, t);
        }
        let mut client = IndexerClient::new(self.served.channel.clone());
        self.served
            .runtime
            .block_on(client.add_watch(req))
            .map(|r| r.into_inner())
    }

    fn balance(&self, wallet: &str) -> Result<pb::GetBalanceResponse, tonic::Status> {
        let req = tonic::Request::new(pb::GetBalanceRequest {
            target: Some(pb::Target {
                target: Some(pb::target::Target::Wallet(wallet.into())),
            }),
            min_conf: 0,
        });
        let mut client = IndexerClient::new(self.served.channel.clone());
        self.served
            .runtime
            .block_on(client.get_balance(authorized(req, TOKEN)))
            .map(|r| r.into_inner())
    }

    fn wait_balance(
        &self,
        wallet: &str,
        ok: impl Fn(&pb::GetBalanceResponse) -> bool,
    ) -> pb::GetBalanceResponse {
        let started = Instant::now();
        loop {
            let b = self.balance(wallet);
            if let Ok(b) = &b {
                if ok(b) {
                    return b.clone();
                }
            }
            assert!(started.elapsed() < WAIT, "stuck at {b:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A regtest address of a new key nobody keeps: P2TR when `taproot`, else P2WPKH.
fn foreign_address(taproot: bool) -> String {
    use bitcoin::secp256k1::{rand, Secp256k1};
    let secp = Secp256k1::new();
    let (secret, public) = secp.generate_keypair(&mut rand::thread_rng());
    let address = if taproot {
        let (xonly, _) = secret.x_only_public_key(&secp);
        bitcoin::Address::p2tr(&secp, xonly, None, Network::Regtest)
    } else {
        bitcoin::Address::p2wpkh(&bitcoin::CompressedPublicKey(public), Network::Regtest)
    };
    address.to_string()
}

/// The settings of `indexer run` on `node` into `db`, its gRPC guarded by the token.
fn with_token(node: &Devnet, db: &std::path::Path) -> Settings {
    let token = db.join("grpc.token");
    system_tests::harness::write_secret(&token, TOKEN);
    Settings {
        grpc_token_file: Some(token),
        ..Indexer::settings(node, db)
    }
}

/// A devnet (`fillers` wallet transactions a block) past coinbase maturity, its miner's
/// address, and a new address `hot` followed alone by `indexer run` with the token.
#[allow(clippy::type_complexity)]
fn node_following_hot(
    fillers: usize,
) -> (
    Devnet,
    String,
    String,
    Vec<TestWallet>,
    tempfile::TempDir,
    Indexer,
) {
    let node = Devnet::start(|c| c.filler_txs = fillers);
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);
    let hot = node.new_address("bech32");
    let (wallets, db, f) = follow_hot(&node, &hot);
    (node, miner, hot, wallets, db, f)
}

/// Wallet `hot` of one address, followed from `node` into a new database by `indexer run`
/// with the token, until caught up.
fn follow_hot(node: &Devnet, hot: &str) -> (Vec<TestWallet>, tempfile::TempDir, Indexer) {
    let wallets = vec![TestWallet {
        name: "hot".into(),
        scripts: BTreeSet::from([script_of(hot)]),
    }];
    let db = tempfile::tempdir().unwrap();
    let f = Indexer::start(with_token(node, db.path()), &wallets);
    assert!(f.wait_for(node.best().1, WAIT), "the indexer caught up");
    (wallets, db, f)
}

/// A node past coinbase maturity with a history for each address of `kinds` (and a `hot`
/// one last): each paid, then `blocks` mined. Returns the node, its miner address, `hot`
/// and the others.
fn node_with_history(kinds: &[&str], blocks: u32) -> (Devnet, String, String, Vec<String>) {
    let node = Devnet::start(|c| c.filler_txs = 5);
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);
    let hot = node.new_address("bech32");
    let old: Vec<String> = kinds.iter().map(|k| node.new_address(k)).collect();
    for (i, a) in old.iter().chain([&hot]).enumerate() {
        node.call("sendtoaddress", json!([a, 0.5 + i as f64]));
        node.mine_to(blocks, &miner);
    }
    (node, miner, hot, old)
}

/// A new database at `db` watching `wallets`, synced to `node` by a follower (without ZMQ),
/// with the client of the node it uses and the follower, to sync again.
fn synced(
    node: &Devnet,
    db: &std::path::Path,
    wallets: &[TestWallet],
) -> (
    std::sync::Arc<indexer::store::Store>,
    std::sync::Arc<bitcoind::Daemon>,
    indexer::follow::Follower,
) {
    use std::sync::Arc;
    let store = Arc::new(system_tests::harness::open_with_wallets(
        db,
        Network::Regtest,
        wallets,
    ));
    let daemon = Arc::new(node.daemon(true));
    let filter = indexer::wallets::load_filter(&store, 1_000, 1e-6).unwrap();
    let follower = indexer::follow::Follower::new(
        store.clone(),
        daemon.clone(),
        Arc::new(filter),
        Network::Regtest,
        FollowOptions::default(),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        None,
    );
    follower.sync(None).unwrap();
    (store, daemon, follower)
}

/// `job`'s scripts indexed into its scratch database up to `store`'s tip, as a backfill
/// does before its merge: the scratch database and its directory.
fn index_scratch(
    store: &indexer::store::Store,
    daemon: &std::sync::Arc<bitcoind::Daemon>,
    job: &indexer::backfill::Job,
    scripts: &[ScriptBuf],
) -> (indexer::store::Store, std::path::PathBuf) {
    use indexer::store::Reader;
    let (target, _) = store.tip().unwrap().unwrap();
    let dir = indexer::backfill::scratch_dir(store, job.id);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scratch = indexer::backfill::index(
        job,
        scripts,
        daemon.clone(),
        &dir,
        Network::Regtest,
        target,
        &stop,
        &|_| {},
    )
    .unwrap();
    (scratch, dir)
}

/// Asserts that `store` equals a fresh index of the node's blk files for `wallets`, a
/// wallet `recovered` of `addresses`, then `later` (in the order they were created).
fn assert_recovered_is_exact(
    store: &indexer::store::Store,
    node: &Devnet,
    mut wallets: Vec<TestWallet>,
    addresses: &[&str],
    later: &[TestWallet],
) {
    wallets.push(TestWallet {
        name: "recovered".into(),
        scripts: addresses.iter().map(|a| script_of(a)).collect(),
    });
    wallets.extend_from_slice(later);
    assert_eq!(
        store.digest().unwrap(),
        fresh_digest(&node.blocks_dir(), &wallets)
    );
}

#[test]
fn scripts_added_while_following_are_indexed_from_the_next_block_on() {
    let (node, miner, hot, mut wallets, _db, f) = node_following_hot(5);
    let api = Api { served: &f };

    // Refused, and nothing added: no token, a wrong token, bad descriptors, an address of
    // another network, a bad wallet name, a birth height with history below the tip.
    // Addresses of keys the node does not hold: its wallet could otherwise spend their
    // unconfirmed coins in its next payment, and the balances below would move (CI once
    // saw the 0.7 deposit spent by the 0.1 one).
    let fresh = foreign_address(true);
    let code = |r: Result<pb::AddWatchResponse, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(api.add(None, "deposits", &[&fresh], None)),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(api.add(Some("wrong"), "deposits", &[&fresh], None)),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(api.add(Some(TOKEN), "deposits", &["wpkh(nonsense)"], None)),
        tonic::Code::InvalidArgument
    );
    let mainnet = "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq";
    let wrong_net = api
        .add(Some(TOKEN), "deposits", &[mainnet], None)
        .unwrap_err();
    assert_eq!(
        wrong_net.code(),
        tonic::Code::InvalidArgument,
        "{wrong_net:?}"
    );
    assert_eq!(
        code(api.add(Some(TOKEN), "no spaces", &[&fresh], None)),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        api.balance("deposits").unwrap_err().code(),
        tonic::Code::NotFound
    );

    // Added while following: a deposit shows in the mempool, then confirmed.
    let added = api.add(Some(TOKEN), "deposits", &[&fresh], None).unwrap();
    assert_eq!(
        (added.new_scripts, added.known_scripts, added.backfill_id),
        (1, 0, 0)
    );
    assert_eq!(added.height, node.best().0);
    node.call("sendtoaddress", json!([fresh, 0.7]));
    let b = api.wait_balance("deposits", |b| b.unconfirmed_sat > 0);
    assert_eq!(b.unconfirmed_sat, 70_000_000);

    // A deposit already in the mempool when its address is added shows as unconfirmed
    // too: the mempool is looked at again with the new scripts.
    let early = foreign_address(false);
    node.call("sendtoaddress", json!([early, 0.3]));
    // Mempool notices are handled in order: once this later, watched deposit shows, the
    // follower has seen the one to `early`, while it was not watched.
    node.call("sendtoaddress", json!([fresh, 0.1]));
    let b = api.wait_balance("deposits", |b| b.unconfirmed_sat > 70_000_000);
    assert_eq!(b.unconfirmed_sat, 80_000_000);
    api.add(Some(TOKEN), "early", &[&early], None).unwrap();
    let b = api.wait_balance("early", |b| b.unconfirmed_sat > 0);
    assert_eq!(b.unconfirmed_sat, 30_000_000);
    let mined = node.mine_to(1, &miner)[0];
    assert!(f.wait_for(mined, WAIT));
    let b = api.wait_balance("deposits", |b| b.confirmed_sat > 0);
    assert_eq!((b.confirmed_sat, b.unconfirmed_sat), (80_000_000, 0));
    let mut deposits = BTreeSet::from([script_of(&fresh)]);

    // More addresses added between blocks while the node keeps mining and paying them;
    // one is already watched by `hot`, so its coins count for both.
    let known = api.add(Some(TOKEN), "deposits", &[&hot], None).unwrap();
    assert_eq!((known.new_scripts, known.known_scripts), (0, 1));
    deposits.insert(script_of(&hot));
    for i in 0..12 {
        let address = node.new_address(["bech32", "bech32m", "legacy", "p2sh-segwit"][i % 4]);
        api.add(Some(TOKEN), "deposits", &[&address], None).unwrap();
        deposits.insert(script_of(&address));
        node.call("sendtoaddress", json!([address, 0.01 * (i + 1) as f64]));
        if i % 3 == 2 {
            node.mine_to(1, &miner);
        }
    }
    let tip = node.mine_to(1, &miner)[0];
    assert!(f.wait_for(tip, WAIT));
    // The node's own traffic spends some of these coins again (they are its addresses):
    // the exact check is the digest.
    let b = api.wait_balance("deposits", |b| b.height == node.best().0);
    assert!(b.utxo_count > 0, "{b:?}");
    wallets.push(TestWallet {
        name: "deposits".into(),
        scripts: deposits,
    });
    wallets.push(TestWallet {
        name: "early".into(),
        scripts: BTreeSet::from([script_of(&early)]),
    });
    let state = f.store.digest().unwrap();
    assert_eq!(state, fresh_digest(&node.blocks_dir(), &wallets));
}

/// `indexer serve` (no follower) applies AddWatch directly; without a token configured the
/// server refuses every write.
#[test]
fn without_a_follower_writes_apply_directly_and_need_a_configured_token() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = tempfile::tempdir().unwrap();
    let store =
        std::sync::Arc::new(indexer::store::Store::open(db.path(), Network::Regtest).unwrap());
    let start = |token: Option<BearerToken>| {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(indexer::grpc::serve(
            store.clone(),
            listener,
            indexer::grpc::ServeOptions {
                access: indexer::grpc::Access {
                    token,
                    tls: None,
                    watch: indexer::add_watch::WatchChanges::Direct { gap_limit: 20 },
                },
                ..indexer::grpc::ServeOptions::new(Network::Regtest)
            },
            std::future::pending(),
        ));
        runtime
            .block_on(
                Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect(),
            )
            .unwrap()
    };
    let request = |token: &str| {
        let req = tonic::Request::new(pb::AddWatchRequest {
            wallet: "cold".into(),
            descriptors: vec!["bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080".into()],
            birth_height: None,
        });
        authorized(req, token)
    };

    let open = IndexerClient::new(start(None));
    let refused = runtime
        .block_on(open.clone().add_watch(request(TOKEN)))
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(indexer::wallets::list(&store).unwrap().is_empty());

    let guarded = IndexerClient::new(start(Some(BearerToken::new(TOKEN))));
    let added = runtime
        .block_on(guarded.clone().add_watch(request(TOKEN)))
        .unwrap()
        .into_inner();
    assert_eq!((added.new_scripts, added.known_scripts), (1, 0));
    let listed = indexer::wallets::list(&store).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].scripts), ("cold", 1));
}

/// Scripts with history below the tip: backfilled in the background while the node keeps
/// mining and reorging, merged between two blocks, and exact through later reorgs (their
/// entries joined the kept undo records): the end state equals a fresh index.
#[test]
fn history_below_the_tip_is_backfilled_while_following() {
    // History for the scripts to be added later (and for `hot`), spent again in part by
    // the node's own traffic.
    let (node, miner, hot, old) = node_with_history(&["bech32m", "legacy", "p2sh-segwit"], 1);
    node.mine_to(3, &miner);
    let (wallets_at_start, _db, f) = follow_hot(&node, &hot);
    let api = Api { served: &f };

    let mut descriptors: Vec<&str> = old.iter().map(String::as_str).collect();
    descriptors.push(&hot);
    let accepted = api
        .add(Some(TOKEN), "recovered", &descriptors, Some(100))
        .unwrap();
    assert_eq!((accepted.new_scripts, accepted.known_scripts), (3, 1));
    assert_ne!(accepted.backfill_id, 0);
    // The chain moves on and reorganizes while the backfill runs.
    node.call("sendtoaddress", json!([old[0], 0.25]));
    node.mine_to(2, &miner);
    let replaced = node.hash_at(node.best().0 - 1);
    node.call("invalidateblock", json!([replaced.to_string()]));
    node.call("sendtoaddress", json!([old[1], 0.125]));
    node.mine_to(3, &miner);

    let started = Instant::now();
    loop {
        let b = api.backfills();
        let job = b.iter().find(|j| j.id == accepted.backfill_id).unwrap();
        if job.state == pb::BackfillState::Done as i32 {
            break;
        }
        assert_ne!(job.state, pb::BackfillState::Failed as i32, "{job:?}");
        assert!(started.elapsed() < WAIT, "backfill stuck: {job:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Scripts all watched already need no backfill, whatever the birth height.
    let known = api
        .add(Some(TOKEN), "hot-copy", &[&hot], Some(100))
        .unwrap();
    assert_eq!(
        (known.new_scripts, known.known_scripts, known.backfill_id),
        (0, 1, 0)
    );
    let (a, b) = (
        api.balance("hot").unwrap(),
        api.balance("hot-copy").unwrap(),
    );
    assert_eq!(
        (a.confirmed_sat, a.utxo_count),
        (b.confirmed_sat, b.utxo_count)
    );

    // After the merge: more payments, then a reorg that replaces every block since the
    // first payment to the recovered scripts, so disconnecting relies on their entries in
    // the merged undo records.
    node.call("sendtoaddress", json!([old[2], 0.0625]));
    node.mine_to(2, &miner);
    let (height, _) = node.best();
    node.call("invalidateblock", json!([node.hash_at(103).to_string()]));
    node.call("sendtoaddress", json!([old[0], 0.03125]));
    let tip = *node.mine_to(height - 100, &miner).last().unwrap();
    assert!(node.best().0 > height);
    assert!(f.wait_for(tip, WAIT));

    // (The node's traffic may have spent every recovered coin: the digest is the check.)
    api.wait_balance("recovered", |b| b.height == node.best().0);
    let copy = TestWallet {
        name: "hot-copy".into(),
        scripts: BTreeSet::from([script_of(&hot)]),
    };
    assert_recovered_is_exact(&f.store, &node, wallets_at_start, &descriptors, &[copy]);
}

/// The backfill's phases driven one by one, so the case the follower meets only by timing
/// is certain: the chain reorganizes below the height the scratch database reached, and
/// aligning disconnects and reconnects it before the merge.
#[test]
fn a_backfill_overtaken_by_a_reorg_is_realigned_before_merging() {
    use indexer::backfill;
    use indexer::store::Reader;

    let (node, miner, hot, old) = node_with_history(&["bech32m", "bech32m"], 2);
    let wallets_at_start = vec![TestWallet {
        name: "hot".into(),
        scripts: BTreeSet::from([script_of(&hot)]),
    }];
    let db = tempfile::tempdir().unwrap();
    let (store, daemon, follower) = synced(&node, db.path(), &wallets_at_start);

    let descriptors: Vec<String> = old.iter().cloned().chain([hot.clone()]).collect();
    let scripts = backfill::new_scripts(&store, Network::Regtest, &descriptors, 20).unwrap();
    assert_eq!(scripts.len(), 2);
    let job = backfill::record(&store, "recovered", &descriptors, 100, 20, &scripts).unwrap();
    assert_eq!(backfill::pending(&store).unwrap(), vec![job.clone()]);
    assert_eq!(job.scripts(), scripts);
    let (scratch, dir) = index_scratch(&store, &daemon, &job, &scripts);
    assert_eq!(scratch.tip().unwrap(), store.tip().unwrap());
    let (target, _) = store.tip().unwrap().unwrap();

    // The node replaces the blocks since the second payment; the index follows.
    node.call(
        "invalidateblock",
        json!([node.hash_at(target - 3).to_string()]),
    );
    node.call("sendtoaddress", json!([old[1], 0.5]));
    node.mine_to(6, &miner);
    follower.sync(None).unwrap();
    assert_ne!(scratch.tip().unwrap(), store.tip().unwrap());

    backfill::align(&scratch, &store, &daemon, &job).unwrap();
    assert_eq!(scratch.tip().unwrap(), store.tip().unwrap());
    backfill::merge(&store, &scratch, &job, Network::Regtest).unwrap();
    assert!(backfill::pending(&store).unwrap().is_empty());
    drop(scratch);
    backfill::remove_scratch(&dir);
    assert!(!dir.exists());

    let addresses: Vec<&str> = descriptors.iter().map(String::as_str).collect();
    assert_recovered_is_exact(&store, &node, wallets_at_start, &addresses, &[]);
}

/// A backfill's wallet joins a script another wallet watches (its outputs come from the
/// index) and adds a new one (its outputs come from the scratch database). When both got
/// an output in the same block, the wallet's outputs at that height are the sum of both:
/// the merge once wrote the aggregate twice and kept only the new script's part.
#[test]
fn a_merge_counts_known_and_new_scripts_paid_in_one_block_both() {
    use indexer::backfill;

    let node = Devnet::start(|c| c.filler_txs = 0);
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);
    // Keys outside the node's wallet, so no later payment of the node spends their coins.
    let (known, new) = (
        system_tests::live::TestKey::new().address().to_string(),
        system_tests::live::TestKey::new().address().to_string(),
    );
    node.call("sendtoaddress", json!([known, 1.0]));
    node.call("sendtoaddress", json!([new, 2.0]));
    node.mine_to(1, &miner);
    let wallets_at_start = vec![TestWallet {
        name: "hot".into(),
        scripts: BTreeSet::from([script_of(&known)]),
    }];
    let db = tempfile::tempdir().unwrap();
    let (store, daemon, _) = synced(&node, db.path(), &wallets_at_start);

    let descriptors = vec![new.clone(), known.clone()];
    let scripts = backfill::new_scripts(&store, Network::Regtest, &descriptors, 20).unwrap();
    assert_eq!(scripts, vec![script_of(&new)]);
    let job = backfill::record(&store, "recovered", &descriptors, 100, 20, &scripts).unwrap();
    let (scratch, dir) = index_scratch(&store, &daemon, &job, &scripts);
    backfill::align(&scratch, &store, &daemon, &job).unwrap();
    backfill::merge(&store, &scratch, &job, Network::Regtest).unwrap();
    drop(scratch);
    backfill::remove_scratch(&dir);

    assert_recovered_is_exact(&store, &node, wallets_at_start, &[&new, &known], &[]);
}

/// A backfill accepted by a run that then died (its job is in the database, its scratch
/// database half written) is redone when the indexer starts again.
#[test]
fn a_backfill_cut_short_by_a_crash_is_redone_at_the_next_start() {
    use indexer::backfill;
    use indexer::store::Reader;

    let node = Devnet::start(|c| c.filler_txs = 5);
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);
    let old = node.new_address("bech32m");
    node.call("sendtoaddress", json!([old, 2.0]));
    node.mine_to(4, &miner);
    let db = tempfile::tempdir().unwrap();
    let wallets_at_start = vec![TestWallet {
        name: "hot".into(),
        scripts: BTreeSet::from([script_of(&miner)]),
    }];
    let job = {
        let f = Following::start(
            node.daemon(true),
            Some(&node.zmq()),
            db.path(),
            &wallets_at_start,
            FollowOptions::default(),
        );
        assert!(f.wait_for(node.best().1, WAIT));
        f.stop().unwrap();
        let store = indexer::store::Store::open(db.path(), Network::Regtest).unwrap();
        let job = backfill::record(
            &store,
            "recovered",
            std::slice::from_ref(&old),
            101,
            20,
            &[script_of(&old)],
        )
        .unwrap();
        // What a crash leaves: a scratch database with some of the work in it.
        let scratch = backfill::scratch_dir(&store, job.id);
        indexer::store::Store::open(&scratch, Network::Regtest).unwrap();
        // And one a crash left after its merge (no job any more).
        indexer::store::Store::open(&backfill::scratch_dir(&store, 7), Network::Regtest).unwrap();
        assert!(store.tip().unwrap().is_some());
        job
    };

    let store =
        std::sync::Arc::new(indexer::store::Store::open(db.path(), Network::Regtest).unwrap());
    let f = Indexer::resume(with_token(&node, db.path()), store);
    let api = Api { served: &f };
    let started = Instant::now();
    // The merge forgets the job, then the scratch database is removed: wait for both.
    while backfill::pending(&f.store).unwrap().contains(&job)
        || backfill::scratch_dir(&f.store, job.id).exists()
    {
        assert!(
            started.elapsed() < WAIT,
            "not redone: {:?}",
            api.backfills()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let done = api.backfills();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].state, pb::BackfillState::Done as i32, "{done:?}");
    assert!(!backfill::scratch_dir(&f.store, job.id).exists());
    assert!(!backfill::scratch_dir(&f.store, 7).exists());
    let tip = node.mine_to(1, &miner)[0];
    assert!(f.wait_for(tip, WAIT));
    assert_recovered_is_exact(&f.store, &node, wallets_at_start, &[&old], &[]);
}

/// `count` regtest P2WPKH addresses of keys nobody holds, distinct for each `seed`.
fn deposit_addresses(seed: u32, count: u32) -> Vec<String> {
    use bitcoin::hashes::Hash;
    (0..count)
        .map(|i| {
            let h = bitcoin::hashes::sha256::Hash::hash(
                &[seed.to_le_bytes(), i.to_le_bytes()].concat(),
            );
            let mut program = [0u8; 20];
            program.copy_from_slice(&h.to_byte_array()[..20]);
            let script = ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array(program));
            bitcoin::Address::from_script(&script, Network::Regtest)
                .unwrap()
                .to_string()
        })
        .collect()
}

/// An exchange's deposit scripts over gRPC: calls of the most descriptors a call takes
/// (100,000 bech32 addresses, more than tonic's default 4 MiB message), one after the
/// other while the node mines and pays, are all watched; the blocks mined between them
/// are indexed, each address's deposits counted, and the end state equals a fresh index
/// of the node's blk files for the same wallets. A call of one more is refused.
#[test]
fn calls_of_a_hundred_thousand_addresses_are_added_while_blocks_keep_coming() {
    const CALLS: u32 = 3;
    const PER_CALL: u32 = 100_000;
    let (node, miner, _hot, mut wallets, _db, f) = node_following_hot(5);
    let api = Api { served: &f };

    let too_many = deposit_addresses(99, PER_CALL + 1);
    let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let refused = api.add(Some(TOKEN), "deposits", &refs, None).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(
        api.balance("deposits").unwrap_err().code(),
        tonic::Code::NotFound
    );

    let chunks: Vec<Vec<String>> = (0..CALLS).map(|c| deposit_addresses(c, PER_CALL)).collect();
    let (answered_tx, answered) = std::sync::mpsc::channel();
    let mut paid = 0u64;
    std::thread::scope(|s| {
        let chunks = &chunks;
        let api = &api;
        s.spawn(move || {
            for (c, chunk) in chunks.iter().enumerate() {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                let added = api.add(Some(TOKEN), "deposits", &refs, None).unwrap();
                assert_eq!(
                    (added.new_scripts, added.known_scripts, added.backfill_id),
                    (PER_CALL, 0, 0)
                );
                answered_tx.send(c).unwrap();
            }
        });
        // Blocks keep coming while the calls are sent; each call's first and last
        // addresses are paid once it is answered.
        let mut done = 0;
        while done < CALLS as usize {
            while let Ok(c) = answered.try_recv() {
                for address in [&chunks[c][0], &chunks[c][PER_CALL as usize - 1]] {
                    node.call("sendtoaddress", json!([address, 0.01 * (c + 1) as f64]));
                    paid += 1_000_000 * (c as u64 + 1);
                }
                done += 1;
            }
            let mined = node.mine_to(1, &miner)[0];
            assert!(
                f.wait_for(mined, WAIT),
                "a block mined during the calls is indexed"
            );
        }
    });
    let tip = node.mine_to(1, &miner)[0];
    assert!(f.wait_for(tip, WAIT));
    let b = api.wait_balance("deposits", |b| b.height == node.best().0);
    assert_eq!(
        (b.confirmed_sat, b.unconfirmed_sat, b.utxo_count),
        (paid, 0, 2 * u64::from(CALLS))
    );
    wallets.push(TestWallet {
        name: "deposits".into(),
        scripts: chunks.iter().flatten().map(|a| script_of(a)).collect(),
    });
    assert_eq!(
        f.store.digest().unwrap(),
        fresh_digest(&node.blocks_dir(), &wallets)
    );
}

/// A call adding a script that a pending backfill covers is refused, naming the job, and
/// adds nothing: also when the script is the last of 100,000 (looked up among the call's
/// expanded scripts). The job is recorded in the database by hand, not started, so it stays
/// pending for as long as the test needs.
#[test]
fn a_call_overlapping_a_pending_backfill_is_refused_and_adds_nothing() {
    use indexer::backfill;

    let (_node, _miner, _hot, _wallets, _db, f) = node_following_hot(0);
    let api = Api { served: &f };

    let recovered = foreign_address(false);
    let descriptors = vec![recovered.clone()];
    let scripts = backfill::new_scripts(&f.store, Network::Regtest, &descriptors, 20).unwrap();
    let job = backfill::record(&f.store, "recovered", &descriptors, 100, 20, &scripts).unwrap();

    let mut many = deposit_addresses(7, 99_999);
    many.push(recovered.clone());
    for call in [vec![foreign_address(true), recovered.clone()], many] {
        let refs: Vec<&str> = call.iter().map(String::as_str).collect();
        let refused = api.add(Some(TOKEN), "other", &refs, None).unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused.message().contains(&job.id.to_string()),
            "{refused:?}"
        );
        assert_eq!(
            api.balance("other").unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
    // Scripts the job does not cover are added as usual.
    let fresh = foreign_address(true);
    let added = api.add(Some(TOKEN), "other", &[&fresh], None).unwrap();
    assert_eq!((added.new_scripts, added.backfill_id), (1, 0));
}
