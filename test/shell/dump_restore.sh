#!/usr/bin/env bash
# Backups that restore, on throwaway clusters of its own:
#
#  1. cluster A connects a simulator gym, backfills it, and an admin edits a row
#     of the entity registry;
#  2. pg_dump of A's database, restored (pg_restore --single-transaction) into a
#     fresh cluster B under another database name: first refused with a hint
#     while ironwod.database_name names another database, then, following the
#     README's procedure, accepted;
#  3. B holds what A held: the row count of every ironwod table, every sequence,
#     the registry (the edited row included, nothing doubled) and the digest of
#     canonical tables, facts and caches (ironwod.digest, then ironwod_replay);
#  4. B resumes: an incremental run opens the restored sealed key with the same
#     master key command, starts from the restored watermarks and succeeds;
#  5. DROP EXTENSION then CREATE EXTENSION works on B; the roles stay behind.
#
# Usage: bash test/shell/dump_restore.sh  (PGBIN may name a PostgreSQL 15 bin
# directory that already has this build of ironwod installed.)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"

TOP=$(mktemp -d /tmp/ironwod-dump.XXXXXX)
WORK=$TOP
stop_both() {
    for d in "$TOP/data" "$TOP/b/data"; do
        [ -f "$d/postmaster.pid" ] && su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D '$d' -m fast -w stop" >/dev/null 2>&1
    done
    WORK=$TOP stop_all
}
trap 'rc=$?; stop_both; if [ $rc = 0 ]; then rm -rf "$TOP"; else echo "kept $TOP for inspection"; fi' EXIT
ensure_installed
as_pg() { su postgres -s /bin/sh -c "$*"; }

T=44444444-4444-4444-4444-444444444444
G=44444444-0000-0000-0000-000000000001

start_sim 7 1 small --rate 1000 --burst 1000

# ---- 1. cluster A: a backfilled gym and an edited registry row --------------
start_cluster ironwod "ironwod.naptime = 2000"
A_HOST=$PGHOST A_PORT=$PGPORT A_KEYCMD="$TOP/keys/master_key_command.sh"
psql -qX -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION ironwod' >/dev/null
register_dev_key >/dev/null
API_KEY=$(curl -sf "$SIM_URL/_sim/gyms" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gyms"][0]["api_key"])')
SEALED=$(printf %s "$API_KEY" | seal_key "$T" "$G")
status=$(psql -qAtX -v ON_ERROR_STOP=1 -v sealed="$SEALED" <<SQL
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SELECT ironwod_connect('$T', '$G', :'sealed'::bytea) \\g /dev/null
COMMIT;
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SELECT ironwod_wait((SELECT max(run_id) FROM ironwod.sync_runs WHERE mode = 'backfill'), '10 minutes');
COMMIT;
SQL
)
[ "$status" = succeeded ] || fail "backfill on A: $status"
psql -qX -v ON_ERROR_STOP=1 -c "UPDATE ironwod.entities SET page_size = 50 WHERE entity = 'programs'" >/dev/null

# What a restore must reproduce: rows per table, sequence positions, the registry
# and the gym's digest.
snapshot() {
    psql -qAtX -v ON_ERROR_STOP=1 -d "$1" <<SQL
SELECT format('%s rows=%s', c.relname,
              (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %s', c.oid::regclass), false, true, '')))[1])
FROM pg_class c WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind = 'r' ORDER BY 1;
SELECT format('%s last_value=%s', s.sequencename, s.last_value) FROM pg_sequences s
WHERE s.schemaname = 'ironwod' ORDER BY 1;
SELECT format('registry %s', string_agg(format('%s:%s:%s', entity, path, page_size), ',' ORDER BY ordinal))
FROM ironwod.entities;
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SELECT 'digest ' || ironwod.digest('$T', '$G');
COMMIT;
SQL
}
before=$(snapshot postgres)
grep -q '^wodify_raw_clients rows=[1-9]' <<<"$before" || fail "nothing landed on A: $before"
grep -q '^gym_monthly_metrics_cache rows=[1-9]' <<<"$before" || fail "no cache on A"
DUMP=$TOP/metrics.dump
"$PGBIN/pg_dump" -Fc -d postgres -f "$DUMP"
"$PGBIN/pg_restore" -l "$DUMP" > "$TOP/toc"
grep -q 'TABLE DATA ironwod wodify_raw_clients' "$TOP/toc" || fail "the dump has no raw data"
# Of the registry, only the edited row is in the dump (CREATE EXTENSION writes the rest).
registry=$("$PGBIN/pg_restore" -a -t entities -f - "$DUMP" | sed -n '/^COPY ironwod.entities /,/^\\\.$/p' | sed '1d;$d' | cut -f1)
[ "$registry" = programs ] || fail "registry rows in the dump: '$registry' (want only the edited programs row)"

# ---- 2. cluster B: restore under another database name ----------------------
WORK=$TOP/b
mkdir -p "$WORK"
start_cluster ironwod "ironwod.naptime = 2000" "ironwod.master_key_command = '$A_KEYCMD'"
B_PORT=$PGPORT
psql -qX -v ON_ERROR_STOP=1 -c 'CREATE DATABASE metrics_restored' >/dev/null
out=$("$PGBIN/pg_restore" --single-transaction -d metrics_restored "$DUMP" 2>&1 || true)
grep -q 'ironwod can only be installed in database "postgres"' <<<"$out" || fail "restore into another database was not refused: $out"
grep -q "HINT:  .*ironwod.database_name = 'metrics_restored'" <<<"$out" || fail "no hint naming the setting: $out"
[ "$(psql -qAtX -d metrics_restored -c "SELECT count(*) FROM pg_namespace WHERE nspname = 'ironwod'")" = 0 ] \
    || fail "a refused single-transaction restore left ironwod behind"
# The README's procedure: name the database, restart, restore.
psql -qX -v ON_ERROR_STOP=1 -c "ALTER SYSTEM SET ironwod.database_name = 'metrics_restored'" >/dev/null
as_pg "$PGBIN/pg_ctl -D '$WORK/data' -m fast -w restart" >/dev/null
"$PGBIN/pg_restore" --single-transaction --exit-on-error -d metrics_restored "$DUMP"

# ---- 3. B holds what A held --------------------------------------------------
after=$(snapshot metrics_restored)
[ "$after" = "$before" ] || fail "restored database differs:
$(diff <(echo "$before") <(echo "$after") || true)"
grep -q 'programs:/programs:50,' <<<"$after" || fail "the edited registry row did not survive"
replayed=$(psql -qAtX -v ON_ERROR_STOP=1 -d metrics_restored <<SQL
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SELECT 'digest ' || ironwod_replay('$T', '$G');
COMMIT;
SQL
)
[ "$replayed" = "$(echo "$before" | grep '^digest ')" ] || fail "replay on B gives another digest: $replayed"
echo "ok - restored under another name: $(echo "$after" | grep -c rows=) tables, $(echo "$after" | grep -c last_value=) sequences, registry edit and digest equal"

# ---- 4. B resumes syncing ----------------------------------------------------
out=$(psql -qAtX -v ON_ERROR_STOP=1 -d metrics_restored <<SQL
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SELECT ironwod_sync('$T', '$G', 'incremental') AS run \\gset
COMMIT;
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SELECT ironwod_wait(:run, '5 minutes');
-- it started from the restored watermarks, not from scratch
SELECT string_agg(entity || '=' || cursor_start, ',' ORDER BY entity) FROM ironwod.sync_run_entities
WHERE run_id = :run;
SELECT count(*) FROM ironwod.sync_runs WHERE run_id < :run;
COMMIT;
SQL
)
a=$(psql -qAtX -h "$A_HOST" -p "$A_PORT" -d postgres <<'SQL'
SELECT string_agg(entity || '=' || watermark, ',' ORDER BY entity) FROM ironwod.entity_cursors;
SELECT count(*) FROM ironwod.sync_runs;
SQL
)
[ "$out" = "succeeded
$a" ] || fail "incremental on B:
$out
expected: succeeded, then A's watermarks and run count:
$a"
echo "ok - the restored database resumes: incremental run with the restored sealed key and watermarks"

# ---- 5. DROP EXTENSION, CREATE EXTENSION -------------------------------------
out=$(psql -qAtX -v ON_ERROR_STOP=1 -d metrics_restored <<'SQL'
DROP EXTENSION ironwod;
SELECT count(*) FROM pg_namespace WHERE nspname = 'ironwod';
SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname LIKE 'ironwod\_%';
CREATE EXTENSION ironwod;
SELECT count(*) FROM ironwod.entities;
SELECT count(*) FROM ironwod.sync_runs;
SQL
)
[ "$out" = "0
ironwod_admin,ironwod_app,ironwod_worker
8
0" ] || fail "DROP EXTENSION then CREATE EXTENSION: $out"
echo "ok - DROP EXTENSION then CREATE EXTENSION works; the three roles stay behind"
