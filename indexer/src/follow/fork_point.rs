//! Where the index's chain and bitcoind's part: the highest height at which both hold the
//! same block. Asked of any [`BlockSource`], so the search is tested on in-memory chains.

use bitcoin::BlockHash;
use bitcoind::{Daemon, DaemonError};

/// A chain whose active blocks can be named by height.
pub trait BlockSource {
    /// Why it could not answer.
    type Error;
    /// The hashes of its active chain at `heights` (each at most its height).
    fn block_hashes(&self, heights: &[u32]) -> Result<Vec<BlockHash>, Self::Error>;
}

impl BlockSource for Daemon {
    type Error = DaemonError;

    fn block_hashes(&self, heights: &[u32]) -> Result<Vec<BlockHash>, DaemonError> {
        Daemon::block_hashes(self, heights)
    }
}

/// Heights asked of the source in one round trip.
const WINDOW: u32 = 32;

/// The highest height at or below `ours_height` and `source_height` where `ours` (the
/// index's block hash at a height, `None` below its first block) and `source` agree;
/// `None` when they share no block. Walks down a window of hashes at a time, so a reorg of
/// a few blocks costs one round trip.
pub fn find_fork_point<S, E>(
    source: &S,
    ours: impl Fn(u32) -> Result<Option<BlockHash>, E>,
    ours_height: u32,
    source_height: u32,
) -> Result<Option<u32>, E>
where
    S: BlockSource,
    E: From<S::Error>,
{
    let mut top = ours_height.min(source_height);
    loop {
        let low = top.saturating_sub(WINDOW - 1);
        let heights: Vec<u32> = (low..=top).rev().collect();
        let hashes = source.block_hashes(&heights)?;
        for (height, hash) in heights.into_iter().zip(hashes) {
            match ours(height)? {
                Some(h) if h == hash => return Ok(Some(height)),
                Some(_) => {}
                // Below the first indexed block: no common block.
                None => return Ok(None),
            }
        }
        if low == 0 {
            return Ok(None);
        }
        top = low - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;
    use std::cell::Cell;
    use std::convert::Infallible;

    /// A chain in memory: block `h` of branch `b` is named by (b, h).
    struct Chain {
        hashes: Vec<BlockHash>,
        calls: Cell<u32>,
    }

    fn block(branch: u8, height: u32) -> BlockHash {
        let mut bytes = [0u8; 32];
        bytes[0] = branch;
        bytes[1..5].copy_from_slice(&height.to_be_bytes());
        BlockHash::from_byte_array(bytes)
    }

    impl Chain {
        /// Branch 0 up to `fork`, then `branch` up to `tip`.
        fn forked(fork: Option<u32>, branch: u8, tip: u32) -> Chain {
            let hashes = (0..=tip)
                .map(|h| match fork {
                    Some(f) if h <= f => block(0, h),
                    _ => block(branch, h),
                })
                .collect();
            Chain {
                hashes,
                calls: Cell::new(0),
            }
        }
    }

    impl BlockSource for Chain {
        type Error = Infallible;

        fn block_hashes(&self, heights: &[u32]) -> Result<Vec<BlockHash>, Infallible> {
            self.calls.set(self.calls.get() + 1);
            Ok(heights.iter().map(|&h| self.hashes[h as usize]).collect())
        }
    }

    /// The index holds branch 0 from `first` to `tip`.
    fn index(first: u32, tip: u32) -> impl Fn(u32) -> Result<Option<BlockHash>, Infallible> {
        move |h| Ok((first..=tip).contains(&h).then(|| block(0, h)))
    }

    #[test]
    fn the_fork_point_is_found_at_every_depth_and_length() {
        for ours_tip in [0, 1, 31, 32, 33, 100] {
            for fork in 0..=ours_tip {
                for source_tip in [fork, fork + 1, ours_tip, ours_tip + 40] {
                    let source = Chain::forked(Some(fork), 1, source_tip);
                    let found = find_fork_point(&source, index(0, ours_tip), ours_tip, source_tip);
                    assert_eq!(
                        found,
                        Ok(Some(fork)),
                        "index tip {ours_tip}, fork {fork}, bitcoind tip {source_tip}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_short_reorg_costs_one_round_trip() {
        let source = Chain::forked(Some(995), 1, 1001);
        let found = find_fork_point(&source, index(0, 1000), 1000, 1001);
        assert_eq!(found, Ok(Some(995)));
        assert_eq!(source.calls.get(), 1);
    }

    #[test]
    fn chains_without_a_common_block_have_no_fork_point() {
        // Different from genesis on.
        let source = Chain::forked(None, 1, 80);
        assert_eq!(find_fork_point(&source, index(0, 70), 70, 80), Ok(None));
        // The index starts above the fork (a pruned start): nothing to compare below.
        let source = Chain::forked(Some(10), 1, 80);
        assert_eq!(find_fork_point(&source, index(20, 70), 70, 80), Ok(None));
    }

    #[test]
    fn the_same_chain_forks_at_the_lower_tip() {
        let source = Chain::forked(Some(500), 1, 500);
        assert_eq!(
            find_fork_point(&source, index(0, 450), 450, 500),
            Ok(Some(450))
        );
        assert_eq!(
            find_fork_point(&source, index(0, 500), 500, 300),
            Ok(Some(300))
        );
    }
}
