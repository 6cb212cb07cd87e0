#!/usr/bin/env bash
# `make demo`: a demo gym synced from the simulator into a throwaway cluster with
# pg_cron and ironwod preloaded.  Each demo lives in a work directory of its own
# (/tmp/ironwod-demo.XXXXXX), so several can run at once and none touches
# another's; it keeps running afterwards so you can look around, and the last
# lines say how to stop exactly this one:
#
#   bash test/demo.sh stop /tmp/ironwod-demo.XXXXXX
#
# which stops its server and simulator and deletes its directory.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
MARK=.ironwod-demo

# stop DIR: only a directory this script made (it holds the marker file).
if [ "${1:-}" = stop ]; then
    dir=${2:?usage: bash test/demo.sh stop DIR (the directory the demo printed)}
    dir=${dir%/}
    if [ ! -f "$dir/$MARK" ]; then
        echo "$dir is not an ironwod demo directory (no $MARK in it); nothing stopped" >&2
        exit 1
    fi
    if [ -f "$dir/data/postmaster.pid" ]; then
        su postgres -s /bin/sh -c "'$dir/pg/usr/lib/postgresql/15/bin/pg_ctl' -D '$dir/data' -m fast -w stop" >/dev/null
    fi
    if [ -f "$dir/sim.pid" ]; then
        kill "$(cat "$dir/sim.pid")" 2>/dev/null || true
    fi
    rm -rf "$dir"
    echo "demo in $dir stopped and removed"
    exit 0
fi

bash "$REPO/test/setup.sh"
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"
WORK=$(mktemp -d /tmp/ironwod-demo.XXXXXX)
touch "$WORK/$MARK"
# A demo that fails on the way stops what it started and says where its files are.
trap 'rc=$?; if [ $rc != 0 ]; then stop_all; echo "the demo failed; its files are in $WORK (remove it with: rm -rf $WORK)" >&2; fi' EXIT

echo "== building ironwod (work directory $WORK)"
# Two demos started at once must not build the same objects at the same time.
(
    flock 9
    make -s -C "$REPO" all >/dev/null
    install_private
) 9>"/tmp/ironwod-build.$(printf '%s' "$REPO" | cksum | cut -d' ' -f1).lock"
PGBIN=$WORK/pg/usr/lib/postgresql/15/bin

echo "== starting the Wodify simulator (seed 7, one small gym, Wodify's own rate limit)"
start_sim 7 1 small
echo "$SIM_PID" >"$WORK/sim.pid"
disown "$SIM_PID"

echo "== starting a throwaway cluster with pg_cron and ironwod preloaded"
start_cluster 'ironwod,pg_cron' "cron.database_name = 'postgres'"
SIM_PID=

TENANT=0f0f0f0f-0000-4000-8000-000000000001
GYM=0f0f0f0f-0000-4000-8000-0000000000aa
KEY=$(curl -sf "$SIM_URL/_sim/gyms" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gyms"][0]["api_key"])')

psql -qX -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION ironwod' -c 'CREATE EXTENSION pg_cron'
register_dev_key >/dev/null

echo "== connecting the demo gym (the key is sealed before it is stored) and backfilling"
# As a host app does: the key is sealed to ironwod_public_key() outside PostgreSQL
# (test/seal.py, the key on its standard input), so no statement carries it.
SEALED=$(printf %s "$KEY" | seal_key "$TENANT" "$GYM")
psql -qX -v ON_ERROR_STOP=1 -v sealed="$SEALED" -v t="$TENANT" -v g="$GYM" <<'SQL'
BEGIN;
SELECT ironwod_set_scope(:'t', :'g') \g /dev/null
SELECT ironwod_connect(:'t', :'g', :'sealed'::bytea) AS connection_status;
COMMIT;
SQL
START=$(date +%s)
RUN=$(psql -qAtX -c "SELECT max(run_id) FROM ironwod.sync_runs WHERE gym_id = '$GYM' AND mode = 'backfill'")
# A progress line every two seconds while it runs (ironwod.run_progress).
while line=$(psql -qAtX -c "SELECT format('  %s: %s, %s of %s entities, %s of %s units, %s records, %s requests, ETA %s',
                                          status, coalesce(current_entity, phase, '-'), entities_done, entities_total,
                                          units_done, coalesce(units_total::text, '?'), records_landed, requests,
                                          coalesce(date_trunc('second', eta)::text, '?'))
                                   FROM ironwod.run_progress WHERE run_id = $RUN") && [ -n "$line" ]; do
    echo "$line"
    sleep 2
done
psql -qX -v ON_ERROR_STOP=1 -v t="$TENANT" -v g="$GYM" -v r="$RUN" <<'SQL'
BEGIN;
SELECT ironwod_set_scope(:'t', :'g') \g /dev/null
SELECT ironwod_wait(:r, '15 minutes') AS backfill;
COMMIT;
SQL
echo "backfill took $(( $(date +%s) - START )) s"

echo
echo "== per-entity summary of the backfill"
psql -qX -v ON_ERROR_STOP=1 -v t="$TENANT" -v g="$GYM" <<'SQL'
BEGIN;
SELECT ironwod_set_scope(:'t', :'g') \g /dev/null
SELECT status, api_key_fingerprint, last_success_at, last_cursor_at,
       CASE WHEN cardinality(not_entitled) > 0 THEN array_to_string(not_entitled, ', ') ELSE 'none' END AS not_entitled
FROM ironwod_status(:'t', :'g');
SELECT e.entity, (s.value->>'pages')::int AS pages, (s.value->>'requests')::int AS requests,
       (s.value->>'pulled')::int AS pulled, (s.value->>'new')::int AS new_versions,
       (s.value->>'watermark')::timestamptz AS watermark
FROM ironwod_status(:'t', :'g') st, jsonb_each(st.entities) s
JOIN ironwod.entities e ON e.entity = s.key
ORDER BY e.ordinal;
COMMIT;
SQL
echo "== the demo gym's last 12 months, from the metrics cache (ironwod.metrics_summary)"
psql -qX -v ON_ERROR_STOP=1 -v t="$TENANT" -v g="$GYM" <<'SQL'
-- NULL is unknown: a metric of an entity the gym's plan does not include, or a
-- flow or rate that has no value in the first month.
\pset null unknown
BEGIN;
SELECT ironwod_set_scope(:'t', :'g') \g /dev/null
SELECT to_char(month_start, 'YYYY-MM') AS month, CASE WHEN is_partial THEN '*' ELSE '' END AS p,
       members_end AS members, new_members AS new, churned_members AS churned,
       round(churn_rate * 100, 1) AS "churn %", round(mrr, 0) AS mrr, round(collected_net, 0) AS collected,
       round(arm, 2) AS arm, round(visits_per_active_member_week, 2) AS "visits/member-wk",
       at_risk_no_visit_14d AS "no visit 14d", at_risk_declining AS declining
FROM ironwod.metrics_summary
WHERE location_key = 'ALL'
ORDER BY month_start DESC LIMIT 12;
COMMIT;
SQL
echo "(* = month still open; drill down with ironwod_explain(tenant, gym, month, 'churned_members'))"

echo "== nightly sync: the pg_cron job that calls ironwod_tick()"
psql -qX -v ON_ERROR_STOP=1 -c "SELECT ironwod_schedule() AS cron_job_id" \
     -c "SELECT jobname, schedule, command FROM cron.job"

cat <<EOF2

The demo keeps running in $WORK:
  psql -h $WORK -p $PGPORT -U postgres postgres
  -- then: BEGIN; SELECT ironwod_set_scope('$TENANT', '$GYM'); SELECT * FROM ironwod_status('$TENANT', '$GYM'); COMMIT;
Server log: $WORK/data/server.log
Stop this demo (and delete its directory) with:
  bash $REPO/test/demo.sh stop $WORK
EOF2
