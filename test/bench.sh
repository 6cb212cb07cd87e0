#!/usr/bin/env bash
# `make bench`: measure, side by side in one run on one throwaway cluster, what the
# README's performance table reports (issue 7).  The simulator answers unthrottled
# and ironwod's limiter GUCs are raised, so the numbers show ironwod's own cost, not
# Wodify's rate limit.  Every figure is taken in this run, on this machine: the
# claims are the ratios, not the absolute times.
#
#   BENCH_SCALES      the simulator scales to backfill one gym each (default
#                     "small medium large"; the growth exponent needs two or more)
#   BENCH_CONCURRENT  how many medium gyms request their nightly sync at once with
#                     ironwod.max_workers = 4 (default 8: more gyms than workers,
#                     so that workers serve several runs, ironwod.worker_idle_timeout)
#
# What each row means:
#   parse limit   PostgreSQL parsing the same pages (body::jsonb, one statement),
#                 pages rebuilt from the records the backfill landed, 100 per page
#   set-based     the plain peer: per page, INSERT ... SELECT jsonb_array_elements ...
#                 ON CONFLICT, one transaction per page, synchronous_commit off
#   landing       ironwod's run worker, the entities' wall time less the time spent
#                 waiting on HTTP (latency), the rate limiter and backoff, and planning
#   CPU columns   the same three by CPU time, which a busy 2-core machine moves far
#                 less than wall time: the parse limit's (its mean over three
#                 passes) and the peer's backend (/proc), and the run worker's
#                 CPU from its start to its last entity's completion, HTTP and
#                 planning included (so an upper bound of landing's own)
#   planning      sync_run_entities.plan_ms; transform and refresh: the worker's
#                 transform_step and refresh_metrics (pg_stat_user_functions)
#                 with track_functions = pl: these are plpgsql, and "all" would
#                 also time every call of ironwod's C functions (the transforms'
#                 field readers, row-level security's scope readers), two clock
#                 reads a call that a production server (default none) never pays
#   exponent      least-squares slope of log(time) over log(records landed)
#   memory        the run worker's VmHWM and RssAnon (/proc), sampled through the run
#   warm / cold   a run served by a worker that served an earlier run (warm caches)
#                 or by a worker's first run (a new backend's cold caches); the
#                 lone nightly run is always a worker's first
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/test/setup.sh"
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"
read -r -a SCALES <<<"${BENCH_SCALES:-small medium large}"
NCONC=${BENCH_CONCURRENT:-8}
T=b0b0b0b0-0000-4000-8000-000000000001
BEGAN=$(date +%s)

make -s -C "$REPO" all >/dev/null
WORK=$(mktemp -d /tmp/ironwod-bench.XXXXXX)
WATCHERS=()
cleanup() {
    for p in "${WATCHERS[@]}"; do kill "$p" 2>/dev/null || true; done
    stop_all
    rm -rf "$WORK"
}
trap cleanup EXIT
install_private
# Gym i of the simulator: one per scale, then the medium gyms of the concurrent run,
# then one more medium gym, whose nightly run follows the lone nightly run in the
# worker that served it (a worker's next run, on warm caches).
NGYMS=$((${#SCALES[@]} + NCONC + 1))
WARM=$((${#SCALES[@]} + NCONC))
SIM_SCALES=$(IFS=,; echo "${SCALES[*]},medium")
start_sim 11 "$NGYMS" "$SIM_SCALES" --rate 100000 --burst 100000
start_cluster 'ironwod,pg_stat_statements' "ironwod.requests_per_second = 2000" "ironwod.burst = 200" \
    "ironwod.cluster_requests_per_second = 5000" "ironwod.max_workers = 4" "track_functions = pl" \
    "ironwod.naptime = 500"
psql -qX -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION ironwod' -c 'CREATE EXTENSION pg_stat_statements'
register_dev_key >/dev/null
GYMS_JSON=$(curl -sf "$SIM_URL/_sim/gyms")
gym_uuid() { printf 'b0b0b0b0-0000-4000-8000-%012d' "$1"; }
gym_key() { printf '%s' "$GYMS_JSON" | python3 -c "import json,sys; print(json.load(sys.stdin)['gyms'][$1]['api_key'])"; }

q() { psql -qAtX -v ON_ERROR_STOP=1 "$@"; }
q <<'SQL'
CREATE TABLE public.bench (ord serial, section text, what text, scale text, records bigint, seconds numeric,
                           value numeric, unit text);
CREATE TABLE public.bench_pages (entity text, records_key text, n integer, body text);
CREATE TABLE public.bench_peer (entity text, wodify_id bigint, payload jsonb, PRIMARY KEY (entity, wodify_id));
CREATE TABLE public.bench_units (section text, scale text, entity text, units bigint, pages bigint, one_page bigint);
SQL

# watch_mem RUN OUT: samples of the run worker while the run lasts, one line each:
# epoch, VmHWM kB, RssAnon kB, CPU ticks (user + system).
watch_mem() {
    local run=$1 out=$2 pid="" hwm anon cpu
    : >"$out"
    for _ in $(seq 1 6000); do
        pid=$(q -c "SELECT worker_pid FROM ironwod.sync_runs WHERE run_id = $run AND status = 'running'")
        [ -n "$pid" ] && break
        [ "$(q -c "SELECT status IN ('succeeded', 'failed', 'cancelled') FROM ironwod.sync_runs WHERE run_id = $run")" = t ] && break
        sleep 0.05
    done
    while [ -n "$pid" ] && [ -r "/proc/$pid/status" ]; do
        hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        anon=$(awk '/^RssAnon/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        cpu=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || true)
        [ -n "$hwm" ] && [ -n "$anon" ] && [ -n "$cpu" ] && echo "$(date +%s.%N) $hwm $anon $cpu" >>"$out"
        sleep 0.05
    done
}

# run_figures RUN SCALE SECTION MEMFILE: landing, planning, transform and refresh of
# one finished run (the function statistics were reset before it started).
run_figures() {
    local run=$1 scale=$2 section=$3 mem=$4
    wait_run_workers_gone
    q -v run="$run" -v scale="$scale" -v section="$section" -v mem="$mem" -v hz="$(getconf CLK_TCK)" <<'SQL'
CREATE TEMP TABLE mem (at double precision, hwm bigint, anon bigint, cpu bigint);
\set cmd 'COPY mem FROM ' :'mem' ' WITH (DELIMITER '' '')'
:cmd;
WITH e AS (
    SELECT sum(pulled) AS records,
           sum(extract(epoch FROM completed_at - started_at)) - sum(latency_ms) / 1000 - sum(token_wait_s)
           - sum(backoff_s) - coalesce(sum(plan_ms), 0) / 1000 AS landing_s,
           coalesce(sum(plan_ms), 0) / 1000 AS plan_s, sum(latency_ms) / 1000 AS http_s
    FROM ironwod.sync_run_entities WHERE run_id = :run
), f AS (
    SELECT coalesce(sum(total_time) FILTER (WHERE funcname = 'transform_step'), 0) / 1000 AS transform_s,
           coalesce(sum(total_time) FILTER (WHERE funcname = 'refresh_metrics'), 0) / 1000 AS refresh_s
    FROM pg_stat_user_functions WHERE schemaname = 'ironwod'
), r AS (
    SELECT extract(epoch FROM finished_at - started_at) AS wall_s, requests, status,
           (SELECT extract(epoch FROM max(completed_at)) FROM ironwod.sync_run_entities WHERE run_id = :run) AS landed_at
    FROM ironwod.sync_runs WHERE run_id = :run
), m AS (
    SELECT max(mem.hwm) / 1024.0 AS hwm, max(mem.anon) FILTER (WHERE mem.at <= r.landed_at) / 1024.0 AS anon_land,
           max(mem.anon) FILTER (WHERE mem.at > r.landed_at) / 1024.0 AS anon_after,
           (max(mem.cpu) - min(mem.cpu))::numeric / :hz AS cpu_s,
           (max(mem.cpu) FILTER (WHERE mem.at <= r.landed_at) - min(mem.cpu))::numeric / :hz AS cpu_land_s
    FROM mem, r
)
INSERT INTO bench (section, what, scale, records, seconds, value, unit)
SELECT :'section', x.what, :'scale', e.records, x.s, x.v, x.u
FROM e, f, r, m, LATERAL (VALUES
    ('wall', r.wall_s, NULL::numeric, NULL::text),
    ('http', e.http_s, r.requests, 'requests'),
    ('landing', e.landing_s, e.records / nullif(e.landing_s, 0), 'rec/s'),
    ('landing cpu', m.cpu_land_s, e.records / nullif(m.cpu_land_s, 0), 'rec/CPU s'),
    ('planning', e.plan_s, 100 * e.plan_s / nullif(e.landing_s, 0), '% of landing'),
    ('transform', f.transform_s, 100 * f.transform_s / nullif(r.wall_s, 0), '% of wall'),
    ('refresh', f.refresh_s, e.records / nullif(f.refresh_s, 0), 'rec/s'),
    ('own', e.landing_s + e.plan_s + f.transform_s + f.refresh_s, NULL, NULL),
    ('cpu', m.cpu_s, NULL, 'worker CPU s'),
    ('VmHWM', NULL, round(m.hwm, 1), 'MB'),
    ('RssAnon landing', NULL, round(m.anon_land, 1), 'MB'),
    ('RssAnon transform+refresh', NULL, round(m.anon_after, 1), 'MB'),
    ('status', NULL, CASE r.status WHEN 'succeeded' THEN 1 ELSE 0 END, r.status)) AS x(what, s, v, u);
-- the run's shape: units of work and pages per unit, by entity
INSERT INTO bench_units
SELECT :'section', :'scale', u.entity, count(*), sum(u.pages), count(*) FILTER (WHERE u.pages = 1)
FROM ironwod.run_units u WHERE u.run_id = :run AND u.status = 'done'
GROUP BY u.entity;
SQL
}

# connect_gym I: connect simulator gym I; prints the backfill run id.
connect_gym() {
    local g key sealed
    g=$(gym_uuid "$1")
    key=$(gym_key "$1")
    # sealed outside PostgreSQL: the plaintext key never reaches the server
    sealed=$(printf %s "$key" | seal_key "$T" "$g")
    q <<SQL
BEGIN;
SELECT ironwod_set_scope('$T', '$g') \g /dev/null
SELECT ironwod_connect('$T', '$g', '$sealed'::bytea) \g /dev/null
COMMIT;
SELECT max(run_id) FROM ironwod.sync_runs WHERE gym_id = '$g' AND mode = 'backfill';
SQL
}
wait_run() {
    local g
    g=$(q -c "SELECT gym_id FROM ironwod.sync_runs WHERE run_id = $1")
    q -c "BEGIN" -c "SELECT ironwod_set_scope('$T', '$g')" -c "SELECT ironwod_wait($1, '30 minutes')" -c "COMMIT" >/dev/null
}

# peers SCALE GYM: rebuild the gym's landed records as pages, time the parse-only
# limit and the set-based peer on them.
peers() {
    q -v g="$2" -v scale="$1" -v hz="$(getconf CLK_TCK)" <<'SQL'
SET synchronous_commit = off;
TRUNCATE bench_pages, bench_peer;
SELECT set_config('bench.gym', :'g', false) \g /dev/null
DO $$
DECLARE
    e record;
BEGIN
    FOR e IN SELECT entity, raw_table, records_key FROM ironwod.entities ORDER BY ordinal LOOP
        EXECUTE format($q$
            INSERT INTO bench_pages (entity, records_key, n, body)
            SELECT %1$L, %2$L, count(*), '{"' || %2$L || '": [' || string_agg(x.payload_json::text, ', ' ORDER BY x.wodify_id)
                   || '], "pagination": {"page": ' || x.p || ', "page_size": 100}}'
            FROM (SELECT r.wodify_id, r.payload_json, (row_number() OVER (ORDER BY r.wodify_id) - 1) / 100 + 1 AS p
                  FROM ironwod.%3$I r WHERE r.gym_id = %4$L) x
            GROUP BY x.p$q$, e.entity, e.records_key, e.raw_table, current_setting('bench.gym'));
    END LOOP;
END
$$;
VACUUM ANALYZE bench_pages;
SELECT pg_backend_pid() AS pid \gset
\setenv PID :pid
-- The parse limit: every page's body through the jsonb parser, nothing written.
SELECT clock_timestamp() AS t0 \gset
\set cpu0 `awk '{print $14 + $15}' /proc/$PID/stat`
SELECT sum(jsonb_array_length((body::jsonb) -> records_key)) AS n FROM bench_pages \gset
SELECT extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) AS wall \gset
-- twice more for its CPU time: a small gym's parse is a few clock ticks
SELECT sum(jsonb_array_length((body::jsonb) -> records_key)) FROM bench_pages \g /dev/null
SELECT sum(jsonb_array_length((body::jsonb) -> records_key)) FROM bench_pages \g /dev/null
\set cpu1 `awk '{print $14 + $15}' /proc/$PID/stat`
INSERT INTO bench (section, what, scale, records, seconds, value, unit)
SELECT 'peers', x.what, :'scale', :n, x.s, :n / nullif(x.s, 0), x.u
FROM (VALUES ('parse limit', :wall::numeric, 'rec/s'),
             ('parse limit cpu', (:cpu1 - :cpu0)::numeric / :hz / 3, 'rec/CPU s')) AS x(what, s, u);
-- The set-based peer: one INSERT ... SELECT jsonb_array_elements ... ON CONFLICT per
-- page, each page its own transaction.
SELECT clock_timestamp() AS t0 \gset
\set cpu0 `awk '{print $14 + $15}' /proc/$PID/stat`
DO $$
DECLARE
    p record;
BEGIN
    FOR p IN SELECT entity, records_key, body FROM bench_pages ORDER BY entity, n LOOP
        INSERT INTO bench_peer AS b (entity, wodify_id, payload)
        SELECT p.entity, (r ->> 'id')::bigint, r FROM jsonb_array_elements((p.body::jsonb) -> p.records_key) AS r
        ON CONFLICT (entity, wodify_id) DO UPDATE SET payload = excluded.payload
        WHERE b.payload IS DISTINCT FROM excluded.payload;
        COMMIT;
    END LOOP;
END
$$;
\set cpu1 `awk '{print $14 + $15}' /proc/$PID/stat`
INSERT INTO bench (section, what, scale, records, seconds, value, unit)
SELECT 'peers', x.what, :'scale', :n, x.s, :n / nullif(x.s, 0), x.u
FROM (VALUES ('set-based', extract(epoch FROM clock_timestamp() - :'t0'::timestamptz), 'rec/s'),
             ('set-based cpu', (:cpu1 - :cpu0)::numeric / :hz, 'rec/CPU s')) AS x(what, s, u);
SQL
}

# recompute SCALE GYM: a full metrics recompute (refresh_metrics_all) as the run
# worker's role, in a session of its own: its CPU time (robust on a busy machine),
# wall time and peak private memory (RssAnon, sampled).
recompute() {
    q -v scale="$1" -v g="$2" -v T="$T" -v work="$WORK" -v hz="$(getconf CLK_TCK)" <<'SQL'
SELECT pg_backend_pid() AS pid \gset
\setenv PID :pid
\setenv W :work
\! rm -f "$W/stop"; echo 0 >"$W/peak"; (while [ ! -f "$W/stop" ]; do a=$(awk '/^RssAnon/ {print $2}' /proc/$PID/status); [ "$a" -gt "$(cat "$W/peak")" ] && echo "$a" >"$W/peak"; sleep 0.02; done) >/dev/null 2>&1 &
\set cpu0 `awk '{print $14 + $15}' /proc/$PID/stat`
BEGIN;
SELECT ironwod_set_scope(:'T', :'g') \g /dev/null
SET LOCAL ROLE ironwod_worker;
SELECT clock_timestamp() AS t0 \gset
SELECT ironwod.refresh_metrics_all() \g /dev/null
SELECT extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) AS wall \gset
COMMIT;
\set cpu1 `awk '{print $14 + $15}' /proc/$PID/stat`
\! touch "$W/stop"; sleep 0.1
\set peak `cat "$W/peak"`
INSERT INTO bench (section, what, scale, records, seconds, value, unit)
SELECT 'recompute', x.what, :'scale', b.records, x.s, x.v, x.u
FROM (SELECT records FROM bench WHERE section = 'backfill' AND what = 'landing' AND scale = :'scale') b,
     LATERAL (VALUES ('cpu', (:cpu1 - :cpu0)::numeric / :hz, :wall::numeric, 'wall s'),
                     ('RssAnon', NULL, round(:peak / 1024.0, 1), 'MB')) AS x(what, s, v, u);
SQL
}

# nightly_run GYM SECTION: GYM's nightly incremental run, alone, with the function
# statistics reset before it and the worker's memory sampled through it; its figures
# go to the bench table as SECTION (a medium gym's).  Sets RUN to its run id rather
# than printing it: the memory watcher must be this shell's child to be stopped.
nightly_run() {
    local g=$1 section=$2 watcher
    q -c "SELECT pg_stat_reset()" >/dev/null
    RUN=$(q -c "BEGIN" -c "SELECT ironwod_set_scope('$T', '$g')" -c "SELECT ironwod_sync('$T', '$g', 'incremental')" -c "COMMIT" | sed -n 2p)
    watch_mem "$RUN" "$WORK/mem.$RUN" &
    watcher=$!
    wait_run "$RUN"
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
    run_figures "$RUN" medium "$section" "$WORK/mem.$RUN" >/dev/null
}

# 1. The medium gyms of the concurrent run, backfilled one after the other (first:
# see "Known problem" in the README's performance section).
for j in $(seq 0 "$NCONC"); do
    wait_run "$(connect_gym $((${#SCALES[@]} + j)))"
done
echo "bench: $((NCONC + 1)) medium backfills done at +$(( $(date +%s) - BEGAN )) s" >&2

# 2. One gym per scale, one after the other: backfill, then the peers on its pages.
for i in "${!SCALES[@]}"; do
    scale=${SCALES[$i]}
    q -c "SELECT pg_stat_reset()" >/dev/null
    run=$(connect_gym "$i")
    watch_mem "$run" "$WORK/mem.$run" &
    watcher=$!
    wait_run "$run"
    # a worker that serves the next run outlives this one: sample this run only
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
    run_figures "$run" "$scale" backfill "$WORK/mem.$run" >/dev/null
    peers "$scale" "$(gym_uuid "$i")"
    recompute "$scale" "$(gym_uuid "$i")"
    echo "bench: $scale backfill done at +$(( $(date +%s) - BEGAN )) s" >&2
done

# 3. A night passes (the simulator moves one day on; metrics see the same day), then
# a medium gym's nightly incremental run, alone.
TODAY=$(curl -sf -X POST "$SIM_URL/_sim/advance?days=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["today"])')
q -c "ALTER DATABASE postgres SET ironwod_metrics.today = '$TODAY'" >/dev/null
MEDIUM=-1
for i in "${!SCALES[@]}"; do [ "${SCALES[$i]}" = medium ] && MEDIUM=$i; done
if [ "$MEDIUM" -ge 0 ]; then
    g=$(gym_uuid "$MEDIUM")
    # a worker's first run, on a new backend's cold caches: no worker is left to serve it
    q <<'SQL'
DO $w$
BEGIN
    FOR i IN 1..12000 LOOP
        EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'ironwod run');
        PERFORM pg_stat_clear_snapshot();
        PERFORM ironwod.wait_for_change(50);
    END LOOP;
END
$w$;
SQL
    nightly_run "$g" nightly
    lone=$RUN
    # 3b. Another medium gym's nightly run, alone, right after: the worker that served
    # the lone nightly run serves it too (ironwod.worker_idle_timeout, 5 s), warm.
    nightly_run "$(gym_uuid "$WARM")" 'nightly warm'
    SAME_WORKER=$(q -c "SELECT a.worker_pid = b.worker_pid FROM ironwod.sync_runs a, ironwod.sync_runs b WHERE a.run_id = $lone AND b.run_id = $RUN")
fi

# 4. The concurrent medium gyms' nightly runs, all requested at once (none with
# BENCH_CONCURRENT=0, and then the table has no gyms-per-hour line).
if [ "$NCONC" -gt 0 ]; then
    START=$(q -c "SELECT clock_timestamp()")
    CONC_RUNS=()
    for j in $(seq 0 $((NCONC - 1))); do
        g=$(gym_uuid $((${#SCALES[@]} + j)))
        CONC_RUNS+=("$(q -c "BEGIN" -c "SELECT ironwod_set_scope('$T', '$g')" -c "SELECT ironwod_sync('$T', '$g', 'incremental')" -c "COMMIT" | sed -n 2p)")
    done
    for r in "${CONC_RUNS[@]}"; do wait_run "$r"; done
    q -v start="$START" -v runs="{$(IFS=,; echo "${CONC_RUNS[*]}")}" -v n="$NCONC" <<'SQL'
INSERT INTO bench (section, what, scale, records, seconds, value, unit)
SELECT 'concurrent', 'nightly runs', 'medium', (SELECT sum(pulled) FROM ironwod.sync_run_entities WHERE run_id = ANY (:'runs'::bigint[])),
       s, :n * 3600 / nullif(s, 0), 'gyms/hour'
FROM (SELECT extract(epoch FROM max(finished_at) - :'start'::timestamptz) AS s,
             count(*) FILTER (WHERE status = 'succeeded') AS ok
      FROM ironwod.sync_runs WHERE run_id = ANY (:'runs'::bigint[])) x;
-- Planning as a share of landing, for the runs that were a worker's first (no earlier
-- run of the same worker pid) and for those that were not.
WITH r AS (
    SELECT r.run_id, NOT EXISTS (SELECT 1 FROM ironwod.sync_runs o
                                 WHERE o.worker_pid = r.worker_pid AND o.started_at < r.started_at) AS first
    FROM ironwod.sync_runs r WHERE r.run_id = ANY (:'runs'::bigint[]) AND r.status = 'succeeded'
), e AS (
    SELECT r.run_id, r.first,
           (sum(extract(epoch FROM completed_at - started_at)) - sum(latency_ms) / 1000 - sum(token_wait_s)
            - sum(backoff_s) - coalesce(sum(plan_ms), 0) / 1000)::numeric AS landing_s,
           (coalesce(sum(plan_ms), 0) / 1000)::numeric AS plan_s
    FROM r JOIN ironwod.sync_run_entities s ON s.run_id = r.run_id
    GROUP BY r.run_id, r.first
)
INSERT INTO bench (section, what, scale, records, seconds, value, unit)
SELECT 'concurrent', CASE WHEN first THEN 'planning cold' ELSE 'planning warm' END, 'medium', count(*),
       sum(plan_s), 100 * sum(plan_s) / nullif(sum(landing_s), 0), format('%s ms planning of %s ms landing, median run %s %%',
       round(1000 * sum(plan_s) / count(*), 1), round(1000 * sum(landing_s) / count(*), 1),
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY 100 * plan_s / nullif(landing_s, 0))::numeric, 1))
FROM e GROUP BY first;
SQL
fi

# The table.
q -v began="$BEGAN" -v cores="$(nproc)" -v nconc="$NCONC" -v same="${SAME_WORKER:-}" <<'SQL'
\pset format unaligned
\pset tuples_only on
-- least-squares slope of log(seconds) over log(records), per stage
CREATE TEMP VIEW fit AS
SELECT CASE WHEN section = 'recompute' THEN 'recompute' ELSE what END AS what,
       regr_slope(ln(seconds), ln(records)) AS exponent, count(*) AS n
FROM bench WHERE ((section = 'backfill' AND what IN ('planning', 'transform', 'refresh', 'landing'))
                  OR (section = 'recompute' AND what = 'cpu')) AND seconds > 0
GROUP BY 1;
SELECT format('ironwod bench, %s, %s cores, simulator unthrottled (one run; ratios are the claims)',
              to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"'), :cores);
SELECT '';
SELECT '| path, same pages (records landed by the backfill) | scale | records | s | records/s | vs parse limit | CPU s | records per CPU s | vs parse limit, CPU |';
SELECT '|---|---|---|---|---|---|---|---|---|';
SELECT format('| %s | %s | %s | %s | %s | %s | %s | %s | %s |', x.what, x.scale, x.records, round(x.seconds, 2),
              round(x.value), round(x.value / p.value, 2), round(c.seconds, 2), round(c.value),
              round(c.value / pc.value, 2))
FROM (SELECT b.*, CASE b.what WHEN 'parse limit' THEN 1 WHEN 'set-based' THEN 2 ELSE 3 END AS k
      FROM bench b WHERE (b.section = 'peers' AND b.what IN ('parse limit', 'set-based'))
                      OR (b.section = 'backfill' AND b.what = 'landing')) x
JOIN bench p ON p.section = 'peers' AND p.what = 'parse limit' AND p.scale = x.scale
LEFT JOIN bench c ON c.section = x.section AND c.scale = x.scale AND c.what = x.what || ' cpu'
LEFT JOIN bench pc ON pc.section = 'peers' AND pc.what = 'parse limit cpu' AND pc.scale = x.scale
ORDER BY x.records, x.k;
SELECT '';
SELECT '| run | records | wall s | HTTP s (requests) | landing s | planning s (% of landing) | transform s (% of wall) | refresh s | worker CPU s | worker VmHWM MB | worker RssAnon MB, landing / transform+refresh |';
SELECT '|---|---|---|---|---|---|---|---|---|---|---|';
SELECT format('| %s %s | %s | %s | %s (%s) | %s | %s (%s %%) | %s (%s %%) | %s | %s | %s | %s / %s |', w.scale,
              CASE w.section WHEN 'nightly' THEN 'nightly (a worker''s first run)'
                             WHEN 'nightly warm' THEN CASE WHEN :'same' = 't' THEN 'nightly (the same worker''s next run)'
                                                           ELSE 'nightly (not the same worker: cold too)' END
                             ELSE w.section END,
              w.records, round(w.seconds, 1), round(h.seconds, 1), h.value, round(l.seconds, 2), round(p.seconds, 2),
              round(p.value, 1), round(t.seconds, 2), round(t.value, 1), round(r.seconds, 2), round(c.seconds, 1),
              m.value, a.value, a2.value)
FROM bench w
JOIN bench h ON h.section = w.section AND h.scale = w.scale AND h.what = 'http'
JOIN bench l ON l.section = w.section AND l.scale = w.scale AND l.what = 'landing'
JOIN bench p ON p.section = w.section AND p.scale = w.scale AND p.what = 'planning'
JOIN bench t ON t.section = w.section AND t.scale = w.scale AND t.what = 'transform'
JOIN bench r ON r.section = w.section AND r.scale = w.scale AND r.what = 'refresh'
JOIN bench c ON c.section = w.section AND c.scale = w.scale AND c.what = 'cpu'
JOIN bench m ON m.section = w.section AND m.scale = w.scale AND m.what = 'VmHWM'
JOIN bench a ON a.section = w.section AND a.scale = w.scale AND a.what = 'RssAnon landing'
JOIN bench a2 ON a2.section = w.section AND a2.scale = w.scale AND a2.what = 'RssAnon transform+refresh'
WHERE w.section IN ('backfill', 'nightly', 'nightly warm') AND w.what = 'wall'
ORDER BY w.section, w.records;
SELECT format('| growth exponent k (time ~ records^k) over %s backfills | | | | %s | %s | %s | %s | | | |', max(n),
              round(max(exponent) FILTER (WHERE what = 'landing')::numeric, 2),
              round(max(exponent) FILTER (WHERE what = 'planning')::numeric, 2),
              round(max(exponent) FILTER (WHERE what = 'transform')::numeric, 2),
              round(max(exponent) FILTER (WHERE what = 'refresh')::numeric, 2))
FROM fit HAVING max(n) >= 2;
SELECT '';
SELECT '| full metrics recompute (refresh_metrics_all as the worker role, after the backfill) | records | CPU s | wall s | records per CPU s | peak RssAnon MB |';
SELECT '|---|---|---|---|---|---|';
SELECT format('| %s | %s | %s | %s | %s | %s |', c.scale, c.records, round(c.seconds, 2), round(c.value, 2),
              round(c.records / nullif(c.seconds, 0)), m.value)
FROM bench c JOIN bench m ON m.section = 'recompute' AND m.what = 'RssAnon' AND m.scale = c.scale
WHERE c.section = 'recompute' AND c.what = 'cpu'
ORDER BY c.records;
SELECT format('| growth exponent k (CPU ~ records^k) over %s scales | | %s | | | |', n, round(exponent::numeric, 2))
FROM fit WHERE what = 'recompute' AND n >= 2;
SELECT '';
SELECT format('medium gym nightly incremental: %s s wall, %s s ironwod''s own (landing %s + planning %s + transform %s + refresh %s; worker CPU %s s), %s requests',
              round(w.seconds, 2), round(o.seconds, 2), round(l.seconds, 2), round(p.seconds, 2), round(t.seconds, 2),
              round(r.seconds, 2), round(c.seconds, 2), h.value)
FROM bench w
JOIN bench o ON o.section = 'nightly' AND o.what = 'own'
JOIN bench l ON l.section = 'nightly' AND l.what = 'landing'
JOIN bench p ON p.section = 'nightly' AND p.what = 'planning'
JOIN bench t ON t.section = 'nightly' AND t.what = 'transform'
JOIN bench r ON r.section = 'nightly' AND r.what = 'refresh'
JOIN bench h ON h.section = 'nightly' AND h.what = 'http'
JOIN bench c ON c.section = 'nightly' AND c.what = 'cpu'
WHERE w.section = 'nightly' AND w.what = 'wall';
SELECT format('lone medium nightly runs, planning / landing: a worker''s first run %s / %s ms (%s %%), %s %s / %s ms (%s %%)',
              round(1000 * c.seconds, 1), round(1000 * cl.seconds, 1), round(c.value, 1),
              CASE WHEN :'same' = 't' THEN 'the same worker''s next run' ELSE 'another worker''s first run' END,
              round(1000 * w.seconds, 1), round(1000 * wl.seconds, 1), round(w.value, 1))
FROM bench c
JOIN bench cl ON cl.section = 'nightly' AND cl.what = 'landing'
JOIN bench w ON w.section = 'nightly warm' AND w.what = 'planning'
JOIN bench wl ON wl.section = 'nightly warm' AND wl.what = 'landing'
WHERE c.section = 'nightly' AND c.what = 'planning';
SELECT format('%s medium gyms'' nightly runs requested at once, ironwod.max_workers = 4: %s s, so %s gyms kept current per hour on this box',
              :nconc, round(seconds, 1), round(value))
FROM bench WHERE section = 'concurrent' AND what = 'nightly runs';
SELECT format('of those, %s run(s) %s: planning %s %% of landing (per run %s)', records,
              CASE what WHEN 'planning cold' THEN 'on a worker''s first run (cold caches)'
                        ELSE 'on a worker that had served a run before (warm)' END,
              round(value, 1), unit)
FROM bench WHERE section = 'concurrent' AND what LIKE 'planning %' ORDER BY what;
SELECT '';
SELECT format('units of work (pages, one-page units): %s', string_agg(x.s, '; ' ORDER BY x.section, x.n))
FROM (SELECT section, sum(units) AS n,
             format('%s %s %s (%s, %s one-page; class sign-ins %s (%s, %s))', scale, section, sum(units), sum(pages),
                    sum(one_page), sum(units) FILTER (WHERE entity = 'class_signins'),
                    sum(pages) FILTER (WHERE entity = 'class_signins'),
                    sum(one_page) FILTER (WHERE entity = 'class_signins')) AS s
      FROM bench_units GROUP BY section, scale) x;
SELECT format('(bench total %s s)', extract(epoch FROM now())::bigint - :began);
SQL
