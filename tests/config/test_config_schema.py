"""The dataclasses themselves: field docs, validation in constructors, addresses, batching."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import edgeserve.config as cfg
import edgeserve.types as types_module
from edgeserve.config import (
    Config,
    ModelConfig,
    ServerConfig,
    grpc_address,
    is_loopback_host,
    parse_listen_address,
)
from edgeserve.errors import ConfigError
from edgeserve.serving.build import resolve_batching
from edgeserve.types import BatchingSettings

# The config's dataclasses, and BatchingSettings, which config shares with the rest.
SOURCES = {cfg: None, types_module: {"BatchingSettings"}}


def _dataclass_bodies() -> list[tuple[object, ast.ClassDef]]:
    found = []
    for module, only in SOURCES.items():
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        found += [
            (module, node)
            for node in tree.body
            if isinstance(node, ast.ClassDef)
            and any("dataclass" in ast.unparse(d) for d in node.decorator_list)
            and (only is None or node.name in only)
        ]
    return found


def test_every_config_field_has_a_one_line_docstring() -> None:
    classes = [c for _, c in _dataclass_bodies()]
    assert {c.name for c in classes} >= {
        "Config",
        "ServerConfig",
        "ModelConfig",
        "BatchingSettings",
    }
    missing = []
    for cls in classes:
        body = cls.body
        for node, after in zip(body, [*body[1:], None], strict=True):
            if not isinstance(node, ast.AnnAssign):
                continue
            value = after.value if isinstance(after, ast.Expr) else None
            doc = value.value if isinstance(value, ast.Constant) else None
            if not isinstance(doc, str) or "\n" in doc:
                missing.append(f"{cls.name}.{ast.unparse(node.target)}")
    assert not missing, f"fields without a one-line docstring under them: {missing}"


def test_the_docstring_test_sees_every_runtime_field() -> None:
    # The ast walk above must cover the real dataclasses, not a stale subset of them.
    for module, parsed_cls in _dataclass_bodies():
        fields = [f.name for f in dataclasses.fields(getattr(module, parsed_cls.name))]
        annotated = [ast.unparse(n.target) for n in parsed_cls.body if isinstance(n, ast.AnnAssign)]
        assert fields == annotated


def test_constructors_validate_without_load_config() -> None:
    with pytest.raises(ConfigError, match=r"^state_dir: must be an absolute path"):
        Config(state_dir=Path("relative"))
    with pytest.raises(ConfigError, match=r"^listen\[0\]: '0.0.0.0:1' is not a loopback"):
        ServerConfig(listen=("0.0.0.0:1",))
    assert ServerConfig(listen=("0.0.0.0:1",), allow_non_loopback=True).listen == ("0.0.0.0:1",)
    with pytest.raises(ConfigError, match=r"^batching.max_batch_size: must be 1..65536, got 0"):
        ModelConfig(name="m", batching=BatchingSettings(max_batch_size=0))
    with pytest.raises(
        ConfigError, match=r"^batching.max_queue_delay_ms: must be 0..60000, got -3"
    ):
        Config(batching=BatchingSettings(max_queue_delay_ms=-3))


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.state_dir = Path("/tmp")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("unix:///run/edgeserve/inference.sock", ("unix", "/run/edgeserve/inference.sock")),
        ("unix:/tmp/a.sock", ("unix", "/tmp/a.sock")),
        ("127.0.0.1:8001", ("tcp", "127.0.0.1", 8001)),
        ("tcp://localhost:0", ("tcp", "localhost", 0)),
        ("[::1]:9000", ("tcp", "::1", 9000)),
        ("edge-box.local:80", ("tcp", "edge-box.local", 80)),
    ],
)
def test_parse_listen_address(address: str, parsed: tuple) -> None:
    assert parse_listen_address(address) == parsed


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("", "non-empty"),
        ("8001", "host:port"),
        ("127.0.0.1:", "port must be"),
        ("127.0.0.1:http", "port must be"),
        ("[nothex]:1", "not an IPv6 address"),
        ("unix:relative", "must be absolute"),
        ("bad host:1", "host:port"),
    ],
)
def test_parse_listen_address_refuses(address: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_listen_address(address, "cli.--listen")
    assert err.value.key == "cli.--listen"
    assert problem in str(err.value)


def test_loopback_and_grpc_forms() -> None:
    assert [is_loopback_host(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost")] == [
        True
    ] * 4
    wildcard = "0.0.0.0"  # noqa: S104 - checked, not bound
    assert [is_loopback_host(h) for h in (wildcard, "::", "10.0.0.1", "example.com")] == [False] * 4
    assert grpc_address("[::1]:9") == "[::1]:9"
    assert grpc_address("tcp://127.0.0.1:9") == "127.0.0.1:9"
    assert grpc_address("unix:/tmp/a.sock") == "unix:///tmp/a.sock"


ARCHIVE = BatchingSettings(max_batch_size=16, max_queue_delay_ms=5.0, preferred_batch_sizes=(8,))


def _resolve(model: ModelConfig, defaults: BatchingSettings | None = None):
    """The daemon's own path: per-model over global (daemon), then over the archive."""
    return resolve_batching(ARCHIVE, model.batching.over(defaults or BatchingSettings()))


def _plain(got) -> tuple:
    return (
        got.max_batch_size,
        got.max_queue_delay_ms,
        got.max_queue_size,
        got.preferred_batch_sizes,
        got.instances,
    )


def test_batching_archive_over_builtin_defaults() -> None:
    got = _resolve(ModelConfig(name="m"), BatchingSettings())
    assert _plain(got) == (16, 5.0, 256, (8,), 1)
    assert got.intra_op_threads is None  # split across the CPUs at load


def test_batching_global_settings_over_archive() -> None:
    defaults = BatchingSettings(max_batch_size=8, max_queue_delay_ms=1.0, instances=2)
    got = _resolve(ModelConfig(name="m"), defaults)
    assert (got.max_batch_size, got.max_queue_delay_ms, got.instances) == (8, 1.0, 2)
    assert got.preferred_batch_sizes == (8,)  # not set globally: the archive's


def test_batching_per_model_wins_over_everything() -> None:
    model = ModelConfig(
        name="mlp",
        batching=BatchingSettings(
            max_batch_size=4,
            max_queue_delay_ms=0.0,
            max_queue_size=10,
            preferred_batch_sizes=(),
            instances=3,
            intra_op_threads=1,
        ),
    )
    defaults = BatchingSettings(max_batch_size=8, max_queue_delay_ms=1.0, instances=2)
    assert _plain(_resolve(model, defaults)) == (4, 0.0, 10, (), 3)


def test_batching_refuses_a_mix_that_does_not_fit() -> None:
    model = ModelConfig(name="mlp", batching=BatchingSettings(max_batch_size=4))
    with pytest.raises(ConfigError) as err:
        _resolve(model)  # the archive prefers 8 > 4
    assert err.value.key == "batching.preferred_batch_sizes"


def test_over_keeps_only_the_set_fields_of_each_layer() -> None:
    model = BatchingSettings(instances=2)
    defaults = BatchingSettings(max_queue_size=32, max_queue_delay_ms=1.5, instances=5)
    got = model.over(defaults)
    assert got.instances == 2  # per model
    assert (got.max_queue_size, got.max_queue_delay_ms) == (32, 1.5)  # global, set
    assert got.max_batch_size is None  # left to the archive
    assert got.to_dict() == {"max_queue_delay_ms": 1.5, "max_queue_size": 32, "instances": 2}
    assert (
        BatchingSettings.from_dict({**got.to_dict(), "device": "cpu", "max_batch_size": None})
        == got
    )


@pytest.mark.parametrize(
    ("settings", "key", "problem"),
    [
        (BatchingSettings(max_batch_size=0), "max_batch_size", "must be 1..65536, got 0"),
        (BatchingSettings(instances=65), "instances", "must be 1..64, got 65"),
        (
            BatchingSettings(max_queue_delay_ms=float("nan")),
            "max_queue_delay_ms",
            "must be 0..60000",
        ),
        (BatchingSettings(max_queue_size="7"), "max_queue_size", "must be a number, got '7'"),  # type: ignore[arg-type]
        (BatchingSettings(instances=True), "instances", "must be a number, got True"),
        (BatchingSettings(preferred_batch_sizes=(4, 2)), "preferred_batch_sizes", "ascending"),
        (
            BatchingSettings(max_batch_size=2, preferred_batch_sizes=(4,)),
            "preferred_batch_sizes",
            "4 is larger than max_batch_size 2",
        ),
    ],
)
def test_validate_names_the_key_under_its_prefix(settings, key, problem) -> None:
    with pytest.raises(ConfigError) as err:
        settings.validate("models[0].batching")
    assert err.value.key == f"models[0].batching.{key}"
    assert problem in str(err.value)
    with pytest.raises(ValueError, match=rf"^settings\.{key}: "):
        settings.validate("settings", lambda k, p: ValueError(f"{k}: {p}"))
