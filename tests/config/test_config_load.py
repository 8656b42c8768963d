"""Loading: defaults < YAML < EDGESERVE_* < overrides, paths, run_dir, where errors come from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgeserve.config import (
    DEFAULT_RUN_DIR,
    Config,
    is_loopback_host,
    load_config,
    parse_listen_address,
)
from edgeserve.errors import ConfigError

LAYERED_YAML = """\
    state_dir: /srv/from-yaml
    server:
      grace_period_s: 5
    logging:
      level: warning
      format: text
    """


def test_defaults_listen_on_the_unix_socket_and_loopback_only() -> None:
    config = load_config(None, env={}, overrides={"run_dir": "/run/es-test"})
    assert config.server.listen == ("unix:///run/es-test/inference.sock", "127.0.0.1:8001")
    assert config.management.listen == ("unix:///run/es-test/management.sock",)
    assert config.server.allow_non_loopback is False
    assert config.server.max_message_bytes == 64 * 1024 * 1024
    assert config.metrics.prometheus_listen is None
    assert config.trust.require_signed is True
    for address in (*config.server.listen, *config.management.listen):
        parsed = parse_listen_address(address)
        assert parsed[0] == "unix" or is_loopback_host(parsed[1])


def test_an_empty_file_loads_to_the_dataclass_defaults(write_yaml) -> None:
    # run_dir is pinned: its default depends on the user (see the fallback test below).
    loaded = load_config(write_yaml(""), env={}, overrides={"run_dir": str(DEFAULT_RUN_DIR)})
    assert loaded == Config()


@pytest.mark.parametrize(
    ("env", "overrides", "expected"),
    [
        ({}, {}, ("/srv/from-yaml", "warning", "text")),
        (
            {"EDGESERVE_STATE_DIR": "/srv/from-env", "EDGESERVE_LOG_LEVEL": "ERROR"},
            {},
            ("/srv/from-env", "error", "text"),
        ),
        (
            {"EDGESERVE_STATE_DIR": "/srv/from-env", "EDGESERVE_LOG_LEVEL": "error"},
            {"state_dir": "/srv/from-flag", "logging.format": "json"},
            ("/srv/from-flag", "error", "json"),
        ),
        ({}, {"state_dir": None, "logging.level": None}, ("/srv/from-yaml", "warning", "text")),
    ],
    ids=["yaml-over-defaults", "env-over-yaml", "overrides-over-env", "none-means-not-given"],
)
def test_precedence(write_yaml, env, overrides, expected) -> None:
    config = load_config(write_yaml(LAYERED_YAML), env=env, overrides=overrides)
    assert (str(config.state_dir), config.logging.level, config.logging.format) == expected
    assert config.server.grace_period_s == 5.0  # set in YAML only: every layer keeps it
    assert config.server.max_message_bytes == Config().server.max_message_bytes  # default


def test_every_documented_environment_variable_is_read() -> None:
    env = {
        "EDGESERVE_STATE_DIR": "/srv/s",
        "EDGESERVE_RUN_DIR": "/srv/r",
        "EDGESERVE_LISTEN": "unix:///srv/r/a.sock, [::1]:9001",
        "EDGESERVE_MANAGEMENT": "unix:///srv/r/m.sock",
        "EDGESERVE_DEVICE": "cuda:1",
        "EDGESERVE_MEMORY_BUDGET_MB": "512",
        "EDGESERVE_METRICS_LISTEN": "127.0.0.1:9100",
        "EDGESERVE_LOG_LEVEL": "debug",
        "EDGESERVE_LOG_FORMAT": "text",
        "EDGESERVE_UNRELATED": "ignored",
    }
    c = load_config(None, env=env)
    assert (c.state_dir, c.run_dir) == (Path("/srv/s"), Path("/srv/r"))
    assert c.server.listen == ("unix:///srv/r/a.sock", "[::1]:9001")
    assert c.management.listen == ("unix:///srv/r/m.sock",)
    assert (c.runtime.device, c.runtime.memory_budget_mb) == ("cuda:1", 512)
    assert c.metrics.prometheus_listen == "127.0.0.1:9100"
    assert (c.logging.level, c.logging.format) == ("debug", "text")


def test_sockets_follow_run_dir_unless_set(write_yaml) -> None:
    config = load_config(write_yaml("run_dir: /srv/run\n"), env={})
    assert config.server.listen[0] == "unix:///srv/run/inference.sock"
    assert config.management.listen == ("unix:///srv/run/management.sock",)
    config = load_config(write_yaml("run_dir: /srv/run\nserver: {listen: '127.0.0.1:0'}\n"), env={})
    assert config.server.listen == ("127.0.0.1:0",)


def test_relative_paths_yaml_against_its_folder_overrides_against_cwd(
    write_yaml, files, tmp_path, monkeypatch
) -> None:
    path = write_yaml(f"""\
        state_dir: state
        trust: {{keys: [{files["key"].name}]}}
        models: [{{archive: {files["archive"].name}}}]
        """)
    config = load_config(path, env={})
    assert config.state_dir == path.parent / "state"
    assert config.trust.keys == (files["key"],)
    assert config.models[0].archive == files["archive"]
    monkeypatch.chdir(tmp_path)
    config = load_config(path, env={}, overrides={"state_dir": "elsewhere"})
    assert config.state_dir == tmp_path / "elsewhere"


def test_models_plus_appends_to_the_yaml_list(write_yaml, files) -> None:
    path = write_yaml("models:\n  - name: resnet\n    version: '3'\n")
    config = load_config(
        path, env={}, overrides={"models+": [{"archive": str(files["archive"]), "default": True}]}
    )
    assert [(m.name, m.archive, m.default) for m in config.models] == [
        ("resnet", None, False),
        (None, files["archive"], True),
    ]
    with pytest.raises(ConfigError) as err:
        load_config(path, env={}, overrides={"models+": [{"archive": "/nonexistent.esar"}]})
    assert err.value.key == "models[1].archive"
    assert "from overrides" in str(err.value)


def test_a_single_address_string_is_a_list_of_one(write_yaml) -> None:
    config = load_config(write_yaml("management:\n  listen: unix:///srv/m.sock\n"), env={})
    assert config.management.listen == ("unix:///srv/m.sock",)


def test_errors_say_where_the_value_was_set(write_yaml) -> None:
    path = write_yaml("logging:\n  level: info\nserver:\n  grace_period_s: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value) == f"server.grace_period_s: must be 0..3600, got -1.0 ({path} line 4)"
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"EDGESERVE_LOG_LEVEL": "loud"}, overrides={"server": {}})
    assert err.value.key == "logging.level"
    assert str(err.value).endswith("got 'loud' (from $EDGESERVE_LOG_LEVEL)")


def test_bad_yaml_names_the_file_and_line(write_yaml) -> None:
    path = write_yaml("server:\n  listen: [127.0.0.1:8001\nlogging: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert err.value.key == str(path)
    assert "invalid YAML at line 3" in str(err.value)


def test_duplicate_yaml_keys_are_refused(write_yaml) -> None:
    path = write_yaml("server:\n  grace_period_s: 1\n  grace_period_s: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert err.value.key == "server.grace_period_s"
    assert "line 2 and line 3" in str(err.value)


def test_missing_file_and_non_mapping_top_level(tmp_path, write_yaml) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml", env={})
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_config(write_yaml("- a\n- b\n"), env={})


def test_token_file_may_be_group_readable_never_world_readable(write_yaml, files) -> None:
    path = write_yaml(f"management:\n  listen: [127.0.0.1:9009]\n  token_file: {files['token']}\n")
    assert load_config(path, env={}).management.token_file == files["token"]
    files["token"].chmod(0o644)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert err.value.key == "management.token_file"
    assert "open to others" in str(err.value)


def _run_dirs_as(uid: int, state_dir: Path, xdg: Path) -> list[str]:
    """Resolve the default run_dir in a child process running as ``uid`` (when root)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(uid)
                os.setuid(uid)
            found = [
                str(load_config(None, env=env, overrides={"state_dir": str(state_dir)}).run_dir)
                for env in ({"XDG_RUNTIME_DIR": str(xdg)}, {})
            ]
            os.write(write, json.dumps(found).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


def test_run_dir_falls_back_when_not_root_and_run_is_not_writable(tmp_path) -> None:
    if os.access(DEFAULT_RUN_DIR, os.W_OK) and os.geteuid() != 0:
        pytest.skip(f"{DEFAULT_RUN_DIR} is writable by this user, so it is the right choice")
    found = _run_dirs_as(65534, tmp_path / "state", tmp_path / "xdg")
    assert found == [str(tmp_path / "xdg" / "edgeserve"), str(tmp_path / "state" / "run")]
