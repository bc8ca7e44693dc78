//! Wallet balancing: the runs the orchestrator starts on its own to keep the hot wallet
//! between two levels, and its coins few.
//!
//! - High water: when the hot wallet's spendable coins (those no withdrawal holds) exceed
//!   the mark, the excess above the level to keep goes to the cold wallet, a fresh address
//!   of its watch-only descriptor each time (index 1, 2, ...: within the indexer's gap).
//! - Low water: when they fall below the mark, a top-up from the cold wallet brings them
//!   back to the level asked for. The cold keys are offline: the run waits in
//!   AWAITING_SIGNATURES with its PSBT listed by the Signatures service; the change goes
//!   back to the cold descriptor's index 0.
//! - Consolidation: when bitcoind's estimate for the low priority is below a threshold
//!   and the hot wallet holds many small coins, they are spent into one, back to its
//!   change address, while fees are cheap.
//!
//! Each run is a withdrawal saga of the orchestrator's own, named by its kind and the tip
//! height it was decided at (`orchestrator.sweep.H`, `orchestrator.topup.H`,
//! `orchestrator.consolidate.H`): durable and idempotent like a client's, at most one
//! unfinished of each kind, and its coins are reserved like any withdrawal's, so it never
//! spends coins a withdrawal holds.

use std::sync::Arc;

use bitcoin::{Address, Amount, Network, ScriptBuf};

use crate::descriptor_wallet::DescriptorWallet;
use crate::saga::{FeeRate, Priority, Request, Withdrawal};
use crate::select::{self, Candidate};

/// What a balancing run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Hot wallet's excess to the cold wallet.
    Sweep,
    /// Cold wallet to the hot wallet, signed offline.
    TopUp,
    /// The hot wallet's small coins into one.
    Consolidation,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 3] = [Kind::Sweep, Kind::TopUp, Kind::Consolidation];

    /// The prefix of its runs' request ids.
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Sweep => "orchestrator.sweep.",
            Kind::TopUp => "orchestrator.topup.",
            Kind::Consolidation => "orchestrator.consolidate.",
        }
    }

    /// The request id of its run decided at tip `height`.
    pub fn request_id(self, height: u32) -> String {
        format!("{}{height}", self.prefix())
    }
}

/// The kind of run `w` is, when it is one of the orchestrator's own.
pub fn kind(w: &Withdrawal) -> Option<Kind> {
    Kind::ALL
        .into_iter()
        .find(|k| w.request.request_id.starts_with(k.prefix()))
}

/// Whether `w` is a sweep.
pub fn is_sweep(w: &Withdrawal) -> bool {
    kind(w) == Some(Kind::Sweep)
}

/// Which kinds of run may be decided at a tip, given the unfinished ones: the same rule
/// on both engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MayStart {
    /// A sweep: none runs, and no consolidation is still choosing its coins (one that
    /// holds its coins already, waiting at its low rate, does not keep the hot wallet
    /// above its mark: a sweep counts only coins it does not hold).
    pub sweep: bool,
    /// A top-up: none runs, and neither a sweep nor a consolidation moves hot coins.
    pub top_up: bool,
    /// A consolidation: neither it nor a sweep runs, and no sweep was started at this
    /// tip (it may take the same small coins).
    pub consolidation: bool,
}

impl MayStart {
    /// The rule over `unfinished` (each run's kind, and whether it holds its coins yet)
    /// where `swept_now` says a sweep was started at this tip.
    pub fn given(unfinished: &[(Kind, bool)], swept_now: bool) -> MayStart {
        let running = |k: Kind| unfinished.iter().any(|(kind, _)| *kind == k);
        let choosing = |k: Kind| unfinished.iter().any(|(kind, holds)| *kind == k && !holds);
        let moving = running(Kind::Sweep) || running(Kind::Consolidation);
        MayStart {
            sweep: !running(Kind::Sweep) && !choosing(Kind::Consolidation),
            top_up: !moving && !running(Kind::TopUp),
            consolidation: !moving && !swept_now,
        }
    }
}

/// The balancing policy of one hot wallet.
#[derive(Clone, Debug)]
pub struct Balancing {
    /// The hot wallet (its name at the indexer).
    pub hot_wallet: String,
    /// The cold wallet's name at the indexer (it must watch `cold`'s scripts).
    pub cold_wallet: String,
    /// The cold wallet's watch-only descriptor (sweeps pay it, top-ups spend it).
    pub cold: Option<Arc<DescriptorWallet>>,
    /// The high-water mark, when set.
    pub sweep: Option<HighWater>,
    /// The low-water mark, when set.
    pub top_up: Option<LowWater>,
    /// When small coins are consolidated, when set.
    pub consolidate: Option<Consolidation>,
}

/// Above `above` spendable, the excess above `keep` is swept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HighWater {
    /// The mark.
    pub above: Amount,
    /// The balance a sweep leaves (below `above`).
    pub keep: Amount,
}

/// Below `below` spendable, a top-up brings the hot wallet to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowWater {
    /// The mark.
    pub below: Amount,
    /// The balance a top-up brings the hot wallet to (above `below`).
    pub to: Amount,
}

/// Coins below `coins_below` are consolidated when at least `min_coins` of them wait and
/// bitcoind's estimate for the low priority is at most `max_rate`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Consolidation {
    /// The highest rate a consolidation pays, sat/vB.
    pub max_rate: f64,
    /// A coin below this value is small.
    pub coins_below: Amount,
    /// How many small coins make a consolidation worth it (2 or more).
    pub min_coins: usize,
    /// Most coins one consolidation spends.
    pub max_coins: usize,
}

impl Balancing {
    /// The sweep of the excess when the hot wallet can spend `spendable` and it is above
    /// the mark, decided at tip `height`, to the cold address at `index` (the count of
    /// sweeps signed before it, plus one; `None` past the cold wallet's range, which top-ups
    /// could not spend), at the low priority: 99% of the excess, its fee capped at the
    /// other 1% (so the coins swept always cover it).
    pub fn sweep(
        &self,
        spendable: Amount,
        height: u32,
        index: u32,
        network: Network,
    ) -> Option<Request> {
        let mark = self.sweep?;
        if spendable <= mark.above {
            return None;
        }
        let excess = spendable - mark.keep;
        let cold = self.cold.as_ref()?;
        let script = cold.script_at(index).filter(|s| cold.contains(s))?;
        let max_fee = excess / 100;
        Some(Request {
            request_id: Kind::Sweep.request_id(height),
            wallet: self.hot_wallet.clone(),
            destination: address(&script, network)?,
            amount: excess - max_fee,
            fee_rate: FeeRate::Priority(Priority::Low),
            max_fee,
        })
    }

    /// The top-up when the hot wallet can spend `spendable` and it is below the mark,
    /// decided at tip `height`: from the cold wallet to the hot wallet's `hot_address`, at
    /// the normal priority, its fee capped at 1%.
    pub fn top_up(&self, spendable: Amount, height: u32, hot_address: &str) -> Option<Request> {
        let mark = self.top_up?;
        if spendable >= mark.below {
            return None;
        }
        let amount = mark.to - spendable;
        Some(Request {
            request_id: Kind::TopUp.request_id(height),
            wallet: self.cold_wallet.clone(),
            destination: hot_address.to_owned(),
            amount,
            fee_rate: FeeRate::Priority(Priority::Normal),
            max_fee: amount / 100,
        })
    }

    /// The consolidation of the hot wallet's small coins among `spendable` when bitcoind
    /// estimates `estimate` sat/vB for the low priority, decided at tip `height`, back to
    /// `hot_address`: its amount is 0 (everything less the fee returns to the wallet), its
    /// fee capped at what `max_coins` inputs cost at the threshold.
    pub fn consolidation(
        &self,
        spendable: &[Candidate],
        estimate: Option<f64>,
        input_weight: u64,
        height: u32,
        hot_address: &str,
    ) -> Option<Request> {
        let policy = self.consolidate?;
        if estimate? > policy.max_rate {
            return None;
        }
        if policy.small(spendable, estimate?, input_weight).len() < policy.min_coins {
            return None;
        }
        Some(Request {
            request_id: Kind::Consolidation.request_id(height),
            wallet: self.hot_wallet.clone(),
            destination: hot_address.to_owned(),
            amount: Amount::ZERO,
            fee_rate: FeeRate::Priority(Priority::Low),
            max_fee: policy.fee_cap(input_weight),
        })
    }
}

impl Consolidation {
    /// The small coins among `candidates` worth spending at `rate` (each worth at least
    /// twice what its input costs), smallest first, at most `max_coins`.
    pub fn small(&self, candidates: &[Candidate], rate: f64, input_weight: u64) -> Vec<Candidate> {
        let input_fee = select::fee_for(input_weight, rate);
        let mut small: Vec<Candidate> = candidates
            .iter()
            .filter(|c| c.value < self.coins_below && c.value >= input_fee * 2)
            .cloned()
            .collect();
        small.sort_by_key(|c| (c.value, c.outpoint));
        small.truncate(self.max_coins);
        small
    }

    /// The most a consolidation pays: `max_coins` inputs at the threshold.
    pub fn fee_cap(&self, input_weight: u64) -> Amount {
        Self::fee(self.max_coins, input_weight, self.max_rate)
    }

    /// What spending `n` coins of `input_weight` into one costs at `rate`, generously (the
    /// overhead with a 3-byte input count, and one output as large as a P2WSH one).
    pub fn fee(n: usize, input_weight: u64, rate: f64) -> Amount {
        let overhead = 4 * (12 + 43) + 2;
        select::fee_for(overhead + input_weight * n as u64, rate)
    }
}

fn address(script: &ScriptBuf, network: Network) -> Option<String> {
    Some(Address::from_script(script, network).ok()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::bip32::{Xpriv, Xpub};
    use bitcoin::hashes::Hash;

    #[test]
    fn runs_that_move_the_same_coins_never_start_beside_each_other() {
        let may = |runs: &[(Kind, bool)], swept| MayStart::given(runs, swept);
        let all = MayStart {
            sweep: true,
            top_up: true,
            consolidation: true,
        };
        assert_eq!(may(&[], false), all);
        // A sweep running: nothing else moves hot coins beside it.
        let sweeping = may(&[(Kind::Sweep, true)], false);
        assert_eq!(
            (sweeping.sweep, sweeping.top_up, sweeping.consolidation),
            (false, false, false)
        );
        // A consolidation still choosing its coins holds up a sweep; one holding them
        // (waiting at its low rate) does not. Neither lets a top-up or a second start.
        let choosing = may(&[(Kind::Consolidation, false)], false);
        let holding = may(&[(Kind::Consolidation, true)], false);
        assert!(!choosing.sweep && holding.sweep);
        assert!(!choosing.top_up && !holding.top_up);
        assert!(!choosing.consolidation && !holding.consolidation);
        // A top-up running: no second one; sweeps and consolidations go on.
        let topping = may(&[(Kind::TopUp, false)], false);
        assert_eq!(
            (topping.sweep, topping.top_up, topping.consolidation),
            (true, false, true)
        );
        // A sweep started at this tip: no consolidation beside it.
        assert!(!may(&[], true).consolidation);
    }

    fn balancing() -> Balancing {
        let secp = bitcoin::secp256k1::Secp256k1::new();
        let xpub = Xpub::from_priv(
            &secp,
            &Xpriv::new_master(Network::Regtest, &[8; 32]).unwrap(),
        );
        let cold = DescriptorWallet::parse(&format!("wpkh({xpub}/0/*)"), Network::Regtest, 20);
        Balancing {
            hot_wallet: "hot".into(),
            cold_wallet: "cold".into(),
            cold: Some(Arc::new(cold.unwrap())),
            sweep: Some(HighWater {
                above: Amount::from_btc(3.0).unwrap(),
                keep: Amount::from_btc(1.0).unwrap(),
            }),
            top_up: Some(LowWater {
                below: Amount::from_btc(0.5).unwrap(),
                to: Amount::from_btc(2.0).unwrap(),
            }),
            consolidate: Some(Consolidation {
                max_rate: 3.0,
                coins_below: Amount::from_sat(100_000),
                min_coins: 3,
                max_coins: 4,
            }),
        }
    }

    fn coin(n: u8, sat: u64) -> Candidate {
        Candidate {
            outpoint: bitcoin::OutPoint::new(bitcoin::Txid::from_byte_array([n; 32]), 0),
            value: Amount::from_sat(sat),
            script: ScriptBuf::new(),
        }
    }

    #[test]
    fn only_the_excess_above_the_mark_is_swept_down_to_the_level_kept() {
        let b = balancing();
        let net = Network::Regtest;
        assert_eq!(b.sweep(Amount::from_btc(3.0).unwrap(), 120, 1, net), None);
        let r = b
            .sweep(Amount::from_btc(5.0).unwrap(), 120, 1, net)
            .unwrap();
        assert_eq!(r.amount + r.max_fee, Amount::from_btc(4.0).unwrap());
        assert_eq!(r.request_id, "orchestrator.sweep.120");
        assert_eq!(r.max_fee, Amount::from_btc(0.04).unwrap());
        let again = b
            .sweep(Amount::from_btc(5.0).unwrap(), 120, 1, net)
            .unwrap();
        assert_eq!(r, again, "a decision made twice is one request");
        let next = b
            .sweep(Amount::from_btc(5.0).unwrap(), 121, 2, net)
            .unwrap();
        assert_ne!(
            next.destination, r.destination,
            "a fresh address each sweep"
        );
    }

    #[test]
    fn below_the_low_mark_a_top_up_from_the_cold_wallet_brings_the_level_asked_for() {
        let b = balancing();
        assert_eq!(
            b.top_up(Amount::from_btc(0.5).unwrap(), 7, "hot-addr"),
            None
        );
        let r = b
            .top_up(Amount::from_btc(0.2).unwrap(), 7, "hot-addr")
            .unwrap();
        assert_eq!(
            (
                r.request_id.as_str(),
                r.wallet.as_str(),
                r.destination.as_str()
            ),
            ("orchestrator.topup.7", "cold", "hot-addr")
        );
        assert_eq!(r.amount, Amount::from_btc(1.8).unwrap());
    }

    #[test]
    fn small_coins_are_consolidated_only_when_fees_are_low_and_enough_wait() {
        let b = balancing();
        let w = select::P2WPKH_INPUT_WEIGHT;
        // 272 wu at 3 sat/vB is 204 sat an input: coins under 408 sat are not worth it.
        let coins = [
            coin(1, 50_000),
            coin(2, 300),
            coin(3, 20_000),
            coin(4, 200_000),
            coin(5, 30_000),
            coin(6, 10_000),
            coin(7, 40_000),
        ];
        let small = b.consolidate.unwrap().small(&coins, 3.0, w);
        let values: Vec<u64> = small.iter().map(|c| c.value.to_sat()).collect();
        assert_eq!(
            values,
            [10_000, 20_000, 30_000, 40_000],
            "smallest first, capped"
        );
        assert!(b.consolidation(&coins, Some(3.0), w, 9, "a").is_some());
        assert!(b.consolidation(&coins, Some(3.5), w, 9, "a").is_none());
        assert!(b.consolidation(&coins, None, w, 9, "a").is_none());
        assert!(b.consolidation(&coins[..3], Some(3.0), w, 9, "a").is_none());
        let r = b.consolidation(&coins, Some(1.0), w, 9, "a").unwrap();
        assert_eq!(r.amount, Amount::ZERO);
        assert_eq!(r.request_id, "orchestrator.consolidate.9");
    }
}
