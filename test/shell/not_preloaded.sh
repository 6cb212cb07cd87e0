#!/usr/bin/env bash
# CREATE EXTENSION ironwod on a server that did not preload the library must
# fail with SQLSTATE 55000 and say how to fix it, and leave nothing behind.
set -euo pipefail
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
dir=$(mktemp -d /tmp/ironwod-nopreload.XXXXXX)
# a free port, so parallel runs of the suite do not collide
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
chown postgres:postgres "$dir"
cleanup() {
    su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D '$dir/data' -m immediate -w stop" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
su postgres -s /bin/sh -c "$PGBIN/initdb -D '$dir/data' -A trust" >/dev/null
# shellcheck source=test/cluster.sh
source "$(dirname "$0")/../cluster.sh"
worker_hba "$dir/data/pg_hba.conf"
su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D '$dir/data' -l '$dir/log' -w -o \"-c listen_addresses='' -c unix_socket_directories='$dir' -c port=$port\" start" >/dev/null
out=$(psql -h "$dir" -p "$port" -U postgres -d postgres -X -v VERBOSITY=verbose -c 'CREATE EXTENSION ironwod' 2>&1 || true)
grep -q 'ERROR:  55000: ironwod must be loaded via shared_preload_libraries' <<<"$out" || { echo "$out"; exit 1; }
grep -q 'HINT:  Add ironwod to shared_preload_libraries' <<<"$out" || { echo "$out"; exit 1; }
left=$(psql -h "$dir" -p "$port" -U postgres -d postgres -XAt -c "SELECT count(*) FROM pg_namespace WHERE nspname = 'ironwod'")
[ "$left" = 0 ]
