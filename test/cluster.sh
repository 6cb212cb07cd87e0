#!/usr/bin/env bash
# Shared by the test runners, the demo and the benches (sourced, not run): start the
# Wodify simulator and a throwaway PostgreSQL cluster with ironwod preloaded.
# PostgreSQL refuses to run as root, so the server runs as the postgres OS user;
# clients run as whoever we are and connect as the postgres database user.

SYSTEM_PGBIN=/usr/lib/postgresql/15/bin

fail() { echo "FAIL: $*" >&2; exit 1; }

# wait_for WHAT COMMAND...: run COMMAND until it succeeds.  The bound (600 s) is
# for a broken server, not a pace: nothing waits for a fixed time.
wait_for() {
    local what=$1 deadline=$((SECONDS + 600))
    shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || fail "timed out after 600 s waiting for $what"
        sleep 0.05
    done
}
export PG_CONFIG=${PG_CONFIG:-$SYSTEM_PGBIN/pg_config}

# wait_run_workers_gone: until no ironwod run worker is busy on the server psql
# reaches: each has exited or waits for its next run (ironwod.worker_idle_timeout;
# its query then reads "ironwod: waiting for the next run").  A run worker's
# function statistics reach pg_stat_user_functions as its run ends, a moment after
# the run's status changes: the benches wait for that, not for a pause.
# pg_stat_activity is read once per transaction unless told to read again.
wait_run_workers_gone() {
    psql -qAtX -v ON_ERROR_STOP=1 <<'SQL'
DO $w$
BEGIN
    FOR i IN 1..12000 LOOP
        EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'ironwod run'
                              AND query IS DISTINCT FROM 'ironwod: waiting for the next run');
        PERFORM pg_stat_clear_snapshot();
        PERFORM ironwod.wait_for_change(50);
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'ironwod run'
               AND query IS DISTINCT FROM 'ironwod: waiting for the next run') THEN
        RAISE EXCEPTION 'ironwod run workers still running 600 s after their runs finished';
    END IF;
END
$w$;
SQL
}
SIM_PID=

# As root the servers run as the postgres OS user (and so does its database
# superuser); as anyone else (`make installcheck` by a developer), as that user.
if [ "$(id -u)" = 0 ]; then
    SERVER_USER=postgres
else
    SERVER_USER=$(id -un)
fi
as_server() {
    if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$1"; else sh -c "$1"; fi
}

# The settings the suites rely on: every logging option on (the secrets test
# searches the logs), a fast worker pace, a prepared transaction for 05_resume.
SUITE_SETTINGS=(
    "log_statement = 'all'"
    "log_min_duration_statement = 0"
    "log_parameter_max_length = -1"
    "log_parameter_max_length_on_error = -1"
    "ironwod.requests_per_second = 500"
    "ironwod.burst = 100"
    "ironwod.cluster_requests_per_second = 5000"
    "ironwod.naptime = 2000"
    "ironwod.max_retries = 3"
    "max_prepared_transactions = 2"
)

# install_private: copy the PostgreSQL 15 installation into $WORK/pg and install
# the freshly built ironwod there, so a test run never touches (or races with)
# the system installation.  PostgreSQL finds its share and lib directories
# relative to its binaries, so the copy is self-contained.
install_private() {
    local root="$WORK/pg"
    mkdir -p "$root/usr/lib/postgresql" "$root/usr/share/postgresql"
    cp -a /usr/lib/postgresql/15 "$root/usr/lib/postgresql/"
    cp -a /usr/share/postgresql/15 "$root/usr/share/postgresql/"
    make -s -C "$REPO" install DESTDIR="$root" >/dev/null
    PGBIN="$root/usr/lib/postgresql/15/bin"
}

# ensure_installed: use the PostgreSQL of PGBIN when this build of ironwod is
# installed there already (run-tests.sh passes its own), else a private copy.
ensure_installed() {
    if [ -z "${PGBIN:-}" ] || [ ! -f "$("$PGBIN/pg_config" --pkglibdir)/ironwod.so" ]; then
        install_private
    fi
}

# hold PID...: stop processes (SIGSTOP) until release PID...; a script that fails
# meanwhile resumes them on exit (resume_held), so that stop_all can stop its
# cluster rather than wait on a stopped postmaster.
HELD_PIDS=""
hold() { HELD_PIDS="$HELD_PIDS $*"; kill -STOP "$@"; }
release() {
    local p
    kill -CONT "$@"
    for p in "$@"; do HELD_PIDS=$(echo " $HELD_PIDS " | sed "s/ $p / /g"); done
}
# shellcheck disable=SC2086
resume_held() { [ -z "${HELD_PIDS// }" ] || kill -CONT $HELD_PIDS 2>/dev/null || true; }

# shell_test_work NAME: for a test/shell script with a cluster of its own, its work
# directory (WORK=/tmp/ironwod-NAME.XXXXXX), stopped and removed when the script
# exits, kept for inspection when it fails; and ironwod installed (ensure_installed).
shell_test_work() {
    WORK=$(mktemp -d "/tmp/ironwod-$1.XXXXXX")
    trap 'rc=$?; resume_held; stop_all; if [ $rc = 0 ]; then rm -rf "$WORK"; else echo "kept $WORK for inspection"; fi' EXIT
    ensure_installed
}

# sim METHOD PATH [JSON]: a call of the simulator's API (SIM_URL, from start_sim).
sim() { curl -sf -X "$1" -H 'Content-Type: application/json' ${3:+-d "$3"} "$SIM_URL$2"; }
# json EXPR: print EXPR, Python over d, the JSON document read from stdin.
json() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
# run_state RUN: the run's "status:error_code", through the script's own q (its
# database); run_finished RUN: whether it exists and is neither queued nor running.
run_state() { q "SELECT status || ':' || coalesce(error_code, '') FROM ironwod.sync_runs WHERE run_id = $1"; }
run_finished() { local s; s=$(run_state "$1"); [ -n "$s" ] && [ "${s%%:*}" != running ] && [ "${s%%:*}" != queued ]; }
# sync_ok TENANT GYM MODE WHAT: queue a run through the script's own scoped (its
# database and scope), wait for it, and insist it succeeded (WHAT names it in the failure).
sync_ok() {
    local run
    run=$(scoped "$1" "$2" "SELECT ironwod_sync('$1', '$2', '$3')")
    wait_for "run $run" run_finished "$run"
    [ "$(run_state "$run")" = "succeeded:" ] || fail "$4: run $run ended $(run_state "$run")"
}

# start_sim SEED GYMS SCALE [extra args]: sets SIM_PORT and SIM_URL.
start_sim() {
    local seed=$1 gyms=$2 scale=$3
    shift 3
    local out="$WORK/sim.out"
    # created here, not by the background job's redirection, which may not have run
    # yet when the loop below first reads it
    : >"$out"
    python3 "$REPO/test/wodify_sim.py" --port 0 --seed "$seed" --gyms "$gyms" --scale "$scale" "$@" \
        >"$out" 2>"$WORK/sim.err" &
    SIM_PID=$!
    # the bound is for a simulator that never starts, not a pace: building the
    # model of several gyms takes a while on a busy machine
    for _ in $(seq 1 1200); do
        SIM_PORT=$(sed -n 's/^listening on \([0-9]*\)$/\1/p' "$out")
        [ -n "$SIM_PORT" ] && break
        kill -0 "$SIM_PID" 2>/dev/null || { cat "$WORK/sim.err" >&2; return 1; }
        sleep 0.1
    done
    [ -n "$SIM_PORT" ] || { echo "simulator did not start" >&2; return 1; }
    SIM_URL="http://127.0.0.1:$SIM_PORT"
}

# worker_hba FILE: the README's pg_hba.conf rule (Installing, step 4) on a fresh
# initdb's file: reject ironwod_worker, the LOGIN role without a password that
# background workers connect as, above initdb's trust lines (first match wins).
# Every test cluster runs with it, as production does.
worker_hba() {
    local file=$1
    { printf 'local   all    ironwod_worker           reject\n'
      printf 'host    all    ironwod_worker    all    reject\n'
      cat "$file"; } >"$file.new"
    mv "$file.new" "$file"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$file"
    return 0
}

# start_cluster PRELOAD [extra postgresql.conf lines...]: sets PGHOST/PGPORT/PGUSER.
start_cluster() {
    local preload=$1
    shift
    mkdir -p "$WORK/keys"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$WORK/keys"
    DEV_KEY=$(bash "$REPO/test/devkey.sh" "$WORK/keys" dev-1)
    [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$WORK"
    chmod 755 "$WORK"
    as_server "$PGBIN/initdb -D '$WORK/data' -A trust -E UTF8 --locale=C.UTF-8" >"$WORK/initdb.log"
    worker_hba "$WORK/data/pg_hba.conf"
    export PGPORT=${PGPORT_WANTED:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
    export PGHOST="$WORK"
    export PGUSER=$SERVER_USER
    export PGDATABASE=postgres
    {
        echo "port = $PGPORT"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$WORK'"
        # pg_stat_statements with every statement tracked (nested ones too): the
        # security scenarios prove no plaintext key ends up in it.
        echo "shared_preload_libraries = 'pg_stat_statements,$preload'"
        echo "pg_stat_statements.track = 'all'"
        echo "max_worker_processes = 32"
        echo "ironwod.database_name = 'postgres'"
        echo "ironwod.base_url = '$SIM_URL'"
        echo "ironwod.allow_http = on"
        echo "ironwod.master_key_command = '$WORK/keys/master_key_command.sh'"
        for line in "$@"; do echo "$line"; done
    } >>"$WORK/data/postgresql.conf"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$WORK/data/postgresql.conf"
    as_server "$PGBIN/pg_ctl -D '$WORK/data' -l '$WORK/data/server.log' -w start" >/dev/null
}

# load_fixtures: the tables the SQL tests read -- the simulator's gyms, its ground
# truth for the metrics, and the development key -- plus pgTAP.  Needs SIM_URL and
# DEV_KEY (start_sim, start_cluster) and the cluster in PGHOST/PGPORT.
load_fixtures() {
    local GYMS_JSON NGYMS TRUTH_JSON
    GYMS_JSON=$(curl -sf "$SIM_URL/_sim/gyms")
    # The simulator's ground truth for the metrics (monthly counts by the same definitions).
    NGYMS=$(printf '%s' "$GYMS_JSON" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["gyms"]))')
    TRUTH_JSON=$(for i in $(seq 0 $((NGYMS - 1))); do curl -sf "$SIM_URL/_sim/truth?gym=$i"; echo; done | python3 -c 'import json, sys; print(json.dumps([json.loads(l) for l in sys.stdin if l.strip()]))')
    # The fixture session itself is kept out of the statement log: the secrets test
    # searches the log for these keys.
    psql -qX -v ON_ERROR_STOP=1 -v gyms="$GYMS_JSON" -v devkey="$DEV_KEY" -v truth="$TRUTH_JSON" <<'SQL'
SET log_statement = 'none';
SET log_min_duration_statement = -1;
-- for pg_prove; `make installcheck` runs without it where pgTAP is not installed
SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgtap') AS have_pgtap \gset
\if :have_pgtap
CREATE EXTENSION pgtap;
\endif
CREATE TABLE public.sim_gyms AS
    SELECT (g->>'index')::int AS idx, g->>'api_key' AS api_key, g->'expected' AS expected
    FROM jsonb_array_elements((:'gyms')::jsonb->'gyms') AS g;
CREATE TABLE public.sim_truth AS
    SELECT (g->>'gym')::int AS idx, (m->>'month')::date AS month_start,
           (m->>'members_end')::int AS members_end, (m->>'new_members')::int AS new_members,
           (m->>'churned_members')::int AS churned_members, (m->>'all_visits')::int AS all_visits,
           (m->>'member_visits')::int AS member_visits
    FROM jsonb_array_elements((:'truth')::jsonb) AS g, jsonb_array_elements(g->'months') AS m;
-- and per program (program rows: location ALL, program_key the program id)
CREATE TABLE public.sim_truth_programs AS
    SELECT (g->>'gym')::int AS idx, p->>'program_id' AS program_key, (m->>'month')::date AS month_start,
           (m->>'members_end')::int AS members_end, (m->>'new_members')::int AS new_members,
           (m->>'churned_members')::int AS churned_members, (m->>'all_visits')::int AS all_visits,
           (m->>'member_visits')::int AS member_visits, (m->>'collected_gross')::numeric AS collected_gross
    FROM jsonb_array_elements((:'truth')::jsonb) AS g, jsonb_array_elements(g->'programs') AS p,
         jsonb_array_elements(p->'months') AS m;
CREATE TABLE public.test_dev_key AS
    SELECT split_part(:'devkey', ' ', 1) AS key_id, decode(split_part(:'devkey', ' ', 2), 'hex') AS public_key;
SQL
}

# seal_key TENANT GYM: the API key on standard input, sealed outside PostgreSQL
# to the cluster's ironwod_public_key(), as a host app seals it (test/seal.py);
# prints a bytea literal (\x...) for ironwod_connect(tenant, gym, sealed bytea).
seal_key() {
    local kid_pub
    kid_pub=$(psql -qAtX -v ON_ERROR_STOP=1 -F ' ' -c "SELECT key_id, encode(public_key, 'hex') FROM ironwod_public_key()")
    # shellcheck disable=SC2086 # two words: key id and public key
    /usr/bin/python3 "$REPO/test/seal.py" "$1" "$2" $kid_pub
}

# Register the development master public key printed by devkey.sh.
register_dev_key() {
    local id=${DEV_KEY%% *} hex=${DEV_KEY##* }
    psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT ironwod.register_master_key('$id', decode('$hex', 'hex'))"
}

stop_all() {
    if [ -n "${WORK:-}" ] && [ -f "$WORK/data/postmaster.pid" ]; then
        as_server "$PGBIN/pg_ctl -D '$WORK/data' -m fast -w stop" >/dev/null 2>&1 || true
    fi
    if [ -n "$SIM_PID" ]; then
        kill "$SIM_PID" 2>/dev/null || true
        wait "$SIM_PID" 2>/dev/null || true
    fi
}
