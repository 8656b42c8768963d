"""KServe v2 protobuf <-> edgeserve types: the one place where messages become tensors.

Requests are validated against the live model's signature before anything is queued,
and every error names the input (or output) at fault. Two paths:

* raw (``raw_input_contents``, what tritonclient sends): numeric inputs become tensors
  that are views over the request's bytes (``np.frombuffer(...).reshape(shape)`` then
  ``torch.from_numpy``: no copy, the tensor keeps the bytes object alive, and one torch
  call per input where ``torch.frombuffer(...).reshape(...)`` makes two; every such call
  releases the GIL, which costs a thread switch under load). BYTES inputs are split from the
  length-prefixed wire format (4-byte little-endian length, then the element). Outputs
  go back as raw bytes with one copy (``Tensor.numpy().tobytes()``: protobuf's bytes
  fields accept only ``bytes``, not memoryviews).
* typed (``contents``): the slow path for hand-written clients; a request that sends
  typed contents gets typed contents back, unless an output has no typed field (FP16,
  BF16), in which case every output goes back raw (KServe allows one or the other).

Tensors over ``bytes`` and torch's warning: torch warns, once per process, that a tensor
over a read-only buffer is writable anyway (under ``filterwarnings = error`` that first
warning would fail a request). Writable is acceptable here: protobuf hands out a fresh
bytes object on every field access, so the buffer belongs to this request alone, and a
model that writes into its input writes into memory no one else reads. The exception is
CPython's shared empty and one-byte bytes objects, which are copied. The warning is
consumed once at import, where it is ignored, so the hot path pays nothing; the
alternative, ``bytearray(data)`` per input, is a full copy of every request.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import numpy as np
import torch

from edgeserve.dtypes import NUMPY_DTYPES
from edgeserve.errors import EdgeserveError, InvalidArgument, MessageTooLarge
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.serving.registry import LiveModel
from edgeserve.serving.torch_dtypes import DATATYPE_OF_TORCH, TORCH_DTYPES
from edgeserve.types import (
    DATATYPE_SIZES,
    BytesTensor,
    InferRequest,
    InferResult,
    TensorSpec,
    TensorValue,
)

# datatype -> the InferTensorContents field that carries it (FP16 / BF16 have none).
TYPED_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# The numpy dtype each typed field decodes into before narrowing to the datatype.
_FIELD_DTYPES: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_NARROW_RANGES: dict[str, tuple[int, int]] = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "UINT8": (0, 2**8 - 1),
}
# numpy views are the cheapest zero-copy route from bytes to a shaped tensor.
_RAW_DTYPES: dict[str, np.dtype] = NUMPY_DTYPES
_LENGTH = struct.Struct("<I")
_MIXED_HINT = " (use one or the other for all inputs)"
_OutputTensor = pb.ModelInferResponse.InferOutputTensor
_TensorMetadata = pb.ModelMetadataResponse.TensorMetadata


def _consume_readonly_buffer_warnings() -> None:
    """Trigger torch's once-per-process read-only buffer warnings where they are ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(np.frombuffer(b"\x00\x00", np.uint8))


_consume_readonly_buffer_warnings()


# -- requests ---------------------------------------------------------------------------


def request_uses_raw(msg: pb.ModelInferRequest) -> bool:
    """True when the reply should carry raw contents (the request did, or had no inputs)."""
    return bool(msg.raw_input_contents) or not msg.inputs


def decode_infer_request(
    msg: pb.ModelInferRequest,
    model: LiveModel,
    deadline: float | None = None,
    *,
    max_bytes: int | None = None,
) -> InferRequest:
    """Validate ``msg`` against ``model``'s signature and turn it into an InferRequest.

    ``deadline`` is an absolute ``time.monotonic()``; ``max_bytes`` bounds the decoded
    size of all inputs together (typed contents can expand, e.g. varint -> INT64).
    """
    tensors, batch = _decode_inputs(msg, model, max_bytes)
    return InferRequest(
        model=model.name,
        version=model.version,
        inputs=tensors,
        request_id=msg.id,
        requested_outputs=_requested_outputs(msg, model),
        deadline=deadline,
        batch_size=batch,
    )


def _decode_inputs(
    msg: pb.ModelInferRequest, model: LiveModel, max_bytes: int | None
) -> tuple[dict[str, TensorValue], int]:
    """The validated input tensors by name, and the request's batch size (dim 0)."""
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidArgument(
            f"model '{model.name}': raw_input_contents has {len(raw)} entries "
            f"for {len(msg.inputs)} inputs (one entry per input, in order)"
        )
    tensors: dict[str, TensorValue] = {}
    batch = total = 0
    for i, inp in enumerate(msg.inputs):
        spec = _declared_input(model, inp.name, tensors)
        shape = _checked_shape(model, spec, inp)
        batch = _shared_batch(model, spec, shape, batch if i else None)
        if not raw:
            tensor = _tensor_from_contents(model.name, spec, shape, inp.contents)
        elif inp.HasField("contents"):
            problem = "has typed contents while the request uses raw_input_contents"
            raise InvalidArgument.for_input(model.name, spec.name, problem + _MIXED_HINT)
        else:
            tensor = _tensor_from_raw(model.name, spec, shape, raw[i])
        tensors[spec.name] = tensor
        if max_bytes is not None:
            total += _nbytes(tensor)
            if total > max_bytes:
                raise MessageTooLarge(
                    f"model '{model.name}': decoded inputs exceed {max_bytes} bytes "
                    f"at input '{spec.name}'"
                )
    if len(tensors) != len(model.inputs):
        missing = [s.name for s in model.inputs if s.name not in tensors]
        raise InvalidArgument.for_input(model.name, missing[0], "is missing from the request")
    return tensors, max(batch, 1)


def _shared_batch(
    model: LiveModel, spec: TensorSpec, shape: tuple[int, ...], first: int | None
) -> int:
    """dim 0 of this input; when the model batches, it must equal the first input's."""
    batch = shape[0] if shape else 1
    if first is None or not model.batches or batch == first:
        return batch if first is None else first
    raise InvalidArgument.for_input(
        model.name,
        spec.name,
        f"batch size {batch} differs from {first} of the first input "
        "(all inputs of a request share dim 0)",
    )


def _declared_input(model: LiveModel, name: str, seen: dict[str, TensorValue]) -> TensorSpec:
    spec = model.input_spec(name)
    if spec is None:
        declared = ", ".join(s.name for s in model.inputs) or "none"
        raise InvalidArgument.for_input(
            model.name, name, f"is not an input of this model (inputs: {declared})"
        )
    if name in seen:
        raise InvalidArgument.for_input(model.name, name, "appears more than once")
    return spec


def _checked_shape(
    model: LiveModel, spec: TensorSpec, inp: pb.ModelInferRequest.InferInputTensor
) -> tuple[int, ...]:
    if inp.datatype != spec.datatype:
        problem = f"datatype must be {spec.datatype}, got {inp.datatype or '(none)'}"
        raise InvalidArgument.for_input(model.name, spec.name, problem)
    shape = tuple(inp.shape)
    want = spec.shape
    if shape != want:
        if len(shape) != len(want):
            _raise_shape(model, spec, shape)
        for got, exp in zip(shape, want, strict=True):
            if got < 0 or (exp >= 0 and got != exp):
                _raise_shape(model, spec, shape)
    if shape and model.batches and not 1 <= shape[0] <= model.max_batch_size:
        problem = f"batch size {shape[0]} (dim 0) is outside 1..{model.max_batch_size}"
        raise InvalidArgument.for_input(model.name, spec.name, problem + " (max_batch_size)")
    return shape


def _raise_shape(model: LiveModel, spec: TensorSpec, shape: tuple[int, ...]) -> NoReturn:
    problem = f"shape {list(shape)} does not match {list(spec.shape)} (-1 = any size)"
    raise InvalidArgument.for_input(model.name, spec.name, problem)


def _tensor_from_raw(
    model_name: str, spec: TensorSpec, shape: tuple[int, ...], data: bytes
) -> TensorValue:
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        return BytesTensor(_split_elements(model_name, spec.name, data, count), shape)
    expected = count * DATATYPE_SIZES[spec.datatype]
    if len(data) != expected:
        problem = (
            f"raw_input_contents holds {len(data)} bytes, expected {expected} "
            f"({count} x {spec.datatype} for shape {list(shape)})"
        )
        raise InvalidArgument.for_input(model_name, spec.name, problem)
    buffer: bytes | bytearray = data
    if expected <= 1:
        if expected == 0:
            return torch.empty(shape, dtype=TORCH_DTYPES[spec.datatype])
        buffer = bytearray(data)  # CPython shares one-byte bytes objects process-wide
    if spec.datatype == "BF16":  # numpy has no bfloat16: carry the bits as int16
        array = np.frombuffer(buffer, np.int16).reshape(shape)
        return torch.from_numpy(array).view(torch.bfloat16)
    array = np.frombuffer(buffer, _RAW_DTYPES[spec.datatype]).reshape(shape)
    if spec.datatype == "BOOL" and int(array.view(np.uint8).max()) > 1:
        raise InvalidArgument.for_input(model_name, spec.name, "BOOL elements must be 0 or 1")
    return torch.from_numpy(array)


def _split_elements(model_name: str, input_name: str, data: bytes, count: int) -> list[bytes]:
    """Split the KServe length-prefixed BYTES format into ``count`` elements."""
    items: list[bytes] = []
    pos, end = 0, len(data)
    unpack = _LENGTH.unpack_from
    while pos < end:
        index = len(items)
        if index == count:
            problem = f"raw BYTES data holds more than the {count} elements of its shape"
            raise InvalidArgument.for_input(model_name, input_name, problem)
        if pos + 4 > end:
            problem = f"raw BYTES element {index}: truncated 4-byte length prefix"
            raise InvalidArgument.for_input(model_name, input_name, problem)
        (length,) = unpack(data, pos)
        pos += 4
        if pos + length > end:
            problem = (
                f"raw BYTES element {index} declares {length} bytes but only {end - pos} remain"
            )
            raise InvalidArgument.for_input(model_name, input_name, problem)
        items.append(data[pos : pos + length])
        pos += length
    if len(items) != count:
        problem = f"raw BYTES data holds {len(items)} elements, expected {count}"
        raise InvalidArgument.for_input(model_name, input_name, problem)
    return items


def _tensor_from_contents(
    model_name: str, spec: TensorSpec, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> TensorValue:
    field = TYPED_FIELDS.get(spec.datatype)
    if field is None:
        problem = f"datatype {spec.datatype} has no typed contents field; send it raw"
        raise InvalidArgument.for_input(model_name, spec.name, problem)
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        problem = f"contents.{field} holds {len(values)} elements, expected {count}"
        raise InvalidArgument.for_input(model_name, spec.name, problem)
    if field == "bytes_contents":
        return BytesTensor(list(values), shape)
    array = np.asarray(values, dtype=_FIELD_DTYPES[field])
    limits = _NARROW_RANGES.get(spec.datatype)
    if limits is not None and count and (array.min() < limits[0] or array.max() > limits[1]):
        problem = f"contents.{field} has values outside the {spec.datatype} range {list(limits)}"
        raise InvalidArgument.for_input(model_name, spec.name, problem)
    return torch.from_numpy(array.astype(NUMPY_DTYPES[spec.datatype], copy=False).reshape(shape))


def _requested_outputs(msg: pb.ModelInferRequest, model: LiveModel) -> tuple[str, ...] | None:
    if not msg.outputs:
        return None
    names = tuple(out.name for out in msg.outputs)
    for name in names:
        if model.output_spec(name) is None:
            declared = ", ".join(s.name for s in model.outputs) or "none"
            raise InvalidArgument(
                f"model '{model.name}' has no output '{name}' (outputs: {declared})"
            )
    return names


def _nbytes(tensor: TensorValue) -> int:
    if isinstance(tensor, BytesTensor):
        return sum(len(item) for item in tensor.items)
    return tensor.numel() * tensor.element_size()


# -- responses --------------------------------------------------------------------------


def encode_infer_response(
    result: InferResult,
    model: LiveModel,
    *,
    raw: bool = True,
    requested: Sequence[str] | None = None,
    request_id: str | None = None,
) -> pb.ModelInferResponse:
    """The reply for ``result``: the requested outputs (all when None), raw or typed."""
    response = pb.ModelInferResponse(
        model_name=model.name,
        model_version=model.version,
        id=result.request_id if request_id is None else request_id,
    )
    names: Iterable[str] = requested or result.outputs.keys()
    outputs = [(name, _output(model, result, name)) for name in names]
    if raw or not all(_datatype(model, n, v) in TYPED_FIELDS for n, v in outputs):
        _add_raw_outputs(response, model, outputs)
    else:
        _add_typed_outputs(response, model, outputs)
    return response


def _output(model: LiveModel, result: InferResult, name: str) -> TensorValue:
    try:
        value = result.outputs[name]
    except KeyError:
        raise EdgeserveError(
            f"model '{model.name}' version '{model.version}' produced no output '{name}'"
        ) from None
    if isinstance(value, BytesTensor):
        return value
    # Property reads only: torch calls that make a tensor or an array (numpy, reshape,
    # contiguous, from_numpy) release and retake the GIL, a thread switch whenever gRPC's
    # poller or a worker thread wants it. The one left per output is .numpy(); strided
    # tensors need no .contiguous() because ndarray.tobytes() writes C order.
    if not value.is_cpu:
        value = value.cpu()
    return value.detach() if value.requires_grad else value


def _datatype(model: LiveModel, name: str, value: TensorValue) -> str:
    if isinstance(value, BytesTensor):
        return "BYTES"
    datatype = DATATYPE_OF_TORCH.get(value.dtype)
    if datatype is None:
        raise EdgeserveError(
            f"model '{model.name}' version '{model.version}' output '{name}' has dtype "
            f"{value.dtype}, which KServe v2 cannot carry"
        )
    return datatype


def _add_raw_outputs(
    response: pb.ModelInferResponse, model: LiveModel, outputs: list[tuple[str, TensorValue]]
) -> None:
    add = response.outputs.add
    append = response.raw_output_contents.append
    for name, value in outputs:
        if isinstance(value, BytesTensor):
            add(name=name, datatype="BYTES", shape=value.shape)
            append(join_elements(value.items))
            continue
        add(name=name, datatype=_datatype(model, name, value), shape=tuple(value.shape))
        if value.dtype is torch.bfloat16:  # numpy has no bfloat16: same bits as int16
            value = value.view(torch.int16)
        append(value.numpy().tobytes())


def _add_typed_outputs(
    response: pb.ModelInferResponse, model: LiveModel, outputs: list[tuple[str, TensorValue]]
) -> None:
    for name, value in outputs:
        datatype = _datatype(model, name, value)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=value.shape)
        field = getattr(tensor.contents, TYPED_FIELDS[datatype])
        if isinstance(value, BytesTensor):
            field.extend(value.items)
        else:
            field.extend(value.reshape(-1).tolist())


def join_elements(items: Iterable[bytes | str]) -> bytes:
    """The KServe length-prefixed BYTES format: per element a <u32 length, then the bytes."""
    parts: list[bytes] = []
    pack = _LENGTH.pack
    for item in items:
        data = item.encode() if isinstance(item, str) else item
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)


# -- metadata ---------------------------------------------------------------------------


def encode_model_metadata(model: LiveModel, versions: Sequence[str]) -> pb.ModelMetadataResponse:
    """ModelMetadata for one version; ``versions`` lists every live version of the name."""
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=list(versions),
        platform=model.platform,
        inputs=[_tensor_metadata(spec) for spec in model.inputs],
        outputs=[_tensor_metadata(spec) for spec in model.outputs],
    )


def _tensor_metadata(spec: TensorSpec) -> Any:
    return _TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
