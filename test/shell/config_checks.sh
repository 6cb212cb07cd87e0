#!/usr/bin/env bash
# Configuration problems found early, on a throwaway cluster of its own:
#
#  1. the server starts while the database named by ironwod.database_name does
#     not exist: the launcher says so once, with the fix, instead of a FATAL
#     every ten seconds, and starts the supervisor as soon as the database is
#     created;
#  2. ironwod.check_config() names cause and fix for: no master key registered,
#     a key command in a directory the server cannot search (what test/devkey.sh
#     run as root leaves), a key command that is not executable, pg_hba.conf
#     letting the worker role in (and reject lines placed after the lines that
#     match first), and says all is well once everything is right; the
#     supervisor logs each problem as a WARNING after the reload that caused it;
#  3. what the key command prints, as a validate worker sees it (ids and counts
#     only, never a key): garbage, a key that does not match the registered
#     public key, the registered key missing, a failing command, a hanging one;
#  4. the key command as a run worker meets it: a hanging one is killed, with
#     its whole process group, after ironwod.master_key_command_timeout_ms and
#     fails the run as key_command_timeout, a failing one as key_command_failed,
#     a garbage-printing one as key_command_output, and each opens the gym's
#     circuit breaker at once instead of being retried every tick; a validate
#     worker that outlives ironwod.watchdog_timeout is stopped by the watchdog;
#
# Usage: bash test/shell/config_checks.sh  (PGBIN may name a PostgreSQL 15 bin
# directory that already has this build of ironwod installed.)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=test/cluster.sh
source "$REPO/test/cluster.sh"

shell_test_work config
LOG=$WORK/data/server.log
# Wait for a condition; the bound is for a broken server, not a pace.

start_sim 7 1 small --rate 1000 --burst 1000

# ---- 1. the database does not exist yet ------------------------------------
start_cluster ironwod "ironwod.naptime = 2000" "ironwod.database_name = 'metrics'"
warned() { grep -q 'WARNING:  database "metrics" named by ironwod.database_name does not exist' "$LOG"; }
wait_for "the launcher's warning" warned
grep -q 'HINT:  Create it (CREATE DATABASE metrics)' "$LOG" || fail "no hint with the fix"
psql -qX -v ON_ERROR_STOP=1 -c 'CREATE DATABASE metrics' >/dev/null
supervising() { [ "$(psql -qAtX -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'ironwod supervisor' AND datname = 'metrics'")" = 1 ]; }
wait_for "the supervisor in metrics" supervising
[ "$(grep -c 'named by ironwod.database_name does not exist' "$LOG")" = 1 ] || fail "the warning was repeated"
grep -q 'LOG:  database "metrics" exists now; starting the ironwod supervisor' "$LOG" || fail "no notice when the database appeared"
! grep -q 'FATAL:' "$LOG" || fail "a FATAL in the server log: $(grep 'FATAL:' "$LOG" | head -3)"
echo "ok - missing database: one warning with the fix, no FATAL; the supervisor starts once it exists"

# ---- 2. ironwod.check_config() ------------------------------------------------
export PGDATABASE=metrics
psql -qX -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION ironwod' >/dev/null
# check NAME: "ok|message|hint" of one check
check() { psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT CASE WHEN ok THEN 't' ELSE 'f' END || '|' || message || '|' || coalesce(hint, '') FROM ironwod.check_config() WHERE check_name = '$1'"; }
expect() {
    local name=$1 want_ok=$2 pattern=$3 got
    got=$(check "$name")
    [ "${got%%|*}" = "$want_ok" ] && [[ $got == *$pattern* ]] || fail "check $name: want ok=$want_ok and '$pattern', got: $got"
}
# Reload, and wait until this server sees the new setting.
set_conf() {
    psql -qX -v ON_ERROR_STOP=1 -c "ALTER SYSTEM SET $1 = '$2'" -c 'SELECT pg_reload_conf()' >/dev/null
    seen() { [ "$(psql -qAtX -c "SELECT current_setting('$1')")" = "$2" ]; }
    wait_for "$1 to be reloaded" seen "$1" "$2"
}
supervisor_warned() { grep -q "WARNING:  ironwod configuration problem ($1)" "$LOG"; }

expect master_key f 'no master key is registered'
register_dev_key >/dev/null
expect master_key t 'API keys are sealed to master key "dev-1"'
expect database t 'the supervisor serves this database'
expect supervisor t 'is running'

# test/devkey.sh run as root into a fresh directory: root's, mode 0700.
ROOTKEYS=$WORK/rootkeys
mkdir -m 0700 "$ROOTKEYS"
warning=$(bash "$REPO/test/devkey.sh" "$ROOTKEYS" dev-1 2>&1 >/dev/null)
[[ $warning == *"belongs to root, so a server running as postgres cannot run"* ]] || fail "devkey.sh as root did not warn: $warning"
set_conf ironwod.master_key_command "$ROOTKEYS/master_key_command.sh"
expect master_key_command f "directory \"$ROOTKEYS\" (owner uid 0, mode 0700) cannot be searched by the server's OS user \"postgres\""
expect master_key_command f "chown postgres \"$ROOTKEYS\""
wait_for "the supervisor's warning about the key command" supervisor_warned master_key_command

# A key command that is not executable.
cp "$WORK/keys/master_key_command.sh" "$WORK/keys/not_executable.sh"
chmod 0644 "$WORK/keys/not_executable.sh"
chown postgres "$WORK/keys/not_executable.sh"
set_conf ironwod.master_key_command "$WORK/keys/not_executable.sh"
expect master_key_command f 'is not executable by the server'"'"'s OS user "postgres"'
set_conf ironwod.master_key_command "$WORK/keys/master_key_command.sh"
expect master_key_command t 'can be run by the server'"'"'s OS user "postgres"'

# pg_hba.conf: trust lines like initdb's let the worker role in; reject lines
# after them change nothing; reject lines first close both doors.
HBA=$WORK/data/pg_hba.conf
printf 'local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' >"$HBA"
chown postgres "$HBA"
expect worker_pg_hba f 'admits it over the Unix socket (trust)'
printf 'local all ironwod_worker reject\nhost all ironwod_worker all reject\n' >>"$HBA"
expect worker_pg_hba f 'admits it over the Unix socket (trust)'
{ printf 'local all ironwod_worker reject\nhost all ironwod_worker all reject\n'; cat "$HBA"; } >"$HBA.new"
mv "$HBA.new" "$HBA"
chown postgres "$HBA"
expect worker_pg_hba t 'rejects "ironwod_worker" before any rule'
# only the network closed: the socket stays open
{ printf 'host all ironwod_worker all reject\n'; grep -v '^local all ironwod_worker reject' "$HBA"; } >"$HBA.new"
mv "$HBA.new" "$HBA"
chown postgres "$HBA"
expect worker_pg_hba f 'admits it over the Unix socket'
{ printf 'local all ironwod_worker reject\n'; cat "$HBA"; } >"$HBA.new"
mv "$HBA.new" "$HBA"
chown postgres "$HBA"
psql -qAtX -c 'SELECT pg_reload_conf()' >/dev/null

# What the command prints, as a validate worker sees it.
expect master_key_output t 'the command prints 1 key (dev-1); every registered master key is among them and matches'
script() {   # script NAME BODY: a key command owned by the server, mode 0755
    printf '#!/bin/sh\n%s\n' "$2" >"$WORK/keys/$1"
    chown postgres "$WORK/keys/$1"
    chmod 0755 "$WORK/keys/$1"
    set_conf ironwod.master_key_command "$WORK/keys/$1"
}
script garbage.sh 'echo "hello from the KMS"'
expect master_key_output f 'line 1 of the output of ironwod.master_key_command is malformed'
expect master_key_output f 'sudo -u postgres'
wait_for "the supervisor's warning about the output" supervisor_warned master_key_output
OTHER=$(mktemp -d "$WORK/other.XXXXXX")
bash "$REPO/test/devkey.sh" "$OTHER" dev-1 >/dev/null 2>&1
chown -R postgres "$OTHER"
script wrong_key.sh "cat '$OTHER/master.keys'"
expect master_key_output f 'key "dev-1" is not the private half of the registered public key'
script missing_key.sh "echo 'dev-2 $(printf '%064d' 7)'"
expect master_key_output f 'registered key "dev-1" (the active one) is not printed'
script failing.sh 'echo "KMS unreachable" >&2; exit 3'
expect master_key_output f 'ironwod.master_key_command failed'
# A command that hangs: reported as such once the probe's wait runs out (the
# command sleeps far longer than that wait, so a busy machine cannot blur the two).
script hanging.sh 'exec sleep 25'
got=$(psql -qAtX -v ON_ERROR_STOP=1 -c "SET ironwod.validate_timeout_ms = 3000" \
      -c "SELECT message || '|' || hint FROM ironwod.check_config() WHERE check_name = 'master_key_output'")
[[ $got == *'did not finish within 3000 ms: it hangs, or waits for input'* ]] || fail "hanging command: $got"
set_conf ironwod.master_key_command "$WORK/keys/master_key_command.sh"
grep -q 'hello from the KMS' "$LOG" && fail "the command's output reached the server log"

bad=$(psql -qAtX -c "SELECT string_agg(check_name || ': ' || message, '; ') FROM ironwod.check_config() WHERE NOT ok")
[ -z "$bad" ] || fail "checks still failing with a good configuration: $bad"
echo "ok - ironwod.check_config(): missing master key, unsearchable key directory, non-executable command, pg_hba order, garbage, wrong or missing keys, a failing or hanging command; all clear when right"

# ---- 4. the key command as a run worker meets it ------------------------------
KEY=$(curl -sf "$SIM_URL/_sim/gyms" | python3 -c 'import json, sys; print(json.load(sys.stdin)["gyms"][0]["api_key"])')
T=73737373-0000-0000-0000-000000000001
G=73737373-0000-0000-0000-0000000000a1
# one implicit transaction: the scope holds for the statement after it
scoped() { psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT ironwod_set_scope('$T', '$G'); $1" | tail -n +2; }
run_state() { psql -qAtX -c "SELECT status || ':' || coalesce(error_code, '') FROM ironwod.sync_runs WHERE tenant_id = '$T' AND gym_id = '$G' AND run_id = $1"; }
breaker() { psql -qAtX -c "SELECT c.status || ':' || (c.breaker_opened_at IS NOT NULL) || ':' || coalesce((c.next_retry_at > now())::text, 'none') FROM ironwod.integrations_wodify_connection c WHERE tenant_id = '$T' AND gym_id = '$G'"; }
# ironwod.seal_key seals a plaintext key, which ironwod.allow_plaintext_keys (where
# this build has it) refuses unless a superuser turns it on: the test's own
# superuser session does, for its transaction only.
ALLOW="SELECT count(set_config(name, 'on', true)) FROM pg_settings WHERE name = 'ironwod.allow_plaintext_keys';"
scoped "$ALLOW SELECT ironwod_connect('$T', '$G', ironwod.seal_key('$T', '$G', '$KEY'))" >/dev/null
backfill=$(psql -qAtX -c "SELECT max(run_id) FROM ironwod.sync_runs WHERE tenant_id = '$T' AND gym_id = '$G' AND mode = 'backfill'")
wait_for "the backfill" run_finished "$backfill"
[ "$(run_state "$backfill")" = "succeeded:" ] || fail "backfill: $(run_state "$backfill")"

CHILDREN=$WORK/keys/children
: >"$CHILDREN"
chown postgres "$CHILDREN"
set_conf ironwod.master_key_command_timeout_ms 2s
# key_run NAME BODY CODE WHAT: the command, an incremental run failing with CODE
key_run() {
    local run
    script "$1" "$2"
    run=$(scoped "SELECT ironwod_sync('$T', '$G', 'incremental')")
    wait_for "the run with $1" run_finished "$run"
    [ "$(run_state "$run")" = "failed:$3" ] || fail "$4: run $run ended $(run_state "$run"), want failed:$3"
    [ "$(breaker)" = "error:true:true" ] || fail "$4: the breaker is not open (status:open:retry later = $(breaker))"
    queued=$(psql -qAtX -c "SELECT count(*) FROM ironwod.sync_runs WHERE tenant_id = '$T' AND gym_id = '$G' AND status IN ('queued', 'running')")
    [ "$queued" = 0 ] || fail "$4: a run was queued again"
}
# The hanging command leaves a child in its process group, which must die too.
key_run hang.sh "sleep 600 & echo \$! >>'$CHILDREN'; wait" key_command_timeout "a hanging command"
grep -q 'ironwod.master_key_command did not finish within 2000 ms; its process group was killed' "$LOG" ||
    fail "no timeout message in the log"
children_gone() { local p; for p in $(cat "$CHILDREN"); do kill -0 "$p" 2>/dev/null && return 1; done; return 0; }
[ -s "$CHILDREN" ] || fail "the hanging command never ran"
wait_for "the hanging command's children to be killed" children_gone
key_run fail.sh 'echo "KMS unreachable" >&2; exit 3' key_command_failed "a failing command"
key_run junk.sh 'echo "hello from the KMS"' key_command_output "a garbage-printing command"
grep -q 'hello from the KMS' "$LOG" && fail "the command's output reached the server log"
set_conf ironwod.master_key_command "$WORK/keys/master_key_command.sh"
run=$(scoped "SELECT ironwod_sync('$T', '$G', 'incremental')")
wait_for "the run with the good command" run_finished "$run"
[ "$(run_state "$run")" = "succeeded:" ] || fail "with the command fixed: $(run_state "$run")"
[ "$(breaker)" = "connected:false:none" ] || fail "the breaker did not close: $(breaker)"
echo "ok - key command under its timeout: hanging (process group killed), failing and garbage commands fail the run with their own codes and open the breaker; fixed, the gym syncs again"

# A validate worker the key command keeps forever (no command timeout to speak
# of) and whose asker waits ten minutes: the watchdog stops it.
set_conf ironwod.master_key_command_timeout_ms 1h
set_conf ironwod.watchdog_timeout 10s
: >"$CHILDREN"
script hang_forever.sh "sleep 600 & echo \$! >>'$CHILDREN'; wait"
psql -qAtX -c "SET ironwod.validate_timeout_ms = 600000" -c "SELECT message FROM ironwod.probe_master_key_command()" \
    >"$WORK/probe.out" 2>&1 &
probe=$!
probe_done() { ! kill -0 "$probe" 2>/dev/null; }
wait_for "the watchdog to stop the validate worker" probe_done
grep -q 'validation worker exited without a verdict' "$WORK/probe.out" || fail "probe: $(cat "$WORK/probe.out")"
grep -q 'LOG:  ironwod validate worker [0-9]* stopped by the watchdog: running for more than 10 s' "$LOG" ||
    fail "no watchdog line in the log"
wait_for "the stopped worker's command to be killed" children_gone
set_conf ironwod.master_key_command "$WORK/keys/master_key_command.sh"
echo "ok - the watchdog stops a validate worker that outlives ironwod.watchdog_timeout, and its command with it"
