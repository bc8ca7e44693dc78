//! Wallet balancing on real parts over 127.0.0.1: a hot descriptor wallet whose key the
//! orchestrator holds, a cold watch-only one whose key only the test (the offline signer)
//! holds, both watched by the indexer following the devnet, and the executor with the
//! Balancing and Signatures APIs. Below the low-water mark a top-up from the cold wallet
//! waits for the offline signer, is surfaced by WatchBalancingRuns and fills the hot
//! wallet; while fees are low, small coins are consolidated without touching the coins a
//! withdrawal holds. The top-up also on the Temporal engine (a dev server started by the
//! test, a worker as `orchestrator run` runs it). (The high-water sweep is tested in
//! orchestrator_withdraw.)

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bitcoin::secp256k1::Secp256k1;
use bitcoin::{Address, Amount, Network, Psbt};
use orchestrator::balancing::{Balancing, Consolidation, Kind, LowWater};
use orchestrator::descriptor_wallet::DescriptorWallet;
use orchestrator::executor::{Executor, Policy};
use orchestrator::grpc::WithdrawalService;
use orchestrator::grpc_balancing::BalancingService;
use orchestrator::grpc_signatures::SignatureService;
use orchestrator::payment::Payments;
use orchestrator::saga::{FeeRate, Request, State, Withdrawal};
use orchestrator::signer::KeyFileSigner;
use orchestrator::store::SagaStore;
use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::balancing_server::Balancing as _;
use proto::orchestrator::v1::signatures_server::Signatures;
use proto::orchestrator::v1::withdrawals_server::Withdrawals;
use serde_json::json;
use system_tests::harness::{script_of, wait_for_saga, xpriv, xpub, TestWallet};
use system_tests::live::{Devnet, Indexer};

const WAIT: Duration = Duration::from_secs(30);

/// The hot wallet: its key is in the orchestrator's key file.
const HOT: u8 = 1;
/// The cold wallet: its key is only the offline signer's (the test's).
const COLD: u8 = 9;

fn wallet(seed: u8) -> Arc<DescriptorWallet> {
    let text = format!("wpkh({}/0/*)", xpub(seed));
    Arc::new(DescriptorWallet::parse(&text, Network::Regtest, 40).unwrap())
}

/// Both wallets funded by the node and watched by the indexer, and the executor paying
/// from the hot one (change to its index 0) under a balancing policy.
struct Balanced {
    node: Devnet,
    miner: String,
    store: Arc<SagaStore>,
    served: Indexer,
    signatures: SignatureService,
    balancing: BalancingService,
    withdrawals: WithdrawalService,
    hot: Arc<DescriptorWallet>,
    _executor: (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ),
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// Both wallets funded and watched, and how the hot one pays, before any engine runs.
struct Funded {
    node: Devnet,
    miner: String,
    served: Indexer,
    payments: Payments,
    hot: Arc<DescriptorWallet>,
    dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Funded {
    /// Hot coins of `hot_btc` each at its indexes 1.., cold ones of `cold_btc` at 1..;
    /// the policy's cold wallet is the cold descriptor, watched as `cold`.
    fn new(hot_btc: &[f64], cold_btc: &[f64], balancing: Balancing) -> Funded {
        use std::os::unix::fs::PermissionsExt;
        let node = Devnet::start(|c| c.filler_txs = 0);
        let miner = node.new_address("bech32");
        node.mine_to(101, &miner);
        let (hot, cold) = (wallet(HOT), wallet(COLD));
        for (wallet, coins) in [(&hot, hot_btc), (&cold, cold_btc)] {
            for (i, btc) in coins.iter().enumerate() {
                let script = wallet.script_at(i as u32 + 1).unwrap();
                let address = Address::from_script(&script, Network::Regtest).unwrap();
                node.call("sendtoaddress", json!([address.to_string(), btc]));
            }
        }
        node.mine_to(1, &miner);
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("hot.keys");
        std::fs::write(&key_file, xpriv(HOT).to_string()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let db = tempfile::tempdir().unwrap();
        let watched = [
            TestWallet {
                name: "hot".into(),
                scripts: hot.scripts().into_iter().collect(),
            },
            TestWallet {
                name: "cold".into(),
                scripts: cold.scripts().into_iter().collect(),
            },
        ];
        let served = Indexer::caught_up(&node, db.path(), &watched);
        let policy = Policy {
            confirmations: 1,
            settle_at: 2,
            balancing: Some(Balancing {
                cold: Some(cold),
                ..balancing
            }),
            ..Policy::default()
        };
        let payments = Payments::new(
            Arc::new(node.daemon(false)),
            Arc::new(KeyFileSigner::open(&key_file, Network::Regtest).unwrap()),
            Network::Regtest,
            hot.script_at(0).unwrap(),
            policy,
        )
        .with_descriptor_wallet(hot.clone());
        Funded {
            node,
            miner,
            served,
            payments,
            hot,
            dirs: (dir, db),
        }
    }
}

impl Balanced {
    /// [`Funded::new`] with the executor paying, its saga database beside the key file.
    fn start(hot_btc: &[f64], cold_btc: &[f64], balancing: Balancing) -> Balanced {
        let Funded {
            node,
            miner,
            served,
            payments,
            hot,
            dirs: (dir, db),
        } = Funded::new(hot_btc, cold_btc, balancing);
        let store = Arc::new(SagaStore::open(&dir.path().join("sagas")).unwrap());
        let client = || orchestrator::indexer_client::open_client(served.channel.clone());
        let executor = Executor::new(store.clone(), client(), payments.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = served.runtime.spawn(executor.run(async {
            let _ = stopped.await;
        }));
        Balanced {
            signatures: SignatureService::new(store.clone(), payments.clone()),
            balancing: BalancingService::new(store.clone(), client(), payments),
            withdrawals: WithdrawalService::new(store.clone(), Network::Regtest),
            _executor: (stop, running),
            node,
            miner,
            store,
            served,
            hot,
            _dirs: (dir, db),
        }
    }

    fn wait_for(&self, id: u64, ok: impl Fn(&Withdrawal) -> bool) -> Withdrawal {
        wait_for_saga(&self.store, id, WAIT, ok)
    }

    fn runs(&self, kind: pb::BalancingKind) -> Vec<pb::BalancingRun> {
        let req = tonic::Request::new(pb::ListBalancingRunsRequest {
            kind: kind.into(),
            limit: 0,
        });
        let listed = self
            .served
            .runtime
            .block_on(self.balancing.list_balancing_runs(req));
        listed.unwrap().into_inner().runs
    }

    fn status(&self) -> pb::BalancingStatus {
        let req = tonic::Request::new(pb::GetBalancingRequest {});
        let got = self
            .served
            .runtime
            .block_on(self.balancing.get_balancing(req));
        got.unwrap().into_inner()
    }

    /// The first run of `kind` the store holds, waiting for one to be decided.
    fn first_run(&self, kind: Kind) -> Withdrawal {
        let started = Instant::now();
        loop {
            if let Some(w) = self.store.by_request_prefix(kind.prefix()).unwrap().pop() {
                return w;
            }
            assert!(started.elapsed() < WAIT, "no {kind:?} run");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Mines until every one of `ids` is settled, and a block more, indexed.
    fn settle(&self, ids: &[u64]) {
        let started = Instant::now();
        while !ids
            .iter()
            .all(|id| self.store.get(*id).unwrap().unwrap().settled)
        {
            assert!(
                started.elapsed() < WAIT,
                "not settled: {:?}",
                ids.iter()
                    .map(|id| self.store.get(*id).unwrap().unwrap())
                    .collect::<Vec<_>>()
            );
            self.node.mine_to(1, &self.miner);
            std::thread::sleep(Duration::from_millis(200));
        }
        let tip = self.node.mine_to(1, &self.miner)[0];
        assert!(self.served.wait_for(tip, WAIT));
    }

    /// `blocks` blocks come and the executor looks at each: how many runs of `kind` there
    /// are.
    fn runs_after(&self, blocks: usize, kind: Kind) -> usize {
        for _ in 0..blocks {
            let tip = self.node.mine_to(1, &self.miner)[0];
            assert!(self.served.wait_for(tip, WAIT));
            std::thread::sleep(Duration::from_millis(300));
        }
        self.store.by_request_prefix(kind.prefix()).unwrap().len()
    }
}

fn policy_of(top_up: Option<LowWater>, consolidate: Option<Consolidation>) -> Balancing {
    Balancing {
        hot_wallet: "hot".into(),
        cold_wallet: "cold".into(),
        cold: None,
        sweep: None,
        top_up,
        consolidate,
    }
}

/// A top-up to 1.5 BTC below 0.5 BTC.
fn top_up_policy() -> Balancing {
    policy_of(
        Some(LowWater {
            below: btc(0.5),
            to: btc(1.5),
        }),
        None,
    )
}

fn btc(x: f64) -> Amount {
    Amount::from_btc(x).unwrap()
}

/// Low water: a hot wallet of 0.2 BTC under a mark of 0.5 BTC gets a top-up to 1.5 BTC
/// from the cold wallet. The orchestrator holds no cold key: the run waits in
/// AWAITING_SIGNATURES, WatchBalancingRuns surfaces it with its PSBT, cannot be cancelled,
/// and the offline signer's signature completes it. The hot wallet then holds exactly
/// 1.5 BTC, and no second top-up follows.
#[test]
fn below_the_low_water_mark_a_top_up_signed_offline_fills_the_hot_wallet_once() {
    let rig = Balanced::start(&[0.1, 0.1], &[1.0, 1.0, 1.0], top_up_policy());
    let watched = rig.served.runtime.block_on(
        rig.balancing
            .watch_balancing_runs(tonic::Request::new(pb::WatchBalancingRunsRequest {})),
    );
    let mut events = watched.unwrap().into_inner().into_inner();
    // The event: the top-up waiting for the cold signers, with its PSBT.
    let event = loop {
        let next = rig
            .served
            .runtime
            .block_on(async { tokio::time::timeout(WAIT, events.recv()).await })
            .expect("no balancing event")
            .unwrap()
            .unwrap();
        let state = next.run.as_ref().unwrap().state;
        if state == pb::WithdrawalState::AwaitingSignatures as i32 {
            break next;
        }
    };
    assert_eq!(event.kind, pb::BalancingKind::TopUp as i32);
    let run = event.run.clone().unwrap();
    assert_eq!(run.wallet, "cold");
    assert_eq!(run.amount_sat, btc(1.3).to_sat());
    assert!(run.request_id.starts_with("orchestrator.topup."), "{run:?}");
    let hot_address = Address::from_script(&rig.hot.script_at(0).unwrap(), Network::Regtest);
    assert_eq!(run.destination, hot_address.unwrap().to_string());
    let listed = rig.served.runtime.block_on(
        rig.signatures
            .list_pending_signatures(tonic::Request::new(pb::ListPendingSignaturesRequest {})),
    );
    let listed = listed.unwrap().into_inner().pending;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].withdrawal_id, &listed[0].psbt_base64),
        (run.id, &event.psbt_base64)
    );
    // While it waits: shown by GetBalancing, and not cancellable.
    let status = rig.status();
    assert_eq!(status.hot_spendable_sat, btc(0.2).to_sat());
    assert_eq!(status.top_up_below_sat, btc(0.5).to_sat());
    assert_eq!(status.unfinished.len(), 1);
    let cancel = rig
        .served
        .runtime
        .block_on(rig.withdrawals.cancel_withdrawal(tonic::Request::new(
            pb::CancelWithdrawalRequest { id: run.id },
        )));
    assert_eq!(cancel.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let bad_kind = rig
        .served
        .runtime
        .block_on(rig.balancing.list_balancing_runs(tonic::Request::new(
            pb::ListBalancingRunsRequest { kind: 99, limit: 0 },
        )));
    assert_eq!(bad_kind.unwrap_err().code(), tonic::Code::InvalidArgument);
    // The offline signer signs with the cold key.
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&event.psbt_base64)
        .unwrap();
    let mut psbt = Psbt::deserialize(&bytes).unwrap();
    psbt.sign(&xpriv(COLD), &Secp256k1::new()).unwrap();
    let submitted =
        rig.served
            .runtime
            .block_on(rig.signatures.submit_signature(tonic::Request::new(
                pb::SubmitSignatureRequest {
                    withdrawal_id: run.id,
                    psbt_base64: base64::engine::general_purpose::STANDARD.encode(psbt.serialize()),
                },
            )));
    assert_eq!(
        submitted.unwrap().into_inner().state,
        pb::WithdrawalState::Signed as i32
    );
    rig.settle(&[run.id]);
    let done = rig.store.get(run.id).unwrap().unwrap();
    assert_eq!((done.state, done.attempts.len()), (State::Completed, 1));
    let paid = rig.served.payments(&rig.node, "cold");
    assert_eq!(
        paid.get(&rig.hot.script_at(0).unwrap()),
        Some(&vec![btc(1.3).to_sat()])
    );
    let status = rig.status();
    assert_eq!(status.hot_spendable_sat, btc(1.5).to_sat());
    assert!(status.unfinished.is_empty());
    assert!(status.cold_spendable_sat < btc(1.7).to_sat());
    assert!(status.cold_spendable_sat > btc(1.69).to_sat());
    assert_eq!(rig.runs_after(3, Kind::TopUp), 1);
    assert_eq!(rig.runs(pb::BalancingKind::TopUp).len(), 1);
    // A client's withdrawal naming the cold wallet fails: only top-ups spend it.
    let outside = rig.node.new_address("bech32");
    let sneaky = rig
        .store
        .submit(
            Request {
                request_id: "client-from-cold".into(),
                wallet: "cold".into(),
                destination: outside,
                amount: btc(0.1),
                fee_rate: FeeRate::SatPerVb(2.0),
                max_fee: Amount::from_sat(20_000),
            },
            orchestrator::saga::now_ms(),
        )
        .unwrap()
        .withdrawal;
    let refused = rig.wait_for(sneaky.id, |w| w.state == State::Failed);
    let why = refused.failure_reason.unwrap();
    assert!(why.contains("is the cold wallet"), "{why}");
    assert!(rig.store.reserved().unwrap().is_empty());
}

/// Consolidation: 24 small coins in the hot wallet. A withdrawal holds some of them,
/// broadcast but left unmined (the node mines nothing below 10 sat/vB). While bitcoind has
/// no estimate, nothing is consolidated; once it falls below the threshold, 15 of the
/// other small coins are spent into one coin back to the hot wallet, none of the
/// withdrawal's. Both are paid once; no second consolidation follows (too few small coins
/// left).
#[test]
fn while_fees_are_low_small_coins_are_consolidated_but_never_a_withdrawals() {
    let rig = Balanced::start(
        &[0.001; 24],
        &[],
        policy_of(
            None,
            Some(Consolidation {
                max_rate: 5.0,
                coins_below: Amount::from_sat(1_000_000),
                min_coins: 10,
                max_coins: 15,
            }),
        ),
    );
    assert_eq!(rig.status().small_coins, 24);
    rig.node.call("devnet_setminingfeerate", json!([10]));
    let destination = rig.node.new_address("bech32");
    let client = rig
        .store
        .submit(
            Request {
                request_id: "client-1".into(),
                wallet: "hot".into(),
                destination: destination.clone(),
                amount: Amount::from_sat(350_000),
                fee_rate: FeeRate::SatPerVb(2.0),
                max_fee: Amount::from_sat(20_000),
            },
            orchestrator::saga::now_ms(),
        )
        .unwrap()
        .withdrawal;
    let held = rig
        .wait_for(client.id, |w| w.state == State::Broadcast)
        .coins;
    assert!(
        held.len() >= 4,
        "0.0035 BTC takes 4 coins of 0.001: {held:?}"
    );
    // No estimate yet: a block comes (without the withdrawal) and nothing is consolidated.
    assert_eq!(rig.runs_after(1, Kind::Consolidation), 0);
    // 2 sat/vB, below the threshold of 5.
    rig.node.call("devnet_setfeeestimate", json!([0.00002]));
    let tip = rig.node.mine_to(1, &rig.miner)[0];
    assert!(rig.served.wait_for(tip, WAIT));
    let run = rig.first_run(Kind::Consolidation);
    let run = rig.wait_for(run.id, |w| w.state == State::Broadcast);
    assert_eq!(run.coins.len(), 15, "{run:?}");
    for coin in &run.coins {
        assert!(
            !held.iter().any(|h| h.outpoint == coin.outpoint),
            "the withdrawal's coin {coin:?} consolidated"
        );
    }
    assert_eq!(
        rig.store.get(client.id).unwrap().unwrap().state,
        State::Broadcast,
        "the withdrawal was still unmined, its coins held, when the consolidation chose"
    );
    rig.node.call("devnet_setminingfeerate", json!([0]));
    rig.settle(&[client.id, run.id]);
    let done = rig.store.get(run.id).unwrap().unwrap();
    assert_eq!(done.state, State::Completed);
    let attempt = done.current().unwrap();
    let tx: bitcoin::Transaction = bitcoin::consensus::deserialize(&attempt.raw).unwrap();
    assert_eq!((tx.input.len(), tx.output.len()), (15, 1));
    assert_eq!(tx.output[0].script_pubkey, rig.hot.script_at(0).unwrap());
    assert_eq!(tx.output[0].value, btc(0.015) - attempt.fee);
    assert!(attempt.fee_rate <= 5.0, "{done:?}");
    let paid = rig.served.payments(&rig.node, "hot");
    assert_eq!(paid.get(&script_of(&destination)), Some(&vec![350_000]));
    assert_eq!(rig.runs_after(3, Kind::Consolidation), 1);
    assert_eq!(rig.runs(pb::BalancingKind::Consolidation).len(), 1);
    assert!(rig.status().small_coins < 10);
    assert!(rig.store.reserved().unwrap().is_empty());
}

/// Low water on the Temporal engine: the balancing workflow starts a top-up from the cold
/// wallet to 1.5 BTC, which waits in AWAITING_SIGNATURES with its PSBT listed by the
/// Signatures API (no key of the orchestrator's signs for the cold wallet: the hot key's
/// signature is refused, and a cancel too); the offline signer's signature completes it,
/// the hot wallet then holds exactly 1.5 BTC, and no second top-up follows.
#[test]
fn on_temporal_below_the_low_water_mark_a_top_up_signed_offline_fills_the_hot_wallet_once() {
    use orchestrator::temporal::service::TemporalWithdrawals;
    use orchestrator::temporal::signatures::TemporalSignatures;
    use orchestrator::temporal::WorkflowPolicy;
    let funded = Funded::new(&[0.1, 0.1], &[1.0, 1.0, 1.0], top_up_policy());
    let runtime = &funded.served.runtime;
    let server = system_tests::temporal::TemporalServer::start();
    let (target, client) = system_tests::temporal::connect_to(&server, runtime);
    let withdrawals = TemporalWithdrawals::new(
        client,
        "default".into(),
        "withdrawals".into(),
        Network::Regtest,
        WorkflowPolicy {
            poll_secs: 5,
            ..WorkflowPolicy::of(funded.payments.policy())
        },
    );
    let signatures = TemporalSignatures::new(withdrawals.clone());
    let (stop, worker) =
        system_tests::temporal::spawn_worker(orchestrator::temporal::worker::Engine {
            target: target.clone(),
            network: Network::Regtest,
            payments: funded.payments.clone(),
            indexer: orchestrator::indexer_client::open_client(funded.served.channel.clone()),
            events: None,
            hook: None,
        });
    let list = || {
        let req = tonic::Request::new(pb::ListPendingSignaturesRequest {});
        let listed = runtime.block_on(signatures.list_pending_signatures(req));
        listed.unwrap().into_inner().pending
    };
    let status = |request_id: &str| runtime.block_on(withdrawals.status(request_id)).unwrap();
    // Decided once a block: blocks come until the top-up waits for its signers.
    let started = Instant::now();
    let listed = loop {
        let listed = list();
        if !listed.is_empty() {
            break listed;
        }
        assert!(started.elapsed() < WAIT, "no top-up listed");
        funded.node.mine_to(1, &funded.miner);
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(listed.len(), 1);
    let p = &listed[0];
    assert!(p.request_id.starts_with("orchestrator.topup."), "{p:?}");
    let run = status(&p.request_id).unwrap();
    assert_eq!(run.state, State::AwaitingSignatures);
    assert_eq!(
        (run.request.wallet.as_str(), run.request.amount),
        ("cold", btc(1.3))
    );
    let hot_address = Address::from_script(&funded.hot.script_at(0).unwrap(), Network::Regtest);
    assert_eq!(run.request.destination, hot_address.unwrap().to_string());
    let cancel = runtime.block_on(withdrawals.cancel_withdrawal(tonic::Request::new(
        pb::CancelWithdrawalRequest { id: run.id },
    )));
    assert_eq!(cancel.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&p.psbt_base64)
        .unwrap();
    let psbt = Psbt::deserialize(&bytes).unwrap();
    let submit = |psbt: &Psbt| {
        runtime
            .block_on(signatures.submit_signature(tonic::Request::new(
                pb::SubmitSignatureRequest {
                    withdrawal_id: run.id,
                    psbt_base64: base64::engine::general_purpose::STANDARD.encode(psbt.serialize()),
                },
            )))
            .map(|r| r.into_inner())
    };
    // The hot key is not one of the cold wallet's: nothing to sign, refused.
    let mut by_hot = psbt.clone();
    // (The PSBT names only the cold key: the hot one signs nothing of it.)
    let _ = by_hot.sign(&xpriv(HOT), &Secp256k1::new());
    let refused = submit(&by_hot).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("no new signature"),
        "{refused:?}"
    );
    assert_eq!(status(&p.request_id).unwrap(), run, "nothing changed");
    // The offline signer signs with the cold key.
    let mut by_cold = psbt;
    by_cold.sign(&xpriv(COLD), &Secp256k1::new()).unwrap();
    // Signed (or already sent by the run, from the signatures just recorded).
    let signed = submit(&by_cold).unwrap();
    let sent = [pb::WithdrawalState::Signed, pb::WithdrawalState::Broadcast];
    assert!(sent.iter().any(|s| signed.state == *s as i32), "{signed:?}");
    let started = Instant::now();
    while !status(&p.request_id).unwrap().settled {
        assert!(started.elapsed() < WAIT, "not settled");
        funded.node.mine_to(1, &funded.miner);
        std::thread::sleep(Duration::from_millis(200));
    }
    let done = status(&p.request_id).unwrap();
    assert_eq!((done.state, done.attempts.len()), (State::Completed, 1));
    // Blocks come and no second top-up starts.
    for _ in 0..3 {
        let tip = funded.node.mine_to(1, &funded.miner)[0];
        assert!(funded.served.wait_for(tip, WAIT));
        std::thread::sleep(Duration::from_millis(300));
    }
    let paid = funded.served.payments(&funded.node, "cold");
    assert_eq!(
        paid.get(&funded.hot.script_at(0).unwrap()),
        Some(&vec![btc(1.3).to_sat()])
    );
    let from_cold = runtime.block_on(withdrawals.list_withdrawals(tonic::Request::new(
        pb::ListWithdrawalsRequest {
            wallet: "cold".into(),
            ..Default::default()
        },
    )));
    assert_eq!(from_cold.unwrap().into_inner().withdrawals.len(), 1);
    assert!(list().is_empty());
    system_tests::temporal::record_histories(&target);
    let _ = stop.send(());
    worker.join().unwrap();
}
