"""sidecar.tickets: the shared ticket keys really land in the SSL_CTX, and only when safe."""

from __future__ import annotations

import ssl

from sidecar.tickets import TICKET_KEYS_SIZE, new_keys, set_ticket_keys


def test_keys_are_set_and_read_back() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    keys = new_keys()
    assert len(keys) == TICKET_KEYS_SIZE
    assert set_ticket_keys(ctx, keys)
    assert set_ticket_keys(ctx, new_keys())  # a reload replaces them


def test_keys_of_the_wrong_size_are_refused() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert not set_ticket_keys(ctx, b"short")
    assert not set_ticket_keys(ctx, new_keys() + b"x")
