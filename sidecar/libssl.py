"""The few OpenSSL calls Python's ``ssl`` module does not make, or makes at a cost, through ctypes:
holding a client's session and offering it without Python's copies, sharing ticket keys
(``tickets.py``), and reading the chain OpenSSL verified for the peer (Python 3.11 shows only the
peer's leaf).

The calls go into the very libssl the ``_ssl`` module uses (dlsym on its handle searches its
dependencies), and reach the ``SSL_CTX``, ``SSL`` and ``SSL_SESSION`` behind a Python object by
CPython's layout of those objects: its pointer is the first field after ``PyObject_HEAD`` (the
``SSL`` of an ``SSLObject`` comes after one more pointer). That layout is the same from 3.8 to 3.13;
on any other interpreter nothing here is used. Before a pointer is used it is checked against what
Python itself reports of the object (a context's options, a session's time, timeout and id, the
context an ``SSL`` belongs to, the leaf Python reports for the peer); a mismatch returns None or
False, and callers then take the plain ``ssl`` way, which costs speed, or refuse what they cannot
check, never admit it.
"""

from __future__ import annotations

import _ssl
import ctypes
import ssl
import sys
from typing import Any

_SSL_SOCKET: type | None = getattr(_ssl, "_SSLSocket", None)  # what ``SSLObject._sslobj`` is
_TLS1_3_VERSION = 0x0304
_HEAD = object.__basicsize__
_POINTER = ctypes.sizeof(ctypes.c_void_p)


def _load() -> ctypes.CDLL | None:
    if sys.implementation.name != "cpython" or not (3, 8) <= sys.version_info[:2] <= (3, 13):
        return None
    try:
        lib = ctypes.CDLL(_ssl.__file__)
        signatures: dict[str, tuple[object, list[object]]] = {
            "SSL_CTX_get_options": (ctypes.c_uint64, [ctypes.c_void_p]),
            "SSL_CTX_ctrl": (ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]),
            "SSL_get_SSL_CTX": (ctypes.c_void_p, [ctypes.c_void_p]),
            "SSL_is_server": (ctypes.c_int, [ctypes.c_void_p]),
            "SSL_in_before": (ctypes.c_int, [ctypes.c_void_p]),
            "SSL_set_session": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
            "SSL_get_session": (ctypes.c_void_p, [ctypes.c_void_p]),
            "SSL_SESSION_dup": (ctypes.c_void_p, [ctypes.c_void_p]),
            "SSL_SESSION_free": (None, [ctypes.c_void_p]),
            "SSL_SESSION_has_ticket": (ctypes.c_int, [ctypes.c_void_p]),
            "SSL_SESSION_get_time": (ctypes.c_long, [ctypes.c_void_p]),
            "SSL_SESSION_get_timeout": (ctypes.c_long, [ctypes.c_void_p]),
            "SSL_SESSION_get_protocol_version": (ctypes.c_int, [ctypes.c_void_p]),
            "SSL_SESSION_is_resumable": (ctypes.c_int, [ctypes.c_void_p]),
            "SSL_SESSION_get_id": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]),
            "SSL_get0_verified_chain": (ctypes.c_void_p, [ctypes.c_void_p]),
            "OPENSSL_sk_num": (ctypes.c_int, [ctypes.c_void_p]),
            "OPENSSL_sk_value": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
            "i2d_X509": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
    except (OSError, AttributeError):
        return None
    return lib


lib = _load()


def _field(obj: object, offset: int = 0) -> int | None:
    return ctypes.c_void_p.from_address(id(obj) + _HEAD + offset).value


def context_pointer(ctx: ssl.SSLContext) -> int | None:
    """The ``SSL_CTX *`` of ``ctx``, when OpenSSL reports the options Python reports for it."""
    if lib is None or not isinstance(ctx, _ssl._SSLContext):
        return None
    pointer = _field(ctx)
    if not pointer or lib.SSL_CTX_get_options(pointer) != ctx.options:
        return None
    return pointer


class HeldSession:
    """A client's resumable TLS 1.3 session with its ticket, in a copy of our own
    (``SSL_SESSION_dup``), freed when this object goes. Never read through Python's
    ``SSLObject.session``: on CPython 3.11 and 3.12 that getter copies the session and loses the
    copy (python/cpython#116810), about 6 KiB each (the peer's chain), a leak per read. A copy
    of our own also stays resumable when the connection it came from ends without close_notify."""

    __slots__ = ("context", "pointer", "time", "timeout")
    has_ticket = True  # held only once the ticket arrived

    def __init__(self, pointer: int, context: ssl.SSLContext) -> None:
        assert lib is not None
        self.pointer = pointer
        self.context = context  # the context it was made under, the only one it is offered on
        self.time = int(lib.SSL_SESSION_get_time(pointer))
        self.timeout = int(lib.SSL_SESSION_get_timeout(pointer))

    def __del__(self) -> None:
        if lib is not None and self.pointer:
            lib.SSL_SESSION_free(self.pointer)
            self.pointer = 0


def hold_session(sslobj: ssl.SSLObject, ctx: ssl.SSLContext) -> tuple[bool, HeldSession | None]:
    """(whether the ``SSL`` of client ``sslobj`` was reachable, its session once the ticket
    arrived). Unreachable: the caller reads ``sslobj.session`` (Python's way)."""
    ssl_pointer = _ssl_pointer(sslobj, ctx)
    if ssl_pointer is None or lib is None or lib.SSL_is_server(ssl_pointer):
        return False, None
    current = lib.SSL_get_session(ssl_pointer)  # borrowed
    if not current or lib.SSL_SESSION_has_ticket(current) != 1:
        return True, None
    if lib.SSL_SESSION_get_protocol_version(current) != _TLS1_3_VERSION or lib.SSL_SESSION_is_resumable(current) != 1:
        return True, None
    copy = lib.SSL_SESSION_dup(current)
    return True, (HeldSession(copy, ctx) if copy else None)


def resume(sslobj: ssl.SSLObject, ctx: ssl.SSLContext, session: ssl.SSLSession | HeldSession) -> bool:
    """Offer ``session`` on a client ``sslobj`` of ``ctx`` that has not started its handshake.

    Python's own ``SSLObject.session = s`` copies the session first (CPython serialises it and
    parses it back, peer certificate chain included: about 0.1 ms of CPU on every connection, for
    a workaround of OpenSSL 1.1.0). OpenSSL 1.1.1 and later copy a session themselves before they
    change it, so one session can be offered on any number of connections. Returns
    False when the pointers do not check out; the caller then sets ``sslobj.session`` (a Python
    session) or resumes nothing (a held one).
    """
    ssl_pointer = _ssl_pointer(sslobj, ctx)
    if ssl_pointer is None or lib is None:
        return False
    if isinstance(session, HeldSession):
        if session.context is not ctx or not session.pointer:
            return False
        session_pointer: int | None = session.pointer
    elif type(session) is _ssl.SSLSession and _field(session, _POINTER) == id(ctx):  # its context
        session_pointer = _session_pointer(session)
    else:
        return False
    if lib.SSL_is_server(ssl_pointer) or not lib.SSL_in_before(ssl_pointer):
        return False
    if session_pointer is None or lib.SSL_SESSION_is_resumable(session_pointer) != 1:
        return False
    return bool(lib.SSL_set_session(ssl_pointer, session_pointer) == 1)


MAX_CHAIN = 16  # longer verified chains than this are not read (OpenSSL's default depth is 100; ours are 2-4)


def verified_chain(sslobj: ssl.SSLObject, ctx: ssl.SSLContext) -> tuple[bytes, ...] | None:
    """The chain OpenSSL verified for the peer of ``sslobj`` (of ``ctx``), leaf first, each DER.

    None when there is none (no handshake yet, a resumed session: OpenSSL verifies nothing then)
    or it cannot be read safely: the pointers do not check out, or the leaf read differs from the
    one Python reports. Python 3.13's own ``get_verified_chain`` is used where it exists.
    """
    try:
        leaf = sslobj.getpeercert(binary_form=True)
    except ValueError:  # no handshake yet
        return None
    native = getattr(sslobj, "get_verified_chain", None)  # Python 3.13 and later: DER, leaf first
    chain = tuple(native()) if native is not None else _read_verified_chain(sslobj, ctx)
    return chain if chain and chain[0] == leaf else None


def _read_verified_chain(sslobj: ssl.SSLObject, ctx: ssl.SSLContext) -> tuple[bytes, ...] | None:
    ssl_pointer = _ssl_pointer(sslobj, ctx)
    if ssl_pointer is None or lib is None:
        return None
    stack = lib.SSL_get0_verified_chain(ssl_pointer)
    count = lib.OPENSSL_sk_num(stack) if stack else 0
    if not 0 < count <= MAX_CHAIN:
        return None
    chain = []
    for index in range(count):
        cert = lib.OPENSSL_sk_value(stack, index)
        size = lib.i2d_X509(cert, None) if cert else 0
        if size <= 0:
            return None
        buffer = ctypes.create_string_buffer(size)
        cursor = ctypes.c_void_p(ctypes.addressof(buffer))  # i2d_X509 writes there and moves it on
        if lib.i2d_X509(cert, ctypes.byref(cursor)) != size:
            return None
        chain.append(buffer.raw)
    return tuple(chain)


def _ssl_pointer(sslobj: ssl.SSLObject, ctx: ssl.SSLContext) -> int | None:
    """The ``SSL *`` behind ``sslobj``, when it belongs to ``ctx`` as far as OpenSSL is concerned."""
    ctx_pointer = context_pointer(ctx)
    inner: Any = getattr(sslobj, "_sslobj", None)
    if ctx_pointer is None or lib is None or _SSL_SOCKET is None or type(inner) is not _SSL_SOCKET:
        return None
    if getattr(inner, "context", None) is not ctx:
        return None
    ssl_pointer = _field(inner, _POINTER)  # after the ``Socket`` weak reference
    if not ssl_pointer or lib.SSL_get_SSL_CTX(ssl_pointer) != ctx_pointer:
        return None
    return ssl_pointer


def _session_pointer(session: ssl.SSLSession) -> int | None:
    """The ``SSL_SESSION *`` of ``session``, when it is a TLS 1.3 session and OpenSSL reports the
    time, timeout and id Python reports for it (``resume`` checks that it is still resumable)."""
    assert lib is not None
    pointer = _field(session)
    if not pointer or lib.SSL_SESSION_get_time(pointer) != session.time:
        return None
    if lib.SSL_SESSION_get_timeout(pointer) != session.timeout:
        return None
    length = ctypes.c_uint(0)
    id_pointer = lib.SSL_SESSION_get_id(pointer, ctypes.byref(length))
    if not id_pointer or ctypes.string_at(id_pointer, length.value) != session.id:
        return None
    return pointer if lib.SSL_SESSION_get_protocol_version(pointer) == _TLS1_3_VERSION else None
