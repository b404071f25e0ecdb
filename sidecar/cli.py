"""The ``sidecar`` command: the only place that exits.

User errors (``SidecarError``) become one line on stderr and exit 2, no traceback. ``run`` exits 0
after a clean drain; ``check`` exits 0 when the config and every file it names are usable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import SidecarError

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
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(keep=args.keep)
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
    from .tls import load_material

    path = config_mod.resolve_path(config_arg)
    cfg = config_mod.load(path)
    material = load_material(cfg.tls)  # the same validation `run` does, chain to the bundle included
    listeners = f"{len(cfg.inbound)} inbound, {len(cfg.outbound)} outbound listener(s)"
    print(f"ok: {path} presents {material.identity.summary()}; {listeners}")
    return EXIT_OK


def _pki(args: argparse.Namespace) -> int:
    from . import pki

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
