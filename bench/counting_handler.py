"""A tensor handler that counts the batches it ran, for the bench's mean batch size.

Packaged into the bench's archives (``handler="bench/counting_handler.py"``). It does
what the default ``tensor`` handler does, then adds one batch and its rows to two int64
counters in a small shared file (``handler_config.counter_file``, memory-mapped), which
the bench reads before and after each case: mean batch = rows / batches over the case.
Cost: one lock and one ``struct.pack_into`` per *batch*, not per request.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Mapping
from pathlib import Path

from edgeserve.handlers.base import HandlerContext
from edgeserve.handlers.tensor import TensorHandler
from edgeserve.types import TensorValue

COUNTERS = struct.Struct("<qq")  # batches, rows; bench/catalog.py reads the same layout


class CountingHandler(TensorHandler):
    def initialize(self, context: HandlerContext) -> None:
        super().initialize(context)
        self._lock = threading.Lock()
        self._batches = self._rows = 0
        self._map: mmap.mmap | None = None
        path = context.config.get("counter_file")
        if path and Path(path).exists():
            with open(path, "r+b") as file:
                self._map = mmap.mmap(file.fileno(), COUNTERS.size)
            self._batches, self._rows = COUNTERS.unpack_from(self._map)

    def handle(self, inputs: Mapping[str, TensorValue]) -> dict[str, TensorValue]:
        outputs = super().handle(inputs)
        if self._map is not None:
            rows = next(iter(inputs.values())).shape[0]
            with self._lock:
                self._batches += 1
                self._rows += rows
                COUNTERS.pack_into(self._map, 0, self._batches, self._rows)
        return outputs
