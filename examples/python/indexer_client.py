#!/usr/bin/env python3
"""Example client of the indexer's gRPC API (indexer.v1.Indexer), in Python with grpcio.

Generates its stubs from proto/indexer/v1/indexer.proto at start (grpcio-tools), so it
always matches the checkout. Prints one JSON object per answer.

    pip install grpcio grpcio-tools
    python3 examples/python/indexer_client.py --addr 127.0.0.1:50051 tip
    python3 examples/python/indexer_client.py --token-file token.txt balance --wallet hot
    python3 examples/python/indexer_client.py utxos --wallet hot --min-conf 6
"""

import argparse
import json
import pathlib
import sys

import grpc

import stubs


def target(pb, args):
    if args.wallet:
        return pb.Target(wallet=args.wallet)
    if args.address:
        return pb.Target(address=args.address)
    return pb.Target(script_hex=args.script_hex)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--token-file", help="file holding the bearer token")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tip")
    for name in ("balance", "utxos"):
        p = sub.add_parser(name)
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--wallet")
        group.add_argument("--address")
        group.add_argument("--script-hex")
        p.add_argument("--min-conf", type=int, default=0)
    args = parser.parse_args()

    pb, pb_grpc = stubs.load("indexer/v1/indexer.proto", "indexer.v1.indexer")
    metadata = []
    if args.token_file:
        token = pathlib.Path(args.token_file).read_text().strip()
        metadata.append(("authorization", f"Bearer {token}"))
    stub = pb_grpc.IndexerStub(grpc.insecure_channel(args.addr))
    try:
        if args.command == "tip":
            tip = stub.GetTip(pb.GetTipRequest(), metadata=metadata)
            print(json.dumps({"height": tip.height, "hash": tip.hash}))
        elif args.command == "balance":
            b = stub.GetBalance(pb.GetBalanceRequest(target=target(pb, args), min_conf=args.min_conf),
                                metadata=metadata)
            print(json.dumps({"confirmed_sat": b.confirmed_sat, "unconfirmed_sat": b.unconfirmed_sat,
                              "immature_sat": b.immature_sat,
                              "utxo_count": b.utxo_count, "height": b.height}))
        else:
            count, total, token = 0, 0, ""
            while True:
                page = stub.ListUtxos(pb.ListUtxosRequest(target=target(pb, args), min_conf=args.min_conf,
                                                          limit=100, page_token=token), metadata=metadata)
                count += len(page.utxos)
                total += sum(u.value_sat for u in page.utxos)
                token = page.next_page_token
                if not token:
                    break
            print(json.dumps({"utxo_count": count, "value_sat": total}))
    except grpc.RpcError as e:
        print(json.dumps({"error": e.code().name, "message": e.details()}))
        sys.exit(1)


if __name__ == "__main__":
    main()
