#!/usr/bin/env bash
# Configuration problems found early, on a throwaway cluster of its own:
#
#  1. the server starts while the database named by ironwod.database_name does
#     not exist: the launcher says so once, with the fix, instead of a FATAL
#     every ten seconds, and starts the supervisor as soon as the database is
#     created;
#
# Usage: bash test/shell/config_checks.sh  (PGBIN may name a PostgreSQL 15 bin
# directory that already has this build of ironwod installed.)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"

WORK=$(mktemp -d /tmp/ironwod-config.XXXXXX)
trap 'rc=$?; stop_all; if [ $rc = 0 ]; then rm -rf "$WORK"; else echo "kept $WORK for inspection"; fi' EXIT
if [ -n "${PGBIN:-}" ] && [ -f "$("$PGBIN/pg_config" --pkglibdir)/ironwod.so" ]; then
    :
else
    install_private
fi
fail() { echo "FAIL: $*" >&2; exit 1; }
LOG=$WORK/data/server.log
# Wait for a condition; the bound is for a broken server, not a pace.
wait_for() {
    local what=$1
    shift
    for _ in $(seq 1 1200); do
        if "$@"; then return 0; fi
        sleep 0.1
    done
    fail "timed out waiting for $what"
}

start_sim 7 1 small --rate 1000 --burst 1000

# ---- 1. the database does not exist yet ------------------------------------
start_cluster ironwod "ironwod.naptime = 2000" "ironwod.database_name = 'metrics'"
warned() { grep -q 'WARNING:  database "metrics" named by ironwod.database_name does not exist' "$LOG"; }
wait_for "the launcher's warning" warned
grep -q 'HINT:  Create it (CREATE DATABASE metrics)' "$LOG" || fail "no hint with the fix"
psql -qX -v ON_ERROR_STOP=1 -c 'CREATE DATABASE metrics' >/dev/null
supervising() { [ "$(psql -qAtX -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'ironwod supervisor' AND datname = 'metrics'")" = 1 ]; }
wait_for "the supervisor in metrics" supervising
[ "$(grep -c 'named by ironwod.database_name does not exist' "$LOG")" = 1 ] || fail "the warning was repeated"
grep -q 'LOG:  database "metrics" exists now; starting the ironwod supervisor' "$LOG" || fail "no notice when the database appeared"
! grep -q 'FATAL:' "$LOG" || fail "a FATAL in the server log: $(grep 'FATAL:' "$LOG" | head -3)"
echo "ok - missing database: one warning with the fix, no FATAL; the supervisor starts once it exists"
