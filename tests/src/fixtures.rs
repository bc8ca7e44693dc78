//! Reading the shared real-chain fixtures and writing block files like bitcoind does.

use std::path::{Path, PathBuf};

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Block, Network};

/// `../shared/fixtures` beside the checkout; panics with a clear message when absent.
pub fn shared_fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    assert!(
        dir.is_dir(),
        "the shared block fixtures are missing: expected them at {} (a checkout of the project with `shared/` beside it)",
        dir.display()
    );
    dir.canonicalize().expect("fixtures dir resolves")
}

/// A fixture file by its path under `shared/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    let path = shared_fixtures().join(rel);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

/// The blocks of one blk-format file, in file order; stops at zero padding or a partial
/// record. An independent, minimal reader for the tests.
pub fn read_blk_blocks(path: &Path) -> Vec<Block> {
    let data = std::fs::read(path).expect("read blk file");
    let mut out = Vec::new();
    let mut p = 0;
    while p + 8 <= data.len() && data[p..p + 4] != [0; 4] {
        let len = u32::from_le_bytes(data[p + 4..p + 8].try_into().expect("4 bytes")) as usize;
        if p + 8 + len > data.len() {
            break;
        }
        out.push(deserialize(&data[p + 8..p + 8 + len]).expect("fixture block decodes"));
        p += 8 + len;
    }
    out
}

/// Writes `blocks` as one bitcoind blk file, XOR-obfuscated at file offsets with `xor_key`
/// when it is not all zero (the key itself goes to `xor.dat` beside it).
pub fn write_blk_file(path: &Path, network: Network, blocks: &[Block], xor_key: [u8; 8]) {
    let mut data = Vec::new();
    for b in blocks {
        let bytes = serialize(b);
        data.extend_from_slice(&network.magic().to_bytes());
        data.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        data.extend_from_slice(&bytes);
    }
    obfuscate(&mut data, xor_key);
    std::fs::write(path, data).expect("write blk file");
    if xor_key != [0; 8] {
        let dir = path.parent().expect("blk file has a directory");
        std::fs::write(dir.join("xor.dat"), xor_key).expect("write xor.dat");
    }
}

/// XORs a whole file's bytes with the key, as Core 28+ stores block files.
pub fn obfuscate(data: &mut [u8], key: [u8; 8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i % 8];
    }
}
