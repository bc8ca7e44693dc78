//! Runs the sagas' steps: each step reads the saga's durable record, performs one side
//! effect, and records its outcome (synced) before the next one. A step that fails for a
//! reason that may pass (indexer or bitcoind unavailable, a coin taken by a concurrent
//! saga) leaves the saga where it is, to be tried again on the next round; restarting the
//! process resumes every unfinished saga the same way.

use std::sync::Arc;
use std::time::Duration;

use crate::indexer_client::{self, Indexer};
use bitcoin::absolute::LockTime;
use bitcoin::consensus::serialize;
use bitcoin::hex::DisplayHex;
use bitcoin::transaction::Version;
use bitcoin::{Address, Amount, Network, OutPoint, Psbt, ScriptBuf, Sequence, Transaction};
use bitcoin::{TxIn, TxOut, Txid};
use proto::indexer::v1 as ipb;

use crate::kafka_events::{KafkaEvents, KafkaMonitor};
use crate::monitor::Monitor;
use crate::saga::{now_ms, Attempt, Coin, FeeRate, Outcome, State, Step, Withdrawal};
use crate::select::{self, Candidate, SelectError};
use crate::signer::Signer;
use crate::store::{SagaStore, SagaStoreError};

/// Longest pause between rounds when nothing wakes the executor.
const IDLE: Duration = Duration::from_millis(200);

/// How the executor pays and how deep it waits.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Confirmations a coin needs before it is spent.
    pub min_conf: u32,
    /// Confirmations that complete a withdrawal.
    pub confirmations: u32,
    /// Confirmations after which its coins are released (a deeper reorg cannot undo it).
    pub settle_at: u32,
    /// Lowest fee rate used, sat/vB.
    pub fee_floor: f64,
    /// Highest fee rate used, sat/vB.
    pub fee_ceiling: f64,
    /// Blocks a broadcast payment may stay unmined before it is replaced at a higher rate.
    pub bump_after_blocks: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_conf: 1,
            confirmations: 3,
            settle_at: 6,
            fee_floor: 1.0,
            fee_ceiling: 500.0,
            bump_after_blocks: 3,
        }
    }
}

/// Why a step did not complete.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The indexer failed or is unreachable.
    #[error("indexer: {0}")]
    Indexer(#[from] tonic::Status),
    /// bitcoind failed or is unreachable.
    #[error(transparent)]
    Daemon(#[from] bitcoind::DaemonError),
    /// The saga database failed, or the saga moved meanwhile.
    #[error(transparent)]
    Store(#[from] SagaStoreError),
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] crate::signer::SignError),
}

/// Runs sagas against an indexer, a bitcoind and a signer.
pub struct Executor {
    store: Arc<SagaStore>,
    indexer: Indexer,
    daemon: Arc<bitcoind::Daemon>,
    signer: Arc<dyn Signer>,
    network: Network,
    change: ScriptBuf,
    policy: Policy,
    /// The indexer's tip as the monitor last recorded it, at the start of the round.
    last_tip: Option<u32>,
    /// Woken by the monitor when the chain moved something a withdrawal watches.
    wake: Arc<tokio::sync::Notify>,
    /// Each wallet's spendable coins as the indexer listed them this round (read once per
    /// round, not once per reservation; reservations are checked on every use).
    utxos: std::collections::HashMap<String, Vec<Candidate>>,
    /// Every coin some withdrawal holds, read once per round (see `candidates`).
    reserved: Option<std::collections::HashSet<OutPoint>>,
    /// Withdrawals whose bump failed (the fee cap reached), with the tip then: not tried
    /// again before the chain moves.
    bump_failed: std::collections::HashMap<u64, u32>,
    /// Told of every step boundary (tests: a crash or a cancel at an exact moment).
    boundaries: Option<Arc<dyn Boundaries>>,
    /// Where the chain's events come from: the Kafka topic when set, else Subscribe.
    kafka_events: Option<KafkaEvents>,
}

/// A moment between two steps of a saga, where a crash or a concurrent call must leave
/// everything consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boundary {
    /// RESERVED was recorded.
    Reserved,
    /// SIGNED was recorded.
    Signed,
    /// The intent to send was recorded; the transaction has not left yet.
    Sending,
    /// bitcoind accepted the transaction; BROADCAST is not recorded yet.
    Sent,
    /// BROADCAST was recorded.
    Broadcast,
    /// CONFIRMING or COMPLETED was recorded.
    Confirmed,
}

impl Boundary {
    /// Its name (`reserved`, `signed`, `sending`, `sent`, `broadcast`, `confirmed`).
    pub fn name(self) -> &'static str {
        match self {
            Boundary::Reserved => "reserved",
            Boundary::Signed => "signed",
            Boundary::Sending => "sending",
            Boundary::Sent => "sent",
            Boundary::Broadcast => "broadcast",
            Boundary::Confirmed => "confirmed",
        }
    }
}

/// Observes step boundaries, synchronously, before the executor goes on: the hook tests
/// use to crash or race a cancel at an exact moment. Production runs without one.
pub trait Boundaries: Send + Sync {
    /// `w` (as recorded) reached `at`.
    fn reached(&self, at: Boundary, w: &Withdrawal);
}

impl Executor {
    fn boundary(&self, at: Boundary, w: &Withdrawal) {
        if let Some(b) = &self.boundaries {
            b.reached(at, w);
        }
    }
}

impl Executor {
    /// An executor paying change to `change`.
    pub fn new(
        store: Arc<SagaStore>,
        indexer: Indexer,
        daemon: Arc<bitcoind::Daemon>,
        signer: Arc<dyn Signer>,
        network: Network,
        change: ScriptBuf,
        policy: Policy,
    ) -> Executor {
        Executor {
            store,
            indexer,
            daemon,
            signer,
            network,
            change,
            policy,
            last_tip: None,
            wake: Arc::new(tokio::sync::Notify::new()),
            utxos: std::collections::HashMap::new(),
            reserved: None,
            bump_failed: std::collections::HashMap::new(),
            boundaries: None,
            kafka_events: None,
        }
    }

    /// Takes the chain's events from a Kafka topic instead of the indexer's Subscribe.
    pub fn with_kafka_events(mut self, kafka: KafkaEvents) -> Executor {
        self.kafka_events = Some(kafka);
        self
    }

    /// Tells `boundaries` of every step boundary (tests).
    pub fn with_boundaries(mut self, boundaries: Arc<dyn Boundaries>) -> Self {
        self.boundaries = Some(boundaries);
        self
    }

    /// Steps every unfinished saga once; returns how many moved.
    pub async fn round(&mut self) -> Result<usize, StepError> {
        // Until the monitor first recorded the chain, nothing can be watched.
        let observed = self.store.cursor()?.is_some();
        self.last_tip = if observed {
            self.store.chain_tip()?
        } else {
            None
        };
        self.utxos.clear();
        self.reserved = None;
        let mut moved = 0;
        for w in self.store.unfinished()? {
            if w.next_step() == Step::Watch && !observed {
                continue;
            }
            let id = w.id;
            match self.step(w).await {
                Ok(true) => moved += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(id, error = %e, "withdrawal step must wait"),
            }
        }
        Ok(moved)
    }

    /// Runs rounds, and the monitor following the indexer's events, until `stop`
    /// resolves. A round follows at once when one moved a saga or the monitor saw
    /// something; otherwise within `IDLE` (new submissions, retries).
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let (store, indexer, wake) = (self.store.clone(), self.indexer.clone(), self.wake.clone());
        let monitoring = match self.kafka_events.clone() {
            Some(kafka) => tokio::spawn(KafkaMonitor::new(store, indexer, wake, kafka).run()),
            None => tokio::spawn(Monitor::new(store, indexer, wake).run()),
        };
        tokio::pin!(stop);
        loop {
            let idle = match self.round().await {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "withdrawal round must wait");
                    true
                }
            };
            let pause = if idle { IDLE } else { Duration::ZERO };
            tokio::select! {
                _ = &mut stop => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        monitoring.abort();
        // Gone before this returns, so a restarted executor never has two monitors.
        let _ = monitoring.await;
    }

    fn record(&self, w: &Withdrawal, outcome: Outcome) -> Result<Withdrawal, StepError> {
        let after = self.store.record(w, outcome, now_ms())?;
        tracing::info!(id = after.id, state = ?after.state, "withdrawal moved");
        let at = match after.state {
            State::Reserved => Some(Boundary::Reserved),
            State::Signed if after.sends > w.sends => Some(Boundary::Sending),
            State::Signed => Some(Boundary::Signed),
            State::Broadcast if w.state == State::Signed => Some(Boundary::Broadcast),
            State::Confirming | State::Completed => Some(Boundary::Confirmed),
            _ => None,
        };
        if let Some(at) = at {
            self.boundary(at, &after);
        }
        Ok(after)
    }

    /// Runs `w`'s next step; true when it moved.
    pub async fn step(&mut self, w: Withdrawal) -> Result<bool, StepError> {
        match w.next_step() {
            Step::Reserve => self.reserve(&w).await.map(|_| true),
            Step::Sign => self.sign(&w).await.map(|_| true),
            Step::Broadcast => self.broadcast(&w).await,
            Step::Watch => self.watch(&w).await,
            Step::Rest => Ok(false),
        }
    }

    async fn fee_rate(&self, policy: FeeRate) -> Result<f64, StepError> {
        let rate = match policy {
            FeeRate::SatPerVb(r) => r,
            FeeRate::TargetBlocks(t) => {
                let daemon = self.daemon.clone();
                let per_kvb = tokio::task::spawn_blocking(move || daemon.estimate_smart_fee(t))
                    .await
                    .map_err(|e| tonic::Status::internal(e.to_string()))??;
                match per_kvb {
                    Some(a) => a.to_sat() as f64 / 1000.0,
                    None => {
                        tracing::warn!(
                            target_blocks = t,
                            fee_floor = self.policy.fee_floor,
                            "bitcoind has no fee estimate for this target (estimatesmartfee): paying the fee floor"
                        );
                        self.policy.fee_floor
                    }
                }
            }
        };
        Ok(rate.clamp(self.policy.fee_floor, self.policy.fee_ceiling))
    }

    async fn candidates(&mut self, wallet: &str) -> Result<Vec<Candidate>, StepError> {
        if !self.utxos.contains_key(wallet) {
            let listed = self.list_wallet(wallet).await?;
            self.utxos.insert(wallet.to_owned(), listed);
        }
        // Read once per round, then kept up to date by this executor's own reservations
        // (the store still refuses a coin another writer took meanwhile).
        if self.reserved.is_none() {
            self.reserved = Some(self.store.reserved()?);
        }
        let reserved = self.reserved.as_ref().expect("just read");
        Ok(self.utxos[wallet]
            .iter()
            .filter(|c| !reserved.contains(&c.outpoint))
            .cloned()
            .collect())
    }

    /// The wallet's mature coins with at least `min_conf` confirmations that the signer
    /// can spend, from the indexer.
    async fn list_wallet(&mut self, wallet: &str) -> Result<Vec<Candidate>, StepError> {
        let signable: std::collections::HashSet<ScriptBuf> = self.signable();
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .indexer
                .list_utxos(ipb::ListUtxosRequest {
                    target: Some(ipb::Target {
                        target: Some(ipb::target::Target::Wallet(wallet.into())),
                    }),
                    min_conf: self.policy.min_conf,
                    limit: 1000,
                    page_token: token,
                })
                .await?
                .into_inner();
            for u in page.utxos {
                let (Ok(txid), Ok(script)) =
                    (u.txid.parse::<Txid>(), ScriptBuf::from_hex(&u.script_hex))
                else {
                    continue;
                };
                let mature = !u.coinbase || u.confirmations >= 100;
                if mature && signable.contains(&script) {
                    out.push(Candidate {
                        outpoint: OutPoint::new(txid, u.vout),
                        value: Amount::from_sat(u.value_sat),
                        script,
                    });
                }
            }
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    fn signable(&self) -> std::collections::HashSet<ScriptBuf> {
        self.signer.scripts().into_iter().collect()
    }

    fn destination(&self, w: &Withdrawal) -> Option<ScriptBuf> {
        w.request
            .destination
            .parse::<Address<_>>()
            .ok()?
            .require_network(self.network)
            .ok()
            .map(|a| a.script_pubkey())
    }

    async fn reserve(&mut self, w: &Withdrawal) -> Result<Withdrawal, StepError> {
        let Some(destination) = self.destination(w) else {
            return self.record(w, Outcome::Failed("invalid destination".into()));
        };
        let rate = self.fee_rate(w.request.fee_rate).await?;
        let candidates = match self.candidates(&w.request.wallet).await {
            // The indexer watches no such wallet: waiting will not make one.
            Err(StepError::Indexer(status)) if status.code() == tonic::Code::NotFound => {
                return self.record(
                    w,
                    Outcome::Failed(format!(
                        "wallet {} is not one the indexer watches",
                        w.request.wallet
                    )),
                );
            }
            other => other?,
        };
        match select::select(
            &candidates,
            w.request.amount,
            &destination,
            &self.change,
            rate,
            w.request.max_fee,
        ) {
            Ok(selection) => {
                let coins: Vec<Coin> = selection
                    .coins
                    .into_iter()
                    .map(|c| Coin {
                        outpoint: c.outpoint,
                        value: c.value,
                        script: c.script,
                    })
                    .collect();
                let taken: Vec<OutPoint> = coins.iter().map(|c| c.outpoint).collect();
                let after = self.record(w, Outcome::Reserved(coins))?;
                if let Some(reserved) = &mut self.reserved {
                    reserved.extend(taken);
                }
                Ok(after)
            }
            Err(e @ (SelectError::InsufficientFunds { .. } | SelectError::FeeAboveCap { .. })) => {
                self.record(w, Outcome::Failed(e.to_string()))
            }
            Err(e @ SelectError::Failed(_)) => self.record(w, Outcome::Failed(e.to_string())),
        }
    }

    /// The unsigned payment over `w`'s reserved coins at `rate` sat/vB, paying at least
    /// `min_fee`: (transaction, fee, weight), or why it cannot be built.
    fn assemble(
        &self,
        w: &Withdrawal,
        destination: &ScriptBuf,
        rate: f64,
        min_fee: Amount,
    ) -> Result<(Transaction, Amount, u64), String> {
        let total: Amount = w.coins.iter().map(|c| c.value).sum();
        let mut tx = Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: w
                .coins
                .iter()
                .map(|c| TxIn {
                    previous_output: c.outpoint,
                    // Replaceable, so a stuck payment can be bumped.
                    sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                    ..TxIn::default()
                })
                .collect(),
            output: vec![TxOut {
                value: w.request.amount,
                script_pubkey: destination.clone(),
            }],
        };
        // Unsigned inputs weigh 41 bytes each; signed P2WPKH ones weigh more.
        let signed_inputs = (select::P2WPKH_INPUT_WEIGHT - 4 * 41) * w.coins.len() as u64 + 2;
        let weight_without = tx.weight().to_wu() + signed_inputs;
        let change_out = TxOut {
            value: Amount::ZERO,
            script_pubkey: self.change.clone(),
        };
        let weight_with = weight_without + 4 * serialize(&change_out).len() as u64;
        let fee_with = select::fee_for(weight_with, rate).max(min_fee);
        let (fee, weight) = match total.checked_sub(w.request.amount + fee_with) {
            Some(change) if change >= self.change.minimal_non_dust() => {
                tx.output.push(TxOut {
                    value: change,
                    script_pubkey: self.change.clone(),
                });
                (fee_with, weight_with)
            }
            _ => match total.checked_sub(w.request.amount) {
                Some(fee) if fee >= select::fee_for(weight_without, rate).max(min_fee) => {
                    (fee, weight_without)
                }
                _ => {
                    return Err(format!(
                        "the reserved coins do not cover the amount at {rate:.1} sat/vB"
                    ))
                }
            },
        };
        if fee > w.request.max_fee {
            return Err(format!("fee {fee} above max_fee {}", w.request.max_fee));
        }
        Ok((tx, fee, weight))
    }

    /// Signs `tx` over `w`'s coins: the version to record.
    fn sign_attempt(
        &self,
        w: &Withdrawal,
        tx: Transaction,
        fee: Amount,
        weight: u64,
    ) -> Result<Result<Attempt, String>, StepError> {
        let mut psbt = Psbt::from_unsigned_tx(tx)
            .map_err(|e| tonic::Status::internal(format!("building the PSBT: {e}")))?;
        for (input, coin) in psbt.inputs.iter_mut().zip(&w.coins) {
            input.witness_utxo = Some(TxOut {
                value: coin.value,
                script_pubkey: coin.script.clone(),
            });
        }
        let signed = self.signer.sign(&mut psbt)?;
        if signed != w.coins.len() {
            return Ok(Err(format!(
                "the signer signed {signed} of {} inputs",
                w.coins.len()
            )));
        }
        let tx = psbt.extract_tx_unchecked_fee_rate();
        let vbytes = weight.div_ceil(4) as f64;
        Ok(Ok(Attempt {
            txid: tx.compute_txid(),
            raw: serialize(&tx),
            fee,
            fee_rate: fee.to_sat() as f64 / vbytes,
        }))
    }

    async fn sign(&mut self, w: &Withdrawal) -> Result<Withdrawal, StepError> {
        let Some(destination) = self.destination(w) else {
            return self.record(w, Outcome::Failed("invalid destination".into()));
        };
        let rate = self.fee_rate(w.request.fee_rate).await?;
        let (tx, fee, weight) = match self.assemble(w, &destination, rate, Amount::ZERO) {
            Ok(built) => built,
            Err(why) => return self.record(w, Outcome::Failed(why)),
        };
        match self.sign_attempt(w, tx, fee, weight)? {
            Ok(attempt) => self.record(w, Outcome::Signed(attempt)),
            Err(why) => self.record(w, Outcome::Failed(why)),
        }
    }

    /// A replacement of a payment stuck unconfirmed: the same coins and payment at a
    /// higher rate (BIP125: more absolute fee, by at least the incremental relay fee of
    /// 1 sat/vB over its size), within `max_fee`. False when the cap leaves no room.
    async fn bump(&mut self, w: &Withdrawal) -> Result<bool, StepError> {
        let (Some(destination), Some(current)) = (self.destination(w), w.current()) else {
            return Ok(false);
        };
        let rate = (current.fee_rate * 1.25)
            .max(current.fee_rate + 1.0)
            .min(self.policy.fee_ceiling);
        let vbytes = (current.fee.to_sat() as f64 / current.fee_rate).round() as u64;
        let min_fee = current.fee + Amount::from_sat(vbytes.max(1));
        match self.assemble(w, &destination, rate, min_fee) {
            Ok((tx, fee, weight)) => match self.sign_attempt(w, tx, fee, weight)? {
                Ok(attempt) => {
                    tracing::info!(id = w.id, old = %current.txid, new = %attempt.txid, rate = attempt.fee_rate, "bumping a stuck withdrawal");
                    self.record(w, Outcome::Replaced(attempt))?;
                    Ok(true)
                }
                Err(why) => {
                    tracing::warn!(id = w.id, %why, "cannot sign a replacement");
                    Ok(false)
                }
            },
            Err(why) => {
                tracing::warn!(id = w.id, %why, "a stuck withdrawal cannot be bumped further");
                Ok(false)
            }
        }
    }

    async fn broadcast(&mut self, w: &Withdrawal) -> Result<bool, StepError> {
        if w.current().is_none() {
            return Ok(false);
        }
        // A first send is recorded before the transaction leaves, under the lock a cancel
        // takes: either the cancel came first (this write is stale, nothing is sent) or
        // the cancel is refused from now on.
        let intended;
        let w = if w.state == State::Signed {
            intended = match self.record(w, Outcome::Sending) {
                Err(StepError::Store(SagaStoreError::Stale(_))) => return Ok(false),
                other => other?,
            };
            &intended
        } else {
            w
        };
        let attempt = w.current().expect("checked above");
        let hex = attempt.raw.to_lower_hex_string();
        let daemon = self.daemon.clone();
        let sent = tokio::task::spawn_blocking(move || daemon.send_raw_transaction(&hex))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        match sent {
            Ok(_) => {
                // Sent, not yet recorded: the boundary a crash must survive without paying
                // twice (the restart sends the same bytes again).
                self.boundary(Boundary::Sent, w);
                // The indexer's tip now, not the recorded one, which lags after a restart
                // (a stale height would make the payment look stuck at once).
                let height = self.tip().await?.max(self.last_tip.unwrap_or(0));
                self.record(w, Outcome::Broadcast { height })?;
                Ok(true)
            }
            Err(e) if e.is_transient() => Err(e.into()),
            // Refused, but a version is in a block (sent before a crash, its outputs since
            // spent, so bitcoind says its inputs are missing): it was sent.
            Err(e) if self.confirmed_in_index(w).await?.is_some() => {
                tracing::info!(id = w.id, refusal = %e, "a version is already in a block");
                let height = self.tip().await?;
                self.record(w, Outcome::Broadcast { height })?;
                Ok(true)
            }
            // Inputs spent, and the index does not show what spent them yet: only these
            // keys can spend them, so wait for the index rather than give up on a payment
            // that may be made.
            Err(e) if e.to_string().contains("missingorspent") => {
                tracing::warn!(id = w.id, refusal = %e, "inputs already spent; waiting for the index to show the spending transaction");
                Ok(false)
            }
            // Refused for good at its first send: nothing is on the network.
            Err(e) if w.state == State::Signed && w.sends == 1 => {
                self.record(w, Outcome::Failed(format!("bitcoind refused it: {e}")))?;
                Ok(true)
            }
            // Refused at a later send (after a restart): an earlier one may have gone
            // through, so an operator decides; the coins stay reserved.
            Err(e) if w.state == State::Signed => {
                self.record(
                    w,
                    Outcome::Unclear(format!("send refused after an earlier send: {e}")),
                )?;
                Ok(true)
            }
            // Refused after it was sent once (a conflict may have confirmed): an operator
            // decides; the coins stay reserved.
            Err(e) => {
                self.record(w, Outcome::Unclear(format!("rebroadcast refused: {e}")))?;
                Ok(true)
            }
        }
    }

    async fn tip(&mut self) -> Result<u32, StepError> {
        Ok(self
            .indexer
            .get_tip(ipb::GetTipRequest {})
            .await?
            .into_inner()
            .height)
    }

    /// Moves `w` on what the monitor recorded from the indexer's events: a version
    /// confirmed (and how deep), reorged out, or stuck long enough to be replaced.
    async fn watch(&mut self, w: &Withdrawal) -> Result<bool, StepError> {
        let Some(tip) = self.last_tip else {
            return Ok(false);
        };
        for attempt in w.attempts.iter().rev() {
            let Some(height) = self.store.confirmed_height(&attempt.txid)? else {
                continue;
            };
            // At least 1: the block that confirmed it was indexed.
            let confirmations = tip.saturating_sub(height).saturating_add(1);
            if w.confirmed == Some(attempt.txid) && w.confirmations == confirmations {
                return Ok(false);
            }
            self.record(
                w,
                Outcome::Confirmed {
                    txid: attempt.txid,
                    confirmations,
                    required: self.policy.confirmations,
                    settle_at: self.policy.settle_at,
                },
            )?;
            return Ok(true);
        }
        // None of its versions is confirmed as recorded: one that was is reorged out, or
        // one is stuck. Both are acted on only once the indexer itself agrees (the record
        // may stop mid-block: a block's event comes first, its transfers' next).
        if w.confirmed.is_some() {
            if self.confirmed_in_index(w).await?.is_some() {
                return Ok(false);
            }
            self.record(w, Outcome::ReorgedOut)?;
            return Ok(true);
        }
        let after = self.policy.bump_after_blocks;
        let stuck = |tip: u32| {
            w.state == State::Broadcast
                && w.broadcast_height
                    .is_some_and(|h| tip >= h.saturating_add(after))
        };
        if self.bump_failed.get(&w.id) == Some(&tip) {
            return Ok(false);
        }
        if stuck(tip) && stuck(self.tip().await?) && self.confirmed_in_index(w).await?.is_none() {
            let bumped = self.bump(w).await?;
            if bumped {
                self.bump_failed.remove(&w.id);
            } else {
                self.bump_failed.insert(w.id, tip);
            }
            return Ok(bumped);
        }
        Ok(false)
    }

    /// The height of the block holding one of `w`'s versions, asked of the indexer: the
    /// authority for the decisions the monitor's record only prompts.
    async fn confirmed_in_index(&mut self, w: &Withdrawal) -> Result<Option<u32>, StepError> {
        for attempt in w.attempts.iter().rev() {
            if let Some(height) =
                indexer_client::confirmed_height(&mut self.indexer, &attempt.txid).await?
            {
                return Ok(Some(height));
            }
        }
        Ok(None)
    }
}
