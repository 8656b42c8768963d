"""The Prometheus endpoint over a real HTTP GET, parsed with prometheus_client's parser."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edgeserve.errors import ConfigError
from edgeserve.telemetry.prometheus import MetricsServer, start_metrics_server
from edgeserve.telemetry.recorders import LATENCY_BOUNDS_S, Recorders

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def server(recorders: Recorders, tmp_path: Path) -> Iterator[MetricsServer]:
    handle = start_metrics_server("127.0.0.1", 0, recorders, tmp_path)
    try:
        yield handle
    finally:
        handle.close()


def _scrape(server: MetricsServer) -> tuple[str, dict[str, list[Sample]]]:
    url = f"http://{server.host}:{server.port}/metrics"
    with _NO_PROXY.open(url, timeout=10) as reply:
        content_type = reply.headers["Content-Type"]
        text = reply.read().decode()
    families = {family.name: family.samples for family in text_string_to_metric_families(text)}
    return content_type, families


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    matches = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(matches) == 1, (name, labels, samples)
    return matches[0]


def test_scrape_has_the_observed_counts(server: MetricsServer, recorders: Recorders) -> None:
    rec = recorders.for_model("mlp", "2")
    for total in (0.0005, 0.002, 0.002, 0.04):
        rec.observe_request("OK", total, total / 4, total / 2)
    for _ in range(3):
        rec.observe_request("RESOURCE_EXHAUSTED", 0.0001, None, None)
    rec.observe_batch(3, 0.001)
    rec.observe_batch(8, 0.002)
    rec.set_queue_depth_source(lambda: 5)
    rec.observe_load(1.25)
    rec.observe_warmup_failure()

    content_type, families = _scrape(server)
    assert content_type.startswith("text/plain") and "version=" in content_type
    labels = {"model": "mlp", "version": "2"}
    requests = families["edgeserve_requests"]
    assert _value(requests, "edgeserve_requests_total", code="OK", **labels) == 4
    assert _value(requests, "edgeserve_requests_total", code="RESOURCE_EXHAUSTED", **labels) == 3

    duration = families["edgeserve_request_duration_seconds"]
    name = "edgeserve_request_duration_seconds"
    assert _value(duration, f"{name}_count", **labels) == 4
    assert _value(duration, f"{name}_sum", **labels) == pytest.approx(0.0445)
    buckets = {s.labels["le"]: s.value for s in duration if s.name == f"{name}_bucket"}
    assert len(buckets) == len(LATENCY_BOUNDS_S) + 1
    assert buckets["+Inf"] == 4
    assert buckets["0.0001"] == 0 and buckets["0.00056"] == 1
    assert buckets["0.0032"] == 3 and buckets["0.056"] == 4
    counts = list(buckets.values())
    assert counts == sorted(counts), "buckets must be cumulative"

    batch = families["edgeserve_batch_size"]
    assert _value(batch, "edgeserve_batch_size_bucket", le="4.0", **labels) == 1
    assert _value(batch, "edgeserve_batch_size_bucket", le="8.0", **labels) == 2
    assert _value(batch, "edgeserve_batch_size_sum", **labels) == 11
    assert _value(families["edgeserve_queue_depth"], "edgeserve_queue_depth", **labels) == 5
    assert (
        _value(families["edgeserve_model_load_seconds"], "edgeserve_model_load_seconds", **labels)
        == 1.25
    )
    failures = families["edgeserve_warmup_failures"]
    assert _value(failures, "edgeserve_warmup_failures_total", **labels) == 1
    rss = families["edgeserve_process_resident_memory_bytes"]
    assert _value(rss, "edgeserve_process_resident_memory_bytes") > 0
    assert _value(families["edgeserve_disk_free_bytes"], "edgeserve_disk_free_bytes") > 0


def test_help_and_type_lines(server: MetricsServer, recorders: Recorders) -> None:
    recorders.for_model("mlp", "1").observe_request("OK", 0.001, None, None)
    with _NO_PROXY.open(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert "# TYPE edgeserve_requests_total counter" in text
    assert "# TYPE edgeserve_request_duration_seconds histogram" in text
    assert "# HELP edgeserve_queue_depth " in text
    assert 'edgeserve_requests_total{code="OK",model="mlp",version="1"} 1.0' in text


def test_forgotten_versions_leave_the_scrape(server: MetricsServer, recorders: Recorders) -> None:
    recorders.for_model("mlp", "1").observe_request("OK", 0.001, None, None)
    recorders.for_model("mlp", "2").observe_request("OK", 0.001, None, None)
    recorders.forget("mlp", "1")
    _, families = _scrape(server)
    versions = {s.labels["version"] for s in families["edgeserve_requests"]}
    assert versions == {"2"}


def test_close_stops_listening(recorders: Recorders, tmp_path: Path) -> None:
    handle = start_metrics_server("localhost", 0, recorders, tmp_path)
    port = handle.port
    _scrape(handle)
    handle.close()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "example.com"])  # noqa: S104
def test_non_loopback_is_refused(recorders: Recorders, tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        start_metrics_server(host, 0, recorders, tmp_path)
    assert caught.value.key == "metrics.prometheus_listen"
    assert host in str(caught.value) and "allow_non_loopback" in str(caught.value)


def test_a_taken_port_names_the_key(recorders: Recorders, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="metrics.prometheus_listen"):
            start_metrics_server("127.0.0.1", taken.getsockname()[1], recorders, tmp_path)
