//! External signers on real parts over 127.0.0.1: a hot wallet described by a descriptor
//! (a 2-of-3 `wsh(sortedmulti)` with one hot key, a `tr()` key held only by a remote
//! signer), the devnet checking every script, the indexer following it, and the executor
//! with the Signatures API, on the embedded engine or on Temporal (a dev server started
//! by the test, a worker as `orchestrator run` runs it). The remote signer takes the PSBT
//! from ListPendingSignatures, signs it with its own key and sends it back with
//! SubmitSignature; the hot key signs last and the withdrawal is paid exactly once. Bad
//! signatures change nothing.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::Secp256k1;
use bitcoin::{Address, Amount, Network, Psbt};
use orchestrator::descriptor_wallet::DescriptorWallet;
use orchestrator::executor::{Executor, Policy};
use orchestrator::grpc::WithdrawalService;
use orchestrator::grpc_signatures::SignatureService;
use orchestrator::payment::Payments;
use orchestrator::saga::{FeeRate, Request, State, Withdrawal};
use orchestrator::signer::KeyFileSigner;
use orchestrator::store::SagaStore;
use orchestrator::temporal::service::TemporalWithdrawals;
use orchestrator::temporal::signatures::TemporalSignatures;
use orchestrator::temporal::WorkflowPolicy;
use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::signatures_server::Signatures;
use proto::orchestrator::v1::withdrawals_server::Withdrawals;
use serde_json::json;
use system_tests::harness::{script_of, wait_for_saga, xpriv, xpub, TestWallet};
use system_tests::live::{Devnet, Indexer};
use system_tests::temporal::TemporalServer;

const WAIT: Duration = Duration::from_secs(30);

/// A descriptor wallet funded by the node and watched by the indexer, an executor paying
/// from it with `hot` in its key file, and the Signatures API over its saga database.
struct Cosigned {
    node: Devnet,
    miner: String,
    store: Arc<SagaStore>,
    served: Indexer,
    signatures: SignatureService,
    withdrawals: WithdrawalService,
    payments: Payments,
    executor: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    /// On the Temporal engine (`store` and the executor then unused).
    temporal: Option<OnTemporal>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// Which engine runs the withdrawals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Embedded,
    Temporal,
}

/// The Temporal engine of a rig: the dev server, one worker (a thread and runtime of its
/// own, as `orchestrator run` runs it) and the API objects the tests call.
struct OnTemporal {
    worker: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
    target: orchestrator::config::TemporalTarget,
    withdrawals: TemporalWithdrawals,
    signatures: TemporalSignatures,
    client: temporalio_client::Client,
    /// Numeric id -> request id, as submitted.
    ids: std::sync::Mutex<std::collections::HashMap<u64, String>>,
    _server: TemporalServer,
}

impl OnTemporal {
    fn stop_worker(&mut self) {
        if let Some((stop, running)) = self.worker.take() {
            let _ = stop.send(());
            let _ = running.join();
        }
    }
}

impl Drop for OnTemporal {
    fn drop(&mut self) {
        system_tests::temporal::record_histories(&self.target);
        // While the server still runs, so the worker stops cleanly.
        self.stop_worker();
    }
}

impl Cosigned {
    fn start(descriptor: &str, hot: &[Xpriv], coins: usize) -> Cosigned {
        Self::start_with(descriptor, hot, coins, policy())
    }

    /// The same, paying under `policy`.
    fn start_with(descriptor: &str, hot: &[Xpriv], coins: usize, policy: Policy) -> Cosigned {
        Self::start_on(Engine::Embedded, descriptor, hot, coins, policy)
    }

    /// The same on `engine`.
    fn start_on(
        engine: Engine,
        descriptor: &str,
        hot: &[Xpriv],
        coins: usize,
        policy: Policy,
    ) -> Cosigned {
        use std::os::unix::fs::PermissionsExt;
        let node = Devnet::start(|c| c.filler_txs = 0);
        let miner = node.new_address("bech32");
        node.mine_to(101, &miner);
        let wallet = Arc::new(DescriptorWallet::parse(descriptor, Network::Regtest, 20).unwrap());
        let mut scripts: Vec<_> = wallet.scripts();
        scripts.sort();
        for script in scripts.iter().take(coins) {
            let address = Address::from_script(script, Network::Regtest).unwrap();
            node.call("sendtoaddress", json!([address.to_string(), 0.5]));
        }
        node.mine_to(1, &miner);
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("hot.keys");
        let keys: Vec<String> = hot.iter().map(|k| k.to_string()).collect();
        std::fs::write(&key_file, keys.join("\n")).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let db = tempfile::tempdir().unwrap();
        let watched = [TestWallet {
            name: "hot".into(),
            scripts: scripts.iter().cloned().collect(),
        }];
        let served = Indexer::caught_up(&node, db.path(), &watched);
        let store = Arc::new(SagaStore::open(&dir.path().join("sagas")).unwrap());
        let payments = Payments::new(
            Arc::new(node.daemon(false)),
            Arc::new(KeyFileSigner::open(&key_file, Network::Regtest).unwrap()),
            Network::Regtest,
            scripts[coins].clone(),
            policy,
        )
        .with_descriptor_wallet(wallet);
        let mut rig = Cosigned {
            signatures: SignatureService::new(store.clone(), payments.clone()),
            withdrawals: WithdrawalService::new(store.clone(), Network::Regtest),
            payments,
            executor: None,
            temporal: None,
            node,
            miner,
            store,
            served,
            _dirs: (dir, db),
        };
        match engine {
            Engine::Embedded => rig.start_executor(),
            Engine::Temporal => rig.start_temporal(),
        }
        rig
    }

    /// A dev server, the API objects over it and one worker.
    fn start_temporal(&mut self) {
        let server = TemporalServer::start();
        let (target, client) = system_tests::temporal::connect_to(&server, &self.served.runtime);
        let withdrawals = TemporalWithdrawals::new(
            client.clone(),
            "default".into(),
            "withdrawals".into(),
            Network::Regtest,
            WorkflowPolicy {
                poll_secs: 5,
                ..WorkflowPolicy::of(self.payments.policy())
            },
        );
        self.temporal = Some(OnTemporal {
            worker: None,
            target,
            signatures: TemporalSignatures::new(withdrawals.clone()),
            withdrawals,
            client,
            ids: Default::default(),
            _server: server,
        });
        self.start_worker();
    }

    /// Starts the Temporal worker (worker, adapter and API, as a process runs them).
    fn start_worker(&mut self) {
        let t = self.temporal.as_mut().unwrap();
        let engine = orchestrator::temporal::worker::Engine {
            target: t.target.clone(),
            network: Network::Regtest,
            payments: self.payments.clone(),
            indexer: orchestrator::indexer_client::open_client(self.served.channel.clone()),
            events: None,
            hook: None,
        };
        t.worker = Some(system_tests::temporal::spawn_worker(engine));
    }

    fn start_executor(&mut self) {
        let executor = Executor::new(
            self.store.clone(),
            orchestrator::indexer_client::open_client(self.served.channel.clone()),
            self.payments.clone(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = self.served.runtime.spawn(executor.run(async {
            let _ = stopped.await;
        }));
        self.executor = Some((stop, running));
    }

    /// Stops the executor (or the Temporal worker) and starts another, as a restarted
    /// process would.
    fn restart_engine(&mut self) {
        if let Some(t) = &mut self.temporal {
            t.stop_worker();
            self.start_worker();
            return;
        }
        let (stop, running) = self.executor.take().unwrap();
        let _ = stop.send(());
        self.served.runtime.block_on(running).unwrap();
        self.start_executor();
    }

    fn submit(&self, name: &str, destination: &str, sat: u64) -> u64 {
        let Some(t) = &self.temporal else {
            let request = Request {
                request_id: name.into(),
                wallet: "hot".into(),
                destination: destination.into(),
                amount: Amount::from_sat(sat),
                fee_rate: FeeRate::SatPerVb(3.0),
                max_fee: Amount::from_sat(20_000),
            };
            return self.store.submit(request, 0).unwrap().withdrawal.id;
        };
        let asked = pb::SubmitWithdrawalRequest {
            request_id: name.into(),
            wallet: "hot".into(),
            destination: destination.into(),
            amount_sat: sat,
            max_fee_sat: 20_000,
            fee_rate: Some(pb::submit_withdrawal_request::FeeRate::SatPerVb(3.0)),
        };
        let shown = self
            .served
            .runtime
            .block_on(t.withdrawals.submit_withdrawal(tonic::Request::new(asked)))
            .unwrap()
            .into_inner();
        t.ids.lock().unwrap().insert(shown.id, name.into());
        shown.id
    }

    /// The withdrawal's whole record (the store's, or the workflow's state).
    fn get(&self, id: u64) -> Withdrawal {
        let Some(t) = &self.temporal else {
            return self.store.get(id).unwrap().unwrap();
        };
        let request_id = t.ids.lock().unwrap()[&id].clone();
        let started = Instant::now();
        loop {
            // UNAVAILABLE: the server could not answer now; ask again, as the API says.
            match self
                .served
                .runtime
                .block_on(t.withdrawals.status(&request_id))
            {
                Ok(w) => return w.expect("the workflow exists"),
                Err(e) if e.code() == tonic::Code::Unavailable && started.elapsed() < WAIT => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("querying withdrawal {id}: {e}"),
            }
        }
    }

    fn wait_for(&self, id: u64, ok: impl Fn(&Withdrawal) -> bool) -> Withdrawal {
        if self.temporal.is_none() {
            return wait_for_saga(&self.store, id, WAIT, ok);
        }
        let started = Instant::now();
        loop {
            let w = self.get(id);
            if ok(&w) {
                return w;
            }
            assert!(started.elapsed() < WAIT, "withdrawal {id} stuck at {w:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether every reservation was given back (on Temporal: the wallet's workflow
    /// holds nothing, waited for, as a withdrawal gives its coins back as it ends).
    fn released(&self) -> bool {
        let Some(t) = &self.temporal else {
            return self.store.reserved().unwrap().is_empty();
        };
        use orchestrator::temporal::hot_wallet::HotWalletWorkflow;
        let handle = t.client.get_workflow_handle::<HotWalletWorkflow>(
            orchestrator::temporal::hot_wallet_workflow_id("hot"),
        );
        let started = Instant::now();
        while started.elapsed() < WAIT {
            let held = self.served.runtime.block_on(handle.query(
                HotWalletWorkflow::held,
                (),
                temporalio_client::WorkflowQueryOptions::default(),
            ));
            if held.unwrap().is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn cancel(&self, id: u64) -> Result<pb::Withdrawal, tonic::Status> {
        let req = tonic::Request::new(pb::CancelWithdrawalRequest { id });
        let done = match &self.temporal {
            None => self
                .served
                .runtime
                .block_on(self.withdrawals.cancel_withdrawal(req)),
            Some(t) => self
                .served
                .runtime
                .block_on(t.withdrawals.cancel_withdrawal(req)),
        };
        done.map(|r| r.into_inner())
    }

    /// The versions waiting for signatures now.
    fn pending(&self) -> Vec<pb::PendingSignature> {
        let req = tonic::Request::new(pb::ListPendingSignaturesRequest {});
        let listed = match &self.temporal {
            None => self
                .served
                .runtime
                .block_on(self.signatures.list_pending_signatures(req)),
            Some(t) => self
                .served
                .runtime
                .block_on(t.signatures.list_pending_signatures(req)),
        };
        listed.unwrap().into_inner().pending
    }

    /// The versions waiting, once one is listed (Temporal's search index may show a
    /// version that began waiting a moment ago only a moment later).
    fn listed(&self) -> Vec<pb::PendingSignature> {
        let started = Instant::now();
        loop {
            let listed = self.pending();
            if !listed.is_empty() || started.elapsed() > WAIT {
                return listed;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn submit_signature(&self, id: u64, psbt: &Psbt) -> Result<pb::Withdrawal, tonic::Status> {
        self.submit_base64(
            id,
            base64::engine::general_purpose::STANDARD.encode(psbt.serialize()),
        )
    }

    fn submit_base64(&self, id: u64, psbt_base64: String) -> Result<pb::Withdrawal, tonic::Status> {
        let req = tonic::Request::new(pb::SubmitSignatureRequest {
            withdrawal_id: id,
            psbt_base64,
        });
        let done = match &self.temporal {
            None => self
                .served
                .runtime
                .block_on(self.signatures.submit_signature(req)),
            Some(t) => self
                .served
                .runtime
                .block_on(t.signatures.submit_signature(req)),
        };
        done.map(|r| r.into_inner())
    }

    /// Waits until `id` awaits signatures, then signs its PSBT as B and sends it back.
    fn sign_remotely(&self, id: u64) {
        self.wait_for(id, |w| w.state == State::AwaitingSignatures);
        let mut psbt = decode(&self.listed()[0]);
        psbt.sign(&xpriv(2), &Secp256k1::new()).unwrap();
        self.submit_signature(id, &psbt).unwrap();
    }

    /// Completes `psbt` as the external signers B and C of [`two_of_three`], without the
    /// hot key, and sends it to the node themselves.
    fn send_as_b_and_c(&self, descriptor: &str, mut psbt: Psbt) -> bitcoin::Transaction {
        let secp = Secp256k1::new();
        psbt.sign(&xpriv(2), &secp).unwrap();
        psbt.sign(&xpriv(3), &secp).unwrap();
        let wallet = DescriptorWallet::parse(descriptor, Network::Regtest, 20).unwrap();
        wallet.finalize(&mut psbt).unwrap();
        let tx = psbt.extract_tx().unwrap();
        let hex = bitcoin::consensus::encode::serialize_hex(&tx);
        self.node.call("sendrawtransaction", json!([hex]));
        tx
    }

    /// Mines until `id` is settled; what the hot wallet's spends paid, by script.
    fn settle(&self, id: u64) -> std::collections::HashMap<bitcoin::ScriptBuf, Vec<u64>> {
        let started = Instant::now();
        while !self.get(id).settled {
            assert!(started.elapsed() < WAIT, "not settled");
            self.node.mine_to(1, &self.miner);
            std::thread::sleep(Duration::from_millis(200));
        }
        let tip = self.node.mine_to(1, &self.miner)[0];
        assert!(self.served.wait_for(tip, WAIT));
        self.served.payments(&self.node, "hot")
    }
}

/// 2-of-3: A (hot), B (the remote signer), C (cold).
fn two_of_three() -> String {
    format!(
        "wsh(sortedmulti(2,{}/0/*,{}/0/*,{}/0/*))",
        xpub(1),
        xpub(2),
        xpub(3)
    )
}

/// One confirmation completes, two settle.
fn policy() -> Policy {
    Policy {
        confirmations: 1,
        settle_at: 2,
        ..Policy::default()
    }
}

/// The same, replacing a payment unmined after one block.
fn bumping() -> Policy {
    Policy {
        bump_after_blocks: 1,
        ..policy()
    }
}

/// The PSBT a signer got, decoded.
fn decode(p: &pb::PendingSignature) -> Psbt {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&p.psbt_base64)
        .unwrap();
    Psbt::deserialize(&bytes).unwrap()
}

/// 2-of-3 with one hot key (A), one remote signer (B) and a cold key (C) nobody uses. The
/// withdrawal waits in AWAITING_SIGNATURES with the PSBT listed (no signature of A's in
/// it: the hot key signs last); garbage, a PSBT of another transaction and a forged
/// signature are refused and change nothing; a cancel is refused; B's signature
/// completes it and it is paid exactly once.
#[test]
fn a_two_of_three_with_a_remote_signer_pays_a_withdrawal_end_to_end() {
    remote_signer_pays(Engine::Embedded);
}

/// The same on the Temporal engine.
#[test]
fn on_temporal_a_two_of_three_with_a_remote_signer_pays_a_withdrawal_end_to_end() {
    remote_signer_pays(Engine::Temporal);
}

fn remote_signer_pays(engine: Engine) {
    let descriptor = two_of_three();
    let rig = Cosigned::start_on(engine, &descriptor, &[xpriv(1)], 2, policy());
    let destination = rig.node.new_address("bech32");
    let id = rig.submit("multisig-1", &destination, 30_000_000);
    let waiting = rig.wait_for(id, |w| w.state == State::AwaitingSignatures);
    let listed = rig.listed();
    assert_eq!(listed.len(), 1);
    let p = &listed[0];
    assert_eq!((p.withdrawal_id, p.replacing), (id, false));
    assert_eq!(p.txid, waiting.pending.as_ref().unwrap().txid.to_string());
    let psbt = decode(p);
    assert!(psbt
        .inputs
        .iter()
        .all(|i| i.partial_sigs.is_empty() && i.witness_script.is_some()));
    // Bad input is refused and changes nothing.
    let garbage = rig.submit_base64(id, "not base64!".into()).unwrap_err();
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument, "{garbage:?}");
    let mut other = psbt.clone();
    other.unsigned_tx.lock_time = bitcoin::absolute::LockTime::from_height(1).unwrap();
    let e = rig.submit_signature(id, &other).unwrap_err();
    assert!(e.message().contains("not of the pending"), "{e:?}");
    let mut forged = psbt.clone();
    forged.sign(&xpriv(2), &Secp256k1::new()).unwrap();
    let (key, sig) = forged.inputs[0]
        .partial_sigs
        .iter()
        .next()
        .map(|(k, s)| (*k, *s))
        .unwrap();
    let mut wrong = psbt.clone();
    let other_input = if psbt.inputs.len() > 1 { 1 } else { 0 };
    let mut swapped = sig;
    // A signature of key B over another input's sighash (or a tweaked one): it does not verify.
    swapped.signature = if other_input == 1 {
        forged.inputs[1].partial_sigs[&key].signature
    } else {
        let mut bytes = sig.signature.serialize_compact();
        bytes[10] ^= 1;
        bitcoin::secp256k1::ecdsa::Signature::from_compact(&bytes).unwrap()
    };
    wrong.inputs[0].partial_sigs.insert(key, swapped);
    let e = rig.submit_signature(id, &wrong).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("does not verify"), "{e:?}");
    assert_eq!(rig.get(id), waiting, "nothing changed");
    let refused = rig.cancel(id).unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("external signers"),
        "{refused:?}"
    );
    // The remote signer's signature completes it: the hot key signs last. (On Temporal
    // the run may have completed and sent it first, from the signatures just recorded.)
    let signed = rig.submit_signature(id, &forged).unwrap();
    let sent = [pb::WithdrawalState::Signed, pb::WithdrawalState::Broadcast];
    assert!(sent.iter().any(|s| signed.state == *s as i32), "{signed:?}");
    assert_eq!(
        signed.txid, p.txid,
        "segwit: signatures do not change the txid"
    );
    assert!(rig.pending().is_empty());
    let again = rig.submit_signature(id, &forged).unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    let paid = rig.settle(id);
    let done = rig.wait_for(id, |w| w.state == State::Completed);
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(paid.get(&script_of(&destination)), Some(&vec![30_000_000]));
    assert!(rig.released());
}

/// A `tr()` wallet whose only key is a remote signer's: the orchestrator holds no key of
/// it, lists the PSBT, and the signer's key-path signature completes the payment.
#[test]
fn a_taproot_key_path_wallet_signed_remotely_pays_a_withdrawal() {
    let descriptor = format!("tr({}/0/*)", xpub(4));
    // The hot key file holds an unrelated key: nothing of this wallet's.
    let rig = Cosigned::start(&descriptor, &[xpriv(9)], 1);
    let destination = rig.node.new_address("bech32m");
    let id = rig.submit("taproot-1", &destination, 10_000_000);
    rig.wait_for(id, |w| w.state == State::AwaitingSignatures);
    let mut psbt = decode(&rig.pending()[0]);
    assert!(psbt.inputs[0].tap_internal_key.is_some());
    psbt.sign(&xpriv(4), &Secp256k1::new()).unwrap();
    assert!(psbt.inputs[0].tap_key_sig.is_some());
    let signed = rig.submit_signature(id, &psbt).unwrap();
    assert_eq!(
        signed.state,
        pb::WithdrawalState::Signed as i32,
        "{signed:?}"
    );
    let paid = rig.settle(id);
    assert_eq!(paid.get(&script_of(&destination)), Some(&vec![10_000_000]));
}

/// A 2-of-3 payment stuck below the node's mining rate is replaced by fee: the
/// replacement waits for the remote signer too (listed as replacing, the first version
/// still on the network), survives a restart of the executor, and once signed replaces
/// the first; the withdrawal completes by it, paid once.
#[test]
fn a_stuck_multisig_payment_is_replaced_once_the_remote_signer_signs_again() {
    replaced_once_signed_again(Engine::Embedded);
}

/// The same on the Temporal engine (its worker restarted while the replacement waits).
#[test]
fn on_temporal_a_stuck_multisig_payment_is_replaced_once_the_remote_signer_signs_again() {
    replaced_once_signed_again(Engine::Temporal);
}

fn replaced_once_signed_again(engine: Engine) {
    let descriptor = two_of_three();
    let mut rig = Cosigned::start_on(engine, &descriptor, &[xpriv(1)], 1, bumping());
    rig.node.call("devnet_setminingfeerate", json!([6]));
    let destination = rig.node.new_address("bech32");
    let id = rig.submit("stuck-multisig", &destination, 20_000_000);
    rig.sign_remotely(id);
    let sent = rig.wait_for(id, |w| w.state == State::Broadcast && !w.needs_broadcast);
    // Unmined after a block: a replacement, which needs the remote signer again.
    rig.node.mine_to(1, &rig.miner);
    let waiting = rig.wait_for(id, |w| w.pending.is_some());
    assert_eq!(
        waiting.state,
        State::Broadcast,
        "the first version is still out there"
    );
    rig.restart_engine();
    let listed = rig.listed();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].replacing);
    assert!(listed[0].feerate_sat_vb > sent.current().unwrap().fee_rate);
    let mut replacement = decode(&listed[0]);
    replacement.sign(&xpriv(2), &Secp256k1::new()).unwrap();
    let replaced = rig.submit_signature(id, &replacement).unwrap();
    assert_eq!(replaced.txids.len(), 2, "{replaced:?}");
    // Stepped up until the node mines it (a replacement a block, each signed remotely).
    let started = Instant::now();
    loop {
        let w = rig.get(id);
        if w.state == State::Completed {
            break;
        }
        assert!(started.elapsed() < WAIT, "stuck at {w:?}");
        for p in rig.pending() {
            let mut psbt = decode(&p);
            psbt.sign(&xpriv(2), &Secp256k1::new()).unwrap();
            match rig.submit_signature(p.withdrawal_id, &psbt) {
                // An earlier version confirmed meanwhile: nothing waits any more.
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {}
                other => {
                    other.unwrap();
                }
            }
        }
        rig.node.mine_to(1, &rig.miner);
        std::thread::sleep(Duration::from_millis(200));
    }
    let paid = rig.settle(id);
    let done = rig.get(id);
    assert!(
        done.attempts.len() >= 2 && done.current().unwrap().fee_rate >= 6.0,
        "{done:?}"
    );
    assert_eq!(paid.get(&script_of(&destination)), Some(&vec![20_000_000]));
}

/// The external signers (B and C of a 2-of-3) complete the listed PSBT without the hot
/// key and send it themselves: the withdrawal, awaiting their signatures, finds the
/// transaction in the node's mempool, takes it as its version and completes by it; the
/// destination is paid once.
#[test]
fn when_the_external_signers_complete_and_send_it_themselves_the_withdrawal_follows() {
    sent_by_the_signers(Engine::Embedded);
}

/// The same on the Temporal engine.
#[test]
fn on_temporal_when_the_signers_complete_and_send_it_themselves_the_withdrawal_follows() {
    sent_by_the_signers(Engine::Temporal);
}

fn sent_by_the_signers(engine: Engine) {
    let descriptor = two_of_three();
    let rig = Cosigned::start_on(engine, &descriptor, &[xpriv(1)], 1, policy());
    let destination = rig.node.new_address("bech32");
    let id = rig.submit("outside", &destination, 15_000_000);
    rig.wait_for(id, |w| w.state == State::AwaitingSignatures);
    let listed = rig.listed();
    let tx = rig.send_as_b_and_c(&descriptor, decode(&listed[0]));
    // Looked for in the mempool once a block: mine one.
    rig.node.mine_to(1, &rig.miner);
    let followed = rig.wait_for(id, |w| w.state == State::Completed);
    assert_eq!(followed.attempts.len(), 1);
    assert_eq!(followed.confirmed, Some(tx.compute_txid()));
    assert!(followed
        .current()
        .unwrap()
        .fee_choice
        .contains("external signers"));
    let paid = rig.settle(id);
    assert_eq!(paid.get(&script_of(&destination)), Some(&vec![15_000_000]));
}

/// Batching and a remote signer together: the batch's PSBT is listed under the batch's
/// id, a member's id points there, and the remote signature pays every member by one
/// transaction.
#[test]
fn a_batch_from_a_multisig_wallet_is_signed_remotely_as_one_transaction() {
    batch_signed_remotely(Engine::Embedded);
}

/// The same on Temporal: the batch's workflow waits for the signatures, its members
/// follow it.
#[test]
fn on_temporal_a_batch_from_a_multisig_wallet_is_signed_remotely_as_one_transaction() {
    batch_signed_remotely(Engine::Temporal);
}

fn batch_signed_remotely(engine: Engine) {
    let descriptor = two_of_three();
    let batching = Policy {
        batch: Some(orchestrator::executor::Batching {
            window_ms: 60_000,
            max_outputs: 3,
        }),
        ..policy()
    };
    let rig = Cosigned::start_on(engine, &descriptor, &[xpriv(1)], 1, batching);
    let destinations: Vec<String> = (0..3).map(|_| rig.node.new_address("bech32")).collect();
    let ids: Vec<u64> = destinations
        .iter()
        .enumerate()
        .map(|(i, d)| rig.submit(&format!("batched-{i}"), d, 1_000_000 + i as u64))
        .collect();
    let member = rig.wait_for(ids[0], |w| w.state == State::AwaitingSignatures);
    let batch = member.batch.unwrap();
    let listed = rig.pending();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].withdrawal_id, batch);
    let mut psbt = decode(&listed[0]);
    psbt.sign(&xpriv(2), &Secp256k1::new()).unwrap();
    let e = rig.submit_signature(ids[0], &psbt).unwrap_err();
    assert!(
        e.message().contains(&format!("withdrawal_id {batch}")),
        "{e:?}"
    );
    rig.submit_signature(batch, &psbt).unwrap();
    let started = Instant::now();
    while ids.iter().any(|id| !rig.get(*id).settled) {
        assert!(
            started.elapsed() < WAIT,
            "not settled: batch {:?}, members {:?}",
            rig.store.batch(batch).unwrap(),
            ids.iter().map(|id| rig.get(*id)).collect::<Vec<_>>()
        );
        rig.node.mine_to(1, &rig.miner);
        std::thread::sleep(Duration::from_millis(200));
    }
    let paid = rig.settle(ids[0]);
    let txids: std::collections::BTreeSet<_> = ids
        .iter()
        .map(|id| rig.get(*id).confirmed.unwrap())
        .collect();
    assert_eq!(txids.len(), 1, "one transaction");
    for (i, d) in destinations.iter().enumerate() {
        assert_eq!(paid.get(&script_of(d)), Some(&vec![1_000_000 + i as u64]));
    }
}

/// A stuck 2-of-3 payment's replacement waits for signatures; B and C complete it and
/// send it themselves: the withdrawal takes it as its replacement and completes by it.
#[test]
fn a_replacement_the_signers_send_themselves_is_followed() {
    let descriptor = two_of_three();
    let rig = Cosigned::start_with(&descriptor, &[xpriv(1)], 1, bumping());
    rig.node.call("devnet_setminingfeerate", json!([6]));
    let destination = rig.node.new_address("bech32");
    let id = rig.submit("replaced-outside", &destination, 12_000_000);
    rig.sign_remotely(id);
    rig.wait_for(id, |w| w.state == State::Broadcast && !w.needs_broadcast);
    rig.node.mine_to(1, &rig.miner);
    rig.wait_for(id, |w| w.pending.is_some());
    let tx = rig.send_as_b_and_c(&descriptor, decode(&rig.pending()[0]));
    rig.node.call("devnet_setminingfeerate", json!([1]));
    rig.node.mine_to(1, &rig.miner);
    let done = rig.wait_for(id, |w| w.state == State::Completed);
    assert_eq!(done.confirmed, Some(tx.compute_txid()));
    assert_eq!(done.attempts.len(), 2);
    let paid = rig.settle(id);
    assert_eq!(paid.get(&script_of(&destination)), Some(&vec![12_000_000]));
}
