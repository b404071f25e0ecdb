"""What HTTP/2 framing costs the HBONE connection objects, per GB and per stream, in one process.

Run: ``python -m bench.hbone_frames [--mib 256] [--streams 3000]``. A client and a server object
(sidecar.hbone) are joined in memory, optionally through two real ``ssl.SSLObject``s (TLS 1.3,
AES-GCM), and one stream carries ``--mib`` MiB one way while the receiver consumes as it goes.
CPU is this process's user+system time, so the figure is both sides' framing (and crypto, for the
TLS rows) together. The ``TLS only`` row is the same bytes through the TLS pair with no HTTP/2:
what direct mTLS pays for the same work. Then: CPU per stream opened, answered 200 and closed.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sidecar import pki
from sidecar.hbone import HboneClient, HboneServer, TunnelSettings
from sidecar.hbone.events import DialRequested, StreamData

MiB = 1024 * 1024
CHUNK = 256 * 1024  # what one read of the app's socket hands the sidecar


class Pipe:
    """Bytes from one side to the other, through TLS or not."""

    def __init__(self, tls: tuple[ssl.SSLObject, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None) -> None:
        self.tls = tls

    def carry(self, data: bytes) -> bytes:
        if self.tls is None or not data:
            return data
        src, dst, out_bio, in_bio = self.tls
        src.write(data)
        in_bio.write(out_bio.read())
        got = bytearray()
        with contextlib.suppress(ssl.SSLWantReadError):
            while chunk := dst.read(1 << 20):
                got += chunk
        return bytes(got)


def tls_pipes(folder: Path) -> tuple[Pipe, Pipe]:
    """Two directions of one real TLS 1.3 connection between memory BIOs."""
    ca = pki.new_ca("bench", trust_domain="bench.local")
    leaf = pki.issue(ca, common_name="bench", spiffe_ids=["spiffe://bench.local/x"], dns_names=["localhost"])
    cert, key, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    pki.write_issued(leaf, cert, key)
    pki.write_atomic(ca_file, ca.cert_pem())
    contexts = []
    for protocol in (ssl.PROTOCOL_TLS_CLIENT, ssl.PROTOCOL_TLS_SERVER):
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca_file)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        contexts.append(ctx)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = contexts[0].wrap_bio(c_in, c_out, server_side=False)
    server = contexts[1].wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return Pipe((client, server, c_out, s_in)), Pipe((server, client, s_out, c_in))


def joined(settings: TunnelSettings, up: Pipe, down: Pipe) -> tuple[HboneClient, HboneServer, Callable[[], None]]:
    client = HboneClient(now=0.0, settings=settings)
    server = HboneServer(now=0.0, settings=settings)

    def pump() -> None:
        while True:
            a, b = up.carry(client.data_to_send()), down.carry(server.data_to_send())
            if not a and not b:
                return
            if a:
                server.receive_data(a, 0.0)
                for event in server.events():
                    if isinstance(event, StreamData):
                        server.consumed(event.stream_id, len(event.data))
                    elif isinstance(event, DialRequested):
                        server.accept(event.stream_id)
            if b:
                client.receive_data(b, 0.0)
                client.events()

    pump()
    return client, server, pump


def bulk(settings: TunnelSettings, mib: int, up: Pipe, down: Pipe) -> float:
    """CPU seconds per GB through one stream."""
    client, _server, pump = joined(settings, up, down)
    sid = client.open_stream("127.0.0.1:8080")
    pump()
    block = b"\x5a" * CHUNK
    start = time.process_time()
    for _ in range(mib * MiB // CHUNK):
        client.send(sid, block)
        pump()
    return (time.process_time() - start) / (mib / 1024)


def tls_only(mib: int, up: Pipe) -> float:
    block = b"\x5a" * CHUNK
    start = time.process_time()
    for _ in range(mib * MiB // CHUNK):
        up.carry(block)
    return (time.process_time() - start) / (mib / 1024)


def streams(count: int, up: Pipe, down: Pipe) -> float:
    """CPU microseconds per stream: CONNECT, 200, a few bytes each way, both END_STREAMs."""
    client, server, pump = joined(TunnelSettings(), up, down)
    start = time.process_time()
    for _ in range(count):
        sid = client.open_stream("127.0.0.1:8080")
        pump()
        client.send(sid, b"GET / HTTP/1.1\r\n\r\n")
        client.end_stream(sid)
        server.send(sid, b"HTTP/1.1 200 OK\r\n\r\n")
        server.end_stream(sid)
        pump()
    return (time.process_time() - start) / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--streams", type=int, default=3000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        plain = Pipe(None), Pipe(None)
        tls = tls_pipes(Path(folder))
        print(f"{args.mib} MiB through one stream in {CHUNK // 1024} KiB sends:")
        print("| max frame size | h2 only, CPU s/GB | h2 + TLS, CPU s/GB |")
        print("|--:|--:|--:|")
        print(f"| TLS only (no HTTP/2) | — | {tls_only(args.mib, tls[0]):.3f} |")
        for size in (16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024):
            settings = TunnelSettings(max_frame_size=size)
            bare, wrapped = bulk(settings, args.mib, *plain), bulk(settings, args.mib, *tls)
            print(f"| {size // 1024} KiB | {bare:.3f} | {wrapped:.3f} |")
        print(f"\nper stream (CONNECT, 200, a request and a response, both FINs), {args.streams} streams:")
        bare, wrapped = streams(args.streams, *plain), streams(args.streams, *tls)
        print(f"h2 only: {bare:.0f} µs CPU; h2 + TLS: {wrapped:.0f} µs CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
