"""``edgeserve package --input-name/--output-name``: a model packaged to match a client
that already exists (Triton's ``simple`` example: INPUT0, INPUT1 -> OUTPUT0, OUTPUT1),
and every refusal as exit 2 with one line naming the fault (nothing written)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from edgeserve.cli import main
from tests.cli.conftest import assert_one_error_line
from tests.cli.support import edgeserve_ok

MODELS = """
import torch
from torch import nn


class AddSub(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return a + b, a - b


class Keyed(nn.Module):
    def forward(self, a: torch.Tensor):
        return {"total": a.sum(1)}


class Pooled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def pooled():
    return Pooled()


def add_sub():
    return AddSub()


def keyed():
    return Keyed()
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(models.py, an INT32 example of shape (1, 16))."""
    folder = tmp_path_factory.mktemp("named")
    (folder / "models.py").write_text(MODELS)
    np.save(folder / "a.npy", np.arange(16, dtype=np.int32).reshape(1, 16))
    return folder / "models.py", folder / "a.npy"


def _names(archive: Path) -> tuple[list[str], list[str]]:
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    return [t["name"] for t in manifest["inputs"]], [t["name"] for t in manifest["outputs"]]


def test_names_of_an_existing_client_are_packaged_and_served(
    models, tmp_path, daemons, signing_key
):
    source, example = models
    archive = tmp_path / "simple-1.esar"
    edgeserve_ok(
        "package", f"{source}:add_sub", "--name", "simple", "--version", "1",
        "--example-input", example, "--example-input", example,
        "--input-name", "INPUT0", "--input-name", "INPUT1",
        "--output-name", "OUTPUT0", "--output-name", "OUTPUT1",
        "--sign-key", signing_key[0], "-o", archive,
    )  # fmt: skip
    assert _names(archive) == (["INPUT0", "INPUT1"], ["OUTPUT0", "OUTPUT1"])

    daemon = daemons.start(archive)
    with triton.InferenceServerClient(daemon.tcp) as client:
        metadata = client.get_model_metadata("simple")
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("INPUT0", "INT32", [-1, 16]),
            ("INPUT1", "INT32", [-1, 16]),
        ]
        assert [t.name for t in metadata.outputs] == ["OUTPUT0", "OUTPUT1"]
        # As Triton's simple_grpc_infer_client.py asks it.
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.ones((1, 16), dtype=np.int32)
        inputs = [
            triton.InferInput("INPUT0", [1, 16], "INT32"),
            triton.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        outputs = [triton.InferRequestedOutput("OUTPUT0"), triton.InferRequestedOutput("OUTPUT1")]
        result = client.infer("simple", inputs, outputs=outputs)
        assert result.as_numpy("OUTPUT0").tolist() == (a + b).tolist()
        assert result.as_numpy("OUTPUT1").tolist() == (a - b).tolist()


REFUSALS = {
    "plain": ("add_sub", ["--input-name", "in put", "--input-name", "b"],
              "--input-name 'in put': must be a letter"),
    "count": ("add_sub", ["--input-name", "a"],
              "--input-name: 1 name(s) for the model's 2 input(s) "
              "(in order: ['input__0', 'input__1'])"),
    "unique": ("add_sub", ["--output-name", "y", "--output-name", "y"],
               "--output-name: ['y'] given more than once"),
    "length": ("add_sub", ["--output-name", "y" * 129, "--output-name", "z"],
               "at most 128 characters"),
    "dict": ("keyed", ["--output-name", "y"],
             "--output-name: the model returns a dict, whose keys name its outputs"),
    "handler": ("pooled", ["--handler", "image_classifier", "--handler-config", '{"topk": 1}',
                           "--input-name", "x"],
                "handler 'image_classifier' serves its own signature"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_names_that_cannot_work_are_refused(case, models, tmp_path, capsys):
    factory, options, fault = REFUSALS[case]
    source, example = models
    # The image classifier's model input is fixed ([N, 3, H, W] images): no example.
    given = {"add_sub": ("--example-input", example) * 2, "keyed": ("--example-input", example)}
    examples = given.get(factory, ())
    output = tmp_path / "named.esar"
    code = main(
        ["package", f"{source}:{factory}", "--name", "m", "--version", "1", *map(str, examples),
         *options, "-o", str(output)]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and not output.exists(), err
    assert_one_error_line(err, fault)


def test_inputs_are_named_one_way(models, tmp_path, capsys):
    source, example = models
    output = tmp_path / "named.esar"
    code = main(
        ["package", f"{source}:add_sub", "--name", "m", "--version", "1",
         "--example-input", f"a={example}", "--example-input", f"b={example}",
         "--input-name", "A", "--input-name", "B", "-o", str(output)]
    )  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 2 and not output.exists()
    assert_one_error_line(
        err, "--input-name: the inputs are already named by NAME= in --example-input"
    )
