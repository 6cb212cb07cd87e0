#!/usr/bin/env bash
# `make test-citus`: the suite on a three-node Citus cluster.
#
# Builds Citus from the vendored source (cached, see build.sh) or uses an
# installed one, installs both into the suite's private PostgreSQL copy, and
# starts a coordinator and two workers: three ordinary clusters on three ports,
# citus first in shared_preload_libraries, ironwod preloaded everywhere (the
# library must load on the workers; its supervisor idles there).  The pg_regress
# suite's 01_install runs ironwod.distribute() right after CREATE EXTENSION when
# IRONWOD_TEST_DISTRIBUTE is set, so the pg_regress, isolation, pgTAP and scenario
# suites then run against the coordinator with the very expected outputs of
# `make test`.  test/citus/checks.sql adds what only a cluster can show: each
# tenant's rows on one node, a tenant-scoped dashboard read on one shard, RLS
# forced on every shard, the supervisor on the coordinator only.
#
#   CITUS_TARBALL=path   the Citus source (default: ../shared/vendor next to the repo,
#                        then /work/shared/vendor)
#   ONLY="regress ..."   a subset, as in make test (regress, pgtap, scenarios, checks)
#   CITUS_KEEP=1         keep the cluster running at the end and print how to reach it
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
bash "$REPO/test/setup.sh"
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"
# shellcheck source=test/citus/build.sh
source "$REPO/test/citus/build.sh"
cd "$REPO"

# Where the Citus source is: CI runs a clean clone of main somewhere on this machine,
# next to ../shared/vendor or not.
find_tarball() {
    local c
    for c in "${CITUS_TARBALL:-}" "$REPO/../shared/vendor/citus-12.1.12.tar.gz" \
             /work/shared/vendor/citus-12.1.12.tar.gz; do
        [ -n "$c" ] && [ -f "$c" ] && { echo "$c"; return 0; }
    done
    return 1
}

if citus_installed; then
    echo "using the installed Citus"
    CITUS_ROOT=
elif tarball=$(find_tarball); then
    citus_build "$tarball"
else
    echo "SKIP: no Citus installed and no Citus source (set CITUS_TARBALL or put citus-12.1.12.tar.gz in ../shared/vendor)"
    exit 0
fi

make -s all >/dev/null
WORK=$(mktemp -d /tmp/ironwod-citus.XXXXXX)
NODES=(coord w1 w2)
declare -A NODE_PORT

stop_nodes() {
    local n
    for n in "${NODES[@]}"; do
        if [ -f "$WORK/$n/postmaster.pid" ]; then
            su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D '$WORK/$n' -m fast -w stop" >/dev/null 2>&1 || true
        fi
    done
    stop_all
}
if [ "${CITUS_KEEP:-}" = 1 ]; then
    trap 'rc=$?; [ $rc = 0 ] || { stop_nodes; echo "kept $WORK for inspection"; }' EXIT
else
    trap 'rc=$?; stop_nodes; if [ $rc = 0 ]; then rm -rf "$WORK"; else echo "kept $WORK for inspection"; fi' EXIT
fi

install_private
install_citus_private
start_sim 42 3 small --rate 1000 --burst 1000
mkdir -p "$WORK/keys"
DEV_KEY=$(bash "$REPO/test/devkey.sh" "$WORK/keys" dev-1)
chown -R postgres:postgres "$WORK"
chmod 755 "$WORK"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_node NAME [extra postgresql.conf lines...].  Citus reaches the nodes over
# TCP as the current user (the app's login role, ironwod_worker for run workers),
# so every node accepts local TCP connections: the README's TCP reject line for
# ironwod_worker applies to everything but the coordinator, which here shares
# 127.0.0.1 with everyone.  Its Unix-socket line applies, and comes first.
start_node() {
    local name=$1 port
    shift
    port=$(free_port)
    NODE_PORT[$name]=$port
    su postgres -s /bin/sh -c "$PGBIN/initdb -D '$WORK/$name' -A trust -E UTF8 --locale=C.UTF-8" >"$WORK/initdb-$name.log"
    {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$WORK'"
        echo "shared_preload_libraries = 'citus,ironwod'"
        echo "max_worker_processes = 32"
        echo "max_connections = 200"
        # Citus commits multi-node writes with two-phase commit; 05_resume holds a
        # lock in a prepared transaction.
        echo "max_prepared_transactions = 100"
        echo "ironwod.database_name = 'postgres'"
        echo "ironwod.base_url = '$SIM_URL'"
        echo "ironwod.allow_http = on"
        echo "ironwod.master_key_command = '$WORK/keys/master_key_command.sh'"
        # Fewer shards than Citus's 32 keep distribute() quick on two cores.
        echo "citus.shard_count = 4"
        for line in "$@"; do echo "$line"; done
    } >>"$WORK/$name/postgresql.conf"
    printf 'local all ironwod_worker reject\nlocal all all trust\nhost all all 127.0.0.1/32 trust\n' >"$WORK/$name/pg_hba.conf"
    chown postgres:postgres "$WORK/$name/postgresql.conf" "$WORK/$name/pg_hba.conf"
    su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D '$WORK/$name' -l '$WORK/$name/server.log' -w start" >/dev/null
    psql -qX -h "$WORK" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION citus'
}

# The coordinator carries the single-node suite's settings (the secrets test reads
# its server.log); the workers never run ironwod's workers.
start_node coord \
    "log_statement = 'all'" \
    "log_min_duration_statement = 0" \
    "log_parameter_max_length = -1" \
    "log_parameter_max_length_on_error = -1" \
    "ironwod.requests_per_second = 500" \
    "ironwod.burst = 100" \
    "ironwod.cluster_requests_per_second = 5000" \
    "ironwod.naptime = 2000" \
    "ironwod.max_retries = 3"
start_node w1
start_node w2

export PGHOST="$WORK" PGPORT=${NODE_PORT[coord]} PGUSER=postgres PGDATABASE=postgres
psql -qAtX -v ON_ERROR_STOP=1 >/dev/null <<SQL
SELECT citus_set_coordinator_host('127.0.0.1', ${NODE_PORT[coord]});
SELECT citus_add_node('127.0.0.1', ${NODE_PORT[w1]});
SELECT citus_add_node('127.0.0.1', ${NODE_PORT[w2]});
-- The isolation tester asks pg_isolation_test_session_is_blocked() whether a step
-- waits; on Citus a step waits on a worker node, where only Citus's version of the
-- function sees it (as in Citus's own isolation suite).
SELECT citus_internal.replace_isolation_tester_func();
SQL

load_fixtures
# The fixtures are read in joins with ironwod's tables: reference tables.
psql -qAtX -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
SET client_min_messages = warning;
SELECT create_reference_table(t) FROM unnest('{public.sim_gyms,public.sim_truth,public.test_dev_key}'::regclass[]) t;
SQL
export IRONWOD_TEST_DISTRIBUTE=1

passed=0
failed=0
note() { if [ "$1" = 0 ]; then passed=$((passed + 1)); echo "ok - $2"; else failed=$((failed + 1)); echo "not ok - $2"; fi; }
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

if want regress; then
    rc=0
    make -s installcheck-running PG_CONFIG="$PGBIN/pg_config" || rc=$?
    note $rc "citus: pg_regress suite (see regression.diffs on failure)"
    [ $rc = 0 ] || head -300 regression.diffs 2>/dev/null || true
fi

if want pgtap; then
    rc=0
    pg_prove --failures test/pgtap/*.sql || rc=$?
    note $rc "citus: pgTAP suites"
fi

if want scenarios; then
    rc=0
    SIM_URL=$SIM_URL python3 test/scenarios/sync_scenarios.py || rc=$?
    note $rc "citus: fault, crash and 30-day drift scenarios against the simulator"
fi

if want checks; then
    rc=0
    out=$(psql -qAtX -v ON_ERROR_STOP=1 -f test/citus/checks.sql 2>&1) || rc=$?
    echo "$out"
    echo "$out" | grep -q '^not ok' && rc=1
    note $rc "citus: every table distributed or reference, tenants on one node, RLS forced on every shard"

    # The dashboard call itself, as the app: the commands Citus sends to the nodes
    # name one shard of the cache.
    rc=0
    out=$(psql -qAtX -v ON_ERROR_STOP=1 2>&1 <<'SQL'
SET ROLE ironwod_test_app;
BEGIN;
SELECT ironwod_set_scope('11111111-1111-1111-1111-111111111111', 'aaaaaaaa-0000-0000-0000-000000000001');
SET LOCAL citus.log_remote_commands = on;
SET LOCAL client_min_messages = log;
SELECT count(*) FROM ironwod_dashboard('11111111-1111-1111-1111-111111111111', 'aaaaaaaa-0000-0000-0000-000000000001',
                                       (now() - interval '119 months')::date, now()::date);
COMMIT;
SQL
    ) || rc=$?
    shards=$(echo "$out" | grep -o 'gym_monthly_metrics_cache_[0-9]*' | sort -u | wc -l)
    months=$(echo "$out" | grep -E '^[0-9]+$' | tail -1)
    [ "$rc" = 0 ] && [ "$shards" = 1 ] && [ "${months:-0}" -gt 0 ] || { rc=1; echo "$out" | grep -E 'ERROR|HINT' | head -5 || true; }
    note $rc "citus: ironwod_dashboard reads one shard ($shards shard(s), ${months:-no} months)"

    # The supervisor serves the queue on the coordinator only; on the workers it
    # says once that it idles.
    rc=0
    grep -q 'ironwod supervisor idles' "$WORK/coord/server.log" && rc=1
    for n in w1 w2; do grep -q 'ironwod supervisor idles: this node is a Citus worker' "$WORK/$n/server.log" || rc=1; done
    note $rc "citus: the supervisor idles on the worker nodes and serves the coordinator"
fi

# Every node's log: errors that did not surface in a client (a background worker's,
# a node's), for the report.
for n in "${NODES[@]}"; do
    errs=$(grep -c ' ERROR: ' "$WORK/$n/server.log" || true)
    echo "# $n: $errs ERROR lines in $WORK/$n/server.log"
done

echo
echo "citus: $passed passed, $failed failed"
if [ "${CITUS_KEEP:-}" = 1 ]; then
    echo "cluster kept: PGHOST=$WORK PGPORT=${NODE_PORT[coord]} (workers ${NODE_PORT[w1]}, ${NODE_PORT[w2]}); simulator $SIM_URL (pid $SIM_PID)"
    echo "stop with: for d in $WORK/{coord,w1,w2}; do su postgres -s /bin/sh -c \"$PGBIN/pg_ctl -D \$d -m fast stop\"; done; kill $SIM_PID"
    trap - EXIT
fi
[ "$failed" = 0 ]
