#!/usr/bin/python3
"""Seal a Wodify API key the way a host app does, outside PostgreSQL.

The sealed path ironwod_connect(tenant, gym, sealed bytea) is the one through which
no plaintext key reaches the server (no statement text, no pg_stat_activity, no
pg_stat_statements).  This is the client half of src/crypto.c's wire format:

    epk, esk = X25519 keygen();  shared = X25519(esk, recipient_pk)
    key      = HKDF-SHA256(shared, salt = epk || recipient_pk, info = "ironwod api key v1")
    ct, tag  = AES-256-GCM(key, 12 random bytes, plaintext, ad = tenant || gym || key_id)
    sealed   = 'I' 'W' 0x01 len(key_id) key_id epk nonce ct tag

Usage (the key on standard input, so it is in no process's arguments):

    printf %s "$API_KEY" | /usr/bin/python3 test/seal.py TENANT GYM KEY_ID PUBLIC_KEY_HEX

prints the sealed value as a bytea literal (\\x...).  KEY_ID and PUBLIC_KEY_HEX are
what ironwod_public_key() returns (key_id, encode(public_key, 'hex')).  Needs
Debian's python3-cryptography (test/setup.sh installs it), hence /usr/bin/python3.
"""
import os
import sys
import uuid

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INFO = b"ironwod api key v1"


def seal(tenant, gym, key_id, public_key, api_key):
    """Seal api_key (str) for (tenant, gym) to the master public key (32 raw bytes)."""
    kid = key_id.encode()
    esk = X25519PrivateKey.generate()
    epk = esk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = esk.exchange(X25519PublicKey.from_public_bytes(public_key))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + public_key, info=INFO).derive(shared)
    nonce = os.urandom(12)
    ad = uuid.UUID(tenant).bytes + uuid.UUID(gym).bytes + kid
    return b"IW\x01" + bytes([len(kid)]) + kid + epk + nonce + AESGCM(key).encrypt(nonce, api_key.encode(), ad)


def main():
    if len(sys.argv) != 5:
        sys.exit("usage: seal.py TENANT GYM KEY_ID PUBLIC_KEY_HEX  (API key on stdin)")
    tenant, gym, key_id, public_hex = sys.argv[1:]
    api_key = sys.stdin.read()
    print("\\x" + seal(tenant, gym, key_id, bytes.fromhex(public_hex), api_key).hex())


if __name__ == "__main__":
    main()
