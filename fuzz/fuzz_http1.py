"""Coverage-guided fuzzing of the x-forwarded-client-cert rewriter (sidecar.http1) with atheris.

Run: ``python -m fuzz http1 --seconds 300`` as the other targets, or ``python fuzz/fuzz_http1.py
-max_total_time=300`` (any libFuzzer flag works; with no corpus folder given it starts from the
seeds in fuzz/seeds/http1, copied to a scratch folder so the run never writes into the repository).

Each input is a caller byte stream, fed at once and again in pieces the input chooses, with an
app answer when the rewriter holds bytes behind an upgrade. Properties, any breach is a crash:
- nothing but ``HTTPRefusal`` escapes, and the two feedings give the same bytes and the same verdict;
- llhttp (httptools, strict) frames the app's bytes into requests that each carry exactly one
  x-forwarded-client-cert, ours, and no other spelling of it: no caller-supplied header, no
  smuggled request, whatever the input.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
from pathlib import Path

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    import httptools

    from sidecar.errors import HTTPRefusal
    from sidecar.http1 import XfccRewriter

OURS = b'By=spiffe://mesh.local/orders;Hash=00ff;Subject="CN=frontend";URI=spiffe://mesh.local/frontend'
LINE = b"x-forwarded-client-cert: " + OURS
XFCC = b"x-forwarded-client-cert"
ANSWERS = [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"garbage\r\n\r\n",
]
SEEDS = Path(__file__).resolve().parent / "seeds" / "http1"


def feed(pieces: list[bytes], answers: list[bytes]) -> tuple[bytes, str | None]:
    """What the app gets from ``pieces``, and the refusal's reason if refused. The app answers a
    held request with the next of ``answers``, as an llhttp-based app would: it switches
    protocols only for a request llhttp also takes as an upgrade."""
    rw = XfccRewriter(LINE)
    app = []
    try:
        for piece in pieces:
            app.append(rw.feed(piece))
            while rw.holding and answers:
                answer = answers.pop(0)
                if answer.startswith(b"HTTP/1.1 101") and not upgrades(b"".join(app)):
                    answer = ANSWERS[1]
                app.append(rw.feed_response(answer))
            if rw.refusal is not None:
                break
        app.append(rw.end())
    except HTTPRefusal as exc:
        app.append(exc.forward)
        return b"".join(app), exc.reason
    return b"".join(app), rw.refusal.reason if rw.refusal is not None else None


class Requests:
    def __init__(self) -> None:
        self.headers: list[list[tuple[bytes, bytes]]] = []

    def on_message_begin(self) -> None:
        self.headers.append([])

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[-1].append((name, value))


def frame(app: bytes) -> tuple[list[list[tuple[bytes, bytes]]], bool]:
    """llhttp's requests in ``app``, and whether it stopped at an upgrade (or CONNECT)."""
    sink = Requests()
    try:
        httptools.HttpRequestParser(sink).feed_data(app)
    except httptools.HttpParserUpgrade:
        return sink.headers, True  # from here on the stream is not HTTP/1
    except httptools.HttpParserInvalidMethodError:
        # llhttp knows a fixed list of methods; RFC 9110 allows any token, and so does the
        # rewriter. An llhttp-based app refuses such a request: nothing past it is read.
        return sink.headers[:-1], False
    except httptools.HttpParserError as exc:
        if "Data after `Connection: close`" in str(exc):
            return sink.headers, False  # the app closes after that request and reads no further
        raise AssertionError(f"llhttp refuses what the rewriter let through: {exc}\n{app!r}") from None
    return sink.headers, False


def upgrades(app: bytes) -> bool:
    return frame(app)[1]


def check_app_bytes(app: bytes) -> None:
    for headers in frame(app)[0]:
        names = [n for n, _ in headers if n.lower().replace(b"_", b"-") == XFCC]
        values = [v for n, v in headers if n.lower().replace(b"_", b"-") == XFCC]
        if names != [XFCC] or values != [OURS]:
            raise AssertionError(f"a request reaches the app with {list(zip(names, values, strict=True))!r}\n{app!r}")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cuts = sorted(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 8), 0, 4096))
    answer_picks = fdp.ConsumeIntListInRange(2, 0, len(ANSWERS) - 1)
    stream = fdp.ConsumeBytes(atheris.ALL_REMAINING)
    answers = [ANSWERS[i] for i in answer_picks]

    whole, verdict = feed([stream], list(answers))
    edges = [0, *(c for c in cuts if c < len(stream)), len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(edges)]
    split, split_verdict = feed(pieces, list(answers))
    if (verdict is None) != (split_verdict is None):
        raise AssertionError(f"verdict depends on reads: {verdict} vs {split_verdict}\n{stream!r} {cuts}")
    if verdict is None and whole != split:
        raise AssertionError(f"output depends on reads\n{stream!r} {cuts}")
    check_app_bytes(whole)
    check_app_bytes(split)


def main() -> None:
    args = sys.argv[:]
    scratch = None
    if not any(not a.startswith("-") for a in args[1:]) and SEEDS.is_dir():
        scratch = tempfile.mkdtemp(prefix="fuzz-http1-")
        for seed in SEEDS.iterdir():
            shutil.copy(seed, scratch)
        args.append(scratch)
    atheris.Setup(args, test_one_input)  # no "RegEx" hook: see fuzz/__main__.py
    try:
        atheris.Fuzz()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
