"""The handler contract: how a batch of requests becomes model calls and back.

A handler is batch-aware. ``handle`` receives a dict of batched inputs (dim 0 is the
batch; BYTES inputs arrive as ``BytesTensor``), and must return a dict of outputs whose
dim 0 has the same size, so the batcher can split them back per request.

Lifecycle: the runtime creates the handler with no arguments, calls ``initialize`` once
with a ``HandlerContext``, then calls ``handle`` from the instance threads (under
``torch.inference_mode``). The instances of a model share one handler, so ``handle`` may
run in several threads at once: handlers must not keep per-request state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeserve.types import BytesTensor, TensorSpec, TensorValue

__all__ = ["BaseHandler", "BytesTensor", "HandlerContext", "InputRejected", "TensorValue"]


class InputRejected(ValueError):
    """Raised by a handler when the client sent an input it cannot use.

    The runtime turns it into an InvalidArgument error naming the model and input, so
    the client gets INVALID_ARGUMENT instead of INTERNAL. ``problem`` must describe the
    fault without quoting the input's content (no payloads in messages or logs).
    """

    def __init__(self, input_name: str, problem: str) -> None:
        super().__init__(f"input '{input_name}': {problem}")
        self.input_name = input_name
        self.problem = problem


@dataclass
class HandlerContext:
    """What a handler may know about the model it serves."""

    model: torch.jit.ScriptModule
    device: torch.device
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    # Inputs of floating dtype are cast to this dtype before the model (fp16 on GPU).
    compute_dtype: torch.dtype | None = None


class BaseHandler:
    """Override ``preprocess`` / ``inference`` / ``postprocess`` as needed."""

    context: HandlerContext

    @classmethod
    def served_signature(
        cls, config: dict[str, Any]
    ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None:
        """The (inputs, outputs) clients see, when they differ from the model's own.

        The image classifier, say, takes encoded BYTES and returns labels, while its
        TorchScript module takes a float tensor. None means: the model's signature.
        """
        return None

    def initialize(self, context: HandlerContext) -> None:
        self.context = context

    def preprocess(self, inputs: Mapping[str, TensorValue]) -> Any:
        raise NotImplementedError

    def inference(self, data: Any) -> Any:
        return self.context.model(*data) if isinstance(data, tuple) else self.context.model(data)

    def postprocess(self, data: Any) -> dict[str, TensorValue]:
        raise NotImplementedError

    def handle(self, inputs: Mapping[str, TensorValue]) -> dict[str, TensorValue]:
        return self.postprocess(self.inference(self.preprocess(inputs)))
