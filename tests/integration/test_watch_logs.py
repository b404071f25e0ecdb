"""The certificate watcher's log: quiet when nothing it watches changes, even when the sidecar's own
log file is written into the folder of a watched file, and naming only the files that changed."""

from __future__ import annotations

import time
from pathlib import Path

from support import (
    Backend,
    CertFactory,
    SidecarProcess,
    inbound_config,
    plain_connect,
    start_sidecar,
    wait_for,
)

from sidecar import pki


def test_a_log_file_beside_the_ca_bundle_does_not_feed_itself(
    tmp_path: Path, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    folder = tmp_path / "h16-etc"  # config, CA bundle, certs and the log all in one folder
    ca = CertFactory(folder)
    leaf = ca.leaf("orders", folder=folder)
    cfg = inbound_config(folder / "sidecar.yaml", leaf, ca.ca_file, {"orders": (backend.address, ["*"])})
    sc = start_sidecar(cfg)  # logs to folder/sidecar.log
    sidecars.append(sc)
    assert sc.log_path.parent == ca.ca_file.parent
    with plain_connect(sc.port("orders")):
        pass  # one access record: a line written into the watched folder
    sc.wait_access(1)
    time.sleep(3)  # the feedback loop wrote a line every 100 ms
    lines = sc.logs()
    assert not [r for r in lines if str(r.get("logger", "")).startswith("watchfiles")], lines[-5:]
    assert len(lines) < 10, lines[-5:]
    # a rotation of the key alone is seen, and the log names the key alone
    pki.write_atomic(leaf.key, leaf.issued.key_pem(), 0o600)  # same key, new inode
    changed = wait_for(lambda: [r for r in sc.logs() if r.get("msg") == "certificate files changed"], timeout=10)
    assert changed[0]["files"] == [str(leaf.key)]
