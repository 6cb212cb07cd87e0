#!/usr/bin/env bash
# `make installcheck`, the PGXS way: after `make install`, run the pg_regress and
# isolation suites against the PostgreSQL installation PG_CONFIG names.  The
# suites need a server set up for them, so this starts one of its own from that
# installation's binaries -- a throwaway cluster in a temporary directory, with
# ironwod preloaded and pointed at the Wodify simulator (fixed seed), a
# development master key, and the fixtures the tests read -- runs PGXS's recipe
# against it (make installcheck-running), and stops it again.  Nothing of the
# installation or of any other server is touched.  Runs as root (the server then
# runs as the postgres OS user) or as an ordinary user who owns this checkout.
#
#   make install && make installcheck            # PG_CONFIG=... for another installation
#   make installcheck REGRESS=01_install ISOLATION=   # a subset
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"
PGBIN=$("$PG_CONFIG" --bindir)
if [ ! -f "$("$PG_CONFIG" --pkglibdir)/ironwod.so" ] || [ ! -f "$("$PG_CONFIG" --sharedir)/extension/ironwod.control" ]; then
    echo "ironwod is not installed in the PostgreSQL of $PG_CONFIG: run make install first (as root: sudo make install)" >&2
    exit 1
fi
if [ ! -f "$PGBIN/initdb" ]; then
    echo "no initdb in $PGBIN: install the PostgreSQL server package (postgresql-15)" >&2
    exit 1
fi

WORK=$(mktemp -d /tmp/ironwod-installcheck.XXXXXX)
trap 'rc=$?; stop_all; if [ $rc = 0 ]; then rm -rf "$WORK"; else echo "kept $WORK for inspection (server log in data/server.log)"; fi' EXIT
start_sim 42 3 small --rate 1000 --burst 1000
start_cluster ironwod "${SUITE_SETTINGS[@]}"
load_fixtures
echo "installcheck: ironwod on $("$PGBIN/postgres" --version), server in $WORK, simulator at $SIM_URL"
make -s -C "$REPO" installcheck-running PG_CONFIG="$PG_CONFIG"
