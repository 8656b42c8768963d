"""From a verified model directory to a model that runs batches, and its warm-up check.

    load_model(model_dir, manifest, options) -> LoadedModel
      1. resolve the device        auto | cpu | cuda | cuda:N
      2. resolve the handler       built-in name, or a .py member of the archive
      3. quantized engine          int8 models: the manifest's engine when supported here
      4. LOADERS[manifest.format]  the one seam per model format (a torch.export .pt2 /
                                   AOTInductor loader is one more entry)
      5. handler.initialize(HandlerContext(...))
    LoadedModel.run(inputs)  one batch, from one instance thread at a time
    LoadedModel.warm_up()    the archive's samples must give their expected outputs
    LoadedModel.close()

Device policy:

- ``auto`` is cuda:0 when torch sees a GPU, else cpu.
- int8-quantized models (``torch.ao`` dynamic or static) have CPU kernels only. With
  ``auto`` they run on the CPU (logged); an explicit ``cuda`` is refused with a
  ConfigError naming the model, since the operator asked for something we cannot do.
- ``fp16`` applies on CUDA only: the module is cast with ``half()``, the handler casts
  float inputs (``HandlerContext.compute_dtype``) and ``run`` casts float outputs back to
  the signature's dtype. On a CPU it is ignored (logged), so one config fits a mixed fleet.
  Samples are usually recorded in fp32, so under fp16 warm-up compares with at least
  ``FP16_TOLERANCE`` (rtol, atol), or the manifest's tolerance when that is looser.

Intra-op thread budgets belong to the worker thread that calls ``run``; nothing here
changes torch's global thread settings. The quantized engine is process-global in torch:
the last model loaded sets it (logged when it changes).
"""

from __future__ import annotations

import gc
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeserve.dtypes import TORCH_DTYPES, datatype_of_numpy
from edgeserve.errors import (
    ArchiveError,
    ConfigError,
    EdgeserveError,
    InvalidArgument,
    NotReady,
    WarmupFailed,
)
from edgeserve.handlers import get_handler_class
from edgeserve.handlers._custom import (
    HandlerFactory,
    HandlerModuleError,
    find_handler,
    forget_module,
    import_handler_module,
)
from edgeserve.handlers.base import BaseHandler, HandlerContext, InputRejected
from edgeserve.manifest import Manifest, Sample
from edgeserve.types import BytesTensor, TensorSpec, TensorValue

__all__ = [
    "LOADERS",
    "LoadedModel",
    "RuntimeOptions",
    "WarmupReport",
    "load_model",
    "load_sample",
    "member_path",
    "resolve_device",
    "served_signature",
]

log = logging.getLogger("edgeserve.runtime")

DEVICE_KEY = "runtime.device"
_CUDA_RE = re.compile(r"cuda(?::(\d+))?")
_ENGINE_PREFERENCE = ("x86", "fbgemm", "qnnpack", "onednn")
FP16_TOLERANCE = (1e-2, 1e-2)

Signature = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]
# A loader turns a model directory into a module on the device (eval mode).
Loader = Callable[[Path, Manifest, torch.device], torch.jit.ScriptModule]


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"
    """auto | cpu | cuda | cuda:N; auto picks cuda:0 when a GPU is present."""
    fp16: bool = False
    """Run float models in half precision; applies on CUDA only (ignored on a CPU)."""
    warmup: bool = True
    """Run the archive's samples (or one synthetic batch) before the model is served."""


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


def resolve_device(spec: str, key: str = DEVICE_KEY) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a device present here; ConfigError otherwise."""
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_RE.fullmatch(text)
    if match is None:
        raise ConfigError(key, f"device must be auto, cpu, cuda or cuda:N, got '{spec}'")
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        raise ConfigError(
            key, f"device '{spec}' requested but torch sees no CUDA GPU on this machine"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            key, f"device '{spec}' requested but only {count} GPU(s) exist (cuda:0..{count - 1})"
        )
    return torch.device("cuda", index)


def _load_torchscript(
    model_dir: Path, manifest: Manifest, device: torch.device
) -> torch.jit.ScriptModule:
    try:
        path = member_path(model_dir, manifest, manifest.model_file)
        module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ArchiveError(
            f"{_label(manifest)}: '{manifest.model_file}' is not a loadable TorchScript "
            f"file ({_last_line(exc)})"
        ) from exc
    return module.eval()


LOADERS: dict[str, Loader] = {"torchscript": _load_torchscript}


class LoadedModel:
    """A model module with its handler on one device: runs batches, checks outputs."""

    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path,
        device: torch.device,
        module: torch.jit.ScriptModule,
        handler: BaseHandler,
        signature: Signature,
        *,
        compute_dtype: torch.dtype | None = None,
        handler_module: str | None = None,
        load_s: float = 0.0,
    ) -> None:
        self.manifest = manifest
        self.model_dir = model_dir
        self.device = device
        self.inputs, self.outputs = signature
        """The served signature: what clients send and get (handler's, else the model's)."""
        self.compute_dtype = compute_dtype
        self.load_s = load_s
        self._module: torch.jit.ScriptModule | None = module
        self._handler: BaseHandler | None = handler
        self._handler_module = handler_module
        self._label = _label(manifest)

    @property
    def handler(self) -> BaseHandler:
        if self._handler is None:
            raise NotReady.model(self.manifest.name, self.manifest.version, "closed")
        return self._handler

    @property
    def module(self) -> torch.jit.ScriptModule:
        if self._module is None:
            raise NotReady.model(self.manifest.name, self.manifest.version, "closed")
        return self._module

    def run(self, inputs: Mapping[str, TensorValue]) -> dict[str, TensorValue]:
        """One batch through the handler; outputs on the CPU, contiguous, checked.

        Handler and model exceptions propagate unchanged (the worker logs them and
        answers with a fixed message); ``InputRejected`` becomes ``InvalidArgument``.
        """
        handler = self.handler
        batch = _batch_size(inputs)
        try:
            with torch.inference_mode():
                outputs = handler.handle(inputs)
        except InputRejected as exc:
            raise InvalidArgument.for_input(
                self.manifest.name, exc.input_name, exc.problem
            ) from exc
        return self._check_outputs(outputs, batch)

    def warm_up(self) -> WarmupReport:
        """Run every sample and compare with its expected outputs (WarmupFailed if not).

        Without samples, one synthetic batch of zeros primes the kernels when every input
        is numeric; nothing is compared then.
        """
        manifest = self.manifest
        if not manifest.samples:
            return self._synthetic_warm_up()
        rtol, atol = manifest.rtol, manifest.atol
        if self.compute_dtype == torch.float16:
            rtol, atol = max(rtol, FP16_TOLERANCE[0]), max(atol, FP16_TOLERANCE[1])
        durations: list[float] = []
        worst: dict[str, float] = {}
        for index, sample in enumerate(manifest.samples):
            inputs, expected = load_sample(
                self.model_dir, manifest, sample, signature=(self.inputs, self.outputs)
            )
            started = time.perf_counter()
            outputs = self._warm_run(inputs, f"sample {index}")
            durations.append(time.perf_counter() - started)
            for name, want in expected.items():
                error, problem = _compare(outputs[name], want, rtol, atol)
                if error is not None:
                    worst[name] = max(worst.get(name, 0.0), error)
                if problem is not None:
                    raise WarmupFailed(
                        f"{self._label} failed warm-up: sample {index} output '{name}': {problem}"
                    )
        log.info(
            "%s: %d warm-up sample(s) passed in %.3fs", self._label, len(durations), sum(durations)
        )
        return WarmupReport(len(durations), False, tuple(durations), worst)

    def close(self) -> None:
        """Drop the module and handler and give memory back; safe to call twice."""
        self._handler = None
        self._module = None
        if self._handler_module is not None:
            forget_module(self._handler_module)
            self._handler_module = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _synthetic_warm_up(self) -> WarmupReport:
        if any(spec.datatype not in TORCH_DTYPES for spec in self.inputs):
            log.info("%s: no samples and non-numeric inputs: no warm-up run", self._label)
            return WarmupReport(0, False, (), {})
        inputs: dict[str, TensorValue] = {
            spec.name: torch.zeros(
                [1 if d < 0 else d for d in spec.shape], dtype=TORCH_DTYPES[spec.datatype]
            )
            for spec in self.inputs
        }
        started = time.perf_counter()
        self._warm_run(inputs, "the synthetic batch")
        took = time.perf_counter() - started
        log.info("%s: no samples; one synthetic batch ran in %.3fs", self._label, took)
        return WarmupReport(0, True, (took,), {})

    def _warm_run(self, inputs: Mapping[str, TensorValue], what: str) -> dict[str, TensorValue]:
        try:
            return self.run(inputs)
        except Exception as exc:
            raise WarmupFailed(
                f"{self._label} failed warm-up: {what} raised {type(exc).__name__}: "
                f"{_last_line(exc)}"
            ) from exc

    def _check_outputs(self, outputs: object, batch: int | None) -> dict[str, TensorValue]:
        if not isinstance(outputs, Mapping):
            raise self._contract(f"handler returned {type(outputs).__name__}, not a dict")
        result: dict[str, TensorValue] = {}
        for spec in self.outputs:
            value = outputs.get(spec.name)
            if isinstance(value, torch.Tensor) and spec.datatype != "BYTES":
                value = self._to_host(value, spec)
                rows = int(value.shape[0]) if value.dim() else None
            elif isinstance(value, BytesTensor) and spec.datatype == "BYTES":
                rows = value.batch_size
            else:
                got = "nothing" if value is None else type(value).__name__
                raise self._contract(f"output '{spec.name}' ({spec.datatype}) is {got}")
            if batch is not None and rows != batch:
                raise self._contract(f"output '{spec.name}' has {rows} rows for a batch of {batch}")
            result[spec.name] = value
        return result

    def _to_host(self, value: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
        if value.device.type != "cpu":
            value = value.cpu()
        want = TORCH_DTYPES.get(spec.datatype)
        if value.dtype != want:
            if want is None or not (
                self.compute_dtype is not None
                and value.is_floating_point()
                and want.is_floating_point
            ):
                raise self._contract(
                    f"output '{spec.name}' is {value.dtype}, the signature says {spec.datatype}"
                )
            value = value.to(want)
        return value if value.is_contiguous() else value.contiguous()

    def _contract(self, problem: str) -> EdgeserveError:
        return EdgeserveError(f"{self._label}: handler broke the output contract: {problem}")

    def __repr__(self) -> str:
        return f"LoadedModel({self._label} on {self.device})"


def load_model(model_dir: Path, manifest: Manifest, options: RuntimeOptions) -> LoadedModel:
    """Load a verified model directory (the store checked every member's hash)."""
    started = time.perf_counter()
    loader = LOADERS.get(manifest.format)
    if loader is None:
        raise ArchiveError(
            f"{_label(manifest)}: format '{manifest.format}' has no loader "
            f"(known: {', '.join(sorted(LOADERS))})"
        )
    device = _place(manifest, options)
    compute_dtype = _compute_dtype(manifest, options, device)
    handler_cls, make_handler, module_name = _resolve_handler(model_dir, manifest)
    try:
        signature = _served(handler_cls, manifest)
        _select_engine(manifest)
        module = loader(model_dir, manifest, device)
        if compute_dtype is not None:
            module = module.half()
        handler = _initialize(make_handler, module, device, model_dir, manifest, compute_dtype)
    except BaseException:
        if module_name is not None:
            forget_module(module_name)
        raise
    took = time.perf_counter() - started
    log.info("%s: loaded on %s in %.3fs", _label(manifest), device, took)
    return LoadedModel(
        manifest,
        model_dir,
        device,
        module,
        handler,
        signature,
        compute_dtype=compute_dtype,
        handler_module=module_name,
        load_s=took,
    )


def served_signature(model_dir: Path, manifest: Manifest) -> Signature:
    """What clients see: the handler's served signature, else the manifest's own."""
    handler_cls, _, module_name = _resolve_handler(model_dir, manifest)
    try:
        return _served(handler_cls, manifest)
    finally:
        if module_name is not None:
            forget_module(module_name)


def load_sample(
    model_dir: Path,
    manifest: Manifest,
    sample: Sample,
    *,
    signature: Signature | None = None,
) -> tuple[dict[str, TensorValue], dict[str, TensorValue]]:
    """A sample's (inputs, expected outputs), read from the model directory.

    Numeric tensors are ``.npy`` files (no pickles); a BYTES input is a raw file holding
    one element (shape [1]); a BYTES output is a JSON list of strings (nested lists are
    flattened in row-major order). Names follow the served signature, resolved from the
    handler unless ``signature`` is given.
    """
    inputs_sig, outputs_sig = signature or served_signature(model_dir, manifest)
    inputs = _read_side(model_dir, manifest, sample.inputs, inputs_sig, "input")
    missing = [spec.name for spec in inputs_sig if spec.name not in inputs]
    if missing:
        raise ArchiveError(f"{_label(manifest)}: a sample lacks input(s) {missing}")
    return inputs, _read_side(model_dir, manifest, sample.outputs, outputs_sig, "output")


def _read_side(
    model_dir: Path,
    manifest: Manifest,
    members: Mapping[str, str],
    specs: tuple[TensorSpec, ...],
    side: str,
) -> dict[str, TensorValue]:
    by_name = {spec.name: spec for spec in specs}
    tensors: dict[str, TensorValue] = {}
    for name, member in members.items():
        spec = by_name.get(name)
        if spec is None:
            raise ArchiveError(
                f"{_label(manifest)}: sample member '{member}' is for {side} '{name}', "
                f"which is not in the signature ({sorted(by_name)})"
            )
        try:
            path = member_path(model_dir, manifest, member)
            tensors[name] = _read_tensor(path, spec, side == "output")
        except (OSError, ValueError) as exc:
            raise ArchiveError(
                f"{_label(manifest)}: sample member '{member}' ({side} '{name}'): {exc}"
            ) from exc
    return tensors


def _read_tensor(path: Path, spec: TensorSpec, is_output: bool) -> TensorValue:
    if spec.datatype == "BYTES":
        if not is_output:
            return BytesTensor([path.read_bytes()], (1,))
        items = _flatten(json.loads(path.read_text(encoding="utf-8")))
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


def member_path(model_dir: Path, manifest: Manifest, member: str) -> Path:
    """The file of an archive member; ArchiveError unless listed and inside ``model_dir``.

    The store has verified the directory already; this is a second, cheap guard.
    """
    root = model_dir.resolve()
    path = (root / member).resolve()
    if member not in manifest.files or not path.is_relative_to(root):
        raise ArchiveError(f"{_label(manifest)}: '{member}' is not a member of the archive")
    return path


def _last_line(exc: BaseException, limit: int = 300) -> str:
    """The telling line of an error (TorchScript puts a traceback before it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label(manifest: Manifest) -> str:
    return f"model '{manifest.name}' version '{manifest.version}'"


def _batch_size(inputs: Mapping[str, TensorValue]) -> int | None:
    for value in inputs.values():
        if isinstance(value, BytesTensor):
            return value.batch_size
        return int(value.shape[0]) if value.dim() else None
    return None


def _place(manifest: Manifest, options: RuntimeOptions) -> torch.device:
    device = resolve_device(options.device)
    if manifest.quantization is None or device.type != "cuda":
        return device
    mode = manifest.quantization.get("mode", "int8")
    if options.device.strip().lower() != "auto":
        raise ConfigError(
            DEVICE_KEY,
            f"{_label(manifest)} is quantized ({mode}) and runs on the CPU only, "
            f"but device '{options.device}' was requested",
        )
    log.info("%s: quantized (%s), running on cpu rather than %s", _label(manifest), mode, device)
    return torch.device("cpu")


def _compute_dtype(
    manifest: Manifest, options: RuntimeOptions, device: torch.device
) -> torch.dtype | None:
    if not options.fp16:
        return None
    if device.type != "cuda" or manifest.quantization is not None:
        log.info(
            "%s: fp16 applies to float models on CUDA only; running as is on %s",
            _label(manifest),
            device,
        )
        return None
    return torch.float16


def _select_engine(manifest: Manifest) -> None:
    if manifest.quantization is None:
        return
    wanted = manifest.quantization.get("engine")
    supported = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    engine = wanted if wanted in supported else None
    if engine is None:
        engine = next((e for e in _ENGINE_PREFERENCE if e in supported), None)
        if engine is None:
            raise ArchiveError(f"{_label(manifest)} is quantized but this torch has no engine")
        log.warning(
            "%s: quantized engine %r is not supported here (%s); using %r",
            _label(manifest),
            wanted,
            ", ".join(supported),
            engine,
        )
    if torch.backends.quantized.engine != engine:
        log.info(
            "%s: quantized engine %s (was %s)",
            _label(manifest),
            engine,
            torch.backends.quantized.engine,
        )
        torch.backends.quantized.engine = engine


def _resolve_handler(
    model_dir: Path, manifest: Manifest
) -> tuple[type[BaseHandler], HandlerFactory, str | None]:
    name = manifest.handler
    if not name.endswith(".py"):
        try:
            cls = get_handler_class(name)
        except LookupError as exc:
            raise ArchiveError(f"{_label(manifest)}: {exc}") from None
        return cls, cls, None
    if name not in manifest.files:
        raise ArchiveError(f"{_label(manifest)}: handler module '{name}' is not in the archive")
    safe = re.sub(r"\W", "_", f"{manifest.name}_{manifest.version}")
    module_name = f"_edgeserve_handler_{safe}_{uuid.uuid4().hex[:12]}"
    try:
        module = import_handler_module(member_path(model_dir, manifest, name), module_name)
        found, factory = find_handler(module, name)
    except HandlerModuleError as exc:
        forget_module(module_name)
        raise ArchiveError(f"{_label(manifest)}: {exc}") from exc
    return found, factory, module_name


def _served(handler_cls: type[BaseHandler], manifest: Manifest) -> Signature:
    try:
        signature = handler_cls.served_signature(dict(manifest.handler_config))
    except (ValueError, TypeError, KeyError) as exc:
        raise ArchiveError(f"{_label(manifest)}: {exc}") from exc
    return signature if signature is not None else (manifest.inputs, manifest.outputs)


def _initialize(
    make_handler: HandlerFactory,
    module: torch.jit.ScriptModule,
    device: torch.device,
    model_dir: Path,
    manifest: Manifest,
    compute_dtype: torch.dtype | None,
) -> BaseHandler:
    context = HandlerContext(
        model=module,
        device=device,
        inputs=manifest.inputs,
        outputs=manifest.outputs,
        model_dir=model_dir,
        config=dict(manifest.handler_config),
        compute_dtype=compute_dtype,
    )
    try:
        handler = make_handler()
        handler.initialize(context)
    except EdgeserveError:
        raise
    except Exception as exc:
        raise ArchiveError(
            f"{_label(manifest)}: handler '{manifest.handler}' failed to initialize: {exc}"
        ) from exc
    return handler
