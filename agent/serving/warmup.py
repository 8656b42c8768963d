"""Warm-up: before a model is served, its archive's samples must give their expected outputs.

    warm_up(model) -> WarmupReport     ``LoadedModel.warm_up`` delegates here
    load_sample(model_dir, manifest, sample, signature=...) -> (inputs, expected outputs)

``warm_up`` runs each sample through ``model.run`` (the handler and the module, as a
request would) and compares every expected output: numeric tensors by shape and
``torch.allclose`` under the manifest's tolerance, BYTES outputs element by element.
The first mismatch, or a run that raises, is a ``WarmupCheckFailed`` (a ``WarmupFailed``)
naming the model, the sample and the output; its ``reason`` says the same without the
model's own error text or any output value (what a telemetry event may carry). Without
samples, one synthetic batch of zeros (one row where dim 0 is ``-1``) primes the kernels
when every input is numeric; nothing is compared.

Under fp16 (``model.compute_dtype``) the comparison uses at least ``FP16_TOLERANCE``,
since samples are usually recorded in fp32.

Sample members: numeric tensors are ``.npy`` files (no pickles); a BYTES input is a raw
file holding one element (shape [1]); a BYTES output is a JSON list of strings (nested
lists are flattened in row-major order). Reading one that does not fit the signature is
an ``ArchiveError``. This module needs only something that runs batches (``Runnable``),
not the runtime itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from edgeserve.archive.format import member_path
from edgeserve.archive.manifest import Manifest, Sample
from edgeserve.dtypes import datatype_of_numpy
from edgeserve.errors import ArchiveError, WarmupFailed
from edgeserve.jsonsafe import parse_json
from edgeserve.serving.torch_dtypes import TORCH_DTYPES
from edgeserve.types import BytesTensor, TensorSpec, TensorValue

log = logging.getLogger("edgeserve.serving")

FP16_TOLERANCE = (1e-2, 1e-2)
"""The least (rtol, atol) a warm-up under fp16 compares with."""

Signature = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]
Tensors = dict[str, TensorValue]


class Runnable(Protocol):
    """What warm-up needs of a loaded model (``runtime.LoadedModel`` is one)."""

    manifest: Manifest
    model_dir: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    compute_dtype: torch.dtype | None

    def run(self, inputs: Mapping[str, TensorValue]) -> Tensors: ...


class WarmupCheckFailed(WarmupFailed):
    """A warm-up run raised or gave the wrong output; ``reason`` is safe to send away."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        """E.g. ``sample 0 output 'y' does not match``, ``sample 1 raised ValueError``."""


@dataclass(frozen=True)
class WarmupReport:
    samples: int
    """Samples run and checked against their expected outputs."""
    synthetic: bool
    """True when there were no samples and one batch of zeros primed the kernels."""
    durations_s: tuple[float, ...]
    """Wall time of each run, in order."""
    max_abs_error: dict[str, float]
    """Worst absolute error of each numeric output over all samples."""

    @property
    def total_s(self) -> float:
        return sum(self.durations_s)


def warm_up(model: Runnable) -> WarmupReport:
    """Run every sample and compare with its expected outputs (WarmupFailed if not).

    Without samples, one synthetic batch of zeros primes the kernels when every input
    is numeric; nothing is compared then.
    """
    manifest = model.manifest
    if not manifest.samples:
        return _synthetic(model)
    rtol, atol = manifest.rtol, manifest.atol
    if model.compute_dtype == torch.float16:
        rtol, atol = max(rtol, FP16_TOLERANCE[0]), max(atol, FP16_TOLERANCE[1])
    durations: list[float] = []
    worst: dict[str, float] = {}
    for index, sample in enumerate(manifest.samples):
        inputs, expected = load_sample(
            model.model_dir, manifest, sample, signature=(model.inputs, model.outputs)
        )
        started = time.perf_counter()
        outputs = _run(model, inputs, f"sample {index}")
        durations.append(time.perf_counter() - started)
        for name, want in expected.items():
            error, problem = _compare(outputs[name], want, rtol, atol)
            if error is not None:
                worst[name] = max(worst.get(name, 0.0), error)
            if problem is not None:
                raise WarmupCheckFailed(
                    f"{manifest.label} failed warm-up: sample {index} output '{name}': {problem}",
                    f"sample {index} output '{name}' does not match",
                )
    log.info(
        "%s: %d warm-up sample(s) passed in %.3fs", manifest.label, len(durations), sum(durations)
    )
    return WarmupReport(len(durations), False, tuple(durations), worst)


def representative_inputs(model: Runnable) -> Mapping[str, TensorValue] | None:
    """One real batch the model accepts: its first sample, else zeros; None if neither."""
    manifest = model.manifest
    if manifest.samples:
        inputs, _ = load_sample(
            model.model_dir, manifest, manifest.samples[0], signature=(model.inputs, model.outputs)
        )
        return inputs
    if any(spec.datatype not in TORCH_DTYPES for spec in model.inputs):
        return None
    return {
        spec.name: torch.zeros(
            [1 if d < 0 else d for d in spec.shape], dtype=TORCH_DTYPES[spec.datatype]
        )
        for spec in model.inputs
    }


def _synthetic(model: Runnable) -> WarmupReport:
    label = model.manifest.label
    inputs = representative_inputs(model)
    if inputs is None:
        log.info("%s: no samples and non-numeric inputs: no warm-up run", label)
        return WarmupReport(0, False, (), {})
    started = time.perf_counter()
    _run(model, inputs, "the synthetic batch")
    took = time.perf_counter() - started
    log.info("%s: no samples; one synthetic batch ran in %.3fs", label, took)
    return WarmupReport(0, True, (took,), {})


def _run(model: Runnable, inputs: Mapping[str, TensorValue], what: str) -> Tensors:
    try:
        return model.run(inputs)
    except Exception as exc:
        raise WarmupCheckFailed(
            f"{model.manifest.label} failed warm-up: {what} raised {type(exc).__name__}: "
            f"{last_line(exc)}",
            f"{what} raised {type(exc).__name__}",
        ) from exc


# -- samples ------------------------------------------------------------------------------


def load_sample(
    model_dir: Path, manifest: Manifest, sample: Sample, *, signature: Signature
) -> tuple[Tensors, Tensors]:
    """A sample's (inputs, expected outputs), read from the model directory.

    Names follow ``signature``, the served one (``runtime.served_signature``): the
    handler's when it has its own, else the manifest's.
    """
    inputs_sig, outputs_sig = signature
    inputs = _read_side(model_dir, manifest, sample.inputs, inputs_sig, "input")
    missing = [spec.name for spec in inputs_sig if spec.name not in inputs]
    if missing:
        raise ArchiveError(f"{manifest.label}: a sample lacks input(s) {missing}")
    return inputs, _read_side(model_dir, manifest, sample.outputs, outputs_sig, "output")


def _read_side(
    model_dir: Path,
    manifest: Manifest,
    members: Mapping[str, str],
    specs: tuple[TensorSpec, ...],
    side: str,
) -> Tensors:
    by_name = {spec.name: spec for spec in specs}
    tensors: Tensors = {}
    for name, member in members.items():
        spec = by_name.get(name)
        if spec is None:
            raise ArchiveError(
                f"{manifest.label}: sample member '{member}' is for {side} '{name}', "
                f"which is not in the signature ({sorted(by_name)})"
            )
        try:
            path = member_path(model_dir, manifest, member)
            tensors[name] = _read_tensor(path, spec, side == "output")
        except (OSError, ValueError) as exc:
            raise ArchiveError(
                f"{manifest.label}: sample member '{member}' ({side} '{name}'): {exc}"
            ) from exc
    return tensors


_MAX_SAMPLE_JSON_BYTES = 16 * 1024 * 1024


def _read_tensor(path: Path, spec: TensorSpec, is_output: bool) -> TensorValue:
    if spec.datatype == "BYTES":
        if not is_output:
            return BytesTensor([path.read_bytes()], (1,))
        # An archive's sample: bounded like its manifest (JsonRefused is a ValueError).
        items = _flatten(parse_json(path.read_bytes(), max_bytes=_MAX_SAMPLE_JSON_BYTES))
        return BytesTensor([item.encode() for item in items], (len(items),))
    array = np.load(path, allow_pickle=False)
    array = array.astype(array.dtype.newbyteorder("="), copy=False)
    found = datatype_of_numpy(array.dtype)
    if found != spec.datatype:
        raise ValueError(f"holds {found}, the signature says {spec.datatype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _flatten(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for part in value for item in _flatten(part)]
    raise ValueError(f"expected a JSON list of strings, found {type(value).__name__}")


# -- comparison ---------------------------------------------------------------------------


def _compare(
    actual: TensorValue, expected: TensorValue, rtol: float, atol: float
) -> tuple[float | None, str | None]:
    """(max abs error or None, problem or None) of one output against its expectation."""
    if isinstance(expected, BytesTensor):
        if not isinstance(actual, BytesTensor):
            return None, f"is {type(actual).__name__}, expected BYTES"
        if actual.items != expected.items:
            return None, f"got {_preview(actual.items)}, expected {_preview(expected.items)}"
        return None, None
    if not isinstance(actual, torch.Tensor):
        return None, "is BYTES, expected a numeric tensor"
    if tuple(actual.shape) != tuple(expected.shape):
        return None, f"shape {list(actual.shape)}, expected {list(expected.shape)}"
    got, want = actual.double(), expected.double()
    error = float((got - want).abs().max()) if got.numel() else 0.0
    if torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        return error, None
    return error, f"max abs error {error:.3g} exceeds the tolerance (rtol {rtol:g}, atol {atol:g})"


def _preview(items: list[bytes], limit: int = 5) -> str:
    shown = [item.decode("utf-8", "replace") for item in items[:limit]]
    return f"{shown}{' ...' if len(items) > limit else ''} ({len(items)} items)"


def last_line(exc: BaseException, limit: int = 300) -> str:
    """The telling line of an error (TorchScript puts a traceback before it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
