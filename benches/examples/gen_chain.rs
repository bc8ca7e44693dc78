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
    /// Mainnet-shaped instead: about this many GB whose blocks follow mainnet's history by
    /// era (sizes, transaction counts, inputs and outputs, script types, segwit, taproot,
    /// inscriptions' large witnesses), each era's share of the bytes as on mainnet.
    #[arg(long)]
    mainnet_gb: Option<f64>,
}

/// One era of mainnet's history, as the generator reproduces it.
struct Era {
    name: &'static str,
    /// The era's share of mainnet's block bytes (they sum to 1).
    share: f64,
    /// Transactions a block, from..to.
    txs: (usize, usize),
    /// Script types paid, in percent: P2PK, P2PKH, P2SH, P2WPKH, P2WSH, P2TR.
    types: [u32; 6],
    /// Percent of inputs with witnesses (segwit, taproot).
    witness_inputs: u32,
    /// Permille of transactions with a large witness (an inscription), 4..60 KB.
    inscriptions: u32,
}

/// Mainnet by era (heights, approximate averages): 0-150k tiny blocks of coinbases and
/// P2PK; to 300k P2PKH; to 390k fuller blocks with P2SH; to 480k full 1 MB blocks; to
/// 630k segwit's adoption; to 780k segwit-majority blocks and taproot; then inscriptions.
const ERAS: [Era; 7] = [
    Era {
        name: "2009-11",
        share: 0.003,
        txs: (1, 40),
        types: [40, 60, 0, 0, 0, 0],
        witness_inputs: 0,
        inscriptions: 0,
    },
    Era {
        name: "2011-14",
        share: 0.034,
        txs: (100, 600),
        types: [2, 88, 10, 0, 0, 0],
        witness_inputs: 0,
        inscriptions: 0,
    },
    Era {
        name: "2014-16",
        share: 0.07,
        txs: (500, 1600),
        types: [0, 80, 20, 0, 0, 0],
        witness_inputs: 0,
        inscriptions: 0,
    },
    Era {
        name: "2016-17",
        share: 0.13,
        txs: (1500, 2600),
        types: [0, 70, 30, 0, 0, 0],
        witness_inputs: 0,
        inscriptions: 0,
    },
    Era {
        name: "2017-20",
        share: 0.25,
        txs: (1800, 2800),
        types: [0, 45, 30, 20, 5, 0],
        witness_inputs: 40,
        inscriptions: 0,
    },
    Era {
        name: "2020-23",
        share: 0.30,
        txs: (2000, 3200),
        types: [0, 20, 20, 45, 5, 10],
        witness_inputs: 85,
        inscriptions: 0,
    },
    Era {
        name: "2023-24",
        share: 0.213,
        txs: (3000, 5500),
        types: [0, 10, 10, 40, 5, 35],
        witness_inputs: 90,
        inscriptions: 15,
    },
];

const FILE_LIMIT: usize = 128 << 20;

struct Gen {
    rng: StdRng,
    watched_share: f64,
    /// The era the next transactions follow (`None`: the default mix).
    era: Option<&'static Era>,
    // Outputs waiting to be spent, oldest first.
    coins: VecDeque<OutPoint>,
}

impl Gen {
    fn payee(&mut self) -> ScriptBuf {
        if self.rng.gen_bool(self.watched_share) {
            return script(self.rng.gen_range(0..WATCHED));
        }
        let i = self.rng.gen_range(WATCHED..POPULATION);
        let Some(era) = self.era else {
            return script(i);
        };
        // The population's script of the era's type: `script` types by index mod 100.
        let pick = self.rng.gen_range(0..100);
        let mut acc = 0;
        let kind = era
            .types
            .iter()
            .position(|p| {
                acc += p;
                pick < acc
            })
            .unwrap_or(1);
        let base = [99, 70, 85, 0, 95, 50][kind];
        script(i - i % 100 + base)
    }

    fn input(&mut self) -> TxIn {
        let previous_output = self.coins.pop_front().unwrap_or_else(|| OutPoint {
            txid: Txid::from_byte_array(self.rng.gen()),
            vout: 0,
        });
        let mut witness = Witness::new();
        let mut script_sig = ScriptBuf::new();
        let style = match self.era {
            None => self.rng.gen_range(0..10),
            Some(era) if self.rng.gen_range(0..100) < era.witness_inputs => {
                if era.types[5] > 0 && self.rng.gen_range(0..100) < era.types[5] * 2 {
                    6
                } else {
                    0
                }
            }
            Some(_) => 9,
        };
        match style {
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
        let mut input: Vec<TxIn> = (0..n_in).map(|_| self.input()).collect();
        if let Some(era) = self.era {
            if self.rng.gen_range(0..1000) < era.inscriptions {
                // An inscription: data pushed in a taproot witness.
                let len = self.rng.gen_range(4_000..60_000);
                input[0].witness =
                    Witness::from_slice(&[vec![0x01u8; 64], vec![0x63; len], vec![0xc0; 33]]);
                input[0].script_sig = ScriptBuf::new();
            }
        }
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
        era: None,
        coins: VecDeque::new(),
    };
    // Blocks of each era: its share of the bytes over its mean block size (measured on a
    // sample of its blocks, so the whole lands near the size asked for).
    let plan: Vec<(Option<&'static Era>, u32)> = match args.mainnet_gb {
        None => vec![(None, args.blocks)],
        Some(gb) => ERAS
            .iter()
            .map(|era| {
                gen.era = Some(era);
                let sample: usize = (0..3)
                    .map(|_| {
                        let n = gen.rng.gen_range(era.txs.0..=era.txs.1);
                        (0..n).map(|_| serialize(&gen.tx()).len()).sum::<usize>()
                    })
                    .sum::<usize>()
                    / 3;
                let blocks = (gb * 1e9 * era.share / sample.max(1) as f64).ceil() as u32;
                eprintln!("era {}: {blocks} blocks of ~{} KB", era.name, sample / 1000);
                (Some(era), blocks.max(1))
            })
            .collect(),
    };
    let total_blocks: u32 = plan.iter().map(|(_, n)| n).sum();
    let mut era_of = plan
        .iter()
        .flat_map(|(era, n)| std::iter::repeat_n(*era, *n as usize));
    let genesis = genesis_block(Network::Regtest);
    let mut prev = genesis.header;
    let mut writer = BlkWriter::new(args.out.clone());
    writer.write(&genesis)?;
    let magic_bits = CompactTarget::from_consensus(0x207f_ffff);
    for height in 1..=total_blocks {
        gen.era = era_of.next().flatten();
        let n = match gen.era {
            Some(era) => gen.rng.gen_range(era.txs.0..=era.txs.1),
            None => gen.rng.gen_range(2000..=4000),
        };
        let mut txdata: Vec<Transaction> = Vec::with_capacity(n + 1);
        txdata.push(coinbase(height, gen.payee()));
        // Within the consensus weight limit, with room for the coinbase.
        let mut weight = 4_000u64;
        for _ in 0..n {
            let tx = gen.tx();
            weight += tx.weight().to_wu();
            if weight > 3_990_000 {
                break;
            }
            txdata.push(tx);
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
            eprintln!("{height}/{total_blocks} blocks, {} MB", writer.total >> 20);
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
