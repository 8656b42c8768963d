"""TorchServe .mar import: real .mar zips with real scripted models."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from archive_helpers import tree_snapshot, write_zip

from edgeserve.archive.format import extract_archive
from edgeserve.archive.mar import mar_handler, read_mar
from edgeserve.archive.signing import TrustStore
from edgeserve.errors import ArchiveError
from edgeserve.packager.build import build_archive, plan_archive
from edgeserve.store.model_store import STAGING, ModelStore
from edgeserve.types import BytesTensor, TensorSpec


class TinyClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, stride=8)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _scripted(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def classifier_pt() -> bytes:
    torch.manual_seed(0)
    return _scripted(TinyClassifier())


@pytest.fixture(scope="module")
def mlp_pt() -> bytes:
    torch.manual_seed(0)
    return _scripted(torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.Tanh()))


def make_mar(
    path: Path,
    model: bytes,
    *,
    handler: str,
    serialized: str = "model.pt",
    labels: dict | None = None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """What torch-model-archiver writes: MAR-INF/MANIFEST.json + the files."""
    manifest = {
        "createdOn": "01/01/2024 00:00:00",
        "runtime": "python",
        "model": {
            "modelName": "tiny",
            "serializedFile": serialized,
            "handler": handler,
            "modelVersion": "2.0",
        },
        "archiverVersion": "0.9.0",
    }
    entries = [("MAR-INF/", b""), ("MAR-INF/MANIFEST.json", json.dumps(manifest).encode())]
    entries.append((serialized, model))
    if labels is not None:
        entries.append(("index_to_name.json", json.dumps(labels).encode()))
    entries.extend((extra or {}).items())
    return write_zip(path, entries)


LABELS = {str(i): [f"n0{i}", f"thing-{i}"] for i in range(5)}


def test_image_classifier_mar(classifier_pt: bytes, tmp_path: Path) -> None:
    mar = make_mar(tmp_path / "tiny.mar", classifier_pt, handler="image_classifier", labels=LABELS)
    manifest, members = plan_archive("", name=None, version=None, from_mar=mar)
    assert (manifest.name, manifest.version, manifest.handler) == (
        "tiny",
        "2.0",
        "image_classifier",
    )
    # TorchServe's image_classifier feeds 224 x 224 RGB: that is the model's fixed input
    assert manifest.inputs == (TensorSpec("input__0", "FP32", (-1, 3, 224, 224)),)
    assert manifest.outputs == (TensorSpec("output__0", "FP32", (-1, 5)),)
    assert manifest.handler_config == {"labels": "index_to_name.json"}
    assert json.loads(members["index_to_name.json"]) == LABELS
    assert members["model.pt"] == classifier_pt


def test_image_classifier_mar_packaged_and_served(classifier_pt: bytes, tmp_path: Path) -> None:
    from PIL import Image

    from edgeserve.serving.runtime import RuntimeOptions, load_model

    mar = make_mar(tmp_path / "tiny.mar", classifier_pt, handler="image_classifier", labels=LABELS)
    image = tmp_path / "cat.png"
    Image.new("RGB", (300, 260), (120, 80, 40)).save(image)
    out = tmp_path / "tiny.esar"
    manifest = build_archive(
        "", name="cat", version=None, output=out, from_mar=mar, sample_inputs=[image]
    )
    assert (manifest.name, manifest.version) == ("cat", "2.0")
    dest = tmp_path / "unpacked"
    manifest = extract_archive(out, dest, trust=None)
    loaded = load_model(dest, manifest, RuntimeOptions(device="cpu"))
    try:
        assert loaded.warm_up().samples == 1
        labels = loaded.run({"image": _bytes_tensor(image.read_bytes())})["labels"]
    finally:
        loaded.close()
    assert all(item.decode().startswith("thing-") for item in labels.items)


def _bytes_tensor(data: bytes) -> BytesTensor:
    return BytesTensor([data], (1,))


@pytest.mark.parametrize("handler", ["base_handler", "ts.torch_handler.base_handler"])
def test_tensor_mar_needs_an_example_input(mlp_pt: bytes, tmp_path: Path, handler: str) -> None:
    mar = make_mar(tmp_path / "mlp.mar", mlp_pt, handler=handler)
    with pytest.raises(ArchiveError, match="cannot be inferred without --example-input"):
        plan_archive("", name=None, version=None, from_mar=mar)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 16), dtype=np.float32))
    manifest, members = plan_archive("", name="mlp", version="5", from_mar=mar, example_inputs=[x])
    assert (manifest.name, manifest.version, manifest.handler) == ("mlp", "5", "tensor")
    assert manifest.inputs == (TensorSpec("input__0", "FP32", (-1, 16)),)
    assert manifest.outputs == (TensorSpec("output__0", "FP32", (-1, 4)),)
    expected = np.load(io.BytesIO(members[manifest.samples[0].outputs["output__0"]]))
    served = torch.jit.load(io.BytesIO(mlp_pt))
    assert torch.equal(served(torch.ones(2, 16)), torch.from_numpy(expected))


@pytest.mark.parametrize(
    "handler", ["object_detector", "text_classifier", "image_segmenter", "my_handler.py"]
)
def test_handlers_without_an_equivalent(mlp_pt: bytes, tmp_path: Path, handler: str) -> None:
    extra = {"my_handler.py": b"class H: pass\n"} if handler.endswith(".py") else None
    mar = make_mar(tmp_path / "x.mar", mlp_pt, handler=handler, extra=extra)
    message = (
        f"TorchServe handler '{handler}' has no edgeserve equivalent; repackage with --handler"
    )
    with pytest.raises(ArchiveError, match=message.replace(".", r"\.")) as exc:
        plan_archive("", name=None, version=None, from_mar=mar)
    assert str(mar) in str(exc.value)
    # --handler overrides the mapping, as the message says
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 16), dtype=np.float32))
    out = tmp_path / "x.esar"
    manifest = build_archive(
        "", name=None, version=None, output=out, from_mar=mar, handler="tensor",
        example_inputs=[x],
    )  # fmt: skip
    assert manifest.handler == "tensor"


def test_mar_handler_table() -> None:
    assert mar_handler("image_classifier", "s") == "image_classifier"
    assert mar_handler(" ts.torch_handler.image_classifier ", "s") == "image_classifier"
    assert mar_handler("base_handler", "s") == "tensor"


def test_eager_state_dict_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(4, 2).state_dict(), buffer)
    mar = make_mar(tmp_path / "eager.mar", buffer.getvalue(), handler="base_handler",
                   serialized="model.pth")  # fmt: skip
    with pytest.raises(ArchiveError, match="serialized file 'model.pth' is not TorchScript"):
        read_mar(mar)


def test_whole_pickled_eager_module_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(4, 2), buffer)
    mar = make_mar(tmp_path / "eager.mar", buffer.getvalue(), handler="image_classifier")
    with pytest.raises(ArchiveError, match="is not TorchScript.*script or trace it"):
        plan_archive("", name=None, version=None, from_mar=mar)


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ([("model.pt", b"x")], "has no MAR-INF/MANIFEST.json"),
        ([("MAR-INF/MANIFEST.json", b"{}")], "model.serializedFile"),
        (
            [("MAR-INF/MANIFEST.json", json.dumps({"model": {"serializedFile": "m.pt"}}).encode())],
            "serializedFile 'm.pt' is not in the archive",
        ),
        ([("MAR-INF/MANIFEST.json", b"{}"), ("../evil", b"x")], "escapes the archive"),
    ],
)
def test_malformed_mar(tmp_path: Path, entries: list, needle: str) -> None:
    mar = write_zip(tmp_path / "bad.mar", entries)
    with pytest.raises(ArchiveError, match=needle) as exc:
        read_mar(mar)
    assert f"TorchServe archive '{mar}'" in str(exc.value)


@pytest.mark.parametrize("trusted", [True, False], ids=["trust-keys", "no-trust-keys"])
def test_store_refuses_a_mar_and_names_the_conversion(
    classifier_pt: bytes, tmp_path: Path, trust: TrustStore, trusted: bool
) -> None:
    mar = make_mar(tmp_path / "tiny.mar", classifier_pt, handler="image_classifier", labels=LABELS)
    store = ModelStore(
        tmp_path / "models", trust if trusted else None, live_state_path=tmp_path / "live.json"
    )
    with pytest.raises(ArchiveError, match="TorchServe .mar; convert it first.*--from-mar"):
        store.install(mar)
    assert tree_snapshot(store.root / STAGING) == []
    assert not (store.root / "tiny").exists()


def test_mar_converted_and_signed_installs_in_a_strict_store(
    classifier_pt: bytes, tmp_path: Path, keys: tuple[Path, Path], trust: TrustStore
) -> None:
    mar = make_mar(tmp_path / "tiny.mar", classifier_pt, handler="image_classifier")
    out = tmp_path / "tiny.esar"
    build_archive("", name=None, version="1", output=out, from_mar=mar, sign_key=keys[0])
    store = ModelStore(tmp_path / "models", trust, live_state_path=tmp_path / "live.json")
    installed = store.install(out)
    assert installed.manifest.handler_config == {}  # no index_to_name.json in this one
