"""The dataclasses themselves: field docs, validation in constructors, addresses, batching."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import edgeserve.config as cfg
from edgeserve.archive.manifest import BatchingDefaults
from edgeserve.config import (
    BatchingConfig,
    Config,
    ModelBatching,
    ModelConfig,
    ServerConfig,
    grpc_address,
    is_loopback_host,
    parse_listen_address,
)
from edgeserve.errors import ConfigError
from edgeserve.lifecycle import resolve_batch_settings
from edgeserve.types import ModelSettings

CONFIG_SOURCE = Path(cfg.__file__)


def _dataclass_bodies() -> list[ast.ClassDef]:
    tree = ast.parse(CONFIG_SOURCE.read_text(encoding="utf-8"))
    return [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any("dataclass" in ast.unparse(d) for d in node.decorator_list)
    ]


def test_every_config_field_has_a_one_line_docstring() -> None:
    classes = _dataclass_bodies()
    assert {c.name for c in classes} >= {"Config", "ServerConfig", "ModelConfig", "BatchingConfig"}
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
    parsed = {c.name: c for c in _dataclass_bodies()}
    for name, parsed_cls in parsed.items():
        fields = [f.name for f in dataclasses.fields(getattr(cfg, name))]
        annotated = [ast.unparse(n.target) for n in parsed_cls.body if isinstance(n, ast.AnnAssign)]
        assert fields == annotated


def test_constructors_validate_without_load_config() -> None:
    with pytest.raises(ConfigError, match=r"^state_dir: must be an absolute path"):
        Config(state_dir=Path("relative"))
    with pytest.raises(ConfigError, match=r"^listen\[0\]: '0.0.0.0:1' is not a loopback"):
        ServerConfig(listen=("0.0.0.0:1",))
    assert ServerConfig(listen=("0.0.0.0:1",), allow_non_loopback=True).listen == ("0.0.0.0:1",)
    with pytest.raises(ConfigError, match=r"^max_batch_size: must be 1..65536, got 0"):
        ModelBatching(max_batch_size=0)


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


ARCHIVE = BatchingDefaults(max_batch_size=16, max_queue_delay_ms=5.0, preferred_batch_sizes=(8,))


def _resolve(model: ModelConfig, defaults: BatchingConfig | None = None):
    """The daemon's own path: config layers -> ModelSettings -> over the archive."""
    settings = ModelSettings.from_dict(model.settings_dict(defaults))
    return resolve_batch_settings(ARCHIVE, settings)


def _plain(got) -> tuple:
    return (
        got.max_batch_size,
        got.max_queue_delay_s,
        got.max_queue_size,
        got.preferred_batch_sizes,
        got.instances,
    )


def test_batching_archive_over_builtin_defaults() -> None:
    got = _resolve(ModelConfig(name="m"), BatchingConfig())
    assert _plain(got) == (16, 0.005, 256, (8,), 1)


def test_batching_global_settings_over_archive() -> None:
    defaults = BatchingConfig(max_batch_size=8, max_queue_delay_ms=1.0, instances=2)
    got = _resolve(ModelConfig(name="m"), defaults)
    assert (got.max_batch_size, got.max_queue_delay_s, got.instances) == (8, 0.001, 2)
    assert got.preferred_batch_sizes == (8,)  # not set globally: the archive's


def test_batching_per_model_wins_over_everything() -> None:
    model = ModelConfig(
        name="mlp",
        batching=ModelBatching(
            max_batch_size=4,
            max_queue_delay_ms=0.0,
            max_queue_size=10,
            preferred_batch_sizes=(),
            instances=3,
            intra_op_threads=1,
        ),
    )
    defaults = BatchingConfig(max_batch_size=8, max_queue_delay_ms=1.0, instances=2)
    assert _plain(_resolve(model, defaults)) == (4, 0.0, 10, (), 3)


def test_batching_refuses_a_mix_that_does_not_fit() -> None:
    model = ModelConfig(name="mlp", batching=ModelBatching(max_batch_size=4))
    with pytest.raises(ConfigError) as err:
        _resolve(model)  # the archive prefers 8 > 4
    assert err.value.key == "batching.preferred_batch_sizes"


def test_settings_dict_feeds_model_settings() -> None:
    model = ModelConfig(name="m", device="cpu", batching=ModelBatching(instances=2))
    defaults = BatchingConfig(max_queue_size=32, max_queue_delay_ms=1.5)
    settings = ModelSettings(**model.settings_dict(defaults))
    assert settings.instances == 2  # per model
    assert (settings.max_queue_size, settings.max_queue_delay_ms) == (32, 1.5)  # global, set
    assert settings.max_batch_size is None  # left to the archive
    assert settings.device == "cpu"
    assert "max_batch_size" not in ModelConfig(name="m").settings_dict()
