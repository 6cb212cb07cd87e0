#!/usr/bin/env bash
# A local Citus cluster for test/citus/run.sh and test/citus/bench.sh (sourced,
# not run): a coordinator and workers, each an ordinary cluster on its own port
# under $WORK/NAME, citus first in shared_preload_libraries and ironwod preloaded
# everywhere (the library must load on the workers; its supervisor idles there).
# Needs test/cluster.sh's WORK, PGBIN (install_private) and SIM_URL (start_sim).

NODES=()
declare -A NODE_PORT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# citus_keys: the development master key, as start_cluster makes it; sets DEV_KEY.
citus_keys() {
    mkdir -p "$WORK/keys"
    chown postgres:postgres "$WORK/keys"
    DEV_KEY=$(bash "$REPO/test/devkey.sh" "$WORK/keys" dev-1)
    chown -R postgres:postgres "$WORK"
    chmod 755 "$WORK"
}

# start_node NAME [extra postgresql.conf lines...].  Citus reaches the nodes over
# TCP as the current user (the app's login role, ironwod_worker for run workers),
# so every node accepts local TCP connections: the README's TCP reject line for
# ironwod_worker applies to everything but the coordinator, which here shares
# 127.0.0.1 with everyone.  Its Unix-socket line applies, and comes first.
start_node() {
    local name=$1 port
    shift
    port=$(free_port)
    NODE_PORT[$name]=$port
    NODES+=("$name")
    su postgres -s /bin/sh -c "$PGBIN/initdb -D '$WORK/$name' -A trust -E UTF8 --locale=C.UTF-8" >"$WORK/initdb-$name.log"
    {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$WORK'"
        echo "shared_preload_libraries = 'citus,ironwod'"
        echo "max_worker_processes = 32"
        echo "max_connections = 200"
        # Citus commits multi-node writes with two-phase commit; 05_resume holds a
        # lock in a prepared transaction.
        echo "max_prepared_transactions = 100"
        echo "ironwod.database_name = 'postgres'"
        echo "ironwod.base_url = '$SIM_URL'"
        echo "ironwod.allow_http = on"
        echo "ironwod.master_key_command = '$WORK/keys/master_key_command.sh'"
        # Fewer shards than Citus's 32 keep distribute() quick on two cores.
        echo "citus.shard_count = 4"
        for line in "$@"; do echo "$line"; done
    } >>"$WORK/$name/postgresql.conf"
    printf 'local all ironwod_worker reject\nlocal all all trust\nhost all all 127.0.0.1/32 trust\n' >"$WORK/$name/pg_hba.conf"
    chown postgres:postgres "$WORK/$name/postgresql.conf" "$WORK/$name/pg_hba.conf"
    su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D '$WORK/$name' -l '$WORK/$name/server.log' -w start" >/dev/null
    psql -qX -h "$WORK" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION citus'
}

# join_nodes COORD WORKER...: make COORD the coordinator of the workers; points
# PGHOST/PGPORT/PGUSER/PGDATABASE at it.
join_nodes() {
    local coord=$1 w
    shift
    export PGHOST="$WORK" PGPORT=${NODE_PORT[$coord]} PGUSER=postgres PGDATABASE=postgres
    psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT citus_set_coordinator_host('127.0.0.1', ${NODE_PORT[$coord]})" >/dev/null
    for w in "$@"; do
        psql -qAtX -v ON_ERROR_STOP=1 -c "SELECT citus_add_node('127.0.0.1', ${NODE_PORT[$w]})" >/dev/null
    done
}

stop_nodes() {
    local n
    for n in "${NODES[@]}"; do
        if [ -f "$WORK/$n/postmaster.pid" ]; then
            su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D '$WORK/$n' -m fast -w stop" >/dev/null 2>&1 || true
        fi
    done
}

# node_cpu DATADIR: CPU seconds the server of DATADIR has used so far, every
# process of it: the postmaster's own and its reaped children's (utime, stime,
# cutime, cstime of the postmaster: run workers and backends that ended), plus
# the children alive now.
node_cpu() {
    local pm ticks c
    pm=$(head -1 "$1/postmaster.pid")
    # the fields after the command name, which is in parentheses and may hold spaces
    ticks=$(sed 's/.*) //' "/proc/$pm/stat" | awk '{print $12 + $13 + $14 + $15}')
    for c in $(pgrep -P "$pm"); do
        ticks=$((ticks + $( (sed 's/.*) //' "/proc/$c/stat" 2>/dev/null || echo) | awk '{print $12 + $13 + 0}')))
    done
    awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}
