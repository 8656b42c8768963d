"""The default handler: numeric tensors in, the model, numeric tensors out.

``preprocess`` passes the batched inputs to the model as positional arguments in the
manifest's input order. On CPU nothing is copied (``Tensor.to`` returns the tensor itself
when device and dtype already match); on a GPU the inputs move with ``non_blocking``.
Floating inputs are cast to ``context.compute_dtype`` when one is set (fp16 on GPU).

``postprocess`` names what the model returned after the manifest's outputs: a single
tensor, a tuple or list (matched by position) or a dict (matched by key).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from edgeserve.handlers.base import BaseHandler, HandlerContext, InputRejected
from edgeserve.types import BytesTensor, TensorSpec, TensorValue


class TensorHandler(BaseHandler):
    """Numeric tensors only; BYTES inputs are refused when the model is loaded."""

    def initialize(self, context: HandlerContext) -> None:
        for spec in context.inputs:
            if spec.datatype == "BYTES":
                raise ValueError(
                    f"the tensor handler serves numeric tensors only, but input "
                    f"'{spec.name}' is BYTES; use a handler that decodes it"
                )
        super().initialize(context)
        self._input_names = tuple(spec.name for spec in context.inputs)

    def preprocess(self, inputs: Mapping[str, TensorValue]) -> tuple[torch.Tensor, ...]:
        device = self.context.device
        compute = self.context.compute_dtype
        args = []
        for name in self._input_names:
            value = inputs.get(name)
            if value is None:
                raise InputRejected(name, "is missing")
            if isinstance(value, BytesTensor):
                raise InputRejected(name, "BYTES data given for a numeric input")
            if compute is not None and value.is_floating_point():
                args.append(value.to(device, compute, non_blocking=True))
            else:
                args.append(value.to(device, non_blocking=True))
        return tuple(args)

    def postprocess(self, data: Any) -> dict[str, TensorValue]:
        return name_outputs(data, self.context.outputs)


def name_outputs(data: Any, specs: tuple[TensorSpec, ...]) -> dict[str, TensorValue]:
    """Map what a model returned to the declared output names.

    A dict is matched by key (extra keys are ignored); a tuple or list by position; a
    lone tensor is the only output. Anything else, or a count that does not match the
    declared outputs, raises ``ValueError`` naming the mismatch.
    """
    names = [spec.name for spec in specs]
    if isinstance(data, Mapping):
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(
                f"the model returned a dict without the declared output(s) {missing} "
                f"(keys: {sorted(str(k) for k in data)})"
            )
        return {name: data[name] for name in names}
    if isinstance(data, torch.Tensor | BytesTensor):
        data = (data,)
    if not isinstance(data, tuple | list):
        raise ValueError(
            f"the model returned {type(data).__name__}; expected a tensor, a tuple or "
            f"list of tensors, or a dict of tensors"
        )
    if len(data) != len(names):
        raise ValueError(
            f"the model returned {len(data)} output(s) but the manifest declares "
            f"{len(names)}: {names}"
        )
    return dict(zip(names, data, strict=True))
