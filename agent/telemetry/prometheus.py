"""Optional Prometheus text endpoint on a loopback port, read-only over the recorders.

Nothing on the hot path touches prometheus_client: a ``MetricsCollector`` reads
``Recorders.snapshot()`` and one ``SystemSampler`` sample at scrape time and turns them
into metric families; prometheus_client's WSGI app does the exposition format (HELP and
TYPE lines, escaping, ``_bucket{le=...}``/``_sum``/``_count``, OpenMetrics on request).

The server is a small threading WSGI server on its own daemon thread, so a scrape never
runs on the event loop. It binds loopback only unless ``allow_non_loopback`` is set
(``server.allow_non_loopback`` in the config), and it never resolves its own name
(``socket.getfqdn`` can hang for seconds on a device without DNS).

Exposed families (labels in braces)::

    edgeserve_requests_total{model,version,code}               counter
    edgeserve_request_duration_seconds{model,version}          histogram, OK requests
    edgeserve_request_queue_seconds{model,version}             histogram, OK requests
    edgeserve_request_compute_seconds{model,version}           histogram, OK requests
    edgeserve_batch_size{model,version}                        histogram
    edgeserve_batch_compute_seconds{model,version}             histogram
    edgeserve_queue_depth{model,version}                       gauge
    edgeserve_model_load_seconds{model,version}                gauge
    edgeserve_model_last_load_timestamp_seconds{model,version} gauge
    edgeserve_warmup_failures_total{model,version}             counter
    edgeserve_process_* / edgeserve_system_* / edgeserve_disk_* /
    edgeserve_temperature_celsius{sensor,label} / edgeserve_gpu_memory_*_bytes{device}
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from edgeserve.errors import ConfigError
from edgeserve.telemetry.recorders import Recorders
from edgeserve.telemetry.sampler import SystemSampler

log = logging.getLogger("edgeserve.telemetry")

CONFIG_KEY = "metrics.prometheus_listen"
_MODEL_LABELS = ("model", "version")
_HISTOGRAMS = (
    # (family name, help, path into the model snapshot)
    ("request_duration_seconds", "Total time of served (OK) requests.", ("latency_s", "total")),
    ("request_queue_seconds", "Time served requests waited in the queue.", ("latency_s", "queue")),
    ("request_compute_seconds", "Model time of served requests.", ("latency_s", "compute")),
    ("batch_size", "Requests per batch the model ran.", ("batch_size",)),
    ("batch_compute_seconds", "Model time per batch.", ("batch_compute_s",)),
)
_MODEL_GAUGES = (
    ("queue_depth", "Requests waiting in the queue.", "queue_depth"),
    ("model_load_seconds", "Duration of the last load including warm-up.", "load_s"),
    ("model_last_load_timestamp_seconds", "Unix time of the last load.", "last_load_at"),
)


class MetricsCollector:
    """A prometheus_client collector over the recorders and a system sampler."""

    def __init__(self, recorders: Recorders, sampler: SystemSampler | None) -> None:
        self._recorders = recorders
        self._sampler = sampler

    def collect(self) -> Iterator[Metric]:
        models = self._recorders.snapshot()["models"]
        yield from _model_families(models)
        if self._sampler is None:
            return
        try:
            sample = self._sampler.sample()
        except Exception:  # a failing psutil call must not lose the model figures
            log.warning("system sample failed during a metrics scrape", exc_info=True)
            return
        yield from _system_families(sample)


def _model_families(models: list[dict[str, Any]]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "edgeserve_requests",
        "Finished requests by gRPC status code.",
        labels=[*_MODEL_LABELS, "code"],
    )
    failures = CounterMetricFamily(
        "edgeserve_warmup_failures", "Warm-up self-checks that failed.", labels=_MODEL_LABELS
    )
    for model in models:
        labels = [model["model"], model["version"]]
        for code, count in sorted(model["requests"].items()):
            requests.add_metric([*labels, code], count)
        failures.add_metric(labels, model["warmup_failures"])
    yield requests
    yield failures
    for name, doc, path in _HISTOGRAMS:
        family = HistogramMetricFamily(f"edgeserve_{name}", doc, labels=_MODEL_LABELS)
        for model in models:
            histogram = model
            for key in path:
                histogram = histogram[key]
            family.add_metric(
                [model["model"], model["version"]], _cumulative(histogram), histogram["sum"]
            )
        yield family
    for name, doc, key in _MODEL_GAUGES:
        gauge = GaugeMetricFamily(f"edgeserve_{name}", doc, labels=_MODEL_LABELS)
        for model in models:
            if model[key] is not None:
                gauge.add_metric([model["model"], model["version"]], model[key])
        yield gauge


def _cumulative(histogram: dict[str, Any]) -> list[tuple[str, float]]:
    buckets = []
    running = 0
    for bound, count in zip([*histogram["bounds"], float("inf")], histogram["counts"], strict=True):
        running += count
        buckets.append((floatToGoString(bound), running))
    return buckets


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(f"edgeserve_{name}", doc, value=value)


def _system_families(sample: dict[str, Any]) -> Iterator[Metric]:
    process, system, disk = sample["process"], sample["system"], sample["disk"]
    yield from _gauge("process_resident_memory_bytes", "Resident memory.", process["rss_bytes"])
    yield from _gauge("process_threads", "Threads of the daemon.", process["threads"])
    yield from _gauge(
        "process_cpu_percent", "CPU use since the previous scrape.", process["cpu_percent"]
    )
    yield from _gauge(
        "system_cpu_percent", "Machine CPU use since the previous scrape.", system["cpu_percent"]
    )
    yield from _gauge("system_memory_total_bytes", "Machine memory.", system["memory_total_bytes"])
    yield from _gauge(
        "system_memory_available_bytes", "Memory available.", system["memory_available_bytes"]
    )
    if system["load_average"] is not None:
        load = GaugeMetricFamily("edgeserve_system_load_average", "Load.", labels=["period"])
        for period, value in zip(("1m", "5m", "15m"), system["load_average"], strict=True):
            load.add_metric([period], value)
        yield load
    if disk is not None:
        yield from _gauge("disk_total_bytes", "Size of the state dir's disk.", disk["total_bytes"])
        yield from _gauge("disk_free_bytes", "Free on the state dir's disk.", disk["free_bytes"])
    yield from _hardware_families(sample)


def _hardware_families(sample: dict[str, Any]) -> Iterator[Metric]:
    if sample["temperatures"]:
        temps = GaugeMetricFamily(
            "edgeserve_temperature_celsius", "Sensor temperature.", labels=["sensor", "label"]
        )
        for reading in sample["temperatures"]:
            temps.add_metric([reading["sensor"], reading["label"]], reading["celsius"])
        yield temps
    for kind in ("total", "free", "allocated", "reserved"):
        family = GaugeMetricFamily(
            f"edgeserve_gpu_memory_{kind}_bytes", f"GPU memory, {kind}.", labels=["device"]
        )
        for gpu in sample["gpus"]:
            value = gpu[f"memory_{kind}_bytes"]
            if value is not None:
                family.add_metric([str(gpu["index"])], value)
        if family.samples:
            yield family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        log.debug("metrics scrape: " + format, *args)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), a DNS lookup.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """A running metrics endpoint; ``close()`` stops it and joins its thread."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        log.info("metrics endpoint on %s port %d closed", self.host, self.port)


def start_metrics_server(
    host: str,
    port: int,
    recorders: Recorders,
    state_dir: Path,
    *,
    allow_non_loopback: bool = False,
) -> MetricsServer:
    """Serve the Prometheus text format on ``host:port`` (port 0 picks a free one)."""
    _check_host(host, allow_non_loopback)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(recorders, SystemSampler(state_dir)))
    server_class = _Server6 if ":" in host else _Server
    try:
        server = server_class((host, port), _QuietHandler)
    except OSError as exc:
        raise ConfigError(CONFIG_KEY, f"cannot listen on {host}:{port}: {exc}") from exc
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="edgeserve-metrics"
    )
    thread.daemon = True
    thread.start()
    handle = MetricsServer(server, thread)
    log.info("metrics endpoint listening on %s port %d", handle.host, handle.port)
    return handle


def _check_host(host: str, allow_non_loopback: bool) -> None:
    if allow_non_loopback or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            CONFIG_KEY,
            f"'{host}' is not a loopback address; set server.allow_non_loopback: true "
            "to serve metrics beyond this machine",
        )
