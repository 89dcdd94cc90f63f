#!/usr/bin/env bash
# One command to run a node on a fresh machine: set up (first time only), then start openhydra-node
# on http://127.0.0.1:8080 with any Hydra overrides you pass, e.g.
#   bash scripts/run-node.sh hardware=cpu model=smollm2-135m api.port=8081
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/openhydra-node "$@"
