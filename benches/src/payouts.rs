//! A payout rig for the withdrawal benchmarks: devnet, a funded hot wallet, the indexer
//! following it and serving gRPC, a saga database and the executor running on it, in
//! one process.

use std::sync::Arc;

use anyhow::Result;
use bitcoin::Network;
use orchestrator::executor::{Executor, Policy};
use orchestrator::payment::Payments;
use orchestrator::signer::KeyFileSigner;
use orchestrator::store::SagaStore;
use system_tests::live::{Devnet, Following, KeyedWallet, Served};

/// Everything a withdrawal benchmark runs against; the executor stops on drop.
pub struct PayoutRig {
    /// The node.
    pub node: Devnet,
    /// An address of the node's wallet to mine to.
    pub miner: String,
    /// The saga database the executor runs on.
    pub store: Arc<SagaStore>,
    /// The indexer serving gRPC.
    pub served: Served,
    _following: Following,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl PayoutRig {
    /// A hot wallet `hot` of `coins` coins of `btc` each, paying under `policy`.
    pub fn start(coins: usize, btc: f64, seed: u8, policy: Policy) -> Result<PayoutRig> {
        let node = Devnet::start(|c| c.filler_txs = 0);
        let miner = node.new_address("bech32");
        node.mine_to(101 + (coins as u32).div_ceil(25), &miner);
        let dir = tempfile::tempdir()?;
        let keyed = KeyedWallet::funded(&node, &miner, dir.path(), seed, coins, btc);
        let db = tempfile::tempdir()?;
        let following = Following::caught_up(&node, db.path(), &keyed.wallets);
        let served = Served::start(&following, indexer::grpc::Access::default());
        let store = Arc::new(SagaStore::open(&dir.path().join("sagas"))?);
        let executor = Executor::new(
            store.clone(),
            orchestrator::indexer_client::open_client(served.channel.clone()),
            Payments::new(
                Arc::new(node.daemon(false)),
                Arc::new(KeyFileSigner::open(&keyed.key_file, Network::Regtest)?),
                Network::Regtest,
                keyed.address.script_pubkey(),
                policy,
            ),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        served.runtime.spawn(executor.run(async {
            let _ = stopped.await;
        }));
        Ok(PayoutRig {
            node,
            miner,
            store,
            served,
            _following: following,
            stop: Some(stop),
            _dirs: (dir, db),
        })
    }
}

impl Drop for PayoutRig {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
