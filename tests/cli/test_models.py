"""`edgeserve models ACTION` against a real daemon: what each action prints, and the exit
codes of `cli/management.py`'s table: 1 the daemon refused (NOT_FOUND, FAILED_PRECONDITION),
2 a bad request (INVALID_ARGUMENT, or a usage error the CLI catches itself), 3 no daemon.

Every test leaves the daemon as it found it: mlp version 1 live and default, alone.
(`models load ./local/file.esar`, the upload, is tested with its own code.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from edgeserve.api.management_client import ManagementClient
from edgeserve.cli import main
from edgeserve.cli.models import ACTIONS
from tests.cli.conftest import assert_one_error_line, assert_usage_error
from tests.conftest import RunningDaemon
from tests.management.conftest import drop_in, management_address


def _models(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = _models(capsys, *argv, "--json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


def _live(served: RunningDaemon) -> list[tuple[str, str, bool]]:
    with ManagementClient(management_address(served)) as client:
        return sorted((m["name"], m["version"], m["default"]) for m in client.list_models())


@pytest.fixture
def as_found(served: RunningDaemon) -> Iterator[None]:
    """After the test: only mlp 1 live, and the default (put back if the test failed)."""
    yield
    with ManagementClient(management_address(served)) as client:
        for m in client.list_models():
            if (m["name"], m["version"]) != ("mlp", "1"):
                client.unload(m["name"], m["version"])
        client.set_default("mlp", "1")
        client.scale("mlp", "1", {"instances": 1, "max_batch_size": 8})
    assert _live(served) == [("mlp", "1", True)]


@pytest.fixture(scope="module")
def v2_name(served: RunningDaemon, mlp_archive_factory: Any) -> str:
    """mlp version 2 (built by `edgeserve package`) in the daemon's archive_dir: its name."""
    return drop_in(served, mlp_archive_factory("2"), name="mlp-2.esar").name


# -- what each action does ------------------------------------------------------------------


def test_list(at: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _models(capsys, "list", *at)
    assert (code, err) == (0, "")
    header, row = out.splitlines()
    assert header.split()[:4] == ["NAME", "VERSION", "DEFAULT", "STATE"]
    assert row.split()[:6] == ["mlp", "1", "*", "READY", "1", "cpu"]
    [model] = _json(capsys, "list", *at)
    assert (model["name"], model["version"], model["default"]) == ("mlp", "1", True)


def test_describe(at: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _models(capsys, "describe", "mlp", *at)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:2] == ["mlp (default version 1)", "  version 1: READY on cpu"]
    assert "    input x: FP32 [-1, 16]" in lines
    assert "    output output__0: FP32 [-1, 4]" in lines
    assert "    max_batch_size: 8" in lines
    described = _json(capsys, "describe", "mlp", "1", *at)
    assert [v["version"] for v in described["versions"]] == ["1"]


def test_load_a_name_from_archive_dir_then_default_and_unload(
    served: RunningDaemon,
    at: tuple[str, str],
    v2_name: str,
    as_found: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _models(capsys, "load", v2_name, "--max-batch-size", "4", *at)
    assert (code, err) == (0, "")
    assert out.strip() == "loaded mlp version 2 on cpu"
    assert _live(served) == [("mlp", "1", True), ("mlp", "2", False)]

    code, out, _ = _models(capsys, "default", "mlp", "2", *at)
    assert (code, out.strip()) == (0, "mlp: default version 2 (was 1)")
    assert _live(served) == [("mlp", "1", False), ("mlp", "2", True)]

    code, out, _ = _models(capsys, "unload", "mlp", "2", *at)
    assert (code, out.strip()) == (0, "unloaded mlp version 2; default: 1")
    assert _live(served) == [("mlp", "1", True)]


def test_load_a_stored_version_as_the_default(
    served: RunningDaemon,
    at: tuple[str, str],
    v2_name: str,
    as_found: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with ManagementClient(management_address(served)) as client:  # into the store
        client.load(archive=v2_name, stored=None, make_default=False, settings={})
        client.unload("mlp", "2")
    loaded = _json(capsys, "load", "--stored", "mlp", "2", "--default", *at)
    assert (loaded["name"], loaded["version"], loaded["default"]) == ("mlp", "2", True)
    assert _live(served) == [("mlp", "1", False), ("mlp", "2", True)]


def test_scale(
    served: RunningDaemon, at: tuple[str, str], as_found: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _models(
        capsys, "scale", "mlp", "--instances", "2", "--max-batch-size", "4",
        "--max-queue-delay", "1", *at,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.strip().startswith("mlp version 1: 2 instance(s), max batch 4, max delay 1.0 ms")
    [model] = _json(capsys, "list", *at)
    assert model["instances"] == 2 and model["settings"]["max_batch_size"] == 4


# -- what the daemon refuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ("describe", "nonesuch"),
        ("unload", "mlp", "7"),
        ("unload", "nonesuch", "1"),
        ("default", "mlp", "7"),
        ("scale", "nonesuch", "--instances", "2"),
        ("load", "--stored", "mlp", "7"),
    ],
    ids=" ".join,
)
def test_an_unknown_model_or_version_exits_1(
    argv: tuple[str, ...],
    served: RunningDaemon,
    at: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _models(capsys, *argv, *at)
    assert (code, out) == (1, "")
    named = "'7'" if "7" in argv else "'nonesuch'"
    assert_one_error_line(err, named)
    assert _live(served) == [("mlp", "1", True)], "nothing changed"


def test_loading_a_live_version_again_exits_1(
    served: RunningDaemon, at: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _models(capsys, "load", "--stored", "mlp", "1", *at)
    assert (code, out) == (1, "")
    assert_one_error_line(err, "FAILED_PRECONDITION", "'mlp' version '1' is already live")


def test_settings_out_of_range_exit_2(
    served: RunningDaemon, at: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _models(capsys, "scale", "mlp", "1", "--instances", "0", *at)
    assert (code, out) == (2, "")
    assert_one_error_line(err, "settings.instances")
    [model] = _json(capsys, "list", *at)
    assert model["instances"] == 1


# -- what the CLI refuses itself -------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fault"),
    [
        (("load",), "models load: give ARCHIVE or --stored NAME VERSION"),
        (("scale", "mlp"), "models scale: give --instances, --max-batch-size, ... to change"),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_nothing_to_do_is_a_usage_error(
    argv: tuple[str, ...], fault: str, at: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _models(capsys, *argv, *at)
    assert (code, out) == (2, "")
    assert_one_error_line(err, fault)


@pytest.mark.parametrize("argv", [("unload", "mlp"), ("default",), ("describe",)], ids=" ".join)
def test_missing_positionals_are_usage_errors(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _models(capsys, *argv)
    assert (code, out) == (2, "")
    assert_usage_error(err, f"models {argv[0]}", "required")


def test_a_tcp_address_without_a_token_exits_2(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EDGESERVE_TOKEN_FILE", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path}\nrun_dir: {tmp_path}\n")
    argv = ("list", "--management", "127.0.0.1:1", "--config", str(config))
    code, out, err = _models(capsys, *argv)
    assert (code, out) == (2, "")
    assert_one_error_line(err, "127.0.0.1:1 is TCP: give --token-file")


ACTION_ARGV = {
    "list": (),
    "describe": ("mlp",),
    "load": ("--stored", "mlp", "1"),
    "unload": ("mlp", "1"),
    "default": ("mlp", "1"),
    "scale": ("mlp", "--instances", "2"),
}


def test_every_action_is_covered_below() -> None:
    assert set(ACTION_ARGV) == set(ACTIONS)


@pytest.mark.parametrize("action", sorted(ACTION_ARGV))
def test_no_daemon_exits_3(action: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"unix://{tmp_path}/none.sock"
    code, out, err = _models(
        capsys, action, *ACTION_ARGV[action], "--management", address, "--timeout", "10"
    )
    assert (code, out) == (3, "")
    assert_one_error_line(err, f"daemon not reachable at {address}")
