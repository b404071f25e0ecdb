"""One set of TLS session-ticket keys for every worker process.

OpenSSL seals TLS 1.3 tickets with keys random to each ``SSL_CTX``; with several workers a
ticket issued by one could not be opened by another, and a client would resume only when the
kernel happened to hand its next connection to the same worker (1 in N). All workers must share
one key set; Python's ``ssl`` has no call for it (``SSL_CTX_set_tlsext_ticket_keys``),
so this module makes that one call through ``libssl`` (ctypes) and checks that it reached the
right ``SSL_CTX`` (the options OpenSSL reports equal the context's, and the keys read back equal
the keys set). Any mismatch leaves the context as it was: tickets then stay per worker, which
costs speed, never security.
"""

from __future__ import annotations

import ctypes
import os
import ssl

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .libssl import context_pointer, lib

TICKET_KEYS_SIZE = 80  # name 16 + HMAC secret 32 + AES key 32 (OpenSSL's legacy ticket key layout)
_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59


def new_keys() -> bytes:
    return os.urandom(TICKET_KEYS_SIZE)


def listener_keys(keys: bytes, listener: str) -> bytes:
    """The ticket keys of one inbound listener: ``keys`` (the generation's, shared by every worker)
    expanded with HKDF-SHA256 over the listener's name. Every worker derives the same keys for a
    listener; no two listeners share keys, so a ticket opens only on the listener that issued it."""
    info = b"sidecar session-ticket keys for listener " + listener.encode()
    return HKDF(algorithm=hashes.SHA256(), length=TICKET_KEYS_SIZE, salt=None, info=info).derive(keys)


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Make ``ctx`` seal and open tickets with ``keys``; False when that could not be done safely."""
    pointer = context_pointer(ctx)
    if len(keys) != TICKET_KEYS_SIZE or lib is None or pointer is None:
        return False
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(keys), keys) != 1:
        return False
    readback = ctypes.create_string_buffer(TICKET_KEYS_SIZE)
    got = lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, TICKET_KEYS_SIZE, readback)
    return got == 1 and readback.raw == keys
