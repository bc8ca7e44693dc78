//! What both engines do to pay a withdrawal, apart from recording it: choose the fee
//! rate, list the wallet's spendable coins, select some, build the payment over the
//! reserved coins, sign it (the first version or a replacement), and send it. The embedded
//! executor and the Temporal activities call these; each records the outcomes its own way.

use std::collections::HashSet;
use std::sync::Arc;

use bitcoin::absolute::LockTime;
use bitcoin::consensus::serialize;
use bitcoin::hex::DisplayHex;
use bitcoin::transaction::Version;
use bitcoin::{Address, Amount, Network, OutPoint, Psbt, ScriptBuf, Sequence, Transaction};
use bitcoin::{TxIn, TxOut, Txid};
use proto::indexer::v1 as ipb;

use crate::balancing::{Consolidation, Kind};
use crate::descriptor_wallet::DescriptorWallet;
use crate::executor::Policy;
use crate::indexer_client::Indexer;
use crate::saga::{Attempt, Coin, FeeRate, Pending, Withdrawal};
use crate::select::{self, Candidate};
use crate::signer::Signer;
use crate::store::SagaStoreError;

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

/// A fee rate and how it was chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct FeeChoice {
    /// The rate, sat/vB.
    pub rate: f64,
    /// How it was chosen, for the status and the logs.
    pub why: String,
}

/// Chosen candidates as the coins a saga holds.
fn held(chosen: Vec<Candidate>) -> Vec<Coin> {
    chosen
        .into_iter()
        .map(|c| Coin {
            outpoint: c.outpoint,
            value: c.value,
            script: c.script,
        })
        .collect()
}

/// A version of a payment as signing left it.
#[derive(Clone, Debug, PartialEq)]
pub enum Built {
    /// Signed and final.
    Signed(Attempt),
    /// Waiting for external signers (a descriptor wallet whose hot keys alone cannot
    /// complete it).
    Unsigned(Pending),
}

/// The means of paying: bitcoind, the signer, where change goes and the fee policy.
#[derive(Clone)]
pub struct Payments {
    daemon: Arc<bitcoind::Daemon>,
    signer: Arc<dyn Signer>,
    network: Network,
    change: ScriptBuf,
    policy: Policy,
    /// The hot wallet's descriptor, when it is one (multisig, taproot, external signers);
    /// else the signer's P2WPKH keys are the wallet.
    wallet: Option<Arc<DescriptorWallet>>,
    /// How the cold wallet pays (top-ups), when balancing names one.
    cold: Option<(String, Arc<Payments>)>,
}

impl Payments {
    /// Payments on `network` with change to `change`.
    pub fn new(
        daemon: Arc<bitcoind::Daemon>,
        signer: Arc<dyn Signer>,
        network: Network,
        change: ScriptBuf,
        policy: Policy,
    ) -> Payments {
        // The cold wallet's keys are offline (none of the key file's sign for it, even one
        // an operator put there by mistake): its payments wait for external signers, and
        // its change goes back to its descriptor's index 0 (sweeps pay 1, 2, ...).
        let cold = policy.balancing.as_ref().and_then(|b| {
            let wallet = b.cold.clone()?;
            let change = wallet.script_at(0)?;
            let cold = Payments {
                daemon: daemon.clone(),
                signer: Arc::new(crate::signer::Offline),
                network,
                change,
                policy: Policy {
                    balancing: None,
                    ..policy.clone()
                },
                wallet: Some(wallet),
                cold: None,
            };
            Some((b.cold_wallet.clone(), Arc::new(cold)))
        });
        Payments {
            daemon,
            signer,
            network,
            change,
            policy,
            wallet: None,
            cold,
        }
    }

    /// How wallet `name` pays: the cold wallet's way for the cold wallet, else this.
    pub fn for_wallet(&self, name: &str) -> &Payments {
        match &self.cold {
            Some((cold, payments)) if cold == name => payments,
            _ => self,
        }
    }

    /// Whether `name` is the cold wallet's (only top-ups spend it).
    pub fn is_cold(&self, name: &str) -> bool {
        self.cold.as_ref().is_some_and(|(cold, _)| cold == name)
    }

    /// How `w` is paid: the cold wallet's way for a top-up, else this (a client's
    /// withdrawal naming the cold wallet is refused before it gets here).
    pub fn of(&self, w: &Withdrawal) -> &Payments {
        match crate::balancing::kind(w) {
            Some(Kind::TopUp) => self.for_wallet(&w.request.wallet),
            _ => self,
        }
    }

    /// The address change goes to (the wallet's own: top-ups and consolidations pay it).
    pub fn change_address(&self) -> Option<String> {
        Some(
            Address::from_script(&self.change, self.network)
                .ok()?
                .to_string(),
        )
    }

    /// Pays from the descriptor wallet `wallet`: its scripts are the spendable coins, its
    /// inputs carry what signers need, and a version its hot keys cannot complete waits
    /// for external signers.
    pub fn with_descriptor_wallet(mut self, wallet: Arc<DescriptorWallet>) -> Payments {
        self.wallet = Some(wallet);
        self
    }

    /// The weight of one signed input of the wallet.
    pub fn input_weight(&self) -> u64 {
        self.wallet
            .as_ref()
            .map_or(select::P2WPKH_INPUT_WEIGHT, |w| w.input_weight())
    }

    /// The network paid on.
    pub fn network(&self) -> Network {
        self.network
    }

    /// The fee and confirmation policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The destination's script, when it is an address of this network.
    pub fn destination(&self, w: &Withdrawal) -> Option<ScriptBuf> {
        self.script_of(&w.request.destination)
    }

    /// The script `address` pays, when it is an address of this network.
    fn script_of(&self, address: &str) -> Option<ScriptBuf> {
        address
            .parse::<Address<_>>()
            .ok()?
            .require_network(self.network)
            .ok()
            .map(|a| a.script_pubkey())
    }

    /// What `w` pays: its destination, or a batch's members' in the order they joined;
    /// nothing but the change for a consolidation; `None` when a destination is not an
    /// address of this network.
    pub fn outputs(&self, w: &Withdrawal) -> Option<Vec<TxOut>> {
        if crate::balancing::kind(w) == Some(Kind::Consolidation) {
            return Some(Vec::new());
        }
        match &w.members {
            Some(members) => members
                .iter()
                .map(|m| {
                    Some(TxOut {
                        value: m.amount,
                        script_pubkey: self.script_of(&m.destination)?,
                    })
                })
                .collect(),
            None => Some(vec![TxOut {
                value: w.request.amount,
                script_pubkey: self.destination(w)?,
            }]),
        }
    }

    /// The change `w` will bring back to its wallet: what it holds less what it pays and
    /// its fee (its cap before it is signed); nothing once a version is confirmed (the
    /// change is then a coin of the wallet's like any other) or before it holds coins.
    pub fn coming_back(&self, w: &Withdrawal) -> Amount {
        if !w.holds_coins() || w.confirmed.is_some() {
            return Amount::ZERO;
        }
        let held: Amount = w.coins.iter().map(|c| c.value).sum();
        let paid: Amount = self
            .outputs(w)
            .unwrap_or_default()
            .iter()
            .map(|o| o.value)
            .sum();
        let fee = w.current().map_or(w.request.max_fee, |a| a.fee);
        held.checked_sub(paid + fee).unwrap_or_default()
    }

    /// The rate to pay under `policy`, sat/vB, within the floor and ceiling, and how it
    /// was chosen (logged when bitcoind has no estimate; shown in the status).
    pub async fn fee_rate(&self, policy: FeeRate) -> Result<FeeChoice, StepError> {
        let (target, prefix) = match policy {
            FeeRate::SatPerVb(r) => return Ok(self.clamped(r, format!("fixed {r} sat/vB"))),
            FeeRate::TargetBlocks(t) => (t, String::new()),
            FeeRate::Priority(p) => (self.policy.target_of(p), format!("{} priority: ", p.name())),
        };
        Ok(match self.estimate(target).await? {
            Some(rate) => self.clamped(
                rate,
                format!("{prefix}bitcoind's estimate for {target} blocks, {rate} sat/vB"),
            ),
            None => {
                let floor = self.policy.fee_floor;
                tracing::warn!(
                    target_blocks = target,
                    fee_floor = floor,
                    "bitcoind has no fee estimate for this target (estimatesmartfee): paying the fee floor"
                );
                FeeChoice {
                    rate: floor,
                    why: format!(
                        "{prefix}bitcoind had no estimate for {target} blocks: the fee floor, {floor} sat/vB"
                    ),
                }
            }
        })
    }

    /// bitcoind's estimate for confirmation within `target` blocks, sat/vB (`None`: it
    /// has none).
    pub async fn estimate(&self, target: u16) -> Result<Option<f64>, StepError> {
        let daemon = self.daemon.clone();
        let per_kvb = tokio::task::spawn_blocking(move || daemon.estimate_smart_fee(target))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))??;
        Ok(per_kvb.map(|a| a.to_sat() as f64 / 1000.0))
    }

    /// `rate` within the floor and ceiling, saying so when it was moved.
    fn clamped(&self, rate: f64, why: String) -> FeeChoice {
        let (floor, ceiling) = (self.policy.fee_floor, self.policy.fee_ceiling);
        if rate < floor {
            FeeChoice {
                rate: floor,
                why: format!("{why}, raised to the fee floor, {floor} sat/vB"),
            }
        } else if rate > ceiling {
            FeeChoice {
                rate: ceiling,
                why: format!("{why}, capped at the fee ceiling, {ceiling} sat/vB"),
            }
        } else {
            FeeChoice { rate, why }
        }
    }

    /// The wallet's mature coins with at least `min_conf` confirmations that the signer
    /// can spend, from the indexer.
    pub async fn spendable(
        &self,
        indexer: &mut Indexer,
        wallet: &str,
    ) -> Result<Vec<Candidate>, StepError> {
        let signable: HashSet<ScriptBuf> = match &self.wallet {
            Some(wallet) => wallet.scripts().into_iter().collect(),
            None => self.signer.scripts().into_iter().collect(),
        };
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = indexer
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

    /// The coins to reserve for `w` among `candidates` at `rate`, or why there are none
    /// (final: insufficient funds, the fee above the cap, an invalid destination).
    pub fn choose(
        &self,
        w: &Withdrawal,
        candidates: &[Candidate],
        rate: f64,
    ) -> Result<Vec<Coin>, String> {
        if crate::balancing::kind(w) == Some(Kind::Consolidation) {
            return self.consolidated(w, candidates, rate);
        }
        let outputs = self
            .outputs(w)
            .ok_or_else(|| "invalid destination".to_owned())?;
        let selection = select::select(
            candidates,
            self.input_weight(),
            &outputs,
            &self.change,
            rate,
            w.request.max_fee,
        )
        .map_err(|e| e.to_string())?;
        Ok(held(selection.coins))
    }

    /// The coins a consolidation spends: the small ones worth spending at `rate`, as many
    /// as its fee cap allows; or why there are too few (withdrawals took them meanwhile).
    fn consolidated(
        &self,
        w: &Withdrawal,
        candidates: &[Candidate],
        rate: f64,
    ) -> Result<Vec<Coin>, String> {
        let Some(policy) = self.policy.balancing.as_ref().and_then(|b| b.consolidate) else {
            return Err("consolidation is no longer configured".into());
        };
        let weight = self.input_weight();
        let mut coins = policy.small(candidates, rate, weight);
        while coins.len() >= 2 && Consolidation::fee(coins.len(), weight, rate) > w.request.max_fee
        {
            coins.pop();
        }
        if coins.len() < 2 {
            return Err(format!(
                "fewer than 2 small coins left to consolidate at {rate:.1} sat/vB"
            ));
        }
        Ok(held(coins))
    }

    /// The unsigned payment of `outputs` over `w`'s reserved coins at `rate` sat/vB,
    /// paying at least `min_fee`: (transaction, fee, weight), or why it cannot be built.
    fn assemble(
        &self,
        w: &Withdrawal,
        outputs: Vec<TxOut>,
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
            output: outputs,
        };
        // Unsigned inputs weigh 41 bytes each; signed ones weigh more (and the segwit
        // marker and flag come with the witnesses).
        let signed_inputs = (self.input_weight() - 4 * 41) * w.coins.len() as u64 + 2;
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

    /// Signs `tx` over `w`'s coins: the version to record (signed, or waiting for
    /// external signers), or why the signer did not.
    fn sign_attempt(
        &self,
        w: &Withdrawal,
        tx: Transaction,
        fee: Amount,
        weight: u64,
        fee_choice: String,
    ) -> Result<Result<Built, String>, StepError> {
        let mut psbt = Psbt::from_unsigned_tx(tx)
            .map_err(|e| tonic::Status::internal(format!("building the PSBT: {e}")))?;
        for (input, coin) in psbt.inputs.iter_mut().zip(&w.coins) {
            input.witness_utxo = Some(TxOut {
                value: coin.value,
                script_pubkey: coin.script.clone(),
            });
        }
        let vbytes = weight.div_ceil(4) as f64;
        let fee_rate = fee.to_sat() as f64 / vbytes;
        if let Some(wallet) = &self.wallet {
            for i in 0..psbt.inputs.len() {
                if let Err(why) = wallet.describe_input(&mut psbt, i) {
                    return Ok(Err(why));
                }
            }
            let pending = Pending {
                txid: psbt.unsigned_tx.compute_txid(),
                psbt: psbt.serialize(),
                fee,
                fee_rate,
                fee_choice,
                // (A withdrawal sent back to the queue keeps its batch's versions in its
                // history: its first version of its own is no replacement.)
                replacing: w.state == crate::saga::State::Broadcast,
            };
            // The hot keys alone may be enough (all cosigners hot); else external signers
            // get the PSBT without the hot signatures, which come last.
            return Ok(Ok(match self.complete(&pending)? {
                Some(attempt) => Built::Signed(attempt),
                None => Built::Unsigned(pending),
            }));
        }
        let signed = self.signer.sign(&mut psbt)?;
        if signed != w.coins.len() {
            return Ok(Err(format!(
                "the signer signed {signed} of {} inputs",
                w.coins.len()
            )));
        }
        let tx = psbt.extract_tx_unchecked_fee_rate();
        Ok(Ok(Built::Signed(Attempt {
            txid: tx.compute_txid(),
            raw: serialize(&tx),
            fee,
            fee_rate,
            fee_choice,
        })))
    }

    /// `pending` signed by the hot keys and finalized, when the signatures gathered so
    /// far and the hot keys' are enough; `None` while more are needed.
    pub fn complete(&self, pending: &Pending) -> Result<Option<Attempt>, StepError> {
        let Some(wallet) = &self.wallet else {
            return Ok(None);
        };
        let mut psbt = Psbt::deserialize(&pending.psbt)
            .map_err(|e| tonic::Status::internal(format!("a stored PSBT: {e}")))?;
        self.signer.sign(&mut psbt)?;
        if wallet.finalize(&mut psbt).is_err() {
            return Ok(None);
        }
        let tx = psbt.extract_tx_unchecked_fee_rate();
        Ok(Some(Attempt {
            txid: tx.compute_txid(),
            raw: serialize(&tx),
            fee: pending.fee,
            fee_rate: pending.fee_rate,
            fee_choice: pending.fee_choice.clone(),
        }))
    }

    /// The first signed version of `w`'s payment over its reserved coins, or why there
    /// can be none (final).
    pub async fn first_version(&self, w: &Withdrawal) -> Result<Result<Built, String>, StepError> {
        let Some(outputs) = self.outputs(w) else {
            return Ok(Err("invalid destination".into()));
        };
        let choice = self.fee_rate(w.request.fee_rate).await?;
        match self.assemble(w, outputs, choice.rate, Amount::ZERO) {
            Ok((tx, fee, weight)) => self.sign_attempt(w, tx, fee, weight, choice.why),
            Err(why) => Ok(Err(why)),
        }
    }

    /// A replacement of a payment stuck unconfirmed: the same coins and payment at a
    /// higher rate (BIP125: more absolute fee, by at least the incremental relay fee of
    /// 1 sat/vB over its size), within `max_fee`; or why there is none.
    pub fn replacement(&self, w: &Withdrawal) -> Result<Result<Built, String>, StepError> {
        let (Some(outputs), Some(current)) = (self.outputs(w), w.current()) else {
            return Ok(Err("nothing to replace".into()));
        };
        let stepped = (current.fee_rate * 1.25).max(current.fee_rate + 1.0);
        let mut rate = stepped.min(self.policy.fee_ceiling);
        // A consolidation is worth it only while fees are low: never above its threshold.
        if crate::balancing::kind(w) == Some(Kind::Consolidation) {
            let cap = self
                .policy
                .balancing
                .as_ref()
                .and_then(|b| b.consolidate)
                .map_or(current.fee_rate, |c| c.max_rate);
            if current.fee_rate + 1.0 > cap {
                return Ok(Err(format!(
                    "a consolidation pays at most {cap} sat/vB: it waits at {:.2}",
                    current.fee_rate
                )));
            }
            rate = rate.min(cap);
        }
        let mut why = format!(
            "replacement of a version unmined after {} blocks: {:.2} sat/vB raised by 25% (at least 1)",
            self.policy.bump_after_blocks, current.fee_rate
        );
        if rate < stepped {
            why.push_str(&format!(", capped at the fee ceiling, {rate} sat/vB"));
        }
        let vbytes = (current.fee.to_sat() as f64 / current.fee_rate).round() as u64;
        let min_fee = current.fee + Amount::from_sat(vbytes.max(1));
        match self.assemble(w, outputs, rate, min_fee) {
            Ok((tx, fee, weight)) => self.sign_attempt(w, tx, fee, weight, why),
            Err(why) => Ok(Err(why)),
        }
    }

    /// `pending` as the external signers completed and sent it themselves, when bitcoind
    /// has it: in the block at `height` (as the index recorded it), else in its mempool.
    /// `None` while it is nowhere (not complete yet, or not sent).
    pub async fn completed_elsewhere(
        &self,
        pending: &Pending,
        height: Option<u32>,
    ) -> Result<Option<Attempt>, StepError> {
        let daemon = self.daemon.clone();
        let txid = pending.txid;
        let raw = tokio::task::spawn_blocking(move || -> Result<_, bitcoind::DaemonError> {
            let Some(height) = height else {
                return daemon.mempool_transaction(&txid);
            };
            let Some(hash) = daemon.block_hashes(&[height])?.pop() else {
                return Ok(None);
            };
            let block: bitcoin::Block = match bitcoin::consensus::deserialize(&daemon.block(&hash)?)
            {
                Ok(block) => block,
                Err(e) => {
                    // Looked for again at the next round: nothing is concluded from it.
                    tracing::warn!(%hash, height, error = %e, "bitcoind sent a block that does not decode");
                    return Ok(None);
                }
            };
            Ok(block
                .txdata
                .into_iter()
                .find(|tx| tx.compute_txid() == txid)
                .map(|tx| serialize(&tx)))
        })
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))??;
        Ok(raw.map(|raw| Attempt {
            txid,
            raw,
            fee: pending.fee,
            fee_rate: pending.fee_rate,
            fee_choice: format!(
                "{} (completed and sent by the external signers)",
                pending.fee_choice
            ),
        }))
    }

    /// Hands `attempt` to bitcoind: its answer (accepted, or why not).
    pub async fn send(
        &self,
        attempt: &Attempt,
    ) -> Result<Result<Txid, bitcoind::DaemonError>, StepError> {
        let hex = attempt.raw.to_lower_hex_string();
        let daemon = self.daemon.clone();
        Ok(
            tokio::task::spawn_blocking(move || daemon.send_raw_transaction(&hex))
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))?,
        )
    }
}
