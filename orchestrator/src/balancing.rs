//! Wallet balancing, high-water side: when the hot wallet's spendable coins (those no
//! withdrawal holds) exceed the high-water mark, the excess above the level to keep goes
//! to the cold wallet, a fresh address of its watch-only descriptor each time. A sweep is
//! a withdrawal saga of the orchestrator's own (request id `orchestrator.sweep.HEIGHT`):
//! durable, idempotent (one request id per tip height, and none while another sweep is
//! unfinished), and its coins are reserved like any withdrawal's, so it never spends
//! coins a withdrawal holds.

use std::sync::Arc;

use bitcoin::{Address, Amount, Network};

use crate::descriptor_wallet::DescriptorWallet;
use crate::saga::{FeeRate, Priority, Request, Withdrawal};

/// Request ids of sweeps start with this (clients may not use it).
pub const SWEEP_PREFIX: &str = "orchestrator.sweep.";

/// The high-water policy of one hot wallet.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The hot wallet (its name at the indexer).
    pub wallet: String,
    /// Above this spendable balance, the excess is swept.
    pub above: Amount,
    /// The balance a sweep leaves (below `above`).
    pub keep: Amount,
    /// The cold wallet's watch-only descriptor: sweeps pay its addresses.
    pub cold: Arc<DescriptorWallet>,
}

impl Sweep {
    /// What to sweep when the hot wallet can spend `spendable`: nothing at or below the
    /// mark, else all above the level to keep.
    pub fn excess(&self, spendable: Amount) -> Option<Amount> {
        (spendable > self.above).then(|| spendable - self.keep)
    }

    /// The sweep of `amount` decided at tip `height`, to the cold descriptor's address at
    /// index `height` (fresh for every sweep, the same for a decision made twice), at the
    /// low priority's rate, its fee capped at 1% of the amount.
    pub fn request(&self, height: u32, amount: Amount, network: Network) -> Option<Request> {
        let script = self.cold.script_at(height)?;
        let address = Address::from_script(&script, network).ok()?;
        Some(Request {
            request_id: format!("{SWEEP_PREFIX}{height}"),
            wallet: self.wallet.clone(),
            destination: address.to_string(),
            amount,
            fee_rate: FeeRate::Priority(Priority::Low),
            max_fee: amount / 100,
        })
    }
}

/// Whether `w` is a sweep.
pub fn is_sweep(w: &Withdrawal) -> bool {
    w.request.request_id.starts_with(SWEEP_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::bip32::{Xpriv, Xpub};

    fn sweep() -> Sweep {
        let secp = bitcoin::secp256k1::Secp256k1::new();
        let xpub = Xpub::from_priv(
            &secp,
            &Xpriv::new_master(Network::Regtest, &[8; 32]).unwrap(),
        );
        let cold = DescriptorWallet::parse(&format!("wpkh({xpub}/0/*)"), Network::Regtest, 1);
        Sweep {
            wallet: "hot".into(),
            above: Amount::from_btc(3.0).unwrap(),
            keep: Amount::from_btc(1.0).unwrap(),
            cold: Arc::new(cold.unwrap()),
        }
    }

    #[test]
    fn only_the_excess_above_the_mark_is_swept_down_to_the_level_kept() {
        let s = sweep();
        assert_eq!(s.excess(Amount::from_btc(3.0).unwrap()), None);
        assert_eq!(
            s.excess(Amount::from_btc(5.0).unwrap()),
            Some(Amount::from_btc(4.0).unwrap())
        );
        let r = s
            .request(120, Amount::from_btc(4.0).unwrap(), Network::Regtest)
            .unwrap();
        assert_eq!(r.request_id, "orchestrator.sweep.120");
        assert_eq!(r.max_fee, Amount::from_btc(0.04).unwrap());
        let again = s
            .request(120, Amount::from_btc(4.0).unwrap(), Network::Regtest)
            .unwrap();
        assert_eq!(r, again, "a decision made twice is one request");
        let next = s
            .request(121, Amount::from_btc(4.0).unwrap(), Network::Regtest)
            .unwrap();
        assert_ne!(
            next.destination, r.destination,
            "a fresh address each sweep"
        );
    }
}
