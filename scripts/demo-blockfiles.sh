#!/usr/bin/env bash
# Indexing straight from block files, no node needed: index mainnet blocks 0..4312 straight
# from bitcoind-format block files for a demo wallet, then show its balance and the digest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --workspace --all-targets --no-run -q 2>/dev/null || cargo test --workspace --all-targets --no-run
bin="$CARGO_TARGET_DIR/debug/indexer"
[ -x "$bin" ] || bin=$(ls -t "$CARGO_TARGET_DIR"/debug/deps/indexer-* 2>/dev/null | grep -v '\.d$' | head -1)
blocks="${BLOCKS_DIR:-../shared/fixtures/mainnet-0-4312}"
db=$(mktemp -d)
trap 'rm -rf "$db"' EXIT
# Early P2PK coins, as pk() descriptors: the key of block 9's coinbase (which paid Hal
# Finney 10 BTC in block 170), block 1's coinbase key, and Hal's key.
"$bin" --db "$db" watch add --wallet demo \
  'pk(0411db93e1dcdb8a016b49840f8c53bc1eb68a382e97b1482ecad7b148a6909a5cb2e0eaddfb84ccf9744464f82e160bfa9b8b64f9d4c03f999b8643f656b412a3)' \
  'pk(0496b538e853519c726a2c91e61ec11600ae1390813a627c66fb8be7947be63c52da7589379515d4e0a604f8141781e62294721166bf621e73a82cbf2342c858ee)' \
  'pk(04ae1a62fe09c5f51b13905f07f06b99a2f7159b2225f374cd378d71302fa28414e7aab37397f554a7df5f142c21c1b7303b8a0626f1baded5c72a704f7e6cd84c)'
"$bin" --db "$db" rescan --blocks-dir "$blocks"
"$bin" --db "$db" watch list
"$bin" --db "$db" status
