"""`edgeserve package` as a user types it: every model form and option, and every refusal
as exit 2 with one line naming the fault (nothing written)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeserve.archive.format import read_manifest
from edgeserve.archive.signing import TrustStore
from edgeserve.cli import main
from edgeserve.errors import VerificationError
from edgeserve.types import TensorSpec
from tests.cli.conftest import assert_one_error_line, assert_usage_error
from tests.cli.support import keygen

FACTORIES = """
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.Tanh())


def not_a_module():
    return 42


def broken():
    raise RuntimeError("weights file is gone")
"""

HANDLER = """
from edgeserve.handlers.tensor import TensorHandler


class Doubling(TensorHandler):
    def postprocess(self, data):
        return super().postprocess(data)
"""


@pytest.fixture(scope="module")
def factories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("factories") / "factories.py"
    path.write_text(FACTORIES)
    return path


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript file: 16 features in, 4 out."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.ReLU()).eval()
    path = tmp_path_factory.mktemp("ts") / "mlp.pt"
    torch.jit.script(module).save(str(path))
    return path


def _package(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main(["package", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys: pytest.CaptureFixture[str], output: Path, *argv: str | Path) -> str:
    """The command exits 2, prints one error line, and writes no archive; the line."""
    code, out, err = _package(capsys, *argv, "-o", output)
    assert code == 2, err
    assert out == ""
    assert not output.exists()
    return err


# -- what it builds -----------------------------------------------------------------------


def test_a_torchscript_file(
    scripted: Path, mlp_example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "ts-3.esar"
    code, out, err = _package(
        capsys, scripted, "--name", "ts", "--version", "3",
        "--example-input", f"x={mlp_example}", "-o", out_path,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.strip() == f"wrote {out_path}: ts version 3"
    manifest = read_manifest(out_path, trust=None)
    assert (manifest.name, manifest.version, manifest.handler) == ("ts", "3", "tensor")
    assert manifest.inputs == (TensorSpec("x", "FP32", (-1, 16)),)
    assert manifest.outputs == (TensorSpec("output__0", "FP32", (-1, 4)),)
    assert manifest.quantization is None
    assert manifest.samples, "the example input is the default warm-up sample"


def test_an_eager_factory_quantized_and_signed(
    mlp_source: Path, mlp_example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keygen(tmp_path / "release")
    out_path = tmp_path / "mlp-2.esar"
    code, out, err = _package(
        capsys, f"{mlp_source}:build", "--name", "mlp", "--version", "2",
        "--example-input", f"x={mlp_example}", "--quantize", "dynamic",
        "--sign-key", private, "-o", out_path,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.strip() == f"wrote {out_path}: mlp version 2 (signed)"
    manifest = read_manifest(out_path, trust=TrustStore.from_paths([public]))
    assert manifest.quantization is not None and manifest.quantization["mode"] == "dynamic"
    assert manifest.inputs == (TensorSpec("x", "FP32", (-1, 16)),)
    _, stranger = keygen(tmp_path / "stranger")
    with pytest.raises(VerificationError, match="unknown key id"):
        read_manifest(out_path, trust=TrustStore.from_paths([stranger]))


def test_handler_tensor_with_batching_options(
    factories: Path, mlp_example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The options that once collided with the command dispatch (issue 7)."""
    out_path = tmp_path / "t.esar"
    code, _, err = _package(
        capsys, f"{factories}:build", "--name", "t", "--version", "1",
        "--example-input", str(mlp_example), "--handler", "tensor",
        "--max-batch-size", "4", "--max-queue-delay-ms", "0.5", "-o", out_path,
    )  # fmt: skip
    assert (code, err) == (0, "")
    manifest = read_manifest(out_path, trust=None)
    assert manifest.handler == "tensor"
    assert manifest.inputs == (TensorSpec("input__0", "FP32", (-1, 16)),)
    assert manifest.batching.max_batch_size == 4
    assert manifest.batching.max_queue_delay_ms == 0.5


def test_a_handler_file_with_its_config_and_an_extra_file(
    factories: Path, mlp_example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = tmp_path / "doubling.py"
    handler.write_text(HANDLER)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    out_path = tmp_path / "h.esar"
    code, _, err = _package(
        capsys, f"{factories}:build", "--name", "h", "--version", "1",
        "--example-input", f"x={mlp_example}", "--handler", handler,
        "--handler-config", '{"labels": "labels.txt", "scale": 2}',
        "--extra-file", labels, "-o", out_path,
    )  # fmt: skip
    assert (code, err) == (0, "")
    manifest = read_manifest(out_path, trust=None)
    assert manifest.handler == "handler.py"
    assert manifest.handler_config == {"labels": "labels.txt", "scale": 2}
    with zipfile.ZipFile(out_path) as zf:
        assert zf.read("handler.py").decode() == HANDLER
        assert zf.read("labels.txt") == b"a\nb\nc\nd\n"


def test_a_torchserve_mar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--from-mar without --name/--version takes the .mar's (covered in depth by
    tests/archive/test_mar_import.py)."""
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    torch.jit.script(torch.nn.Linear(8, 2).eval()).save(str(model))
    mar = tmp_path / "tiny.mar"
    mar_manifest = {
        "runtime": "python",
        "model": {
            "modelName": "tiny",
            "modelVersion": "2.0",
            "serializedFile": "model.pt",
            "handler": "base_handler",
        },
    }
    with zipfile.ZipFile(mar, "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", json.dumps(mar_manifest))
        zf.write(model, "model.pt")
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 8), dtype=np.float32))
    out_path = tmp_path / "tiny.esar"
    code, out, err = _package(capsys, "--from-mar", mar, "--example-input", x, "-o", out_path)
    assert (code, err) == (0, "")
    assert out.strip() == f"wrote {out_path}: tiny version 2.0"
    assert read_manifest(out_path, trust=None).outputs == (
        TensorSpec("output__0", "FP32", (-1, 2)),
    )


# -- what it refuses ----------------------------------------------------------------------


def test_a_missing_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.pt"
    err = _refused(capsys, tmp_path / "o.esar", missing, "--name", "m", "--version", "1")
    assert_one_error_line(err, f"MODEL '{missing}' is not a file")


@pytest.mark.parametrize(
    ("factory", "fault"),
    [
        ("nope", "has no callable 'nope'"),
        ("not_a_module", "returned int, not a torch.nn.Module"),
        ("broken", "raised RuntimeError: weights file is gone"),
    ],
)
def test_a_bad_factory(
    factory: str,
    fault: str,
    factories: Path,
    mlp_example: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _refused(
        capsys, tmp_path / "o.esar", f"{factories}:{factory}", "--name", "m", "--version", "1",
        "--example-input", mlp_example,
    )  # fmt: skip
    assert_one_error_line(err, f"MODEL '{factories}:{factory}'", fault)


def test_a_factory_in_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "gone.py"
    err = _refused(capsys, tmp_path / "o.esar", f"{source}:build", "--name", "m", "--version", "1")
    assert_one_error_line(err, f"'{source}' is not a file")


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ('{"topk": 3', "not JSON (Expecting ',' delimiter"),
        ("[3]", "must be a JSON object, got list"),
    ],
)
def test_handler_config_must_be_a_json_object(
    text: str, fault: str, scripted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused(
        capsys, tmp_path / "o.esar", scripted, "--name", "m", "--version", "1",
        "--handler-config", text,
    )  # fmt: skip
    assert_usage_error(err, "package", "argument --handler-config:", fault)


@pytest.mark.parametrize("given", [("--name", "m"), ("--version", "1"), ()])
def test_name_and_version_are_required(
    given: tuple[str, ...], scripted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused(capsys, tmp_path / "o.esar", scripted, *given)
    assert_one_error_line(err, "package: --name and --version are required")


def test_a_model_or_a_mar_is_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, tmp_path / "o.esar", "--name", "m", "--version", "1")
    assert_one_error_line(err, "package: give MODEL or --from-mar FILE.mar")


def test_a_missing_mar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mar = tmp_path / "gone.mar"
    err = _refused(capsys, tmp_path / "o.esar", "--from-mar", mar)
    assert_one_error_line(err, f"'{mar}'", "does not exist")


def test_output_is_required(scripted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _package(capsys, scripted, "--name", "m", "--version", "1")
    assert (code, out) == (2, "")
    assert_usage_error(err, "package", "-o/--output")


def test_an_unwritable_output(
    scripted: Path, mlp_example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "nowhere" / "o.esar"
    err = _refused(
        capsys, output, scripted, "--name", "m", "--version", "1", "--example-input", mlp_example
    )
    assert_one_error_line(err, f"'{output}'", "cannot be written")


def test_a_public_key_is_not_a_signing_key(
    scripted: Path,
    mlp_example: Path,
    signing_key: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    public = signing_key[1]
    err = _refused(
        capsys, tmp_path / "o.esar", scripted, "--name", "m", "--version", "1",
        "--example-input", mlp_example, "--sign-key", public,
    )  # fmt: skip
    assert_one_error_line(err, str(public), "not an unencrypted PEM private key")


@pytest.mark.parametrize(
    ("option", "fault"),
    [
        (("--handler", "nonesuch"), "--handler: unknown handler 'nonesuch'"),
        (("--max-batch-size", "-1"), "--max-batch-size: must be >= 0, got -1"),
        (("--example-input", "x=/nonexistent/x.npy"), "'/nonexistent/x.npy' cannot be read"),
        (("--extra-file", "/nonexistent/labels.txt"), "'/nonexistent/labels.txt' is not a file"),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_a_bad_option_names_it(
    option: tuple[str, str],
    fault: str,
    scripted: Path,
    mlp_example: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    examples = () if option[0] == "--example-input" else ("--example-input", str(mlp_example))
    err = _refused(
        capsys, tmp_path / "o.esar", scripted, "--name", "m", "--version", "1", *examples, *option
    )
    assert_one_error_line(err, fault)


def test_quantizing_a_torchscript_file_is_refused(
    scripted: Path, mlp_example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused(
        capsys, tmp_path / "o.esar", scripted, "--name", "m", "--version", "1",
        "--example-input", mlp_example, "--quantize", "dynamic",
    )  # fmt: skip
    assert_one_error_line(err, f"--quantize: '{scripted}' is a TorchScript file")


def test_an_unknown_quantize_mode(scripted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _package(capsys, scripted, "--quantize", "static", "-o", "x.esar")
    assert code == 2
    assert_usage_error(err, "package", "argument --quantize: invalid choice: 'static'")
