"""Tensor contents on the wire <-> numpy, without a Python object per element.

* Element counts: the product of a shape's dims, checked before anything is allocated.
  Every dim counts as at least 1 (a zero-element tensor's other dims still size torch's
  strides), and the product may not exceed ``MAX_ELEMENTS``: no gRPC message (< 2 GiB)
  carries more elements than that, so a larger shape is an error, not an allocation.
* Typed ``contents`` (the slow path of hand-written clients): protobuf's repeated fields
  offer no buffer, and ``np.asarray(field)`` builds a Python object per element (a list of
  floats: ~8x the wire size). Fixed-width fields (``fp32``, ``fp64``, ``bool``) are
  re-serialized by protobuf's C code (packed: exactly the little-endian array behind a
  short header) and read with one ``np.frombuffer`` plus one aligned copy. Varint fields
  (``int``, ``int64``, ``uint``) go through ``np.fromiter`` with the count known: one
  temporary int at a time, never a list.
* BYTES: the length-prefixed raw format (4-byte little-endian length, then the element)
  split into a list of ``bytes``, after the element count has been bounded by the data's
  size. ``bytes_cost`` is what such a list holds in memory (a pointer per element, an
  object per element longer than one byte: CPython shares the empty and one-byte ones),
  which the codec charges against the decoded-size limit before building it.
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
# Fixed-width fields: their packed encoding is the array itself.
_PACKED_DTYPES: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
}
# Varint fields: decoded into their proto type, then narrowed to the datatype.
_VARINT_DTYPES: dict[str, np.dtype] = {
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
}
NARROW_RANGES: dict[str, tuple[int, int]] = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "UINT8": (0, 2**8 - 1),
}
_LENGTH = struct.Struct("<I")
_POINTER = 8  # a list slot
# A bytes object of n > 1 bytes: header + n + NUL, rounded up to the allocator's 16 bytes.
_BYTES_HEADER = sys.getsizeof(b"")


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
    bytes holds (pointers, object headers and allocator rounding included)."""
    return count * (_POINTER + _BYTES_HEADER + 15) + payload


class ContentsError(ValueError):
    """The contents do not fit the input; the message says how (no input name)."""


def typed_array(contents: pb.InferTensorContents, datatype: str, count: int) -> np.ndarray:
    """The flat numpy array of ``count`` elements that ``contents`` holds for ``datatype``."""
    field = TYPED_FIELDS[datatype]
    values = getattr(contents, field)
    if len(values) != count:
        raise ContentsError(f"contents.{field} holds {len(values)} elements, expected {count}")
    _refuse_other_fields(contents, field)
    packed = _PACKED_DTYPES.get(field)
    if packed is not None:
        return _from_packed(contents, packed, count)
    array = np.fromiter(values, dtype=_VARINT_DTYPES[field], count=count)
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


def _from_packed(contents: pb.InferTensorContents, dtype: np.dtype, count: int) -> np.ndarray:
    if not count:
        return np.empty(0, dtype)
    data = contents.SerializeToString()  # one field: tag, varint length, the packed array
    size = count * dtype.itemsize
    header = len(data) - size
    if not 2 <= header <= 6 or data[header - 1] & 0x80:
        raise ContentsError(f"typed contents did not re-encode as {count} packed elements")
    # The header makes the view unaligned; the copy is aligned, and the only copy kept.
    return np.frombuffer(data, dtype, count, header).copy()


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
