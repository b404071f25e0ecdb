"""Shared fixtures: one CA (and a rogue one) per session, leaves per test as needed; a Workload
API agent (``workload_api_server``) on a fresh socket, and a federated trust domain's CA."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support import Backend, CertFactory, CertFiles, SidecarProcess, kill

from sidecar import pki

if TYPE_CHECKING:
    from workload_api_server import WorkloadAPIServer


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertFactory:
    return CertFactory(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def rogue_ca(tmp_path_factory: pytest.TempPathFactory) -> CertFactory:
    return CertFactory(tmp_path_factory.mktemp("rogue"), name="rogue")


@pytest.fixture(scope="session")
def server_leaf(ca: CertFactory) -> CertFiles:
    return ca.leaf("orders")


@pytest.fixture(scope="session")
def client_leaf(ca: CertFactory) -> CertFiles:
    return ca.leaf("frontend")


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


@pytest.fixture
def sidecars() -> Iterator[list[SidecarProcess]]:
    """Append started sidecars here; they are stopped (SIGTERM, then kill) after the test."""
    started: list[SidecarProcess] = []
    yield started
    kill(*started)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def partner(tmp_path_factory: pytest.TempPathFactory) -> CertFactory:
    """The CA of a federated trust domain, partner.org."""
    return CertFactory(tmp_path_factory.mktemp("partner"), ca=pki.new_ca("partner ca", trust_domain="partner.org"))


@pytest.fixture
def agent_socket() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="sidecar-wlapi-"))  # short: sun_path holds 107 bytes
    yield folder / "agent.sock"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def agent(agent_socket: Path) -> Iterator[WorkloadAPIServer]:
    """A Workload API agent on ``agent_socket``, not started: the test pushes, then starts it."""
    from workload_api_server import WorkloadAPIServer  # imports gRPC: only for the tests that use it

    server = WorkloadAPIServer(agent_socket)
    yield server
    server.stop()
