"""An unmodified plain HTTP app and its client, for transparent mode's namespace tests and demo.

``serve NAME PORT LOG`` answers every ``GET`` on ``0.0.0.0:PORT`` with ``{"service": NAME,
"path": ...}`` and appends one JSON line per request to LOG (how many requests reached the app);
it prints ``ready`` once listening. ``get URL`` is the app calling a peer by its real address: it
prints ``{"status": ..., "body": ...}``, or ``{"error": ...}`` and exits 1. Neither knows of TLS
or of any sidecar; stdlib only.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TIMEOUT = 10.0


def serve(name: str, port: int, log: Path) -> None:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            with lock, log.open("a") as out:
                out.write(json.dumps({"path": self.path, "client": self.client_address[0]}) + "\n")
            body = json.dumps({"service": name, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
            print(json.dumps({"status": answer.status, "body": answer.read().decode()}))
            return 0
    except urllib.error.HTTPError as exc:
        print(json.dumps({"status": exc.code, "body": exc.read().decode(errors="replace")}))
        return 0
    except (OSError, urllib.error.URLError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1


def requests(log: Path) -> list[dict[str, str]]:
    """The requests that reached the app, from its LOG."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    if argv[0] == "get":
        return get(argv[1])
    serve(argv[1], int(argv[2]), Path(argv[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
