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
# forced on every shard, the supervisor on the coordinator only.  Last, every
# ERROR line in the three nodes' server logs must be of a kind
# test/citus/log_errors.py lists with the test or product path that causes it:
# a worker node logs the failures a caught exception hides from the client.
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
# shellcheck source=test/citus/nodes.sh
source "$REPO/test/citus/nodes.sh"
cd "$REPO"

citus_find || { echo "SKIP: no Citus installed and no Citus source (set CITUS_TARBALL or put citus-12.1.12.tar.gz in ../shared/vendor)"; exit 0; }

make -s all >/dev/null
WORK=$(mktemp -d /tmp/ironwod-citus.XXXXXX)
if [ "${CITUS_KEEP:-}" = 1 ]; then
    trap 'rc=$?; [ $rc = 0 ] || { stop_nodes; stop_all; echo "kept $WORK for inspection"; }' EXIT
else
    trap 'rc=$?; stop_nodes; stop_all; if [ $rc = 0 ]; then rm -rf "$WORK"; else echo "kept $WORK for inspection"; fi' EXIT
fi

install_private
install_citus_private
start_sim 42 3 small --rate 1000 --burst 1000
citus_keys

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

join_nodes coord w1 w2
# The isolation tester asks pg_isolation_test_session_is_blocked() whether a step
# waits; on Citus a step waits on a worker node, where only Citus's version of the
# function sees it (as in Citus's own isolation suite).
psql -qAtX -v ON_ERROR_STOP=1 -c 'SELECT citus_internal.replace_isolation_tester_func()' >/dev/null

load_fixtures
# The fixtures are read in joins with ironwod's tables: reference tables.
psql -qAtX -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
SET client_min_messages = warning;
SELECT create_reference_table(t) FROM unnest('{public.sim_gyms,public.sim_truth,public.sim_truth_programs,public.test_dev_key}'::regclass[]) t;
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
    # The same files as make test (the head of each says what Citus asks of it).
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
    grep -q '^not ok' <<<"$out" && rc=1
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

# Every node's log: the ERROR lines by kind, each expected one with why it happens
# (test/citus/log_errors.py).  A worker node logs the remote half of every
# coordinator statement that failed on it, so a kind not listed there is a failure
# a retry or a caught exception hid.
rc=0
logs=()
for n in "${NODES[@]}"; do logs+=("$n=$WORK/$n/server.log"); done
python3 test/citus/log_errors.py "${logs[@]}" || rc=$?
note $rc "citus: every ERROR in the nodes' logs is of an expected kind"

echo
echo "citus: $passed passed, $failed failed"
if [ "${CITUS_KEEP:-}" = 1 ]; then
    echo "cluster kept: PGHOST=$WORK PGPORT=${NODE_PORT[coord]} (workers ${NODE_PORT[w1]}, ${NODE_PORT[w2]}); simulator $SIM_URL (pid $SIM_PID)"
    echo "stop with: for d in $WORK/{coord,w1,w2}; do su postgres -s /bin/sh -c \"$PGBIN/pg_ctl -D \$d -m fast stop\"; done; kill $SIM_PID"
    trap - EXIT
fi
[ "$failed" = 0 ]
