//! The script population of the generated chain: a deterministic script for every index,
//! in a mainnet-like mix of types; indices below `WATCHED` are the watched set.

use bitcoin::hashes::{sha256, Hash};
use bitcoin::ScriptBuf;

/// Scripts in the watched set.
pub const WATCHED: u64 = 100_000;
/// Scripts in the whole population.
pub const POPULATION: u64 = 20_000_000;

/// The script with index `i`: P2WPKH 50%, P2TR 20%, P2PKH 15%, P2SH 10%, P2WSH 4%, P2PK 1%.
pub fn script(i: u64) -> ScriptBuf {
    let h = sha256::Hash::hash(&i.to_le_bytes()).to_byte_array();
    let mut h20 = [0u8; 20];
    h20.copy_from_slice(&h[..20]);
    match i % 100 {
        0..=49 => ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array(h20)),
        50..=69 => {
            let mut s = vec![0x51, 0x20];
            s.extend_from_slice(&h);
            ScriptBuf::from_bytes(s)
        }
        70..=84 => ScriptBuf::new_p2pkh(&bitcoin::PubkeyHash::from_byte_array(h20)),
        85..=94 => ScriptBuf::new_p2sh(&bitcoin::ScriptHash::from_byte_array(h20)),
        95..=98 => ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_byte_array(h)),
        _ => {
            let mut s = vec![33, 0x02];
            s.extend_from_slice(&h);
            s.push(0xac);
            ScriptBuf::from_bytes(s)
        }
    }
}
