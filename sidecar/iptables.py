"""The nat rules of transparent mode: built from the ``transparent`` section, installed, shown, removed.

The rules live in two chains of the sidecar's own, ``SIDECAR_OUTPUT`` (the app's outgoing TCP, from
the nat ``OUTPUT`` chain) and ``SIDECAR_INBOUND`` (incoming TCP, from ``PREROUTING``), each reached
by one jump rule. Every change is one ``iptables-restore --noflush`` transaction per address family,
so no half-installed state is ever visible, and it touches only those two chains and their jumps.
Rules are written the way ``iptables-save`` prints them, so what is installed can be compared with
what the config asks for line by line. Building and comparing rules is pure; ``Backend`` runs the
commands, and picks the nft or legacy variant of iptables the host already uses.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, Transparent
from .errors import SidecarError

OUTPUT_CHAIN = "SIDECAR_OUTPUT"
INBOUND_CHAIN = "SIDECAR_INBOUND"
CHAINS = (INBOUND_CHAIN, OUTPUT_CHAIN)
HOOKS = {INBOUND_CHAIN: "PREROUTING", OUTPUT_CHAIN: "OUTPUT"}  # the built-in chain that jumps to each
FAMILIES = (4, 6)
COMMAND_TIMEOUT = 30.0
WAIT_FOR_LOCK = "--wait=10"  # legacy iptables takes the xtables lock; nft ignores it


class IptablesError(SidecarError):
    """iptables is missing or refused a change (not root, a kernel module missing): exit 1."""


@dataclass(frozen=True)
class Ruleset:
    """The sidecar's part of one family's nat table, each line as ``iptables-save`` prints it."""

    family: int
    chains: tuple[str, ...] = ()
    jumps: tuple[str, ...] = ()  # "-A OUTPUT -p tcp -j SIDECAR_OUTPUT": the built-in chains' rules into ours
    rules: tuple[str, ...] = ()  # the rules inside our chains

    @property
    def empty(self) -> bool:
        return not (self.chains or self.jumps or self.rules)

    def lines(self) -> list[str]:
        return [f":{c} - [0:0]" for c in self.chains] + list(self.jumps) + list(self.rules)

    def save_text(self) -> str:
        """This ruleset alone, in iptables-save format."""
        return "\n".join(["*nat", *self.lines(), "COMMIT"]) + "\n"


# -- what the config asks for ---------------------------------------------------------------------


def wanted(cfg: Config, family: int) -> Ruleset:
    """The rules ``cfg.transparent`` asks for, for IPv4 (4) or IPv6 (6)."""
    t = cfg.transparent
    if t is None:
        raise SidecarError("transparent: required for `sidecar iptables` (contract section 8)")
    admin_port = cfg.admin.listen.port if cfg.admin is not None and cfg.admin.listen.port else None
    return _rules(t, admin_port, family)


def _rules(t: Transparent, admin_port: int | None, family: int) -> Ruleset:
    chains: list[str] = []
    jumps: list[str] = []
    rules: list[str] = []
    if t.inbound is not None:
        chains.append(INBOUND_CHAIN)
        jumps.append(f"-A PREROUTING -p tcp -j {INBOUND_CHAIN}")
        to = t.inbound.listen.port
        rules += [
            f"-A {INBOUND_CHAIN} -p tcp -m tcp --dport {p.port} -j REDIRECT --to-ports {to}" for p in t.inbound.ports
        ]
    if t.outbound is not None:
        chains.append(OUTPUT_CHAIN)
        jumps.append(f"-A OUTPUT -p tcp -j {OUTPUT_CHAIN}")
        rules.append(f"-A {OUTPUT_CHAIN} -m owner --uid-owner {t.uid} -j RETURN")  # the sidecar's own connections
        rules.append(f"-A {OUTPUT_CHAIN} -o lo -j RETURN")  # loopback, and this host's own addresses
        for ex in t.outbound.exclude:
            if ex.network is None or ex.network.version != family:
                continue
            port = "" if ex.port is None else f" -p tcp -m tcp --dport {ex.port}"
            rules.append(f"-A {OUTPUT_CHAIN} -d {ex.network}{port} -j RETURN")
        if admin_port is not None:
            rules.append(f"-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {admin_port} -j RETURN")
        rules.append(f"-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {t.outbound.listen.port}")
    return Ruleset(family, tuple(chains), tuple(jumps), tuple(rules))


# -- what is installed ----------------------------------------------------------------------------


def installed(save_output: str, family: int) -> Ruleset:
    """The sidecar's chains, their rules and the jumps into them, from ``iptables-save`` output."""
    chains: list[str] = []
    jumps: list[str] = []
    rules: list[str] = []
    for line in nat_section(save_output):
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name in CHAINS:
                chains.append(name)
        elif line.startswith("-A "):
            words = line.split()
            if words[1] in CHAINS:
                rules.append(line)
            elif _target(words) in CHAINS:
                jumps.append(line)
    return Ruleset(family, tuple(chains), tuple(jumps), tuple(rules))


def nat_section(save_output: str) -> list[str]:
    """The lines between ``*nat`` and its ``COMMIT`` (none when the nat table does not exist)."""
    out: list[str] = []
    inside = False
    for raw in save_output.splitlines():
        line = raw.strip()
        if line == "*nat":
            inside = True
        elif inside and line == "COMMIT":
            break
        elif inside and line and not line.startswith("#"):
            out.append(line)
    return out


def _target(words: Sequence[str]) -> str | None:
    for flag, value in itertools.pairwise(words):
        if flag in ("-j", "--jump", "-g", "--goto"):
            return value
    return None


# -- the transactions -----------------------------------------------------------------------------


def install_script(want: Ruleset, have: Ruleset) -> str:
    """One iptables-restore --noflush transaction from ``have`` to ``want``: declaring a chain
    creates it or empties it; jump rules already in place stay (so installing twice is installing
    once), extra or stale ones go; chains we no longer want are emptied and deleted."""
    stale = [c for c in have.chains if c not in want.chains]
    keep = list(have.jumps)
    add: list[str] = []
    for jump in want.jumps:
        if jump in keep:
            keep.remove(jump)
        else:
            add.append(jump)
    lines = ["*nat"]
    lines += [f":{c} - [0:0]" for c in (*want.chains, *stale)]
    lines += ["-D" + jump[2:] for jump in keep]  # what is left over: duplicates and jumps we do not want
    lines += add
    lines += want.rules
    lines += [f"-X {c}" for c in stale]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def remove_script(have: Ruleset) -> str | None:
    """The transaction that deletes exactly what install added, or None when nothing is there."""
    if have.empty:
        return None
    lines = ["*nat"]
    lines += [f":{c} - [0:0]" for c in have.chains]
    lines += ["-D" + jump[2:] for jump in have.jumps]
    lines += [f"-X {c}" for c in have.chains]
    return "\n".join([*lines, "COMMIT"]) + "\n"


# -- running iptables -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One variant of the iptables commands: ``nft`` or ``legacy`` (or ``iptables`` where the host
    has only the unsuffixed commands), with their save and restore programs per family."""

    name: str
    save: dict[int, str] = field(compare=False)
    restore: dict[int, str] = field(compare=False)

    def read(self, family: int) -> str:
        """The whole ruleset. Never ``-t nat``: with legacy iptables that loads and creates the nat
        table, and ``show`` must change nothing."""
        return _run([self.save[family]])

    def apply(self, family: int, script: str) -> None:
        _run([self.restore[family], "--noflush", WAIT_FOR_LOCK], stdin=script)


def ipv6_enabled() -> bool:
    """Whether this network namespace has an IPv6 stack (then its TCP must be captured too)."""
    return Path("/proc/net/if_inet6").exists()


def families() -> tuple[int, ...]:
    return FAMILIES if ipv6_enabled() else (4,)


_VARIANTS = {
    "nft": ({4: "iptables-nft-save", 6: "ip6tables-nft-save"}, {4: "iptables-nft-restore", 6: "ip6tables-nft-restore"}),
    "legacy": (
        {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"},
        {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"},
    ),
    "iptables": ({4: "iptables-save", 6: "ip6tables-save"}, {4: "iptables-restore", 6: "ip6tables-restore"}),
}


def backend(requested: str = "auto", fams: Sequence[int] = FAMILIES) -> Backend:
    """The iptables variant to use. ``auto``, like Kubernetes' iptables wrappers and istio-iptables:
    the variant already holding the sidecar's chains (so ``remove`` finds what ``install`` made),
    else the one holding more rules (the one this host's other tools use), else the one the plain
    ``iptables`` command is (``iptables --version`` says ``nf_tables`` or ``legacy``)."""
    present = {name: _variant(name, fams) for name in ("nft", "legacy")}
    available = {name: b for name, b in present.items() if b is not None}
    if requested != "auto":
        chosen = available.get(requested)
        if chosen is None:
            missing = ", ".join(sorted(set(_VARIANTS[requested][1].values()) | set(_VARIANTS[requested][0].values())))
            raise IptablesError(f"iptables ({requested}) is not installed: none or not all of {missing} found")
        return chosen
    if not available:
        plain = _variant("iptables", fams)
        if plain is None:
            raise IptablesError(
                "iptables is not installed (no iptables-restore / ip6tables-restore found; "
                "on Debian and Ubuntu: apt-get install iptables)"
            )
        return plain
    if len(available) == 1:
        return next(iter(available.values()))
    scores = {name: _score(b, fams) for name, b in available.items()}
    best = max(scores.values())
    leaders = [name for name, score in scores.items() if score == best]
    if len(leaders) == 1:
        return available[leaders[0]]
    return available[_default_variant()]


def _variant(name: str, fams: Sequence[int]) -> Backend | None:
    save, restore = _VARIANTS[name]
    if all(shutil.which(save[f]) and shutil.which(restore[f]) for f in fams):
        return Backend(name, {f: save[f] for f in fams}, {f: restore[f] for f in fams})
    return None


def _score(b: Backend, fams: Sequence[int]) -> tuple[int, int]:
    """(holds our chains, number of rules), from the variant's own save; unreadable counts lowest."""
    ours = rules = 0
    for f in fams:
        try:
            text = b.read(f)
        except IptablesError:
            return (-1, -1)
        ours += not installed(text, f).empty
        rules += sum(1 for line in text.splitlines() if line.startswith("-A "))
    return (ours, rules)


def _default_variant() -> str:
    try:
        version = _run(["iptables", "--version"])
    except IptablesError:
        return "nft"
    return "legacy" if "legacy" in version else "nft"


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError:
        raise IptablesError(f"{argv[0]}: not found (install the iptables package)") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{argv[0]}: no answer within {COMMAND_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        said = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        hint = ""
        if "ermission denied" in said or "must be root" in said or "Operation not permitted" in said:
            hint = " (reading and changing nat rules needs root or CAP_NET_ADMIN)"
        raise IptablesError(f"{argv[0]} refused: {said}{hint}")
    return done.stdout


# -- the three commands ---------------------------------------------------------------------------


def same(a: Ruleset, b: Ruleset) -> bool:
    """Whether two rulesets hold the same chains, jumps and rules (each chain's rules in order;
    the order iptables-save lists chains in does not matter)."""

    def key(r: Ruleset) -> tuple[list[str], list[str], list[str]]:
        return sorted(r.chains), sorted(r.jumps), sorted(r.rules, key=lambda line: line.split()[1])

    return key(a) == key(b)


def _label(b: Backend, family: int) -> str:
    return f"IPv{family} ({b.save[family].removesuffix('-save')})"


def install(cfg: Config, requested: str = "auto") -> list[str]:
    """Install or update the rules for every family; one line per family says what happened."""
    fams = families()
    wants = {f: wanted(cfg, f) for f in fams}  # config errors first, before touching anything
    b = backend(requested, fams)
    said: list[str] = []
    for f in fams:
        have = installed(b.read(f), f)
        if same(have, wants[f]):
            said.append(f"{_label(b, f)}: already installed, unchanged")
            continue
        b.apply(f, install_script(wants[f], have))
        verb = "updated" if not have.empty else "installed"
        said.append(f"{_label(b, f)}: {verb} {len(wants[f].chains)} chain(s), {len(wants[f].rules)} rule(s)")
    return said


def remove(requested: str = "auto") -> list[str]:
    """Delete the sidecar's chains and the jumps into them, for every family; nothing else."""
    fams = families()
    b = backend(requested, fams)
    said: list[str] = []
    for f in fams:
        have = installed(b.read(f), f)
        script = remove_script(have)
        if script is None:
            said.append(f"{_label(b, f)}: nothing installed")
            continue
        b.apply(f, script)
        said.append(f"{_label(b, f)}: removed {len(have.chains)} chain(s) and {len(have.jumps)} jump(s)")
    return said


def show(cfg: Config, requested: str = "auto") -> str:
    """The rules in iptables-save format, changing nothing: for each family, what is installed
    when it is what the config asks for; else what ``install`` would make it, with what is there now
    (or why it could not be read) as comments."""
    fams = families()
    wants = {f: wanted(cfg, f) for f in fams}
    why = ""
    try:
        b: Backend | None = backend(requested, fams)
    except IptablesError as exc:
        b, why = None, str(exc)
    out: list[str] = []
    for f in fams:
        name = _label(b, f) if b is not None else f"IPv{f}"
        have: Ruleset | None = None
        if b is not None:
            try:
                have = installed(b.read(f), f)
            except IptablesError as exc:
                why = str(exc)
        if have is None:
            out.append(f"# {name}: cannot read the current rules ({why}); `sidecar iptables install` would add:")
        elif same(have, wants[f]):
            out.append(f"# {name}: installed, as the config asks")
        elif have.empty:
            out.append(f"# {name}: not installed; `sidecar iptables install` would add:")
        else:
            out.append(f"# {name}: installed but not as the config asks; now:")
            out += [f"#   {line}" for line in have.lines()]
            out.append("# `sidecar iptables install` would make it:")
        out.append(wants[f].save_text().rstrip("\n"))
    return "\n".join(out) + "\n"
