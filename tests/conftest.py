"""Shared fixtures: one CA (and a rogue one) per session, leaves per test as needed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Backend, CertFactory, CertFiles, SidecarProcess, kill


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
