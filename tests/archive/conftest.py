"""Fixtures for archive, signing, store and packager tests: tiny real models, keys, zips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeserve.archive.signing import TrustStore
from tests.cli.support import keygen, package

MODELS_SOURCE = '''
import torch


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 8)
        self.b = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class TwoHeads(torch.nn.Module):
    """Two inputs, dict output."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, y):
        h = self.lin(x) + y.sum(dim=1, keepdim=True).to(torch.float32)
        return {"logits": h, "best": h.argmax(dim=1)}


class Lambda(torch.nn.Module):
    """Not scriptable (a lambda attribute), but traceable."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 4)
        self.act = lambda t: t * 2.0

    def forward(self, x):
        return self.act(self.lin(x))


class BatchMix(torch.nn.Module):
    """Mixes rows: does not batch along dim 0."""

    def forward(self, x):
        return x.sum(dim=0)


class FixedTwo(torch.nn.Module):
    """Works for exactly two rows (fails on any other batch)."""

    def forward(self, x):
        return x.view(2, 16) * 2.0


class Tiny(torch.nn.Module):
    """A small image classifier: [N, 3, H, W] -> [N, 6] logits."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, stride=4)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def build():
    torch.manual_seed(0)
    return MLP()


def two_heads():
    torch.manual_seed(1)
    return TwoHeads()


def lambda_model():
    torch.manual_seed(2)
    return Lambda()


def batch_mix():
    return BatchMix()


def fixed_two():
    return FixedTwo()


def classifier():
    torch.manual_seed(3)
    return Tiny()


def not_a_module():
    return 42


def conv_only():
    return torch.nn.Conv2d(3, 3, 1)
'''


@pytest.fixture(scope="session")
def models_py(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text(MODELS_SOURCE)
    return path


@pytest.fixture(scope="session")
def example_npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("npy") / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def scripted_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript file of a plain MLP."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    path = tmp_path_factory.mktemp("ts") / "mlp.pt"
    torch.jit.script(model.eval()).save(str(path))
    return path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``edgeserve keygen``: (release.key, release.pub)."""
    return keygen(tmp_path_factory.mktemp("keys") / "release")


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second pair from ``edgeserve keygen``, which ``trust`` does not hold."""
    return keygen(tmp_path_factory.mktemp("other-keys") / "other")


@pytest.fixture(scope="session")
def trust(keys: tuple[Path, Path]) -> TrustStore:
    return TrustStore.from_paths([keys[1]])


@pytest.fixture(scope="session")
def signed_archive(
    tmp_path_factory: pytest.TempPathFactory,
    models_py: Path,
    example_npy: Path,
    keys: tuple[Path, Path],
) -> Path:
    """A signed fp32 MLP archive (name mlp, version 1), built by ``edgeserve package``."""
    return package(
        f"{models_py}:build",
        name="mlp",
        version="1",
        output=tmp_path_factory.mktemp("archives") / "mlp-1.esar",
        example_inputs=[("x", example_npy)],
        sign_key=keys[0],
    )


@pytest.fixture
def archive_copy(signed_archive: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.esar"
    copy.write_bytes(signed_archive.read_bytes())
    return copy
