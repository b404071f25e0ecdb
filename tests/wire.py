"""What crossed a wire: TCP streams read back from a tcpdump capture, and TLS records read from them.

``streams`` reassembles each direction of each TCP connection in a pcap file (Ethernet, IPv4 or
IPv6, as tcpdump writes for a veth); ``tls_records`` reads a stream as TLS records and raises
``NotTLS`` at the first byte that is not one; ``server_hello_version`` says which version a
ServerHello selected (TLS 1.3 names itself only in the supported_versions extension), and
``tls13_problems`` puts them together for a whole capture. Pure functions over bytes: the tests
and ``make demo-transparent`` use them as proof.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from pathlib import Path

ETHERNET = 1
LINUX_SLL = 113
RECORD_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}
TLS13 = 0x0304
SUPPORTED_VERSIONS = 0x002B


class NotTLS(ValueError):
    """A stream holds bytes that are not a TLS record."""


@dataclass(frozen=True, order=True)
class Flow:
    """One direction of one TCP connection."""

    src: str
    sport: int
    dst: str
    dport: int

    def __str__(self) -> str:
        return f"{_addr(self.src, self.sport)} -> {_addr(self.dst, self.dport)}"


def _addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def packets(pcap: Path) -> list[tuple[Flow, int, bytes]]:
    """Every TCP segment with a payload: its flow, sequence number and payload, in capture order."""
    data = pcap.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{pcap}: not a pcap file")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    out: list[tuple[Flow, int, bytes]] = []
    at = 24
    while at + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[at + 8 : at + 12])[0]
        frame = data[at + 16 : at + 16 + incl]
        at += 16 + incl
        segment = _tcp(frame, linktype)
        if segment is not None and segment[2]:
            out.append(segment)
    return out


def _tcp(frame: bytes, linktype: int) -> tuple[Flow, int, bytes] | None:
    if linktype == ETHERNET:
        ethertype, ip = struct.unpack("!H", frame[12:14])[0], frame[14:]
    elif linktype == LINUX_SLL:
        ethertype, ip = struct.unpack("!H", frame[14:16])[0], frame[16:]
    else:
        raise ValueError(f"link type {linktype} not supported")
    if ethertype == 0x0800:
        if ip[9] != 6:
            return None
        header = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        src, dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
        tcp = ip[header:total]
    elif ethertype == 0x86DD:
        if ip[6] != 6:
            return None  # not TCP, or an extension header (none are sent here)
        length = struct.unpack("!H", ip[4:6])[0]
        src, dst = str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40]))
        tcp = ip[40 : 40 + length]
    else:
        return None
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    offset = (tcp[12] >> 4) * 4
    return Flow(src, sport, dst, dport), seq, bytes(tcp[offset:])


def streams(pcap: Path) -> dict[Flow, bytes]:
    """Each direction's payload in sequence order; a retransmitted segment counts once."""
    segments: dict[Flow, dict[int, bytes]] = {}
    for flow, seq, payload in packets(pcap):
        kept = segments.setdefault(flow, {})
        if len(payload) > len(kept.get(seq, b"")):
            kept[seq] = payload
    out: dict[Flow, bytes] = {}
    for flow, by_seq in segments.items():
        first = min(by_seq)
        stream = bytearray()
        for seq in sorted(by_seq, key=lambda s: (s - first) % 2**32):
            start = (seq - first) % 2**32
            chunk = by_seq[seq]
            if start + len(chunk) > len(stream):
                stream += chunk[max(0, len(stream) - start) :]
        out[flow] = bytes(stream)
    return out


def tls_records(stream: bytes) -> list[tuple[int, bytes]]:
    """``(content type, fragment)`` of every record; ``NotTLS`` at the first that is not one (a
    capture may end inside the last record: that one is left out)."""
    records: list[tuple[int, bytes]] = []
    at = 0
    while at + 5 <= len(stream):
        kind, major, minor, length = stream[at], stream[at + 1], stream[at + 2], stream[at + 3] << 8 | stream[at + 4]
        if kind not in RECORD_TYPES or major != 3 or minor > 4 or length > 2**14 + 256:
            raise NotTLS(f"byte {at}: {stream[at : at + 16]!r} is not a TLS record header")
        if at + 5 + length > len(stream):
            break
        records.append((kind, stream[at + 5 : at + 5 + length]))
        at += 5 + length
    return records


def server_hello_version(records: list[tuple[int, bytes]]) -> int | None:
    """The version a ServerHello among ``records`` selected (its supported_versions extension, else
    its legacy version field), or None without one."""
    for kind, body in records:
        if kind != 22 or not body or body[0] != 2:
            continue
        at = 4 + 2 + 32  # handshake header, legacy_version, random
        legacy = body[4] << 8 | body[5]
        at += 1 + body[at]  # legacy_session_id_echo
        at += 2 + 1  # cipher_suite, legacy_compression_method
        if at + 2 > len(body):
            return legacy
        end = at + 2 + (body[at] << 8 | body[at + 1])
        at += 2
        while at + 4 <= end:
            ext, size = body[at] << 8 | body[at + 1], body[at + 2] << 8 | body[at + 3]
            if ext == SUPPORTED_VERSIONS and size == 2:
                return int(body[at + 4] << 8 | body[at + 5])
            at += 4 + size
        return legacy
    return None


def tls13_problems(flows: dict[Flow, bytes], server_port: int) -> list[str]:
    """What keeps ``flows`` (``streams`` of a capture) from being TLS 1.3 connections to
    ``server_port`` and nothing else: a flow not to or from that port, a byte that is not a TLS
    record, a first record that is not a handshake, a second handshake record in one direction
    (all after the hello is encrypted), a server that did not select TLS 1.3. Empty: none."""
    problems: list[str] = []
    for flow, data in flows.items():
        if server_port not in (flow.sport, flow.dport):
            problems.append(f"{flow}: not to or from port {server_port}")
            continue
        try:
            records = tls_records(data)
        except NotTLS as exc:
            problems.append(f"{flow}: {exc}")
            continue
        kinds = [kind for kind, _ in records]
        if not kinds or kinds[0] != 22 or not set(kinds) <= set(RECORD_TYPES) or kinds.count(22) != 1:
            problems.append(f"{flow}: record types {kinds}")
        if flow.sport == server_port and server_hello_version(records) != TLS13:
            problems.append(f"{flow}: the server did not select TLS 1.3")
    return problems
