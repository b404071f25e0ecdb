"""One set of TLS session-ticket keys for every worker process.

OpenSSL seals TLS 1.3 tickets with keys random to each ``SSL_CTX``; with several workers a
ticket issued by one could not be opened by another, and a client would resume only when the
kernel happened to hand its next connection to the same worker (1 in N). nginx and HAProxy share
one key set across workers; Python's ``ssl`` has no call for it (``SSL_CTX_set_tlsext_ticket_keys``),
so this module makes that one call through ctypes, into the very libssl the ``_ssl`` module uses,
and checks that it reached the right ``SSL_CTX`` (the options OpenSSL reports equal the context's,
and the keys read back equal the keys set). Any mismatch leaves the context as it was: tickets then
stay per worker, which costs speed, never security.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import sys

TICKET_KEYS_SIZE = 80  # name 16 + HMAC secret 32 + AES key 32 (OpenSSL's legacy ticket key layout)
_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59


def new_keys() -> bytes:
    return os.urandom(TICKET_KEYS_SIZE)


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Make ``ctx`` seal and open tickets with ``keys``; False when that could not be done safely."""
    if len(keys) != TICKET_KEYS_SIZE or _libssl is None or sys.implementation.name != "cpython":
        return False
    # A CPython ``_ssl._SSLContext`` starts with PyObject_HEAD and then its ``SSL_CTX *``.
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or _libssl.SSL_CTX_get_options(pointer) != ctx.options:
        return False
    if _libssl.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(keys), keys) != 1:
        return False
    readback = ctypes.create_string_buffer(TICKET_KEYS_SIZE)
    got = _libssl.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, TICKET_KEYS_SIZE, readback)
    return got == 1 and readback.raw == keys


def _load() -> ctypes.CDLL | None:
    """The libssl of Python's ``_ssl`` (dlsym on the module's handle searches its dependencies)."""
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    except (OSError, AttributeError, ImportError):
        return None
    return lib


_libssl = _load()
