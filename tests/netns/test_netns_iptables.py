"""``sidecar iptables install|show|remove`` against real iptables, nft and legacy, IPv4 and IPv6, in
fresh namespaces: install adds exactly the rules ``show`` prints, installing twice is installing
once, ``show`` changes nothing, ``remove`` leaves every table as it was, rules that were there
before are untouched, and failures exit 1 (not root, iptables missing) or 2 (config) with a message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from namespaces import Lab, Namespace

pytestmark = pytest.mark.netns

SAVE = {
    ("nft", 4): "iptables-nft-save",
    ("nft", 6): "ip6tables-nft-save",
    ("legacy", 4): "iptables-legacy-save",
    ("legacy", 6): "ip6tables-legacy-save",
}
RESTORE = {key: name.replace("-save", "-restore") for key, name in SAVE.items()}

# Rules someone else put there first, in nat and filter, which nothing of ours may touch.
THEIRS = {
    4: "*nat\n:H12_KEEP - [0:0]\n-A PREROUTING -s 10.231.250.0/24 -j H12_KEEP\n-A OUTPUT -d 10.231.251.1/32 -p tcp "
    "-j DNAT --to-destination 10.231.251.2:80\n-A H12_KEEP -j RETURN\nCOMMIT\n"
    "*filter\n-A INPUT -s 10.231.252.0/24 -j ACCEPT\nCOMMIT\n",
    6: "*nat\n:H12_KEEP - [0:0]\n-A PREROUTING -s fd00:231:250::/64 -j H12_KEEP\n-A H12_KEEP -j RETURN\nCOMMIT\n"
    "*filter\n-A INPUT -s fd00:231:252::/64 -j ACCEPT\nCOMMIT\n",
}


def transparent(**overrides: Any) -> dict[str, Any]:
    t: dict[str, Any] = {
        "uid": 10001,
        "outbound": {"listen": "127.0.0.1:15001", "exclude": ["169.254.169.254/32", "[fd00:231:99::/64]:443"]},
        "inbound": {
            "listen": "0.0.0.0:15006",
            "ports": [{"port": 8080, "allow": ["*"]}, {"port": 9090, "allow": ["*"]}],
        },
    }
    t.update(overrides)
    return t


def config(path: Path, t: dict[str, Any] | None = None, **top: Any) -> str:
    data = {"tls": {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"}, "transparent": t or transparent(), **top}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def snapshot(ns: Namespace, backend: str, family: int) -> list[str]:
    """Every table of one backend and family, without comments and counters."""
    lines = ns.run(SAVE[backend, family]).stdout.splitlines()
    return [line.split(" [")[0] if line.startswith(":") else line for line in lines if not line.startswith("#")]


def ours(lines: list[str]) -> list[str]:
    return [line for line in lines if "SIDECAR_" in line]


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_install_twice_show_and_remove_leave_the_tables_as_they_were(netlab: Lab, tmp_path: Path, backend: str) -> None:
    ns = netlab.namespace("ipt")
    for family in (4, 6):
        ns.run("sh", "-c", f"printf '{THEIRS[family]}' | {RESTORE[backend, family]} --noflush")
    before = {f: snapshot(ns, backend, f) for f in (4, 6)}
    cfg = config(tmp_path / "h12-sidecar.yaml", admin={"listen": "127.0.0.1:9901"})

    said = ok(ns.sidecar("iptables", "install", "-c", cfg, "--backend", backend))
    assert "IPv4" in said and "IPv6" in said and "installed" in said
    after = {f: snapshot(ns, backend, f) for f in (4, 6)}
    shown = ok(ns.sidecar("iptables", "show", "-c", cfg, "--backend", backend))
    assert shown.count("installed, as the config asks") == 2, shown
    for f in (4, 6):
        # exactly what show prints was added (iptables prints it back as we spell it), nothing else changed
        section = shown.split("# IPv")[1 if f == 4 else 2]
        want = [line.split(" [")[0] for line in section.splitlines() if "SIDECAR_" in line]
        assert ours(after[f]) == want
        assert [line for line in after[f] if "SIDECAR_" not in line] == before[f]
    assert "-A SIDECAR_OUTPUT -m owner --uid-owner 10001 -j RETURN" in after[4]
    assert "-A SIDECAR_OUTPUT -d 169.254.169.254/32 -j RETURN" in after[4]
    assert "-A SIDECAR_OUTPUT -d fd00:231:99::/64 -p tcp -m tcp --dport 443 -j RETURN" in after[6]
    assert "-A SIDECAR_OUTPUT -p tcp -m tcp --dport 9901 -j RETURN" in after[4]

    again = ok(ns.sidecar("iptables", "install", "-c", cfg, "--backend", backend))
    assert again.count("already installed, unchanged") == 2
    assert {f: snapshot(ns, backend, f) for f in (4, 6)} == after  # twice = once, and show changed nothing

    ok(ns.sidecar("iptables", "remove", "-c", cfg, "--backend", backend))
    assert {f: snapshot(ns, backend, f) for f in (4, 6)} == before
    assert ok(ns.sidecar("iptables", "remove", "-c", cfg, "--backend", backend)).count("nothing installed") == 2


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_from_an_empty_host_remove_leaves_no_rule_and_no_chain(netlab: Lab, tmp_path: Path, backend: str) -> None:
    ns = netlab.namespace("ipt")
    cfg = config(tmp_path / "h12-sidecar.yaml")
    ok(ns.sidecar("iptables", "install", "-c", cfg, "--backend", backend))
    ok(ns.sidecar("iptables", "remove", "-c", cfg, "--backend", backend))
    for f in (4, 6):
        left = snapshot(ns, backend, f)
        assert not any(line.startswith("-A") for line in left), left
        chains = {line[1:].split()[0] for line in left if line.startswith(":")}
        assert chains <= {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}  # the nat table it made may stay


def test_show_on_a_fresh_host_changes_nothing_at_all(netlab: Lab, tmp_path: Path) -> None:
    ns = netlab.namespace("ipt")
    shown = ok(ns.sidecar("iptables", "show", "-c", config(tmp_path / "h12-sidecar.yaml")))
    assert shown.count("not installed; `sidecar iptables install` would add:") == 2
    for backend in ("nft", "legacy"):
        for f in (4, 6):
            assert snapshot(ns, backend, f) == [], (backend, f)  # not even an empty nat table


def test_auto_picks_the_backend_already_in_use_and_remove_finds_it(netlab: Lab, tmp_path: Path) -> None:
    cfg = config(tmp_path / "h12-sidecar.yaml")
    for used, unused in (("legacy", "nft"), ("nft", "legacy")):
        ns = netlab.namespace(f"ipt-{used}")
        for family in (4, 6):
            ns.run("sh", "-c", f"printf '{THEIRS[family]}' | {RESTORE[used, family]} --noflush")
        said = ok(ns.sidecar("iptables", "install", "-c", cfg))
        assert f"iptables-{used}" in said, said
        assert ours(snapshot(ns, used, 4)) and ours(snapshot(ns, used, 6))
        assert not ours(snapshot(ns, unused, 4)) and not ours(snapshot(ns, unused, 6))
        ok(ns.sidecar("iptables", "remove", "-c", cfg))
        assert not ours(snapshot(ns, used, 4)) and not ours(snapshot(ns, used, 6))


def test_install_updates_to_a_new_config_and_repairs_a_duplicated_jump(netlab: Lab, tmp_path: Path) -> None:
    ns = netlab.namespace("ipt")
    ok(ns.sidecar("iptables", "install", "-c", config(tmp_path / "a.yaml"), "--backend", "nft"))
    ns.run("iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "SIDECAR_OUTPUT")  # a stray second jump
    outbound_only = transparent(outbound={"listen": "127.0.0.1:15101"})
    del outbound_only["inbound"]
    said = ok(ns.sidecar("iptables", "install", "-c", config(tmp_path / "b.yaml", outbound_only), "--backend", "nft"))
    assert "updated" in said
    for f in (4, 6):
        mine = ours(snapshot(ns, "nft", f))
        assert mine.count("-A OUTPUT -p tcp -j SIDECAR_OUTPUT") == 1
        assert not any("SIDECAR_INBOUND" in line for line in mine), mine  # chain and jump gone
        assert mine[-1] == "-A SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15101"


def test_not_root_exits_1_with_a_message_and_changes_nothing(netlab: Lab, tmp_path: Path) -> None:
    ns = netlab.namespace("ipt")
    cfg = tmp_path / "h12-sidecar.yaml"
    config(cfg)
    readable = Path(f"/tmp/h12-{os.getpid()}-sidecar.yaml")  # pytest's tmp_path is private to root
    readable.write_text(cfg.read_text())
    try:
        for command in ("install", "remove"):
            done = ns.sidecar("iptables", command, "-c", str(readable), uid=65534)
            assert done.returncode == 1, (command, done.stdout, done.stderr)
            assert "root or CAP_NET_ADMIN" in done.stderr and "Traceback" not in done.stderr
        shown = ns.sidecar("iptables", "show", "-c", str(readable), uid=65534)
        assert shown.returncode == 0 and "cannot read the current rules" in shown.stdout
        assert "-A SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in shown.stdout
    finally:
        readable.unlink()
    for backend in ("nft", "legacy"):
        assert snapshot(ns, backend, 4) == []


def sidecar_here(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """In the test's own namespace: only for failures that stop before any iptables command runs."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=30, check=False, env=env
    )


def test_iptables_missing_exits_1(tmp_path: Path) -> None:
    cfg = config(tmp_path / "h12-sidecar.yaml")
    empty = tmp_path / "h12-empty-bin"
    empty.mkdir()
    done = sidecar_here("iptables", "install", "-c", cfg, env={**os.environ, "PATH": str(empty)})
    assert done.returncode == 1
    assert "iptables is not installed" in done.stderr and "apt-get install iptables" in done.stderr


@pytest.mark.parametrize("command", ["install", "remove", "show"])
def test_config_errors_exit_2_naming_the_key(tmp_path: Path, command: str) -> None:
    bad = config(tmp_path / "h12-sidecar.yaml", transparent(uid=0))
    done = sidecar_here("iptables", command, "-c", bad)
    assert done.returncode == 2 and done.stderr.startswith("sidecar: transparent.uid: "), done.stderr


def test_install_and_show_need_a_transparent_section(tmp_path: Path) -> None:
    path = tmp_path / "h12-plain.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "tls": {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"},
                "outbound": [{"name": "o", "listen": "127.0.0.1:0", "upstream": "a.mesh:443"}],
            }
        )
    )
    for command in ("install", "show"):
        done = sidecar_here("iptables", command, "-c", str(path))
        assert done.returncode == 2 and "transparent: required" in done.stderr
