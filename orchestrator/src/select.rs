//! Coin selection for a withdrawal: branch-and-bound for a changeless solution, else a
//! single random draw with change back to the wallet (`bitcoin-coin-selection`, Bitcoin
//! Core's algorithms), then the fee checked against the request's cap. Coins reserved by
//! other withdrawals never reach this module: the caller filters them out first.

use bitcoin::{Amount, OutPoint, ScriptBuf, TxOut};
use bitcoin_coin_selection::errors::SelectionError;
use bitcoin_coin_selection::{select_coins, WeightedUtxo};

/// Weight of a P2WPKH input, signed: outpoint, sequence, empty script_sig (41 bytes x 4)
/// plus the witness (signature and key, up to 108 bytes).
pub const P2WPKH_INPUT_WEIGHT: u64 = 41 * 4 + 108;
/// Version, locktime, input and output counts (x 4) and the segwit marker and flag.
const TX_OVERHEAD_WEIGHT: u64 = 10 * 4 + 2;
/// The rate change is expected to be spent at later, sat/vB (Core's default long-term rate
/// is 10).
const LONG_TERM_SAT_VB: f64 = 10.0;
/// Most weight a standard transaction may have.
const MAX_STANDARD_WEIGHT: u64 = 400_000;

/// A coin the wallet may spend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The output.
    pub outpoint: OutPoint,
    /// Its value.
    pub value: Amount,
    /// Its script (P2WPKH for the key-file signer).
    pub script: ScriptBuf,
}

/// The coins chosen, and what the transaction pays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Inputs.
    pub coins: Vec<Candidate>,
    /// Fee.
    pub fee: Amount,
    /// Change back to the wallet (`None`: changeless, the excess went to the fee).
    pub change: Option<Amount>,
    /// Estimated weight of the signed transaction.
    pub weight: u64,
}

/// Why no selection was made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    /// The spendable coins do not cover the amount and the fee.
    #[error("insufficient funds: {available} spendable, {needed} needed with the fee")]
    InsufficientFunds {
        /// Sum of the candidates.
        available: Amount,
        /// Amount plus the fee without inputs.
        needed: Amount,
    },
    /// The fee at this rate would be above the request's cap.
    #[error("the fee {fee} at this rate is above max_fee {max_fee}")]
    FeeAboveCap {
        /// The fee the selection needs.
        fee: Amount,
        /// The cap.
        max_fee: Amount,
    },
    /// The search gave up (too many coins) or failed inside.
    #[error("coin selection failed: {0}")]
    Failed(String),
}

fn output_weight(script: &ScriptBuf) -> u64 {
    // Value (8), script length (1 for any standard script) and the script, x 4.
    (8 + 1 + script.len() as u64) * 4
}

/// Fee for `weight` at `sat_vb`, rounded up to whole vbytes and satoshis.
pub fn fee_for(weight: u64, sat_vb: f64) -> Amount {
    let vbytes = weight.div_ceil(4);
    Amount::from_sat((vbytes as f64 * sat_vb).ceil() as u64)
}

fn units(a: Amount) -> bitcoin_units::Amount {
    bitcoin_units::Amount::from_sat(a.to_sat()).unwrap_or(bitcoin_units::Amount::MAX_MONEY)
}

fn rate(sat_vb: f64) -> bitcoin_units::FeeRate {
    // sat/vB x 250 = sat per 1000 weight units.
    bitcoin_units::FeeRate::from_sat_per_kwu((sat_vb * 250.0).ceil() as u32)
}

/// Chooses coins among `candidates` (each weighing `input_weight` once signed) to pay
/// `outputs` (one for a withdrawal, one per member for a batch) at `sat_vb`, with change
/// (when any) to `change_script`, within `max_fee`.
pub fn select(
    candidates: &[Candidate],
    input_weight: u64,
    outputs: &[TxOut],
    change_script: &ScriptBuf,
    sat_vb: f64,
    max_fee: Amount,
) -> Result<Selection, SelectError> {
    let amount: Amount = outputs.iter().map(|o| o.value).sum();
    let fixed_weight = TX_OVERHEAD_WEIGHT
        + outputs
            .iter()
            .map(|o| output_weight(&o.script_pubkey))
            .sum::<u64>();
    let change_weight = output_weight(change_script);
    let target = amount + fee_for(fixed_weight, sat_vb);
    let available: Amount = candidates.iter().map(|c| c.value).sum();
    let insufficient = || SelectError::InsufficientFunds {
        available,
        needed: target,
    };
    // Creating change now and spending it later.
    let cost_of_change = fee_for(change_weight, sat_vb) + fee_for(input_weight, LONG_TERM_SAT_VB);
    // Coins worth less than their own input fee are left out.
    let (index, pool): (Vec<usize>, Vec<WeightedUtxo>) = candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            WeightedUtxo::new(
                units(c.value),
                bitcoin_units::Weight::from_wu(input_weight),
                rate(sat_vb),
                rate(LONG_TERM_SAT_VB),
            )
            .map(|w| (i, w))
        })
        .unzip();
    let chosen = match select_coins(
        units(target),
        units(cost_of_change),
        bitcoin_units::Weight::from_wu(MAX_STANDARD_WEIGHT - fixed_weight - change_weight),
        pool.as_slice(),
    ) {
        Ok((_, chosen)) => chosen,
        Err(SelectionError::InsufficentFunds) => return Err(insufficient()),
        Err(e) => return Err(SelectError::Failed(format!("{e:?}"))),
    };
    // The chosen are references into `pool`: their positions name the candidates.
    let coins: Vec<Candidate> = chosen
        .iter()
        .filter_map(|c| {
            pool.iter()
                .position(|w| std::ptr::eq(w, *c))
                .map(|p| candidates[index[p]].clone())
        })
        .collect();
    let total: Amount = coins.iter().map(|c| c.value).sum();
    let inputs_weight = input_weight * coins.len() as u64;
    let without_change = fixed_weight + inputs_weight;
    let with_change = without_change + change_weight;
    let fee_with_change = fee_for(with_change, sat_vb);
    let dust = change_script.minimal_non_dust();
    let (fee, change, weight) = match total.checked_sub(amount + fee_with_change) {
        // Change worth keeping (above dust and above what it costs to create and spend).
        Some(change) if change >= dust && change > cost_of_change => {
            (fee_with_change, Some(change), with_change)
        }
        _ => {
            let fee = total
                .checked_sub(amount)
                .filter(|f| *f >= fee_for(without_change, sat_vb))
                .ok_or_else(insufficient)?;
            (fee, None, without_change)
        }
    };
    if fee > max_fee {
        return Err(SelectError::FeeAboveCap { fee, max_fee });
    }
    Ok(Selection {
        coins,
        fee,
        change,
        weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;
    use bitcoin::{Txid, WPubkeyHash};

    fn p2wpkh(n: u8) -> ScriptBuf {
        ScriptBuf::new_p2wpkh(&WPubkeyHash::from_byte_array([n; 20]))
    }

    fn pay(sat: u64) -> Vec<TxOut> {
        vec![TxOut {
            value: Amount::from_sat(sat),
            script_pubkey: p2wpkh(1),
        }]
    }

    fn coins(values: &[u64]) -> Vec<Candidate> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Candidate {
                outpoint: OutPoint::new(Txid::from_byte_array([i as u8 + 1; 32]), 0),
                value: Amount::from_sat(*v),
                script: p2wpkh(9),
            })
            .collect()
    }

    fn check(s: &Selection, amount: u64) {
        let total: u64 = s.coins.iter().map(|c| c.value.to_sat()).sum();
        let change = s.change.map_or(0, |c| c.to_sat());
        assert_eq!(total, amount + change + s.fee.to_sat(), "{s:?}");
        assert!(s.fee >= fee_for(s.weight, 2.0), "{s:?}");
        let mut seen = std::collections::HashSet::new();
        assert!(
            s.coins.iter().all(|c| seen.insert(c.outpoint)),
            "a coin twice"
        );
    }

    #[test]
    fn an_exact_match_needs_no_change() {
        // 100,000 plus the fee of one input and the fixed part at 2 sat/vB.
        let fee = fee_for(
            TX_OVERHEAD_WEIGHT + output_weight(&p2wpkh(1)) + P2WPKH_INPUT_WEIGHT,
            2.0,
        );
        let exact = 100_000 + fee.to_sat();
        let c = coins(&[exact, 500_000, 7_000]);
        let s = select(
            &c,
            P2WPKH_INPUT_WEIGHT,
            &pay(100_000),
            &p2wpkh(2),
            2.0,
            Amount::from_sat(5_000),
        )
        .unwrap();
        assert_eq!((s.coins.len(), s.change), (1, None));
        assert_eq!(s.coins[0].value.to_sat(), exact);
        check(&s, 100_000);
    }

    #[test]
    fn otherwise_change_goes_back_and_everything_adds_up() {
        let c = coins(&[300_000, 250_000, 40_000]);
        let s = select(
            &c,
            P2WPKH_INPUT_WEIGHT,
            &pay(420_000),
            &p2wpkh(2),
            2.0,
            Amount::from_sat(5_000),
        )
        .unwrap();
        check(&s, 420_000);
        assert!(s.coins.len() >= 2);
    }

    #[test]
    fn shortfalls_and_fee_caps_are_typed_errors() {
        let c = coins(&[30_000, 20_000]);
        let e = select(
            &c,
            P2WPKH_INPUT_WEIGHT,
            &pay(60_000),
            &p2wpkh(2),
            2.0,
            Amount::from_sat(5_000),
        )
        .unwrap_err();
        assert!(matches!(e, SelectError::InsufficientFunds { .. }), "{e}");
        let c = coins(&[1_000_000]);
        let e = select(
            &c,
            P2WPKH_INPUT_WEIGHT,
            &pay(100_000),
            &p2wpkh(2),
            50.0,
            Amount::from_sat(1_000),
        )
        .unwrap_err();
        assert!(matches!(e, SelectError::FeeAboveCap { .. }), "{e}");
        assert!(select(
            &[],
            P2WPKH_INPUT_WEIGHT,
            &pay(1),
            &p2wpkh(2),
            1.0,
            Amount::from_sat(1)
        )
        .is_err());
    }

    #[test]
    fn many_random_pools_always_balance() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let n = rng.gen_range(1..30);
            let values: Vec<u64> = (0..n).map(|_| rng.gen_range(1_000..2_000_000)).collect();
            let amount = rng.gen_range(1_000..3_000_000);
            let c = coins(&values);
            match select(
                &c,
                P2WPKH_INPUT_WEIGHT,
                &pay(amount),
                &p2wpkh(2),
                2.0,
                Amount::from_sat(100_000),
            ) {
                Ok(s) => check(&s, amount),
                Err(SelectError::InsufficientFunds { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn a_batch_pays_every_output_and_its_weight_counts_each() {
        let outputs: Vec<TxOut> = (1..=5)
            .map(|n| TxOut {
                value: Amount::from_sat(50_000 * n),
                script_pubkey: p2wpkh(n as u8),
            })
            .collect();
        let c = coins(&[300_000, 600_000, 90_000]);
        let s = select(
            &c,
            P2WPKH_INPUT_WEIGHT,
            &outputs,
            &p2wpkh(9),
            2.0,
            Amount::from_sat(5_000),
        )
        .unwrap();
        check(&s, 750_000);
        let outputs_weight: u64 = outputs
            .iter()
            .map(|o| output_weight(&o.script_pubkey))
            .sum();
        let change = s.change.map_or(0, |_| output_weight(&p2wpkh(9)));
        assert_eq!(
            s.weight,
            TX_OVERHEAD_WEIGHT
                + outputs_weight
                + change
                + P2WPKH_INPUT_WEIGHT * s.coins.len() as u64
        );
    }
}
