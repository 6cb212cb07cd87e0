#!/usr/bin/env bash
# `make bench`: measure, side by side in one run on one throwaway cluster, what the
# README's performance table reports.  One simulator gym per scale, synced with a
# fast simulator and fast workers so the numbers show ironwod's own cost, not
# Wodify's rate limit.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/test/setup.sh"
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"
SCALE=${BENCH_SCALE:-medium}

make -s -C "$REPO" all >/dev/null
WORK=$(mktemp -d /tmp/ironwod-bench.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
install_private
start_sim 11 1 "$SCALE" --rate 100000 --burst 100000
start_cluster ironwod "ironwod.requests_per_second = 2000" "ironwod.burst = 200" \
    "ironwod.cluster_requests_per_second = 5000"
psql -qX -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION ironwod'
register_dev_key >/dev/null

T=b0b0b0b0-0000-4000-8000-000000000001
G=b0b0b0b0-0000-4000-8000-0000000000aa
KEY=$(curl -sf "$SIM_URL/_sim/gyms" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gyms"][0]["api_key"])')

# All timings come from the server's clock (clock_timestamp), in milliseconds.
SEALED=$(printf %s "$KEY" | seal_key "$T" "$G")
psql -qAtX -v ON_ERROR_STOP=1 -v t="$T" -v g="$G" -v sealed="$SEALED" -v scale="$SCALE" <<'SQL'
\set QUIET on
BEGIN;
SELECT ironwod_set_scope(:'t', :'g') \g /dev/null
SELECT ironwod_connect(:'t', :'g', :'sealed'::bytea) \g /dev/null
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:'t', :'g') \g /dev/null
SELECT ironwod_wait((SELECT max(run_id) FROM ironwod.sync_runs WHERE mode = 'backfill'), '30 minutes') \g /dev/null
CREATE TEMP TABLE bench (what text, value numeric, unit text, ord serial);
-- The backfill as the worker measured it.
INSERT INTO bench (what, value, unit)
SELECT 'backfill: wall time', round(extract(epoch FROM finished_at - started_at)::numeric, 1), 's'
FROM ironwod.sync_runs WHERE mode = 'backfill';
INSERT INTO bench (what, value, unit)
SELECT 'backfill: HTTP requests', requests, '' FROM ironwod.sync_runs WHERE mode = 'backfill';
INSERT INTO bench (what, value, unit)
SELECT 'backfill: records landed', sum(pulled), '' FROM ironwod.sync_run_entities;
INSERT INTO bench (what, value, unit)
SELECT 'backfill: records per second', round(sum(s.pulled) / extract(epoch FROM max(r.finished_at) - min(r.started_at))::numeric), '/s'
FROM ironwod.sync_run_entities s JOIN ironwod.sync_runs r USING (tenant_id, gym_id, run_id) WHERE r.mode = 'backfill';

-- A second backfill of unchanged data: pure idempotent re-landing.
SELECT ironwod_sync(:'t', :'g', 'backfill') AS rerun \gset
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:'t', :'g') \g /dev/null
SELECT ironwod_wait(:rerun, '30 minutes') \g /dev/null
INSERT INTO bench (what, value, unit)
SELECT 're-backfill, nothing new: wall time', round(extract(epoch FROM finished_at - started_at)::numeric, 1), 's'
FROM ironwod.sync_runs WHERE run_id = :rerun;

-- Reading the dashboard (cache only) against computing the same months (refresh).
DO $$
DECLARE
    t0 timestamptz;
    n int := 200;
BEGIN
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP
        PERFORM count(*) FROM ironwod_dashboard(ironwod.scope_tenant(), ironwod.scope_gym(),
            (date_trunc('month', now()) - interval '11 months')::date, date_trunc('month', now())::date);
    END LOOP;
    INSERT INTO bench (what, value, unit)
    VALUES ('dashboard, 12 months from the cache (mean of 200)',
            round((extract(epoch FROM clock_timestamp() - t0) * 1000 / n)::numeric, 2), 'ms');
    t0 := clock_timestamp();
    PERFORM ironwod.refresh_metrics_all();
    INSERT INTO bench (what, value, unit)
    VALUES ('recomputing facts and cache for the whole history',
            round((extract(epoch FROM clock_timestamp() - t0) * 1000)::numeric), 'ms');
    t0 := clock_timestamp();
    PERFORM ironwod_replay(ironwod.scope_tenant(), ironwod.scope_gym());
    INSERT INTO bench (what, value, unit)
    VALUES ('replay from raw (canonical + facts + cache) with digest',
            round((extract(epoch FROM clock_timestamp() - t0) * 1000)::numeric), 'ms');
END
$$;
SELECT format('%-55s %10s %s', what, value, unit) FROM bench ORDER BY ord;
COMMIT;
SQL
echo "(scale $SCALE, $(nproc) cores; numbers from one run, on this machine)"
