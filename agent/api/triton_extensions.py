"""Triton's model-configuration and statistics extensions: live models -> replies.

ModelConfig describes what edgeserve does, in Triton's terms (the subset of Triton's
``ModelConfig`` that has a meaning here):

* ``platform`` is ``pytorch_libtorch``, Triton's name for TorchScript models.
* ``max_batch_size`` is the batch limit the version serves with, or 0 for a model
  without a batch dimension; ``dims`` leave out the batch dimension when it is > 0 (as
  Triton's do), ``-1`` is a dimension of any size. KServe's ``BYTES`` is ``TYPE_STRING``.
* ``dynamic_batching`` (batching models only): ``max_queue_delay_microseconds`` is the
  most a request waits for others, ``preferred_batch_size`` the preferred sizes. The
  adaptive batcher waits only when the arrival rate says it pays, never longer.
* ``instance_group``: one group, ``count`` instances on the CPU (``KIND_CPU``) or on one
  GPU (``KIND_GPU`` with its index in ``gpus``).

ModelStatistics reads each version's ``ModelRecorder.totals()`` (the recorders the
Prometheus endpoint and telemetry read; nothing is counted twice), since the version
was loaded:

* ``inference_count``: rows run (a request of batch 4 counts 4); ``execution_count``:
  batches run; ``last_inference``: ms since the epoch of the last served request.
* ``inference_stats`` per request: ``success`` (OK, time in the server), ``fail`` (any
  other status), and for served requests ``queue`` (waiting for a batch),
  ``compute_input`` (request to tensors), ``compute_infer`` (the batch's service time:
  stacking, the model, splitting) and ``compute_output`` (outputs to the reply).
* ``batch_stats``: per batch size, the batches of that size and their service time in
  ``compute_infer``; edgeserve does not time a batch's input and output apart, so
  ``compute_input`` and ``compute_output`` are left out there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.serving.registry import LiveModel
from edgeserve.telemetry.recorders import Duration, Totals

PLATFORM = "pytorch_libtorch"
EXTENSIONS = ("model_configuration", "statistics")
"""The Triton extensions ServerMetadata lists: the ones implemented, nothing else."""

_DATA_TYPES = {
    "BOOL": pb.TYPE_BOOL,
    "UINT8": pb.TYPE_UINT8,
    "INT8": pb.TYPE_INT8,
    "INT16": pb.TYPE_INT16,
    "INT32": pb.TYPE_INT32,
    "INT64": pb.TYPE_INT64,
    "FP16": pb.TYPE_FP16,
    "BF16": pb.TYPE_BF16,
    "FP32": pb.TYPE_FP32,
    "FP64": pb.TYPE_FP64,
    "BYTES": pb.TYPE_STRING,
}


def model_config(live: LiveModel) -> pb.ModelConfigResponse:
    """The ModelConfig reply describing one live version."""
    batches = live.batches
    skip = 1 if batches else 0
    config = pb.ModelConfig(
        name=live.name,
        platform=PLATFORM,
        max_batch_size=live.max_batch_size if batches else 0,
        input=[
            pb.ModelInput(name=s.name, data_type=_DATA_TYPES[s.datatype], dims=s.shape[skip:])
            for s in live.inputs
        ],
        output=[
            pb.ModelOutput(name=s.name, data_type=_DATA_TYPES[s.datatype], dims=s.shape[skip:])
            for s in live.outputs
        ],
        instance_group=[_instance_group(live)],
    )
    if batches:
        settings = live.settings
        config.dynamic_batching.CopyFrom(
            pb.ModelDynamicBatching(
                preferred_batch_size=list(settings.preferred_batch_sizes or ()),
                max_queue_delay_microseconds=round((settings.max_queue_delay_ms or 0) * 1000),
            )
        )
    return pb.ModelConfigResponse(config=config)


def _instance_group(live: LiveModel) -> Any:
    count = live.settings.instances or 1
    device, _, index = live.device.partition(":")
    if device == "cuda":
        gpus = [int(index)] if index.isdigit() else [0]
        return pb.ModelInstanceGroup(count=count, kind=pb.ModelInstanceGroup.KIND_GPU, gpus=gpus)
    return pb.ModelInstanceGroup(count=count, kind=pb.ModelInstanceGroup.KIND_CPU)


def model_statistics(models: Iterable[LiveModel]) -> pb.ModelStatisticsResponse:
    """The ModelStatistics reply for these live versions, in the order given."""
    return pb.ModelStatisticsResponse(model_stats=[_statistics(live) for live in models])


def _statistics(live: LiveModel) -> pb.ModelStatistics:
    stats = pb.ModelStatistics(name=live.name, version=live.version)
    if live.recorder is None:  # a model served without recorders has no figures
        return stats
    totals: Totals = live.recorder.totals()
    stats.inference_count = totals.rows
    stats.execution_count = totals.executions
    if totals.last_served_at is not None:
        stats.last_inference = round(totals.last_served_at * 1000)
    stats.inference_stats.CopyFrom(
        pb.InferStatistics(
            success=_duration(totals.served),
            fail=_duration(totals.failed),
            queue=_duration(totals.queue),
            compute_input=_duration(totals.decode),
            compute_infer=_duration(totals.compute),
            compute_output=_duration(totals.encode),
        )
    )
    stats.batch_stats.extend(
        pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(ran))
        for size, ran in sorted(totals.by_batch_size.items())
    )
    return stats


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=round(duration.seconds * 1e9))
