"""The Prometheus metric objects (contract section 5), created once per process and passed in.

Names and labels here are part of the contract. Listeners bind their label values once
(``ListenerMetrics``) so the data path never builds a label dict per connection or per chunk.
Every label value comes from a fixed set or from the config (listener names), so cardinality is
bounded; the fixed combinations are created up front so dashboards read 0, not "no data".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from . import __version__
from .record import Outcome, Record
from .tlserrors import REASONS

if TYPE_CHECKING:
    from .tls import Material

OUTCOMES = tuple(Outcome)

HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class DataMetrics:
    """The families the data path writes: connections, bytes, handshakes, durations.

    With several workers each worker process holds these (values shared through
    ``PROMETHEUS_MULTIPROC_DIR``, prometheus_client's multiprocess mode) and the supervisor reads
    the sum; ``sidecar_active_connections`` sums the live workers only.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.connections = Counter(
            "sidecar_connections_total",
            "Connections handled, counted when they end, by outcome.",
            ["listener", "direction", "outcome"],
            registry=r,
        )
        self.active = Gauge(
            "sidecar_active_connections",
            "Connections open now.",
            ["listener", "direction"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.bytes = Counter(
            "sidecar_bytes_total",
            "Plaintext bytes proxied; to_upstream flows from the connecting side toward the target.",
            ["listener", "flow"],
            registry=r,
        )
        self.handshake_seconds = Histogram(
            "sidecar_handshake_seconds",
            "Duration of successful TLS handshakes (from accept or connect to handshake completion).",
            ["listener"],
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.handshake_failures = Counter(
            "sidecar_handshake_failures_total",
            "TLS handshakes that failed, by reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.upstream_connect_seconds = Histogram(
            "sidecar_upstream_connect_seconds",
            "Time to open the TCP connection to the upstream or forward address.",
            ["listener"],
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.hbone_pool_connections = Gauge(
            "sidecar_hbone_pool_connections",
            "Pooled HBONE tunnels open now on an outbound listener or transparent routes with tunnel: hbone "
            "(retiring ones included).",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connection_duration_seconds = Histogram(
            "sidecar_connection_duration_seconds",
            "Lifetime of connections, from accept to close.",
            ["listener", "direction"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )

    def for_listener(self, name: str, direction: str) -> ListenerMetrics:
        return ListenerMetrics(self, name, direction)


class Metrics(DataMetrics):
    """Everything ``/metrics`` serves: the data-path families plus the process's state.

    ``workers_dir`` set (the supervisor of several workers): the data-path families come from the
    workers' files there, and this process's own data-path objects, which never count anything,
    stay out of the served registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, workers_dir: str | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.reads_files = workers_dir is not None
        super().__init__(CollectorRegistry() if workers_dir is not None else self.registry)
        if workers_dir is not None:
            MultiProcessCollector(self.registry, path=workers_dir)  # type: ignore[no-untyped-call]
        r = self.registry
        self.cert_expiry = Gauge(
            "sidecar_cert_expiry_timestamp_seconds",
            "Expiry (not_after) of the loaded certificate, as a Unix timestamp.",
            ["cert"],
            registry=r,
        )
        self.cert_reloads = Counter(
            "sidecar_cert_reloads_total", "Certificate reload attempts by result.", ["result"], registry=r
        )
        self.cert_loaded = Gauge(
            "sidecar_cert_loaded_timestamp_seconds",
            "When the TLS material in use was loaded, as a Unix timestamp.",
            registry=r,
        )
        self.ready = Gauge(
            "sidecar_ready",
            "1 when /readyz answers 200 (every listener bound, identity cert loaded and valid), else 0.",
            registry=r,
        )
        self.build_info = Gauge(
            "sidecar_build_info", "Always 1; labelled with the running version.", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        for result in ("ok", "error"):
            self.cert_reloads.labels(result=result)

    def observe_state(self, *, ready: bool, material: Material | None) -> None:
        """Refresh the gauges that mirror current state; the admin server calls this per scrape.

        ``cert="ca"`` is the soonest expiry in the trust bundle: the one that breaks peers first.
        """
        self.ready.set(1 if ready else 0)
        if material is None:
            return
        self.cert_expiry.labels(cert="identity").set(material.identity.not_after.timestamp())
        if material.ca_infos:
            self.cert_expiry.labels(cert="ca").set(min(ca.not_after.timestamp() for ca in material.ca_infos))
        self.cert_loaded.set(material.loaded_at)


WORKLOAD_API_RESULTS = ("ok", "refused", "worker_error")  # what became of an update (workload_api.Observer)


class WorkloadAPIMetrics:
    """The control plane's families when ``tls.workload_api`` is set (only then: a sidecar reading
    files shows no Workload API series). The source reports to it (``workload_api.Observer``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.updates = Counter(
            "sidecar_workload_api_updates_total",
            "X.509-SVID updates from the Workload API, by what became of them.",
            ["result"],
            registry=registry,
        )
        self.up = Gauge(
            "sidecar_workload_api_connected",
            "1 while the Workload API stream is open and answering, else 0 (the current material stays in use).",
            registry=registry,
        )
        self._results = {result: self.updates.labels(result=result) for result in WORKLOAD_API_RESULTS}

    def updated(self, result: str) -> None:
        self._results[result].inc()

    def connected(self, up: bool) -> None:
        self.up.set(1 if up else 0)


class ListenerMetrics:
    """One listener's label-bound metric children, and what they count from a connection's life."""

    def __init__(self, m: DataMetrics, name: str, direction: str) -> None:
        self.name = name
        self.direction = direction
        self.active = m.active.labels(listener=name, direction=direction)
        self.to_upstream = m.bytes.labels(listener=name, flow="to_upstream")
        self.to_downstream = m.bytes.labels(listener=name, flow="to_downstream")
        self.handshake_seconds = m.handshake_seconds.labels(listener=name)
        self.upstream_connect_seconds = m.upstream_connect_seconds.labels(listener=name)
        self.duration = m.connection_duration_seconds.labels(listener=name, direction=direction)
        self._outcomes = {
            outcome: m.connections.labels(listener=name, direction=direction, outcome=outcome) for outcome in OUTCOMES
        }
        self._failures = {reason: m.handshake_failures.labels(listener=name, reason=reason) for reason in REASONS}

    def opened(self) -> None:
        self.active.inc()

    def finished(self, record: Record) -> None:
        """A connection ended (one that was opened, and counted as active, until now)."""
        self.active.dec()
        self.ended(record.outcome)
        self.duration.observe(record.duration_ms / 1000)

    def ended(self, outcome: Outcome) -> None:
        """One more connection ended so (``limit`` ones are counted here alone: never opened)."""
        self._outcomes[outcome].inc()

    def handshook(self, seconds: float | None, failure: str | None) -> None:
        if seconds is not None:
            self.handshake_seconds.observe(seconds)
        if failure is not None:
            # an unknown reason would be a bug in tlserrors; count it as "other" rather than grow the label set
            self._failures.get(failure, self._failures["other"]).inc()

    def moved(self, to_upstream: int, to_downstream: int) -> None:
        if to_upstream:
            self.to_upstream.inc(to_upstream)
        if to_downstream:
            self.to_downstream.inc(to_downstream)
