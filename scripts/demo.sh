#!/usr/bin/env bash
# The main job, end to end on the embedded default: a devnet node (the project's
# bitcoind-compatible regtest node), `indexer run` following it over RPC, REST and ZMQ and
# serving gRPC, a treasury wallet whose coinbases mature, and a deposit seen in the
# mempool within a second and then confirmed. (The withdrawal orchestrator: issue 5.)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --workspace --all-targets --no-run -q 2>/dev/null || cargo test --workspace --all-targets --no-run
bin="$CARGO_TARGET_DIR/debug"
tmp=$(mktemp -d)
pids=()
cleanup() {
  status=$?
  [ "$status" -eq 0 ] || { echo "demo failed; indexer log:" >&2; tail -20 "$tmp/indexer.log" >&2 || true; }
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# Waits until file $1 has a line starting with $2 and prints that line.
wait_line() {
  for _ in $(seq 600); do
    if line=$(grep -m1 "^$2" "$1" 2>/dev/null); then echo "$line"; return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; return 1
}

"$bin/devnet" --datadir "$tmp/node" >"$tmp/devnet.out" &
pids+=($!)
ready=$(wait_line "$tmp/devnet.out" "devnet ready")
echo "$ready"
rpc=$(sed 's/.* rpc=\([^ ]*\).*/\1/' <<<"$ready")
zmq=$(sed 's/.* zmq=\([^ ]*\).*/\1/' <<<"$ready")
cli() { "$bin/devnet-cli" --datadir "$tmp/node" "$@"; }

treasury=$(cli getnewaddress "" bech32)
deposit=$(cli getnewaddress "" bech32m)
cli generatetoaddress 110 "$treasury" >/dev/null
idx() { "$bin/indexer" --db "$tmp/db" --network regtest "$@"; }
idx watch add --wallet treasury "$treasury"
idx watch add --wallet deposits "$deposit"

"$bin/indexer" --db "$tmp/db" --network regtest run --grpc 127.0.0.1:0 \
  --bitcoind-rpc-url "$rpc" --bitcoind-cookie-file "$tmp/node/regtest/.cookie" --bitcoind-rest true \
  --zmq-rawblock "$zmq" --zmq-hashblock "$zmq" --zmq-sequence "$zmq" --zmq-rawtx "$zmq" \
  >"$tmp/indexer.out" 2>"$tmp/indexer.log" &
pids+=($!)
grpc=$(wait_line "$tmp/indexer.out" "listening" | cut -f2)
echo "indexer run: gRPC on $grpc"
client() { python3 examples/python/indexer_client.py --addr "$grpc" "$@"; }
until client tip | grep -q '"height": 110'; do sleep 0.1; done
echo "caught up:                  $(client tip)"
echo "treasury (its coinbases):   $(client balance --wallet treasury)"

txid=$(cli sendtoaddress "$deposit" 1.25)
sleep 1
echo "deposit $txid sent 1 s ago: $(client balance --wallet deposits)"
cli generatetoaddress 1 "$treasury" >/dev/null
until client tip | grep -q '"height": 111'; do sleep 0.1; done
echo "after one block:            $(client balance --wallet deposits)"
