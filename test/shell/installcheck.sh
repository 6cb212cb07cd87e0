#!/usr/bin/env bash
# `make installcheck` works the PGXS way: against a PostgreSQL installation that
# has ironwod installed (PGBIN's, where make test installed it), on a server and
# simulator of its own, as root and as an ordinary user who owns the checkout;
# and it says what to do when ironwod is not installed there.  The whole suite
# as root; as the ordinary user a subset (REGRESS=..., as a PGXS user would pass
# it) is enough to show the path works.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PG_CONFIG=${PGBIN:?PGBIN must name a bin directory with ironwod installed}/pg_config
TMP=$(mktemp -d /tmp/ironwod-icheck.XXXXXX)
trap 'rc=$?; if [ $rc = 0 ]; then rm -rf "$TMP"; else echo "kept $TMP for inspection"; fi' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# As root, from a copy of this checkout: make test runs its own pg_regress and
# isolation suites in the checkout at the same time, and both would write the
# same results/ and regression.diffs.
mkdir "$TMP/clone"
cp -a "$REPO/." "$TMP/clone/"
clean_results() { rm -rf "$TMP/clone/results" "$TMP/clone/regression.diffs" "$TMP/clone/regression.out" "$TMP/clone/output_iso"; }
clean_results
out=$(make -s -C "$TMP/clone" installcheck PG_CONFIG="$PG_CONFIG" 2>&1) \
    || fail "make installcheck as root: $out"
n=$(make -s -C "$TMP/clone" -f - <<<'include Makefile
print-regress: ; @echo $(words $(REGRESS))' print-regress PG_CONFIG="$PG_CONFIG")
grep -q "All $n tests passed" <<<"$out" || fail "as root: $out"
grep -q 'All 1 tests passed' <<<"$out" || fail "as root, isolation: $out"

# As an ordinary user (postgres) who owns a checkout of their own.
clean_results
chown -R postgres "$TMP"
out=$(su postgres -s /bin/sh -c "make -s -C '$TMP/clone' installcheck PG_CONFIG='$PG_CONFIG' REGRESS=01_install ISOLATION=" 2>&1) \
    || fail "make installcheck as postgres: $out"
grep -q 'All 1 tests passed' <<<"$out" || fail "as postgres: $out"

# An installation without ironwod: told to run make install.
mkdir "$TMP/empty"
printf '#!/bin/sh\ncase "$1" in --pkglibdir|--sharedir) echo %s ;; *) exec %s "$@" ;; esac\n' "$TMP/empty" "$PG_CONFIG" >"$TMP/pg_config"
chmod 755 "$TMP/pg_config"
out=$(make -s -C "$TMP/clone" installcheck PG_CONFIG="$TMP/pg_config" 2>&1) && fail "installcheck without ironwod installed passed"
grep -q 'ironwod is not installed in the PostgreSQL of .*: run make install first' <<<"$out" || fail "no clear message: $out"
echo "ok - make installcheck against an installed PostgreSQL, as root and as its owner; a clear message when ironwod is not installed"
