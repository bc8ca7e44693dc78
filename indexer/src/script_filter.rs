//! The bloom filter over watched scripts that lets the filter stage reject almost every
//! output without a lookup. Pure: saved and loaded as bytes by the caller.
//!
//! Blocked: each script's eight bits lie in one 64-byte block, one bit in each of its
//! words, so a probe reads one cache line. At exchange sizes (20 MB for 10M scripts) the
//! filter is far bigger than the caches and a probe is a memory access; an ordinary bloom
//! filter (fastbloom) made one to ten of them per output, a ninth of a rescan's CPU
//! waiting on the first. One line can also be fetched ahead ([`ScriptFilter::prefetch`])
//! while the parser hashes the transaction.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use foldhash::fast::FixedState;

/// Bits set per script: one in each word of its block.
const WORDS: usize = 8;

/// One cache line of the filter.
#[repr(align(64))]
struct Block([AtomicU64; WORDS]);

/// A bloom filter over watched scripts: `false` means certainly not watched. Scripts are
/// added in place (the parse workers keep probing it meanwhile), so watching more never
/// rebuilds it until it outgrows the size it was made for.
pub struct ScriptFilter {
    blocks: Box<[Block]>,
    // foldhash, not the default SipHash: the filter is probed for every output of every
    // block, and SipHash was a sixth of a rescan's CPU. A false positive only costs an
    // exact lookup, so a fast seeded hash is all it needs; the seed is kept with a saved
    // filter.
    hasher: FixedState,
    seed: u64,
    len: AtomicUsize,
    capacity: usize,
    /// Moves after each group of scripts added while blocks are parsed (the look-ahead):
    /// a block parsed at an older generation is checked again for the scripts added since.
    generation: AtomicU64,
    /// Whether inserts are also kept in `journal` (a bigger copy is being built).
    journaling: AtomicBool,
    /// Scripts inserted while journaling, for the bigger copy to take over.
    journal: Mutex<Vec<Vec<u8>>>,
}

/// What a saved filter starts with.
const SAVED_MAGIC: &[u8; 8] = b"wfilter2";

/// A value hashed when a filter is saved and again when it is loaded: a hasher that
/// changed meanwhile (another foldhash) would make the saved bits lie, so it is refused.
const HASH_CHECK: &[u8] = b"the watched set's bloom filter";

/// The false-positive rate of blocks holding `per_block` scripts on average: a block's
/// load is Poisson-distributed, and a probe passes when each of its 8 bits is set.
fn false_positive_rate(per_block: f64) -> f64 {
    let mut poisson = (-per_block).exp(); // P(load = 0)
    let mut rate = 0.0;
    let most = (per_block + 12.0 * per_block.sqrt() + 20.0) as u32;
    for load in 0..=most {
        if load > 0 {
            poisson *= per_block / f64::from(load);
        }
        let word_set = 1.0 - (63.0f64 / 64.0).powi(load as i32);
        rate += poisson * word_set.powi(WORDS as i32);
    }
    rate
}

/// How many blocks hold `capacity` scripts at `fp_rate`.
fn blocks_for(capacity: usize, fp_rate: f64) -> usize {
    // The most scripts a block may hold on average: the rate rises with the load.
    let (mut low, mut high) = (0.01f64, 512.0f64);
    for _ in 0..60 {
        let mid = (low + high) / 2.0;
        if false_positive_rate(mid) <= fp_rate {
            low = mid;
        } else {
            high = mid;
        }
    }
    ((capacity as f64 / low).ceil() as usize).max(1)
}

fn new_blocks(count: usize) -> Box<[Block]> {
    (0..count)
        .map(|_| Block(std::array::from_fn(|_| AtomicU64::new(0))))
        .collect()
}

impl ScriptFilter {
    /// An empty filter sized for `capacity` scripts at false-positive rate `fp_rate`.
    pub fn new(capacity: usize, fp_rate: f64) -> Self {
        let seed: u64 = bitcoin::secp256k1::rand::random();
        ScriptFilter {
            blocks: new_blocks(blocks_for(capacity.max(1), fp_rate)),
            hasher: FixedState::with_seed(seed),
            seed,
            len: AtomicUsize::new(0),
            capacity: capacity.max(1),
            generation: AtomicU64::new(0),
            journaling: AtomicBool::new(false),
            journal: Mutex::new(Vec::new()),
        }
    }

    /// From now on, keeps every script inserted (see [`ScriptFilter::take_journal`]): a
    /// bigger filter built from the database in the background meanwhile gets them when it
    /// replaces this one, so no script added during the build is lost.
    pub fn start_journal(&self) {
        self.journaling.store(true, Ordering::SeqCst);
    }

    /// Stops keeping inserted scripts and returns those kept since
    /// [`ScriptFilter::start_journal`].
    pub fn take_journal(&self) -> Vec<Vec<u8>> {
        self.journaling.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.journal.lock().unwrap_or_else(|e| e.into_inner()))
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
            self.blocks.len() as u64,
            self.hasher.hash_one(HASH_CHECK),
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.reserve(self.blocks.len() * 64);
        for word in self.blocks.iter().flat_map(|b| &b.0) {
            out.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        out
    }

    /// A filter saved by [`ScriptFilter::to_bytes`] and the generation it was saved at;
    /// `None` for anything else (damaged, truncated, another format, or hashed
    /// differently).
    pub fn from_bytes(bytes: &[u8]) -> Option<(ScriptFilter, u64)> {
        let rest = bytes.strip_prefix(SAVED_MAGIC)?;
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                rest.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        let (generation, seed, capacity, len, blocks, check) =
            (word(0)?, word(1)?, word(2)?, word(3)?, word(4)?, word(5)?);
        let bits = rest.get(48..)?;
        let blocks = usize::try_from(blocks).ok()?;
        if blocks == 0 || bits.len() != blocks.checked_mul(64)? {
            return None;
        }
        let hasher = FixedState::with_seed(seed);
        if hasher.hash_one(HASH_CHECK) != check {
            return None;
        }
        let filled = new_blocks(blocks);
        for (word, bytes) in filled.iter().flat_map(|b| &b.0).zip(bits.chunks_exact(8)) {
            word.store(
                u64::from_le_bytes(bytes.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
        let filter = ScriptFilter {
            blocks: filled,
            hasher,
            seed,
            len: AtomicUsize::new(usize::try_from(len).ok()?),
            capacity: usize::try_from(capacity).ok()?.max(1),
            generation: AtomicU64::new(0),
            journaling: AtomicBool::new(false),
            journal: Mutex::new(Vec::new()),
        };
        Some((filter, generation))
    }

    /// The number of scripts it was sized for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The probe key of a script, for [`ScriptFilter::prefetch`] and
    /// [`ScriptFilter::contains_hash`].
    pub fn hash(&self, script: &[u8]) -> u64 {
        self.hasher.hash_one(script)
    }

    /// The block a key's bits are in: multiply-high maps the hash onto the blocks
    /// without a division.
    fn block_of(&self, hash: u64) -> &Block {
        &self.blocks[((u128::from(hash) * self.blocks.len() as u128) >> 64) as usize]
    }

    /// The block a key's bits are in, and those bits word by word.
    fn locate(&self, hash: u64) -> (&Block, [u64; WORDS]) {
        // The bit positions come from the hash remixed, not from the bits that chose
        // the block.
        let mixed = hash.rotate_left(32).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let masks = std::array::from_fn(|i| 1u64 << ((mixed >> (16 + 6 * i)) & 63));
        (self.block_of(hash), masks)
    }

    /// Asks the CPU to bring a key's block into the cache: a later probe of it does not
    /// wait for memory. Only a hint; it changes no result.
    #[allow(unsafe_code)] // the one intrinsic: std has no safe prefetch on stable
    pub fn prefetch(&self, hash: u64) {
        let block = self.block_of(hash);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let line = std::ptr::from_ref(block).cast::<i8>();
            // SAFETY: SSE is part of x86_64's baseline, and a prefetch of any address
            // (here one inside the filter) reads nothing and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = block;
    }

    /// Adds a script.
    pub fn insert(&self, script: &[u8]) {
        let (block, masks) = self.locate(self.hash(script));
        for (word, mask) in block.0.iter().zip(masks) {
            word.fetch_or(mask, Ordering::Relaxed);
        }
        self.len.fetch_add(1, Ordering::Relaxed);
        if self.journaling.load(Ordering::SeqCst) {
            self.journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(script.to_vec());
        }
    }

    /// `false` if the script of `hash` ([`ScriptFilter::hash`]) is certainly not watched.
    pub fn contains_hash(&self, hash: u64) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let (block, masks) = self.locate(hash);
        block
            .0
            .iter()
            .zip(masks)
            .all(|(word, mask)| word.load(Ordering::Relaxed) & mask != 0)
    }

    /// `false` if `script` is certainly not watched.
    pub fn may_contain(&self, script: &[u8]) -> bool {
        self.contains_hash(self.hash(script))
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
        self.blocks.len() * 64
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
        assert_eq!(bytes.len(), 8 + 48 + f.size_in_bytes());
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
    fn only_scripts_inserted_while_journaling_are_kept() {
        let f = ScriptFilter::new(100, 0.001);
        f.insert(b"before");
        f.start_journal();
        f.insert(b"during 1");
        f.insert(b"during 2");
        assert_eq!(
            f.take_journal(),
            vec![b"during 1".to_vec(), b"during 2".to_vec()]
        );
        f.insert(b"after");
        assert!(f.take_journal().is_empty());
        assert!(["before", "during 1", "after"]
            .iter()
            .all(|s| f.may_contain(s.as_bytes())));
    }

    #[test]
    fn bloom_has_no_false_negatives_and_the_rate_it_was_sized_for() {
        let f = ScriptFilter::new(100_000, 0.001);
        assert!(!f.may_contain(b"x"));
        for i in 0u32..100_000 {
            f.insert(&i.to_be_bytes());
        }
        assert!((0u32..100_000).all(|i| f.may_contain(&i.to_be_bytes())));
        // 0.1% of a million is 1,000: a broken mix of the bits would be far off.
        let fp = (100_000u32..1_100_000)
            .filter(|i| f.may_contain(&i.to_be_bytes()))
            .count();
        assert!((500..1500).contains(&fp), "false positives {fp} of 1000000");
    }

    #[test]
    fn the_size_follows_the_rate() {
        // 15.7 bits a script at 0.1%, 10.1 at 1%: eight bits in one 512-bit block.
        let bits = |fp| ScriptFilter::new(1_000_000, fp).size_in_bytes() * 8;
        assert!(
            (15_000_000..16_500_000).contains(&bits(0.001)),
            "{}",
            bits(0.001)
        );
        assert!(
            (9_500_000..10_700_000).contains(&bits(0.01)),
            "{}",
            bits(0.01)
        );
        assert!(false_positive_rate(32.5) < 0.001 && false_positive_rate(33.0) > 0.001);
        assert_eq!(ScriptFilter::new(1, 0.5).size_in_bytes(), 64);
    }

    #[test]
    fn a_prefetch_changes_no_answer() {
        let f = ScriptFilter::new(10, 0.01);
        f.insert(b"watched");
        for script in [&b"watched"[..], b"other"] {
            let h = f.hash(script);
            f.prefetch(h);
            assert_eq!(f.contains_hash(h), f.may_contain(script));
        }
        assert!(f.may_contain(b"watched"));
    }
}
