#!/usr/bin/env bash
# The upgrade path from the first release, on a throwaway cluster of its own:
#
#  1. CREATE EXTENSION ironwod VERSION '1.0' (the frozen, committed install
#     script), register the master key, connect a simulator gym and backfill it;
#  2. ALTER EXTENSION ironwod UPDATE to the default version, following the
#     committed upgrade scripts;
#  3. the data is intact: the row count of every table that existed in 1.0,
#     every sequence and every metrics cache row (the install-time rows of the
#     registry and the raw -> canonical maps are the update's); the memberships' new
#     program_ids, which the update fills from raw, are what a fresh transform
#     writes: ironwod_replay gives the upgraded gym's digest;
#  4. ironwod.check_config() reports the versions; at a version the library
#     does not drive, the supervisor idles with one WARNING;
#  5. the schema equals a fresh install of the default version: pg_dump
#     --schema-only of the upgraded database against that of a fresh
#     CREATE EXTENSION in the same cluster.  pg_dump writes an extension's
#     objects only in --binary-upgrade mode; the OID-setting calls of that mode
#     differ between any two installs and are left out of the comparison;
#  6. the upgraded database syncs: an incremental run succeeds.
#
# Usage: bash test/shell/upgrade.sh  (PGBIN may name a PostgreSQL 15 bin
# directory that already has this build of ironwod installed.)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"

shell_test_work upgrade

FROM=1.0
TO=$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$REPO/ironwod.control")
[ "$FROM" != "$TO" ] || fail "default_version is still $FROM: there is nothing to upgrade to"
T=55555555-5555-5555-5555-555555555555
G=55555555-0000-0000-0000-000000000001

start_sim 11 1 small --rate 1000 --burst 1000
start_cluster ironwod "ironwod.naptime = 2000"

# ---- 1. 1.0 with a backfilled gym --------------------------------------------
psql -qX -v ON_ERROR_STOP=1 -c "CREATE EXTENSION ironwod VERSION '$FROM'" >/dev/null
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
[ "$status" = succeeded ] || fail "backfill on $FROM: $status"

# Rows per table and sequence positions (of what 1.0 has), and the gym's cache rows.
snapshot() {
    psql -qAtX -v ON_ERROR_STOP=1 -v tables="$tables" <<SQL
SELECT format('%s rows=%s', c.relname,
              (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %s', c.oid::regclass), false, true, '')))[1])
FROM pg_class c WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind = 'r' AND c.relname = ANY (:'tables'::text[])
ORDER BY 1;
SELECT format('%s last_value=%s', s.sequencename, s.last_value) FROM pg_sequences s
WHERE s.schemaname = 'ironwod' AND s.sequencename = ANY (:'tables'::text[]) ORDER BY 1;
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SELECT 'cache ' || md5(string_agg((to_jsonb(c) - 'computed_at')::text, E'\n' ORDER BY c.location_key, c.program_key, c.month_start))
FROM ironwod.gym_monthly_metrics_cache c WHERE c.tenant_id = '$T' AND c.gym_id = '$G';
COMMIT;
SQL
}
# The gym-wide and location rows, without what the definitions version changes.
all_rows() {
    psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT md5(string_agg((to_jsonb(c) - 'computed_at' - 'definitions_version' - 'config_hash')::text, E'\\n'
                                              ORDER BY c.location_key, c.month_start))
                                      FROM ironwod.gym_monthly_metrics_cache c
                                      WHERE c.tenant_id = '$T' AND c.gym_id = '$G' AND c.program_key = 'ALL'"
}
digest() {
    psql -qAtX -v ON_ERROR_STOP=1 <<SQL
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SELECT 'digest ' || $1('$T', '$G');
COMMIT;
SQL
}
# The install-time rows of the tables without a tenant (registry, raw -> canonical
# maps) are the update's to change; every other table and sequence is data.
tables=$(psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT array_agg(relname) FROM pg_class c WHERE relnamespace = 'ironwod'::regnamespace AND relkind IN ('r', 'S')
    AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'installed_definition' AND NOT a.attisdropped)")
before=$(snapshot)
all_before=$(all_rows)
grep -q '^wodify_raw_clients rows=[1-9]' <<<"$before" || fail "nothing landed on $FROM: $before"
grep -q '^gym_monthly_metrics_cache rows=[1-9]' <<<"$before" || fail "no cache on $FROM"

# ---- 2. ALTER EXTENSION ironwod UPDATE ----------------------------------------
psql -qX -v ON_ERROR_STOP=1 -c 'ALTER EXTENSION ironwod UPDATE' >/dev/null
v=$(psql -qAtX -c "SELECT extversion FROM pg_extension WHERE extname = 'ironwod'")
[ "$v" = "$TO" ] || fail "after ALTER EXTENSION ironwod UPDATE the version is $v, not $TO"

# ---- 3. the data is intact ----------------------------------------------------
after=$(snapshot)
[ "$after" = "$before" ] || fail "the update changed the data:
$(diff <(echo "$before") <(echo "$after") || true)"
psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT count(*) FILTER (WHERE program_ids IS NOT NULL) > 0 FROM ironwod.memberships" | grep -qx t ||
    fail "the update filled no membership's program_ids from raw"
# The update moved the gym to the metrics-v1.1 definitions: its next refresh (the
# worker's, after the next run) recomputes every month and adds the program rows;
# the ALL rows come out as 1.0 computed them, relabelled.
refresh=$(psql -qAtX -v ON_ERROR_STOP=1 <<SQL
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SET LOCAL ROLE ironwod_worker;
SELECT r->>'full' FROM ironwod.refresh_metrics((SELECT max(run_id) FROM ironwod.sync_runs WHERE tenant_id = '$T' AND gym_id = '$G')) r;
SELECT count(*) FROM ironwod.gym_monthly_metrics_cache WHERE program_key <> 'ALL';
COMMIT;
SQL
)
refresh=$(echo $refresh)
case "$refresh" in "true "[1-9]*) ;; *) fail "the first refresh after the update (full, program rows): $refresh" ;; esac
[ "$(all_rows)" = "$all_before" ] || fail "the refresh after the update changed the ALL rows beyond their definitions version and config hash"
upgraded=$(digest ironwod.digest)
replayed=$(digest ironwod_replay)
[ "$replayed" = "$upgraded" ] || fail "replay after the update gives another digest than the upgraded tables: $replayed, not $upgraded"
echo "ok - $FROM to $TO: $(echo "$after" | grep -c rows=) tables, $(echo "$after" | grep -c last_value=) sequences and the cache intact, program_ids filled as a replay fills them; the next refresh adds $(echo "$refresh" | cut -d' ' -f2) program rows, keeps the ALL rows and equals a replay"

# ---- 4. the version check and a version the library does not drive ----------
version_check() {
    psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT ok || '|' || message || '|' || coalesce(hint, '') FROM ironwod.check_config() WHERE check_name = 'version'"
}
out=$(version_check)
[ "$out" = "true|the extension and the loaded library are both version $TO|" ] || fail "check_config version after the update: $out"
# A catalog edit stands in for an extension at a version this library does not
# drive (a package downgrade): the supervisor starts nothing and says so once.
psql -qX -v ON_ERROR_STOP=1 -c "UPDATE pg_extension SET extversion = '0.9' WHERE extname = 'ironwod'" >/dev/null
out=$(version_check)
case "$out" in
    "false|the extension is at version 0.9, which the loaded library (version $TO) does not drive, so no run starts|Run ALTER EXTENSION ironwod UPDATE"*) ;;
    *) fail "check_config version at 0.9: $out" ;;
esac
deadline=$(( $(date +%s) + 120 ))
until grep -q 'WARNING:  ironwod supervisor idles: the extension is at version 0.9' "$WORK/data/server.log"; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "no supervisor WARNING at version 0.9"
    # wake the supervisor for a tick, then wait a moment on its latch broadcast
    psql -qAtX -c 'SELECT ironwod.wake()' -c 'SELECT ironwod.wait_for_change(200)' >/dev/null
done
psql -qX -v ON_ERROR_STOP=1 -c "UPDATE pg_extension SET extversion = '$TO' WHERE extname = 'ironwod'" >/dev/null
echo "ok - check_config reports the extension and library versions; at a version the library does not drive the supervisor idles with a WARNING"

# ---- 5. the schema equals a fresh install ------------------------------------
# Only what describes objects: the OID- and xid-setting statements of that mode,
# the comments and blank lines go.
schema() {
    "$PGBIN/pg_dump" --schema-only --binary-upgrade -d postgres |
        perl -0pe 's/^UPDATE pg_catalog\.pg_class\nSET relfrozenxid = [^;]*;\n//mg' |
        grep -v -e 'pg_catalog.binary_upgrade_' -e '^--' -e '^$' -e "^SELECT pg_catalog.set_config('search_path'" \
            -e '^SELECT pg_catalog.setval(' -e '^.restrict ' -e '^.unrestrict '
}
schema >"$WORK/upgraded.sql"
# pg_extension_config_dump's registrations are part of the schema a dump depends on.
extconfig() {
    psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT c::regclass || ' ' || coalesce(w, '') FROM pg_extension e,
        unnest(e.extconfig, e.extcondition) AS x(c, w) WHERE e.extname = 'ironwod' ORDER BY 1"
}
extconfig >"$WORK/upgraded.extconfig"
# Back to the state of the upgrade's start, then the new version fresh.
sync_after=$(psql -qAtX -v ON_ERROR_STOP=1 <<SQL
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SELECT ironwod_sync('$T', '$G', 'incremental') AS run \\gset
COMMIT;
BEGIN;
SELECT ironwod_set_scope('$T', '$G') \\g /dev/null
SELECT ironwod_wait(:run, '5 minutes');
COMMIT;
SQL
)
[ "$sync_after" = succeeded ] || fail "an incremental run after the update: $sync_after"
echo "ok - the upgraded database syncs: an incremental run succeeded"
psql -qX -v ON_ERROR_STOP=1 -c 'DROP EXTENSION ironwod' -c 'CREATE EXTENSION ironwod' >/dev/null
schema >"$WORK/fresh.sql"
extconfig >"$WORK/fresh.extconfig"
diff -u "$WORK/fresh.sql" "$WORK/upgraded.sql" >"$WORK/schema.diff" ||
    fail "the upgraded schema differs from a fresh install of $TO (- fresh, + upgraded); every schema change goes into sql/modules/ and into the upgrade script to $TO as well (README, Upgrades):
$(head -80 "$WORK/schema.diff")"
diff -u "$WORK/fresh.extconfig" "$WORK/upgraded.extconfig" ||
    fail "pg_extension_config_dump registrations differ (- fresh, + upgraded)"
echo "ok - the upgraded schema equals a fresh install of $TO ($(wc -l <"$WORK/fresh.sql") lines of pg_dump --schema-only)"
