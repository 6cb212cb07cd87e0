#!/usr/bin/env bash
# `make bench-citus`: the scale-out measurement of issue 12, side by side in one run
# on this machine.  The same simulator gyms (same seed) are backfilled and then run
# their nightly incremental sync, all at once, first on one PostgreSQL node and then
# on a Citus cluster of a coordinator and two workers; then the dashboard read is
# timed on both.  Every node runs on this one machine, so the cluster cannot be
# faster here: what the run shows is where the work goes (CPU seconds per node),
# how much of it the coordinator keeps (which bounds the runs one coordinator can
# drive) and how much moves to the workers (which grows with nodes), and what Citus
# adds to each run and each read.
#
#   BENCH_CITUS_GYMS    simulator gyms, synced at once (default 4)
#   BENCH_CITUS_SCALE   their scale (default medium)
#   BENCH_CITUS_READS   dashboard reads timed per setup (default 500)
#
# CPU is each server's own, read from /proc: the postmaster's, its reaped
# children's (run workers, backends that ended) and its live children's.  The
# dashboard read is what a host app sends: BEGIN, ironwod_set_scope,
# ironwod_dashboard for 24 months, COMMIT, as a LOGIN role granted ironwod_app
# (pgbench, one client; latency per transaction).
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
NGYMS=${BENCH_CITUS_GYMS:-4}
SCALE=${BENCH_CITUS_SCALE:-medium}
READS=${BENCH_CITUS_READS:-500}
BEGAN=$(date +%s)

citus_find || { echo "SKIP: no Citus installed and no Citus source (set CITUS_TARBALL or put citus-12.1.12.tar.gz in ../shared/vendor)"; exit 0; }
make -s all >/dev/null
WORK=$(mktemp -d /tmp/ironwod-bench-citus.XXXXXX)
trap 'stop_nodes; stop_all; rm -rf "$WORK"' EXIT
install_private
install_citus_private
: >"$WORK/results"

SETTINGS=("ironwod.requests_per_second = 2000" "ironwod.burst = 200" "ironwod.cluster_requests_per_second = 5000"
          "ironwod.max_workers = 4" "ironwod.naptime = 500" "track_functions = pl")
# One tenant per gym: Citus places each tenant's rows on one node, so gyms of one
# tenant would all land on the same worker.
tenant_uuid() { printf 'c1c1c1c1-0000-4000-8000-%012d' "$1"; }
gym_uuid() { printf 'c1c1c1c1-1111-4000-8000-%012d' "$1"; }
q() { psql -qAtX -v ON_ERROR_STOP=1 "$@"; }
result() { echo "$1|$2|$3" >>"$WORK/results"; }

# cpu_of SETUP PHASE DATADIR... (called before and after a phase): the CPU seconds
# each server spent in it.
declare -A CPU0
cpu_mark() {
    local d
    for d in "$@"; do CPU0[$d]=$(node_cpu "$d"); done
}
cpu_record() {
    local setup=$1 phase=$2 d
    shift 2
    for d in "$@"; do
        result "$setup" "$phase cpu $(basename "$d")" "$(awk -v a="${CPU0[$d]}" -v b="$(node_cpu "$d")" 'BEGIN { printf "%.2f", b - a }')"
    done
}

wait_run() {
    local t g
    read -r t g < <(q -F ' ' -c "SELECT tenant_id, gym_id FROM ironwod.sync_runs WHERE run_id = $1")
    q -c "BEGIN" -c "SELECT ironwod_set_scope('$t', '$g')" -c "SELECT ironwod_wait($1, '30 minutes')" -c "COMMIT" | sed -n 2p
}

# phase_split SETUP PHASE "RUN...": the runs' mean landing time (start to the last
# entity landed) and mean time after it (transform and metrics refresh), and the
# run workers' transform_step and refresh_metrics totals (pg_stat_user_functions,
# reset before the phase).
phase_split() {
    wait_run_workers_gone
    q -v setup="$1" -v phase="$2" -v runs="{${3// /,}}" <<'SQL' >>"$WORK/results"
SELECT format('%s|%s landing s|%s', :'setup', :'phase', round(avg(extract(epoch FROM e.landed - r.started_at))::numeric, 2))
FROM ironwod.sync_runs r, LATERAL (SELECT max(x.completed_at) AS landed FROM ironwod.sync_run_entities x
                                   WHERE x.tenant_id = r.tenant_id AND x.gym_id = r.gym_id AND x.run_id = r.run_id) e
WHERE r.run_id = ANY (:'runs'::bigint[]);
SELECT format('%s|%s after landing s|%s', :'setup', :'phase', round(avg(extract(epoch FROM r.finished_at - e.landed))::numeric, 2))
FROM ironwod.sync_runs r, LATERAL (SELECT max(x.completed_at) AS landed FROM ironwod.sync_run_entities x
                                   WHERE x.tenant_id = r.tenant_id AND x.gym_id = r.gym_id AND x.run_id = r.run_id) e
WHERE r.run_id = ANY (:'runs'::bigint[]);
SELECT format('%s|%s transform s|%s', :'setup', :'phase',
              round((coalesce(sum(total_time) FILTER (WHERE funcname = 'transform_step'), 0) / 1000)::numeric, 2))
       || E'\n' ||
       format('%s|%s refresh s|%s', :'setup', :'phase',
              round((coalesce(sum(total_time) FILTER (WHERE funcname = 'refresh_metrics'), 0) / 1000)::numeric, 2))
FROM pg_stat_user_functions WHERE schemaname = 'ironwod';
SELECT pg_stat_reset() \g /dev/null
SQL
}

# measure SETUP DATADIR...: the whole measurement against the server PGHOST/PGPORT
# name (one node, or the Citus coordinator); DATADIRs are the servers to count.
measure() {
    local setup=$1 i t g key sealed runs=() r t0 ok
    shift
    q -c 'CREATE EXTENSION ironwod' >/dev/null
    if [ "$setup" = citus ]; then
        q -c 'SET client_min_messages = warning' -c 'CALL ironwod.distribute()'
    fi
    register_dev_key >/dev/null
    q -c 'CREATE ROLE bench_app LOGIN' -c 'GRANT ironwod_app TO bench_app' >/dev/null
    local gyms_json
    gyms_json=$(curl -sf "$SIM_URL/_sim/gyms")

    # The backfills, all connected at once (each connect queues its backfill).
    q -c 'SELECT pg_stat_reset()' >/dev/null
    cpu_mark "$@"
    t0=$(date +%s.%N)
    for i in $(seq 0 $((NGYMS - 1))); do
        t=$(tenant_uuid "$i")
        g=$(gym_uuid "$i")
        key=$(printf '%s' "$gyms_json" | python3 -c "import json,sys; print(json.load(sys.stdin)['gyms'][$i]['api_key'])")
        sealed=$(printf %s "$key" | seal_key "$t" "$g")
        q -c "BEGIN" -c "SELECT ironwod_set_scope('$t', '$g')" -c "SELECT ironwod_connect('$t', '$g', '$sealed'::bytea)" -c "COMMIT" >/dev/null
        runs+=("$(q -c "SELECT max(run_id) FROM ironwod.sync_runs WHERE tenant_id = '$t' AND gym_id = '$g' AND mode = 'backfill'")")
    done
    ok=0
    for r in "${runs[@]}"; do [ "$(wait_run "$r")" = succeeded ] && ok=$((ok + 1)); done
    result "$setup" "backfill wall" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    result "$setup" "backfill ok" "$ok"
    result "$setup" "backfill records" "$(q -c "SELECT sum(pulled) FROM ironwod.sync_run_entities WHERE run_id = ANY ('{$(IFS=,; echo "${runs[*]}")}')")"
    cpu_record "$setup" backfill "$@"
    phase_split "$setup" backfill "${runs[*]}"
    echo "bench-citus: $setup: $NGYMS backfills done at +$(( $(date +%s) - BEGAN )) s" >&2

    # A night passes; every gym's nightly incremental run, requested at once.
    local today
    today=$(curl -sf -X POST "$SIM_URL/_sim/advance?days=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["today"])')
    q -c "ALTER DATABASE postgres SET ironwod_metrics.today = '$today'" >/dev/null
    if [ "$setup" = citus ]; then
        # ALTER DATABASE is not propagated: the nodes evaluate the metrics too.
        for n in w1 w2; do
            psql -qAtX -h "$WORK" -p "${NODE_PORT[$n]}" -U postgres -d postgres \
                -c "ALTER DATABASE postgres SET ironwod_metrics.today = '$today'" >/dev/null
        done
    fi
    runs=()
    q -c 'SELECT pg_stat_reset()' >/dev/null
    cpu_mark "$@"
    t0=$(date +%s.%N)
    for i in $(seq 0 $((NGYMS - 1))); do
        t=$(tenant_uuid "$i")
        g=$(gym_uuid "$i")
        runs+=("$(q -c "BEGIN" -c "SELECT ironwod_set_scope('$t', '$g')" -c "SELECT ironwod_sync('$t', '$g', 'incremental')" -c "COMMIT" | sed -n 2p)")
    done
    ok=0
    for r in "${runs[@]}"; do [ "$(wait_run "$r")" = succeeded ] && ok=$((ok + 1)); done
    result "$setup" "nightly wall" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    result "$setup" "nightly ok" "$ok"
    result "$setup" "nightly records" "$(q -c "SELECT sum(pulled) FROM ironwod.sync_run_entities WHERE run_id = ANY ('{$(IFS=,; echo "${runs[*]}")}')")"
    cpu_record "$setup" nightly "$@"
    phase_split "$setup" nightly "${runs[*]}"

    # The dashboard read of one gym, as the app.
    t=$(tenant_uuid 0)
    g=$(gym_uuid 0)
    cat >"$WORK/read.sql" <<SQL
BEGIN;
SELECT ironwod_set_scope('$t', '$g');
SELECT count(*) FROM ironwod_dashboard('$t', '$g', (date_trunc('month', current_date) - interval '23 months')::date, current_date);
COMMIT;
SQL
    q -c "BEGIN" -c "SELECT ironwod_set_scope('$t', '$g')" \
      -c "SELECT count(*) FROM ironwod_dashboard('$t', '$g', (date_trunc('month', current_date) - interval '23 months')::date, current_date)" \
      -c "COMMIT" | sed -n 2p | { read -r months; result "$setup" "dashboard months" "$months"; }
    rm -f "$WORK"/pgbench_log.*
    (cd "$WORK" && "$PGBIN/pgbench" -n -U bench_app -f read.sql -t "$READS" -l postgres >/dev/null 2>&1)
    # per transaction: client, transaction, latency in microseconds, ...
    awk '{print $3}' "$WORK"/pgbench_log.* | sort -n | awk -v s="$setup" '
        { v[NR] = $1; sum += $1 }
        END { printf "%s|read p50 ms|%.2f\n%s|read p95 ms|%.2f\n%s|read mean ms|%.2f\n", s, v[int(NR * 0.5)] / 1000,
              s, v[int(NR * 0.95)] / 1000, s, sum / NR / 1000 }' >>"$WORK/results"

    # Where the data is: ironwod's tables on this server (on a coordinator, the
    # empty shells and the reference tables' local copies) and, on Citus, on each
    # worker node, shards included (Citus hides them from pg_class otherwise).
    result "$setup" "bytes $(basename "$1")" "$(q -c "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c
        WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind IN ('r', 'p')")"
    if [ "$setup" = citus ]; then
        for n in w1 w2; do
            result "$setup" "bytes $n" "$(psql -qAtX -h "$WORK" -p "${NODE_PORT[$n]}" -U postgres -d postgres \
                -c "SET citus.show_shards_for_app_name_prefixes = '*'" \
                -c "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c
                    WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind IN ('r', 'p')")"
        done
    fi
}

# 1. One node.
start_sim 11 "$NGYMS" "$SCALE" --rate 100000 --burst 100000
start_cluster ironwod "${SETTINGS[@]}"
measure single "$WORK/data"
stop_all

# 2. The same gyms on a coordinator and two workers (a fresh simulator, same seed).
start_sim 11 "$NGYMS" "$SCALE" --rate 100000 --burst 100000
start_node coord "${SETTINGS[@]}"
start_node w1
start_node w2
join_nodes coord w1 w2
measure citus "$WORK/coord" "$WORK/w1" "$WORK/w2"
stop_nodes
stop_all

# The table.
python3 - "$WORK/results" "$NGYMS" "$SCALE" "$READS" "$(nproc)" "$(( $(date +%s) - BEGAN ))" <<'PY'
import sys, time
path, ngyms, scale, reads, cores, took = sys.argv[1:]
r = {}
for line in open(path):
    setup, what, value = line.rstrip("\n").split("|")
    r[(setup, what)] = float(value) if value else 0.0
s = lambda w: r.get(("single", w), 0.0)
c = lambda w: r.get(("citus", w), 0.0)
def ratio(a, b):
    return f"{a / b:.2f}x" if b else "-"
print(f"ironwod bench-citus, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cores} cores, "
      f"{ngyms} {scale} gyms at once, every node on this machine (one run; ratios are the claims)")
print()
print("| | one node | Citus: coordinator + 2 workers | Citus / one node |")
print("|---|---|---|---|")
for phase in ("backfill", "nightly"):
    print(f"| {phase}: runs succeeded | {s(phase + ' ok'):.0f} / {ngyms} | {c(phase + ' ok'):.0f} / {ngyms} | |")
    print(f"| {phase}: records landed | {s(phase + ' records'):.0f} | {c(phase + ' records'):.0f} | |")
    print(f"| {phase}: wall s, all at once | {s(phase + ' wall'):.1f} | {c(phase + ' wall'):.1f} | "
          f"{ratio(c(phase + ' wall'), s(phase + ' wall'))} |")
    sc, cc = s(phase + " cpu data"), c(phase + " cpu coord")
    cw = c(phase + " cpu w1") + c(phase + " cpu w2")
    print(f"| {phase}: CPU s, coordinator (one node: all) | {sc:.1f} | {cc:.1f} | {ratio(cc, sc)} |")
    print(f"| {phase}: CPU s, workers (w1 + w2) | | {cw:.1f} ({c(phase + ' cpu w1'):.1f} + {c(phase + ' cpu w2'):.1f}) | |")
    print(f"| {phase}: CPU s, all servers | {sc:.1f} | {cc + cw:.1f} | {ratio(cc + cw, sc)} |")
    print(f"| {phase}: share of the cluster's CPU on the workers | | {100 * cw / (cc + cw) if cc + cw else 0:.0f} % | |")
    for w in ("landing s", "after landing s"):
        print(f"| {phase}: {w.replace('after landing', 'transform + refresh')} per run (mean) | {s(phase + ' ' + w):.2f} | "
              f"{c(phase + ' ' + w):.2f} | {ratio(c(phase + ' ' + w), s(phase + ' ' + w))} |")
    for w in ("transform s", "refresh s"):
        print(f"| {phase}: run workers' {w.split()[0]} s, all runs | {s(phase + ' ' + w):.2f} | {c(phase + ' ' + w):.2f} | "
              f"{ratio(c(phase + ' ' + w), s(phase + ' ' + w))} |")
for w in ("p50", "p95", "mean"):
    print(f"| dashboard read ({reads} x 24 months, as the app), {w} ms | {s('read ' + w + ' ms'):.2f} | "
          f"{c('read ' + w + ' ms'):.2f} | {ratio(c('read ' + w + ' ms'), s('read ' + w + ' ms'))} |")
mb = lambda b: b / 1048576
print(f"| ironwod data MB: one node / coordinator | {mb(s('bytes data')):.1f} | {mb(c('bytes coord')):.1f} | |")
print(f"| ironwod data MB: w1 / w2 | | {mb(c('bytes w1')):.1f} / {mb(c('bytes w2')):.1f} | |")
print()
n = float(ngyms)
for phase in ("backfill", "nightly"):
    cc = c(phase + " cpu coord")
    if cc:
        print(f"{phase}: {cc / n:.2f} coordinator CPU s per run, so one coordinator core drives about "
              f"{3600 * n / cc:.0f} such runs per hour; the workers did {100 * (c(phase + ' cpu w1') + c(phase + ' cpu w2')) / (cc + c(phase + ' cpu w1') + c(phase + ' cpu w2')):.0f} % of the cluster's CPU")
print(f"(bench-citus total {took} s)")
PY
