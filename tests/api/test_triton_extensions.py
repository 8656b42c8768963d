"""Triton's ModelConfig and ModelStatistics, through stock tritonclient against a real daemon.

One daemon (``edgeserve serve`` in a child process) serves four packaged models:

* ``mlp``: batches along dim 0; its config entry sets max_batch_size 16, a 3 ms queue
  delay, preferred sizes [4, 8] and 2 instances, which ModelConfig must show;
* ``batches``: the same MLP behind a handler that writes one file per batch it runs,
  named by the batch's rows and sleeping 5 ms so concurrent requests pile up, so the
  test knows every batch size the model saw and compares ModelStatistics with them;
* ``sum0``: ``x.sum(0)`` on a (3, 4) example, packaged with ``--max-batch-size 0``: no
  batch dimension (Triton's ``max_batch_size: 0``), and not as many output rows as input;
* ``mlp_int8``: the MLP dynamically quantized to int8 (its signature stays FP32);
* ``named``: the MLP packaged with ``--input-name INPUT0 --output-name OUTPUT0``.
"""

from __future__ import annotations

import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from tests.cli.support import edgeserve_ok, package, package_argv
from tests.conftest import DaemonFactory, RunningDaemon

SUM0_SOURCE = """\
import torch
from torch import nn


class Sum0(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(0)


def build() -> nn.Module:
    return Sum0()
"""

BATCH_FILES_HANDLER = """\
import time
import uuid
from pathlib import Path

from edgeserve.handlers.tensor import TensorHandler


class BatchFiles(TensorHandler):
    def inference(self, data):
        folder = Path(self.context.config["batch_dir"])
        (folder / f"{int(data[0].shape[0])}-{uuid.uuid4().hex}").touch()
        time.sleep(0.005)
        return super().inference(data)
"""


@dataclass
class Served:
    daemon: RunningDaemon
    batch_dir: Path

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(url=self.daemon.tcp)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    signing_key: tuple[Path, Path],
    mlp_archive_factory: Callable[..., Path],
    mlp_source: Path,
    mlp_example: Path,
) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("triton-ext")
    batch_dir = folder / "batches"
    batch_dir.mkdir()
    handler = folder / "batch_files.py"
    handler.write_text(BATCH_FILES_HANDLER)
    source = folder / "sum0.py"
    source.write_text(SUM0_SOURCE)
    example = folder / "x34.npy"
    np.save(example, np.arange(12, dtype=np.float32).reshape(3, 4))
    sum0 = package(
        f"{source}:build",
        name="sum0",
        version="1",
        output=folder / "sum0.esar",
        example_inputs=[("x", example)],
        max_batch_size=0,
        sign_key=signing_key[0],
    )
    mlp = mlp_archive_factory("1", max_batch_size=8)
    recorded = mlp_archive_factory(
        "1", name="batches", handler=str(handler), handler_config={"batch_dir": str(batch_dir)}
    )
    int8 = mlp_archive_factory("1", quantize="dynamic", name="mlp_int8")
    named = folder / "named.esar"
    edgeserve_ok(
        *package_argv(
            f"{mlp_source}:build",
            name="named",
            version="1",
            output=named,
            example_inputs=[mlp_example],
            sign_key=signing_key[0],
        ),
        *("--input-name", "INPUT0", "--output-name", "OUTPUT0"),
    )
    factory = DaemonFactory(folder, signing_key[1])
    config = textwrap.dedent(f"""\
        models:
          - archive: {mlp}
            batching:
              max_batch_size: 16
              max_queue_delay_ms: 3.0
              preferred_batch_sizes: [4, 8]
              instances: 2
        """)
    try:
        daemon = factory.start(recorded, sum0, int8, named, extra_config=config)
        yield Served(daemon, batch_dir)
    finally:
        factory.stop_all()


# -- ModelConfig --------------------------------------------------------------------------


def _config(served: Served, name: str, version: str = "") -> mc.ModelConfig:
    with served.client() as client:
        return client.get_model_config(name, version).config


def _tensors(tensors) -> list[tuple[str, str, list[int]]]:
    return [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors]


def test_config_of_a_batching_model_says_how_it_batches(served: Served) -> None:
    config = _config(served, "mlp")
    assert (config.name, config.platform, config.max_batch_size) == ("mlp", "pytorch_libtorch", 16)
    # dims leave the batch dimension out, as Triton's do.
    assert _tensors(config.input) == [("x", "TYPE_FP32", [16])]
    assert _tensors(config.output) == [("output__0", "TYPE_FP32", [4])]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 3000
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    (group,) = config.instance_group
    assert (group.count, mc.ModelInstanceGroup.Kind.Name(group.kind)) == (2, "KIND_CPU")


def test_config_of_a_model_without_a_batch_dimension(served: Served) -> None:
    config = _config(served, "sum0")
    assert config.max_batch_size == 0
    assert _tensors(config.input) == [("x", "TYPE_FP32", [3, 4])]
    assert _tensors(config.output) == [("output__0", "TYPE_FP32", [4])]
    # Triton has no dynamic batching without a batch dimension; nor has edgeserve.
    assert config.WhichOneof("scheduling_choice") is None
    (group,) = config.instance_group
    assert (group.count, mc.ModelInstanceGroup.Kind.Name(group.kind)) == (1, "KIND_CPU")


def test_config_of_an_int8_model_keeps_its_float_signature(served: Served) -> None:
    config = _config(served, "mlp_int8", "1")
    assert (config.name, config.platform, config.max_batch_size) == (
        "mlp_int8",
        "pytorch_libtorch",
        8,
    )
    assert _tensors(config.input) == [("x", "TYPE_FP32", [16])]
    assert _tensors(config.output) == [("output__0", "TYPE_FP32", [4])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000


def test_config_shows_the_names_the_user_chose(served: Served) -> None:
    config = _config(served, "named")
    assert _tensors(config.input) == [("INPUT0", "TYPE_FP32", [16])]
    assert _tensors(config.output) == [("OUTPUT0", "TYPE_FP32", [4])]


def test_config_and_metadata_agree_with_each_other(served: Served) -> None:
    with served.client() as client:
        for name in ("mlp", "sum0", "mlp_int8", "batches", "named"):
            config = client.get_model_config(name).config
            metadata = client.get_model_metadata(name)
            batch = [-1] if config.max_batch_size else []
            shapes = [(t.name, list(t.shape)) for t in metadata.inputs]
            assert shapes == [(t.name, batch + list(t.dims)) for t in config.input], name
            assert [t.datatype for t in metadata.inputs] == [
                mc.DataType.Name(t.data_type).removeprefix("TYPE_") for t in config.input
            ]


@pytest.mark.parametrize(
    ("name", "version"), [("nope", ""), ("mlp", "7")], ids=["model", "version"]
)
def test_config_of_an_unknown_model_or_version_is_not_found(
    served: Served, name: str, version: str
) -> None:
    with served.client() as client, pytest.raises(InferenceServerException) as info:
        client.get_model_config(name, version)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert f"'{name}'" in info.value.message()


def test_server_metadata_lists_the_extensions_it_implements(served: Served) -> None:
    with served.client() as client:
        extensions = list(client.get_server_metadata().extensions)
    assert extensions == ["model_configuration", "statistics"]


# -- ModelStatistics ----------------------------------------------------------------------


def _infer(url: str, name: str, rows: int, count: int) -> None:
    x = np.random.default_rng(rows).standard_normal((rows, 16)).astype(np.float32)
    with triton.InferenceServerClient(url=url) as client:
        for _ in range(count):
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            assert client.infer(name, [tensor]).as_numpy("output__0").shape == (rows, 4)


def _stats(served: Served, name: str = "", version: str = ""):
    with served.client() as client:
        return client.get_inference_statistics(name, version).model_stats


def _ms_now() -> int:
    return int(time.time() * 1000)


def test_statistics_count_what_was_sent_and_the_batches_that_ran(served: Served) -> None:
    for leftover in served.batch_dir.iterdir():  # warm-up and the thread probe ran it too
        leftover.unlink()
    (before,) = _stats(served, "batches")
    assert (before.inference_count, before.execution_count) == (0, 0)
    assert before.inference_stats.success.count == 0 and before.last_inference == 0
    started_ms = _ms_now()
    # 8 clients at once, so that the batcher forms batches of several requests.
    jobs = [(1, 15)] * 6 + [(2, 10)] * 2  # (rows per request, requests)
    with ThreadPoolExecutor(len(jobs)) as pool:
        for done in [pool.submit(_infer, served.daemon.tcp, "batches", r, n) for r, n in jobs]:
            done.result()
    with served.client() as client:  # three requests the model refuses (wrong shape)
        for _ in range(3):
            bad = triton.InferInput("x", [1, 5], "FP32")
            bad.set_data_from_numpy(np.zeros((1, 5), np.float32))
            with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT|x"):
                client.infer("batches", [bad])
    finished_ms = _ms_now()

    (stats,) = _stats(served, "batches", "1")
    requests = sum(n for _, n in jobs)
    rows = sum(r * n for r, n in jobs)
    seen = Counter(int(p.name.split("-")[0]) for p in served.batch_dir.iterdir())
    assert (stats.name, stats.version) == ("batches", "1")
    assert stats.inference_count == rows == sum(size * n for size, n in seen.items())
    assert stats.execution_count == sum(seen.values())
    assert max(seen) > 2, f"no batching happened: {seen}"  # the test would prove little
    batch_stats = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert batch_stats == dict(seen)
    infer = stats.inference_stats
    assert infer.success.count == requests
    assert infer.fail.count == 3 and infer.fail.ns > 0
    for phase in (infer.queue, infer.compute_input, infer.compute_infer, infer.compute_output):
        assert phase.count == requests
        assert phase.ns > 0
    # Phases lie inside the request's time in the server; the model sleeps 5 ms a batch.
    phases = (infer.queue, infer.compute_input, infer.compute_infer, infer.compute_output)
    assert sum(p.ns for p in phases) <= infer.success.ns * 1.01
    assert infer.compute_infer.ns >= requests * 5_000_000
    per_batch = sum(b.compute_infer.ns for b in stats.batch_stats)
    assert stats.execution_count * 5_000_000 <= per_batch <= infer.compute_infer.ns
    assert started_ms <= stats.last_inference <= finished_ms


def test_a_model_without_a_batch_dimension_counts_one_inference_per_request(
    served: Served,
) -> None:
    with served.client() as client:
        for _ in range(3):
            x = triton.InferInput("x", [3, 4], "FP32")
            x.set_data_from_numpy(np.ones((3, 4), np.float32))
            assert client.infer("sum0", [x]).as_numpy("output__0").tolist() == [3.0] * 4
    (stats,) = _stats(served, "sum0")
    assert stats.inference_stats.success.count == 3
    assert (stats.inference_count, stats.execution_count) == (3, 3)
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(1, 3)]


def test_statistics_of_every_model_and_of_each_version(served: Served) -> None:
    _infer(served.daemon.tcp, "mlp_int8", 1, 2)
    every = {(s.name, s.version) for s in _stats(served)}
    assert every == {(n, "1") for n in ("mlp", "batches", "sum0", "mlp_int8", "named")}
    (int8,) = _stats(served, "mlp_int8")
    assert int8.inference_stats.success.count >= 2
    assert int8.inference_count >= 2 and int8.execution_count >= 1


@pytest.mark.parametrize(
    ("name", "version", "status"),
    [
        ("nope", "", "StatusCode.NOT_FOUND"),
        ("mlp", "7", "StatusCode.NOT_FOUND"),
        ("", "1", "StatusCode.INVALID_ARGUMENT"),
    ],
    ids=["model", "version", "version-without-model"],
)
def test_statistics_refusals(served: Served, name: str, version: str, status: str) -> None:
    with served.client() as client, pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics(name, version)
    assert info.value.status() == status
