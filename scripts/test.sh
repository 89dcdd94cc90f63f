#!/usr/bin/env bash
# One command to run the tests on a fresh machine: set up, start a throwaway PostgreSQL for the
# ledger suite, lint, then pytest (slow real-model tests included; they are marked, not skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OPENHYDRA_TEST_PG_URL="$(bash scripts/start_postgres.sh)"
export OPENHYDRA_TEST_PG_URL
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
# Two workers (pytest-xdist): much of the suite waits on node processes, so two overlap well on two cores.
# tests/conftest.py keeps a file (and tests/api, tests/e2e: their session-wide node/swarm) on one worker and hands
# out the heaviest files first when OPENHYDRA_TEST_WORKERS=2; the default (0) runs in one process, in file order: two
# workers gave no measured gain on this loaded machine and were never timed on a full quiet run.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 -n "${OPENHYDRA_TEST_WORKERS:-0}" --dist loadscope "$@"
