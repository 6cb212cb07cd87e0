#!/usr/bin/env bash
# Build Citus for the test suite (sourced by test/citus/run.sh and bench.sh, not run).
#
# citus_build TARBALL sets CITUS_ROOT to a staging tree (usr/lib/postgresql/15/lib,
# usr/share/postgresql/15/extension) that install_citus_private copies into the
# suite's private PostgreSQL copy.  The build is cached under a directory keyed by
# the tarball's SHA-256, so only the first run pays for it (about 1.5 minutes on
# two cores); a lock keeps parallel suites from building the same tree twice.
#
# citus_installed: true when the system PostgreSQL already has Citus; the private
# copy then has it too (install_private copies the whole installation).

CITUS_CACHE=${IRONWOD_CITUS_CACHE:-/tmp/ironwod-citus-cache}
CITUS_BUILD_PACKAGES=(
    liblz4-dev libzstd-dev libkrb5-dev libselinux1-dev libpam0g-dev libxslt1-dev
    libreadline-dev autoconf postgresql-server-dev-15 build-essential
)

citus_installed() {
    [ -f "$SYSTEM_PGBIN/../lib/citus.so" ] && [ -f /usr/share/postgresql/15/extension/citus.control ]
}

citus_build_deps() {
    local missing=() p
    for p in "${CITUS_BUILD_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages to build Citus: ${missing[*]} (run as root to install them)" >&2
        return 1
    fi
    echo "installing Citus build dependencies: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

citus_build() {
    local tarball=$1 sum dir
    sum=$(sha256sum "$tarball" | cut -c1-16)
    dir="$CITUS_CACHE/$sum"
    CITUS_ROOT="$dir/root"
    [ -f "$dir/done" ] && return 0
    citus_build_deps
    mkdir -p "$dir"
    (
        flock 9
        [ -f "$dir/done" ] && exit 0
        echo "building Citus from $(basename "$tarball") (cached in $dir)"
        rm -rf "$dir/src" "$dir/root"
        mkdir -p "$dir/src"
        tar xzf "$tarball" -C "$dir/src" --strip-components=1
        cd "$dir/src"
        # CI's -Werror flags are for ironwod, not for Citus.
        unset PG_CFLAGS PG_CPPFLAGS PG_LDFLAGS
        {
            ./configure PG_CONFIG="$SYSTEM_PGBIN/pg_config" --without-libcurl &&
                make -j2 && make install DESTDIR="$dir/root"
        } >"$dir/build.log" 2>&1 || { tail -30 "$dir/build.log" >&2; exit 1; }
        rm -rf "$dir/src"
        touch "$dir/done"
    ) 9>"$dir/lock"
}

# install_citus_private: copy the staged build into $WORK/pg (after install_private).
install_citus_private() {
    if [ -n "${CITUS_ROOT:-}" ]; then
        cp -a "$CITUS_ROOT/usr/." "$WORK/pg/usr/"
    fi
}

# citus_find: Citus for the suite's private copy: the installed one, else built
# from the vendored source (CITUS_TARBALL, else ../shared/vendor next to the repo,
# else /work/shared/vendor: CI runs a clean clone of main somewhere on this
# machine).  Sets CITUS_ROOT (empty for an installed Citus); fails when there is
# neither.
citus_find() {
    local c
    if citus_installed; then
        echo "using the installed Citus"
        CITUS_ROOT=
        return 0
    fi
    for c in "${CITUS_TARBALL:-}" "$REPO/../shared/vendor/citus-12.1.12.tar.gz" \
             /work/shared/vendor/citus-12.1.12.tar.gz; do
        if [ -n "$c" ] && [ -f "$c" ]; then
            citus_build "$c"
            return 0
        fi
    done
    return 1
}
