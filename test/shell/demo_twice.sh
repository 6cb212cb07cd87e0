#!/usr/bin/env bash
# `make demo`, twice at once, as two people on one machine would run it: each
# demo gets a work directory of its own, both succeed, neither prints an empty
# result block, and each one's printed stop line stops exactly that demo (the
# other keeps answering).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$(mktemp -d /tmp/ironwod-demotest.XXXXXX)
dirs=()
cleanup() {
    rc=$?
    for d in "${dirs[@]}"; do
        [ -f "$d/.ironwod-demo" ] && bash "$REPO/test/demo.sh" stop "$d" >/dev/null 2>&1 || true
    done
    if [ $rc = 0 ]; then rm -rf "$OUT"; else echo "kept $OUT for inspection"; fi
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

bash "$REPO/test/demo.sh" >"$OUT/1.out" 2>&1 & p1=$!
bash "$REPO/test/demo.sh" >"$OUT/2.out" 2>&1 & p2=$!
rc1=0 rc2=0
wait $p1 || rc1=$?
wait $p2 || rc2=$?
for i in 1 2; do
    d=$(sed -n 's|^  bash .*/test/demo.sh stop \(/tmp/ironwod-demo\.[A-Za-z0-9]*\)$|\1|p' "$OUT/$i.out")
    [ -n "$d" ] && dirs+=("$d")
done
[ $rc1 = 0 ] && [ $rc2 = 0 ] || fail "a demo failed ($rc1, $rc2):
$(tail -15 "$OUT/1.out")
$(tail -15 "$OUT/2.out")"
[ ${#dirs[@]} = 2 ] && [ "${dirs[0]}" != "${dirs[1]}" ] || fail "the demos did not print two stop lines for two directories: ${dirs[*]:-}"
for i in 1 2; do
    grep -q '^ succeeded$' "$OUT/$i.out" || fail "demo $i: no successful backfill"
    grep -q '^ ironwod-tick | ' "$OUT/$i.out" || fail "demo $i: no pg_cron job"
    # an empty result block is a column header over a row holding nothing
    ! grep -q '^ $' "$OUT/$i.out" || fail "demo $i printed an empty result block:
$(grep -n -B3 '^ $' "$OUT/$i.out" | head)"
    ! grep -q 'ironwod_set_scope *$' "$OUT/$i.out" || fail "demo $i printed ironwod_set_scope's result"
done
answers() { psql -qAtX -h "$1" -p "$(sed -n 's/^port = //p' "$1/data/postgresql.conf" | tail -1)" -U postgres -d postgres \
                -c 'SELECT count(*) > 0 FROM ironwod.wodify_raw_clients' 2>/dev/null; }
[ "$(answers "${dirs[0]}")" = t ] && [ "$(answers "${dirs[1]}")" = t ] || fail "both demos should answer"

# The first one's stop line stops it alone.
line=$(grep -A1 '^Stop this demo' "$OUT/1.out" | tail -1)
eval "$line" >/dev/null
[ ! -e "${dirs[0]}" ] || fail "demo 1's directory is still there"
[ "$(answers "${dirs[1]}")" = t ] || fail "stopping demo 1 stopped demo 2"
bash "$REPO/test/demo.sh" stop "$OUT" >/dev/null 2>&1 && fail "stop accepted a directory that is no demo's"
line=$(grep -A1 '^Stop this demo' "$OUT/2.out" | tail -1)
eval "$line" >/dev/null
[ ! -e "${dirs[1]}" ] || fail "demo 2's directory is still there"
echo "ok - two demos at once: own directories, nothing empty printed, each stop line stops only its demo"
