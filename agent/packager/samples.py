"""The packager's input files and samples: reading ``[NAME=]FILE`` arguments, grouping
sample files into samples, and recording each sample's expected outputs.

    read_inputs(args)                          files in order: ``.npy`` arrays, else raw bytes
    as_tensor(file, what)                      a ``.npy`` file as a tensor of a KServe dtype
    record_samples(manifest, module, members,  (samples, new members): inputs and expected
                   sample_inputs, example_inputs)  outputs under ``samples/<i>/``

Rules (``packager``'s docstring has the whole list):

- Samples are in the *served* signature (the handler's, e.g. encoded images for the
  image classifier). Sample files are taken in order, one per served input, each group
  forming one sample; a file given as ``NAME=FILE`` goes to that input. ``.npy`` files
  hold numeric tensors; any other file is one BYTES element.
- Without sample files the samples are the example inputs, when the handler serves the
  model's own signature.
- Expected outputs come from the packaged module itself: run in-process for the tensor
  handler, through ``edgeserve.serving.runtime`` (the archive-to-be unpacked in a temporary
  directory) for any other handler, so they are what the daemon will produce.
- Stored members: ``.npy`` for numeric tensors; a BYTES input as a raw file holding one
  element; a BYTES output as a JSON list of UTF-8 strings (``manifest.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeserve.archive.manifest import Manifest, Sample
from edgeserve.dtypes import datatype_of_numpy
from edgeserve.errors import ArchiveError
from edgeserve.handlers.tensor import name_outputs
from edgeserve.packager.scripting import first_line, run_module
from edgeserve.serving.torch_dtypes import DATATYPE_OF_TORCH
from edgeserve.types import BytesTensor, TensorSpec, TensorValue

InputArg = Path | str | tuple[str, Path]
"""``Path`` (positional), ``(name, Path)``, or a string ``[NAME=]FILE``."""

Members = dict[str, bytes | Path]
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


# -- input files --------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One ``[NAME=]FILE`` argument, read: a numpy array (``.npy``) or the file's bytes."""

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


def read_inputs(args: Sequence[InputArg]) -> list[InputFile]:
    """Read every argument in order; ArchiveError naming the file that cannot be read."""
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
            raise ArchiveError(f"input file '{path}' cannot be read: {first_line(exc)}") from None
        files.append(InputFile(name, path, payload))
    return files


def as_tensor(file: InputFile, what: str) -> torch.Tensor:
    """A ``.npy`` file's array as a native-byte-order tensor; ``what`` names it in errors."""
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


# -- grouping -----------------------------------------------------------------------------


def _numeric(value: TensorValue, name: str, index: int) -> torch.Tensor:
    if isinstance(value, BytesTensor):  # a TorchScript model takes tensors, never bytes
        raise ArchiveError(
            f"sample {index}: input '{name}' is BYTES; the tensor handler needs .npy"
        )
    return value


def _group(files: list[InputFile], specs: tuple[TensorSpec, ...]) -> list[dict[str, TensorValue]]:
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


def _sample_value(file: InputFile, spec: TensorSpec) -> TensorValue:
    if spec.datatype == "BYTES":
        if not isinstance(file.payload, bytes):
            raise ArchiveError(
                f"sample input '{file.path}' for BYTES input '{spec.name}' must "
                "be a raw file (an encoded image, say), not .npy"
            )
        return BytesTensor([file.payload], (1,))
    tensor = as_tensor(file, "sample input")
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


# -- expected outputs ---------------------------------------------------------------------


def record_samples(
    manifest: Manifest,
    module: torch.jit.ScriptModule,
    members: Mapping[str, bytes | Path],
    sample_inputs: Sequence[InputArg],
    example_inputs: Sequence[InputArg],
) -> tuple[tuple[Sample, ...], Members]:
    """The samples and the members that hold them, outputs computed from ``module``.

    ``members`` are the archive's other members (model, handler, extra files): a handler
    other than ``tensor`` loads from them in the runtime.
    """
    recorded: Members = {}
    if manifest.handler == "tensor":
        groups = _group(read_inputs(sample_inputs or example_inputs), manifest.inputs)
        samples = []
        for index, inputs in enumerate(groups):
            tensors = [_numeric(inputs[s.name], s.name, index) for s in manifest.inputs]
            result = run_module(module, tensors, f"sample {index}")
            try:
                outputs = name_outputs(result, manifest.outputs)
            except ValueError as exc:
                raise ArchiveError(f"sample {index}: {exc}") from None
            samples.append(_store_sample(recorded, index, inputs, outputs))
        return tuple(samples), recorded
    with runtime_model(manifest, members) as loaded:
        own = (loaded.inputs, loaded.outputs) == (manifest.inputs, manifest.outputs)
        files = read_inputs(sample_inputs or (example_inputs if own else ()))
        samples = []
        for index, inputs in enumerate(_group(files, loaded.inputs)):
            try:
                outputs = loaded.run(inputs)
            except Exception as exc:  # handler or model code
                raise ArchiveError(
                    f"handler '{manifest.handler}' failed on sample {index}: {first_line(exc)}"
                ) from None
            samples.append(_store_sample(recorded, index, inputs, outputs))
        return tuple(samples), recorded


@contextlib.contextmanager
def runtime_model(manifest: Manifest, members: Mapping[str, bytes | Path]) -> Iterator[Any]:
    """The archive-to-be, unpacked in a temporary directory and loaded by the runtime."""
    from edgeserve.serving.runtime import RuntimeOptions, load_model

    with tempfile.TemporaryDirectory(prefix="edgeserve-package-") as tmp:
        root = Path(tmp)
        files = {}
        for name, content in members.items():
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
            raise ArchiveError(f"the runtime cannot load this archive: {first_line(exc)}") from None
        try:
            yield loaded
        finally:
            loaded.close()


# -- members ------------------------------------------------------------------------------


def _store_sample(
    members: Members,
    index: int,
    inputs: Mapping[str, TensorValue],
    outputs: Mapping[str, TensorValue],
) -> Sample:
    return Sample(
        inputs={
            n: _put(members, f"samples/{index}/input.{_safe(n)}", v, False)
            for n, v in inputs.items()
        },
        outputs={
            n: _put(members, f"samples/{index}/output.{_safe(n)}", v, True)
            for n, v in outputs.items()
        },
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _put(members: Members, base: str, value: TensorValue, output: bool) -> str:
    if isinstance(value, BytesTensor):
        if not output:
            members[base + ".bin"] = value.items[0]
            return base + ".bin"
        try:
            items = [item.decode("utf-8") for item in value.items]
        except UnicodeDecodeError:
            raise ArchiveError(f"sample output {base}: BYTES are not UTF-8 text") from None
        members[base + ".json"] = json.dumps(items).encode()
        return base + ".json"
    buffer = io.BytesIO()
    np.save(buffer, value.detach().cpu().contiguous().numpy(), allow_pickle=False)
    members[base + ".npy"] = buffer.getvalue()
    return base + ".npy"
