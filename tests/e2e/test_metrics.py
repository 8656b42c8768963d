"""The daemon's recorders, seen through its Prometheus endpoint."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeserve.api.client import ClientError
from tests.conftest import free_port


def _samples(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_requests_errors_and_batches_are_counted(daemons, mlp_archive_factory):
    port = free_port()
    daemon = daemons.start(
        mlp_archive_factory("1"),
        extra_config=f"metrics:\n  prometheus_listen: 127.0.0.1:{port}\n",
    )
    with daemon.client() as client:
        for _ in range(5):
            client.infer("mlp", {"x": np.ones((2, 16), dtype=np.float32)})
        with pytest.raises(ClientError):
            client.infer("mlp", {"x": np.ones((2, 15), dtype=np.float32)})
    samples = _samples(port)
    labels = (("model", "mlp"), ("version", "1"))
    assert samples[("edgeserve_requests_total", (("code", "OK"), *labels))] == 5
    assert samples[("edgeserve_requests_total", (("code", "INVALID_ARGUMENT"), *labels))] == 1
    batch_counts = [
        v
        for (name, lab), v in samples.items()
        if name == "edgeserve_batch_size_count" and dict(lab).get("model") == "mlp"
    ]
    assert batch_counts and batch_counts[0] >= 5
