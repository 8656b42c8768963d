"""Build model archives: what ``edgeserve package`` runs.

    build_archive(model, name=..., version=..., output=...) -> Manifest

MODEL is a TorchScript file, or ``path/to/module.py:factory`` whose ``factory()`` returns
an eager ``nn.Module``; that one is (optionally) dynamically quantized, then scripted, or
traced with the example inputs when scripting fails. ``from_mar`` takes the TorchScript
file of a TorchServe ``.mar`` instead.

Rules this module decides (documented here, reported in the manifest):

- Example inputs (``[NAME=]FILE.npy``) are the *model's* inputs: they fix the manifest's
  signature (names default to ``input__0, input__1, ...``; dtype and shape from the
  array), serve for tracing, and the outputs are named from one run on them (a tensor:
  ``output__0``; a tuple: ``output__0..``; a dict: its keys).
- Batching: ``max_batch_size`` defaults to 8 when the model batches along dim 0 (checked
  by running the examples stacked twice) and to 1 otherwise. With ``max_batch_size > 1``
  dim 0 of every input and output is ``-1``; with 1 the shapes are the examples' own.
- Without example inputs the signature cannot be inferred, except for the
  ``image_classifier`` handler, whose model input is fixed: FP32 ``[-1, 3, H, W]``
  (``handler_config.image_size``, default 224 x 224), probed with zeros. A ``.mar`` with
  the tensor handler (``base_handler``) therefore needs ``--example-input``.
- Samples are in the *served* signature (the handler's, e.g. encoded images for the
  image classifier). Sample files are taken in order, one per served input, each group
  forming one sample: for a one-input model each file is a sample. ``.npy`` files hold
  numeric tensors; any other file is one BYTES element. The default samples are the
  example inputs when the handler serves the model's own signature. Expected outputs are
  computed from the packaged module itself: in-process for the tensor handler, through
  ``edgeserve.runtime`` for any other handler.
- Tolerance: rtol 1e-5 / atol 1e-6 for fp32, 1e-2 / 1e-2 for int8 (the expected outputs
  come from the quantized model: tolerance only absorbs kernel nondeterminism).
- Extra files become members named by their base name; a ``.py`` handler becomes
  ``handler.py``; a ``.mar``'s ``index_to_name.json`` is kept as the labels of the image
  classifier.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import platform
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from edgeserve import __version__
from edgeserve.archive import RESERVED_NAMES, write_archive
from edgeserve.dtypes import DATATYPE_OF_TORCH, datatype_of_numpy
from edgeserve.errors import ArchiveError
from edgeserve.handlers import get_handler_class
from edgeserve.handlers.tensor import name_outputs
from edgeserve.manifest import BatchingDefaults, Manifest, Sample
from edgeserve.mar import mar_handler, read_mar
from edgeserve.types import BytesTensor, TensorSpec, TensorValue

log = logging.getLogger("edgeserve.packager")

InputArg = Path | str | tuple[str, Path]
"""``Path`` (positional), ``(name, Path)``, or a string ``[NAME=]FILE``."""

MODEL_MEMBER = "model.pt"
HANDLER_MEMBER = "handler.py"
DEFAULT_MAX_BATCH_SIZE = 8
FP32_TOLERANCE = (1e-5, 1e-6)
QUANTIZED_TOLERANCE = (1e-2, 1e-2)
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass
class _Build:
    """What the build has found out so far."""

    name: str
    version: str
    module_bytes: bytes
    handler: str
    handler_config: dict[str, Any]
    members: dict[str, bytes | Path] = field(default_factory=dict)
    quantization: dict[str, str] | None = None


def build_archive(
    model: str,
    *,
    name: str | None,
    version: str | None,
    output: Path,
    example_inputs: Sequence[InputArg] = (),
    sample_inputs: Sequence[InputArg] = (),
    quantize: Literal["dynamic"] | None = None,
    handler: str | None = None,
    handler_config: dict[str, Any] | None = None,
    extra_files: Sequence[Path] = (),
    max_batch_size: int | None = None,
    max_queue_delay_ms: float | None = None,
    sign_key: Path | None = None,
    from_mar: Path | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> Manifest:
    """Build and write one archive (signed with ``sign_key`` when given); its manifest."""
    manifest, members = plan_archive(
        model,
        name=name,
        version=version,
        example_inputs=example_inputs,
        sample_inputs=sample_inputs,
        quantize=quantize,
        handler=handler,
        handler_config=handler_config,
        extra_files=extra_files,
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        from_mar=from_mar,
        rtol=rtol,
        atol=atol,
    )
    return write_archive(output, manifest, members, sign_key=sign_key)


def import_mar(
    mar_path: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    example_inputs: Sequence[InputArg] = (),
) -> tuple[Manifest, dict[str, bytes | Path]]:
    """A TorchServe ``.mar`` as our (manifest, members), ready for ``write_archive``."""
    return plan_archive(
        "", name=name, version=version, from_mar=mar_path, example_inputs=example_inputs
    )


def plan_archive(
    model: str,
    *,
    name: str | None,
    version: str | None,
    example_inputs: Sequence[InputArg] = (),
    sample_inputs: Sequence[InputArg] = (),
    quantize: Literal["dynamic"] | None = None,
    handler: str | None = None,
    handler_config: dict[str, Any] | None = None,
    extra_files: Sequence[Path] = (),
    max_batch_size: int | None = None,
    max_queue_delay_ms: float | None = None,
    from_mar: Path | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> tuple[Manifest, dict[str, bytes | Path]]:
    """Everything ``build_archive`` does but writing: (manifest without digests, members)."""
    examples = [(f.name, _as_tensor(f, "example input")) for f in _read_inputs(example_inputs)]
    if quantize not in (None, "dynamic"):
        raise ArchiveError(f"--quantize: unsupported mode '{quantize}' (supported: dynamic)")
    engine = _engine() if quantize == "dynamic" else None
    with _quantized_engine(engine):
        build = _load(model, name, version, from_mar, handler, handler_config, examples, engine)
        _add_handler_and_extras(build, extra_files)
        module = torch.jit.load(io.BytesIO(build.module_bytes), map_location="cpu").eval()
        if not examples:
            examples = _default_examples(build, model or str(from_mar))
        batch = _batching(module, examples, max_batch_size)
        inputs, outputs = _signature(module, examples, batch)
        manifest = _manifest(build, inputs, outputs, batch, max_queue_delay_ms, rtol, atol)
        build.members[MODEL_MEMBER] = build.module_bytes
        samples = _samples(build, manifest, module, sample_inputs, example_inputs)
    return replace(manifest, samples=samples), build.members


def _manifest(
    build: _Build,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    batch: int,
    max_queue_delay_ms: float | None,
    rtol: float | None,
    atol: float | None,
) -> Manifest:
    tolerance = QUANTIZED_TOLERANCE if build.quantization else FP32_TOLERANCE
    delay = 2.0 if max_queue_delay_ms is None else max_queue_delay_ms
    return Manifest(
        name=build.name,
        version=build.version,
        model_file=MODEL_MEMBER,
        inputs=inputs,
        outputs=outputs,
        files={},
        handler=build.handler,
        handler_config=build.handler_config,
        batching=BatchingDefaults(batch, delay),
        quantization=build.quantization,
        rtol=tolerance[0] if rtol is None else rtol,
        atol=tolerance[1] if atol is None else atol,
        created_by=f"edgeserve {__version__}",
    )


# -- the module ---------------------------------------------------------------------------


def _load(
    model: str,
    name: str | None,
    version: str | None,
    from_mar: Path | None,
    handler: str | None,
    handler_config: dict[str, Any] | None,
    examples: list[tuple[str | None, torch.Tensor]],
    engine: str | None,
) -> _Build:
    config = dict(handler_config or {})
    if from_mar is not None:
        if engine is not None:
            raise ArchiveError(
                f"--quantize: '{from_mar}' holds TorchScript, which cannot be "
                "quantized; quantize the eager module (module.py:factory)"
            )
        return _from_mar(from_mar, name, version, handler, config)
    if not name or not version:
        raise ArchiveError("package: --name and --version are required")
    path, sep, factory = model.rpartition(":")
    if sep and path.endswith(".py"):
        scripted = _script_eager(Path(path), factory, [t for _, t in examples], engine)
    else:
        if engine is not None:
            raise ArchiveError(
                f"--quantize: '{model}' is a TorchScript file, which cannot be "
                "quantized; give the eager module as module.py:factory"
            )
        scripted = _load_torchscript(Path(model))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    quant = None if engine is None else {"mode": "dynamic", "engine": engine, "dtype": "qint8"}
    return _Build(name, version, buffer.getvalue(), handler or "tensor", config, quantization=quant)


def _from_mar(
    mar_path: Path,
    name: str | None,
    version: str | None,
    handler: str | None,
    config: dict[str, Any],
) -> _Build:
    mar = read_mar(mar_path)
    chosen = handler or mar_handler(mar.handler, str(mar_path))
    build = _Build(name or mar.name, version or mar.version, mar.model_bytes, chosen, config)
    if chosen == "image_classifier" and mar.labels is not None and "labels" not in config:
        build.members["index_to_name.json"] = mar.labels
        config["labels"] = "index_to_name.json"
    log.info(
        "imported %s: TorchServe model '%s' handler '%s' -> '%s'",
        mar_path,
        mar.name,
        mar.handler,
        chosen,
    )
    return build


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise ArchiveError(
            f"MODEL '{path}' is not a file (give a TorchScript file or module.py:factory)"
        )
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError / ValueError / pickle errors
        raise ArchiveError(
            f"MODEL '{path}' is not a TorchScript file ({type(exc).__name__}); an eager model "
            "is given as module.py:factory"
        ) from None


def _script_eager(
    path: Path, factory: str, examples: list[torch.Tensor], engine: str | None
) -> torch.jit.ScriptModule:
    what = f"{path}:{factory}"
    with _user_module(path, factory) as module:
        if engine is not None:
            module = _quantize_dynamic(module, what)
        try:
            return torch.jit.script(module)
        except Exception as exc:  # scripting fails in many ways; tracing is the fallback
            script_problem = _first_line(exc)
        if not examples:
            raise ArchiveError(
                f"MODEL '{what}' cannot be scripted ({script_problem}) and there is no "
                "--example-input to trace it with"
            )
        log.info("scripting %s failed (%s); tracing it", what, script_problem)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                traced = torch.jit.trace(module, tuple(examples))
        except Exception as exc:
            raise ArchiveError(
                f"MODEL '{what}' can be neither scripted ({script_problem}) "
                f"nor traced ({_first_line(exc)})"
            ) from None
        for item in caught:  # TracerWarnings say where the trace may not generalise
            log.warning("tracing %s: %s", what, _first_line(item.message))
        return traced


@contextlib.contextmanager
def _user_module(path: Path, factory: str) -> Iterator[torch.nn.Module]:
    """``factory()`` from the file ``path``, its module registered while it is scripted."""
    what = f"{path}:{factory}"
    if not path.is_file():
        raise ArchiveError(f"MODEL '{what}': '{path}' is not a file")
    # Named by content: the same source gives the same TorchScript type names.
    module_name = f"_edgeserve_model_{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ArchiveError(f"MODEL '{what}': cannot import '{path}'")
    source = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = source  # scripting reads class sources through sys.modules
    try:
        try:
            spec.loader.exec_module(source)
            build = getattr(source, factory, None)
            made = build() if callable(build) else None
        except Exception as exc:  # user code
            raise ArchiveError(f"MODEL '{what}' raised {type(exc).__name__}: {exc}") from exc
        if not callable(build):
            raise ArchiveError(f"MODEL '{what}': '{path}' has no callable '{factory}'")
        if not isinstance(made, torch.nn.Module):
            raise ArchiveError(
                f"MODEL '{what}' returned {type(made).__name__}, not a torch.nn.Module"
            )
        yield made.eval()
    finally:
        sys.modules.pop(module_name, None)


def _first_line(exc: object) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# -- quantization -------------------------------------------------------------------------


def _engine() -> str:
    """The quantized engine that fits this platform: x86/fbgemm, qnnpack on ARM."""
    supported = torch.backends.quantized.supported_engines
    machine = platform.machine().lower()
    arm = machine.startswith(("arm", "aarch64"))
    preferred = ("qnnpack",) if arm else ("x86", "fbgemm")
    for engine in preferred:
        if engine in supported:
            return engine
    raise ArchiveError(
        f"--quantize dynamic: this torch on {machine} supports none of "
        f"{list(preferred)} (it has {supported})"
    )


@contextlib.contextmanager
def _quantized_engine(engine: str | None) -> Iterator[None]:
    if engine is None:
        yield
        return
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _quantize_dynamic(module: torch.nn.Module, what: str) -> torch.nn.Module:
    from torch.ao.nn.quantized import dynamic as nnqd
    from torch.ao.quantization import quantize_dynamic

    layers: set[type[torch.nn.Module]] = {torch.nn.Linear, torch.nn.LSTM, torch.nn.GRU}
    with warnings.catch_warnings():
        # torch 2.13 deprecates the quantized tensor API that torch.ao dynamic quantization
        # is built on (DESIGN.md section 5); the warning says nothing about this model.
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        quantized = quantize_dynamic(module, layers, dtype=torch.qint8)
    if not any(isinstance(m, nnqd.Linear | nnqd.LSTM | nnqd.GRU) for m in quantized.modules()):
        raise ArchiveError(
            f"--quantize dynamic: MODEL '{what}' has no Linear, LSTM or GRU layer to quantize"
        )
    return quantized


# -- signature ----------------------------------------------------------------------------


def _default_examples(build: _Build, what: str) -> list[tuple[str | None, torch.Tensor]]:
    if build.handler != "image_classifier":
        raise ArchiveError(
            f"MODEL '{what}': the signature cannot be inferred without --example-input "
            f"[NAME=]FILE.npy (handler '{build.handler}')"
        )
    size = build.handler_config.get("image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return [(None, torch.zeros(1, 3, int(height), int(width)))]


def _run(module: torch.jit.ScriptModule, tensors: Sequence[torch.Tensor], what: str) -> Any:
    try:
        with torch.inference_mode():
            return module(*tensors)
    except Exception as exc:  # the model's own code
        raise ArchiveError(f"the model failed on the {what}: {_first_line(exc)}") from None


def _output_items(result: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(result, torch.Tensor):
        items = [("output__0", result)]
    elif isinstance(result, tuple | list):
        items = [(f"output__{i}", value) for i, value in enumerate(result)]
    elif isinstance(result, Mapping):
        items = [(str(key), value) for key, value in result.items()]
    else:
        raise ArchiveError(
            f"the model returned {type(result).__name__}; expected a tensor, "
            "a tuple of tensors or a dict of tensors"
        )
    for key, value in items:
        if not isinstance(value, torch.Tensor) or value.dtype not in DATATYPE_OF_TORCH:
            raise ArchiveError(
                f"model output '{key}' is {type(value).__name__}, not a tensor of a KServe datatype"
            )
    return items


def _batching(
    module: torch.jit.ScriptModule,
    examples: list[tuple[str | None, torch.Tensor]],
    requested: int | None,
) -> int:
    if requested is not None and requested < 1:
        raise ArchiveError(f"--max-batch-size: must be >= 1, got {requested}")
    if requested == 1:
        return 1
    tensors = [t for _, t in examples]
    rows = {int(t.shape[0]) if t.dim() else -1 for t in tensors}
    batches = len(rows) == 1 and min(rows) > 0
    if batches:
        single = _output_items(_run(module, tensors, "example inputs"))
        try:
            doubled = _output_items(_run(module, [torch.cat([t, t]) for t in tensors], "x2"))
        except ArchiveError:  # e.g. a traced reshape that fixed the batch size
            doubled = []
        n = rows.pop()
        batches = len(doubled) == len(single) and all(
            a.dim() and b.dim() and a.shape[0] == n and b.shape[0] == 2 * n
            for (_, a), (_, b) in zip(single, doubled, strict=True)
        )
    if batches:
        return requested or DEFAULT_MAX_BATCH_SIZE
    if requested is not None:
        raise ArchiveError(
            f"--max-batch-size {requested}: the model does not batch along "
            "dim 0 of its example inputs; use --max-batch-size 1"
        )
    log.info("the model does not batch along dim 0 of its examples: max_batch_size 1")
    return 1


def _signature(
    module: torch.jit.ScriptModule, examples: list[tuple[str | None, torch.Tensor]], batch: int
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    def shape(t: torch.Tensor) -> tuple[int, ...]:
        dims = tuple(int(d) for d in t.shape)
        return (-1, *dims[1:]) if batch > 1 else dims

    inputs = tuple(
        TensorSpec(n or f"input__{i}", DATATYPE_OF_TORCH[t.dtype], shape(t))
        for i, (n, t) in enumerate(examples)
    )
    result = _run(module, [t for _, t in examples], "example inputs")
    outputs = tuple(
        TensorSpec(key, DATATYPE_OF_TORCH[t.dtype], shape(t)) for key, t in _output_items(result)
    )
    return inputs, outputs


# -- input files --------------------------------------------------------------------------


@dataclass(frozen=True)
class _InputFile:
    name: str | None
    path: Path
    payload: np.ndarray | bytes


def _parse_input(arg: InputArg) -> tuple[str | None, Path]:
    if isinstance(arg, tuple):
        return arg[0], Path(arg[1])
    if isinstance(arg, str):
        name, sep, path = arg.partition("=")
        if sep and _NAME_RE.match(name):
            return name, Path(path)
    return None, Path(arg)


def _read_inputs(args: Sequence[InputArg]) -> list[_InputFile]:
    files = []
    for arg in args:
        name, path = _parse_input(arg)
        if name is not None and not _NAME_RE.match(name):
            raise ArchiveError(f"input name '{name}' (for '{path}') must match {_NAME_RE.pattern}")
        try:
            if path.suffix == ".npy":
                payload: np.ndarray | bytes = np.load(path, allow_pickle=False)
            else:
                payload = path.read_bytes()
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"input file '{path}' cannot be read: {_first_line(exc)}") from None
        files.append(_InputFile(name, path, payload))
    return files


def _as_tensor(file: _InputFile, what: str) -> torch.Tensor:
    if not isinstance(file.payload, np.ndarray):
        raise ArchiveError(f"{what} '{file.path}' must be a .npy file (the model's tensor)")
    array = file.payload
    try:
        datatype = datatype_of_numpy(array.dtype)
    except ValueError as exc:
        raise ArchiveError(f"{what} '{file.path}': {exc}") from None
    if datatype == "BYTES":
        raise ArchiveError(f"{what} '{file.path}' holds strings; the model takes tensors")
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="), copy=False))
    return torch.from_numpy(array)


# -- members ------------------------------------------------------------------------------


def _add_handler_and_extras(build: _Build, extras: Sequence[Path]) -> None:
    if build.handler.endswith(".py"):
        path = Path(build.handler)
        if not path.is_file():
            raise ArchiveError(f"--handler: '{path}' is not a file")
        build.members[HANDLER_MEMBER] = path
        build.handler = HANDLER_MEMBER
    else:
        try:
            get_handler_class(build.handler)
        except LookupError as exc:
            raise ArchiveError(f"--handler: {exc}") from None
    for path in extras:
        if not path.is_file():
            raise ArchiveError(f"--extra-file: '{path}' is not a file")
        taken = RESERVED_NAMES | {MODEL_MEMBER, "samples", *build.members}
        if path.name in taken:
            raise ArchiveError(f"--extra-file: member name '{path.name}' is already taken")
        build.members[path.name] = path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _put(build: _Build, base: str, value: TensorValue, output: bool) -> str:
    if isinstance(value, BytesTensor):
        if not output:
            build.members[base + ".bin"] = value.items[0]
            return base + ".bin"
        try:
            items = [item.decode("utf-8") for item in value.items]
        except UnicodeDecodeError:
            raise ArchiveError(f"sample output {base}: BYTES are not UTF-8 text") from None
        build.members[base + ".json"] = json.dumps(items).encode()
        return base + ".json"
    buffer = io.BytesIO()
    np.save(buffer, value.detach().cpu().contiguous().numpy(), allow_pickle=False)
    build.members[base + ".npy"] = buffer.getvalue()
    return base + ".npy"


def _store_sample(
    build: _Build, index: int, inputs: Mapping[str, TensorValue], outputs: Mapping[str, TensorValue]
) -> Sample:
    return Sample(
        inputs={
            n: _put(build, f"samples/{index}/input.{_safe(n)}", v, False) for n, v in inputs.items()
        },
        outputs={
            n: _put(build, f"samples/{index}/output.{_safe(n)}", v, True)
            for n, v in outputs.items()
        },
    )


# -- samples ------------------------------------------------------------------------------


def _group(files: list[_InputFile], specs: tuple[TensorSpec, ...]) -> list[dict[str, TensorValue]]:
    """Files in order, one per input, make one sample per group."""
    names = [spec.name for spec in specs]
    if len(files) % len(specs):
        raise ArchiveError(
            f"sample inputs: {len(files)} file(s) do not form whole samples of "
            f"{len(specs)} input(s) {names}"
        )
    by_name = {spec.name: spec for spec in specs}
    groups = []
    for start in range(0, len(files), len(specs)):
        values: dict[str, TensorValue] = {}
        for position, file in enumerate(files[start : start + len(specs)]):
            spec = by_name.get(file.name) if file.name else specs[position]
            if spec is None or spec.name in values:
                raise ArchiveError(
                    f"sample input '{file.path}': name '{file.name}' is unknown "
                    f"or repeated (inputs: {names})"
                )
            values[spec.name] = _sample_value(file, spec)
        groups.append(values)
    return groups


def _sample_value(file: _InputFile, spec: TensorSpec) -> TensorValue:
    if spec.datatype == "BYTES":
        if not isinstance(file.payload, bytes):
            raise ArchiveError(
                f"sample input '{file.path}' for BYTES input '{spec.name}' must "
                "be a raw file (an encoded image, say), not .npy"
            )
        return BytesTensor([file.payload], (1,))
    tensor = _as_tensor(file, "sample input")
    found = DATATYPE_OF_TORCH[tensor.dtype]
    fits = len(spec.shape) == tensor.dim() and all(
        d in (-1, s) for d, s in zip(spec.shape, tensor.shape, strict=True)
    )
    if found != spec.datatype or not fits:
        raise ArchiveError(
            f"sample input '{file.path}' is {found} {list(tensor.shape)}; input '{spec.name}' "
            f"is {spec.datatype} {list(spec.shape)}"
        )
    return tensor


def _samples(
    build: _Build,
    manifest: Manifest,
    module: torch.jit.ScriptModule,
    sample_inputs: Sequence[InputArg],
    example_inputs: Sequence[InputArg],
) -> tuple[Sample, ...]:
    if build.handler == "tensor":
        groups = _group(_read_inputs(sample_inputs or example_inputs), manifest.inputs)
        samples = []
        for index, inputs in enumerate(groups):
            result = _run(module, [inputs[s.name] for s in manifest.inputs], f"sample {index}")
            try:
                outputs = name_outputs(result, manifest.outputs)
            except ValueError as exc:
                raise ArchiveError(f"sample {index}: {exc}") from None
            samples.append(_store_sample(build, index, inputs, outputs))
        return tuple(samples)
    with _runtime_model(build, manifest) as loaded:
        own = (loaded.inputs, loaded.outputs) == (manifest.inputs, manifest.outputs)
        files = _read_inputs(sample_inputs or (example_inputs if own else ()))
        samples = []
        for index, inputs in enumerate(_group(files, loaded.inputs)):
            try:
                outputs = loaded.run(inputs)
            except Exception as exc:  # handler or model code
                raise ArchiveError(
                    f"handler '{build.handler}' failed on sample {index}: {_first_line(exc)}"
                ) from None
            samples.append(_store_sample(build, index, inputs, outputs))
        return tuple(samples)


@contextlib.contextmanager
def _runtime_model(build: _Build, manifest: Manifest) -> Iterator[Any]:
    """The archive-to-be, unpacked in a temporary directory and loaded by the runtime."""
    from edgeserve.runtime import RuntimeOptions, load_model

    with tempfile.TemporaryDirectory(prefix="edgeserve-package-") as tmp:
        root = Path(tmp)
        files = {}
        for name, content in build.members.items():
            data = content if isinstance(content, bytes) else content.read_bytes()
            target = root.joinpath(*name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            files[name] = hashlib.sha256(data).hexdigest()
        try:
            loaded = load_model(
                root, replace(manifest, files=files), RuntimeOptions(device="cpu", warmup=False)
            )
        except Exception as exc:  # the runtime's own errors and handler initialisation
            raise ArchiveError(
                f"the runtime cannot load this archive: {_first_line(exc)}"
            ) from None
        try:
            yield loaded
        finally:
            loaded.close()
