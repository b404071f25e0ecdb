"""Network namespaces for tests: namespaces, veth pairs with IPv4 and IPv6 addresses, processes run
inside them (optionally as another uid), and a teardown that runs even when the test fails.

Every name made here starts with a prefix (``h12-`` unless the lab is given another) and carries
this process's id, so parallel runs never collide; addresses are 10.231.N.0/24 and fd00:231:N::/64,
which exist only inside these namespaces.
Deleting a namespace deletes its veth ends, its nat rules and everything bound in it.
"""

from __future__ import annotations

import itertools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "h12-"
COMMAND_TIMEOUT = 30.0
TESTS = Path(__file__).resolve().parent
_ids = itertools.count(1)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can (probed by making one)."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, as CI does)"
    if shutil.which("ip") is None:
        return "the ip command is missing (apt-get install iproute2)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def as_uid(uid: int | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run as ``uid`` (same gid, no supplementary groups) via setpriv, or as is."""
    if uid is None:
        return list(argv)
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


@dataclass
class Namespace:
    name: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def argv(self, argv: Sequence[str], uid: int | None = None) -> list[str]:
        return ["ip", "netns", "exec", self.name, *as_uid(uid, argv)]

    def run(
        self, *argv: str, uid: int | None = None, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.argv(argv, uid), capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"in {self.name}: {' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def spawn(self, *argv: str, log: Path, uid: int | None = None) -> subprocess.Popen[str]:
        """A long-running process in the namespace, stopped at teardown; stdout and stderr go to ``log``."""
        with open(log, "w") as out:
            proc = subprocess.Popen(
                self.argv(argv, uid), stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def popen(self, *argv: str, uid: int | None = None) -> subprocess.Popen[str]:
        """A long-running process in the namespace, stopped at teardown; stdout is a pipe."""
        proc = subprocess.Popen(
            self.argv(argv, uid), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def start(self, *argv: str, ready: str, uid: int | None = None, timeout: float = 15.0) -> subprocess.Popen[str]:
        """``popen`` and wait until the process prints a line containing ``ready`` on stdout."""
        proc = self.popen(*argv, uid=uid)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = proc.stdout.readline()
                    if ready in line:
                        return proc
                    if not line:
                        break
        proc.kill()
        _, err = proc.communicate(timeout=COMMAND_TIMEOUT)
        raise RuntimeError(f"in {self.name}: {' '.join(argv)} never said {ready!r}: {err.strip()}")

    def python(
        self, script: str, *args: str, uid: int | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """A Python script from tests/ run by this interpreter (which can import ``sidecar``)."""
        return self.run(sys.executable, str(TESTS / script), *args, uid=uid, check=check)

    def sidecar(self, *args: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
        """``python -m sidecar ARGS`` in the namespace; never raises on a non-zero exit."""
        return self.run(sys.executable, "-m", "sidecar", *args, uid=uid, check=False)


@dataclass(frozen=True)
class Link:
    """A veth pair between two namespaces: ``a`` side .1 / ::1, ``b`` side .2 / ::2."""

    a_v4: str
    b_v4: str
    a_v6: str
    b_v6: str
    a_dev: str = ""  # the interface names, each inside its namespace
    b_dev: str = ""


class Lab:
    """Namespaces and links made for one test; ``close`` (or the ``lab`` context) removes them all."""

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.run_id = f"{os.getpid()}-{next(_ids)}"
        self.namespaces: list[Namespace] = []
        self._links = 0
        self._dirs: list[Path] = []

    def workdir(self) -> Path:
        """A folder every uid can traverse (pytest's own are root's alone), removed at ``close``."""
        path = Path(tempfile.mkdtemp(prefix=f"{self.prefix}{self.run_id}-"))
        path.chmod(0o755)
        self._dirs.append(path)
        return path

    def namespace(self, role: str) -> Namespace:
        ns = Namespace(f"{self.prefix}{role}-{self.run_id}")
        _ip("netns", "add", ns.name)
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def link(self, a: Namespace, b: Namespace) -> Link:
        """Join ``a`` and ``b`` with a veth pair, each end created inside its namespace (never in ours)."""
        self._links += 1
        n = len(self.namespaces) * 16 + self._links  # distinct subnets within this lab
        end_a, end_b = f"{self.prefix}{n}a", f"{self.prefix}{n}b"  # at most 15 characters (IFNAMSIZ)
        _ip("link", "add", end_a, "netns", a.name, "type", "veth", "peer", "name", end_b, "netns", b.name)
        link = Link(f"10.231.{n}.1", f"10.231.{n}.2", f"fd00:231:{n}::1", f"fd00:231:{n}::2", end_a, end_b)
        for ns, end, v4, v6 in ((a, end_a, link.a_v4, link.a_v6), (b, end_b, link.b_v4, link.b_v6)):
            ns.run("ip", "addr", "add", f"{v4}/24", "dev", end)
            ns.run("ip", "-6", "addr", "add", f"{v6}/64", "dev", end, "nodad")
            ns.run("ip", "link", "set", end, "up")
        return link

    def close(self) -> None:
        for ns in self.namespaces:
            for proc in ns.procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=COMMAND_TIMEOUT)
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True, check=False)
        self.namespaces.clear()
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._dirs.clear()


@contextmanager
def lab(prefix: str = PREFIX) -> Iterator[Lab]:
    made = Lab(prefix)
    try:
        yield made
    finally:
        made.close()


def leftovers(prefix: str = PREFIX) -> list[str]:
    """This process's namespaces still present (a teardown bug if any)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    mine = f"-{os.getpid()}-"
    return [line.split()[0] for line in listed.splitlines() if line.startswith(prefix) and mine in line]
