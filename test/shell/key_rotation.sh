#!/usr/bin/env bash
# Key rotation without downtime, end to end and during running syncs, on a cluster
# and simulator of its own:
#
#  1. a gym's API key (ironwod_rotate_key): a key Wodify refuses is refused and
#     changes nothing; a good one is validated by a worker, waits beside the old
#     key while a run (held by the simulator) is running, and replaces it in the
#     transaction that ends that run, which finishes with the old key; from then
#     on nothing uses the old key (the simulator counts requests by key, and the
#     old key is revoked there); with no run running, a rotation is immediate;
#  2. the master key: with a run held and a rotated key waiting beside the old one,
#     the key command prints a second master key, which is registered; the old
#     one cannot be retired while ciphertext uses it; ironwod_rewrap() re-seals
#     every key (the waiting one too) in a worker; the old key is retired and
#     dropped from the command; the held run finishes, and every gym syncs.
#     Another gym syncs after every step: no gym is unable to sync at any moment.
#
# Usage: bash test/shell/key_rotation.sh  (PGBIN may name a PostgreSQL 15 bin
# directory that already has this build of ironwod installed.)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"

shell_test_work rotate
# wait_for WHAT CMD...: the bound is for a broken server, not a pace
q() { psql -qAtX -v ON_ERROR_STOP=1 -c "$1"; }
# ironwod.seal_key seals a plaintext key, which ironwod.allow_plaintext_keys (where
# this build has it) refuses unless a superuser turns it on: the test's own
# superuser session does, for its transaction only.
ALLOW="SELECT count(set_config(name, 'on', true)) FROM pg_settings WHERE name = 'ironwod.allow_plaintext_keys';"
# one implicit transaction: the scope (and ALLOW) hold for the statement after them
scoped() { psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT ironwod_set_scope('$1', '$2'); $ALLOW $3" | tail -n +3; }

start_sim 13 2 small --rate 1000 --burst 1000
start_cluster ironwod "ironwod.naptime = 2000" "ironwod.requests_per_second = 500" "ironwod.burst = 100" \
    "ironwod.cluster_requests_per_second = 5000" "ironwod.max_retries = 3"
q 'CREATE EXTENSION ironwod' >/dev/null
register_dev_key >/dev/null
KEY0=$(sim GET /_sim/gyms | json 'd["gyms"][0]["api_key"]')
KEY1=$(sim GET /_sim/gyms | json 'd["gyms"][1]["api_key"]')
NEW0=wdfy_rotated_gym0_0000000000000001
NEW1=wdfy_rotated_gym1_0000000000000001
IDLE0=wdfy_rotated_gym0_0000000000000002
for k in "0 $NEW0" "1 $NEW1" "0 $IDLE0"; do
    sim POST /_sim/keys "{\"gym\": ${k%% *}, \"api_key\": \"${k#* }\"}" >/dev/null
done
A=(74747474-0000-0000-0000-000000000001 74747474-0000-0000-0000-0000000000a1)
B=(75757575-0000-0000-0000-000000000001 75757575-0000-0000-0000-0000000000a1)

seal() { echo "ironwod.seal_key('$1', '$2', '$3')"; }
conn() { q "SELECT $3 FROM ironwod.integrations_wodify_connection WHERE tenant_id = '$1' AND gym_id = '$2'"; }
uses() { sim GET /_sim/stats | json "d['by_key'].get('$1', 0)"; }
held() { [ "$(sim GET /_sim/faults | json 'd["held"]')" = 1 ]; }
hold_next_run() {   # hold_next_run KEY TENANT GYM: a backfill, held at its third request
    sim DELETE /_sim/faults >/dev/null
    sim POST /_sim/holds "{\"after\": 2, \"count\": 1, \"api_key\": \"$1\"}" >/dev/null
    HELD_RUN=$(scoped "$2" "$3" "SELECT ironwod_sync('$2', '$3', 'backfill')")
    wait_for "a request of run $HELD_RUN to be held" held
    [ "$(run_state "$HELD_RUN")" = "running:" ] || fail "run $HELD_RUN is not running under the hold"
}

scoped "${A[@]}" "SELECT ironwod_connect('${A[0]}', '${A[1]}', $(seal "${A[@]}" "$KEY0"))" >/dev/null
scoped "${B[@]}" "SELECT ironwod_connect('${B[0]}', '${B[1]}', $(seal "${B[@]}" "$KEY1"))" >/dev/null
for g in A B; do
    declare -n gym=$g
    run=$(q "SELECT max(run_id) FROM ironwod.sync_runs WHERE tenant_id = '${gym[0]}' AND mode = 'backfill'")
    wait_for "the backfill of $g" run_finished "$run"
    [ "$(run_state "$run")" = "succeeded:" ] || fail "backfill of $g: $(run_state "$run")"
done

# ---- 1. a gym's API key, during a running sync ----------------------------------
old_fp=$(conn "${A[@]}" api_key_fingerprint)
hold_next_run "$KEY0" "${A[@]}"
err=$(scoped "${A[@]}" "SELECT ironwod_rotate_key('${A[0]}', '${A[1]}', $(seal "${A[@]}" wdfy_nobody_knows_this_key_00001))" 2>&1) &&
    fail "a key Wodify refuses was accepted"
[[ $err == *'Wodify rejected the new API key'* ]] || fail "refused key: $err"
[ "$(conn "${A[@]}" "api_key_fingerprint || ':' || (next_api_key_ciphertext IS NULL)")" = "$old_fp:true" ] ||
    fail "a refused key changed the connection"
got=$(scoped "${A[@]}" "SELECT ironwod_rotate_key('${A[0]}', '${A[1]}', $(seal "${A[@]}" "$NEW0"))")
[ "$got" = pending ] || fail "rotation during a running run: $got, want pending"
[ "$(conn "${A[@]}" api_key_fingerprint)" = "$old_fp" ] || fail "the old key was replaced while its run was running"
new_uses=$(uses "$NEW0")
[ "$new_uses" = 1 ] || fail "the new key was used $new_uses times before its run ended, want 1 (its validation)"
sim POST /_sim/release >/dev/null
wait_for "the held run $HELD_RUN" run_finished "$HELD_RUN"
[ "$(run_state "$HELD_RUN")" = "succeeded:" ] || fail "the held run: $(run_state "$HELD_RUN")"
[ "$(uses "$NEW0")" = 1 ] || fail "the running run switched to the new key"
new_fp=$(conn "${A[@]}" api_key_fingerprint)
[ "$new_fp" != "$old_fp" ] && [ "$(conn "${A[@]}" "next_api_key_ciphertext IS NULL")" = t ] ||
    fail "the new key did not replace the old one when the run ended"
[ "$(q "SELECT count(*) FROM ironwod.sync_events WHERE tenant_id = '${A[0]}' AND event = 'wodify.key.rotated'")" = 1 ] ||
    fail "no wodify.key.rotated event"
old_uses=$(uses "$KEY0")
sim POST /_sim/keys "{\"api_key\": \"$KEY0\", \"revoke\": true}" >/dev/null
sync_ok "${A[@]}" incremental "with the old key revoked"
[ "$(uses "$KEY0")" = "$old_uses" ] || fail "the old key was used after the rotation committed"
[ "$(uses "$NEW0")" -gt 1 ] || fail "the new key was not used"
got=$(scoped "${A[@]}" "SELECT ironwod_rotate_key('${A[0]}', '${A[1]}', $(seal "${A[@]}" "$IDLE0"))")
[ "$got" = rotated ] || fail "rotation with no run running: $got, want rotated"
sim POST /_sim/keys "{\"api_key\": \"$NEW0\", \"revoke\": true}" >/dev/null
sync_ok "${A[@]}" incremental "after an immediate rotation, with the previous key revoked"
echo "ok - a gym's key: a refused key changes nothing; a good one waits for the running run, which finishes with the old key, replaces it as that run ends, and the old key is never used again; with no run, at once"

# ---- 2. the master key, during a running sync -----------------------------------
hold_next_run "$KEY1" "${B[@]}"
[ "$(scoped "${B[@]}" "SELECT ironwod_rotate_key('${B[0]}', '${B[1]}', $(seal "${B[@]}" "$NEW1"))")" = pending ] ||
    fail "B's rotation is not pending"
DEV2=$(bash "$REPO/test/devkey.sh" "$WORK/keys" dev-2)
[ "$(id -u)" = 0 ] && chown -R postgres "$WORK/keys"
sync_ok "${A[@]}" incremental "with the key command printing both master keys"
q "SELECT ironwod.register_master_key('dev-2', decode('${DEV2##* }', 'hex'))" >/dev/null
sync_ok "${A[@]}" incremental "with dev-2 registered, A's key still sealed to dev-1"
err=$(q "SELECT ironwod.retire_master_key('dev-1')" 2>&1) && fail "dev-1 was retired while keys use it"
[[ $err == *'master key "dev-1" still seals 3 API key(s)'* ]] || fail "retiring dev-1 in use: $err"
got=$(q "SELECT resealed || ':' || remaining FROM ironwod_rewrap()")
[ "$got" = "2:0" ] || fail "ironwod_rewrap(): $got, want 2 connections re-sealed, 0 remaining"
[ "$(q "SELECT string_agg(DISTINCT ironwod.sealed_key_id(k) || '/' || m, ',')
        FROM ironwod.integrations_wodify_connection c,
             LATERAL (VALUES (c.api_key_ciphertext, c.master_key_id),
                             (c.next_api_key_ciphertext, c.next_master_key_id)) v(k, m)
        WHERE k IS NOT NULL")" = "dev-2/dev-2" ] || fail "not every key is sealed to dev-2"
sync_ok "${A[@]}" incremental "after the rewrap"
q "SELECT ironwod.retire_master_key('dev-1')" >/dev/null
[ "$(q "SELECT string_agg(key_id, ',') FROM ironwod.master_keys")" = dev-2 ] || fail "dev-1 is still registered"
err=$(q "SELECT ironwod.retire_master_key('dev-2')" 2>&1) && fail "the active master key was retired"
[[ $err == *'is the active one'* ]] || fail "retiring the active key: $err"
grep '^dev-2 ' "$WORK/keys/master.keys" >"$WORK/keys/master.keys.new"
mv "$WORK/keys/master.keys.new" "$WORK/keys/master.keys"
[ "$(id -u)" = 0 ] && chown postgres "$WORK/keys/master.keys"
sync_ok "${A[@]}" incremental "with dev-1 retired and gone from the key command"
sim POST /_sim/release >/dev/null
wait_for "the held run $HELD_RUN" run_finished "$HELD_RUN"
[ "$(run_state "$HELD_RUN")" = "succeeded:" ] || fail "the run held through the master key rotation: $(run_state "$HELD_RUN")"
sim POST /_sim/keys "{\"api_key\": \"$KEY1\", \"revoke\": true}" >/dev/null
sync_ok "${B[@]}" incremental "B, with its rotated key re-sealed to dev-2"
echo "ok - master key rotation: dev-1 refused while in use, every key (a waiting one too) re-sealed by ironwod_rewrap(), dev-1 retired and dropped; the held run and every gym synced at every step"
