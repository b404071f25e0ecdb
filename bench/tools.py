"""Which external tools are installed, where, and at which version.

Only this module looks for binaries. ``sbin`` folders are searched too, because Debian puts
haproxy and nginx there and a non-root PATH often lacks them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SEARCH = (
    os.environ.get("PATH", ""),
    "/usr/local/sbin:/usr/sbin:/sbin",
)
NAMES = {
    "wrk": ("wrk",),
    "iperf3": ("iperf3",),
    "stunnel": ("stunnel4", "stunnel"),
    "haproxy": ("haproxy",),
    "nginx": ("nginx",),
}
VERSION_ARGS = {"wrk": ["-v"], "iperf3": ["-v"], "stunnel": ["-version"], "haproxy": ["-v"], "nginx": ["-v"]}
NGINX_STREAM_MODULES = (
    "/usr/lib/nginx/modules/ngx_stream_module.so",
    "/usr/lib64/nginx/modules/ngx_stream_module.so",
    "/usr/local/nginx/modules/ngx_stream_module.so",
)
DEB_PACKAGES = "wrk iperf3 stunnel4 haproxy nginx libnginx-mod-stream"


@dataclass
class Tools:
    paths: dict[str, str] = field(default_factory=dict)
    nginx_stream: str | None = None  # the module to load, or "" when built in
    notes: list[str] = field(default_factory=list)

    def has(self, name: str) -> bool:
        if name == "nginx":
            return "nginx" in self.paths and self.nginx_stream is not None
        return name in self.paths

    def path(self, name: str) -> str:
        return self.paths[name]

    def versions(self) -> dict[str, str]:
        return {name: version(path, name) for name, path in sorted(self.paths.items())}


def find() -> Tools:
    tools = Tools()
    search = os.pathsep.join(SEARCH)
    for name, candidates in NAMES.items():
        for candidate in candidates:
            path = shutil.which(candidate, path=search)
            if path:
                tools.paths[name] = path
                break
    if "nginx" in tools.paths:
        tools.nginx_stream = _nginx_stream(tools.paths["nginx"])
        if tools.nginx_stream is None:
            tools.notes.append("nginx is installed without its stream module (libnginx-mod-stream): skipped")
    return tools


def _nginx_stream(nginx: str) -> str | None:
    for module in NGINX_STREAM_MODULES:
        if Path(module).exists():
            return module
    try:
        built = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    if re.search(r"--with-stream(\s|$)", built) and "--with-stream_ssl_module" in built:
        return ""
    return None


def version(path: str, name: str) -> str:
    try:
        out = subprocess.run([path, *VERSION_ARGS[name]], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for line in (out.stdout + "\n" + out.stderr).splitlines():
        line = line.strip()
        if line and not line.startswith(("Initializing", "Usage")):
            return line
    return "unknown"
