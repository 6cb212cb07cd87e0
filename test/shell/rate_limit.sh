#!/usr/bin/env bash
# Rate limiting against a simulator with Wodify's real per-key throttle
# (5 requests/s, burst 20), on its own throwaway cluster:
#
#  1. tenant A connects the gym with ironwod's default limit (4.5 requests/s,
#     burst 15, below Wodify's): the backfill lands the exact expected counts
#     and the simulator answers not a single 429.  The margin (5 tokens and
#     0.5 requests/s) absorbs up to a second of delay between ironwod taking a
#     token and the simulator seeing the request, so a busy machine cannot
#     fake a 429;
#  2. the rate is raised to 20 requests/s (above the simulator's limit) and
#     tenant B connects the same gym with the same key.  The test empties the
#     key's bucket in the simulator and freezes its clock until the first 429
#     went out, so 429s appear however slowly this machine runs; the rate
#     limiter backs off, every throttled request is retried, and the backfill
#     still lands the exact expected counts;
#  3. ironwod.rate_limits() shows both connection buckets and the cluster
#     bucket, with the 429s counted where they happened.
#
# Usage: bash test/shell/rate_limit.sh  (PGBIN may name a PostgreSQL 15 bin
# directory that already has this build of ironwod installed; otherwise the
# script installs a private copy.)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"

shell_test_work ratelimit

TA=11111111-1111-1111-1111-111111111111
TB=22222222-2222-2222-2222-222222222222
GYM=aaaaaaaa-0000-0000-0000-000000000001

# Wodify's documented limit, and Retry-After on every throttled answer.
start_sim 7 1 small --rate 5 --burst 20 --retry-after 1
start_cluster ironwod \
    "ironwod.naptime = 2000" \
    "ironwod.max_retries = 5"

psql -qX -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION ironwod' >/dev/null
register_dev_key >/dev/null
API_KEY=$(curl -sf "$SIM_URL/_sim/gyms" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gyms"][0]["api_key"])')
EXPECTED=$(curl -sf "$SIM_URL/_sim/gyms" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["gyms"][0]["expected"]))')

sim_stat() { curl -sf "$SIM_URL/_sim/stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

# Connect (tenant, gym) with the key and wait for the initial backfill; prints
# the run's final status.
connect_and_backfill() {
    local tenant=$1 sealed
    sealed=$(printf %s "$API_KEY" | seal_key "$tenant" "$GYM")
    psql -qAtX -v ON_ERROR_STOP=1 -v sealed="$sealed" >/dev/null <<SQL
BEGIN;
SELECT ironwod_set_scope('$tenant', '$GYM');
SELECT ironwod_connect('$tenant', '$GYM', :'sealed'::bytea);
COMMIT;
SQL
    psql -qAtX -v ON_ERROR_STOP=1 <<SQL
BEGIN;
SELECT ironwod_set_scope('$tenant', '$GYM') \\g /dev/null
SELECT ironwod_wait((SELECT max(run_id) FROM ironwod.sync_runs
                     WHERE tenant_id = '$tenant' AND gym_id = '$GYM' AND mode = 'backfill'),
                    '3 minutes');
COMMIT;
SQL
}

# Entities whose distinct record count differs from the simulator's ground
# truth (empty when everything landed).
count_mismatches() {
    local tenant=$1
    psql -qAtX -v ON_ERROR_STOP=1 -v expected="$EXPECTED" <<SQL
DO \$\$
DECLARE
    e record;
    n bigint;
BEGIN
    CREATE TEMP TABLE mismatch (entity text, got bigint, want bigint);
    FOR e IN SELECT x.entity, x.raw_table FROM ironwod.entities x ORDER BY x.ordinal LOOP
        EXECUTE format('SELECT count(DISTINCT wodify_id) FROM ironwod.%I
                        WHERE tenant_id = %L AND gym_id = %L', e.raw_table, '$tenant', '$GYM')
            INTO n;
        INSERT INTO mismatch VALUES (e.entity, n, NULL);
    END LOOP;
END
\$\$;
UPDATE mismatch SET want = ((:'expected')::jsonb->>entity)::bigint;
SELECT entity || ': got ' || got || ', want ' || coalesce(want::text, '?')
FROM mismatch WHERE want IS DISTINCT FROM got;
SQL
}

started=$SECONDS

# ---- 1. ironwod's default limit against Wodify's: zero 429s -----------------
status=$(connect_and_backfill "$TA")
[ "$status" = succeeded ] || fail "tenant A backfill: $status"
bad=$(count_mismatches "$TA")
[ -z "$bad" ] || fail "tenant A counts: $bad"
total_a=$(sim_stat total)
throttled_a=$(sim_stat throttled_429)
[ "$throttled_a" = 0 ] || fail "tenant A at ironwod's default limit drew $throttled_a 429s"
echo "ok - default bucket against Wodify's limit: $total_a requests, 0 throttled, counts exact ($((SECONDS - started)) s)"

# ---- 2. bucket above the simulator limit: 429s, retried, nothing lost --------
psql -qX -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
ALTER SYSTEM SET ironwod.requests_per_second = 20;
SELECT pg_reload_conf();
SQL
# New workers fork from the postmaster, which reloads asynchronously (the
# bound is for a broken reload, not a pace).
for _ in $(seq 1 1200); do
    [ "$(psql -qAtX -c 'SHOW ironwod.requests_per_second')" = 20 ] && break
    sleep 0.1
done
[ "$(psql -qAtX -c 'SHOW ironwod.requests_per_second')" = 20 ] || fail "reload did not take"
# An empty bucket on a frozen clock: the next request is throttled for sure,
# and the clock runs again once that 429 went out.
curl -sf -X POST "$SIM_URL/_sim/clock" -d '{"freeze": true}' >/dev/null
curl -sf -X POST "$SIM_URL/_sim/buckets" -d "{\"api_key\": \"$API_KEY\", \"tokens\": 0}" >/dev/null
curl -sf -X POST "$SIM_URL/_sim/clock" -d '{"resume_after_throttled": 1}' >/dev/null
curl -sf -X POST "$SIM_URL/_sim/stats/reset" >/dev/null
phase2=$SECONDS
status=$(connect_and_backfill "$TB")
[ "$status" = succeeded ] || fail "tenant B backfill: $status"
bad=$(count_mismatches "$TB")
[ -z "$bad" ] || fail "tenant B counts: $bad"
throttled_b=$(sim_stat throttled_429)
[ "$throttled_b" -gt 0 ] || fail "tenant B against an empty bucket drew no 429"
[ "$(curl -sf "$SIM_URL/_sim/clock" | python3 -c 'import json,sys; print(json.load(sys.stdin)["frozen"])')" = False ] \
    || fail "the simulator's clock did not resume after the first 429"
echo "ok - bucket above the simulator's limit: $(sim_stat total) requests, $throttled_b throttled and retried, counts exact ($((SECONDS - phase2)) s)"

# ---- 3. the state is visible to admins ---------------------------------------
out=$(psql -qAtX -v ON_ERROR_STOP=1 <<SQL
SELECT coalesce(tenant_id::text, 'cluster'), throttled_count > 0,
       rate < CASE WHEN tenant_id IS NULL THEN current_setting('ironwod.cluster_requests_per_second')
                   ELSE current_setting('ironwod.requests_per_second') END::float8
FROM ironwod.rate_limits() ORDER BY tenant_id NULLS FIRST;
SET ROLE ironwod_admin;
SELECT count(*) >= 3 FROM ironwod.rate_limits();
RESET ROLE;
SET ROLE ironwod_app;
SELECT has_function_privilege('ironwod.rate_limits()', 'EXECUTE');
SQL
)
want="cluster|t|t
$TA|f|f
$TB|t|t
t
f"
[ "$out" = "$want" ] || fail "ironwod.rate_limits():
$out
expected:
$want"
# Tenant B's 429s: the simulator's count and ours agree.
ours=$(psql -qAtX -c "SELECT throttled_count FROM ironwod.rate_limits() WHERE tenant_id = '$TB'")
[ "$ours" = "$throttled_b" ] || fail "rate_limits() counted $ours 429s, the simulator sent $throttled_b"
echo "ok - ironwod.rate_limits() shows the buckets; admin only ($((SECONDS - started)) s in all)"
