"""KServe v2 datatype names <-> torch dtypes (the one table)."""

from __future__ import annotations

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
