"""The image classifier handler end to end, on real PNG/JPEG bytes made with Pillow."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edgeserve.errors import ArchiveError, InvalidArgument, WarmupFailed
from edgeserve.handlers import ImageClassifierHandler
from edgeserve.serving.runtime import RuntimeOptions, load_model
from edgeserve.types import BytesTensor

from .conftest import TinyCNN, spec

CPU = RuntimeOptions(device="cpu")
LABELS = ["tench", "goldfish", "shark", "ray", "cock", "hen"]
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def encode(width: int, height: int, fmt: str, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels if channels == 3 else pixels[:, :, 0], mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def reference(cnn, images: list[bytes], size: int, topk: int, crop: bool, labels=LABELS):
    """What the handler should answer, computed here with numpy and the eager model."""
    batch = []
    for data in images:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if crop:
            short = size / 0.875
            scale = short / min(image.size)
            w, h = max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))
            image = image.resize((w, h), Image.Resampling.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
        batch.append(array.transpose(2, 0, 1))
    with torch.inference_mode():
        probs = torch.softmax(cnn(torch.from_numpy(np.stack(batch))), dim=1)
    scores, indices = torch.topk(probs, topk, dim=1)
    return scores, [[labels[i] for i in row] for row in indices.tolist()]


@pytest.fixture(scope="module")
def cnn() -> TinyCNN:
    return TinyCNN(classes=6).eval()


def make_image_model(model_dirs, cnn, *, size=32, shape_hw=(32, 32), samples=(), **config):
    config.setdefault("topk", 3)
    config.setdefault("labels", "labels.txt")
    return model_dirs.make(
        cnn,
        (spec("input", "FP32", -1, 3, *shape_hw),),
        (spec("logits", "FP32", -1, 6),),
        name="img",
        handler="image_classifier",
        handler_config=config,
        files={
            "labels.txt": "\n".join(LABELS) + "\n",
            "index_to_name.json": json.dumps(
                {str(i): [f"n0{i}", name.upper()] for i, name in enumerate(LABELS)}
            ),
        },
        samples=samples,
    )


@pytest.mark.parametrize("resize", ["stretch", "crop"])
def test_png_and_jpeg_end_to_end(model_dirs, cnn, resize: str) -> None:
    images = [encode(40, 30, "PNG", 1), encode(50, 64, "JPEG", 2), encode(32, 32, "PNG", 3)]
    model = load_model(*make_image_model(model_dirs, cnn, resize=resize), CPU)
    try:
        out = model.run({"image": BytesTensor(images, (3,))})
    finally:
        model.close()
    scores, labels = reference(cnn, images, 32, 3, crop=resize == "crop")
    assert set(out) == {"scores", "labels"}
    assert out["scores"].dtype == torch.float32 and out["scores"].shape == (3, 3)
    torch.testing.assert_close(out["scores"], scores, rtol=1e-4, atol=1e-5)
    assert isinstance(out["labels"], BytesTensor) and out["labels"].shape == (3, 3)
    got = [item.decode() for item in out["labels"].items]
    assert [got[i : i + 3] for i in (0, 3, 6)] == labels
    assert all(bool(row[0] >= row[1] >= row[2]) for row in out["scores"])


def test_served_signature(model_dirs, cnn) -> None:
    model = load_model(*make_image_model(model_dirs, cnn, topk=2), CPU)
    try:
        inputs, outputs = model.inputs, model.outputs
    finally:
        model.close()
    assert [(s.name, s.datatype, s.shape) for s in inputs] == [("image", "BYTES", (-1,))]
    assert [(s.name, s.datatype, s.shape) for s in outputs] == [
        ("scores", "FP32", (-1, 2)),
        ("labels", "BYTES", (-1, 2)),
    ]
    assert ImageClassifierHandler.served_signature({})[1][0].shape == (-1, 5)


def test_index_to_name_json_and_size_from_config(model_dirs, cnn) -> None:
    images = [encode(20, 20, "PNG", 4)]
    made = make_image_model(
        model_dirs,
        cnn,
        shape_hw=(-1, -1),
        image_size=[32, 32],
        labels="index_to_name.json",
        resize="stretch",
        topk=6,
    )
    model = load_model(*made, CPU)
    try:
        out = model.run({"image": BytesTensor(images, (1,))})
    finally:
        model.close()
    scores, labels = reference(cnn, images, 32, 6, crop=False, labels=[n.upper() for n in LABELS])
    assert [item.decode() for item in out["labels"].items] == labels[0]
    torch.testing.assert_close(out["scores"], scores, rtol=1e-4, atol=1e-5)
    assert float(out["scores"].sum()) == pytest.approx(1.0, abs=1e-5)


def test_without_labels_the_class_index_is_the_label(model_dirs, cnn) -> None:
    images = [encode(32, 32, "PNG", 5)]
    model = load_model(*make_image_model(model_dirs, cnn, labels=None, resize="stretch"), CPU)
    try:
        out = model.run({"image": BytesTensor(images, (1,))})
    finally:
        model.close()
    _, labels = reference(cnn, images, 32, 3, crop=False, labels=[str(i) for i in range(6)])
    assert [item.decode() for item in out["labels"].items] == labels[0]


@pytest.mark.parametrize(
    "bad",
    [b"definitely not an image", encode(32, 32, "PNG", 6)[:60], b""],
    ids=["garbage", "truncated-png", "empty"],
)
def test_undecodable_image_names_input_and_index(model_dirs, cnn, bad: bytes) -> None:
    good = encode(32, 32, "PNG", 7)
    model = load_model(*make_image_model(model_dirs, cnn), CPU)
    try:
        with pytest.raises(InvalidArgument) as info:
            model.run({"image": BytesTensor([good, good, bad], (3,))})
        # One bad image does not poison the handler.
        assert model.run({"image": BytesTensor([good], (1,))})["scores"].shape == (1, 3)
    finally:
        model.close()
    message = str(info.value)
    assert message.startswith("model 'img' input 'image': element 2 is not a decodable image (")
    assert "definitely" not in message and info.value.__cause__ is not None


def test_warm_up_with_an_image_sample(model_dirs, cnn) -> None:
    image = encode(36, 28, "PNG", 8)
    scores, labels = reference(cnn, [image], 32, 3, crop=True)
    good = ({"image": image}, {"scores": scores.numpy(), "labels": labels})
    model = load_model(*make_image_model(model_dirs, cnn, samples=[good]), CPU)
    try:
        report = model.warm_up()
    finally:
        model.close()
    assert report.samples == 1 and report.max_abs_error["scores"] < 1e-5

    wrong = ({"image": image}, {"labels": [labels[0][::-1]]})
    model = load_model(*make_image_model(model_dirs, cnn, samples=[wrong]), CPU)
    try:
        with pytest.raises(WarmupFailed, match=r"sample 0 output 'labels': got \[") as info:
            model.warm_up()
    finally:
        model.close()
    assert info.value.reason == "sample 0 output 'labels' does not match"  # safe to send away


def test_grayscale_model_gets_one_channel(model_dirs) -> None:
    cnn = TinyCNN(classes=6, channels=1).eval()
    made = model_dirs.make(
        cnn,
        (spec("input", "FP32", -1, 1, 24, 24),),
        (spec("logits", "FP32", -1, 6),),
        handler="image_classifier",
        handler_config={"topk": 2, "resize": "stretch"},
    )
    image = encode(30, 30, "PNG", 9)
    model = load_model(*made, CPU)
    try:
        out = model.run({"image": BytesTensor([image], (1,))})
    finally:
        model.close()
    gray = Image.open(io.BytesIO(image)).convert("L").resize((24, 24), Image.Resampling.BILINEAR)
    x = (np.asarray(gray, dtype=np.float32) / 255.0 - MEAN.mean()) / STD.mean()
    with torch.inference_mode():
        probs = torch.softmax(cnn(torch.from_numpy(x)[None, None]), dim=1)
    torch.testing.assert_close(out["scores"], torch.topk(probs, 2).values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"topk": 7}, "handler_config.topk: 7 exceeds the model's 6 classes"),
        ({"topk": 0}, "handler_config.topk: must be an integer >= 1, got 0"),
        ({"labels": "../outside.txt"}, "handler_config.labels: '../outside.txt' is not a file"),
        ({"resize": "zoom"}, "handler_config.resize: must be 'crop' or 'stretch', got 'zoom'"),
        ({"mean": [0.5]}, "handler_config.mean: must list 3 numbers"),
        ({"image_size": [32]}, "handler_config.image_size: must be [H, W]"),
    ],
)
def test_bad_config_fails_the_load(model_dirs, cnn, config, message) -> None:
    with pytest.raises(ArchiveError) as info:
        load_model(*make_image_model(model_dirs, cnn, **config), CPU)
    assert str(info.value).startswith("model 'img' version '1': ")
    assert message in str(info.value)


def test_missing_pillow_says_what_to_install(model_dirs, cnn, monkeypatch) -> None:
    made = make_image_model(model_dirs, cnn)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ArchiveError, match=r"needs Pillow: install edgeserve\[image\]"):
        load_model(*made, CPU)


def test_half_compute_path_on_cpu(model_dirs, cnn) -> None:
    """The fp16 path a GPU takes (inputs cast on the device, scores back in fp32)."""
    from edgeserve.handlers.base import HandlerContext

    model_dir, manifest = make_image_model(model_dirs, cnn, resize="stretch")
    module = torch.jit.load(str(model_dir / "model.pt")).eval().half()
    handler = ImageClassifierHandler()
    handler.initialize(
        HandlerContext(
            module,
            torch.device("cpu"),
            manifest.inputs,
            manifest.outputs,
            model_dir,
            config=manifest.handler_config,
            compute_dtype=torch.float16,
        )
    )
    images = [encode(40, 30, "PNG", 1), encode(32, 32, "JPEG", 2)]
    batch = handler.preprocess({"image": BytesTensor(images, (2,))})
    assert batch.dtype == torch.float16 and batch.shape == (2, 3, 32, 32) and batch.is_contiguous()
    with torch.inference_mode():
        out = handler.handle({"image": BytesTensor(images, (2,))})
    scores, _ = reference(cnn, images, 32, 3, crop=False)
    assert out["scores"].dtype == torch.float32
    torch.testing.assert_close(out["scores"], scores, rtol=2e-2, atol=2e-2)


def test_large_jpeg_is_decoded_at_reduced_scale(model_dirs, cnn) -> None:
    big = encode(1024, 768, "JPEG", 10)
    model = load_model(*make_image_model(model_dirs, cnn), CPU)
    try:
        out = model.run({"image": BytesTensor([big], (1,))})
    finally:
        model.close()
    assert out["scores"].shape == (1, 3) and len(out["labels"].items) == 3
