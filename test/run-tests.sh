#!/usr/bin/env bash
# The whole test suite (`make test`): installs what is missing, builds and installs
# ironwod, starts the Wodify simulator (fixed seed) and a throwaway cluster with
# ironwod preloaded, then runs the pg_regress suite (inputs in test/sql, expected
# output in the top-level expected/), the pgTAP suites (pg_prove) and the shell
# checks, and prints one summary line.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/test/setup.sh"
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"
cd "$REPO"

make -s all >/dev/null

WORK=$(mktemp -d /tmp/ironwod-test.XXXXXX)
# Keep the work directory (server log, simulator output) when something failed.
trap 'rc=$?; stop_all; if [ $rc = 0 ]; then rm -rf "$WORK"; else echo "kept $WORK for inspection"; fi' EXIT
install_private

# A generous simulator throttle and a fast worker pace (SUITE_SETTINGS) keep the
# suite quick; the rate-limit tests set their own limits.
start_sim 42 3 small --rate 1000 --burst 1000
start_cluster ironwod "${SUITE_SETTINGS[@]}"

load_fixtures

passed=0
failed=0
note() { if [ "$1" = 0 ]; then passed=$((passed + 1)); echo "ok - $2"; else failed=$((failed + 1)); echo "not ok - $2"; fi; }
# how long a part of the suite took, for its note
lap() { local now; now=$(date +%s); ELAPSED=$(( now - LAP )); LAP=$now; }
# ONLY="regress pgtap ..." runs a subset while developing (regress, pgtap, scenarios,
# security, selftest, shell); unset, everything runs, as CI does.
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

# The simulator's self-test and the shell checks start simulators and clusters of
# their own, so they run beside the suites that share the cluster (which spend
# most of their time waiting on workers and the simulator, not on the CPU), in
# two lanes of about equal length; their output and results are printed once all
# are done, in lane order.
# record RC DESCRIPTION: the result of a check of the lane in $LANE.
record() { echo "$1 $2 ($(( $(date +%s) - t0 )) s)" >>"$WORK/lane$LANE.results"; t0=$(date +%s); }
lane1() {
    local t0 rc
    t0=$(date +%s)
    if want selftest; then
        rc=0
        python3 test/sim_selftest.py >"$WORK/sim_selftest.log" 2>&1 || { rc=$?; tail -20 "$WORK/sim_selftest.log"; }
        record $rc "the simulator's own self-test (wodify-api.md behaviours, determinism, faults)"
    fi
    want shell || return 0
    rc=0
    bash test/shell/metadata.sh || rc=$?
    record $rc "release metadata: META.json, license, changelog, fixed top level"

    rc=0
    PGBIN=$PGBIN bash test/shell/not_preloaded.sh || rc=$?
    record $rc "CREATE EXTENSION without shared_preload_libraries fails clearly"

    rc=0
    PGBIN=$PGBIN bash test/shell/config_checks.sh || rc=$?
    record $rc "configuration problems found early: missing database, ironwod.check_config()"

    # Its own simulator and cluster: keys rotated during running syncs.
    rc=0
    PGBIN=$PGBIN bash test/shell/key_rotation.sh || rc=$?
    record $rc "key rotation during running syncs: a gym's key validated first and swapped as its run ends; master key re-sealed by ironwod_rewrap(), retired only when unused"

    # Its own simulator and cluster: DROP DATABASE and the like on ironwod's database.
    rc=0
    PGBIN=$PGBIN bash test/shell/drop_database.sh || rc=$?
    record $rc "DROP DATABASE, RENAME and CREATE DATABASE ... TEMPLATE of ironwod's database: the supervisor and idle run workers leave, a busy one stays; the launcher holds the supervisor back meanwhile"

    # make installcheck against the installation in PGBIN, on its own server.
    rc=0
    PGBIN=$PGBIN bash test/shell/installcheck.sh || rc=$?
    record $rc "make installcheck the PGXS way, against an installed PostgreSQL"
}
lane2() {
    local t0 rc
    t0=$(date +%s)
    want shell || return 0
    # Two demos at once, each with its own work directory, simulator and cluster.
    rc=0
    bash test/shell/demo_twice.sh || rc=$?
    record $rc "make demo twice at once: own directories, only readable output, each stops only itself"

    # Its own simulator and two clusters of its own.
    rc=0
    PGBIN=$PGBIN bash test/shell/dump_restore.sh || rc=$?
    record $rc "pg_dump / pg_restore under another name: every table, sequence, the registry edit and the digest survive; syncing resumes; DROP/CREATE EXTENSION"

    # Its own simulator and cluster: 1.0 installed, backfilled, updated, compared.
    rc=0
    PGBIN=$PGBIN bash test/shell/upgrade.sh || rc=$?
    record $rc "upgrade from 1.0: data intact, version check, schema equal to a fresh install, syncing resumes"

    # Its own simulator (Wodify's real 5 req/s, burst 20) and its own cluster.
    rc=0
    PGBIN=$PGBIN bash test/shell/rate_limit.sh || rc=$?
    record $rc "rate limiting: no 429 at ironwod's default limit; 429s above Wodify's are retried, nothing lost"

    # Its own simulator and cluster, whose postmaster it kills twice.
    rc=0
    PGBIN=$PGBIN bash test/shell/postmaster_death.sh || rc=$?
    record $rc "kill -9 of the postmaster mid-backfill: every process gone at once, nothing committed after the kill, the rerun complete"
}
lane_pids=()
for LANE in 1 2; do
    : >"$WORK/lane$LANE.results"
    "lane$LANE" >"$WORK/lane$LANE.log" 2>&1 &
    lane_pids+=($!)
done
LAP=$(date +%s)

if want regress; then
    rc=0
    make -s installcheck-running PG_CONFIG="$PGBIN/pg_config" || rc=$?
    lap
    note $rc "pg_regress suite (see regression.diffs on failure) ($ELAPSED s)"
    [ $rc = 0 ] || cat regression.diffs 2>/dev/null | head -200 || true
fi

if want pgtap; then
    rc=0
    pg_prove --failures test/pgtap/*.sql || rc=$?
    lap
    note $rc "pgTAP suites ($ELAPSED s)"
fi

if want scenarios; then
    rc=0
    SIM_URL=$SIM_URL python3 test/scenarios/sync_scenarios.py || rc=$?
    lap
    note $rc "fault, crash and 30-day drift scenarios against the simulator ($ELAPSED s)"
fi

if want security; then
    rc=0
    SIM_URL=$SIM_URL /usr/bin/python3 test/scenarios/security_scenarios.py || rc=$?
    lap
    note $rc "security: NOTIFY tells listeners only event ids; no key in pg_stat_activity or pg_stat_statements on any call path; the worker role cannot log in ($ELAPSED s)"
fi

for LANE in 1 2; do
    lane_rc=0
    wait "${lane_pids[$((LANE - 1))]}" || lane_rc=$?
    cat "$WORK/lane$LANE.log"
    while read -r rc what; do note "$rc" "$what"; done <"$WORK/lane$LANE.results"
    [ $lane_rc = 0 ] || note 1 "shell lane $LANE ran to the end (exit $lane_rc)"
done

echo
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
