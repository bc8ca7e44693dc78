//! Mining with fillers, reading blocks back by RPC, REST and from the blk files.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

mod common;

use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Block, BlockHash, Network};
use devnet::client::RpcClient;
use serde_json::json;

/// Parses blk files by hand (not through the crate) to check the on-disk format.
fn parse_blk_files(blocks_dir: &std::path::Path) -> Vec<Block> {
    let key: [u8; 8] = std::fs::read(blocks_dir.join("xor.dat"))
        .unwrap()
        .try_into()
        .unwrap();
    assert_ne!(key, [0; 8], "--xor picks a random key");
    let mut names: Vec<_> = std::fs::read_dir(blocks_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("blk"))
        .collect();
    names.sort();
    let mut blocks = Vec::new();
    for name in names {
        let mut data = std::fs::read(blocks_dir.join(&name)).unwrap();
        for (p, b) in data.iter_mut().enumerate() {
            *b ^= key[p % 8];
        }
        let mut pos = 0;
        while pos + 8 <= data.len() {
            assert_eq!(data[pos..pos + 4], [0xfa, 0xbf, 0xb5, 0xda]);
            let len = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap()) as usize;
            blocks.push(deserialize(&data[pos + 8..pos + 8 + len]).unwrap());
            pos += 8 + len;
        }
        assert_eq!(pos, data.len());
    }
    blocks
}

#[test]
fn mines_150_blocks_with_fillers_and_serves_them_by_rpc_rest_and_files() {
    let t = common::start_with(|c| {
        c.filler_txs = 20;
        c.xor_blocks = true;
        c.max_blockfile_size = 256 * 1024; // several files
    });
    let hashes = t.mine(150);
    assert_eq!(hashes.len(), 150);
    let info = t.call("getblockchaininfo", json!([]));
    assert_eq!(info["blocks"], json!(150));
    assert_eq!(info["bestblockhash"], json!(hashes[149]));

    let rest = RpcClient::new(&t.node.rest_url(), None);
    let mut chain: Vec<Block> = vec![bitcoin::blockdata::constants::genesis_block(
        Network::Regtest,
    )];
    let mut filler_count = 0;
    let mut kinds = std::collections::HashSet::new();
    for (i, hash) in hashes.iter().enumerate() {
        let height = i as u64 + 1;
        let hex = t.call("getblock", json!([hash, 0]));
        let block: Block = deserialize_hex(hex.as_str().unwrap()).unwrap();
        assert_eq!(block.block_hash().to_string(), *hash);
        if height > 16 {
            assert_eq!(block.bip34_block_height().unwrap(), height);
        } else {
            // Core pushes small heights as OP_1..OP_16, which rust-bitcoin's parser skips.
            assert_eq!(
                block.txdata[0].input[0].script_sig.as_bytes()[0],
                0x50 + height as u8
            );
        }
        assert!(block.check_merkle_root());
        assert!(block.check_witness_commitment());
        assert_eq!(
            block.header.prev_blockhash,
            chain.last().unwrap().block_hash()
        );
        let bin = rest.get(&format!("/rest/block/{hash}.bin")).unwrap();
        assert_eq!(bin.status, 200);
        assert_eq!(bin.body, serialize(&block));
        filler_count += block.txdata.len() - 1;
        for tx in &block.txdata[1..] {
            for o in &tx.output {
                let s = &o.script_pubkey;
                kinds.insert(if s.is_p2wpkh() {
                    "wpkh"
                } else if s.is_p2tr() {
                    "tr"
                } else if s.is_p2pkh() {
                    "pkh"
                } else if s.is_p2sh() {
                    "sh"
                } else if s.is_op_return() {
                    "op_return"
                } else {
                    "other"
                });
            }
        }
        let coinbase_value: u64 = block.txdata[0]
            .output
            .iter()
            .map(|o| o.value.to_sat())
            .sum();
        let subsidy = if height < 150 {
            5_000_000_000
        } else {
            2_500_000_000
        };
        assert!(coinbase_value >= subsidy);
        chain.push(block);
    }
    // Fillers start once the wallet's first coinbase matures (block 101).
    assert!(filler_count >= 40 * 20, "{filler_count} fillers");
    for k in ["wpkh", "tr", "pkh", "sh", "op_return"] {
        assert!(kinds.contains(k), "no {k} output among fillers: {kinds:?}");
    }
    let header = t.call("getblockheader", json!([hashes[9]]));
    assert_eq!(header["height"], json!(10));
    assert_eq!(header["confirmations"], json!(141));
    assert_eq!(
        header["previousblockhash"],
        json!(chain[9].block_hash().to_string())
    );
    assert_eq!(header["nextblockhash"], json!(hashes[10]));
    assert_eq!(header["bits"], json!("207fffff"));

    let by_height = rest.get("/rest/blockhashbyheight/42.bin").unwrap();
    assert_eq!(by_height.body, chain[42].block_hash()[..].to_vec());
    let missing = rest.get("/rest/blockhashbyheight/151.bin").unwrap();
    assert_eq!(missing.status, 404);
    let headers = rest
        .get(&format!("/rest/headers/20/{}.bin", hashes[139]))
        .unwrap();
    assert_eq!(headers.body.len(), 11 * 80, "headers stop at the tip");
    for (k, raw) in headers.body.chunks(80).enumerate() {
        let h: bitcoin::block::Header = deserialize(raw).unwrap();
        assert_eq!(h, chain[140 + k].header);
    }
    let info = rest.get("/rest/chaininfo.json").unwrap().json().unwrap();
    assert_eq!(info["blocks"], json!(150));
    assert_eq!(info["chain"], json!("regtest"));

    // The blk files hold exactly the chain (genesis first), obfuscated with xor.dat.
    let on_disk = parse_blk_files(&t.node.blocks_dir());
    assert_eq!(on_disk.len(), 151);
    assert_eq!(on_disk, chain);
    assert!(t.node.blocks_dir().join("blk00001.dat").exists());
    assert_eq!(
        devnet::read_blocks_dir(&t.node.blocks_dir()).unwrap(),
        chain
    );

    // Every filler is spendable-valid: re-verify scripts against the chain's outputs.
    let mut outputs = std::collections::HashMap::new();
    for block in &chain {
        for tx in &block.txdata {
            let txid = tx.compute_txid();
            for (v, o) in tx.output.iter().enumerate() {
                outputs.insert(
                    bitcoin::OutPoint {
                        txid,
                        vout: v as u32,
                    },
                    o.clone(),
                );
            }
            if tx.is_coinbase() {
                continue;
            }
            let spent: Vec<_> = tx
                .input
                .iter()
                .map(|i| outputs[&i.previous_output].clone())
                .collect();
            let raw = serialize(tx);
            let utxos: Vec<bitcoinconsensus::Utxo> = spent
                .iter()
                .map(|o| bitcoinconsensus::Utxo {
                    script_pubkey: o.script_pubkey.as_bytes().as_ptr(),
                    script_pubkey_len: o.script_pubkey.len() as u32,
                    value: o.value.to_sat() as i64,
                })
                .collect();
            for (i, o) in spent.iter().enumerate() {
                bitcoinconsensus::verify(
                    o.script_pubkey.as_bytes(),
                    o.value.to_sat(),
                    &raw,
                    Some(&utxos),
                    i,
                )
                .unwrap();
            }
        }
    }
    let _: BlockHash = chain[150].block_hash();
}

#[test]
fn invalidate_and_reconsider_move_the_tip() {
    let t = common::start();
    let a = t.mine(3);
    t.call("invalidateblock", json!([a[1]]));
    assert_eq!(t.call("getblockcount", json!([])), json!(1));
    assert_eq!(
        t.call("getblockheader", json!([a[2]]))["confirmations"],
        json!(-1)
    );
    let b = t.mine(3);
    assert_eq!(t.call("getbestblockhash", json!([])), json!(b[2]));
    t.call("reconsiderblock", json!([a[1]]));
    // Branch a (height 3) has less work than b (height 4).
    assert_eq!(t.call("getbestblockhash", json!([])), json!(b[2]));
    t.call("invalidateblock", json!([b[0]]));
    assert_eq!(t.call("getbestblockhash", json!([])), json!(a[2]));
    assert_eq!(t.call("getblockcount", json!([])), json!(3));
}
