"""A SPIFFE Workload API server for tests, standing in for a SPIRE agent.

SPIRE's agent cannot be installed here (neither Debian nor PyPI packages it), so the tests run
this instead. It speaks the real protocol: gRPC on a unix socket, service ``SpiffeWorkloadAPI``,
server-streaming ``FetchX509SVID``, the ``workload.spiffe.io: true`` metadata header required
(refused with INVALID_ARGUMENT without it, as the Workload Endpoint spec says), messages encoded
with the Workload API proto as py-spiffe ships it. It serves X.509-SVIDs issued by test CAs made
with ``sidecar.pki``; the test decides what each stream sends and when: push a rotation
mid-stream, rotate bundles, go silent, stop and restart, send malformed responses.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2

from sidecar import pki

HEADER = ("workload.spiffe.io", "true")
SERVICE = "SpiffeWorkloadAPI"
Response = Any  # workload_pb2.X509SVIDResponse (generated, untyped)


def der(certs: Sequence[x509.Certificate]) -> bytes:
    """Certificates as the Workload API carries them: DER, concatenated."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def svid_message(
    issued: pki.Issued, bundle: Sequence[x509.Certificate], *, key: Any = None, spiffe_id: str | None = None
) -> Any:
    """One ``X509SVID``: the leaf and its chain, its PKCS#8 key (or ``key``), its trust domain's bundle."""
    ids = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uri = spiffe_id or ids.get_values_for_type(x509.UniformResourceIdentifier)[0]
    private = (key or issued.key).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return workload_pb2.X509SVID(
        spiffe_id=uri, x509_svid=der([issued.cert, *issued.chain]), x509_svid_key=private, bundle=der(bundle)
    )


def response(
    issued: pki.Issued,
    bundle: Sequence[x509.Certificate],
    federated: Mapping[str, Sequence[x509.Certificate]] | None = None,
) -> Response:
    """A well-formed ``X509SVIDResponse``: one SVID; ``federated`` bundles keyed by ``spiffe://TD``."""
    return workload_pb2.X509SVIDResponse(
        svids=[svid_message(issued, bundle)],
        federated_bundles={td: der(certs) for td, certs in (federated or {}).items()},
    )


def empty_response(bundle: Sequence[x509.Certificate]) -> Response:
    """Malformed: no SVID at all (the spec requires one or more)."""
    return workload_pb2.X509SVIDResponse(svids=[], federated_bundles={"spiffe://mesh.local": der(bundle)})


class WorkloadAPIServer:
    """The test's agent on ``socket``. ``push`` makes a response the current state and sends it on
    every open stream (and first thing on each new one); ``silent`` streams answer nothing."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._cond = threading.Condition()
        self._current: Response | None = None
        self._version = 0
        self.silent = False
        self.streams = 0  # FetchX509SVID calls accepted
        self.refused = 0  # calls refused for want of the security header
        self.sent = 0  # responses sent, over all streams
        self._server: grpc.Server | None = None
        self._stopping = False

    def start(self) -> WorkloadAPIServer:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # what an agent does with its old socket on start
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.unary_stream_rpc_method_handler(
            self._fetch_x509_svid,
            request_deserializer=workload_pb2.X509SVIDRequest.FromString,
            response_serializer=workload_pb2.X509SVIDResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"FetchX509SVID": handler}),))
        server.add_insecure_port(f"unix:{self.socket}")
        self._stopping = False
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """The agent goes away: every stream ends, the socket disappears."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def push(self, message: Response) -> None:
        with self._cond:
            self._current = message
            self._version += 1
            self._cond.notify_all()

    def _fetch_x509_svid(self, request: Any, context: grpc.ServicerContext) -> Iterator[Response]:
        if HEADER not in tuple(context.invocation_metadata()):
            with self._cond:
                self.refused += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        with self._cond:
            self.streams += 1
        seen = 0
        while True:
            with self._cond:
                self._cond.wait_for(functools.partial(self._news, seen), timeout=0.1)
                if self._stopping or not context.is_active():
                    return
                if not self._news(seen):
                    continue
                seen, message = self._version, self._current
                self.sent += 1
            yield message

    def _news(self, seen: int) -> bool:
        """Whether a stream that sent version ``seen`` has something to do (caller holds the lock)."""
        return self._stopping or (self._version != seen and not self.silent and self._current is not None)
