"""edgeserve package: real models scripted, traced, quantized; signatures, samples, handlers."""

from __future__ import annotations

import io
import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeserve.archive.format import extract_archive, read_manifest, verify_tree
from edgeserve.archive.manifest import Manifest
from edgeserve.archive.signing import TrustStore
from edgeserve.errors import ArchiveError
from edgeserve.packager.build import build_archive
from edgeserve.types import TensorSpec, batches_along_dim0

CUSTOM_HANDLER = """
from edgeserve.handlers.tensor import TensorHandler


class Doubler(TensorHandler):
    def postprocess(self, data):
        return super().postprocess(data * 2.0)
"""


def _unpack(
    archive: Path, tmp_path: Path, trust: TrustStore | None = None
) -> tuple[Manifest, Path]:
    dest = tmp_path / f"unpacked-{archive.stem}"
    manifest = extract_archive(archive, dest, trust=trust)
    assert verify_tree(dest, trust=trust) == manifest
    return manifest, dest


def _sample(
    dest: Path, manifest: Manifest, index: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    sample = manifest.samples[index]
    inputs = {k: np.load(dest / v) for k, v in sample.inputs.items()}
    outputs = {k: np.load(dest / v) for k, v in sample.outputs.items() if v.endswith(".npy")}
    return inputs, outputs


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def test_torchscript_file_round_trip(
    scripted_mlp: Path,
    example_npy: Path,
    tmp_path: Path,
    keys: tuple[Path, Path],
    trust: TrustStore,
) -> None:
    out = tmp_path / "mlp.esar"
    manifest = build_archive(
        str(scripted_mlp),
        name="mlp",
        version="3",
        output=out,
        example_inputs=[("x", example_npy)],
        sign_key=keys[0],
    )
    assert read_manifest(out, trust=trust) == manifest
    assert manifest.inputs == (TensorSpec("x", "FP32", (-1, 16)),)
    assert manifest.outputs == (TensorSpec("output__0", "FP32", (-1, 4)),)
    assert manifest.batching.max_batch_size == 8
    assert (manifest.rtol, manifest.atol, manifest.quantization) == (1e-5, 1e-6, None)
    assert manifest.handler == "tensor" and manifest.created_by.startswith("edgeserve ")
    manifest, dest = _unpack(out, tmp_path, trust)
    inputs, expected = _sample(dest, manifest)
    np.testing.assert_array_equal(inputs["x"], np.load(example_npy))
    served = torch.jit.load(str(dest / manifest.model_file))
    reference = torch.jit.load(str(scripted_mlp))
    x = torch.from_numpy(inputs["x"])
    assert torch.equal(served(x), reference(x))
    assert torch.equal(torch.from_numpy(expected["output__0"]), reference(x))


def test_torchscript_file_needs_an_example(scripted_mlp: Path, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="cannot be inferred without --example-input"):
        build_archive(str(scripted_mlp), name="m", version="1", output=tmp_path / "a.esar")
    assert list(tmp_path.iterdir()) == []


def test_not_a_model_file(tmp_path: Path, example_npy: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(ArchiveError, match="'.*junk.pt' is not a TorchScript file"):
        build_archive(
            str(junk), name="m", version="1", output=tmp_path / "a.esar",
            example_inputs=[example_npy],
        )  # fmt: skip


def test_eager_factory_is_scripted(models_py: Path, example_npy: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlp.esar"
    manifest = build_archive(
        f"{models_py}:build", name="mlp", version="1", output=out, example_inputs=[example_npy]
    )
    assert manifest.inputs == (TensorSpec("input__0", "FP32", (-1, 16)),)
    manifest, dest = _unpack(out, tmp_path)
    served = torch.jit.load(str(dest / "model.pt"))
    assert isinstance(served, torch.jit.RecursiveScriptModule)
    assert served.original_name == "MLP"  # scripted, so the module structure is kept
    inputs, expected = _sample(dest, manifest)
    x = torch.from_numpy(inputs["input__0"])
    assert torch.equal(served(x), torch.from_numpy(expected["output__0"]))


def test_unscriptable_model_is_traced(models_py: Path, example_npy: Path, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="cannot be scripted .* no --example-input"):
        build_archive(
            f"{models_py}:lambda_model", name="lam", version="1", output=tmp_path / "a.esar"
        )
    out = tmp_path / "lam.esar"
    manifest = build_archive(
        f"{models_py}:lambda_model",
        name="lam",
        version="1",
        output=out,
        example_inputs=[example_npy],
    )
    manifest, dest = _unpack(out, tmp_path)
    served = torch.jit.load(str(dest / "model.pt"))
    x = torch.from_numpy(np.load(example_npy))
    torch.manual_seed(2)
    lin = torch.nn.Linear(16, 4)
    with torch.no_grad():
        np.testing.assert_allclose(served(x).numpy(), (lin(x) * 2.0).numpy(), rtol=1e-6)
        batch = torch.cat([x, x, x])
        assert served(batch).shape == (6, 4)  # the trace generalises over the batch


@pytest.mark.parametrize(
    ("factory", "needle"),
    [
        ("not_a_module", "returned int, not a torch.nn.Module"),
        ("missing", "has no callable 'missing'"),
    ],
)
def test_bad_factories(models_py: Path, tmp_path: Path, factory: str, needle: str) -> None:
    with pytest.raises(ArchiveError, match=needle):
        build_archive(f"{models_py}:{factory}", name="m", version="1", output=tmp_path / "a")


def test_quantize_dynamic(models_py: Path, example_npy: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.esar"
    manifest = build_archive(
        f"{models_py}:build",
        name="mlp",
        version="1",
        output=out,
        example_inputs=[("x", example_npy)],
        quantize="dynamic",
    )
    engine = manifest.quantization and manifest.quantization["engine"]
    assert manifest.quantization == {"mode": "dynamic", "engine": engine, "dtype": "qint8"}
    arm = platform.machine().lower().startswith(("arm", "aarch64"))
    assert engine in (("qnnpack",) if arm else ("x86", "fbgemm"))
    assert engine in torch.backends.quantized.supported_engines
    assert (manifest.rtol, manifest.atol) == (1e-2, 1e-2)
    manifest, dest = _unpack(out, tmp_path)
    served = torch.jit.load(str(dest / "model.pt"))
    kinds = {sub._c.qualified_name for sub in served.modules()}
    assert "__torch__.torch.ao.nn.quantized.dynamic.modules.linear.Linear" in kinds
    assert not any(k.endswith("torch.nn.modules.linear.Linear") for k in kinds)
    assert "quantized::linear_dynamic" in str(served.inlined_graph)
    inputs, expected = _sample(dest, manifest)
    x = torch.from_numpy(inputs["x"])
    np.testing.assert_allclose(served(x).numpy(), expected["output__0"], rtol=1e-2, atol=1e-2)
    torch.manual_seed(0)  # the fp32 reference: models.MLP's seed and layers, in order
    a, b = torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)
    with torch.no_grad():
        fp32 = b(torch.relu(a(x)))
    error = float((fp32 - torch.from_numpy(expected["output__0"])).abs().max())
    assert 0 < error < 0.05, error  # int8 is close to fp32, and not identical to it


def test_quantize_refuses_torchscript_and_models_without_layers(
    scripted_mlp: Path, models_py: Path, example_npy: Path, tmp_path: Path
) -> None:
    with pytest.raises(ArchiveError, match="TorchScript file, which cannot be quantized"):
        build_archive(
            str(scripted_mlp), name="m", version="1", output=tmp_path / "a",
            example_inputs=[example_npy], quantize="dynamic",
        )  # fmt: skip
    with pytest.raises(ArchiveError, match="has no Linear, LSTM or GRU layer"):
        build_archive(
            f"{models_py}:conv_only", name="m", version="1", output=tmp_path / "a",
            quantize="dynamic",
        )  # fmt: skip


def test_batching_detection(models_py: Path, example_npy: Path, tmp_path: Path) -> None:
    mix = build_archive(
        f"{models_py}:batch_mix", name="m", version="1", output=tmp_path / "m.esar",
        example_inputs=[example_npy],
    )  # fmt: skip
    assert mix.batching.max_batch_size == 1
    assert mix.inputs[0].shape == (2, 16) and mix.outputs[0].shape == (16,)
    with pytest.raises(ArchiveError, match="does not batch along dim 0"):
        build_archive(
            f"{models_py}:batch_mix", name="m", version="1", output=tmp_path / "m.esar",
            example_inputs=[example_npy], max_batch_size=8,
        )  # fmt: skip
    fixed = build_archive(
        f"{models_py}:fixed_two", name="m", version="1", output=tmp_path / "f.esar",
        example_inputs=[example_npy],
    )  # fmt: skip
    assert fixed.batching.max_batch_size == 1 and fixed.inputs[0].shape == (2, 16)
    assert not batches_along_dim0(mix.inputs) and not batches_along_dim0(fixed.inputs)
    wide = build_archive(
        f"{models_py}:build", name="m", version="1", output=tmp_path / "w.esar",
        example_inputs=[example_npy], max_batch_size=32, rtol=0.5, atol=0.25,
    )  # fmt: skip
    assert wide.batching.max_batch_size == 32 and (wide.rtol, wide.atol) == (0.5, 0.25)
    assert batches_along_dim0(wide.inputs) and wide.inputs[0].shape == (-1, 16)
    with pytest.raises(ArchiveError, match="--max-batch-size: must be >= 0, got -1"):
        build_archive(
            f"{models_py}:build", name="m", version="1", output=tmp_path / "z.esar",
            example_inputs=[example_npy], max_batch_size=-1,
        )  # fmt: skip


def _fits(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    """Whether a request tensor of ``shape`` matches ``spec`` (-1 = any size)."""
    return len(spec.shape) == len(shape) and all(
        want in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    )


def test_max_batch_size_1_on_a_batching_model_keeps_dim_0_open(
    models_py: Path, example_npy: Path, tmp_path: Path
) -> None:
    """Whether the model batches decides the -1; max_batch_size 1 only stops combining."""
    from edgeserve.serving.runtime import RuntimeOptions, load_model

    out = tmp_path / "s.esar"
    single = build_archive(
        f"{models_py}:build", name="m", version="1", output=out,
        example_inputs=[("x", example_npy)], max_batch_size=1, max_queue_delay_ms=5.0,
    )  # fmt: skip
    assert single.inputs == (TensorSpec("x", "FP32", (-1, 16)),)
    assert single.outputs == (TensorSpec("output__0", "FP32", (-1, 4)),)
    assert single.batching.max_batch_size == 1 and single.batching.max_queue_delay_ms == 5.0
    assert batches_along_dim0(single.inputs)
    # the example had 2 rows; a request of 1 row (or any other count) fits the signature
    assert _fits(single.inputs[0], (1, 16)) and _fits(single.inputs[0], (3, 16))
    manifest, dest = _unpack(out, tmp_path)
    loaded = load_model(dest, manifest, RuntimeOptions(device="cpu"))
    try:
        assert loaded.warm_up().samples == 1  # the 2-row example is still the sample
        for rows in (1, 3):
            result = loaded.run({"x": torch.zeros(rows, 16)})
            assert result["output__0"].shape == (rows, 4)
    finally:
        loaded.close()


def test_max_batch_size_1_on_a_model_that_does_not_batch_keeps_the_example_shapes(
    models_py: Path, example_npy: Path, tmp_path: Path
) -> None:
    for factory in ("batch_mix", "fixed_two"):
        manifest = build_archive(
            f"{models_py}:{factory}", name="m", version="1", output=tmp_path / f"{factory}.esar",
            example_inputs=[example_npy], max_batch_size=1,
        )  # fmt: skip
        assert manifest.inputs[0].shape == (2, 16), factory
        assert manifest.batching.max_batch_size == 1 and not batches_along_dim0(manifest.inputs)
        assert not _fits(manifest.inputs[0], (1, 16))
    assert manifest.outputs[0].shape == (2, 16)  # fixed_two: [2, 16] -> [2, 16]


def test_two_inputs_dict_outputs_and_sample_groups(models_py: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = _npy(tmp_path / "x.npy", rng.standard_normal((3, 4)).astype(np.float32))
    y = _npy(tmp_path / "y.npy", rng.integers(0, 9, (3, 2)).astype(np.int64))
    x2 = _npy(tmp_path / "x2.npy", rng.standard_normal((1, 4)).astype(np.float32))
    y2 = _npy(tmp_path / "y2.npy", rng.integers(0, 9, (1, 2)).astype(np.int64))
    out = tmp_path / "two.esar"
    manifest = build_archive(
        f"{models_py}:two_heads",
        name="two",
        version="1",
        output=out,
        example_inputs=[f"x={x}", ("y", y)],
        sample_inputs=[x, y, ("y", y2), ("x", x2)],
    )
    assert [(s.name, s.datatype, s.shape) for s in manifest.inputs] == [
        ("x", "FP32", (-1, 4)),
        ("y", "INT64", (-1, 2)),
    ]
    assert [(s.name, s.datatype, s.shape) for s in manifest.outputs] == [
        ("logits", "FP32", (-1, 3)),
        ("best", "INT64", (-1,)),
    ]
    assert len(manifest.samples) == 2
    manifest, dest = _unpack(out, tmp_path)
    served = torch.jit.load(str(dest / "model.pt"))
    for index in range(2):
        inputs, expected = _sample(dest, manifest, index)
        got = served(torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["y"]))
        assert set(expected) == {"logits", "best"}
        for key in expected:
            assert torch.equal(got[key], torch.from_numpy(expected[key]))
    assert _sample(dest, manifest, 1)[0]["x"].shape == (1, 4)


def test_sample_input_mistakes(models_py: Path, example_npy: Path, tmp_path: Path) -> None:
    ints = _npy(tmp_path / "ints.npy", np.zeros((2, 16), dtype=np.int32))
    with pytest.raises(ArchiveError, match="is INT32 \\[2, 16\\]; input 'x' is FP32"):
        build_archive(
            f"{models_py}:build", name="m", version="1", output=tmp_path / "a",
            example_inputs=[("x", example_npy)], sample_inputs=[ints],
        )  # fmt: skip
    with pytest.raises(ArchiveError, match="name 'z' is unknown"):
        build_archive(
            f"{models_py}:build", name="m", version="1", output=tmp_path / "a",
            example_inputs=[("x", example_npy)], sample_inputs=[("z", example_npy)],
        )  # fmt: skip
    text = tmp_path / "a.txt"
    text.write_text("hi")
    with pytest.raises(ArchiveError, match="must be a .npy file"):
        build_archive(
            f"{models_py}:build", name="m", version="1", output=tmp_path / "a",
            example_inputs=[text],
        )  # fmt: skip


def test_custom_handler_and_extra_files(models_py: Path, example_npy: Path, tmp_path: Path) -> None:
    handler = tmp_path / "doubler.py"
    handler.write_text(CUSTOM_HANDLER)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n")
    out = tmp_path / "custom.esar"
    manifest = build_archive(
        f"{models_py}:build",
        name="custom",
        version="1",
        output=out,
        example_inputs=[("x", example_npy)],
        handler=str(handler),
        extra_files=[vocab],
    )
    assert manifest.handler == "handler.py"
    assert {"handler.py", "vocab.txt", "model.pt"} <= set(manifest.files)
    manifest, dest = _unpack(out, tmp_path)
    assert (dest / "handler.py").read_text() == CUSTOM_HANDLER
    inputs, expected = _sample(dest, manifest)
    served = torch.jit.load(str(dest / "model.pt"))
    model_out = served(torch.from_numpy(inputs["x"]))
    # expected outputs went through the handler (the runtime), so they are doubled
    assert torch.equal(torch.from_numpy(expected["output__0"]), model_out * 2.0)
    with pytest.raises(ArchiveError, match="member name 'model.pt' is already taken"):
        clash = tmp_path / "model.pt"
        clash.write_bytes(b"x")
        build_archive(
            f"{models_py}:build", name="c", version="1", output=tmp_path / "b",
            example_inputs=[example_npy], extra_files=[clash],
        )  # fmt: skip


def test_unknown_handler_name(models_py: Path, example_npy: Path, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="--handler: unknown handler 'nope'"):
        build_archive(
            f"{models_py}:build", name="m", version="1", output=tmp_path / "a",
            example_inputs=[example_npy], handler="nope",
        )  # fmt: skip


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    from PIL import Image

    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def test_image_classifier_samples_go_through_the_runtime(models_py: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class-{i}" for i in range(6)) + "\n")
    red, blue = _png(tmp_path / "red.png", (250, 10, 10)), _png(tmp_path / "b.png", (0, 0, 200))
    out = tmp_path / "img.esar"
    manifest = build_archive(
        f"{models_py}:classifier",
        name="tiny",
        version="1",
        output=out,
        handler="image_classifier",
        handler_config={"labels": "labels.txt", "topk": 3, "image_size": [64, 64]},
        extra_files=[labels],
        sample_inputs=[red, blue],
    )
    # the manifest keeps the model's own signature; clients see the handler's
    assert manifest.inputs == (TensorSpec("input__0", "FP32", (-1, 3, 64, 64)),)
    assert manifest.outputs == (TensorSpec("output__0", "FP32", (-1, 6)),)
    manifest, dest = _unpack(out, tmp_path)
    assert len(manifest.samples) == 2
    sample = manifest.samples[0]
    assert (dest / sample.inputs["image"]).read_bytes() == red.read_bytes()
    scores = np.load(dest / sample.outputs["scores"])
    names = json.loads((dest / sample.outputs["labels"]).read_text())
    assert scores.shape == (1, 3) and len(names) == 3
    assert all(name.startswith("class-") for name in names)
    assert float(scores[0, 0]) >= float(scores[0, 1]) >= float(scores[0, 2])


def test_image_classifier_warm_up_passes_in_the_runtime(models_py: Path, tmp_path: Path) -> None:
    """The recorded expected outputs are what the runtime produces from the installed model."""
    from edgeserve.serving.runtime import RuntimeOptions, load_model

    out = tmp_path / "img.esar"
    build_archive(
        f"{models_py}:classifier", name="tiny", version="1", output=out,
        handler="image_classifier", handler_config={"image_size": 32},
        sample_inputs=[_png(tmp_path / "g.png", (0, 200, 0))],
    )  # fmt: skip
    manifest, dest = _unpack(out, tmp_path)
    loaded = load_model(dest, manifest, RuntimeOptions(device="cpu"))
    try:
        report = loaded.warm_up()
    finally:
        loaded.close()
    assert report.samples == 1 and not report.synthetic


def test_signed_output_and_reading_back(
    models_py: Path, example_npy: Path, tmp_path: Path, keys: tuple[Path, Path], trust: TrustStore
) -> None:
    out = tmp_path / "s.esar"
    manifest = build_archive(
        f"{models_py}:build", name="s", version="1", output=out,
        example_inputs=[example_npy], sign_key=keys[0],
    )  # fmt: skip
    assert read_manifest(out, trust=trust) == manifest
    raw = io.BytesIO(out.read_bytes())
    import zipfile

    with zipfile.ZipFile(raw) as zf:
        assert zf.namelist()[:2] == ["manifest.json", "signature.ed25519.json"]
