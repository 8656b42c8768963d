"""From a verified model directory to a model that runs batches.

    load_model(model_dir, manifest, options) -> LoadedModel
      1. resolve the device        auto | cpu | cuda | cuda:N
      2. resolve the handler       built-in name, or a .py member of the archive
      3. quantized engine          int8 models: the manifest's engine when supported here
      4. LOADERS[manifest.format]  the one seam per model format (a torch.export .pt2 /
                                   AOTInductor loader is one more entry)
      5. handler.initialize(HandlerContext(...))
    LoadedModel.run(inputs)  one batch, from one instance thread at a time
    LoadedModel.warm_up()    the archive's samples must give their expected outputs
                             (``warmup.warm_up``)
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
  ``warmup.FP16_TOLERANCE`` (rtol, atol), or the manifest's tolerance when that is looser.

Intra-op thread budgets belong to the worker thread that calls ``run``; nothing here
changes torch's global thread settings. The quantized engine is process-global in torch:
the last model loaded sets it (logged when it changes).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeserve.archive.format import member_path
from edgeserve.archive.manifest import Manifest
from edgeserve.errors import (
    ArchiveError,
    ConfigError,
    EdgeserveError,
    InvalidArgument,
    NotReady,
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
from edgeserve.serving.torch_dtypes import TORCH_DTYPES
from edgeserve.serving.warmup import Signature, WarmupReport, last_line, warm_up
from edgeserve.types import BytesTensor, TensorSpec, TensorValue, batches_along_dim0

__all__ = [
    "LOADERS",
    "LoadedModel",
    "RuntimeOptions",
    "WarmupReport",
    "load_model",
    "member_path",
    "resolve_device",
    "served_signature",
]

log = logging.getLogger("edgeserve.serving")

DEVICE_KEY = "runtime.device"
_CUDA_RE = re.compile(r"cuda(?::(\d+))?")
_ENGINE_PREFERENCE = ("x86", "fbgemm", "qnnpack", "onednn")

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
            f"{manifest.label}: '{manifest.model_file}' is not a loadable TorchScript "
            f"file ({last_line(exc)})"
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
        self.batches = manifest.batches and batches_along_dim0(self.inputs)
        """Whether dim 0 is a batch dimension: outputs then have the inputs' rows. A model
        without one (manifest ``max_batch_size`` 0) runs each request whole, as declared."""
        self.compute_dtype = compute_dtype
        self.load_s = load_s
        self._module: torch.jit.ScriptModule | None = module
        self._handler: BaseHandler | None = handler
        self._handler_module = handler_module
        self._label = manifest.label

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
        batch = _batch_size(inputs) if self.batches else None
        try:
            with torch.inference_mode():
                outputs = handler.handle(inputs)
        except InputRejected as exc:
            raise InvalidArgument.for_input(
                self.manifest.name, exc.input_name, exc.problem
            ) from exc
        return self._check_outputs(outputs, batch)

    def warm_up(self) -> WarmupReport:
        """Run the archive's samples and check their outputs (``warmup.warm_up``)."""
        return warm_up(self)

    def close(self) -> None:
        """Drop the module and handler and give memory back; safe to call twice."""
        self._handler = None
        self._module = None
        if self._handler_module is not None:
            forget_module(self._handler_module)
            self._handler_module = None
        # No gc.collect(): a full collection holds the GIL (~0.1-0.8 s) from any thread,
        # stalling live traffic during a swap; reference counting frees the module.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
            f"{manifest.label}: format '{manifest.format}' has no loader "
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
    log.info("%s: loaded on %s in %.3fs", manifest.label, device, took)
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
            f"{manifest.label} is quantized ({mode}) and runs on the CPU only, "
            f"but device '{options.device}' was requested",
        )
    log.info("%s: quantized (%s), running on cpu rather than %s", manifest.label, mode, device)
    return torch.device("cpu")


def _compute_dtype(
    manifest: Manifest, options: RuntimeOptions, device: torch.device
) -> torch.dtype | None:
    if not options.fp16:
        return None
    if device.type != "cuda" or manifest.quantization is not None:
        log.info(
            "%s: fp16 applies to float models on CUDA only; running as is on %s",
            manifest.label,
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
            raise ArchiveError(f"{manifest.label} is quantized but this torch has no engine")
        log.warning(
            "%s: quantized engine %r is not supported here (%s); using %r",
            manifest.label,
            wanted,
            ", ".join(supported),
            engine,
        )
    if torch.backends.quantized.engine != engine:
        log.info(
            "%s: quantized engine %s (was %s)",
            manifest.label,
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
            raise ArchiveError(f"{manifest.label}: {exc}") from None
        return cls, cls, None
    if name not in manifest.files:
        raise ArchiveError(f"{manifest.label}: handler module '{name}' is not in the archive")
    safe = re.sub(r"\W", "_", f"{manifest.name}_{manifest.version}")
    module_name = f"_edgeserve_handler_{safe}_{uuid.uuid4().hex[:12]}"
    try:
        module = import_handler_module(member_path(model_dir, manifest, name), module_name)
        found, factory = find_handler(module, name)
    except HandlerModuleError as exc:
        forget_module(module_name)
        raise ArchiveError(f"{manifest.label}: {exc}") from exc
    return found, factory, module_name


def _served(handler_cls: type[BaseHandler], manifest: Manifest) -> Signature:
    try:
        signature = handler_cls.served_signature(dict(manifest.handler_config))
    except (ValueError, TypeError, KeyError) as exc:
        raise ArchiveError(f"{manifest.label}: {exc}") from exc
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
            f"{manifest.label}: handler '{manifest.handler}' failed to initialize: {exc}"
        ) from exc
    return handler
