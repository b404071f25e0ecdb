"""Material.server_ctx_for: each inbound listener's server context keeps its TLS sessions to itself.

Real TLS 1.3 handshakes in memory (``MemoryLink``) against contexts built by ``load_material``:
a ticket resumes on the listener that issued it, in this process or in another worker of the same
generation, and never on another listener; a reload voids them all, as before.
"""

from __future__ import annotations

import ssl

import pytest
from support import CertFactory, CertFiles, MemoryLink

from sidecar.config import TLSFiles
from sidecar.tickets import TICKET_KEYS_SIZE, listener_keys, new_keys
from sidecar.tls import Material, load_material, read_files


@pytest.fixture
def files(ca: CertFactory, server_leaf: CertFiles) -> TLSFiles:
    return TLSFiles(cert=server_leaf.cert, key=server_leaf.key, ca=ca.ca_file)


@pytest.fixture
def client(ca: CertFactory, client_leaf: CertFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_cert_chain(client_leaf.cert, client_leaf.key)
    ctx.load_verify_locations(ca.ca_file)
    return ctx


def connect(client: ssl.SSLContext, server: ssl.SSLContext, session: ssl.SSLSession | None = None) -> MemoryLink:
    link = MemoryLink(client, server)
    if session is not None:
        link.client.session = session
    link.handshake()
    return link


def ticket(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLSession:
    session = connect(client, server).client.session
    assert session is not None and session.has_ticket
    return session


def resumes(client: ssl.SSLContext, server: ssl.SSLContext, session: ssl.SSLSession) -> bool:
    link = connect(client, server, session)
    assert link.server.session_reused == link.client.session_reused
    return link.server.session_reused


@pytest.mark.parametrize("shared_keys", [False, True], ids=["one process", "workers"])
def test_a_ticket_resumes_only_on_its_own_listener(files: TLSFiles, client: ssl.SSLContext, shared_keys: bool) -> None:
    keys = new_keys() if shared_keys else None
    material = load_material(read_files(files), ticket_keys=keys, listeners=("a", "b"))
    a, b = material.server_ctx_for("a"), material.server_ctx_for("b")
    assert a is not b and material.server_ctx not in (a, b)
    session = ticket(client, a)
    assert resumes(client, a, session)
    assert not resumes(client, b, session)
    assert not resumes(client, material.server_ctx, session)
    assert not resumes(client, a, ticket(client, b))


def test_workers_of_one_generation_open_each_others_tickets_per_listener(
    files: TLSFiles, client: ssl.SSLContext
) -> None:
    keys = new_keys()
    worker1 = load_material(read_files(files), ticket_keys=keys, listeners=("a", "b"))
    worker2 = load_material(read_files(files), ticket_keys=keys, listeners=("a", "b"))
    session = ticket(client, worker1.server_ctx_for("a"))
    assert resumes(client, worker2.server_ctx_for("a"), session)
    assert not resumes(client, worker2.server_ctx_for("b"), session)
    reloaded = load_material(read_files(files), generation=2, ticket_keys=new_keys(), listeners=("a", "b"))
    assert not resumes(client, reloaded.server_ctx_for("a"), session)  # a reload voids every ticket


def test_a_listener_not_named_at_load_has_no_context(files: TLSFiles) -> None:
    material: Material = load_material(read_files(files), listeners=("a",))
    with pytest.raises(KeyError):
        material.server_ctx_for("b")


def test_listener_keys_are_distinct_and_stable() -> None:
    keys = new_keys()
    a, b = listener_keys(keys, "a"), listener_keys(keys, "b")
    assert len(a) == len(b) == TICKET_KEYS_SIZE
    assert a != b and a != keys
    assert listener_keys(keys, "a") == a  # every worker derives the same
    assert listener_keys(new_keys(), "a") != a


def test_contexts_are_as_strict_as_the_shared_one(files: TLSFiles) -> None:
    material = load_material(read_files(files), listeners=("a",))
    ctx = material.server_ctx_for("a")
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.num_tickets == material.server_ctx.num_tickets == 1
