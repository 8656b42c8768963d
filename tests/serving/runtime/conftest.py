"""Tiny real TorchScript models, and model directories written by hand (no archive module).

``ModelDirFactory`` writes what the store would hold after verifying an archive: the
TorchScript file, sample files, extra members, and a ``Manifest`` listing the sha256 of
each of them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgeserve.archive.manifest import Manifest, Sample
from edgeserve.types import TensorSpec


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TupleModel(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2.0, x.sum(dim=1, keepdim=True)


class DictModel(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Keys in the opposite order of the manifest: matching must be by key.
        return {"total": x.sum(dim=1, keepdim=True), "doubled": x * 2.0}


class TwoInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * 10.0 + b


class RaiseOnFlag(nn.Module):
    """Adds one, and raises when any element equals 13."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 13.0).any()):
            raise ValueError("flag value 13 seen")
        return x + 1.0


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 6, channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(channels, 8, kernel_size=3, stride=2)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(features)


def spec(name: str, datatype: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, datatype, tuple(shape))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ModelDirFactory:
    """make(module, inputs, outputs, ...) -> (model_dir, manifest), one directory each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def make(
        self,
        module: torch.jit.ScriptModule | nn.Module,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        *,
        name: str = "m",
        version: str = "1",
        handler: str = "tensor",
        handler_config: Mapping[str, Any] | None = None,
        quantization: dict[str, str] | None = None,
        samples: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]] = (),
        files: Mapping[str, bytes | str] | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-6,
    ) -> tuple[Path, Manifest]:
        """Samples are (inputs, outputs) dicts of np arrays, bytes (raw) or lists (JSON)."""
        self.count += 1
        model_dir = self.root / f"{name}-{version}-{self.count}"
        model_dir.mkdir(parents=True)
        scripted = (
            module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
        )
        torch.jit.save(scripted, str(model_dir / "model.pt"))
        for member, content in (files or {}).items():
            path = model_dir / member
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content)
            else:
                path.write_bytes(content)
        sample_specs = []
        for index, (sample_in, sample_out) in enumerate(samples):
            sample_specs.append(
                Sample(
                    inputs=self._write_side(model_dir, index, "in", sample_in),
                    outputs=self._write_side(model_dir, index, "out", sample_out),
                )
            )
        hashes = {
            str(p.relative_to(model_dir)): _sha256(p) for p in model_dir.rglob("*") if p.is_file()
        }
        manifest = Manifest(
            name=name,
            version=version,
            model_file="model.pt",
            inputs=inputs,
            outputs=outputs,
            files=hashes,
            handler=handler,
            handler_config=dict(handler_config or {}),
            quantization=quantization,
            samples=tuple(sample_specs),
            rtol=rtol,
            atol=atol,
        )
        # The same validation an archive's manifest.json goes through.
        assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
        return model_dir, manifest

    @staticmethod
    def _write_side(model_dir: Path, index: int, side: str, values: Mapping[str, Any]) -> dict:
        folder = model_dir / "samples" / str(index)
        folder.mkdir(parents=True, exist_ok=True)
        members = {}
        for tensor, value in values.items():
            if isinstance(value, np.ndarray):
                path = folder / f"{side}-{tensor}.npy"
                np.save(path, value)
            elif isinstance(value, bytes):
                path = folder / f"{side}-{tensor}.bin"
                path.write_bytes(value)
            else:
                path = folder / f"{side}-{tensor}.json"
                path.write_text(json.dumps(value))
            members[tensor] = str(path.relative_to(model_dir))
        return members


@pytest.fixture
def model_dirs(tmp_path: Path) -> ModelDirFactory:
    return ModelDirFactory(tmp_path / "models")


@pytest.fixture(scope="session")
def mlp() -> torch.jit.ScriptModule:
    return torch.jit.script(MLP().eval())


@pytest.fixture(scope="session")
def mlp_int8() -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # torch 2.13 deprecates quantized tensor creation; we rely on it (DESIGN.md §5).
        warnings.filterwarnings(
            "ignore", message=r"torch\.quantize_per_tensor.*deprecated", category=UserWarning
        )
        quantized = torch.ao.quantization.quantize_dynamic(
            MLP().eval(), {nn.Linear}, dtype=torch.qint8
        )
        return torch.jit.script(quantized)


MLP_IN = (spec("x", "FP32", -1, 16),)
MLP_OUT = (spec("y", "FP32", -1, 4),)
