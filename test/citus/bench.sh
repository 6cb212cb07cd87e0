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
T=c1c1c1c1-0000-4000-8000-000000000001
BEGAN=$(date +%s)

citus_find || { echo "SKIP: no Citus installed and no Citus source (set CITUS_TARBALL or put citus-12.1.12.tar.gz in ../shared/vendor)"; exit 0; }
make -s all >/dev/null
WORK=$(mktemp -d /tmp/ironwod-bench-citus.XXXXXX)
trap 'stop_nodes; stop_all; rm -rf "$WORK"' EXIT
install_private
install_citus_private
: >"$WORK/results"

SETTINGS=("ironwod.requests_per_second = 2000" "ironwod.burst = 200" "ironwod.cluster_requests_per_second = 5000"
          "ironwod.max_workers = 4" "ironwod.naptime = 500")
gym_uuid() { printf 'c1c1c1c1-0000-4000-8000-%012d' "$1"; }
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
    local g
    g=$(q -c "SELECT gym_id FROM ironwod.sync_runs WHERE run_id = $1")
    q -c "BEGIN" -c "SELECT ironwod_set_scope('$T', '$g')" -c "SELECT ironwod_wait($1, '30 minutes')" -c "COMMIT" | sed -n 2p
}

# measure SETUP DATADIR...: the whole measurement against the server PGHOST/PGPORT
# name (one node, or the Citus coordinator); DATADIRs are the servers to count.
measure() {
    local setup=$1 i g key sealed runs=() r t0 ok start
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
    cpu_mark "$@"
    t0=$(date +%s.%N)
    for i in $(seq 0 $((NGYMS - 1))); do
        g=$(gym_uuid "$i")
        key=$(printf '%s' "$gyms_json" | python3 -c "import json,sys; print(json.load(sys.stdin)['gyms'][$i]['api_key'])")
        sealed=$(printf %s "$key" | seal_key "$T" "$g")
        q -c "BEGIN" -c "SELECT ironwod_set_scope('$T', '$g')" -c "SELECT ironwod_connect('$T', '$g', '$sealed'::bytea)" -c "COMMIT" >/dev/null
        runs+=("$(q -c "SELECT max(run_id) FROM ironwod.sync_runs WHERE gym_id = '$g' AND mode = 'backfill'")")
    done
    ok=0
    for r in "${runs[@]}"; do [ "$(wait_run "$r")" = succeeded ] && ok=$((ok + 1)); done
    result "$setup" "backfill wall" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    result "$setup" "backfill ok" "$ok"
    result "$setup" "backfill records" "$(q -c "SELECT sum(pulled) FROM ironwod.sync_run_entities WHERE run_id = ANY ('{$(IFS=,; echo "${runs[*]}")}')")"
    cpu_record "$setup" backfill "$@"
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
    cpu_mark "$@"
    t0=$(date +%s.%N)
    for i in $(seq 0 $((NGYMS - 1))); do
        g=$(gym_uuid "$i")
        runs+=("$(q -c "BEGIN" -c "SELECT ironwod_set_scope('$T', '$g')" -c "SELECT ironwod_sync('$T', '$g', 'incremental')" -c "COMMIT" | sed -n 2p)")
    done
    ok=0
    for r in "${runs[@]}"; do [ "$(wait_run "$r")" = succeeded ] && ok=$((ok + 1)); done
    result "$setup" "nightly wall" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    result "$setup" "nightly ok" "$ok"
    result "$setup" "nightly records" "$(q -c "SELECT sum(pulled) FROM ironwod.sync_run_entities WHERE run_id = ANY ('{$(IFS=,; echo "${runs[*]}")}')")"
    cpu_record "$setup" nightly "$@"

    # The dashboard read of one gym, as the app.
    g=$(gym_uuid 0)
    cat >"$WORK/read.sql" <<SQL
BEGIN;
SELECT ironwod_set_scope('$T', '$g');
SELECT count(*) FROM ironwod_dashboard('$T', '$g', (date_trunc('month', current_date) - interval '23 months')::date, current_date);
COMMIT;
SQL
    q -c "BEGIN" -c "SELECT ironwod_set_scope('$T', '$g')" \
      -c "SELECT count(*) FROM ironwod_dashboard('$T', '$g', (date_trunc('month', current_date) - interval '23 months')::date, current_date)" \
      -c "COMMIT" | sed -n 2p | { read -r months; result "$setup" "dashboard months" "$months"; }
    rm -f "$WORK"/pgbench_log.*
    (cd "$WORK" && "$PGBIN/pgbench" -n -U bench_app -f read.sql -t "$READS" -l postgres >/dev/null 2>&1)
    # per transaction: client, transaction, latency in microseconds, ...
    awk '{print $3}' "$WORK"/pgbench_log.* | sort -n | awk -v s="$setup" '
        { v[NR] = $1; sum += $1 }
        END { printf "%s|read p50 ms|%.2f\n%s|read p95 ms|%.2f\n%s|read mean ms|%.2f\n", s, v[int(NR * 0.5)] / 1000,
              s, v[int(NR * 0.95)] / 1000, s, sum / NR / 1000 }' >>"$WORK/results"

    # Where the data is: ironwod's relations on each server.
    local d port
    for d in "$@"; do
        port=$(sed -n 's/^port = //p' "$d/postgresql.conf" | tail -1)
        result "$setup" "bytes $(basename "$d")" "$(psql -qAtX -h "$WORK" -p "$port" -U postgres -d postgres -c \
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c
             WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind IN ('r', 'p')")"
    done
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
