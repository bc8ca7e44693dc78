//! The bloom filter over watched scripts that lets the filter stage reject almost every
//! output without a lookup. Pure: saved and loaded as bytes by the caller.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use fastbloom::AtomicBloomFilter;
use foldhash::fast::FixedState;

/// A bloom filter over watched scripts: `false` means certainly not watched. Scripts are
/// added in place (the parse workers keep probing it meanwhile), so watching more never
/// rebuilds it until it outgrows the size it was made for.
pub struct ScriptFilter {
    // foldhash, not the default SipHash: the filter is probed for every output of every
    // block, and SipHash was a sixth of a rescan's CPU. A false positive only costs an
    // exact lookup, so a fast seeded hash is all it needs; the seed is kept with a saved
    // filter.
    bloom: AtomicBloomFilter<FixedState>,
    seed: u64,
    len: AtomicUsize,
    capacity: usize,
    /// Moves after each group of scripts added while blocks are parsed (the look-ahead):
    /// a block parsed at an older generation is checked again for the scripts added since.
    generation: AtomicU64,
}

/// What a saved filter starts with.
const SAVED_MAGIC: &[u8; 8] = b"wfilter1";

/// A value hashed when a filter is saved and again when it is loaded: a hasher that
/// changed meanwhile (another foldhash) would make the saved bits lie, so it is refused.
const HASH_CHECK: &[u8] = b"the watched set's bloom filter";

impl ScriptFilter {
    /// An empty filter sized for `capacity` scripts at false-positive rate `fp_rate`.
    pub fn new(capacity: usize, fp_rate: f64) -> Self {
        let seed: u64 = bitcoin::secp256k1::rand::random();
        ScriptFilter {
            bloom: AtomicBloomFilter::with_false_pos(fp_rate)
                .hasher(FixedState::with_seed(seed))
                .expected_items(capacity.max(1)),
            seed,
            len: AtomicUsize::new(0),
            capacity: capacity.max(1),
            generation: AtomicU64::new(0),
        }
    }

    /// The generation a parse worker reads before probing (see [`ScriptFilter::advance`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Marks the scripts inserted so far as a new generation: a block parsed at an older
    /// one may have missed them.
    pub fn advance(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The filter as bytes, with `generation` (the watched set's, see
    /// [`ScriptFilter::from_bytes`]).
    pub fn to_bytes(&self, generation: u64) -> Vec<u8> {
        let mut out = SAVED_MAGIC.to_vec();
        for v in [
            generation,
            self.seed,
            self.capacity as u64,
            self.len() as u64,
            u64::from(self.bloom.num_hashes()),
            self.bloom.source_hash(HASH_CHECK),
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for word in self.bloom.iter() {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// A filter saved by [`ScriptFilter::to_bytes`] and the generation it was saved at;
    /// `None` for anything else (damaged, truncated, or hashed differently).
    pub fn from_bytes(bytes: &[u8]) -> Option<(ScriptFilter, u64)> {
        let rest = bytes.strip_prefix(SAVED_MAGIC)?;
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                rest.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        let (generation, seed, capacity, len, hashes, check) =
            (word(0)?, word(1)?, word(2)?, word(3)?, word(4)?, word(5)?);
        let bits = rest.get(48..)?;
        if bits.is_empty() || !bits.len().is_multiple_of(8) || hashes == 0 || hashes > 64 {
            return None;
        }
        let words: Vec<u64> = bits
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let bloom = AtomicBloomFilter::from_vec(words)
            .hasher(FixedState::with_seed(seed))
            .hashes(u32::try_from(hashes).ok()?);
        if bloom.source_hash(HASH_CHECK) != check {
            return None;
        }
        let filter = ScriptFilter {
            bloom,
            seed,
            len: AtomicUsize::new(usize::try_from(len).ok()?),
            capacity: usize::try_from(capacity).ok()?.max(1),
            generation: AtomicU64::new(0),
        };
        Some((filter, generation))
    }

    /// The number of scripts it was sized for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds a script.
    pub fn insert(&self, script: &[u8]) {
        self.bloom.insert(script);
        self.len.fetch_add(1, Ordering::Relaxed);
    }

    /// `false` if `script` is certainly not watched.
    pub fn may_contain(&self, script: &[u8]) -> bool {
        self.len.load(Ordering::Relaxed) > 0 && self.bloom.contains(script)
    }

    /// Scripts inserted.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// True when nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it holds more scripts than it was sized for (its false-positive rate rises
    /// from there: time to build a bigger one).
    pub fn outgrown(&self) -> bool {
        self.len() > self.capacity
    }

    /// Bytes of the bit array.
    pub fn size_in_bytes(&self) -> usize {
        self.bloom.num_bits() / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_filter_comes_back_with_its_scripts_and_generation() {
        let f = ScriptFilter::new(100, 0.001);
        for i in 0u32..50 {
            f.insert(&i.to_be_bytes());
        }
        let bytes = f.to_bytes(7);
        let (back, generation) = ScriptFilter::from_bytes(&bytes).unwrap();
        assert_eq!((generation, back.len(), back.capacity()), (7, 50, 100));
        assert!((0u32..50).all(|i| back.may_contain(&i.to_be_bytes())));
        // Truncated or damaged: refused, never half-trusted.
        assert!(ScriptFilter::from_bytes(&bytes[..bytes.len() - 3]).is_none());
        let mut damaged = bytes.clone();
        damaged[8 + 8] ^= 1; // the seed: the check hash no longer matches
        assert!(ScriptFilter::from_bytes(&damaged).is_none());
        assert!(ScriptFilter::from_bytes(b"nonsense").is_none());
    }

    #[test]
    fn bloom_has_no_false_negatives() {
        let f = ScriptFilter::new(1000, 0.001);
        assert!(!f.may_contain(b"x"));
        for i in 0u32..1000 {
            f.insert(&i.to_be_bytes());
        }
        assert!((0u32..1000).all(|i| f.may_contain(&i.to_be_bytes())));
        let fp = (1000u32..101_000)
            .filter(|i| f.may_contain(&i.to_be_bytes()))
            .count();
        assert!(fp < 1000, "false positives {fp} of 100000");
    }
}
