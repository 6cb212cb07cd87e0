#!/usr/bin/env bash
# Install what building, testing and the demo need on Debian 12, as root, only
# when something is missing.  Idempotent; used by `make test`, `make demo` and CI.
set -euo pipefail

PACKAGES=(
    build-essential postgresql-15 postgresql-server-dev-15 libcurl4-openssl-dev libssl-dev
    postgresql-15-pgtap postgresql-15-cron libtap-parser-sourcehandler-pgtap-perl
    python3 python3-psycopg python3-cryptography openssl curl
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
