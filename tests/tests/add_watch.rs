//! `AddWatch` while following a devnet node: scripts added between blocks are indexed
//! from the next block on (their mempool deposits too), the end state equals a fresh index
//! of the node's blk files for the same wallets, and bad or unauthorized requests change
//! nothing.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::{Duration, Instant};

use bitcoin::{Address, Network, ScriptBuf};
use indexer::auth::BearerToken;
use indexer::follow::FollowOptions;
use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;
use serde_json::json;
use system_tests::harness::TestWallet;
use system_tests::live::{fresh_digest, Devnet, Following, Served};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

const TOKEN: &str = "s3cret-token";
const WAIT: Duration = Duration::from_secs(30);

fn script(address: &str) -> ScriptBuf {
    Address::from_str(address)
        .unwrap()
        .require_network(Network::Regtest)
        .unwrap()
        .script_pubkey()
}

/// Puts the bearer token on a request.
fn authorized<T>(mut req: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    let value = MetadataValue::try_from(format!("Bearer {token}")).unwrap();
    req.metadata_mut().insert("authorization", value);
    req
}

/// A gRPC server with a token over the follower, and a client that may or may not send it.
struct Api {
    served: Served,
}

impl Api {
    fn serve(f: &Following) -> Api {
        let access = indexer::grpc::Access {
            token: Some(BearerToken::new(TOKEN)),
            tls: None,
            watch: f.watch.clone(),
        };
        Api {
            served: Served::start(f, access),
        }
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
            if let Ok(b) = self.balance(wallet) {
                if ok(&b) {
                    return b;
                }
                assert!(started.elapsed() < WAIT, "stuck at {b:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn scripts_added_while_following_are_indexed_from_the_next_block_on() {
    let node = Devnet::start(|c| c.filler_txs = 5);
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);
    let hot = node.new_address("bech32");
    let mut wallets = vec![TestWallet {
        name: "hot".into(),
        scripts: BTreeSet::from([script(&hot)]),
    }];
    let db = tempfile::tempdir().unwrap();
    let f = Following::start(
        node.daemon(true),
        Some(&node.zmq()),
        db.path(),
        &wallets,
        FollowOptions::default(),
    );
    assert!(f.wait_for(node.best().1, WAIT));
    let api = Api::serve(&f);

    // Refused, and nothing added: no token, a wrong token, bad descriptors, an address of
    // another network, a bad wallet name, a birth height with history below the tip.
    let fresh = node.new_address("bech32m");
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
    let history = api
        .add(Some(TOKEN), "deposits", &[&fresh], Some(50))
        .unwrap_err();
    assert_eq!(history.code(), tonic::Code::FailedPrecondition);
    assert!(
        history.message().contains("rescan --from 50"),
        "{history:?}"
    );
    assert_eq!(
        api.balance("deposits").unwrap_err().code(),
        tonic::Code::NotFound
    );

    // Added while following: a deposit shows in the mempool, then confirmed.
    let added = api.add(Some(TOKEN), "deposits", &[&fresh], None).unwrap();
    assert_eq!((added.new_scripts, added.known_scripts), (1, 0));
    assert_eq!(added.height, node.best().0);
    node.call("sendtoaddress", json!([fresh, 0.7]));
    let b = api.wait_balance("deposits", |b| b.unconfirmed_sat > 0);
    assert_eq!(b.unconfirmed_sat, 70_000_000);
    let mined = node.mine_to(1, &miner)[0];
    assert!(f.wait_for(mined, WAIT));
    let b = api.wait_balance("deposits", |b| b.confirmed_sat > 0);
    assert_eq!((b.confirmed_sat, b.unconfirmed_sat), (70_000_000, 0));
    let mut deposits = BTreeSet::from([script(&fresh)]);

    // More addresses added between blocks while the node keeps mining and paying them;
    // one is already watched by `hot`, so its coins count for both.
    let known = api.add(Some(TOKEN), "deposits", &[&hot], None).unwrap();
    assert_eq!((known.new_scripts, known.known_scripts), (0, 1));
    deposits.insert(script(&hot));
    for i in 0..12 {
        let address = node.new_address(["bech32", "bech32m", "legacy", "p2sh-segwit"][i % 4]);
        api.add(Some(TOKEN), "deposits", &[&address], None).unwrap();
        deposits.insert(script(&address));
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
        runtime.spawn(indexer::grpc::serve_live(
            store.clone(),
            Network::Regtest,
            None,
            listener,
            indexer::grpc::Access {
                token,
                tls: None,
                watch: indexer::watching::WatchChanges::Direct { gap_limit: 20 },
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
