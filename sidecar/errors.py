"""The sidecar's one vocabulary of errors.

Every error a user can cause (bad config, bad files) is a ``SidecarError``; the CLI maps those to
exit code 2 with the message alone, except ``WorkloadAPIUnavailable`` (exit 1: the config is fine,
the agent is not there). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SidecarError(Exception):
    """A problem the user can fix; its message names the key or file at fault."""


class ConfigError(SidecarError):
    """The configuration is invalid; the message starts with the YAML path (``inbound[0].listen``)."""


class CertificateError(SidecarError):
    """A certificate, key, CA bundle or CRL file is missing, unreadable or unusable."""


class PKIError(SidecarError):
    """``sidecar pki`` could not create or issue what was asked."""


class WorkloadAPIUnavailable(SidecarError):
    """No usable X.509-SVID came from the Workload API socket in time; the message names the socket."""
