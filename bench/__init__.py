"""What mTLS costs: a load generator, a proxy pair and a backend on loopback, measured and compared.

Topology of every pair: load generator -> client-side proxy (plain in, TLS 1.3 mTLS out) ->
server-side proxy (mTLS in, client certificate required, plain out) -> backend. ``direct`` has no
proxies; ``sidecar`` is ours; ``stunnel``, ``haproxy`` and ``nginx`` are peers configured to the
same security. ``python -m bench --help`` lists the modes; ``cli.py`` is where they start.

Module map: ``procs`` (every process we start, and /proc readings), ``tools`` (what is installed),
``certs``, ``backends``, ``pairs`` (one class per proxy), ``checks`` (a pair is proven before it is
measured), ``load`` (wrk, iperf3 and a pure-Python fallback), ``runner`` (repetitions and
workloads), ``report`` (markdown, JSON, chart), ``target`` (measure the user's own service).
"""

from __future__ import annotations

import os

# Importing ``sidecar`` points OPENSSL_CONF at the sidecar's own settings for this process and
# everything it starts. Peers, load generators and sidecars must each get the operator's
# original value instead, so remember it before any ``sidecar`` import can change it.
ORIGINAL_OPENSSL_CONF = os.environ.get("OPENSSL_CONF")
