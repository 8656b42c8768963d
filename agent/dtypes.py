"""KServe v2 datatype names <-> numpy dtypes (torch's table is in ``torch_dtypes``).

Kept free of torch so that client commands (``edgeserve predict``, ``status``) start fast.
"""

from __future__ import annotations

import numpy as np

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}

DATATYPE_OF_NUMPY: dict[np.dtype, str] = {v: k for k, v in NUMPY_DTYPES.items()}


def datatype_of_numpy(dtype: np.dtype) -> str:
    """KServe name of a numpy dtype; object/bytes/str arrays are BYTES."""
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return DATATYPE_OF_NUMPY[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no KServe v2 datatype") from None
