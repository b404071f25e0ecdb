"""Every process the bench starts, its temporary folder, and what /proc says about them.

Rules: a process is started only through ``Procs`` (its own session, so the whole group can be
signalled; on Linux a parent-death signal, so even ``kill -9`` of the bench leaves no orphan), and
``Procs.close`` stops them all in reverse order (SIGTERM to the group, a short wait, SIGKILL) and
removes the temporary folder. ``close`` runs on success, failure, Ctrl-C and SIGTERM alike.

An interrupt can land anywhere, so a process is registered before the interrupt can be seen (the
signals are held while it is started) and leaves the registry only once it is dead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_GRACE = 5.0
# What the bench turns into KeyboardInterrupt (see sigterm_as_interrupt).
INTERRUPTS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


class BenchError(Exception):
    """Something the user can act on: a tool missing, a pair that failed its checks, a bad option."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """This process and all its descendants (nginx workers, for one)."""
        return [self.pid, *descendants(self.pid)]

    def log_text(self, offset: int = 0) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for(self, found: Callable[[str], object], what: str, timeout: float = 15.0) -> object:
        """Poll this process's log until ``found(text)`` is truthy; fail early if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            value = found(self.log_text())
            if value:
                return value
            if not self.alive():
                raise BenchError(f"{self.name} exited with {self.popen.returncode} before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {what} within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.05)


@dataclass
class Procs:
    """The registry. Use as a context manager; everything started inside is stopped on the way out."""

    keep_tmp: bool = False
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sidecar-bench-")))
    _procs: list[Proc] = field(default_factory=list)
    _n: int = 0

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Proc:
        """Start ``argv`` with stdout and stderr to ``<tmp>/logs/<name>-<n>.log``."""
        self._n += 1
        log = self.folder("logs") / f"{name}-{self._n}.log"
        # An interrupt between fork and append would leave a child nobody stops: hold the signals
        # until it is registered (the child unblocks them for itself in _prepare_child).
        with open(log, "wb") as out, _interrupts_held():
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_prepare_child,  # the bench is single-threaded, so preexec_fn is safe
            )
            proc = Proc(name, popen, log)
            self._procs.append(proc)
        return proc

    def run(
        self, name: str, argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None
    ) -> tuple[int, str]:
        """Run a client (wrk, iperf3) to completion; returns (exit status, stdout + stderr)."""
        proc = self.start(name, argv, env=env)
        try:
            code = proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{name} did not finish within {timeout:.0f}s:\n{proc.tail()}") from None
        finally:
            self.stop(proc)
        text = proc.log_text()
        with contextlib.suppress(OSError):
            proc.log.unlink()
        return code, text

    def stop(self, proc: Proc, grace: float = STOP_GRACE) -> None:
        """SIGTERM to the process group, wait up to ``grace``, then SIGKILL the group.

        The process stays registered until this is done, so an interrupt in the middle leaves it to
        ``close``.
        """
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(grace)
        # The leader may be gone while its children linger (nginx workers): kill the group anyway.
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(grace)
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc, grace=2.0)
        _kill_strays()
        if self.keep_tmp:
            print(f"bench: kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _signal_group(proc: Proc, sig: int) -> None:
    # The group id is the pid of the leader we started (start_new_session), never a guess.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _kill_strays() -> None:
    """Backstop for ``close``: no process of the bench's outlives it, registered or not."""
    for pid in descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # reap our own children; init reaps the rest
            os.waitpid(pid, 0)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold the interrupt signals; one that came meanwhile is raised on leaving."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _prepare_child() -> None:
    """In the child before exec: take back the signals held in ``start``; die with the bench."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, so the same cleanup path runs as for Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- /proc -------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after "(comm)": state is field 3, so index i here is field i + 3.
    return text[text.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children[int(fields[1])].append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes (all their threads, exited ones included)."""
    return sum(cpu_split(pids))


def cpu_split(pids: Sequence[int]) -> tuple[float, float]:
    """User and system CPU seconds of these processes, apart."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            user += int(fields[11])  # utime (field 14)
            system += int(fields[12])  # stime (field 15)
    return user / CLK_TCK, system / CLK_TCK


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def listening(ports: Sequence[int]) -> bool:
    """Whether every port has a TCP socket in LISTEN on 127.0.0.1 (read from /proc, no connection made)."""
    want = {f"0100007F:{port:04X}" for port in ports}
    try:
        text = Path("/proc/net/tcp").read_text()
    except OSError:
        return False
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 3 and parts[3] == "0A":
            want.discard(parts[1])
    return not want


def wait_listening(proc: Proc, ports: Sequence[int], timeout: float = 15.0) -> None:
    proc.wait_for(lambda _text: listening(ports), f"listening on {', '.join(map(str, ports))}", timeout)


def raise_fd_limit() -> int:
    """Raise this process's open-files soft limit to the hard limit (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def free_port() -> int:
    """A port nothing listens on right now, for tools that cannot report a port 0 binding back."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _machine_busy_seconds() -> float:
    """CPU time the whole machine spent in processes (all cores), plus steal (CPU nobody here got).

    irq and softirq time are left out: with irq time accounting they belong to no process, and on
    loopback most of it is the kernel moving the bench's own packets.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + steal) / CLK_TCK


def _own_seconds() -> float:
    """This process, its reaped children, and its live descendants."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + cpu_seconds(descendants(os.getpid()))


@dataclass
class BackgroundMeter:
    """How much CPU processes that are not the bench's used over an interval, as % of the machine."""

    _start: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def start(self) -> None:
        self._start = (time.monotonic(), _machine_busy_seconds(), _own_seconds())

    def percent(self) -> float | None:
        """None for intervals too short for the clock tick (10 ms) to say anything."""
        wall = time.monotonic() - self._start[0]
        if wall < 1.0:
            return None
        other = (_machine_busy_seconds() - self._start[1]) - (_own_seconds() - self._start[2])
        return max(0.0, 100.0 * other / (wall * (os.cpu_count() or 1)))
