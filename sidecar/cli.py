"""The ``sidecar`` command: the only place that exits.

User errors (``SidecarError``) become one line on stderr and exit 2, no traceback; a Workload API
that gave no certificate in time exits 1. ``run`` exits 0 after a clean drain; ``check`` exits 0
when the config and every file it names (or the Workload API's answer) are usable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import SidecarError, WorkloadAPIUnavailable
from .pinning import PREFIX as PIN_PREFIX

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"sidecar: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sidecar", description="mTLS sidecar proxy")
    p.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", help="config file (default: $SIDECAR_CONFIG, else config/sidecar.yaml)")

    check = sub.add_parser("check", help="validate the config and every file it names")
    check.add_argument("-c", "--config", help="config file (default: $SIDECAR_CONFIG, else config/sidecar.yaml)")

    pki = sub.add_parser("pki", help="a development CA and leaf certificates")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True, parser_class=_Parser)
    init = pki_sub.add_parser("init", help="create a development CA (ca.pem, ca-key.pem) in DIR")
    init.add_argument("--dir", required=True, type=Path)
    init.add_argument("--trust-domain", default="mesh.local")
    init.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    issue = pki_sub.add_parser("issue", help="issue a leaf certificate from the CA in DIR")
    issue.add_argument("--dir", required=True, type=Path, help="folder holding ca.pem and ca-key.pem")
    issue.add_argument("--name", required=True)
    issue.add_argument("--spiffe-id", help="default: spiffe://TRUST_DOMAIN/NAME")
    issue.add_argument("--dns", action="append", default=[], help="a DNS SAN (repeatable)")
    issue.add_argument("--hours", type=float, default=24.0, help="validity in hours (default 24)")
    issue.add_argument("--out", type=Path, help="output folder (default: DIR/NAME)")
    pin = pki_sub.add_parser("pin", help="print the spki-sha256: pin of a PEM certificate (the first in FILE)")
    pin.add_argument("file", type=Path, metavar="FILE")

    iptables = sub.add_parser("iptables", help="the nat rules that capture traffic for transparent mode")
    ipt_sub = iptables.add_subparsers(dest="iptables_command", required=True, parser_class=_Parser)
    for name, text in (
        ("install", "add or update the rules for the config's transparent section (idempotent)"),
        ("remove", "delete exactly the chains and jump rules install added"),
        ("show", "print the rules in iptables-save format; changes nothing"),
    ):
        cmd = ipt_sub.add_parser(name, help=text)
        cmd.add_argument("-c", "--config", help="config file (default: $SIDECAR_CONFIG, else config/sidecar.yaml)")
        cmd.add_argument(
            "--backend",
            choices=("auto", "nft", "legacy"),
            default="auto",
            help="iptables variant (default auto: the one already holding the rules, else the one in use)",
        )

    demo = sub.add_parser("demo", help="a whole mesh on loopback: calls, a refusal, a live rotation")
    demo.add_argument("--keep", action="store_true", help="keep the demo's files for inspection")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.config)
        if args.command == "check":
            return _check(args.config)
        if args.command == "pki":
            return _pki(args)
        if args.command == "iptables":
            return _iptables(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(keep=args.keep)
    except WorkloadAPIUnavailable as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except SidecarError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _run(config_arg: str | None) -> int:
    import uvloop

    from . import config as config_mod
    from . import heap, logs
    from .server import build

    cfg = config_mod.load(config_mod.resolve_path(config_arg))
    logs.setup(cfg.log.level, cfg.log.format)
    heap.hold_steady()

    async def serve() -> None:
        await build(cfg).run()

    uvloop.run(serve())
    return EXIT_OK


def _check(config_arg: str | None) -> int:
    from . import config as config_mod
    from .tls import load_material, read_files

    path = config_mod.resolve_path(config_arg)
    cfg = config_mod.load(path)
    listeners = f"{len(cfg.inbound)} inbound, {len(cfg.outbound)} outbound listener(s)"
    if (t := cfg.transparent) is not None:
        routes = f"outbound {len(t.outbound.routes)} route(s)" if t.outbound else "no outbound"
        ports = f"inbound {len(t.inbound.ports)} port(s) {t.inbound.mode}" if t.inbound else "no inbound"
        listeners += f"; transparent (uid {t.uid}): {routes}, {ports}"
    if isinstance(cfg.tls, config_mod.TLSWorkloadAPI):
        from .workload_api import fetch_material

        material = fetch_material(cfg.tls)  # waits for the first SVID as `run` does, same deadline
        domains = ", ".join(material.trust_domains)
        pin = f"pin {PIN_PREFIX}{material.identity.spki_sha256}"
        print(f"ok: {path} presents {material.identity.summary()} from {cfg.tls.address}; {pin}; ", end="")
        print(f"trust domains {domains}; {listeners}")
        return EXIT_OK
    # the same validation `run` does, chain to the bundle included
    material = load_material(read_files(cfg.tls), session_resumption=cfg.tls.session_resumption)
    pin = f"pin {PIN_PREFIX}{material.identity.spki_sha256}"
    print(f"ok: {path} presents {material.identity.summary()}; {pin}; {listeners}")
    return EXIT_OK


def _iptables(args: argparse.Namespace) -> int:
    """Config errors exit 2 (raised past here); iptables missing or refusing exits 1."""
    from . import config as config_mod
    from . import iptables

    cfg = config_mod.load(config_mod.resolve_path(args.config))
    try:
        if args.iptables_command == "show":
            sys.stdout.write(iptables.show(cfg, args.backend))
            return EXIT_OK
        if args.iptables_command == "install":
            said = iptables.install(cfg, args.backend)
        else:
            said = iptables.remove(args.backend)
    except iptables.IptablesError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for line in said:
        print(line)
    return EXIT_OK


def _pki(args: argparse.Namespace) -> int:
    from . import pki

    if args.pki_command == "pin":
        print(PIN_PREFIX + pki.pin_of_file(args.file))
        return EXIT_OK
    if args.pki_command == "init":
        ca = pki.init_ca(args.dir, trust_domain=args.trust_domain, force=args.force)
        print(f"created CA '{ca.cert.subject.rfc4514_string()}' in {args.dir} (ca.pem, ca-key.pem mode 0600)")
        return EXIT_OK
    if args.hours <= 0:
        raise SidecarError("--hours: must be greater than 0")
    leaf = pki.issue_to_dir(
        args.dir, args.name, spiffe_id=args.spiffe_id, dns_names=args.dns, hours=args.hours, out=args.out
    )
    out = args.out or args.dir / args.name
    from .identity import from_certificate

    ident = from_certificate(leaf.cert)
    print(
        f"issued {ident.describe()} serial {leaf.cert.serial_number:x} valid until "
        f"{leaf.cert.not_valid_after_utc.isoformat()} -> {out}/cert.pem, {out}/key.pem"
    )
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
