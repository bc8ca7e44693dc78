//! Seeds made from the shared real-chain fixtures, so fuzzing starts from the inputs that
//! matter.

use crate::targets::zmq_message;

/// Every target's name, as `fuzz_targets/` and the corpus directories call it.
pub const TARGETS: [&str; 7] = [
    "blk_records",
    "block_parse",
    "zmq_frames",
    "rpc_answers",
    "descriptors",
    "page_tokens",
    "config_toml",
];

/// Seeds for `target` made from the shared real-chain fixtures in `fixtures` (a checkout's
/// `../shared/fixtures`): real block files, blocks and the messages that carry them, so
/// that fuzzing starts from the inputs that matter. Name and bytes of each.
pub fn fixture_seeds(target: &str, fixtures: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let read = |rel: &str| std::fs::read(fixtures.join(rel)).unwrap_or_default();
    let blocks = || {
        let file = read("mainnet-0-599/blk00000.dat");
        let mut out = Vec::new();
        let mut p = 0;
        while p + 8 <= file.len() && out.len() < 200 {
            let len = u32::from_le_bytes([file[p + 4], file[p + 5], file[p + 6], file[p + 7]]);
            let end = p + 8 + len as usize;
            if end > file.len() {
                break;
            }
            out.push(file[p + 8..end].to_vec());
            p = end;
        }
        out
    };
    let large = || {
        let file = read("large-blocks/testnet3_large_blocks.blk");
        let len = file
            .get(4..8)
            .map_or(0, |l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize);
        file.get(8..8 + len).map(<[u8]>::to_vec).unwrap_or_default()
    };
    let mut seeds = Vec::new();
    match target {
        "blk_records" => {
            let mut plain = vec![0u8];
            plain.extend(read("mainnet-0-599/blk00000.dat"));
            seeds.push(("mainnet-0-299".into(), plain));
            for damaged in ["corrupt-tail.dat", "zero-padded.dat"] {
                let mut s = vec![0u8];
                s.extend(read(&format!("damaged/{damaged}")));
                seeds.push((damaged.into(), s));
            }
            let mut s = vec![1u8];
            s.extend(read("damaged/testnet3-truncated-record.dat"));
            seeds.push(("testnet3-truncated".into(), s));
            let key = [0x5a, 0x11, 0x00, 0xff, 0x3c, 0x99, 0x01, 0x7e];
            let mut xored = vec![4u8];
            xored.extend(key);
            let file = read("mainnet-0-599/blk00001.dat");
            xored.extend(file.iter().enumerate().map(|(i, b)| b ^ key[i % 8]));
            seeds.push(("mainnet-300-599-xor".into(), xored));
        }
        "block_parse" => {
            for (i, b) in blocks().into_iter().enumerate().step_by(20) {
                seeds.push((format!("mainnet-{i}"), b));
            }
            seeds.push(("testnet3-large-segwit".into(), large()));
        }
        "zmq_frames" => {
            let block = blocks().into_iter().nth(170).unwrap_or_default();
            let mut s = zmq_message(&[b"rawblock", &block, &0u32.to_le_bytes()]);
            s.extend(zmq_message(&[b"hashblock", &[7; 32], &0u32.to_le_bytes()]));
            let mut seq = vec![3u8; 32];
            seq.push(b'A');
            seq.extend(5u64.to_le_bytes());
            s.extend(zmq_message(&[b"sequence", &seq, &0u32.to_le_bytes()]));
            s.extend(zmq_message(&[b"sequence", &[9; 33], &2u32.to_le_bytes()]));
            seeds.push(("rawblock-hashblock-sequence".into(), s));
            let tx = block.get(81..).unwrap_or_default().to_vec();
            seeds.push((
                "rawtx".into(),
                zmq_message(&[b"rawtx", &tx, &1u32.to_le_bytes()]),
            ));
        }
        "rpc_answers" => {
            let block: String = blocks()
                .into_iter()
                .nth(170)
                .unwrap_or_default()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            seeds.push((
                "getblock".into(),
                format!(r#"{{"result":"{block}","error":null,"id":1}}"#).into_bytes(),
            ));
        }
        _ => {}
    }
    seeds
}
