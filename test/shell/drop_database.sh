#!/usr/bin/env bash
# DROP DATABASE and its relatives on the database ironwod serves, on a cluster of
# its own (ironwod.database_name = 'metrics', so the commands run from database
# postgres).  PostgreSQL's DROP DATABASE, ALTER DATABASE ... RENAME and CREATE
# DATABASE ... TEMPLATE wait up to 5 s for every other session of the database to
# leave, then fail with "database ... is being accessed by other users"; they ask
# only autovacuum to leave.  ironwod's supervisor and its idle run workers are
# such sessions all the time (the workers wait for their next run for
# ironwod.worker_idle_timeout, here 10 minutes so that they are surely there), so
# each of these commands used to fail.  Now they leave as soon as a session waits
# for the database (src/dbleave.c), and the launcher starts the supervisor again
# once the command is over and the database still exists:
#
#  1. CREATE DATABASE ... TEMPLATE metrics, while a run worker idles: it
#     succeeds; the supervisor comes back and a sync succeeds;
#  2. ALTER DATABASE metrics RENAME, with a worker idle: it succeeds; the launcher
#     says the database is missing; renamed back, the supervisor comes back and a
#     sync succeeds;
#  3. DROP DATABASE while one gym's run is busy (the simulator holds a request)
#     and another gym's worker idles: it fails as PostgreSQL fails it for any
#     busy session, and the session it names is the busy worker alone (the
#     supervisor and the idle worker left); the held run then succeeds;
#  3b. a run handed to an idle worker that leaves with it for a copy stays
#     queued, starts later, and counts one launch attempt, not two;
#  4. DROP DATABASE with workers idle: it succeeds; the launcher waits for the
#     database to exist again, with its one WARNING, and no FATAL is logged;
#  5. a rename that comes after the launcher looked (the postmaster held
#     stopped until it has): the supervisor looks again before it connects and
#     leaves with a LOG line, and no FATAL is logged.
#
# Usage: bash test/shell/drop_database.sh  (PGBIN may name a PostgreSQL 15 bin
# directory that already has this build of ironwod installed.)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"

shell_test_work dropdb
LOG=$WORK/data/server.log

start_sim 17 2 small --rate 1000 --burst 1000
start_cluster ironwod "ironwod.naptime = 2000" "ironwod.database_name = 'metrics'" \
    "ironwod.worker_idle_timeout = 600" "ironwod.requests_per_second = 500" "ironwod.burst = 100" \
    "ironwod.cluster_requests_per_second = 5000" "ironwod.max_retries = 3"
# the commands run from database postgres; ironwod's SQL in metrics
admin() { PGDATABASE=postgres psql -qAtX -v ON_ERROR_STOP=1 -c "$1"; }
q() { PGDATABASE=metrics psql -qAtX -v ON_ERROR_STOP=1 -c "$1"; }
scoped() { q "SELECT ironwod_set_scope('$1', '$2'); $3" | tail -n +2; }

admin 'CREATE DATABASE metrics' >/dev/null
supervising() { [ "$(admin "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'ironwod supervisor' AND datname = 'metrics'")" = 1 ]; }
wait_for "the supervisor in metrics" supervising
q 'CREATE EXTENSION ironwod' >/dev/null
PGDATABASE=metrics register_dev_key >/dev/null

A=(91919191-0000-0000-0000-000000000001 91919191-0000-0000-0000-0000000000a1)
B=(92929292-0000-0000-0000-000000000001 92929292-0000-0000-0000-0000000000a1)
KEY_A=$(sim GET /_sim/gyms | json 'd["gyms"][0]["api_key"]')
KEY_B=$(sim GET /_sim/gyms | json 'd["gyms"][1]["api_key"]')

idle_workers() { admin "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'ironwod run' AND datname = 'metrics' AND query = 'ironwod: waiting for the next run'"; }
some_idle() { [ "$(idle_workers)" -ge 1 ]; }
ours_in_metrics() { admin "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'ironwod %' AND datname = 'metrics'"; }
left() { grep -c "$1 leaves database \"metrics\": another session waits for it to be unused" "$LOG" || true; }

for g in A B; do
    declare -n gym=$g key=KEY_$g
    sealed=$(printf %s "$key" | PGDATABASE=metrics seal_key "${gym[@]}")
    [ "$(scoped "${gym[@]}" "SELECT ironwod_connect('${gym[0]}', '${gym[1]}', '$sealed'::bytea)")" = connected ] ||
        fail "gym $g did not connect"
    run=$(q "SELECT max(run_id) FROM ironwod.sync_runs WHERE tenant_id = '${gym[0]}' AND mode = 'backfill'")
    wait_for "the backfill of $g" run_finished "$run"
    [ "$(run_state "$run")" = "succeeded:" ] || fail "backfill of $g: $(run_state "$run")"
done

# ---- 1. CREATE DATABASE ... TEMPLATE metrics, a worker idle -------------------
sync_ok "${A[@]}" incremental "before the copy"
wait_for "a run worker to idle" some_idle
[ "$(ours_in_metrics)" -ge 2 ] || fail "want the supervisor and an idle worker in metrics, got $(ours_in_metrics)"
workers_left=$(left "idle ironwod run worker")
supervisors_left=$(left "ironwod supervisor")
out=$(admin 'CREATE DATABASE metrics_copy TEMPLATE metrics' 2>&1) ||
    fail "CREATE DATABASE ... TEMPLATE metrics with ironwod idle in it: $out"
[ "$(left "idle ironwod run worker")" -gt "$workers_left" ] || fail "no idle worker said it left for the copy"
[ "$(left "ironwod supervisor")" -gt "$supervisors_left" ] || fail "the supervisor did not say it left for the copy"
admin 'DROP DATABASE metrics_copy' >/dev/null
wait_for "the supervisor back in metrics after the copy" supervising
sync_ok "${A[@]}" incremental "after the copy"
echo "ok - CREATE DATABASE ... TEMPLATE of ironwod's database while a run worker idles: the supervisor and the idle worker leave, the copy succeeds, the supervisor comes back and a sync succeeds"

# ---- 2. ALTER DATABASE metrics RENAME, a worker idle ----------------------------
# In a transaction held open, so that the launcher meets the waiting command: it
# holds the supervisor back (a supervisor started now would wait for the lock and
# then die of the rename, FATAL) until the rename commits, and then says that
# metrics is missing.
wait_for "a run worker to idle" some_idle
warnings=$(grep -c 'named by ironwod.database_name does not exist' "$LOG" || true)
mkfifo "$WORK/rename.fifo"
PGDATABASE=postgres psql -qAtX -v ON_ERROR_STOP=1 <"$WORK/rename.fifo" >"$WORK/rename.out" 2>&1 &
RENAME_PID=$!
exec 3>"$WORK/rename.fifo"
echo "BEGIN; ALTER DATABASE metrics RENAME TO metrics_renamed; SELECT 'renamed';" >&3
renamed() { grep -q '^renamed$' "$WORK/rename.out" || { kill -0 "$RENAME_PID" 2>/dev/null || fail "ALTER DATABASE metrics RENAME with ironwod idle in it: $(cat "$WORK/rename.out")"; false; }; }
wait_for "the rename, in its open transaction" renamed
held_back() { grep -q 'ironwod launcher holds the supervisor back: another session waits for database "metrics" to be unused' "$LOG"; }
# a connection waiting for the database's lock: a supervisor the launcher started
connecting() { [ "$(admin "SELECT count(*) FROM pg_locks WHERE locktype = 'object' AND classid = 'pg_database'::regclass AND NOT granted")" != 0 ]; }
held_back_or_connecting() { held_back || connecting; }
wait_for "the launcher to meet the open rename" held_back_or_connecting
held_back || fail "the launcher started a supervisor while the rename waited to commit"
echo "COMMIT;" >&3
exec 3>&-
wait "$RENAME_PID" || fail "the rename did not commit: $(cat "$WORK/rename.out")"
missing_said() { [ "$(grep -c 'named by ironwod.database_name does not exist' "$LOG")" -gt "$warnings" ]; }
wait_for "the launcher to say that metrics is missing" missing_said
admin 'ALTER DATABASE metrics_renamed RENAME TO metrics' >/dev/null
wait_for "the supervisor back in metrics after the renames" supervising
sync_ok "${A[@]}" incremental "after the renames"
echo "ok - ALTER DATABASE RENAME of ironwod's database while a run worker idles succeeds; the launcher holds the supervisor back until it commits, then says the database is missing; renamed back, the supervisor serves it again"

# ---- 3. DROP DATABASE while a run is busy and another worker idles ---------------
# B's run is held in the simulator at its third request, busy on one worker; then
# A's run takes another worker (that one is busy) and finishes: that worker idles.
held() { [ "$(sim GET /_sim/faults | json 'd["held"]')" = 1 ]; }
sim POST /_sim/holds "{\"after\": 2, \"count\": 1, \"api_key\": \"$KEY_B\"}" >/dev/null
HELD_RUN=$(scoped "${B[@]}" "SELECT ironwod_sync('${B[0]}', '${B[1]}', 'incremental')")
wait_for "a request of run $HELD_RUN to be held" held
[ "$(run_state "$HELD_RUN")" = "running:" ] || fail "run $HELD_RUN is not running under the hold"
sync_ok "${A[@]}" incremental "beside the held run"
wait_for "a run worker to idle" some_idle
[ "$(ours_in_metrics)" = 3 ] || fail "want the supervisor, a busy and an idle worker in metrics, got $(ours_in_metrics)"
workers_left=$(left "idle ironwod run worker")
supervisors_left=$(left "ironwod supervisor")
out=$(admin 'DROP DATABASE metrics' 2>&1) && fail "DROP DATABASE succeeded while a run was busy"
[[ $out == *'database "metrics" is being accessed by other users'* ]] || fail "DROP DATABASE beside a busy run: $out"
[[ $out == *'There is 1 other session using the database.'* ]] ||
    fail "DROP DATABASE beside a busy run should name the busy worker alone: $out"
[ "$(left "idle ironwod run worker")" -gt "$workers_left" ] || fail "the idle worker did not say it left"
[ "$(left "ironwod supervisor")" -gt "$supervisors_left" ] || fail "the supervisor did not say it left"
sim POST /_sim/release >/dev/null
wait_for "the held run $HELD_RUN" run_finished "$HELD_RUN"
[ "$(run_state "$HELD_RUN")" = "succeeded:" ] || fail "the held run: $(run_state "$HELD_RUN")"
wait_for "the supervisor back in metrics after the failed DROP" supervising
sync_ok "${A[@]}" incremental "after the failed DROP DATABASE"
echo "ok - DROP DATABASE beside a busy run fails as PostgreSQL fails it for any busy session, naming only the busy worker: the supervisor and the idle worker left; the held run then succeeds and the supervisor serves again"

# ---- 3b. a run handed to an idle worker that leaves with it for the command ----
# The idle workers are stopped (SIGSTOP), so the run the supervisor hands one of
# them waits in its slot untaken; the copy then starts and they are let go: the
# worker holding the run looks first, sees the copy waiting and leaves with it.
# The run stays queued, a new worker starts it once the supervisor is back, and
# it counts one launch attempt (that worker's), not two: the handed run never
# started.
wait_for "a run worker to idle" some_idle
IDLE_PIDS=$(admin "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE backend_type = 'ironwod run' AND datname = 'metrics' AND query = 'ironwod: waiting for the next run'")
# shellcheck disable=SC2086
hold $IDLE_PIDS
HANDED_RUN=$(scoped "${A[@]}" "SELECT ironwod_sync('${A[0]}', '${A[1]}', 'incremental')")
queued_at=$(admin "SELECT clock_timestamp()")
# two whole ticks of the supervisor after the run was queued: the second began
# after the first ended, so it saw the run and handed it over
checks_after() { admin "SELECT query_start FROM pg_stat_activity WHERE backend_type = 'ironwod supervisor' AND query = 'ironwod supervisor configuration checks' AND query_start > '$1'"; }
ticked_after() { [ -n "$(checks_after "$1")" ]; }
wait_for "a supervisor tick after run $HANDED_RUN was queued" ticked_after "$queued_at"
first=$(checks_after "$queued_at")
wait_for "a second supervisor tick" ticked_after "$first"
[ "$(run_state "$HANDED_RUN")" = "queued:" ] || fail "run $HANDED_RUN, handed to a stopped worker, is $(run_state "$HANDED_RUN")"
workers_left=$(left "idle ironwod run worker")
admin 'CREATE DATABASE metrics_copy TEMPLATE metrics' >"$WORK/copy.out" 2>&1 &
COPY_PID=$!
copy_waits() { [ "$(admin "SELECT count(*) FROM pg_locks WHERE locktype = 'object' AND classid = 'pg_database'::regclass AND objid = (SELECT oid FROM pg_database WHERE datname = 'metrics') AND mode = 'ShareLock' AND granted")" = 1 ]; }
wait_for "the copy to wait for metrics" copy_waits
# shellcheck disable=SC2086
release $IDLE_PIDS
wait "$COPY_PID" || fail "CREATE DATABASE ... TEMPLATE metrics with a run handed over: $(cat "$WORK/copy.out")"
[ "$(left "idle ironwod run worker")" -gt "$workers_left" ] || fail "no idle worker said it left for the copy"
admin 'DROP DATABASE metrics_copy' >/dev/null
wait_for "run $HANDED_RUN" run_finished "$HANDED_RUN"
[ "$(run_state "$HANDED_RUN")" = "succeeded:" ] || fail "the handed run: $(run_state "$HANDED_RUN")"
attempts=$(q "SELECT launch_attempts FROM ironwod.sync_runs WHERE run_id = $HANDED_RUN")
[ "$attempts" = 1 ] || fail "run $HANDED_RUN, handed to a worker that left for the copy, counts $attempts launch attempts, want 1"
echo "ok - a run handed to an idle worker that leaves with it for CREATE DATABASE ... TEMPLATE stays queued, starts once the supervisor is back, and counts one launch attempt, not two"

# ---- 4. DROP DATABASE with workers idle ----------------------------------------
wait_for "a run worker to idle" some_idle
warnings=$(grep -c 'named by ironwod.database_name does not exist' "$LOG" || true)
out=$(admin 'DROP DATABASE metrics' 2>&1) || fail "DROP DATABASE with ironwod idle in its database: $out"
wait_for "the launcher to say that metrics is missing" missing_said
[ "$(admin "SELECT count(*) FROM pg_stat_activity WHERE backend_type IN ('ironwod supervisor', 'ironwod run')")" = 0 ] ||
    fail "an ironwod supervisor or run worker is still there after DROP DATABASE"
! grep -q 'FATAL:' "$LOG" || fail "a FATAL in the server log: $(grep 'FATAL:' "$LOG" | head -3)"
echo "ok - DROP DATABASE of ironwod's database while run workers idle succeeds; the launcher waits for it to exist again, with its one warning, and nothing FATAL is logged"

# ---- 5. a command that comes after the launcher looked --------------------------
# The launcher looks whether a session waits for metrics just before it starts
# the supervisor; a command may come in between.  The postmaster is held stopped
# (SIGSTOP) while metrics is created again, so that the launcher looks and asks
# for a supervisor that is not forked yet; a rename then takes metrics' lock in
# an open transaction, and the postmaster is let go.  The supervisor looks again
# before it connects and leaves with its LOG line, instead of waiting for the
# lock and dying FATAL of the renamed database once the rename commits.
PM_PID=$(head -1 "$WORK/data/postmaster.pid")
mkfifo "$WORK/late.fifo"
PGDATABASE=postgres psql -qAtX -v ON_ERROR_STOP=1 <"$WORK/late.fifo" >"$WORK/late.out" 2>&1 &
LATE_PID=$!
exec 4>"$WORK/late.fifo"
said() { grep -q "^$1\$" "$WORK/late.out" || { kill -0 "$LATE_PID" 2>/dev/null || fail "the late session: $(cat "$WORK/late.out")"; false; }; }
echo "SELECT 'connected';" >&4
wait_for "the late session" said connected
starts=$(grep -c 'exists now; starting the ironwod supervisor' "$LOG" || true)
supervisors_left=$(left "ironwod supervisor")
hold "$PM_PID"
echo "CREATE DATABASE metrics; SELECT 'created';" >&4
wait_for "metrics created again" said created
launcher_started() { [ "$(grep -c 'exists now; starting the ironwod supervisor' "$LOG")" -gt "$starts" ]; }
wait_for "the launcher to ask for a supervisor" launcher_started
echo "BEGIN; ALTER DATABASE metrics RENAME TO metrics_late; SELECT 'renamed';" >&4
wait_for "the rename, in its open transaction" said renamed
release "$PM_PID"
supervisor_left_late() { [ "$(left "ironwod supervisor")" -gt "$supervisors_left" ]; }
supervisor_left_or_connecting() { supervisor_left_late || connecting; }
wait_for "the supervisor to meet the open rename" supervisor_left_or_connecting
supervisor_left_late || fail "the supervisor waits for metrics' lock behind the rename instead of leaving"
echo "COMMIT; SELECT 'committed';" >&4
wait_for "the rename to commit" said committed
exec 4>&-
wait "$LATE_PID"
admin 'DROP DATABASE metrics_late' >/dev/null
! grep -q 'FATAL:' "$LOG" || fail "a FATAL in the server log: $(grep 'FATAL:' "$LOG" | head -3)"
echo "ok - a rename that comes after the launcher looked and before the supervisor connects: the supervisor looks again, leaves with a LOG line, and nothing FATAL is logged"

