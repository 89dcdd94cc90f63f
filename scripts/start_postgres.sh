#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the ledger tests and benchmark, then print its URL.
#
#   export OPENHYDRA_TEST_PG_URL="$(scripts/start_postgres.sh)"
#
# Installs PostgreSQL with apt-get when no server binaries are found (needs root). The data directory
# is disposable (default /tmp/openhydra-pg); the server runs as the `postgres` OS user (when started
# by root; otherwise as the caller), listens only on
# 127.0.0.1, and trusts local connections: it is a test fixture, never a production database.
# Idempotent: a second call against a running server just prints the URL again.
# Stop it with:  scripts/start_postgres.sh stop
set -euo pipefail

PGPORT="${OPENHYDRA_PG_PORT:-54329}"
PGDATA_DIR="${OPENHYDRA_PG_DIR:-/tmp/openhydra-pg}"
PGDB="${OPENHYDRA_PG_DB:-openhydra_test}"
PGUSER_OS="postgres"

find_bindir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/pg_ctl" ]] && { echo "$d"; return 0; }
    done
    command -v pg_ctl >/dev/null 2>&1 && { dirname "$(command -v pg_ctl)"; return 0; }
    return 1
}

if ! BINDIR="$(find_bindir)"; then
    echo "PostgreSQL not found; installing with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    BINDIR="$(find_bindir)"
fi

# PostgreSQL refuses to run as root: as root, run it as the `postgres` user; otherwise as ourselves.
as_pg() {
    if [[ "$(id -u)" == "0" ]]; then runuser -u "$PGUSER_OS" -- "$@"; else "$@"; fi
}

if [[ "${1:-}" == "stop" ]]; then
    as_pg "$BINDIR/pg_ctl" -D "$PGDATA_DIR" -m fast stop >&2 || true
    exit 0
fi

if [[ ! -f "$PGDATA_DIR/PG_VERSION" ]]; then
    mkdir -p "$PGDATA_DIR"
    [[ "$(id -u)" == "0" ]] && chown "$PGUSER_OS" "$PGDATA_DIR"
    chmod 700 "$PGDATA_DIR"
    as_pg "$BINDIR/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 >/dev/null
fi

if ! as_pg "$BINDIR/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
    # Sockets in the data dir (the default /var/run/postgresql may not exist in containers).
    as_pg "$BINDIR/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $PGDATA_DIR -c max_connections=200 -c fsync=on" \
        >/dev/null
fi

if ! as_pg "$BINDIR/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='$PGDB'" | grep -q 1; then
    as_pg "$BINDIR/createdb" -h 127.0.0.1 -p "$PGPORT" -U postgres "$PGDB"
fi

echo "postgresql://postgres@127.0.0.1:$PGPORT/$PGDB"
