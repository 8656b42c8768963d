"""Adaptive batching through the real daemon: requests share batches, results find their caller."""

from __future__ import annotations

import queue
from functools import partial
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as triton

from tests.e2e.test_serve import _reference

# Records each batch's size as a file name, and takes a few ms so that batches can form.
RECORDING_HANDLER = """\
import time
import uuid
from pathlib import Path

from edgeserve.handlers.tensor import TensorHandler


class RecordingHandler(TensorHandler):
    def inference(self, data):
        rows = int(data[0].shape[0])
        (Path(self.context.config["record_dir"]) / f"{rows}-{uuid.uuid4().hex}").touch()
        time.sleep(0.005)
        return super().inference(data)
"""


def _batch_sizes(record_dir: Path, before: set[str] = frozenset()) -> list[int]:
    return [int(p.name.split("-")[0]) for p in record_dir.iterdir() if p.name not in before]


def test_stream_requests_share_batches_and_come_back_to_their_ids(
    daemons, mlp_archive_factory, mlp_source, tmp_path
):
    record_dir = tmp_path / "batches"
    record_dir.mkdir()
    handler = tmp_path / "recording.py"
    handler.write_text(RECORDING_HANDLER)
    archive = mlp_archive_factory(
        "1",
        name="rec",
        handler=str(handler),
        handler_config={"record_dir": str(record_dir)},
        max_batch_size=16,
    )
    daemon = daemons.start(archive, extra_config="batching:\n  max_queue_delay_ms: 5\n")
    warmup = {p.name for p in record_dir.iterdir()}  # packaging and warm-up ran it too
    results: queue.Queue = queue.Queue()

    def on_result(sink, result, error):
        sink.put((result, error))

    inputs = {i: np.full((1, 16), i / 64.0, dtype=np.float32) for i in range(64)}
    with triton.InferenceServerClient(url=daemon.tcp) as client:
        client.start_stream(callback=partial(on_result, results))
        for i, x in inputs.items():
            inp = triton.InferInput("x", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer("rec", [inp], request_id=str(i))
        bad = triton.InferInput("x", [1, 15], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 15), dtype=np.float32))
        client.async_stream_infer("rec", [bad], request_id="bad")
        got = [results.get(timeout=60) for _ in range(65)]
        client.stop_stream()

    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "input 'x'" in str(errors[0])
    served = {r.get_response().id: r.as_numpy("output__0") for r, e in got if e is None}
    assert sorted(served) == sorted(str(i) for i in inputs)
    reference = _reference(mlp_source)
    with torch.inference_mode():
        for i, x in inputs.items():
            expected = reference(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(served[str(i)], expected, rtol=1e-5, atol=1e-5)
    sizes = _batch_sizes(record_dir, warmup)
    assert sum(sizes) == 64
    assert max(sizes) > 1, f"no request shared a batch: {sorted(sizes)}"
    assert max(sizes) <= 16
