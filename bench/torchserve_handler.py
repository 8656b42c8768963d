"""The TorchServe handler of the peer bench (runs in TorchServe's Python worker, in its venv).

Packaged by ``torch-model-archiver --handler bench/torchserve_handler.py`` with the
TorchScript file the edgeserve archive of the same model holds and ``peer.json``
(``row_shape``: one request's input without the batch dimension; ``counter_file``).
Each request is one row of raw little-endian FP32 bytes (gRPC ``input["data"]``); the
rows of a TorchServe batch are stacked, run in one call under ``torch.inference_mode``,
and each reply is its output row as raw FP32 bytes: what edgeserve's tensor handler does
with a KServe request. It adds each batch and its
rows to the two int64 counters of ``counter_file`` (mean batch size over a case).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Any

import numpy as np
import torch

COUNTERS = struct.Struct("<qq")  # batches, rows: the layout bench/catalog.py reads


class _Peer:
    def __init__(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        serialized = context.manifest["model"]["serializedFile"]
        self.model = torch.jit.load(os.path.join(model_dir, serialized), map_location="cpu")
        self.model.eval()
        with open(os.path.join(model_dir, "peer.json")) as file:
            settings = json.load(file)
        self.row_shape = tuple(settings["row_shape"])
        self.batches = self.rows = 0
        self.counters: mmap.mmap | None = None
        path = settings.get("counter_file")
        if path and os.path.exists(path):
            with open(path, "r+b") as file:
                self.counters = mmap.mmap(file.fileno(), COUNTERS.size)
            self.batches, self.rows = COUNTERS.unpack_from(self.counters)

    def run(self, data: list[dict[str, Any]]) -> list[bytes]:
        rows = [np.frombuffer(item.get("data") or item.get("body"), np.float32) for item in data]
        batch = torch.from_numpy(np.stack(rows)).reshape(len(rows), *self.row_shape)
        with torch.inference_mode():
            out = self.model(batch).contiguous().numpy()
        if self.counters is not None:
            self.batches += 1
            self.rows += len(rows)
            COUNTERS.pack_into(self.counters, 0, self.batches, self.rows)
        return [row.tobytes() for row in out]


_peer: _Peer | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[bytes] | None:
    """TorchServe's function entry point: called once with None to initialize."""
    global _peer
    if _peer is None:
        _peer = _Peer(context)
    if data is None:
        return None
    return _peer.run(data)
