"""Tensor contents on the wire <-> numpy, without a Python object per element.

* Element counts: the product of a shape's dims, checked before anything is allocated.
  Every dim counts as at least 1 (a zero-element tensor's other dims still size torch's
  strides), and the product may not exceed ``MAX_ELEMENTS``: no gRPC message (< 2 GiB)
  carries more elements than that, so a larger shape is an error, not an allocation.
* Typed ``contents`` (the path of hand-written clients): protobuf's repeated fields (upb)
  hand numpy their array through ``__array__``, so ``np.asarray(field, dtype)`` makes no
  Python object per element and holds one array (measured: ``bench/decode_memory.py``;
  re-serializing the packed field and ``np.frombuffer`` held 1.5x more, ``np.fromiter``
  was 8x slower). Values set in a field other than the datatype's are refused, not
  ignored.
* BYTES: the length-prefixed raw format (4-byte little-endian length, then the element)
  split into a list of ``bytes`` that never grows past the shape's count. ``bytes_cost``
  is what such a list holds in memory (a pointer per element, an object per element
  longer than one byte: CPython shares the empty and one-byte ones), which the codec
  charges against the decoded-size limit before building it.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from edgeserve.proto import kserve_v2_pb2 as pb

MAX_ELEMENTS = 2**31 - 1
"""Largest element count (dims counted as at least 1) of any tensor in a request."""

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
NARROW_RANGES: dict[str, tuple[int, int]] = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "UINT8": (0, 2**8 - 1),
}
_LENGTH = struct.Struct("<I")
_POINTER = 8  # a list slot
# A bytes object of n > 1 bytes: header + n + NUL, rounded up to the allocator's 16 bytes
# (n is counted apart). Empty and one-byte elements are CPython's shared objects.
_OBJECT = sys.getsizeof(b"") + 15


def element_count(shape: Sequence[int]) -> int | None:
    """prod(shape), or None when the shape (dims counted as >= 1) exceeds MAX_ELEMENTS."""
    count = extent = 1
    for dim in shape:
        count *= dim
        extent *= dim if dim > 1 else 1
        if extent > MAX_ELEMENTS:
            return None
    return count


def bytes_cost(count: int, payload: int) -> int:
    """Upper bound of the memory a list of ``count`` bytes objects totalling ``payload``
    bytes holds: a pointer each, and an object for each of at most ``payload // 2``
    elements of two bytes or more."""
    return count * _POINTER + min(count, payload // 2) * _OBJECT + payload


class ContentsError(ValueError):
    """The contents do not fit the input; the message says how (no input name)."""


def typed_array(contents: pb.InferTensorContents, datatype: str, count: int) -> np.ndarray:
    """The flat numpy array of ``count`` elements that ``contents`` holds for ``datatype``."""
    field = TYPED_FIELDS[datatype]
    values = getattr(contents, field)
    if len(values) != count:
        raise ContentsError(f"contents.{field} holds {len(values)} elements, expected {count}")
    _refuse_other_fields(contents, field)
    array = np.asarray(values, dtype=_FIELD_DTYPES[field])  # protobuf's __array__: no objects
    limits = NARROW_RANGES.get(datatype)
    if limits is not None and count and (array.min() < limits[0] or array.max() > limits[1]):
        raise ContentsError(
            f"contents.{field} has values outside the {datatype} range {list(limits)}"
        )
    return array


def _refuse_other_fields(contents: pb.InferTensorContents, field: str) -> None:
    for descriptor, _ in contents.ListFields():
        if descriptor.name != field:
            raise ContentsError(
                f"contents.{descriptor.name} is set, but this input's datatype uses {field}"
            )


def split_elements(data: bytes, count: int) -> list[bytes]:
    """Split the length-prefixed BYTES format into ``count`` elements (the list never
    grows past ``count``, nor past one element per 4 bytes of ``data``)."""
    items: list[bytes] = []
    append = items.append
    unpack = _LENGTH.unpack_from
    pos, end = 0, len(data)
    while pos < end:
        index = len(items)
        if index == count:
            raise ContentsError(f"raw BYTES data holds more than the {count} elements of its shape")
        if pos + 4 > end:
            raise ContentsError(f"raw BYTES element {index}: truncated 4-byte length prefix")
        (length,) = unpack(data, pos)
        pos += 4
        if pos + length > end:
            raise ContentsError(
                f"raw BYTES element {index} declares {length} bytes but only {end - pos} remain"
            )
        append(data[pos : pos + length])
        pos += length
    if len(items) != count:
        raise ContentsError(f"raw BYTES data holds {len(items)} elements, expected {count}")
    return items


def join_elements(items: Iterable[bytes | str]) -> bytes:
    """The KServe length-prefixed BYTES format: per element a <u32 length, then the bytes."""
    parts: list[bytes] = []
    pack = _LENGTH.pack
    for item in items:
        data = item.encode() if isinstance(item, str) else item
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)
