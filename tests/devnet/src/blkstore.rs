//! `blocks/blkNNNNN.dat` files in Core's format, optionally XOR-obfuscated by `xor.dat`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::Block;
use rand::RngCore;

use crate::error::{io_err, Error, Result};

/// The regtest network magic that starts every record.
pub const REGTEST_MAGIC: [u8; 4] = [0xfa, 0xbf, 0xb5, 0xda];

/// Appends blocks to Core-style block files.
pub(crate) struct BlockStore {
    dir: PathBuf,
    key: [u8; 8],
    file_num: u32,
    offset: u64,
    max_file_size: u64,
}

fn blk_path(dir: &Path, num: u32) -> PathBuf {
    dir.join(format!("blk{num:05}.dat"))
}

/// The obfuscation key of a blocks directory: all zero when there is no `xor.dat`.
pub fn read_xor_key(blocks_dir: &Path) -> Result<[u8; 8]> {
    let path = blocks_dir.join("xor.dat");
    match fs::read(&path) {
        Ok(bytes) => bytes
            .as_slice()
            .try_into()
            .map_err(|_| Error::CorruptBlockFile {
                path,
                reason: format!("xor.dat holds {} bytes, not 8", bytes.len()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok([0; 8]),
        Err(e) => Err(Error::Io { path, source: e }),
    }
}

fn apply_xor(key: &[u8; 8], file_offset: u64, data: &mut [u8]) {
    if key == &[0; 8] {
        return;
    }
    for (i, byte) in data.iter_mut().enumerate() {
        *byte ^= key[((file_offset + i as u64) % 8) as usize];
    }
}

/// Every complete record of one (de-obfuscated) file, and where the last one ends.
fn parse_records(path: &Path, data: &[u8]) -> Result<(Vec<Block>, usize)> {
    let mut blocks = Vec::new();
    let mut pos = 0;
    while pos + 8 <= data.len() {
        if data[pos..pos + 4] == [0, 0, 0, 0] {
            break; // preallocated zeros end the file
        }
        if data[pos..pos + 4] != REGTEST_MAGIC {
            return Err(Error::CorruptBlockFile {
                path: path.into(),
                reason: format!("no network magic at offset {pos}"),
            });
        }
        let len = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]])
            as usize;
        let end = pos + 8 + len;
        if end > data.len() {
            break; // a record cut short by a crash mid-write
        }
        let block: Block =
            deserialize(&data[pos + 8..end]).map_err(|e| Error::CorruptBlockFile {
                path: path.into(),
                reason: format!("block at offset {pos}: {e}"),
            })?;
        blocks.push(block);
        pos = end;
    }
    Ok((blocks, pos))
}

fn blk_files(blocks_dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut files = Vec::new();
    let entries = match fs::read_dir(blocks_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(io_err(blocks_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(blocks_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(num) = name
            .strip_prefix("blk")
            .and_then(|n| n.strip_suffix(".dat"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            files.push((num, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Every block stored in a blocks directory, in file order (de-obfuscated with `xor.dat`).
pub fn read_blocks_dir(blocks_dir: &Path) -> Result<Vec<Block>> {
    let key = read_xor_key(blocks_dir)?;
    let mut blocks = Vec::new();
    for (_, path) in blk_files(blocks_dir)? {
        let mut data = fs::read(&path).map_err(io_err(&path))?;
        apply_xor(&key, 0, &mut data);
        blocks.extend(parse_records(&path, &data)?.0);
    }
    Ok(blocks)
}

impl BlockStore {
    /// Opens (or creates) a blocks directory and returns the blocks already in it.
    pub(crate) fn open(dir: &Path, xor: bool, max_file_size: u64) -> Result<(Self, Vec<Block>)> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let xor_path = dir.join("xor.dat");
        let files = blk_files(dir)?;
        // Like Core, a key is only chosen for a fresh directory: existing files keep theirs.
        if !xor_path.exists() && files.is_empty() && xor {
            let mut key = [0u8; 8];
            rand::thread_rng().fill_bytes(&mut key);
            fs::write(&xor_path, key).map_err(io_err(&xor_path))?;
        }
        let key = read_xor_key(dir)?;
        let mut blocks = Vec::new();
        let mut file_num = 0;
        let mut offset = 0;
        for (num, path) in &files {
            let mut data = fs::read(path).map_err(io_err(path))?;
            apply_xor(&key, 0, &mut data);
            let (found, end) = parse_records(path, &data)?;
            blocks.extend(found);
            file_num = *num;
            offset = end as u64;
        }
        if let Some((_, last)) = files.last() {
            // Drop a partial record left by a kill mid-write, so appends stay parseable.
            let file = OpenOptions::new()
                .write(true)
                .open(last)
                .map_err(io_err(last))?;
            file.set_len(offset).map_err(io_err(last))?;
        }
        let store = BlockStore {
            dir: dir.into(),
            key,
            file_num,
            offset,
            max_file_size,
        };
        Ok((store, blocks))
    }

    /// Appends one block record, starting a new file when the current one is full.
    pub(crate) fn append(&mut self, block: &Block) -> Result<()> {
        let raw = serialize(block);
        if self.offset > 0 && self.offset + raw.len() as u64 + 8 > self.max_file_size {
            self.file_num += 1;
            self.offset = 0;
        }
        let mut record = Vec::with_capacity(raw.len() + 8);
        record.extend_from_slice(&REGTEST_MAGIC);
        record.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        record.extend_from_slice(&raw);
        apply_xor(&self.key, self.offset, &mut record);
        let path = blk_path(&self.dir, self.file_num);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(&record).map_err(io_err(&path))?;
        self.offset += record.len() as u64;
        Ok(())
    }

    /// Total bytes of block files, for `size_on_disk`.
    pub(crate) fn size_on_disk(&self) -> u64 {
        blk_files(&self.dir)
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, p)| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}
