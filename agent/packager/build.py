"""Build model archives: what ``edgeserve package`` runs.

    build_archive(model, name=..., version=..., output=...) -> Manifest
    plan_archive(...)   the same without writing: (manifest, members)

MODEL is a TorchScript file, or ``path/to/module.py:factory`` whose ``factory()`` returns
an eager ``nn.Module``; that one is (optionally) dynamically quantized, then scripted, or
traced with the example inputs when scripting fails (``scripting``). ``from_mar`` takes
the TorchScript file of a TorchServe ``.mar`` instead (``mar``). Input files and samples
are read and recorded by ``package_samples``.

Rules this module decides (documented here, reported in the manifest):

- Example inputs (``[NAME=]FILE.npy``) are the *model's* inputs: they fix the manifest's
  signature (names default to ``input__0, input__1, ...``; dtype and shape from the
  array), serve for tracing, and the outputs are named from one run on them (a tensor:
  ``output__0``; a tuple: ``output__0..``; a dict: its keys).
- Batching: whether the model batches along dim 0 is probed by running the examples
  stacked twice (every output's dim 0 must double with them). That alone decides the
  shapes: a model that batches gets ``-1`` as dim 0 of every input and output, one that
  does not keeps the examples' shapes whole and is written with ``max_batch_size`` 0
  (Triton's convention: no batch dimension; each request runs alone, as declared).
  ``--max-batch-size 0`` asks for that whatever the probe finds.
- ``max_batch_size`` is a serving bound, not a shape: the most rows one request may carry
  and the most rows the batcher combines into one model call (1: requests are never
  combined). It defaults to 8 for a model that batches; asking more than 1 of one that
  does not is an error. So ``--max-batch-size 1`` on a batching model gives ``-1`` dims
  and ``max_batch_size`` 1, and an operator may raise it later in the config without
  repackaging.
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
  ``edgeserve.serving.runtime`` for any other handler.
- Tolerance: rtol 1e-5 / atol 1e-6 for fp32, 1e-2 / 1e-2 for int8 (the expected outputs
  come from the quantized model: tolerance only absorbs kernel nondeterminism).
- ``--input-name`` / ``--output-name`` rename the model's inputs and outputs in order
  (``names``: plain, unique, one each; not with ``NAME=`` examples, a model that returns
  a dict, or a handler that serves its own signature).
- Extra files become members named by their base name; a ``.py`` handler becomes
  ``handler.py``; a ``.mar``'s ``index_to_name.json`` is kept as the labels of the image
  classifier.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from edgeserve import __version__
from edgeserve.archive.format import RESERVED_NAMES, write_archive
from edgeserve.archive.manifest import Manifest
from edgeserve.archive.mar import mar_handler, read_mar
from edgeserve.errors import ArchiveError
from edgeserve.handlers import get_handler_class
from edgeserve.packager.names import check_served, named
from edgeserve.packager.samples import InputArg, as_tensor, read_inputs, record_samples
from edgeserve.packager.scripting import (
    load_torchscript,
    pick_engine,
    run_module,
    script_eager,
    use_engine,
)
from edgeserve.serving.torch_dtypes import DATATYPE_OF_TORCH
from edgeserve.types import BatchingSettings, TensorSpec

log = logging.getLogger("edgeserve.packager")

MODEL_MEMBER = "model.pt"
HANDLER_MEMBER = "handler.py"
DEFAULT_MAX_BATCH_SIZE = 8
FP32_TOLERANCE = (1e-5, 1e-6)
QUANTIZED_TOLERANCE = (1e-2, 1e-2)


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
    input_names: Sequence[str] = (),
    output_names: Sequence[str] = (),
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
        input_names=input_names,
        output_names=output_names,
    )
    return write_archive(output, manifest, members, sign_key=sign_key)


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
    input_names: Sequence[str] = (),
    output_names: Sequence[str] = (),
) -> tuple[Manifest, dict[str, bytes | Path]]:
    """Everything ``build_archive`` does but writing: (manifest without digests, members)."""
    examples = [(f.name, as_tensor(f, "example input")) for f in read_inputs(example_inputs)]
    if quantize not in (None, "dynamic"):
        raise ArchiveError(f"--quantize: unsupported mode '{quantize}' (supported: dynamic)")
    engine = pick_engine() if quantize == "dynamic" else None
    with use_engine(engine):
        build = _load(model, name, version, from_mar, handler, handler_config, examples, engine)
        _add_handler_and_extras(build, extra_files)
        module = torch.jit.load(io.BytesIO(build.module_bytes), map_location="cpu").eval()
        if not examples:
            examples = _default_examples(build, model or str(from_mar))
        batches, batch = _batching(_probe_batching(module, examples), max_batch_size)
        inputs, outputs = _signature(module, examples, batches, input_names, output_names)
        manifest = _manifest(build, inputs, outputs, batch, max_queue_delay_ms, rtol, atol)
        manifest = replace(manifest, batches=batches)
        build.members[MODEL_MEMBER] = build.module_bytes
        if input_names or output_names:
            check_served(manifest, build.members)
        samples, sample_members = record_samples(
            manifest, module, build.members, sample_inputs, example_inputs
        )
    return replace(manifest, samples=samples), {**build.members, **sample_members}


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
        batching=BatchingSettings(
            max_batch_size=batch, max_queue_delay_ms=delay, preferred_batch_sizes=()
        ),
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
        scripted = script_eager(Path(path), factory, [t for _, t in examples], engine)
    else:
        if engine is not None:
            raise ArchiveError(
                f"--quantize: '{model}' is a TorchScript file, which cannot be "
                "quantized; give the eager module as module.py:factory"
            )
        scripted = load_torchscript(Path(model))
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


def _probe_batching(
    module: torch.jit.ScriptModule, examples: list[tuple[str | None, torch.Tensor]]
) -> bool:
    """True when every output follows the examples' dim 0 when they are stacked twice."""
    tensors = [t for _, t in examples]
    rows = {int(t.shape[0]) if t.dim() else -1 for t in tensors}
    if len(rows) != 1 or min(rows) < 1:
        return False
    single = _output_items(run_module(module, tensors, "example inputs"))
    try:
        doubled = _output_items(run_module(module, [torch.cat([t, t]) for t in tensors], "x2"))
    except ArchiveError:  # e.g. a traced reshape that fixed the batch size
        return False
    n = rows.pop()
    return len(doubled) == len(single) and all(
        a.dim() and b.dim() and a.shape[0] == n and b.shape[0] == 2 * n
        for (_, a), (_, b) in zip(single, doubled, strict=True)
    )


def _batching(batches: bool, requested: int | None) -> tuple[bool, int]:
    """(whether the model has a batch dimension, max_batch_size) from the probe and
    ``--max-batch-size`` (0: none, whatever the probe found)."""
    if requested is not None and requested < 0:
        raise ArchiveError(f"--max-batch-size: must be >= 0, got {requested}")
    if requested == 0:
        log.info("--max-batch-size 0: no batch dimension; the examples' shapes are whole")
        return False, 1
    return batches, _max_batch_size(batches, requested)


def _max_batch_size(batches: bool, requested: int | None) -> int:
    if batches:
        chosen = requested or DEFAULT_MAX_BATCH_SIZE
        log.info("the model batches along dim 0: dim 0 is -1, max_batch_size %d", chosen)
        return chosen
    if requested is not None and requested > 1:
        raise ArchiveError(
            f"--max-batch-size {requested}: the model does not batch along "
            "dim 0 of its example inputs; use --max-batch-size 0 (no batch dimension)"
        )
    log.info("the model does not batch along dim 0 of its examples: no batch dimension")
    return 1


_NAMED_BY_EXAMPLES = "the inputs are already named by NAME= in --example-input"
_NAMED_BY_KEYS = "the model returns a dict, whose keys name its outputs"


def _signature(
    module: torch.jit.ScriptModule,
    examples: list[tuple[str | None, torch.Tensor]],
    batches: bool,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    def shape(t: torch.Tensor) -> tuple[int, ...]:
        dims = tuple(int(d) for d in t.shape)
        return (-1, *dims[1:]) if batches else dims

    inputs = tuple(
        TensorSpec(n or f"input__{i}", DATATYPE_OF_TORCH[t.dtype], shape(t))
        for i, (n, t) in enumerate(examples)
    )
    result = run_module(module, [t for _, t in examples], "example inputs")
    outputs = tuple(
        TensorSpec(key, DATATYPE_OF_TORCH[t.dtype], shape(t)) for key, t in _output_items(result)
    )
    by_examples = _NAMED_BY_EXAMPLES if any(n for n, _ in examples) else ""
    by_keys = _NAMED_BY_KEYS if isinstance(result, Mapping) else ""
    return (
        named(inputs, input_names, "input", named_by=by_examples),
        named(outputs, output_names, "output", named_by=by_keys),
    )


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
