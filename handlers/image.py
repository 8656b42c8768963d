"""Image classifier: encoded images (BYTES) in, top-k labels with scores out.

Served signature (what clients see)::

    input   image   BYTES  [-1]        one encoded image (PNG, JPEG, ...) per element
    output  scores  FP32   [-1, topk]  best first
    output  labels  BYTES  [-1, topk]  the labels of those scores

The TorchScript module itself takes one float tensor ``[N, C, H, W]`` (its first
manifest input) and returns class logits ``[N, classes]`` (its first output).

``handler_config`` keys, all optional:

- ``image_size``: ``[H, W]`` fed to the model. Default: the H, W of the model's input
  shape when the manifest fixes them, else 224 x 224.
- ``resize``: ``"crop"`` (default) scales the shorter side to ``size / crop_ratio`` and
  cuts the centre ``H x W`` out, as ImageNet models are evaluated; ``"stretch"`` resizes
  to ``H x W`` directly, ignoring the aspect ratio.
- ``crop_ratio``: default 0.875 (256 -> 224).
- ``mean``, ``std``: per channel, ImageNet's by default (their average for a one-channel
  model, which gets grayscale images); pixels are scaled to [0, 1] first.
- ``topk``: default 5.
- ``labels``: a file of the archive: text with one label per line, a JSON list, or a
  JSON object ``{"0": "tench", ...}`` (TorchServe's ``index_to_name.json``, whose values
  may be ``[wnid, name]`` pairs: the last item is taken). Without it labels are the class
  indices as text.
- ``probabilities``: true when the model already outputs probabilities (no softmax).

Decoding needs Pillow, an optional extra (``pip install edgeserve[image]``); it is
imported when the handler is initialised, so a missing Pillow fails the load, not a
request.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edgeserve.handlers.base import BaseHandler, HandlerContext, InputRejected
from edgeserve.types import BytesTensor, TensorSpec, TensorValue

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NAME = "image"


def _topk(config: Mapping[str, Any]) -> int:
    topk = config.get("topk", 5)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"handler_config.topk: must be an integer >= 1, got {topk!r}")
    return topk


class ImageClassifierHandler(BaseHandler):
    """Decode, resize, normalise, classify, keep the top k."""

    @classmethod
    def served_signature(
        cls, config: dict[str, Any]
    ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        k = _topk(config)
        return (
            (TensorSpec(INPUT_NAME, "BYTES", (-1,)),),
            (TensorSpec("scores", "FP32", (-1, k)), TensorSpec("labels", "BYTES", (-1, k))),
        )

    def initialize(self, context: HandlerContext) -> None:
        super().initialize(context)
        try:
            from PIL import Image
        except ImportError as exc:
            raise RuntimeError(
                "the image_classifier handler needs Pillow: install edgeserve[image]"
            ) from exc
        self._pil = Image
        config = context.config
        model_input = context.inputs[0]
        self._channels = _channels(model_input)
        self._size = _image_size(config, model_input)
        self._crop = _resize_mode(config)
        self._crop_ratio = float(config.get("crop_ratio", 0.875))
        if not 0 < self._crop_ratio <= 1:
            raise ValueError(
                f"handler_config.crop_ratio: must be in (0, 1], got {self._crop_ratio}"
            )
        if self._crop:
            side = math.ceil(max(self._size) / self._crop_ratio)
            self._draft_size = (side, side)
        else:
            self._draft_size = (self._size[1], self._size[0])
        dtype = context.compute_dtype or torch.float32
        self._mean = _per_channel(config, "mean", IMAGENET_MEAN, self._channels).to(
            context.device, dtype
        )
        self._std = _per_channel(config, "std", IMAGENET_STD, self._channels).to(
            context.device, dtype
        )
        self._topk = _topk(config)
        self._softmax = not bool(config.get("probabilities", False))
        self._labels = _read_labels(context.model_dir, config.get("labels"))
        classes = _classes(context.outputs[0])
        if classes is not None and classes < self._topk:
            raise ValueError(
                f"handler_config.topk: {self._topk} exceeds the model's {classes} classes"
            )
        if self._labels is not None and classes is not None and len(self._labels) < classes:
            raise ValueError(
                f"handler_config.labels: {len(self._labels)} labels for {classes} classes"
            )

    def preprocess(self, inputs: Mapping[str, TensorValue]) -> torch.Tensor:
        images = inputs.get(INPUT_NAME)
        if not isinstance(images, BytesTensor):
            raise InputRejected(INPUT_NAME, "must be a BYTES tensor of encoded images")
        if not images.items:
            raise InputRejected(INPUT_NAME, "holds no images")
        pixels = torch.stack([self._decode(data, i) for i, data in enumerate(images.items)])
        batch = pixels.to(self.context.device, non_blocking=True).permute(0, 3, 1, 2)
        batch = batch.to(self._mean.dtype, memory_format=torch.contiguous_format)
        return batch.div_(255.0).sub_(self._mean).div_(self._std)

    def postprocess(self, data: Any) -> dict[str, TensorValue]:
        logits = _first_output(data, self.context.outputs[0].name).float()
        if logits.dim() != 2:
            raise ValueError(
                f"the model returned logits of shape {list(logits.shape)}; expected [N, classes]"
            )
        if logits.shape[1] < self._topk:
            raise ValueError(f"topk {self._topk} exceeds the model's {logits.shape[1]} classes")
        probs = torch.softmax(logits, dim=1) if self._softmax else logits
        scores, indices = torch.topk(probs, self._topk, dim=1)
        labels = [self._label(int(i)).encode() for i in indices.flatten().tolist()]
        return {
            "scores": scores.cpu().contiguous(),
            "labels": BytesTensor(labels, (int(indices.shape[0]), self._topk)),
        }

    def _label(self, index: int) -> str:
        if self._labels is None or index >= len(self._labels):
            return str(index)
        return self._labels[index]

    def _decode(self, data: bytes, index: int) -> torch.Tensor:
        """One encoded image -> uint8 ``[H, W, C]``; undecodable -> InputRejected."""
        height, width = self._size
        mode = "L" if self._channels == 1 else "RGB"
        try:
            with self._pil.open(io.BytesIO(data)) as encoded:
                encoded.draft(mode, self._draft_size)
                img = encoded.convert(mode)
            if self._crop:
                img = self._resize_and_crop(img, height, width)
            else:
                img = img.resize((width, height), self._pil.Resampling.BILINEAR)
            raw = bytearray(img.tobytes())
        except Exception as exc:  # any decoder failure is a fault of the client's input
            problem = f"element {index} is not a decodable image ({type(exc).__name__})"
            raise InputRejected(INPUT_NAME, problem) from None
        return torch.frombuffer(raw, dtype=torch.uint8).view(height, width, self._channels)

    def _resize_and_crop(self, img: Any, height: int, width: int) -> Any:
        scale = max(height, width) / self._crop_ratio / min(img.size)
        new_w = max(width, round(img.size[0] * scale))
        new_h = max(height, round(img.size[1] * scale))
        img = img.resize((new_w, new_h), self._pil.Resampling.BILINEAR)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return img.crop((left, top, left + width, top + height))


def _channels(spec: TensorSpec) -> int:
    if len(spec.shape) != 4:
        raise ValueError(f"model input '{spec.name}' must be [N, C, H, W], got {list(spec.shape)}")
    channels = spec.shape[1]
    if channels not in (-1, 1, 3):
        raise ValueError(f"model input '{spec.name}' has {channels} channels; 1 or 3 are supported")
    return 3 if channels == -1 else channels


def _image_size(config: Mapping[str, Any], spec: TensorSpec) -> tuple[int, int]:
    size = config.get("image_size")
    if size is None:
        height, width = spec.shape[2], spec.shape[3]
        return (height, width) if height > 0 and width > 0 else (224, 224)
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)
    ):
        raise ValueError(
            f"handler_config.image_size: must be [H, W] of positive integers, got {size!r}"
        )
    return int(size[0]), int(size[1])


def _resize_mode(config: Mapping[str, Any]) -> bool:
    mode = config.get("resize", "crop")
    if mode not in ("crop", "stretch"):
        raise ValueError(f"handler_config.resize: must be 'crop' or 'stretch', got {mode!r}")
    return bool(mode == "crop")


def _per_channel(
    config: Mapping[str, Any], key: str, default: tuple[float, ...], channels: int
) -> torch.Tensor:
    values = config.get(key)
    if values is None:
        values = default if channels == 3 else (sum(default) / 3,)
    if not isinstance(values, list | tuple) or len(values) != channels:
        raise ValueError(f"handler_config.{key}: must list {channels} numbers, got {values!r}")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if key == "std" and bool((tensor <= 0).any()):
        raise ValueError(f"handler_config.std: must be positive, got {values!r}")
    return tensor.view(1, channels, 1, 1)


def _classes(spec: TensorSpec) -> int | None:
    if len(spec.shape) == 2 and spec.shape[1] > 0:
        return spec.shape[1]
    return None


def _read_labels(model_dir: Path, member: Any) -> list[str] | None:
    if member is None:
        return None
    if not isinstance(member, str) or not member:
        raise ValueError(f"handler_config.labels: must name a file of the archive, got {member!r}")
    root = model_dir.resolve()
    path = (root / member).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ValueError(f"handler_config.labels: '{member}' is not a file of the archive")
    text = path.read_text(encoding="utf-8")
    if not path.name.endswith(".json"):
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        return [line.strip() for line in lines]
    return _json_labels(json.loads(text), member)


def _json_labels(data: Any, member: str) -> list[str]:
    if isinstance(data, dict):
        try:
            pairs = sorted((int(k), v) for k, v in data.items())
        except ValueError:
            raise ValueError(
                f"handler_config.labels: '{member}' keys must be class indices"
            ) from None
        if [i for i, _ in pairs] != list(range(len(pairs))):
            raise ValueError(
                f"handler_config.labels: '{member}' must cover indices 0..{len(pairs) - 1}"
            )
        data = [v for _, v in pairs]
    if not isinstance(data, list):
        raise ValueError(f"handler_config.labels: '{member}' must hold a JSON list or object")
    return [str(v[-1]) if isinstance(v, list) and v else str(v) for v in data]


def _first_output(data: Any, name: str) -> torch.Tensor:
    if isinstance(data, Mapping):
        data = data[name] if name in data else next(iter(data.values()))
    elif isinstance(data, tuple | list):
        data = data[0]
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"the model returned {type(data).__name__}; expected a logits tensor")
    return data
