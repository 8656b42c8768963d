"""`edgeserve predict` against a real daemon: the outputs it prints, and exit 1 (refused),
2 (bad input file) and 3 (no daemon) with one line naming the fault."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeserve.cli import main
from tests.cli.conftest import assert_one_error_line
from tests.conftest import RunningDaemon, free_port
from tests.e2e.test_serve import _reference


@pytest.fixture(scope="module")
def x(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    array = np.random.default_rng(7).standard_normal((2, 16)).astype(np.float32)
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, array)
    return path, array


def _expected(mlp_source: Path, array: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return _reference(mlp_source)(torch.from_numpy(array)).numpy()


def test_predict_prints_the_outputs(
    served: RunningDaemon,
    x: tuple[Path, np.ndarray],
    mlp_source: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["predict", "mlp", "--input", str(x[0]), "--address", served.uds_address]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[:2] == ["mlp version 1", "  output__0 [2, 4] float32"]
    first = _expected(mlp_source, x[1])[0, 0]
    assert f"{first:.4f}"[:-1] in out, "the values are printed"


def test_predict_json_carries_the_served_values(
    served: RunningDaemon,
    x: tuple[Path, np.ndarray],
    mlp_source: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["predict", "mlp", "--input", f"x={x[0]}", "--model-version", "1", "--json"]
    assert main([*argv, "--address", served.tcp]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    doc = json.loads(out)
    assert (doc["model"], doc["version"]) == ("mlp", "1")
    output = doc["outputs"]["output__0"]
    assert output["shape"] == [2, 4]
    served_values = np.array(output["data"], dtype=np.float32)
    np.testing.assert_allclose(served_values, _expected(mlp_source, x[1]), rtol=1e-5, atol=1e-5)


def test_predict_finds_the_daemon_through_the_environment(
    served: RunningDaemon,
    x: tuple[Path, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EDGESERVE_ADDRESS", served.uds_address)
    assert main(["predict", "mlp", "--input", str(x[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "1"


@pytest.mark.parametrize(
    ("argv", "fault"),
    [
        (["nonesuch"], "NOT_FOUND"),
        (["mlp", "--model-version", "9"], "NOT_FOUND"),
    ],
    ids=["unknown model", "unknown version"],
)
def test_an_unknown_model_exits_1(
    argv: list[str],
    fault: str,
    served: RunningDaemon,
    x: tuple[Path, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["predict", *argv, "--input", str(x[0]), "--address", served.tcp])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert_one_error_line(err, fault, f"'{argv[0]}'")


def test_an_input_the_model_refuses_exits_1(
    served: RunningDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    narrow = tmp_path / "narrow.npy"
    np.save(narrow, np.zeros((1, 15), dtype=np.float32))
    code = main(["predict", "mlp", "--input", str(narrow), "--address", served.tcp])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert_one_error_line(err, "INVALID_ARGUMENT", "input 'x'")


@pytest.mark.parametrize("case", ["missing", "not npy", "two files", "unknown name"])
def test_a_bad_input_file_exits_2(
    case: str,
    served: RunningDaemon,
    x: tuple[Path, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an array")
    given, fault = {
        "missing": ([str(tmp_path / "gone.npy")], f"cannot read input file {tmp_path}/gone.npy"),
        "not npy": ([str(text)], f"cannot read input file {text}"),
        "two files": ([str(x[0]), str(x[0])], "model 'mlp' takes 1 input(s) (x); 2 given"),
        "unknown name": ([f"y={x[0]}"], "model 'mlp' has no input 'y'"),
    }[case]
    inputs = [a for path in given for a in ("--input", path)]
    code = main(["predict", "mlp", *inputs, "--address", served.uds_address])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert_one_error_line(err, fault)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_no_daemon_exits_3(
    kind: str, x: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"unix://{tmp_path}/none.sock" if kind == "unix" else f"127.0.0.1:{free_port()}"
    argv = ["predict", "mlp", "--input", str(x[0]), "--address", address, "--timeout", "10"]
    assert main(argv) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_error_line(err, f"daemon not reachable at {address}")
