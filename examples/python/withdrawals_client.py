#!/usr/bin/env python3
"""Example client of the orchestrator's gRPC API (orchestrator.v1.Withdrawals), in Python.

Generates its stubs from proto/orchestrator/v1/withdrawals.proto at start (grpcio-tools).
Every call needs the orchestrator's bearer token. `submit` and `get` print one JSON object;
`watch` prints each change of a withdrawal in plain words until it is final.

    pip install grpcio grpcio-tools
    python3 examples/python/withdrawals_client.py --token-file token submit \\
        --request-id pay-1 --wallet hot --to bcrt1q... --amount-sat 150000000 --sat-per-vb 5
    python3 examples/python/withdrawals_client.py --token-file token watch --id 1
"""

import argparse
import json
import pathlib
import sys

import grpc

import stubs


def as_json(pb, w):
    return {
        "id": w.id, "request_id": w.request_id, "state": pb.WithdrawalState.Name(w.state),
        "amount_sat": w.amount_sat, "destination": w.destination, "txid": w.txid,
        "txids": list(w.txids), "fee_sat": w.fee_sat, "confirmations": w.confirmations,
        "confirmed_txid": w.confirmed_txid, "failure_reason": w.failure_reason,
        "fee_choice": w.fee_choice,
    }


def in_words(pb, w, before):
    """One line saying what changed since `before` (None for the first sight)."""
    state = pb.WithdrawalState.Name(w.state)
    fee = f"fee {w.fee_sat} sat, {w.feerate_sat_vb:.1f} sat/vB"
    if before is not None and before.state == w.state:
        if len(w.txids) > len(before.txids):
            return f"withdrawal {w.id}: stuck; replaced by {w.txid} ({fee})"
        if w.confirmations == 0 and before.confirmations > 0:
            return (f"withdrawal {w.id}: its block left the chain (reorg); "
                    "the payment is back in the mempool")
        if w.confirmations != before.confirmations:
            return f"withdrawal {w.id}: {w.confirmations} confirmation(s)"
        if state == "CONFIRMING" and w.confirmations == 0:
            return f"withdrawal {w.id}: sent to the network again: {w.txid}"
        return f"withdrawal {w.id}: updated, still {state}"
    words = {
        "RECEIVED": f"accepted: {w.amount_sat / 1e8:.8f} BTC to {w.destination}",
        "RESERVED": "coins reserved for it",
        "SIGNED": f"signed: transaction {w.txid} ({fee}; {w.fee_choice})",
        "BROADCAST": (f"coins reserved, signed ({fee}; {w.fee_choice}) and sent to the "
                      f"network: {w.txid}"),
        "CONFIRMING": (f"in a block: {w.confirmations} confirmation(s)" if w.confirmations
                       else "its block left the chain (reorg): waiting to be mined again"),
        "COMPLETED": f"COMPLETED with {w.confirmations} confirmations: {w.confirmed_txid}",
        "FAILED": f"FAILED: {w.failure_reason}",
        "CANCELLED": "cancelled",
        "NEEDS_REVIEW": f"NEEDS REVIEW by an operator: {w.failure_reason}",
    }
    return f"withdrawal {w.id}: {words.get(state, state)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50061")
    parser.add_argument("--token-file", required=True, help="file holding the bearer token")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit")
    p.add_argument("--request-id", required=True)
    p.add_argument("--wallet", required=True)
    p.add_argument("--to", required=True, help="destination address")
    p.add_argument("--amount-sat", type=int, required=True)
    fee = p.add_mutually_exclusive_group()
    fee.add_argument("--sat-per-vb", type=float, help="fixed fee rate (default: normal priority)")
    fee.add_argument("--target-blocks", type=int, help="bitcoind's estimate for this many blocks")
    fee.add_argument("--priority", choices=["low", "normal", "high"],
                     help="bitcoind's estimate for the target the operator set for it")
    p.add_argument("--max-fee-sat", type=int, default=100_000)
    for name in ("get", "watch"):
        p = sub.add_parser(name)
        p.add_argument("--id", type=int, required=True)
    args = parser.parse_args()

    pb, pb_grpc = stubs.load("orchestrator/v1/withdrawals.proto", "orchestrator.v1.withdrawals")
    token = pathlib.Path(args.token_file).read_text().strip()
    metadata = [("authorization", f"Bearer {token}")]
    stub = pb_grpc.WithdrawalsStub(grpc.insecure_channel(args.addr))
    try:
        if args.command == "submit":
            if args.sat_per_vb is not None:
                fee = {"sat_per_vb": args.sat_per_vb}
            elif args.target_blocks is not None:
                fee = {"target_blocks": args.target_blocks}
            else:
                fee = {"priority": pb.Priority.Value(f"PRIORITY_{(args.priority or 'normal').upper()}")}
            w = stub.SubmitWithdrawal(pb.SubmitWithdrawalRequest(
                request_id=args.request_id, wallet=args.wallet, destination=args.to,
                amount_sat=args.amount_sat, max_fee_sat=args.max_fee_sat, **fee), metadata=metadata)
            print(json.dumps(as_json(pb, w)))
        elif args.command == "get":
            w = stub.GetWithdrawal(pb.GetWithdrawalRequest(id=args.id), metadata=metadata)
            print(json.dumps(as_json(pb, w)))
        else:
            before = None
            final = {"COMPLETED", "FAILED", "CANCELLED", "NEEDS_REVIEW"}
            for w in stub.WatchWithdrawal(pb.WatchWithdrawalRequest(id=args.id), metadata=metadata):
                print(in_words(pb, w, before), flush=True)
                before = w
                if pb.WithdrawalState.Name(w.state) in final:
                    break
    except grpc.RpcError as e:
        print(json.dumps({"error": e.code().name, "message": e.details()}))
        sys.exit(1)


if __name__ == "__main__":
    main()
