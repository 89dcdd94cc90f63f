#!/usr/bin/env bash
# One command to run the tests on a fresh machine: set up, start a throwaway PostgreSQL for the
# ledger suite, lint, then pytest (slow real-model tests included; they are marked, not skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Test-only system packages (not for scripts/run-node.sh, which also runs setup.sh): only when missing, as root.
# Prometheus for tests/ops (a real server scrapes real nodes): Debian's package, only when missing.
if [ ! -x /usr/bin/prometheus ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing prometheus (Debian package)" >&2
    apt-get install -y -q prometheus >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }
fi

# Debian's Chromium for the dashboard's browser test (Playwright drives it; it downloads no browser).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium (apt) for tests/dashboard" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
        || echo "could not install chromium: tests/dashboard will be skipped" >&2
fi

OPENHYDRA_TEST_PG_URL="$(bash scripts/start_postgres.sh)"
export OPENHYDRA_TEST_PG_URL
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
# The NAT test (tests/netns/test_nat_swarm.py) builds NAT routers with nft (Debian's nftables) in network namespaces.
if [ "$(id -u)" = 0 ] && ! command -v nft >/dev/null && command -v apt-get >/dev/null; then
  apt-get install -y -q nftables >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nftables >/dev/null 2>&1; } \
    || echo "nftables not installed: the NAT test will be skipped" >&2
fi
# Three workers (pytest-xdist) by default: tests are single-threaded (OMP_NUM_THREADS=1) and much of the suite waits
# on node processes. Four were no faster (pytest 17:53 against 17:03-18:24 with three, 2026-12-04) and load the
# 2 cores more. tests/conftest.py keeps a file (and tests/e2e: its session-wide swarm) on one worker, runs the long
# files' tests one per unit and hands out the heaviest units first. OPENHYDRA_TEST_WORKERS=0: one process, in file
# order.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=60 -n "${OPENHYDRA_TEST_WORKERS:-3}" --dist loadscope "$@"
