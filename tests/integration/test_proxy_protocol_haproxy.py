"""HAProxy reads the PROXY v2 headers sidecar.proxy_protocol builds, over a real socket.

A real ``haproxy`` listens on 127.0.0.1 with ``accept-proxy`` and answers each request with what it
parsed (``http-request return`` with sample fetches). HAProxy 2.6 (Debian 12) shows the addresses
(``src``, ``dst``, ports), ``fc_rcvd_proxy`` and the authority TLV (``fc_pp_authority``); it has no
fetch for PP2_TYPE_SSL or a custom TLV (``fc_pp_tlv`` came in 2.9), so for 0x20 and 0xE0 it proves
only that it walked them and accepted the header (it refuses a TLV that overruns the header: the
control test below shows it), and tests/unit/test_proxy_protocol.py reads their contents with an
independent parser.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar import pki
from sidecar.proxy_protocol import Facts, Mode, build_header

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make bench-deps installs it)")

FIELDS = "%[fc_rcvd_proxy]|%[src]|%[src_port]|%[dst]|%[dst_port]|%[fc_pp_authority]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    assert HAPROXY is not None
    folder = tmp_path_factory.mktemp("haproxy-pp")
    for _attempt in range(5):
        port = free_port()
        cfg = folder / "haproxy.cfg"
        cfg.write_text(
            "global\n"
            "    log stderr format raw local0\n"
            "defaults\n"
            "    mode http\n"
            "    log global\n"
            "    timeout connect 5s\n"
            "    timeout client 10s\n"
            "    timeout server 10s\n"
            "frontend fe\n"
            f"    bind 127.0.0.1:{port} accept-proxy\n"
            f'    http-request return status 200 content-type text/plain lf-string "{FIELDS}"\n'
        )
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=(folder / "stderr").open("wb")
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            try:
                yield port
            finally:
                proc.terminate()
                proc.wait(10)
            return
    pytest.fail(f"haproxy did not start: {(folder / 'stderr').read_text()}")


def ask(port: int, header: bytes) -> bytes | None:
    """Send ``header`` then a request; HAProxy's answer body, or None when it closed on us."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(header + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            return None
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


CA = pki.new_ca("haproxy test CA", trust_domain="mesh.local")
LEAF = pki.issue(CA, common_name="frontend", spiffe_ids=["spiffe://mesh.local/frontend"], dns_names=["fe.local"])
DER = LEAF.cert.public_bytes(serialization.Encoding.DER)


def full_facts(source: tuple[str, int], destination: tuple[str, int], sni: str | None) -> Facts:
    return Facts(
        source,
        destination,
        tls_version="TLSv1.3",
        sni=sni,
        peer_cert_der=DER,
        peer_cn="frontend",
        peer_spiffe_id="spiffe://mesh.local/frontend",
    )


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize(
    ("source", "destination"),
    [(("192.0.2.10", 40001), ("198.51.100.7", 8443)), (("2001:db8::10", 1), ("2001:db8::7", 65535))],
    ids=["ipv4", "ipv6"],
)
def test_haproxy_reads_every_mode(
    haproxy: int, mode: Mode, source: tuple[str, int], destination: tuple[str, int]
) -> None:
    body = ask(haproxy, build_header(mode, full_facts(source, destination, "orders.mesh.local")))
    authority = "orders.mesh.local" if mode is not Mode.CONN else ""
    assert body == f"1|{source[0]}|{source[1]}|{destination[0]}|{destination[1]}|{authority}".encode()


def test_haproxy_reads_tls_full_without_sni(haproxy: int) -> None:
    body = ask(haproxy, build_header(Mode.TLS_FULL, full_facts(("127.0.0.5", 7), ("127.0.0.1", 8), None)))
    assert body == b"1|127.0.0.5|7|127.0.0.1|8|"


def test_control_haproxy_refuses_a_tlv_that_overruns_the_header(haproxy: int) -> None:
    """Proves the positive tests mean something: HAProxy does check the TLV chain it walks."""
    header = bytearray(build_header(Mode.TLS_FULL, full_facts(("127.0.0.5", 7), ("127.0.0.1", 8), "x")))
    spiffe_tlv = header.rindex(b"\xe0")
    header[spiffe_tlv + 2] += 1  # the last TLV now claims one byte more than the header holds
    assert ask(haproxy, bytes(header)) is None
