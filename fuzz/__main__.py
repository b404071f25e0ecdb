"""``python -m fuzz TARGET [--seconds N]``: run one target of ``targets.py`` under atheris.

The run starts from ``seeds/TARGET/`` (read, never written: libFuzzer keeps what it finds in
memory) and stops after N seconds, or at the first crash, which it writes to ``crashes/`` and
reports with its Python traceback; the exit status is libFuzzer's (0: nothing found).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("config", "patterns", "spiffe", "pin", "proxy", "http1")  # targets.TARGETS, and fuzz_http1 (its own module)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    p.add_argument("target", choices=NAMES)
    p.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    args = p.parse_args()
    import atheris

    if args.target == "http1":
        # No atheris "RegEx" hook: its pattern proxy takes no start position (``search(buf, pos)``,
        # which the rewriter uses), so every input raised TypeError inside the harness.
        from fuzz import fuzz_http1  # instruments its own imports

        target = fuzz_http1.test_one_input
    else:
        # Coverage guidance for our code and for the YAML parser the config target drives.
        with atheris.instrument_imports(include=["sidecar", "yaml", "fuzz", "proxyprotocol"]):
            from fuzz import targets
        target = targets.TARGETS[args.target]
    seeds = sorted(str(path) for path in (HERE / "seeds" / args.target).iterdir() if path.is_file())
    crashes = HERE / "crashes"
    crashes.mkdir(exist_ok=True)
    argv = [
        sys.argv[0],
        f"-max_total_time={args.seconds}",
        "-timeout=10",  # one input taking 10 s is a finding too
        "-rss_limit_mb=2048",
        f"-artifact_prefix={crashes}/{args.target}-",
        "-print_final_stats=1",
    ]
    if seeds:
        argv.append("-seed_inputs=" + ",".join(seeds))
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
