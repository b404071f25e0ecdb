"""mTLS sidecar proxy.

Importing the package points OpenSSL at the sidecar's own settings (``openssl.cnf`` beside this
file: TLS 1.3 groups and suites of Mozilla's modern profile), because OpenSSL reads that file once,
when Python's ``ssl`` is first imported. An ``OPENSSL_CONF`` already set by the operator wins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__version__ = "0.1.0"

OPENSSL_CONF = Path(__file__).with_name("openssl.cnf")

_SSL_ALREADY_LOADED = "_ssl" in sys.modules
if not _SSL_ALREADY_LOADED:
    os.environ.setdefault("OPENSSL_CONF", str(OPENSSL_CONF))


def openssl_conf_in_effect() -> bool:
    """Whether this process's OpenSSL was initialised with the sidecar's settings."""
    return not _SSL_ALREADY_LOADED and os.environ.get("OPENSSL_CONF") == str(OPENSSL_CONF)
