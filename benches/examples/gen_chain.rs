//! Writes a mainnet-like chain as regtest blk files (valid proof of work, 2,000-4,000
//! transactions a block, witnesses, the script mix of `benches::mix`) and the 100k watched
//! scripts as `raw()` descriptors.
//!
//! `gen_chain [--blocks N] [--out DIR]` (default 2500 blocks into fixtures/generated/chain).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use benches::mix::{script, POPULATION, WATCHED};
use bitcoin::absolute::LockTime;
use bitcoin::blockdata::constants::genesis_block;
use bitcoin::consensus::serialize;
use bitcoin::hashes::Hash;
use bitcoin::transaction::Version;
use bitcoin::{
    block, Amount, Block, CompactTarget, Network, OutPoint, ScriptBuf, Sequence, Transaction, TxIn,
    TxMerkleNode, TxOut, Txid, Witness,
};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

#[derive(Parser)]
struct Args {
    /// Blocks after genesis.
    #[arg(long, default_value_t = 2500)]
    blocks: u32,
    /// Output directory.
    #[arg(long, default_value = "fixtures/generated/chain")]
    out: PathBuf,
    /// Share of payments that go to the watched scripts (0.02: a busy exchange wallet).
    #[arg(long, default_value_t = 0.02)]
    watched_share: f64,
}

const FILE_LIMIT: usize = 128 << 20;

struct Gen {
    rng: StdRng,
    watched_share: f64,
    // Outputs waiting to be spent, oldest first.
    coins: VecDeque<OutPoint>,
}

impl Gen {
    fn payee(&mut self) -> ScriptBuf {
        if self.rng.gen_bool(self.watched_share) {
            script(self.rng.gen_range(0..WATCHED))
        } else {
            script(self.rng.gen_range(WATCHED..POPULATION))
        }
    }

    fn input(&mut self) -> TxIn {
        let previous_output = self.coins.pop_front().unwrap_or_else(|| OutPoint {
            txid: Txid::from_byte_array(self.rng.gen()),
            vout: 0,
        });
        let mut witness = Witness::new();
        let mut script_sig = ScriptBuf::new();
        match self.rng.gen_range(0..10) {
            0..=5 => {
                witness.push([0x30u8; 72]);
                witness.push([0x02u8; 33]);
            }
            6..=7 => witness.push([0x01u8; 64]),
            _ => script_sig = ScriptBuf::from_bytes(vec![0x48; 107]),
        }
        TxIn {
            previous_output,
            script_sig,
            sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
            witness,
        }
    }

    fn tx(&mut self) -> Transaction {
        let n_in = match self.rng.gen_range(0..20) {
            0..=13 => 1,
            14..=18 => 2,
            _ => 3,
        };
        let n_out = match self.rng.gen_range(0..10) {
            0 => 1,
            1..=8 => 2,
            _ => self.rng.gen_range(3..=5),
        };
        let input = (0..n_in).map(|_| self.input()).collect();
        let output = (0..n_out)
            .map(|_| TxOut {
                value: Amount::from_sat(self.rng.gen_range(546..10_000_000)),
                script_pubkey: self.payee(),
            })
            .collect();
        Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input,
            output,
        }
    }
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.watched_share),
        "--watched-share must be within 0..=1"
    );
    let mut gen = Gen {
        rng: StdRng::seed_from_u64(42),
        watched_share: args.watched_share,
        coins: VecDeque::new(),
    };
    let genesis = genesis_block(Network::Regtest);
    let mut prev = genesis.header;
    let mut writer = BlkWriter::new(args.out.clone());
    writer.write(&genesis)?;
    let magic_bits = CompactTarget::from_consensus(0x207f_ffff);
    for height in 1..=args.blocks {
        let n = gen.rng.gen_range(2000..=4000);
        let mut txdata: Vec<Transaction> = Vec::with_capacity(n + 1);
        txdata.push(coinbase(height, gen.payee()));
        for _ in 0..n {
            txdata.push(gen.tx());
        }
        let mut block = Block {
            header: prev,
            txdata,
        };
        system_tests::chaingen::commit_witnesses(&mut block);
        let txdata = block.txdata;
        let txids: Vec<Txid> = txdata.par_iter().map(|t| t.compute_txid()).collect();
        for (tx, txid) in txdata.iter().zip(&txids).skip(1) {
            for vout in 0..tx.output.len() as u32 {
                gen.coins.push_back(OutPoint { txid: *txid, vout });
            }
        }
        // Keep a backlog of about a day of outputs, spent oldest first.
        while gen.coins.len() > 2_000_000 {
            gen.coins.pop_front();
        }
        let root = bitcoin::merkle_tree::calculate_root(txids.iter().map(|t| t.to_raw_hash()))
            .expect("non-empty");
        let mut header = block::Header {
            version: block::Version::from_consensus(0x2000_0000),
            prev_blockhash: prev.block_hash(),
            merkle_root: TxMerkleNode::from_raw_hash(root),
            time: prev.time + 600,
            bits: magic_bits,
            nonce: 0,
        };
        while header.validate_pow(header.target()).is_err() {
            header.nonce += 1;
        }
        let block = Block { header, txdata };
        writer.write(&block)?;
        prev = header;
        if height % 100 == 0 {
            eprintln!("{height}/{} blocks, {} MB", args.blocks, writer.total >> 20);
        }
    }
    writer.finish()?;
    let mut watched = BufWriter::new(File::create(args.out.join("watched.txt"))?);
    for i in 0..WATCHED {
        writeln!(watched, "raw({})", script(i).to_hex_string())?;
    }
    watched.flush()?;
    eprintln!(
        "wrote {} MB of blocks to {}",
        writer.total >> 20,
        args.out.display()
    );
    Ok(())
}

/// A coinbase paying `payee` (the witness commitment is added with the block's).
fn coinbase(height: u32, payee: ScriptBuf) -> Transaction {
    let outputs = vec![TxOut {
        value: Amount::from_sat(312_500_000),
        script_pubkey: payee,
    }];
    system_tests::chaingen::coinbase_tx(height, &[], Witness::new(), outputs)
}

/// Appends blocks to blkNNNNN.dat files of at most 128 MiB, as bitcoind does.
struct BlkWriter {
    dir: PathBuf,
    file: Option<BufWriter<File>>,
    index: u32,
    in_file: usize,
    total: u64,
}

impl BlkWriter {
    fn new(dir: PathBuf) -> Self {
        BlkWriter {
            dir,
            file: None,
            index: 0,
            in_file: 0,
            total: 0,
        }
    }

    fn write(&mut self, block: &Block) -> Result<()> {
        let bytes = serialize(block);
        if self.file.is_none() || self.in_file + bytes.len() + 8 > FILE_LIMIT {
            if let Some(mut f) = self.file.take() {
                f.flush()?;
                self.index += 1;
            }
            let path = self.dir.join(format!("blk{:05}.dat", self.index));
            self.file = Some(BufWriter::new(
                File::create(&path).with_context(|| format!("creating {}", path.display()))?,
            ));
            self.in_file = 0;
        }
        let f = self.file.as_mut().expect("opened above");
        f.write_all(&Network::Regtest.magic().to_bytes())?;
        f.write_all(&(bytes.len() as u32).to_le_bytes())?;
        f.write_all(&bytes)?;
        self.in_file += bytes.len() + 8;
        self.total += bytes.len() as u64;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        Ok(())
    }
}
