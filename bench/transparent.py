"""The ``sidecar-transparent`` pair: our sidecar pair in transparent (capture) mode, measured against
the explicit ``sidecar`` pair in the same run (``make bench-transparent``).

Everything stays in one network namespace, as the bench does on loopback. The load generator calls
a service address (``SERVICE``, on the namespace's ``lo``) on the backends' own ports, as an app
calls its peer by address. nat OUTPUT rules send those connections to the client sidecar's
``transparent-outbound`` capture port, and that sidecar's mTLS dial to the same address to the
server sidecar's ``transparent-inbound`` capture port, which forwards to ``127.0.0.1:<port>``, the
backend. (Between two hosts the second redirect is ``sidecar iptables install``'s PREROUTING rule;
connections made on the host itself never pass PREROUTING, hence OUTPUT and the uid match here.)
Every connection so pays what capture costs: conntrack and REDIRECT, the original-destination
lookup, the route lookup and the per-connection policy; the TLS and the relay are the explicit
pair's.

Both sidecars run as ``transparent.uid`` (``UID``, through setpriv). The rules are installed when
the pair starts and the nat table deleted when it stops, so the pairs measured in between run
without conntrack, as a pod without nat rules does. The pair refuses to run outside a network
namespace of its own: it changes nat rules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import certs as certs_mod
from .pairs import IDLE_TIMEOUT, ROUTES, Ctx, Running, Sidecar, _ready_ports, parse_sidecar
from .procs import BenchError, free_port

SERVICE = "10.231.254.1"  # the peers' address, on lo inside the bench's namespace only
UID = 10001  # transparent.uid of both sidecars
CHAIN = "BENCH_CAPTURE"
TOOLS = ("ip", "iptables-nft-restore", "iptables-nft-save", "nft", "setpriv")


def unavailable() -> str | None:
    """Why this pair cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (nat rules, sidecars run as another uid)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} missing (apt-get install iproute2 iptables nftables util-linux)"
    if not _run("ip", "netns", "identify", str(os.getpid()), check=False).strip():
        return "changes nat rules, so it runs only inside a network namespace made for it: make bench-transparent"
    return None


class SidecarTransparent(Sidecar):
    name = "sidecar-transparent"

    def start(self, ctx: Ctx, *, resume: bool, verbose: bool = False) -> Running:
        why = unavailable()
        if why is not None:
            raise BenchError(f"{self.name}: {why}")
        if ctx.backends.host != "127.0.0.1":
            raise BenchError(
                f"{self.name}: inbound capture forwards to 127.0.0.1, the backends are on {ctx.backends.host}"
            )
        d = ctx.procs.folder(f"{self.name}-{free_port()}")
        for folder in (ctx.procs.tmp, d):
            folder.chmod(0o755)  # the sidecars' uid reads its configuration here
        out_port, in_port = free_port(), free_port()
        limits = {"max_connections": 20000 * ctx.workers, "idle_timeout": IDLE_TIMEOUT, "drain_timeout": "1s"}
        common = {"limits": limits, "log": {"level": "info", "format": "json"}, "workers": ctx.workers}
        ports = [{"port": ctx.backend(route), "allow": [certs_mod.CLIENT_ID]} for route in ROUTES]
        server_cfg = {
            "tls": _tls(d / "server", ctx.certs.server, ctx.certs.ca),
            "transparent": {"uid": UID, "inbound": {"listen": f"0.0.0.0:{in_port}", "ports": ports}},
            **common,
        }
        route = {"to": f"{SERVICE}/32:*", "server_identity": [certs_mod.SERVER_ID]}
        outbound = {"listen": f"127.0.0.1:{out_port}", "routes": [route], "unmatched": "deny"}
        client_cfg = {
            "tls": {**_tls(d / "client", ctx.certs.client, ctx.certs.ca), "session_resumption": resume},
            "transparent": {"uid": UID, "outbound": outbound},
            **common,
        }
        install(out_port, in_port)
        try:
            server = self._run(ctx, d / "server.yaml", server_cfg, f"{self.name}-server")
            _ready_ports(server)
            client = self._run(ctx, d / "client.yaml", client_cfg, f"{self.name}-client")
            _ready_ports(client)
        except BaseException:
            remove()
            raise
        return Running(
            self.name,
            resume,
            ctx.backend("http"),  # the original destinations: the backends' ports at the service address
            ctx.backend("bulk"),
            None,
            [client, server],
            server,
            parse_sidecar,
            host=SERVICE,
            on_stop=remove,
        )

    def argv(self, config: Path) -> list[str]:
        config.chmod(0o644)
        return ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--", *super().argv(config)]


def _tls(folder: Path, leaf: certs_mod.Leaf, ca: Path) -> dict[str, Any]:
    """Copies of ``leaf`` and ``ca`` that the sidecars' uid owns (the key stays 0600)."""
    folder.mkdir(exist_ok=True)
    out = {}
    for key, src in (("cert", leaf.cert), ("key", leaf.key), ("ca", ca)):
        dst = folder / src.name
        shutil.copyfile(src, dst)
        dst.chmod(0o600 if key == "key" else 0o644)
        os.chown(dst, UID, UID)
        out[key] = str(dst)
    os.chown(folder, UID, UID)
    return out


def rules(out_port: int, in_port: int) -> str:
    """The pair's nat rules, as iptables-restore reads them."""
    return (
        f"*nat\n:{CHAIN} - [0:0]\n"
        f"-A OUTPUT -d {SERVICE}/32 -p tcp -j {CHAIN}\n"
        f"-A {CHAIN} -p tcp -m owner --uid-owner {UID} -j REDIRECT --to-ports {in_port}\n"  # the sidecar's mTLS dial
        f"-A {CHAIN} -p tcp -j REDIRECT --to-ports {out_port}\n"  # the load generator, the "app"
        "COMMIT\n"
    )


def install(out_port: int, in_port: int) -> None:
    _run("ip", "addr", "replace", f"{SERVICE}/32", "dev", "lo")
    _run("iptables-nft-restore", "--noflush", stdin=rules(out_port, in_port))


def remove() -> None:
    """Our chain and jump, then the nat table itself (and conntrack with it) when nothing else is in it."""
    saved = _run("iptables-nft-save", "-t", "nat")
    ours = [line for line in saved.splitlines() if CHAIN in line and line.startswith("-A OUTPUT")]
    script = "*nat\n" + "".join(line.replace("-A ", "-D ", 1) + "\n" for line in ours)
    script += f"-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n" if f":{CHAIN} " in saved else "COMMIT\n"
    _run("iptables-nft-restore", "--noflush", stdin=script)
    if not any(line.startswith("-A ") for line in _run("iptables-nft-save", "-t", "nat").splitlines()):
        _run("nft", "delete", "table", "ip", "nat")
    _run("ip", "addr", "del", f"{SERVICE}/32", "dev", "lo", check=False)


def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout
