"""The command line: ``sidecar check`` and ``sidecar run`` as a user runs them (``python -m sidecar``).

User errors exit 2 with one line on stderr that names the YAML path or the file at fault, and never
a traceback; ``check`` exits 0 on a good config and says which identity it presents.
"""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from support import CertFactory, CertFiles, tls_section, write_config

from sidecar.pinning import pin_of_der


def sidecar(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def good_config(ca: CertFactory, leaf: CertFiles) -> dict[str, Any]:
    return {
        "tls": tls_section(leaf, ca.ca_file),
        "inbound": [
            {
                "name": "orders",
                "listen": "127.0.0.1:0",
                "forward": "127.0.0.1:8080",
                "allow": ["spiffe://mesh.local/frontend"],
            }
        ],
        "outbound": [
            {
                "name": "billing",
                "listen": "127.0.0.1:0",
                "upstream": "127.0.0.1:8443",
                "server_identity": ["spiffe://mesh.local/billing"],
            }
        ],
        "limits": {"idle_timeout": "30s", "drain_timeout": "1s"},
    }


def assert_user_error(result: subprocess.CompletedProcess[str], *names: str) -> None:
    """Exit 2; stderr is one readable line naming every one of ``names``; no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        node: Any = cfg
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        node[keys[-1]] = value

    return mutate


CONFIG_ERRORS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    # case: (how to break the good config, what the message must name)
    "unknown_key": (_set("inbound.0.allwo", ["*"]), "inbound[0].allwo"),
    "unknown_top_key": (_set("limit", {}), "limit"),
    "address_without_port": (_set("inbound.0.listen", "127.0.0.1"), "inbound[0].listen"),
    "address_bad_port": (_set("outbound.0.upstream", "billing:99999"), "outbound[0].upstream"),
    "ipv6_without_brackets": (_set("inbound.0.forward", "::1:8080"), "inbound[0].forward"),
    "bad_duration": (_set("limits.idle_timeout", "10 parsecs"), "limits.idle_timeout"),
    "negative_duration": (_set("limits.drain_timeout", "-1s"), "limits.drain_timeout"),
    "empty_allow": (_set("inbound.0.allow", []), "inbound[0].allow"),
    "bad_pattern": (_set("inbound.0.allow", ["spiffe://mesh.local/fr*nt"]), "inbound[0].allow[0]"),
    "invalid_spiffe_pattern": (_set("inbound.0.allow", ["*", "spiffe://mesh.local/a/../*"]), "inbound[0].allow[1]"),
    "bad_pin": (_set("outbound.0.server_identity", ["spki-sha256:AAAA"]), "outbound[0].server_identity[0]"),
    "unknown_pattern_kind": (_set("outbound.0.server_identity", ["ip:10.0.0.1"]), "outbound[0].server_identity[0]"),
    "bad_max_connections": (_set("limits.max_connections", 0), "limits.max_connections"),
    "bad_log_level": (_set("log", {"level": "chatty"}), "log.level"),
    "missing_required": (_set("inbound.0.forward", None), "inbound[0].forward"),
}


@pytest.fixture(scope="module")
def config_error_results(
    tmp_path_factory: pytest.TempPathFactory, ca: CertFactory, server_leaf: CertFiles
) -> dict[str, subprocess.CompletedProcess[str]]:
    """``sidecar check`` on every broken config of CONFIG_ERRORS, all started at once (it is quicker)."""
    folder = tmp_path_factory.mktemp("config-errors")
    procs: dict[str, tuple[list[str], subprocess.Popen[str]]] = {}
    for case, (mutate, _key) in CONFIG_ERRORS.items():
        cfg = good_config(ca, server_leaf)
        mutate(cfg)
        args = [sys.executable, "-m", "sidecar", "check", "-c", str(write_config(folder / f"{case}.yaml", cfg))]
        procs[case] = (args, subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for case, (args, proc) in procs.items():
        out, err = proc.communicate(timeout=30)
        results[case] = subprocess.CompletedProcess(args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_error_is_one_line_naming_the_key(
    case: str, config_error_results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    assert_user_error(config_error_results[case], CONFIG_ERRORS[case][1])


@pytest.mark.parametrize("command", ["check", "run"])
def test_run_and_check_agree_on_config_errors(
    command: str, tmp_path: Path, ca: CertFactory, server_leaf: CertFiles
) -> None:
    cfg = good_config(ca, server_leaf)
    cfg["inbound"][0]["allwo"] = ["*"]
    assert_user_error(sidecar(command, "-c", str(write_config(tmp_path / "bad.yaml", cfg))), "inbound[0].allwo")


@pytest.mark.parametrize("command", ["check", "run"])
def test_missing_cert_file_is_named(command: str, tmp_path: Path, ca: CertFactory, server_leaf: CertFiles) -> None:
    cfg = good_config(ca, server_leaf)
    missing = tmp_path / "nowhere" / "cert.pem"
    cfg["tls"]["cert"] = str(missing)
    assert_user_error(sidecar(command, "-c", str(write_config(tmp_path / "c.yaml", cfg))), str(missing))


@pytest.mark.parametrize("command", ["check", "run"])
def test_key_not_matching_cert_is_named(command: str, tmp_path: Path, ca: CertFactory, server_leaf: CertFiles) -> None:
    other = ca.leaf("other")
    cfg = good_config(ca, server_leaf)
    cfg["tls"]["key"] = str(other.key)
    result = sidecar(command, "-c", str(write_config(tmp_path / "c.yaml", cfg)))
    assert_user_error(result, str(other.key), str(server_leaf.cert))
    assert "PRIVATE KEY" not in result.stderr  # never the key's content


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    assert_user_error(sidecar("check", "-c", str(missing)), str(missing))


def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("tls: [unclosed\n")
    result = sidecar("check", "-c", str(path))
    # one line naming the file and where in it the syntax broke
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert str(path) in line and "not valid YAML at line" in line


def test_relative_paths_resolve_against_the_config_file(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    cfg = good_config(ca, server_leaf)
    for key, source in (("cert", server_leaf.cert), ("key", server_leaf.key), ("ca", ca.ca_file)):
        (folder / f"{key}.pem").write_bytes(source.read_bytes())
        cfg["tls"][key] = f"{key}.pem"
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "-c", str(write_config(folder / "sidecar.yaml", cfg))],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        cwd=tmp_path,  # not the config's folder
    )
    assert result.returncode == 0, result.stderr


def test_check_good_config_prints_the_identity(tmp_path: Path, ca: CertFactory, server_leaf: CertFiles) -> None:
    result = sidecar("check", "-c", str(write_config(tmp_path / "good.yaml", good_config(ca, server_leaf))))
    assert result.returncode == 0, result.stderr
    assert "spiffe://mesh.local/orders" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
    # the identity's pin, ready to paste into a peer's allow or server_identity
    pin = "spki-sha256:" + pin_of_der(server_leaf.issued.cert.public_bytes(serialization.Encoding.DER))
    assert f"pin {pin};" in result.stdout


def test_pki_pin_prints_the_pin_of_the_first_certificate(tmp_path: Path, ca: CertFactory) -> None:
    leaf = ca.leaf("pinned")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.cert.read_bytes() + ca.ca_file.read_bytes())  # leaf first, then the CA
    result = sidecar("pki", "pin", str(chain))
    assert result.returncode == 0, result.stderr
    pin = pin_of_der(leaf.issued.cert.public_bytes(serialization.Encoding.DER))
    assert result.stdout == f"spki-sha256:{pin}\n"
    # what it prints is a pattern the config accepts
    cfg = good_config(ca, leaf)
    cfg["inbound"][0]["allow"] = [result.stdout.strip()]
    assert sidecar("check", "-c", str(write_config(tmp_path / "pinned.yaml", cfg))).returncode == 0


def test_pki_pin_of_a_missing_or_bad_file_is_one_line(tmp_path: Path) -> None:
    assert_user_error(sidecar("pki", "pin", str(tmp_path / "nope.pem")), "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert_user_error(sidecar("pki", "pin", str(junk)), "junk.pem")


def test_check_summarises_a_transparent_only_config(tmp_path: Path, ca: CertFactory, server_leaf: CertFiles) -> None:
    data = {
        "tls": tls_section(server_leaf, ca.ca_file),
        "transparent": {
            "uid": 10001,
            "inbound": {"listen": "0.0.0.0:15006", "ports": [{"port": 8080, "allow": ["*"]}], "mode": "permissive"},
        },
    }
    result = sidecar("check", "-c", str(write_config(tmp_path / "t.yaml", data)))
    assert result.returncode == 0, result.stderr
    assert "0 inbound, 0 outbound listener(s); transparent (uid 10001): no outbound, inbound 1 port(s) permissive" in (
        result.stdout
    )


def test_check_config_from_environment(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "env.yaml", good_config(ca, server_leaf))
    monkeypatch.setenv("SIDECAR_CONFIG", str(path))
    result = sidecar("check")
    assert result.returncode == 0, result.stderr
    assert "spiffe://mesh.local/orders" in result.stdout


def test_check_refuses_cert_not_chaining_to_the_bundle(
    tmp_path: Path, ca: CertFactory, rogue_ca: CertFactory, server_leaf: CertFiles
) -> None:
    stray = rogue_ca.leaf("orders")
    cfg = good_config(ca, server_leaf)
    cfg["tls"].update(cert=str(stray.cert), key=str(stray.key))
    assert_user_error(sidecar("check", "-c", str(write_config(tmp_path / "c.yaml", cfg))), str(stray.cert))


def test_check_refuses_expired_cert(tmp_path: Path, ca: CertFactory, server_leaf: CertFiles) -> None:
    old = ca.expired("orders")
    cfg = good_config(ca, server_leaf)
    cfg["tls"].update(cert=str(old.cert), key=str(old.key))
    result = sidecar("check", "-c", str(write_config(tmp_path / "c.yaml", cfg)))
    assert_user_error(result, str(old.cert))
    assert "expired" in result.stderr


def test_run_on_a_port_in_use_names_the_listener(tmp_path: Path, ca: CertFactory, server_leaf: CertFiles) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        cfg = copy.deepcopy(good_config(ca, server_leaf))
        cfg["inbound"][0]["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        assert_user_error(sidecar("run", "-c", str(write_config(tmp_path / "c.yaml", cfg))), "inbound[0].listen")
