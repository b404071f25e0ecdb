"""Certificates from the SPIFFE Workload API: one ``FetchX509SVID`` stream to the agent, kept open.

``WorkloadAPISource`` holds the stream (py-spiffe's client, on that client's own thread), turns
each response into a ``PemBundle`` there, and hands it to the event loop, where ``publish`` (the
store's validate-then-swap) takes or refuses it. The first bundle has a deadline; a later outage
keeps the current material and reconnects with backoff, logging once when the agent goes away and
once when it is back. The agent's reachability is a small state machine, its transitions data.
An ``Observer`` (the metrics) hears of every update and of every change of reachability.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.x509 import Certificate

# Our processes never fork without exec (a supervisor starts workers as fresh interpreters), so
# gRPC's fork handlers only cost: at each worker start they would pause gRPC's threads, or, while
# the stream's call is open, skip that and print a line that is not JSON on stderr. Read when
# gRPC starts, so set before it is imported; an operator's own setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from spiffe import WorkloadApiClient
from spiffe.errors import ArgumentError
from spiffe.workloadapi.x509_context import X509Context

from .config import TLSWorkloadAPI
from .errors import CertificateError, SidecarError, WorkloadAPIUnavailable
from .logs import event
from .metrics import WORKLOAD_API_RESULTS
from .tls import Material, Origin, PemBundle, TrustBundle, load_material

log = logging.getLogger("sidecar.workload_api")

TIMEOUT_ENV = "SIDECAR_WORKLOAD_API_TIMEOUT"
DEFAULT_FIRST_TIMEOUT = 30.0


def first_fetch_timeout(environ: Mapping[str, str] = os.environ) -> float:
    """How long to wait for the first X.509-SVID: ``$SIDECAR_WORKLOAD_API_TIMEOUT`` seconds, else 30."""
    raw = environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_FIRST_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise SidecarError(f"{TIMEOUT_ENV}: expected a number of seconds greater than 0, got {raw!r}")
    return seconds


# -- the agent's reachability, as seen from here ------------------------------------------------


class Link(StrEnum):
    CONNECTING = "connecting"  # no response yet, ever: quiet retries until the first deadline
    UP = "up"  # the stream answers
    DOWN = "down"  # it answered once and is gone: the current material stays in use


class Seen(StrEnum):
    RESPONSE = "response"  # the agent sent a response (accepted or refused)
    LOST = "lost"  # the stream ended or could not be opened


# (state, what was seen) -> (next state, log level and message, or None for silence)
TRANSITIONS: dict[tuple[Link, Seen], tuple[Link, tuple[int, str] | None]] = {
    (Link.CONNECTING, Seen.RESPONSE): (Link.UP, (logging.INFO, "Workload API connected")),
    (Link.CONNECTING, Seen.LOST): (Link.CONNECTING, None),
    (Link.UP, Seen.RESPONSE): (Link.UP, None),
    (Link.UP, Seen.LOST): (
        Link.DOWN,
        (logging.WARNING, "Workload API stream lost; keeping the current certificates and reconnecting"),
    ),
    (Link.DOWN, Seen.RESPONSE): (Link.UP, (logging.INFO, "Workload API stream restored")),
    (Link.DOWN, Seen.LOST): (Link.DOWN, None),
}


OK, REFUSED, WORKER_ERROR = WORKLOAD_API_RESULTS


class Observer(Protocol):
    """Who hears what the source does: each update's result (``ok``: served by every process;
    ``refused``: not valid, the old material stays; ``worker_error``: served here, a worker did not
    confirm it and is restarted with it), and whether the stream is up."""

    def updated(self, result: str) -> None: ...

    def connected(self, up: bool) -> None: ...


@dataclass
class Backoff:
    """Exponential delays between reconnects, with jitter so a node's sidecars do not reconnect in step."""

    initial: float = 0.1
    factor: float = 2.0
    cap: float = 10.0
    attempt: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class Status:
    """What ``/certs``, ``/readyz`` and the metrics say about the source."""

    address: str
    link: Link
    updates: int  # bundles the store took
    refused: int  # bundles the store refused (the old material stayed)
    disconnects: int  # streams that ended or could not be opened
    last_update: float | None  # time.time() of the last bundle taken
    last_error: str | None


# -- responses into bundles (on the client's thread) --------------------------------------------


def bundle_of(context: X509Context, address: str) -> PemBundle:
    """The default X.509-SVID (the first), its key and every bundle, own trust domain first."""
    svid = context.default_svid
    own = str(svid.spiffe_id.trust_domain)
    bundles = sorted(context.x509_bundle_set.bundles, key=lambda b: (str(b.trust_domain) != own, str(b.trust_domain)))
    trust = tuple(TrustBundle(str(b.trust_domain), _pem(sorted(b.x509_authorities, key=_der))) for b in bundles)
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return PemBundle(
        chain=_pem(svid.cert_chain),
        key=key,
        trust=trust,
        origin=Origin.workload_api(address, str(svid.spiffe_id), [b.trust_domain for b in trust if b.trust_domain]),
    )


def _pem(certs: list[Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _der(cert: Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class _Inbox:
    """Where the client's thread leaves work for the loop: the newest bundle (every response is
    the whole state, so older ones are dropped) and whether the stream ended."""

    def __init__(self, loop: asyncio.AbstractEventLoop, address: str) -> None:
        self._loop = loop
        self._address = address
        self._bundle: PemBundle | None = None
        self._ended: str | None = None
        self._ready = asyncio.Event()

    # on the client's thread
    def on_update(self, context: X509Context) -> None:
        try:
            bundle = bundle_of(context, self._address)
        except Exception as exc:  # never let an exception end the client's stream silently
            self._call(self._end, f"unreadable response: {exc}")
            return
        self._call(self._put, bundle)

    def on_error(self, error: Exception) -> None:
        self._call(self._end, str(error) or type(error).__name__)

    def _call(self, fn: Callable[[object], None], arg: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
            self._loop.call_soon_threadsafe(fn, arg)

    # on the loop
    def _put(self, bundle: object) -> None:
        assert isinstance(bundle, PemBundle)
        self._bundle = bundle
        self._ready.set()

    def _end(self, reason: object) -> None:
        self._ended = str(reason)
        self._ready.set()

    async def next(self) -> PemBundle | str:
        """The newest bundle, else why the stream ended (a str)."""
        await self._ready.wait()
        bundle, self._bundle = self._bundle, None
        if bundle is not None:
            if self._ended is None:
                self._ready.clear()
            return bundle
        assert self._ended is not None
        return self._ended


# -- the source ----------------------------------------------------------------------------------


class WorkloadAPISource:
    """Streams X.509-SVIDs and bundles from the agent at ``settings.socket`` into ``publish``.

    ``publish(bundle)`` validates and swaps (``TLSStore.accept``); it raises ``CertificateError``
    to refuse a bundle, which keeps the old material. ``start()`` returns once the first bundle
    was taken; ``stop()`` closes the stream. Every method runs on the event loop.
    """

    def __init__(
        self,
        settings: TLSWorkloadAPI,
        publish: Callable[[PemBundle], Awaitable[object]],
        *,
        backoff: Backoff | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self._publish = publish
        self._backoff = backoff or Backoff()
        self._observer = observer
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()
        self.link = Link.CONNECTING
        self.updates = 0
        self.refused = 0
        self.disconnects = 0
        self.last_update: float | None = None
        self.last_error: str | None = None
        self._last_refusal: str | None = None

    @property
    def address(self) -> str:
        return self.settings.address

    def status(self) -> Status:
        return Status(
            self.address, self.link, self.updates, self.refused, self.disconnects, self.last_update, self.last_error
        )

    async def start(self, wait: float | None = None) -> None:
        """Open the stream and wait for the first bundle ``publish`` takes, at most ``wait``
        seconds (default: ``first_fetch_timeout()``), retrying while the socket does not exist;
        then raise ``WorkloadAPIUnavailable`` naming the socket."""
        timeout = first_fetch_timeout() if wait is None else wait
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"workload-api {self.address}")
            self._task.add_done_callback(self._stopped)
        first = asyncio.create_task(self._first.wait())
        try:
            await asyncio.wait({first, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            first.cancel()
        if self._first.is_set():
            return
        await self.stop()
        why = self.last_error or "the agent sent no X.509-SVID"
        raise WorkloadAPIUnavailable(
            f"tls.workload_api: no usable X.509-SVID from {self.address} within {timeout:g} s ({why})"
        )

    async def stop(self) -> None:
        """Close the stream (idempotent); a failure of the stream's task was logged when it happened."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        self._set_link(Link.CONNECTING if self.link is Link.CONNECTING else Link.DOWN)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        """The stream's task ended: only a bug ends it other than ``stop``; say so at once, since no
        certificate will arrive any more."""
        if task.cancelled() or task.exception() is None:
            return
        self.last_error = f"the Workload API stream stopped: {task.exception()!r}"
        self._set_link(Link.DOWN)
        log.error(
            "the Workload API stream stopped for good; the current certificates stay until they expire",
            exc_info=task.exception(),
            extra={"fields": {"socket": self.address}},
        )

    async def _run(self) -> None:
        while True:
            reason = await self._stream_once()
            self.disconnects += 1
            self.last_error = reason
            self._saw(Seen.LOST, error=reason)
            await asyncio.sleep(self._backoff.next())

    async def _stream_once(self) -> str:
        """One stream, from opening it to its end; returns why it ended."""
        try:
            client = await asyncio.to_thread(WorkloadApiClient, self.address)
        except ArgumentError as exc:
            missing = not await asyncio.to_thread(self.settings.socket.exists)
            return f"no socket at {self.settings.socket}" if missing else str(exc)
        inbox = _Inbox(asyncio.get_running_loop(), self.address)
        handle = client.stream_x509_contexts(inbox.on_update, inbox.on_error, retry_connect=False)
        try:
            while isinstance(item := await inbox.next(), PemBundle):
                self._saw(Seen.RESPONSE)
                await self._take(item)
            return item
        finally:
            handle.cancel()
            await asyncio.to_thread(client.close)

    async def _take(self, bundle: PemBundle) -> None:
        try:
            await self._publish(bundle)
        except CertificateError as exc:
            self.refused += 1
            self.last_error = str(exc)
            if str(exc) != self._last_refusal:  # the same refusal again is not news
                event(
                    log,
                    logging.WARNING,
                    "Workload API update refused; keeping the current certificates",
                    error=str(exc),
                )
            self._last_refusal = str(exc)
            self._tell(REFUSED)
            return
        except SidecarError as exc:  # published, but a worker did not confirm it (the store logged it)
            self._took(str(exc))
            self._tell(WORKER_ERROR)
            return
        self._took(None)
        self._tell(OK)

    def _took(self, error: str | None) -> None:
        self.updates += 1
        self.last_update = time.time()
        self.last_error, self._last_refusal = error, None
        self._backoff.reset()
        self._first.set()

    def _tell(self, result: str) -> None:
        if self._observer is not None:
            self._observer.updated(result)

    def _set_link(self, link: Link) -> None:
        if link is not self.link and self._observer is not None:
            self._observer.connected(link is Link.UP)
        self.link = link

    def _saw(self, seen: Seen, **fields: object) -> None:
        link, said = TRANSITIONS[(self.link, seen)]
        self._set_link(link)
        if said is not None:
            level, message = said
            event(log, level, message, socket=self.address, **fields)
        else:
            event(log, logging.DEBUG, f"Workload API {seen}", socket=self.address, **fields)


def fetch_material(settings: TLSWorkloadAPI, wait: float | None = None) -> Material:
    """Connect, wait for the first usable X.509-SVID (same deadline as ``run``), build it, disconnect:
    what ``sidecar check`` does."""

    async def fetch() -> Material:
        taken: list[Material] = []

        async def publish(bundle: PemBundle) -> None:
            taken.append(await asyncio.to_thread(load_material, bundle, session_resumption=settings.session_resumption))

        source = WorkloadAPISource(settings, publish)
        try:
            await source.start(wait)
        finally:
            await source.stop()
        return taken[-1]

    return asyncio.run(fetch())
