#!/usr/bin/env bash
# kill -9 of the postmaster in the middle of a backfill, on a cluster of its own:
#
#  1. while a run worker waits for a page (the simulator holds request k+1 after
#     letting k through, so the kill lands mid-run at the same place on any
#     machine): every process of the server, ironwod's launcher, supervisor and
#     run worker among them, is gone within a bound, and nothing was committed
#     after the kill;
#  2. while a run worker lands a page (a test trigger on a raw table spins, in
#     a loop PostgreSQL does not watch, until the test lets it go after the
#     kill; it also makes the worker's commits synchronous, so a commit after
#     the kill would survive the restart): the worker leaves without committing
#     the page;
#  3. restarted, the supervisor fails both runs and a rerun ends with the raw
#     rows of an uninterrupted backfill.
#
# "Nothing committed" is decided deterministically: the snapshot is taken while
# the worker is held (after a CHECKPOINT, so everything committed before the
# kill is on disk), and the state after the restart is read with the supervisor
# kept away (ironwod.database_name names a database that does not exist), so no
# bookkeeping of the restarted server can blur the comparison.
#
# Usage: bash test/shell/postmaster_death.sh  (PGBIN may name a PostgreSQL 15 bin
# directory that already has this build of ironwod installed.)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"

shell_test_work pmdeath
LOG=$WORK/data/server.log
q() { psql -qAtX -v ON_ERROR_STOP=1 -c "$1"; }
# one implicit transaction: the scope holds for the statement after it
scoped() { psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT ironwod_set_scope('$1', '$2'); $3" | tail -n +2; }

start_sim 11 1 small --rate 1000 --burst 1000
# The held request must outlast every bound here, not time out and be retried.
start_cluster ironwod "ironwod.naptime = 2000" "ironwod.requests_per_second = 500" "ironwod.burst = 100" \
    "ironwod.cluster_requests_per_second = 5000" "ironwod.request_timeout_ms = 600000" \
    "ironwod.low_speed_time = 600" "ironwod.max_retries = 3"
q 'CREATE EXTENSION ironwod' >/dev/null
register_dev_key >/dev/null
KEY=$(sim GET /_sim/gyms | python3 -c 'import json, sys; print(json.load(sys.stdin)["gyms"][0]["api_key"])')
REF=(71717171-0000-0000-0000-000000000001 71717171-0000-0000-0000-0000000000a1)
GYM=(72727272-0000-0000-0000-000000000001 72727272-0000-0000-0000-0000000000a1)

# ironwod.seal_key seals a plaintext key, which ironwod.allow_plaintext_keys (where
# this build has it) refuses unless a superuser turns it on: the test's own
# superuser session does, for its transaction only.
ALLOW="SELECT count(set_config(name, 'on', true)) FROM pg_settings WHERE name = 'ironwod.allow_plaintext_keys';"
connect() { scoped "$1" "$2" "$ALLOW SELECT ironwod_connect('$1', '$2', ironwod.seal_key('$1', '$2', '$KEY'))" >/dev/null; }
last_run() { q "SELECT max(run_id) FROM ironwod.sync_runs WHERE tenant_id = '$1' AND gym_id = '$2' AND mode = 'backfill'"; }
run_status() { q "SELECT status || ':' || coalesce(error_code, '') FROM ironwod.sync_runs WHERE tenant_id = '$1' AND gym_id = '$2' AND run_id = $3"; }
finished() { local s; s=$(run_status "$@"); [ "${s%%:*}" != running ] && [ "${s%%:*}" != queued ]; }
latest_versions() {
    scoped "$1" "$2" "SELECT e.entity || ':' || x.wodify_id || ':' || encode(x.payload_hash, 'hex')
                      FROM ironwod.entities e, LATERAL ironwod.latest_raw_versions(e.entity) x ORDER BY 1"
}
# Every row of every tenant table of the gym's tenant (raw, runs, units,
# checkpoints, cursors, events, canonical): a count and a digest per table.
q "CREATE FUNCTION public.tenant_state(p_tenant uuid) RETURNS SETOF text LANGUAGE plpgsql AS \$\$
   DECLARE t name; r text;
   BEGIN
     FOR t IN SELECT c.table_name FROM information_schema.columns c
              JOIN information_schema.tables x USING (table_schema, table_name)
              WHERE c.table_schema = 'ironwod' AND c.column_name = 'tenant_id' AND x.table_type = 'BASE TABLE'
              ORDER BY 1 LOOP
       EXECUTE format('SELECT %L || '' '' || count(*) || '' '' || md5(coalesce(string_agg(to_jsonb(x)::text, ''|'' '
                      'ORDER BY to_jsonb(x)::text), '''')) FROM ironwod.%I x WHERE tenant_id = %L', t, t, p_tenant)
       INTO r;
       RETURN NEXT r;
     END LOOP;
   END \$\$" >/dev/null

# ---- the reference: an uninterrupted backfill --------------------------------
connect "${REF[@]}"
ref_run=$(last_run "${REF[@]}")
wait_for "the reference backfill" finished "${REF[@]}" "$ref_run"
[ "$(run_status "${REF[@]}" "$ref_run")" = "succeeded:" ] || fail "reference backfill: $(run_status "${REF[@]}" "$ref_run")"
latest_versions "${REF[@]}" >"$WORK/reference"
[ -s "$WORK/reference" ] || fail "the reference backfill landed nothing"
requests=$(sim GET /_sim/stats | python3 -c 'import json, sys; print(json.load(sys.stdin)["total"])')
echo "# the reference backfill: $(wc -l <"$WORK/reference") records in $requests requests"

PM=
# A process that has exited is gone, reaped or not: the orphans of a dead
# postmaster are reaped by init, in its own time.
running() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
# kill_postmaster: kill -9 the postmaster; then every process it had started must
# be gone within the bound (the requirement is one second; the bound is generous
# for a loaded machine, and far below the ten minutes a held worker would wait).
kill_postmaster() {
    PM=$(head -1 "$WORK/data/postmaster.pid")
    ps -o pid=,args= --ppid "$PM" >"$WORK/children"
    grep -q 'ironwod launcher' "$WORK/children" || fail "no ironwod launcher among: $(cat "$WORK/children")"
    grep -q 'ironwod supervisor' "$WORK/children" || fail "no ironwod supervisor among: $(cat "$WORK/children")"
    grep -q 'ironwod run' "$WORK/children" || fail "no ironwod run worker among: $(cat "$WORK/children")"
    kill -9 "$PM"
    local start=${EPOCHREALTIME/./} deadline=$((SECONDS + 20)) p name ms
    declare -A alive=()
    while read -r p name; do alive[$p]=$name; done <"$WORK/children"
    while [ ${#alive[@]} -gt 0 ]; do
        for p in "${!alive[@]}"; do
            if ! running "$p"; then
                ms=$(( (${EPOCHREALTIME/./} - start) / 1000 ))
                printf '# %-34s gone %5d ms after kill -9 of the postmaster\n' "${alive[$p]}" "$ms"
                unset "alive[$p]"
            fi
        done
        [ $SECONDS -lt $deadline ] || fail "still alive 20 s after the postmaster's death: ${alive[*]}"
        sleep 0.02
    done
    # a new postmaster refuses to start while the old one's pid exists, zombie or not
    reaped() { ! kill -0 "$PM" 2>/dev/null; }
    wait_for "init to reap the dead postmaster" reaped
}
# After the restart, read the state with no supervisor (and so no worker) running.
read_state_after_restart() {
    as_server "$PGBIN/pg_ctl -D '$WORK/data' -l '$LOG' -o '-c ironwod.database_name=ironwod_away' -w start" >/dev/null
    q "SELECT * FROM public.tenant_state('${GYM[0]}')" >"$WORK/after"
    as_server "$PGBIN/pg_ctl -D '$WORK/data' -m fast -w stop" >/dev/null
    as_server "$PGBIN/pg_ctl -D '$WORK/data' -l '$LOG' -w start" >/dev/null
}
snapshot() {
    q 'CHECKPOINT'
    q "SELECT * FROM public.tenant_state('${GYM[0]}')" >"$WORK/before"
}

# ---- 1. killed while the worker waits for a page ------------------------------
K=3
sim POST /_sim/faults "{\"kind\": \"slow\", \"delay_s\": 900, \"after\": $K, \"count\": 1, \"api_key\": \"$KEY\"}" >/dev/null
held() { sim GET /_sim/faults | python3 -c 'import json, sys; sys.exit(0 if all(f["remaining"] == 0 for f in json.load(sys.stdin)["faults"]) else 1)'; }
connect "${GYM[@]}"
run1=$(last_run "${GYM[@]}")
wait_for "request $((K + 1)) to be held" held
[ "$(run_status "${GYM[@]}" "$run1")" = "running:" ] || fail "run $run1 is not running under the hold: $(run_status "${GYM[@]}" "$run1")"
landed=$(q "SELECT coalesce(sum(pages), 0) FROM ironwod.sync_run_entities WHERE tenant_id = '${GYM[0]}' AND run_id = $run1")
[ "$landed" -gt 0 ] || fail "no page landed before the hold"
snapshot
kill_postmaster
read_state_after_restart
diff "$WORK/before" "$WORK/after" >&2 || fail "something was committed after the kill while the worker waited for a page"
echo "ok - killed while fetching (after $landed pages): every process gone, nothing committed after the kill"
sim DELETE /_sim/faults >/dev/null
wait_for "the supervisor to fail run $run1" finished "${GYM[@]}" "$run1"
[ "$(run_status "${GYM[@]}" "$run1")" = "failed:worker_lost" ] || fail "run $run1 after the restart: $(run_status "${GYM[@]}" "$run1")"

# ---- 2. killed while the worker lands a page ----------------------------------
# The trigger function is SECURITY DEFINER (pg_stat_file is for superusers) but
# has no SET clause: one would undo its set_config() when it returns.
q "CREATE SEQUENCE public.landing_hold" >/dev/null
q "CREATE FUNCTION public.hold_landing() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS \$\$
   BEGIN
     IF pg_catalog.nextval('public.landing_hold') = 1 THEN
       PERFORM pg_catalog.set_config('synchronous_commit', 'on', false);
       WHILE pg_catalog.pg_stat_file('$WORK/release', true) IS NULL LOOP
       END LOOP;
     END IF;
     RETURN NULL;
   END \$\$" >/dev/null
q "CREATE TRIGGER hold_landing BEFORE INSERT ON ironwod.wodify_raw_clients
   FOR EACH STATEMENT EXECUTE FUNCTION public.hold_landing()" >/dev/null
run2=$(scoped "${GYM[@]}" "SELECT ironwod_sync('${GYM[0]}', '${GYM[1]}', 'backfill')")
in_trigger() { [ "$(q 'SELECT last_value FROM public.landing_hold')" = 1 ] && [ "$(q 'SELECT is_called FROM public.landing_hold')" = t ]; }
wait_for "the worker to land a page of clients" in_trigger
snapshot
kill_postmaster_releasing() {
    # the worker spins until the file exists: create it right after the kill
    PM=$(head -1 "$WORK/data/postmaster.pid")
    ( while running "$PM"; do sleep 0.01; done; touch "$WORK/release"; chmod 644 "$WORK/release" ) &
    local releaser=$!
    kill_postmaster
    wait "$releaser"
}
kill_postmaster_releasing
read_state_after_restart
diff "$WORK/before" "$WORK/after" >&2 || fail "the page being landed at the kill was committed after it"
echo "ok - killed while landing: the page was not committed after the kill"
q 'DROP TRIGGER hold_landing ON ironwod.wodify_raw_clients' >/dev/null
wait_for "the supervisor to fail run $run2" finished "${GYM[@]}" "$run2"
[ "$(run_status "${GYM[@]}" "$run2")" = "failed:worker_lost" ] || fail "run $run2 after the restart: $(run_status "${GYM[@]}" "$run2")"

# ---- 3. the rerun ends where an uninterrupted backfill ends -------------------
run3=$(scoped "${GYM[@]}" "SELECT ironwod_sync('${GYM[0]}', '${GYM[1]}', 'backfill')")
wait_for "the rerun" finished "${GYM[@]}" "$run3"
[ "$(run_status "${GYM[@]}" "$run3")" = "succeeded:" ] || fail "rerun: $(run_status "${GYM[@]}" "$run3")"
latest_versions "${GYM[@]}" >"$WORK/rerun"
diff "$WORK/reference" "$WORK/rerun" >&2 || fail "the rerun's raw rows differ from an uninterrupted backfill's"
echo "ok - restarted: both runs failed as worker_lost; the rerun's raw rows equal an uninterrupted backfill's"
