#!/usr/bin/env python3
"""Example consumer of the indexer's event log on Kafka (docs/kafka.md), with
confluent-kafka: decodes each record's indexer.v1.Event and applies it once.

Records without a `log_offset` header mark where an exported chunk ends (the exporter
reads its position from them) and are skipped. The dedup rule every consumer applies: records of one key arrive in log order, so a
record whose (log_id, log_offset) is not above the last one applied for its key is a
repeat (a retried or aborted transaction, which some brokers deliver, or a replay into the
same topic) and is skipped. A real consumer stores the last applied offset per key with the
effects of applying it; this example keeps it in memory and prints one JSON line per event
applied, then a summary.

    pip install confluent-kafka grpcio-tools
    python3 examples/python/kafka_consumer.py --brokers 127.0.0.1:9092 --topic indexer.events
"""

import argparse
import json
import sys

from confluent_kafka import Consumer, KafkaError

import stubs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--brokers", default="127.0.0.1:9092")
    p.add_argument("--topic", default="indexer.events")
    p.add_argument("--group", default="example-consumer")
    p.add_argument("--idle-secs", type=float, default=0,
                   help="exit after this long without a record (0: run until stopped)")
    args = p.parse_args()
    pb, _ = stubs.load("indexer/v1/indexer.proto", "indexer.v1.indexer")

    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        # A first record in ~3 s rather than ~23 s, and no 500 ms wait per fetch.
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "fetch.wait.max.ms": 10,
    })
    consumer.subscribe([args.topic])
    last = {}  # key -> (log_id, log_offset) last applied
    applied = skipped = 0
    idle = 0.0
    try:
        while args.idle_secs == 0 or idle < args.idle_secs:
            msg = consumer.poll(0.5)
            if msg is None:
                idle += 0.5
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                sys.exit(f"kafka: {msg.error()}")
            idle = 0.0
            headers = {k: v.decode() for k, v in (msg.headers() or [])}
            if "log_offset" not in headers:
                continue  # the marker ending an exported chunk: not an event
            key = msg.key().decode()
            position = (headers["log_id"], int(headers["log_offset"]))
            seen = last.get(key)
            if seen is not None and seen[0] == position[0] and position[1] <= seen[1]:
                skipped += 1
                continue
            event = pb.Event.FromString(msg.value())
            last[key] = position
            applied += 1
            print(json.dumps({
                "log_offset": event.offset,
                "kind": pb.EventKind.Name(event.kind),
                "height": event.height,
                "txid": event.txid,
                "wallet": headers.get("wallet"),
            }), flush=True)
    finally:
        consumer.close()
    print(json.dumps({"applied": applied, "skipped": skipped}), flush=True)


if __name__ == "__main__":
    main()
