#!/usr/bin/env bash
# Regenerate openhydra/peer/proto/peer_pb2*.py from peer.proto (needs grpcio-tools, a dev dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. openhydra/peer/proto/peer.proto
echo "generated: $(ls openhydra/peer/proto/peer_pb2*)"
