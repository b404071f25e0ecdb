"""Transparent mode in network namespaces: nodes with a plain HTTP app and a sidecar in capture
mode, the nat rules installed by ``sidecar iptables install``, and tcpdump on the wire.

Used by ``tests/netns/test_netns_transparent.py`` and ``scripts/demo_transparent.py``. Each node
is one namespace; its app (``httpapp.py``) runs as ``APP_UID`` and knows nothing of the mesh; its
sidecar runs as ``SIDECAR_UID`` (``transparent.uid``) with certificates from one development CA.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from namespaces import Lab, Namespace

from sidecar import pki

SIDECAR_UID = 10001
APP_UID = 10002
TD = "spiffe://mesh.local"
OUT_PORT, IN_PORT, APP_PORT = 15001, 15006, 8080
START_TIMEOUT = 30.0
TESTS = Path(__file__).resolve().parent
HTTPAPP = str(TESTS / "httpapp.py")


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    """``predicate()`` once it is neither None nor False."""
    deadline = time.monotonic() + timeout
    while (result := predicate()) is None or result is False:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return result


@dataclass
class Node:
    """One namespace: an app, a sidecar, their logs."""

    name: str
    ns: Namespace
    dir: Path
    sidecar: subprocess.Popen[str] | None = None
    sidecar_log: Path | None = None
    config: Path | None = None
    app_log: Path | None = None
    _runs: int = 0

    # -- the app --------------------------------------------------------------------------------

    def start_app(self, port: int = APP_PORT) -> None:
        self.app_log = self.dir / f"app-{port}.jsonl"
        self.app_log.touch()
        os.chown(self.app_log, APP_UID, APP_UID)  # the app writes it as its own uid
        self.ns.start(
            sys.executable, HTTPAPP, "serve", self.name, str(port), str(self.app_log), ready="ready", uid=APP_UID
        )

    def requests(self) -> list[dict[str, str]]:
        """What reached the app."""
        if self.app_log is None or not self.app_log.exists():
            return []
        return [json.loads(line) for line in self.app_log.read_text().splitlines() if line.strip()]

    def get(self, url: str, uid: int = APP_UID) -> dict[str, Any]:
        """The app calling ``url``: ``{"status", "body"}`` or ``{"error"}``."""
        done = self.ns.run(sys.executable, HTTPAPP, "get", url, uid=uid, check=False, timeout=60)
        answer: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {"error": done.stderr.strip()}
        if "body" in answer:
            with contextlib.suppress(ValueError):
                answer["json"] = json.loads(answer["body"])
        return answer

    # -- the sidecar ----------------------------------------------------------------------------

    def configure(
        self,
        ca: pki.Issued,
        transparent: dict[str, Any] | None,
        identity: str | None = None,
        **sections: Any,
    ) -> Path:
        """Certificates for ``identity`` (default: the node's name), owned by the sidecar's uid,
        and a config with this ``transparent`` section (None: none) and any other ``sections``."""
        ident = identity or self.name
        certs = self.dir / f"certs-{ident}"
        certs.mkdir(exist_ok=True)
        leaf = pki.issue(ca, common_name=ident, spiffe_ids=[f"{TD}/{ident}"], dns_names=[f"{ident}.mesh.local"])
        pki.write_issued(leaf, certs / "cert.pem", certs / "key.pem")
        pki.write_atomic(certs / "ca.pem", ca.cert_pem())
        for path in (certs, *certs.iterdir()):
            os.chown(path, SIDECAR_UID, SIDECAR_UID)
        cfg: dict[str, Any] = {
            "tls": {"cert": str(certs / "cert.pem"), "key": str(certs / "key.pem"), "ca": str(certs / "ca.pem")},
            **sections,
            "log": {"level": "info"},
        }
        if transparent is not None:
            cfg["transparent"] = {"uid": SIDECAR_UID, **transparent}
        self.config = self.dir / f"sidecar-{ident}.yaml"
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.config.chmod(0o644)
        return self.config

    def nat_tables(self) -> list[str]:
        """The namespace's nat tables, IPv4 and IPv6, without comments and counters."""
        lines = [*self.ns.run("iptables-save", "-t", "nat").stdout.splitlines()]
        lines += self.ns.run("ip6tables-save", "-t", "nat").stdout.splitlines()
        return [line.split(" [")[0] if line.startswith(":") else line for line in lines if not line.startswith("#")]

    def iptables(self, command: str) -> str:
        assert self.config is not None
        done = self.ns.sidecar("iptables", command, "-c", str(self.config))
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: sidecar iptables {command} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def start_sidecar(self) -> None:
        """``sidecar run`` as ``transparent.uid``; returns once it logged ``ready``."""
        assert self.config is not None
        self._runs += 1
        self.sidecar_log = log = self.dir / f"sidecar-{self._runs}.log"
        argv = (sys.executable, "-m", "sidecar", "run", "-c", str(self.config))
        self.sidecar = proc = self.ns.spawn(*argv, log=log, uid=SIDECAR_UID)

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: sidecar exited {proc.returncode}: {log.read_text()}")
            return any(r.get("msg") == "ready" for r in self.logs())

        wait_until(ready, START_TIMEOUT, f"{self.name}: sidecar ready")

    def stop_sidecar(self) -> None:
        proc = self.sidecar
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its session: ip netns exec, setpriv, the sidecar
            proc.wait(timeout=30)
        self.sidecar = None

    def logs(self) -> list[dict[str, Any]]:
        out = []
        if self.sidecar_log is not None and self.sidecar_log.exists():
            for line in self.sidecar_log.read_text(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def access(self, count: int = 0, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The sidecar's access records, once there are at least ``count``."""

        def records() -> list[dict[str, Any]] | None:
            found = [r for r in self.logs() if r.get("logger") == "sidecar.access"]
            return found if len(found) >= count else None

        result: list[dict[str, Any]] = wait_until(records, timeout, f"{self.name}: {count} access records")
        return result


@dataclass
class Wire:
    """tcpdump on one interface of a namespace, TCP only, written to ``pcap``."""

    ns: Namespace
    dev: str
    pcap: Path
    proc: subprocess.Popen[str] | None = None
    log: Path = field(init=False)

    def __enter__(self) -> Wire:
        self.log = self.pcap.with_suffix(".log")
        self.proc = self.ns.spawn(
            "tcpdump",
            "-i",
            self.dev,
            "-n",
            "-s",
            "0",
            "-U",
            "--immediate-mode",
            "-w",
            str(self.pcap),
            "tcp",
            log=self.log,
        )
        wait_until(lambda: "listening on" in self.log.read_text(), 15.0, f"tcpdump on {self.dev}")
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            time.sleep(0.3)  # the last segments reach the capture
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=15)


def tcpdump_missing() -> str | None:
    return None if shutil.which("tcpdump") else "tcpdump is missing (apt-get install tcpdump)"


def node(lab: Lab, name: str) -> Node:
    """A namespace named after ``name`` with a folder of its own (every uid can traverse it)."""
    return Node(name, lab.namespace(name), lab.workdir())
