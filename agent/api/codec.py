"""KServe v2 protobuf <-> edgeserve types: the one place where messages become tensors.

Requests are validated against the live model's signature in one pass before anything
is queued, and every error names the input (or output, or parameter) at fault; names a
client sent are echoed at most ``errors.ECHO_LIMIT`` characters long. What the signature
implies is worked out once per live model version (``_Plan``: per input its datatype,
shape rule and dtypes), not per request. Replies are built directly: a pre-built reply
per model copied with ``CopyFrom`` saved ~0.5 us of protobuf work but choosing and
checking it cost as much (measured with ``bench/codec_cost.py``).

* raw (``raw_input_contents``, what tritonclient sends): numeric inputs become tensors
  that are views over the request's bytes (``np.frombuffer(...).reshape(shape)`` then
  ``torch.from_numpy``: no copy, the tensor keeps the bytes object alive, and one torch
  call per input where ``torch.frombuffer(...).reshape(...)`` makes two; every such call
  releases the GIL, which costs a thread switch under load). BYTES inputs are split from
  the length-prefixed wire format (``tensor_contents``).
* typed (``contents``): the path of hand-written clients, decoded without a Python object
  per element (``tensor_contents.typed_array``).
* Sizes: a shape's element count is checked (overflow-safe, dims counted as >= 1) before
  anything is allocated, and ``max_bytes`` bounds what the inputs occupy once decoded
  (typed contents widen, BYTES elements cost an object each), also before allocating.
* Triton's request parameters are honoured or refused (``request_parameters``).
* Replies are raw (``raw_output_contents``) whatever form the request used, as Triton
  answers: every reader in the ecosystem handles raw, some only raw. A request with the
  parameter ``typed_output_contents: true`` gets typed ``contents``, unless an output has
  no typed field (FP16, BF16): then every output goes back raw (KServe allows one or the
  other). Outputs go back as raw bytes with one copy (``ndarray.tobytes()``: protobuf's
  bytes fields accept only ``bytes``, not memoryviews).

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
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
import torch

from edgeserve.api.request_parameters import (
    check_input_parameters,
    check_output_parameters,
    request_timeout_s,
    wants_typed_output,
)
from edgeserve.api.tensor_contents import (
    MAX_ELEMENTS,
    TYPED_FIELDS,
    ContentsError,
    bytes_cost,
    element_count,
    join_elements,
    split_elements,
    typed_array,
)
from edgeserve.dtypes import NUMPY_DTYPES
from edgeserve.errors import EdgeserveError, InvalidArgument, MessageTooLarge, clip
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.serving.registry import LiveModel
from edgeserve.serving.torch_dtypes import DATATYPE_OF_TORCH, TORCH_DTYPES
from edgeserve.types import DATATYPE_SIZES, BytesTensor, InferRequest, InferResult, TensorValue

__all__ = [
    "TYPED_FIELDS",
    "decode_infer_request",
    "encode_infer_response",
    "encode_model_metadata",
    "join_elements",
    "request_uses_raw",
]

_MIXED_HINT = " (use one or the other for all inputs)"
_TensorMetadata = pb.ModelMetadataResponse.TensorMetadata


def _consume_readonly_buffer_warnings() -> None:
    """Trigger torch's once-per-process read-only buffer warnings where they are ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(np.frombuffer(b"\x00\x00", np.uint8))


_consume_readonly_buffer_warnings()


# -- what a model's signature implies, once per live version -----------------------------


class _Input:
    """One declared input: what its requests must look like and how they decode."""

    __slots__ = (
        "name",
        "datatype",
        "shape",
        "rank",
        "tail",
        "tail_count",
        "dtype",
        "itemsize",
        "torch_dtype",
    )

    def __init__(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape
        # The common signature [-1, fixed...]: a request matches when its tail is equal.
        fixed_tail = bool(shape) and shape[0] == -1 and all(d >= 0 for d in shape[1:])
        self.tail = list(shape[1:]) if fixed_tail else None
        self.tail_count = math.prod(shape[1:]) if fixed_tail else 0
        self.rank = len(shape)
        self.dtype = NUMPY_DTYPES.get("INT16" if datatype == "BF16" else datatype)
        self.itemsize = DATATYPE_SIZES[datatype]
        self.torch_dtype = TORCH_DTYPES.get(datatype)


class _Plan:
    """A live model version's inputs by name, and what an error lists."""

    __slots__ = ("inputs", "count", "declared")

    def __init__(self, model: LiveModel) -> None:
        self.inputs = {s.name: _Input(s.name, s.datatype, tuple(s.shape)) for s in model.inputs}
        self.count = len(self.inputs)
        self.declared = ", ".join(s.name for s in model.inputs) or "none"


# One plan per LiveModel, dropped with it (a swap makes a new LiveModel).
_PLANS: weakref.WeakKeyDictionary[LiveModel, _Plan] = weakref.WeakKeyDictionary()


def _plan(model: LiveModel) -> _Plan:
    plan = _PLANS.get(model)
    if plan is None:
        plan = _PLANS[model] = _Plan(model)
    return plan


# -- requests ---------------------------------------------------------------------------


def request_uses_raw(msg: pb.ModelInferRequest) -> bool:
    """True unless the request asked for typed contents (``typed_output_contents``)."""
    return not (msg.parameters and wants_typed_output(msg.parameters))


def decode_infer_request(
    msg: pb.ModelInferRequest,
    model: LiveModel,
    deadline: float | None = None,
    *,
    max_bytes: int | None = None,
) -> InferRequest:
    """Validate ``msg`` against ``model``'s signature and turn it into an InferRequest.

    ``deadline`` is an absolute ``time.monotonic()`` (a ``timeout`` parameter may bring it
    closer); ``max_bytes`` bounds the decoded size of all inputs together.
    """
    plan = _plan(model)
    name = model.name
    if msg.parameters:
        timeout = request_timeout_s(msg.parameters, name)
        if timeout is not None:
            expires = time.monotonic() + timeout
            deadline = expires if deadline is None else min(deadline, expires)
    raw = msg.raw_input_contents
    inputs = msg.inputs
    if raw and len(raw) != len(inputs):
        raise InvalidArgument(
            f"model '{name}': raw_input_contents has {len(raw)} entries "
            f"for {len(inputs)} inputs (one entry per input, in order)"
        )
    tensors: dict[str, TensorValue] = {}
    batches = model.batches
    batch = -1
    total = 0
    for i in range(len(inputs)):  # indexing beats iterating a protobuf repeated field
        inp = inputs[i]
        slot = plan.inputs.get(inp.name)
        if slot is None or slot.name in tensors:
            _refuse_name(model, plan, inp.name)
        if inp.datatype != slot.datatype:
            problem = f"datatype must be {slot.datatype}, got {clip(inp.datatype) or '(none)'}"
            raise InvalidArgument.for_input(name, slot.name, problem)
        shape = inp.shape[:]  # a list: slicing beats tuple() on a repeated field
        count = _checked_count(model, slot, shape)
        first = shape[0] if shape else 1
        if batch < 0:
            batch = first
        elif batches and first != batch:
            problem = (
                f"batch size {first} differs from {batch} of the first input "
                "(all inputs of a request share dim 0)"
            )
            raise InvalidArgument.for_input(name, slot.name, problem)
        if inp.parameters:
            check_input_parameters(inp.parameters, name, slot.name)
        try:
            if raw:
                if inp.HasField("contents"):
                    problem = "has typed contents while the request uses raw_input_contents"
                    raise InvalidArgument.for_input(name, slot.name, problem + _MIXED_HINT)
                tensor, size = _from_raw(slot, shape, count, raw[i], max_bytes, total)
            else:
                tensor, size = _from_typed(slot, shape, count, inp.contents, max_bytes, total)
        except ContentsError as exc:
            raise InvalidArgument.for_input(name, slot.name, str(exc)) from None
        except MessageTooLarge:
            raise MessageTooLarge(
                f"model '{name}': decoded inputs exceed {max_bytes} bytes at input '{slot.name}'"
            ) from None
        total += size
        tensors[slot.name] = tensor
    if len(tensors) != plan.count:
        missing = next(s for s in plan.inputs if s not in tensors)
        raise InvalidArgument.for_input(name, missing, "is missing from the request")
    return InferRequest(
        model=name,
        version=model.version,
        inputs=tensors,
        request_id=msg.id,
        requested_outputs=_requested_outputs(msg, model) if msg.outputs else None,
        deadline=deadline,
        batch_size=batch if batch > 0 else 1,
    )


def _refuse_name(model: LiveModel, plan: _Plan, name: str) -> NoReturn:
    if name in plan.inputs:
        raise InvalidArgument.for_input(model.name, name, "appears more than once")
    problem = f"is not an input of this model (inputs: {plan.declared})"
    raise InvalidArgument.for_input(model.name, name, problem)


def _checked_count(model: LiveModel, slot: _Input, shape: list[int]) -> int:
    """The element count of ``shape``, checked against the signature and the bounds."""
    tail = slot.tail
    if tail is None or len(shape) != slot.rank or shape[1:] != tail or shape[0] < 0:
        want = slot.shape
        if len(shape) != len(want):
            _raise_shape(model, slot, shape)
        for got, exp in zip(shape, want, strict=True):
            if got < 0 or (exp >= 0 and got != exp):
                _raise_shape(model, slot, shape)
    if shape and model.batches and not 1 <= shape[0] <= model.max_batch_size:
        problem = f"batch size {shape[0]} (dim 0) is outside 1..{model.max_batch_size}"
        raise InvalidArgument.for_input(model.name, slot.name, problem + " (max_batch_size)")
    if tail is not None and shape[1:] == tail:  # the count of the common case, no loop
        common = shape[0] * slot.tail_count
        if 0 < common <= MAX_ELEMENTS:
            return common
    count = element_count(shape)  # zero-element shapes too: their other dims are bounded
    if count is None:
        problem = (
            f"shape {clip(shape)} has more than {MAX_ELEMENTS} elements "
            "(each dim counted as at least 1)"
        )
        raise InvalidArgument.for_input(model.name, slot.name, problem)
    return count


def _raise_shape(model: LiveModel, slot: _Input, shape: list[int]) -> NoReturn:
    problem = f"shape {clip(shape)} does not match {list(slot.shape)} (-1 = any size)"
    raise InvalidArgument.for_input(model.name, slot.name, problem)


def _charge(size: int, max_bytes: int | None, total: int) -> int:
    """``size``, once it is known to fit under ``max_bytes`` with what is decoded."""
    if max_bytes is not None and total + size > max_bytes:
        raise MessageTooLarge("")  # the caller names the model and input
    return size


def _from_raw(
    slot: _Input,
    shape: list[int],
    count: int,
    data: bytes,
    max_bytes: int | None,
    total: int,
) -> tuple[TensorValue, int]:
    if slot.dtype is None:  # BYTES
        payload = len(data) - 4 * count  # each element has a 4-byte length
        size = _charge(bytes_cost(count, max(payload, 0)), max_bytes, total)
        return BytesTensor(split_elements(data, count), tuple(shape)), size
    expected = count * slot.itemsize
    if len(data) != expected:
        raise ContentsError(
            f"raw_input_contents holds {len(data)} bytes, expected {expected} "
            f"({count} x {slot.datatype} for shape {shape})"
        )
    size = _charge(expected, max_bytes, total)
    buffer: bytes | bytearray = data
    if expected <= 1:
        if expected == 0:
            return torch.empty(shape, dtype=slot.torch_dtype), 0
        buffer = bytearray(data)  # CPython shares one-byte bytes objects process-wide
    array = np.frombuffer(buffer, slot.dtype).reshape(shape)
    if slot.datatype == "BOOL" and int(array.view(np.uint8).max()) > 1:
        raise ContentsError("BOOL elements must be 0 or 1")
    if slot.datatype == "BF16":  # numpy has no bfloat16: the bits travel as int16
        return torch.from_numpy(array).view(torch.bfloat16), size
    return torch.from_numpy(array), size


def _from_typed(
    slot: _Input,
    shape: list[int],
    count: int,
    contents: pb.InferTensorContents,
    max_bytes: int | None,
    total: int,
) -> tuple[TensorValue, int]:
    field = TYPED_FIELDS.get(slot.datatype)
    if field is None:
        raise ContentsError(f"datatype {slot.datatype} has no typed contents field; send it raw")
    if slot.dtype is None:  # BYTES
        values = contents.bytes_contents
        if len(values) != count:
            raise ContentsError(f"contents.{field} holds {len(values)} elements, expected {count}")
        payload = contents.ByteSize() - 2 * count  # each element has a tag and a length
        size = _charge(bytes_cost(count, max(payload, 0)), max_bytes, total)
        return BytesTensor(list(values), tuple(shape)), size
    # Charged at the widest step: varints decode into their 4- or 8-byte proto type.
    size = _charge(count * max(slot.itemsize, 4), max_bytes, total)
    array = typed_array(contents, slot.datatype, count)
    if array.dtype != slot.dtype:
        array = array.astype(slot.dtype)
    return torch.from_numpy(array.reshape(shape)), size


def _requested_outputs(msg: pb.ModelInferRequest, model: LiveModel) -> tuple[str, ...]:
    names = []
    for out in msg.outputs:
        name = out.name
        if model.output_spec(name) is None:
            declared = ", ".join(s.name for s in model.outputs) or "none"
            raise InvalidArgument(
                f"model '{model.name}' has no output '{clip(name)}' (outputs: {declared})"
            )
        if out.parameters:
            check_output_parameters(out.parameters, model.name, name)
        names.append(name)
    return tuple(names)


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
    outputs = result.outputs
    response = pb.ModelInferResponse(
        model_name=model.name,
        model_version=model.version,
        id=result.request_id if request_id is None else request_id,
    )
    names = requested or outputs.keys()
    if not raw:
        chosen = [(name, _output(model, outputs, name)) for name in names]
        if all(_datatype(model, n, v) in TYPED_FIELDS for n, v in chosen):
            _add_typed_outputs(response, model, chosen)
            return response
    add = response.outputs.add
    append = response.raw_output_contents.append
    for name in names:
        value = _output(model, outputs, name)
        if isinstance(value, BytesTensor):
            add(name=name, datatype="BYTES", shape=value.shape)
            append(join_elements(value.items))
            continue
        add(name=name, datatype=_datatype(model, name, value), shape=value.shape)
        if value.dtype is torch.bfloat16:  # numpy has no bfloat16: same bits as int16
            value = value.view(torch.int16)
        append(value.numpy().tobytes())
    return response


def _output(model: LiveModel, outputs: dict[str, TensorValue], name: str) -> TensorValue:
    try:
        value = outputs[name]
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


def _tensor_metadata(spec: Any) -> Any:
    return _TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
