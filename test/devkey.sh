#!/usr/bin/env bash
#
# devkey.sh - make a development master key pair for ironwod.
#
# Usage: test/devkey.sh DIR [KEY_ID]
#
# Generates an X25519 key pair with the openssl command line (OpenSSL 3.0)
# and writes, in DIR (created if needed):
#
#   master.keys              mode 0600, the line "KEY_ID <64 hex private key>"
#   master_key_command.sh    mode 0755, prints master.keys; point
#                            ironwod.master_key_command at it
#
# and prints exactly one line on stdout: "KEY_ID <64 hex public key>", the
# values to store with ironwod's master key registration.
#
# If master.keys already exists, the new key is added to it (so a rotation
# test can hold two keys); a KEY_ID that is already there is refused rather
# than replaced, because replacing it would strand every value sealed to it.
#
# When run as root, the files take the owner and group of DIR, so chown DIR
# to postgres before running this; otherwise run it as the user that owns
# DIR, or chown -R DIR afterwards.
#
# This is for development and tests only: the private key sits unencrypted
# on disk.  In production the command should ask a KMS for the key.

set -euo pipefail

usage() {
	echo "usage: $0 DIR [KEY_ID]" >&2
	exit 2
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
	usage
fi
dir=$1
key_id=${2:-dev-1}

# same rule as ironwod's sealed values: 1..64 printable ASCII, no spaces
if ! [[ $key_id =~ ^[!-~]{1,64}$ ]]; then
	echo "$0: key id must be 1 to 64 printable ASCII characters without spaces" >&2
	exit 2
fi
if [[ $key_id == \#* ]]; then
	echo "$0: key id must not start with \"#\" (it would read as a comment)" >&2
	exit 2
fi

command -v openssl >/dev/null || { echo "$0: openssl not found" >&2; exit 1; }

umask 077
mkdir -p -- "$dir"
dir=$(cd -- "$dir" && pwd -P)
keys="$dir/master.keys"
cmd="$dir/master_key_command.sh"

if [ -e "$keys" ] && awk -v id="$key_id" '$1 == id { found = 1 } END { exit !found }' "$keys"; then
	echo "$0: $keys already holds a key named \"$key_id\"; not replacing it" >&2
	exit 1
fi

# hex of a DER key's raw 32 bytes (always its last 32 bytes for X25519)
raw_hex() {
	tail -c 32 | od -An -v -tx1 | tr -d ' \n'
}

# The private key stays in a shell variable as PEM (text) and never touches
# the disk except in master.keys.
pem=$(openssl genpkey -algorithm X25519)
priv_hex=$(printf '%s\n' "$pem" | openssl pkey -outform DER | raw_hex)
pub_hex=$(printf '%s\n' "$pem" | openssl pkey -pubout -outform DER | raw_hex)
unset pem

if ! [[ $priv_hex =~ ^[0-9a-f]{64}$ && $pub_hex =~ ^[0-9a-f]{64}$ ]]; then
	echo "$0: could not extract the raw X25519 keys from openssl's output" >&2
	exit 1
fi

# write the key file atomically, keeping any keys already there
tmp=$(mktemp "$dir/.master.keys.XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
if [ -e "$keys" ]; then
	cat -- "$keys" >"$tmp"
else
	printf '# ironwod development master keys: <key id> <x25519 private key, hex>\n' >"$tmp"
fi
printf '%s %s\n' "$key_id" "$priv_hex" >>"$tmp"
unset priv_hex
chmod 0600 "$tmp"
mv -f -- "$tmp" "$keys"
trap - EXIT

# the command: cat of the key file by absolute path, quoted for sh
quoted_keys="'${keys//\'/\'\\\'\'}'"
tmp=$(mktemp "$dir/.master_key_command.XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
cat >"$tmp" <<EOF
#!/bin/sh
# ironwod.master_key_command for development, written by devkey.sh
exec cat $quoted_keys
EOF
chmod 0755 "$tmp"
mv -f -- "$tmp" "$cmd"
trap - EXIT

if [ "$(id -u)" -eq 0 ]; then
	chown --reference="$dir" -- "$keys" "$cmd"
	# the mistake that otherwise surfaces only at the first ironwod_connect
	if [ "$(stat -c %u -- "$dir")" -eq 0 ]; then
		echo "$0: warning: $dir belongs to root, so a server running as postgres cannot run $cmd; run: chown -R postgres '$dir' (ironwod.check_config() reports this too)" >&2
	fi
fi

printf '%s %s\n' "$key_id" "$pub_hex"
