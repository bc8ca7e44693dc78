//! Reading bitcoind's `blocks/blk*.dat` directly: record framing, network magic, the
//! `xor.dat` obfuscation key, preallocated zero tails and a record still being written.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bitcoin::consensus::deserialize;
use bitcoin::{block, Network};
use rayon::prelude::*;

/// Largest serialized block consensus allows; a longer record length is corruption.
const MAX_BLOCK_SIZE: u32 = 4_000_000;
const HEADER_SIZE: usize = 80;

/// What can be wrong with a blocks directory.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// A file could not be read.
    #[error("reading {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The directory holds no blk*.dat file.
    #[error("no blk*.dat files in {0}")]
    NoFiles(PathBuf),
    /// xor.dat is not 8 bytes.
    #[error("{path}: the obfuscation key must be 8 bytes, found {len}")]
    BadXorKey {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A record does not start with the network magic.
    #[error("{path} offset {offset}: expected network magic {expected}, found {found}")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// The network's magic, hex.
        expected: String,
        /// What was there, hex.
        found: String,
    },
    /// A record's length is impossible.
    #[error("{path} offset {offset}: record length {len} is outside 80..={MAX_BLOCK_SIZE}")]
    BadLength {
        /// The file.
        path: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// The length field.
        len: u32,
    },
    /// A record runs past the end of a file that is not the newest.
    #[error("{path} offset {offset}: record of {len} bytes runs past the end of the file")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// The length field.
        len: u32,
    },
    /// A header does not decode.
    #[error("{path} offset {offset}: bad block header: {detail}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// The decode error.
        detail: String,
    },
}

/// Where a block's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLocation {
    /// Index into [`BlocksDir::files`].
    pub file: usize,
    /// Offset of the block data (after magic and length).
    pub offset: u64,
    /// Length of the block data.
    pub len: u32,
}

/// A record cut off at the end of the newest file, as while bitcoind is writing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialTail {
    /// The file.
    pub path: PathBuf,
    /// Offset of the partial record.
    pub offset: u64,
}

/// Something in the files that may cut the chain short: skipped, and said at warn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanNote {
    /// The file.
    pub path: PathBuf,
    /// Where in it.
    pub offset: u64,
    /// What was there.
    pub what: String,
}

impl std::fmt::Display for ScanNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} offset {}: {}",
            self.path.display(),
            self.offset,
            self.what
        )
    }
}

/// Every block header found in a directory, with where each block is.
pub struct HeaderScan {
    /// Headers in file order.
    pub headers: Vec<(block::Header, BlockLocation)>,
    /// A partial record at the end of the newest file, skipped.
    pub partial_tail: Option<PartialTail>,
    /// Total bytes of block data found.
    pub block_bytes: u64,
    /// What was skipped that may cut the chain (files of unreadable names, data after a
    /// run of zeros, a partial tail).
    pub notes: Vec<ScanNote>,
}

/// A bitcoind blocks directory opened for reading.
pub struct BlocksDir {
    files: Vec<PathBuf>,
    xor_key: [u8; 8],
    magic: [u8; 4],
    /// `blk*.dat` files whose number does not parse, skipped.
    skipped: Vec<PathBuf>,
}

impl BlocksDir {
    /// Lists `dir`'s blk*.dat files in number order and reads the obfuscation key, if any.
    pub fn open(dir: &Path, network: Network) -> Result<BlocksDir, BlkError> {
        let io = |source| BlkError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut files: Vec<(u64, PathBuf)> = Vec::new();
        let mut skipped = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(number) = name
                .strip_prefix("blk")
                .and_then(|n| n.strip_suffix(".dat"))
            else {
                continue;
            };
            match number.parse::<u64>() {
                Ok(num) if number.bytes().all(|b| b.is_ascii_digit()) => files.push((num, path)),
                _ => skipped.push(path),
            }
        }
        if files.is_empty() {
            return Err(BlkError::NoFiles(dir.to_owned()));
        }
        files.sort();
        let xor_path = dir.join("xor.dat");
        let xor_key = match std::fs::read(&xor_path) {
            Ok(key) => key.as_slice().try_into().map_err(|_| BlkError::BadXorKey {
                len: key.len(),
                path: xor_path.clone(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => [0; 8],
            Err(source) => {
                return Err(BlkError::Io {
                    path: xor_path,
                    source,
                })
            }
        };
        Ok(BlocksDir {
            files: files.into_iter().map(|(_, p)| p).collect(),
            xor_key,
            magic: network.magic().to_bytes(),
            skipped,
        })
    }

    /// The blk files, in number order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Reads every record's header, files in parallel.
    pub fn scan_headers(&self) -> Result<HeaderScan, BlkError> {
        let last = self.files.len() - 1;
        let per_file: Vec<_> = (0..self.files.len())
            .into_par_iter()
            .map(|i| self.scan_file(i, i == last))
            .collect::<Result<_, _>>()?;
        let mut scan = HeaderScan {
            headers: Vec::new(),
            partial_tail: None,
            block_bytes: 0,
            notes: self
                .skipped
                .iter()
                .map(|path| ScanNote {
                    path: path.clone(),
                    offset: 0,
                    what: "not a blkNNNNN.dat name: the file is skipped".into(),
                })
                .collect(),
        };
        for (headers, tail, note) in per_file {
            scan.block_bytes += headers.iter().map(|(_, l)| u64::from(l.len)).sum::<u64>();
            scan.headers.extend(headers);
            if let Some(t) = &tail {
                scan.notes.push(ScanNote {
                    path: t.path.clone(),
                    offset: t.offset,
                    what: "a record runs past the end of the newest file (still being written?): skipped".into(),
                });
            }
            scan.partial_tail = scan.partial_tail.or(tail);
            scan.notes.extend(note);
        }
        Ok(scan)
    }

    /// Reads the headers of one file; a partial last record is tolerated only in the newest.
    /// Zeros where a record should start end the file (bitcoind preallocates); when data
    /// follows them, that is noted.
    #[allow(clippy::type_complexity)]
    fn scan_file(
        &self,
        index: usize,
        newest: bool,
    ) -> Result<
        (
            Vec<(block::Header, BlockLocation)>,
            Option<PartialTail>,
            Option<ScanNote>,
        ),
        BlkError,
    > {
        let path = &self.files[index];
        let io = |source| BlkError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut out = Vec::new();
        let mut offset = 0u64;
        let mut frame = [0u8; 8];
        let mut header = [0u8; HEADER_SIZE];
        while offset + 8 <= size {
            // Preallocated space is zeros on disk, before any de-obfuscation.
            read_raw_at(&file, path, offset, &mut frame)?;
            if frame[..4] == [0; 4] {
                // Preallocated, never written; unless something follows the zeros.
                let note = self.data_after(&file, path, offset, size)?.map(|at| ScanNote {
                    path: path.clone(),
                    offset,
                    what: format!(
                        "zeros where a record should start, but data follows at offset {at}: the rest of the file is skipped"
                    ),
                });
                return Ok((out, None, note));
            }
            self.deobfuscate(offset, &mut frame);
            if frame[..4] != self.magic {
                return Err(BlkError::BadMagic {
                    path: path.clone(),
                    offset,
                    expected: hex(&self.magic),
                    found: hex(&frame[..4]),
                });
            }
            let len = u32::from_le_bytes(frame[4..].try_into().expect("4 bytes"));
            if !(HEADER_SIZE as u32..=MAX_BLOCK_SIZE).contains(&len) {
                return Err(BlkError::BadLength {
                    path: path.clone(),
                    offset,
                    len,
                });
            }
            if offset + 8 + u64::from(len) > size {
                if newest {
                    let tail = PartialTail {
                        path: path.clone(),
                        offset,
                    };
                    return Ok((out, Some(tail), None));
                }
                return Err(BlkError::Truncated {
                    path: path.clone(),
                    offset,
                    len,
                });
            }
            self.read_at(&file, path, offset + 8, &mut header)?;
            let decoded: block::Header = deserialize(&header).map_err(|e| BlkError::BadHeader {
                path: path.clone(),
                offset,
                detail: e.to_string(),
            })?;
            out.push((
                decoded,
                BlockLocation {
                    file: index,
                    offset: offset + 8,
                    len,
                },
            ));
            offset += 8 + u64::from(len);
        }
        Ok((out, None, None))
    }

    /// The offset of the first non-zero byte of `file` from `from` on, if any.
    fn data_after(
        &self,
        file: &File,
        path: &Path,
        from: u64,
        size: u64,
    ) -> Result<Option<u64>, BlkError> {
        let mut buf = vec![0u8; 1 << 20];
        let mut at = from;
        while at < size {
            let n = (size - at).min(buf.len() as u64) as usize;
            read_raw_at(file, path, at, &mut buf[..n])?;
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Ok(Some(at + i as u64));
            }
            at += n as u64;
        }
        Ok(None)
    }

    /// Reads one block's bytes, de-obfuscated.
    pub fn read_block(&self, loc: BlockLocation) -> Result<Vec<u8>, BlkError> {
        let path = &self.files[loc.file];
        let file = File::open(path).map_err(|source| BlkError::Io {
            path: path.clone(),
            source,
        })?;
        // Read into uninitialised capacity: zeroing a block's buffer first cost a tenth of
        // the read thread's time.
        let io = |source| BlkError::Io {
            path: path.clone(),
            source,
        };
        let mut buf = crate::buffers::take(loc.len as usize);
        let mut reader = &file;
        reader
            .seek(std::io::SeekFrom::Start(loc.offset))
            .map_err(io)?;
        reader
            .take(u64::from(loc.len))
            .read_to_end(&mut buf)
            .map_err(io)?;
        if buf.len() != loc.len as usize {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        self.deobfuscate(loc.offset, &mut buf);
        Ok(buf)
    }

    /// Human-readable place of a block, for error messages.
    pub fn describe(&self, loc: BlockLocation) -> String {
        format!(
            "{} offset {}",
            self.files[loc.file].display(),
            loc.offset - 8
        )
    }

    fn read_at(
        &self,
        file: &File,
        path: &Path,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BlkError> {
        read_raw_at(file, path, offset, buf)?;
        self.deobfuscate(offset, buf);
        Ok(())
    }

    /// Undoes `xor.dat`'s obfuscation of `buf`, read at file offset `offset`.
    fn deobfuscate(&self, offset: u64, buf: &mut [u8]) {
        if self.xor_key != [0; 8] {
            // Rotate the key to this offset once, then XOR whole words: the compiler
            // vectorizes this, which a per-byte modulo would prevent.
            let rot = (offset % 8) as usize;
            let key: [u8; 8] = std::array::from_fn(|i| self.xor_key[(rot + i) % 8]);
            for chunk in buf.chunks_mut(8) {
                for (b, k) in chunk.iter_mut().zip(key) {
                    *b ^= k;
                }
            }
        }
    }
}

/// Reads `buf.len()` bytes of `file` at `offset`, as stored.
fn read_raw_at(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<(), BlkError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| BlkError::Io {
            path: path.to_owned(),
            source,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
