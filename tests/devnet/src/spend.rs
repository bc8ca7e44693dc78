//! The node wallet's `sendtoaddress` and `getbalance`.

use bitcoin::absolute::LockTime;
use bitcoin::transaction::Version;
use bitcoin::{Amount, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid, Witness};

use crate::chain::COINBASE_MATURITY;
use crate::node::State;
use crate::validation::Policy;
use crate::wallet::AddrKind;

/// Wallet fee rate (sat/vB) when no estimate is set.
const FALLBACK_FEE_RATE: u64 = 2;

impl State {
    /// The wallet script of a spent output, confirmed or in the mempool.
    fn spends_ours(&self, outpoint: &OutPoint) -> bool {
        let script = match self.chain.coin(outpoint) {
            Some(c) => Some(&c.txout.script_pubkey),
            None => self
                .mempool
                .get(&outpoint.txid)
                .and_then(|e| e.tx.output.get(outpoint.vout as usize))
                .map(|o| &o.script_pubkey),
        };
        script.is_some_and(|s| self.wallet.is_mine(s))
    }

    /// Mature confirmed wallet coins, then outputs of the wallet's own mempool transactions
    /// (trusted change, as Core's wallet spends it), none spent in the mempool.
    fn spendable_coins(&self) -> Vec<(OutPoint, TxOut)> {
        let spend_height = self.chain.height() + 1;
        let mut coins: Vec<(OutPoint, TxOut)> = self
            .chain
            .utxos()
            .iter()
            .filter(|(op, c)| {
                self.wallet.is_mine(&c.txout.script_pubkey)
                    // Core's wallet waits one block longer than consensus (depth 101).
                    && (!c.coinbase || spend_height - c.height > COINBASE_MATURITY)
                    && self.mempool.spender(op).is_none()
            })
            .map(|(op, c)| (*op, c.txout.clone()))
            .collect();
        coins.sort_by(|a, b| b.1.value.cmp(&a.1.value).then(a.0.cmp(&b.0)));
        for entry in self.mempool.sorted() {
            if !entry
                .tx
                .input
                .iter()
                .all(|i| self.spends_ours(&i.previous_output))
            {
                continue;
            }
            for (vout, out) in entry.tx.output.iter().enumerate() {
                let op = OutPoint {
                    txid: entry.txid,
                    vout: vout as u32,
                };
                if self.wallet.is_mine(&out.script_pubkey) && self.mempool.spender(&op).is_none() {
                    coins.push((op, out.clone()));
                }
            }
        }
        coins
    }

    /// What `getbalance` shows: every spendable coin.
    pub(crate) fn balance(&self) -> Amount {
        self.spendable_coins().iter().map(|(_, o)| o.value).sum()
    }

    /// Pays `amount` to `script` from confirmed coins, BIP125-signalling like Core's wallet.
    pub(crate) fn send_to(
        &mut self,
        script: &ScriptBuf,
        amount: Amount,
        subtract_fee: bool,
    ) -> Result<Txid, (i32, String)> {
        let fee_rate = self
            .fee_estimate
            .map(|per_kvb| per_kvb.to_sat().div_ceil(1000))
            .unwrap_or(FALLBACK_FEE_RATE)
            .max(1);
        let mut inputs = Vec::new();
        let mut total = Amount::ZERO;
        let mut vsize = 11 + 2 * 43;
        for coin in self.spendable_coins() {
            let kind = self
                .wallet
                .kind_of(&coin.1.script_pubkey)
                .unwrap_or(AddrKind::Bech32);
            vsize += kind.input_vsize();
            total += coin.1.value;
            inputs.push(coin);
            let fee = Amount::from_sat(vsize * fee_rate);
            if total >= amount + if subtract_fee { Amount::ZERO } else { fee } {
                break;
            }
        }
        let fee = Amount::from_sat(vsize * fee_rate);
        let (pay, needed) = if subtract_fee {
            (
                amount.checked_sub(fee).ok_or((
                    -6,
                    "The transaction amount is too small to pay the fee".to_string(),
                ))?,
                amount,
            )
        } else {
            (amount, amount + fee)
        };
        if total < needed {
            return Err((-6, "Insufficient funds".into()));
        }
        let mut outputs = vec![TxOut {
            value: pay,
            script_pubkey: script.clone(),
        }];
        let change = total - needed;
        if change.to_sat() >= 1_000 {
            let change_addr = self
                .wallet
                .new_address(AddrKind::Bech32)
                .map_err(|e| (-4, e.to_string()))?;
            let change_out = TxOut {
                value: change,
                script_pubkey: change_addr.script_pubkey(),
            };
            // Core puts change at a random position so it cannot be spotted by index.
            if rand::random::<bool>() {
                outputs.push(change_out);
            } else {
                outputs.insert(0, change_out);
            }
        }
        let mut tx = Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: inputs
                .iter()
                .map(|(op, _)| TxIn {
                    previous_output: *op,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                    witness: Witness::new(),
                })
                .collect(),
            output: outputs,
        };
        let prevouts: Vec<TxOut> = inputs.iter().map(|(_, o)| o.clone()).collect();
        self.wallet.sign(&mut tx, &prevouts).map_err(|e| (-4, e))?;
        let policy = Policy {
            bypass_fees: false,
            check_scripts: true,
            max_fee_rate: None,
        };
        let checked = self
            .accept(tx, &policy, false)
            .map_err(|r| (-4, format!("Transaction rejected: {}", r.message)))?;
        Ok(checked.txid)
    }
}
