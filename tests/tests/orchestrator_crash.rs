//! `orchestrator run` as a process, killed with SIGKILL at random moments while it works
//! through withdrawals and blocks arrive, then restarted: every withdrawal completes,
//! each destination is paid exactly once with exactly its amount, no coin twice.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bitcoin::consensus::deserialize;
use bitcoin::{Address, Transaction};
use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::withdrawals_client::WithdrawalsClient;
use rand::{Rng, SeedableRng};
use serde_json::json;
use system_tests::harness::script_of;
use system_tests::live::{Devnet, Indexer, KeyedWallet};
use system_tests::temporal::TemporalServer;
use tonic::metadata::MetadataValue;

fn bin() -> std::path::PathBuf {
    system_tests::harness::workspace_binary("orchestrator")
}
const TOKEN: &str = "crash-test-token";

/// The orchestrator process, killed on drop.
struct Process(Child, String);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn auth<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let value = MetadataValue::try_from(format!("Bearer {TOKEN}")).unwrap();
    req.metadata_mut().insert("authorization", value);
    req
}

/// Devnet, a hot wallet of `coins` coins of 0.02 BTC, the indexer following it and
/// serving gRPC, and what `orchestrator run` needs (key file, token, database).
struct Rig {
    node: Devnet,
    miner: String,
    hot: Address,
    served: Indexer,
    dir: tempfile::TempDir,
    _db: tempfile::TempDir,
}

impl Rig {
    fn new(coins: usize) -> Rig {
        let node = Devnet::start(|c| c.filler_txs = 0);
        let miner = node.new_address("bech32");
        node.mine_to(102, &miner);
        let dir = tempfile::tempdir().unwrap();
        let keyed = KeyedWallet::funded(&node, &miner, dir.path(), 21, coins, 0.02);
        let hot = keyed.address.clone();
        let db = tempfile::tempdir().unwrap();
        let served = Indexer::caught_up(&node, db.path(), &keyed.wallets);
        system_tests::harness::write_secret(dir.path().join("token"), TOKEN);
        Rig {
            node,
            miner,
            hot,
            served,
            dir,
            _db: db,
        }
    }

    /// `orchestrator run` on the rig's database, dying at `crash_at` when given.
    fn start(&self, crash_at: Option<&str>) -> Process {
        let db = self.dir.path().join("sagas");
        self.spawn(crash_at, &["--db", db.to_str().unwrap()], None)
    }

    /// The same, paying withdrawals that arrive within a second of each other in batches.
    fn start_batching(&self, crash_at: Option<&str>) -> Process {
        let db = self.dir.path().join("sagas");
        let args = ["--db", db.to_str().unwrap(), "--batch-window-secs", "1"];
        self.spawn(crash_at, &args, None)
    }

    /// `orchestrator run` on the Temporal engine of `server` (a worker, the adapter and
    /// the API), dying after the activity `crash_at` names when given; of all the
    /// processes given one `once` file, only the first to get there dies.
    fn start_temporal(
        &self,
        server: &TemporalServer,
        crash_at: Option<&str>,
        once: &std::path::Path,
    ) -> Process {
        self.start_temporal_with(server, crash_at, once, &[])
    }

    /// The same with `more` flags.
    fn start_temporal_with(
        &self,
        server: &TemporalServer,
        crash_at: Option<&str>,
        once: &std::path::Path,
        more: &[&str],
    ) -> Process {
        let url = server.url();
        let at = crash_at.map(|a| format!("activity:{a}"));
        let mut flags = vec![
            "--engine",
            "temporal",
            "--temporal-address",
            &url,
            "--bump-after-blocks",
            "1",
        ];
        flags.extend_from_slice(more);
        self.spawn(at.as_deref(), &flags, Some(once))
    }

    fn spawn(
        &self,
        crash_at: Option<&str>,
        engine: &[&str],
        once: Option<&std::path::Path>,
    ) -> Process {
        let dir = self.dir.path();
        let mut cmd = match crash_at {
            // The production binary has no crash hook: a build of it with one.
            Some(at) => {
                let mut cmd = Command::new(system_tests::harness::workspace_binary(
                    "orchestrator-crash-at",
                ));
                cmd.arg(at);
                cmd
            }
            None => Command::new(bin()),
        };
        if let Some(once) = once {
            cmd.env("CRASH_ONCE_FILE", once);
        }
        cmd.args(["run", "--network", "regtest", "--listen", "127.0.0.1:0"])
            .args(["--indexer", &format!("http://{}", self.served.addr)])
            .args(["--bitcoind-rpc-url", &self.node.node.rpc_url()])
            .args([
                "--bitcoind-cookie-file",
                self.node.node.cookie_file().unwrap().to_str().unwrap(),
            ])
            .args(engine)
            .args(["--key-file", dir.join("hot.keys").to_str().unwrap()])
            .args(["--token-file", dir.join("token").to_str().unwrap()])
            .args(["--change-address", &self.hot.to_string()])
            .args(["--confirmations", "1", "--settle-confirmations", "2"])
            .env("ORCHESTRATOR_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().strip_prefix("listening\t").unwrap().to_owned();
        Process(child, addr)
    }

    fn client(&self, p: &Process) -> WithdrawalsClient<tonic::transport::Channel> {
        let channel = self
            .served
            .runtime
            .block_on(
                tonic::transport::Channel::from_shared(format!("http://{}", p.1))
                    .unwrap()
                    .connect(),
            )
            .unwrap();
        WithdrawalsClient::new(channel)
    }

    fn submit(
        &self,
        c: &mut WithdrawalsClient<tonic::transport::Channel>,
        id: &str,
        destination: &str,
        sat: u64,
    ) -> Result<pb::Withdrawal, tonic::Status> {
        let req = pb::SubmitWithdrawalRequest {
            request_id: id.into(),
            wallet: "hot".into(),
            destination: destination.into(),
            amount_sat: sat,
            fee_rate: Some(pb::submit_withdrawal_request::FeeRate::SatPerVb(2.0)),
            max_fee_sat: 20_000,
        };
        self.served
            .runtime
            .block_on(c.submit_withdrawal(auth(req)))
            .map(|r| r.into_inner())
    }

    fn list(&self, c: &mut WithdrawalsClient<tonic::transport::Channel>) -> Vec<pb::Withdrawal> {
        self.served
            .runtime
            .block_on(c.list_withdrawals(auth(pb::ListWithdrawalsRequest {
                limit: 1000,
                ..Default::default()
            })))
            .unwrap()
            .into_inner()
            .withdrawals
    }

    /// The withdrawal submitted as `request_id`.
    fn withdrawal(
        &self,
        c: &mut WithdrawalsClient<tonic::transport::Channel>,
        request_id: &str,
    ) -> pb::Withdrawal {
        self.list(c)
            .into_iter()
            .find(|w| w.request_id == request_id)
            .unwrap()
    }

    /// Waits until one of `workers` has died in `activity` (mining meanwhile when
    /// `mining`): its index.
    fn one_died(&self, workers: &mut [Process], activity: &str, mining: bool) -> usize {
        let started = Instant::now();
        loop {
            if let Some(k) = workers
                .iter_mut()
                .position(|w| w.0.try_wait().unwrap().is_some())
            {
                return k;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no worker died in {activity}"
            );
            if mining {
                self.node.mine_to(1, &self.miner);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Mines until every one of `members` (request ids) completed, within `limit`: each
    /// by one transaction, the same, of one batch.
    fn complete_in_one_batch(
        &self,
        c: &mut WithdrawalsClient<tonic::transport::Channel>,
        members: &[String],
        at: &str,
        limit: Duration,
    ) {
        let started = Instant::now();
        let done: Vec<pb::Withdrawal> = loop {
            let ws: Vec<pb::Withdrawal> = members.iter().map(|m| self.withdrawal(c, m)).collect();
            if ws
                .iter()
                .all(|w| w.state == pb::WithdrawalState::Completed as i32)
            {
                break ws;
            }
            assert!(started.elapsed() < limit, "{at}: stuck at {ws:?}");
            self.node.mine_to(1, &self.miner);
            std::thread::sleep(Duration::from_millis(200));
        };
        for w in &done {
            assert_eq!(w.txids.len(), 1, "{at}: {w:?}");
            assert_eq!(
                (w.batch_id, &w.txids),
                (done[0].batch_id, &done[0].txids),
                "{at}"
            );
            assert_ne!(w.batch_id, 0, "{at}: batched: {done:?}");
        }
    }

    /// What every transaction spending the hot wallet's coins paid, by script, from the
    /// chain; asserts no coin was spent twice.
    fn paid(&self) -> HashMap<bitcoin::ScriptBuf, Vec<u64>> {
        let tip = self.node.mine_to(1, &self.miner)[0];
        assert!(self.served.wait_for(tip, Duration::from_secs(30)));
        self.served.payments(&self.node, "hot")
    }
}

/// The embedded engine's step boundaries, as the crash hook names them.
const BOUNDARIES: [&str; 6] = [
    "reserved",
    "signed",
    "sending",
    "sent",
    "broadcast",
    "confirmed",
];

#[test]
fn a_crash_at_each_step_boundary_then_restart_pays_exactly_once() {
    let rig = Rig::new(8);
    let boundaries = BOUNDARIES;
    let mut destinations = Vec::new();
    for (i, at) in boundaries.iter().enumerate() {
        let destination = rig.node.new_address("bech32");
        let mut process = rig.start(Some(at));
        let mut c = rig.client(&process);
        rig.submit(
            &mut c,
            &format!("step-{i}"),
            &destination,
            400_000 + i as u64,
        )
        .unwrap();
        // It dies at the boundary (blocks are mined for the confirmed one).
        let status = wait_for_death(&rig, &mut process, at);
        assert!(!status.success(), "{at}: {status:?}");
        // Restarted without the fault: it finishes the withdrawal.
        process = rig.start(None);
        let mut c = rig.client(&process);
        let started = Instant::now();
        loop {
            let w = rig.withdrawal(&mut c, &format!("step-{i}"));
            if w.state == pb::WithdrawalState::Completed as i32 {
                assert_eq!(w.txids.len(), 1, "{at}: {w:?}");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{at}: stuck at {w:?}"
            );
            rig.node.mine_to(1, &rig.miner);
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(process);
        destinations.push(destination);
    }
    let paid = rig.paid();
    for (i, d) in destinations.iter().enumerate() {
        assert_eq!(
            paid.get(&script_of(d)),
            Some(&vec![400_000 + i as u64]),
            "{}",
            boundaries[i]
        );
    }
}

/// Three withdrawals at a time batched into one transaction, the process dying at each
/// step boundary of the batch's saga in turn, then restarted: the members complete by
/// the one transaction, each destination paid exactly its amount once.
#[test]
fn a_crash_at_each_step_boundary_of_a_batch_then_restart_pays_each_member_once() {
    let rig = Rig::new(8);
    let mut expected = Vec::new();
    for (round, at) in BOUNDARIES.iter().enumerate() {
        let mut process = rig.start_batching(Some(at));
        let mut c = rig.client(&process);
        let mut members = Vec::new();
        for i in 0..3 {
            let destination = rig.node.new_address("bech32");
            let amount = 300_000 + (round * 10 + i) as u64;
            let id = format!("batch-{round}-{i}");
            rig.submit(&mut c, &id, &destination, amount).unwrap();
            members.push(id);
            expected.push((destination, amount, *at));
        }
        let status = wait_for_death(&rig, &mut process, at);
        assert!(!status.success(), "{at}: {status:?}");
        process = rig.start_batching(None);
        let mut c = rig.client(&process);
        rig.complete_in_one_batch(&mut c, &members, at, Duration::from_secs(30));
        drop(process);
    }
    let paid = rig.paid();
    for (destination, amount, at) in expected {
        assert_eq!(
            paid.get(&script_of(&destination)),
            Some(&vec![amount]),
            "{at}"
        );
    }
}

/// Waits until `process`, started to die at `at`, has (mining for the `confirmed` one).
fn wait_for_death(rig: &Rig, process: &mut Process, at: &str) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(s) = process.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never reached {at}"
        );
        if at == "confirmed" {
            rig.node.mine_to(1, &rig.miner);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two `orchestrator run` processes on the Temporal engine work one task queue. For each
/// activity in turn, one of them dies (abort, as kill -9) right after that activity did
/// its work, before its answer reached the server: the other takes the activity over
/// (after its heartbeat or start-to-close timeout) and the withdrawal completes with one
/// transaction (or one chain of replacements, for `replace`); a replacement process keeps
/// two running. Each destination is paid
/// exactly its amount once, and the history is there for `temporal workflow show`.
#[test]
fn on_temporal_two_workers_one_killed_in_each_activity_pay_exactly_once() {
    let rig = Rig::new(8);
    let server = TemporalServer::start();
    let activities = [
        "withdrawal.reserve",
        "withdrawal.sign",
        "withdrawal.broadcast",
        "withdrawal.observe",
        "withdrawal.replace",
    ];
    let mut destinations = Vec::new();
    for (i, activity) in activities.iter().enumerate() {
        let once = rig.dir.path().join(format!("crashed-{i}"));
        let mut workers = vec![
            rig.start_temporal(&server, Some(activity), &once),
            rig.start_temporal(&server, Some(activity), &once),
        ];
        // A replacement is made only for a payment left unmined: the node mines nothing
        // below 6 sat/vB until this one completes.
        let stuck = *activity == "withdrawal.replace";
        if stuck {
            rig.node.call("devnet_setminingfeerate", json!([6]));
        }
        let destination = rig.node.new_address("bech32");
        let request_id = format!("kill-{i}");
        let mut c = rig.client(&workers[0]);
        rig.submit(&mut c, &request_id, &destination, 400_000 + i as u64)
            .unwrap();
        // One of the two dies after the activity.
        let dead = rig.one_died(&mut workers, activity, stuck);
        assert!(once.exists(), "{activity}: the crash hook ran");
        workers.remove(dead);
        workers.push(rig.start_temporal(&server, None, &once));
        let mut c = rig.client(&workers[0]);
        let started = Instant::now();
        loop {
            let w = rig.withdrawal(&mut c, &request_id);
            if w.state == pb::WithdrawalState::Completed as i32 {
                // One transaction, or (when replaced) a chain of replacements of it
                // spending the same coins: the destination is paid once either way.
                assert!(stuck || w.txids.len() == 1, "{activity}: {w:?}");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "{activity}: stuck at {w:?}"
            );
            rig.node.mine_to(1, &rig.miner);
            std::thread::sleep(Duration::from_millis(300));
        }
        drop(workers);
        if stuck {
            rig.node.call("devnet_setminingfeerate", json!([0]));
        }
        destinations.push(destination);
    }
    let paid = rig.paid();
    for (i, d) in destinations.iter().enumerate() {
        assert_eq!(
            paid.get(&script_of(d)),
            Some(&vec![400_000 + i as u64]),
            "{}",
            activities[i]
        );
    }
    let shown = server.cli(&[
        "workflow",
        "show",
        "--workflow-id",
        "kill-2",
        "--output",
        "json",
    ]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{shown:?}");
    assert!(text.contains("withdrawal.broadcast"), "{text}");
}

/// The same with payout queues: for each activity a batch
/// goes through (queueing in the wallet's workflow, starting the batch, claiming its
/// members, reserving, signing, sending, looking at the chain), one of two processes
/// dies right after that activity did its work. Each round's three withdrawals complete
/// by one transaction of one batch; each destination is paid exactly its amount once.
#[test]
fn on_temporal_two_workers_one_killed_in_each_batch_activity_pay_each_member_once() {
    let rig = Rig::new(8);
    let server = TemporalServer::start();
    // A batch of three forms once all three are queued; the window covers a queue ask
    // retried after its worker died.
    let batching = ["--batch-window-secs", "30", "--max-batch-outputs", "3"];
    let activities = [
        "withdrawal.queue",
        "withdrawal.start_batch",
        "withdrawal.claim",
        "withdrawal.reserve",
        "withdrawal.sign",
        "withdrawal.broadcast",
        "withdrawal.observe",
    ];
    let mut expected = Vec::new();
    for (round, activity) in activities.iter().enumerate() {
        let once = rig.dir.path().join(format!("batch-crashed-{round}"));
        let start = |crash: Option<&str>| rig.start_temporal_with(&server, crash, &once, &batching);
        let mut workers = vec![start(Some(activity)), start(Some(activity))];
        let mut clients: Vec<_> = workers.iter().map(|w| rig.client(w)).collect();
        let mut members = Vec::new();
        for i in 0..3 {
            let destination = rig.node.new_address("bech32");
            let amount = 300_000 + (round * 10 + i) as u64;
            let id = format!("tbatch-{round}-{i}");
            // The process asked may be the one dying: the same request to the other, and
            // no more asks of the dead one.
            while rig
                .submit(&mut clients[0], &id, &destination, amount)
                .is_err()
            {
                assert!(clients.len() > 1, "{activity}: no process took {id}");
                clients.remove(0);
            }
            members.push(id);
            expected.push((destination, amount, *activity));
        }
        let dead = rig.one_died(&mut workers, activity, false);
        assert!(once.exists(), "{activity}: the crash hook ran");
        workers.remove(dead);
        workers.push(start(None));
        let mut c = rig.client(&workers[0]);
        rig.complete_in_one_batch(&mut c, &members, activity, Duration::from_secs(90));
        drop(workers);
    }
    let paid = rig.paid();
    for (destination, amount, activity) in expected {
        assert_eq!(
            paid.get(&script_of(&destination)),
            Some(&vec![amount]),
            "{activity}"
        );
    }
}

#[test]
fn sigkill_at_random_moments_then_restart_pays_each_withdrawal_exactly_once() {
    sigkill_at_random_moments(false);
}

/// The same with withdrawals arriving within a second of each other paid in batches.
#[test]
fn sigkill_at_random_moments_while_batching_pays_each_withdrawal_exactly_once() {
    sigkill_at_random_moments(true);
}

fn sigkill_at_random_moments(batching: bool) {
    let rig = Rig::new(30);
    let start = |rig: &Rig| {
        if batching {
            rig.start_batching(None)
        } else {
            rig.start(None)
        }
    };
    // 20 withdrawals to 20 destinations, submitted (and some resubmitted) across kills.
    let destinations: Vec<String> = (0..20).map(|_| rig.node.new_address("bech32")).collect();
    let amount = |i: usize| 300_000 + i as u64 * 1_000;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut process = start(&rig);
    let mut submitted = 0;
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut kills = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "withdrawals did not all complete"
        );
        let mut c = rig.client(&process);
        // Submit a few more (and repeat an earlier one: it must not pay twice).
        for _ in 0..rng.gen_range(1..5) {
            if submitted < destinations.len() {
                submitted += 1;
            }
            let i = rng.gen_range(0..submitted);
            let _ = rig.submit(&mut c, &format!("crash-{i}"), &destinations[i], amount(i));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        if rng.gen_bool(0.5) {
            rig.node.mine_to(1, &rig.miner);
        }
        // Killed at a random moment, then started again on the same database.
        if kills < 12 && rng.gen_bool(0.6) {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
            let _ = process.0.kill();
            let _ = process.0.wait();
            kills += 1;
            process = start(&rig);
            c = rig.client(&process);
        }
        let list = rig.list(&mut c);
        let failed: Vec<_> = list
            .iter()
            .filter(|w| {
                w.state == pb::WithdrawalState::Failed as i32
                    || w.state == pb::WithdrawalState::NeedsReview as i32
            })
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
        if submitted == destinations.len()
            && list.len() == destinations.len()
            && list
                .iter()
                .all(|w| w.state == pb::WithdrawalState::Completed as i32)
        {
            break;
        }
        rig.node.mine_to(1, &rig.miner);
    }
    assert!(kills >= 3, "too few kills to mean anything: {kills}");
    if batching {
        let c = &mut rig.client(&process);
        let batched = rig.list(c).iter().filter(|w| w.batch_id != 0).count();
        assert!(batched >= 2, "nothing was batched");
    }
    let paid = rig.paid();
    for (i, d) in destinations.iter().enumerate() {
        assert_eq!(
            paid.get(&script_of(d)),
            Some(&vec![amount(i)]),
            "destination {i}"
        );
    }
}

#[test]
fn a_payment_sent_before_a_crash_and_spent_onward_meanwhile_still_completes() {
    use bitcoin::psbt::Psbt;
    use orchestrator::signer::{KeyFileSigner, Signer};
    let rig = Rig::new(2);
    // Paid to the hot wallet itself, so the test holds the key of every output.
    let process = rig.start(Some("sent"));
    let mut c = rig.client(&process);
    rig.submit(&mut c, "onward", &rig.hot.to_string(), 1_000_000)
        .unwrap();
    let mut process = process;
    let started = Instant::now();
    while process.0.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "never sent");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(process);
    let sent: Transaction = {
        let store = orchestrator::store::SagaStore::open(&rig.dir.path().join("sagas")).unwrap();
        let w = store.by_request("onward").unwrap().unwrap();
        assert_eq!(w.state, orchestrator::saga::State::Signed, "{w:?}");
        deserialize(&w.attempts[0].raw).unwrap()
    };
    // It confirms, then every one of its outputs is spent onward.
    rig.node.mine_to(1, &rig.miner);
    let total: u64 = sent.output.iter().map(|o| o.value.to_sat()).sum();
    let onward = Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: bitcoin::absolute::LockTime::ZERO,
        input: (0..sent.output.len() as u32)
            .map(|vout| bitcoin::TxIn {
                previous_output: bitcoin::OutPoint::new(sent.compute_txid(), vout),
                ..Default::default()
            })
            .collect(),
        output: vec![bitcoin::TxOut {
            value: bitcoin::Amount::from_sat(total - 5_000),
            script_pubkey: script_of(&rig.miner),
        }],
    };
    let mut psbt = Psbt::from_unsigned_tx(onward).unwrap();
    for (input, prev) in psbt.inputs.iter_mut().zip(&sent.output) {
        input.witness_utxo = Some(prev.clone());
    }
    let signer =
        KeyFileSigner::open(&rig.dir.path().join("hot.keys"), bitcoin::Network::Regtest).unwrap();
    assert_eq!(signer.sign(&mut psbt).unwrap(), sent.output.len());
    let hex = bitcoin::consensus::encode::serialize_hex(&psbt.extract_tx().unwrap());
    rig.node.call("sendrawtransaction", json!([hex]));
    let tip = rig.node.mine_to(1, &rig.miner)[0];
    assert!(rig.served.wait_for(tip, Duration::from_secs(30)));
    // Sending it again is refused now (its inputs are spent): the orchestrator must see
    // that it is in a block rather than call the withdrawal failed.
    let process = rig.start(None);
    let mut c = rig.client(&process);
    let started = Instant::now();
    loop {
        let w = rig.withdrawal(&mut c, "onward");
        assert_ne!(w.state, pb::WithdrawalState::Failed as i32, "{w:?}");
        if w.state == pb::WithdrawalState::Completed as i32 {
            assert_eq!(w.confirmed_txid, sent.compute_txid().to_string());
            assert_eq!(w.txids.len(), 1);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stuck at {w:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
