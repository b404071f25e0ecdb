"""One TLS session over two memory buffers: the only module that calls ``ssl.SSLObject``.

Theory of operation. asyncio's own TLS transports can neither half-close (send close_notify and
keep reading) nor take a new context per connection, so a TLS leg keeps its ciphertext in two
``ssl.MemoryBIO``s and drives an ``SSLObject`` itself: bytes from the wire go ``feed`` ->
``handshake`` or ``read``; plaintext goes ``write``; whatever OpenSSL wants sent (handshake
messages, records, alerts, tickets, close_notify) waits in ``output`` until the leg writes it.

Every ``SSLObject`` call is made here, and every error OpenSSL raises leaves this module as one
``TLSFailure`` carrying the failure's class (``tlserrors.classify``) and a key-free text. Nothing
here does I/O, knows a socket or an event loop, or decides policy; an engine given a ``vet`` (the
material's trust-domain check) asks it once when the handshake completes and keeps the answer for
the relay, and a server withholds the session ticket from a peer it refuses.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import tlserrors
from .errors import TLSFailure
from .identity import PeerIdentity, from_peercert
from .libssl import HeldSession, hold_session, resume, verified_chain


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What a completed handshake settled: protocol, suite, resumption and the verified peer."""

    version: str | None
    cipher: str | None
    resumed: bool
    peer: PeerIdentity
    peer_not_after: float | None  # the peer certificate's notAfter, epoch seconds
    trust_problem: str | None = None  # why the material's trust domains refuse the peer (``vet``)
    alpn: str | None = None  # the application protocol both sides agreed on (ALPN), if any


Session = ssl.SSLSession | HeldSession  # a client session to offer: Python's, or held through libssl

# the material's check after a handshake: (peer, verified chain or None, resumed) -> refusal or None
Vet = Callable[[PeerIdentity, Sequence[bytes] | None, bool], str | None]


class TLSEngine:
    """A client or server TLS session whose ciphertext lives in memory."""

    __slots__ = ("_in", "_obj", "_out", "_vet", "context", "established", "peer_finished", "trust_problem")

    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: Session | None = None,
        vet: Vet | None = None,
    ) -> None:
        self.context = ctx
        self._vet = vet
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        if session is not None and not resume(self._obj, ctx, session) and isinstance(session, ssl.SSLSession):
            self._obj.session = session  # Python's way: the same, with a copy of the session
        self.established = False  # the handshake completed
        self.peer_finished = False  # the peer sent close_notify
        self.trust_problem: str | None = None  # the answer of ``vet``, once established

    # -- the handshake ------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Ciphertext that arrived from the wire."""
        self._in.write(data)

    def handshake(self) -> bool:
        """Advance the handshake; True once it is complete. Raises ``TLSFailure`` (whose alert, if
        any, is in ``output``)."""
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            raise failure(exc) from None
        self.established = True
        if self._vet is not None:
            self._ask_vet()
        return True

    def negotiated(self, *, pin: bool = False) -> Negotiated:
        """What the handshake settled; ``pin``: the peer's identity carries its key pin (the DER
        certificate is read only then)."""
        obj = self._obj
        cert = obj.getpeercert()
        cipher = obj.cipher()
        return Negotiated(
            version=obj.version(),
            cipher=cipher[0] if cipher else None,
            resumed=obj.session_reused,
            peer=from_peercert(cert, obj.getpeercert(binary_form=True) if pin else None),
            peer_not_after=_not_after(str(cert["notAfter"])) if cert and "notAfter" in cert else None,
            trust_problem=self.trust_problem,
            alpn=obj.selected_alpn_protocol(),
        )

    def _ask_vet(self) -> None:
        assert self._vet is not None
        obj = self._obj
        resumed = obj.session_reused
        chain = None if resumed else verified_chain(obj, self.context)
        self.trust_problem = self._vet(from_peercert(obj.getpeercert()), chain, resumed)
        if self.trust_problem is not None and obj.server_side:
            # The session ticket OpenSSL wrote as the handshake completed: a refused peer must not
            # get one, or it would resume without a chain to check. Nothing else is pending then.
            self._out.read()

    def peer_certificate(self) -> bytes | None:
        """The verified peer's certificate, DER."""
        return self._obj.getpeercert(binary_form=True)

    @property
    def sni(self) -> str | None:
        """The server name the client sent, when the context keeps it (``keep_sni``)."""
        name: str | None = self._obj.__dict__.get(_SNI)
        return name

    def session(self) -> Session | None:
        """The session to resume a later connection with (a client's, once its ticket arrived):
        held through libssl; Python's ``SSLObject.session`` only where libssl is out of reach (on
        CPython 3.11 and 3.12 each read of it leaks a copy of the session: call it sparingly)."""
        reachable, held = hold_session(self._obj, self.context)
        return held if reachable else self._obj.session

    # -- records ------------------------------------------------------------------------------

    @property
    def unread(self) -> int:
        """Ciphertext fed and not yet read: the plaintext it holds is at most this long."""
        return self._in.pending

    def read(self) -> bytes:
        """All plaintext the fed ciphertext completes (``b""`` if none), in a bytes object sized
        to it: for small reads (see ``read_into``). Sets ``peer_finished`` on close_notify.
        Raises ``TLSFailure``."""
        chunks: list[bytes] = []
        incoming, obj = self._in, self._obj
        try:
            while size := incoming.pending + obj.pending():
                chunk = obj.read(size)
                if not chunk:  # close_notify (CPython raises SSLZeroReturnError once we have sent ours too)
                    self.peer_finished = True
                    break
                chunks.append(chunk)
        except ssl.SSLError as exc:
            self._stopped_reading(exc)
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read_into(self, buffer: memoryview) -> int:
        """Plaintext the fed ciphertext completes, written into ``buffer``: how many bytes (0 if
        none). Fewer than ``len(buffer)`` means all there was; as many means call again. Sets
        ``peer_finished`` on close_notify. Raises ``TLSFailure``.

        For large reads: a fresh buffer of a few hundred KiB per read made glibc grow and trim its
        heap around every one; this allocates nothing. For a small read ``read`` is cheaper."""
        obj, incoming = self._obj, self._in
        read_into: Any = obj.read  # with a buffer it returns a count (typeshed says bytes)
        got, size = 0, len(buffer)
        try:
            while got < size:
                n: int = read_into(size - got, buffer[got:])
                if not n:
                    self.peer_finished = True
                    break
                got += n
                if not incoming.pending and not obj.pending():
                    break  # all consumed: skip the read that would only raise SSLWantReadError
        except ssl.SSLError as exc:
            self._stopped_reading(exc)
        return got

    def _stopped_reading(self, exc: ssl.SSLError) -> None:
        """Why a read stopped: more ciphertext is needed, the peer sent close_notify (CPython
        raises this once we have sent ours too), or a failure (raised as ``TLSFailure``)."""
        if isinstance(exc, ssl.SSLWantReadError):
            return
        if isinstance(exc, ssl.SSLZeroReturnError):
            self.peer_finished = True
            return
        raise failure(exc) from None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` into ``output``. Raises ``TLSFailure``."""
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            raise failure(exc) from None

    def close_notify(self) -> None:
        """Queue close_notify; the read side stays usable (TLS 1.3). A failure here only means the
        peer will see the TCP FIN without it: still an end of data, so it is not raised."""
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError (the usual case), or worse
            self._obj.unwrap()

    @property
    def has_output(self) -> bool:
        return self._out.pending > 0

    def output(self) -> bytes:
        """Ciphertext waiting to be written to the wire (``b""`` when none)."""
        return self._out.read()


_SNI = "_sidecar_sni"


def keep_sni(ctx: ssl.SSLContext) -> None:
    """Make the server context ``ctx`` keep each client's server name for ``TLSEngine.sni``
    (a callback on every handshake; set only where a listener uses the name)."""
    ctx.sni_callback = _remember_sni


def _remember_sni(obj: ssl.SSLSocket | ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
    obj.__dict__[_SNI] = name  # the server side's SSLObject has no field of its own for it


def failure(exc: BaseException) -> TLSFailure:
    """The one mapping of an OpenSSL or socket error to this program's vocabulary."""
    return TLSFailure(tlserrors.classify(exc), tlserrors.describe(exc))


@functools.lru_cache(maxsize=1024)
def _not_after(text: str) -> float:
    """A certificate's notAfter as epoch seconds; parsed once per distinct certificate (strptime
    showed in the new-connection profile)."""
    return ssl.cert_time_to_seconds(text)
