"""KServe v2 datatype names <-> torch and numpy dtypes (the one table)."""

from __future__ import annotations

import numpy as np
import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}

DATATYPE_OF_TORCH: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

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
