"""The ``fleet`` keys of signed updates: root, probation, activation window, artifact cap."""

from __future__ import annotations

import pytest

from edgeserve.config import Config, FleetConfig, ProbationConfig, load_config
from edgeserve.config import parse_activation_window as window
from edgeserve.errors import ConfigError

RUN_DIR = {"run_dir": "/run/es-test"}

BAD = [
    ("fleet: {probation_s: -1}", "fleet.probation_s", "must be 0..86400 seconds"),
    ("fleet: {probation_s: 90000}", "fleet.probation_s", "must be 0..86400 seconds"),
    ("fleet: {probation_s: soon}", "fleet.probation_s", "must be a number"),
    ("fleet: {probation: {max_error_rate: 2}}", "fleet.probation.max_error_rate", "0..1"),
    ("fleet: {probation: {min_requests: 0}}", "fleet.probation.min_requests", "1..1000000"),
    ("fleet: {probation: {min_requests: 2.5}}", "fleet.probation.min_requests", "an integer"),
    ("fleet: {probation: {max_p99_ratio: 0.5}}", "fleet.probation.max_p99_ratio", "1..1000"),
    ("fleet: {probation: {p99_floor_ms: -1}}", "fleet.probation.p99_floor_ms", "0..600000"),
    ("fleet: {probation: {max_errors: 1}}", "fleet.probation.max_errors", "unknown key"),
    ("fleet: {probation: 3}", "fleet.probation", "must be a mapping"),
    ("fleet: {activation_window: '1:00-2:00'}", "fleet.activation_window", "HH:MM-HH:MM"),
    ("fleet: {activation_window: '24:00-02:00'}", "fleet.activation_window", "HH:MM-HH:MM"),
    ("fleet: {activation_window: '02:00-02:00'}", "fleet.activation_window", "must differ"),
    ("fleet: {max_artifact_bytes: 1000}", "fleet.max_artifact_bytes", "1 MiB"),
    ("fleet: {max_artifact_bytes: 1.5}", "fleet.max_artifact_bytes", "an integer"),
    ("fleet: {root: ''}", "fleet.root", "must be a path"),
]


@pytest.mark.parametrize(
    ("text", "key", "problem"), BAD, ids=[f"{i:02d}-{c[1]}" for i, c in enumerate(BAD)]
)
def test_bad_key_is_named_with_its_line(write_yaml, text: str, key: str, problem: str) -> None:
    path = write_yaml("state_dir: /srv/es\n" + text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={}, overrides=RUN_DIR)
    assert err.value.key == key
    assert problem in str(err.value)
    assert f"({path} line 2)" in str(err.value)


def test_defaults_follow_nothing() -> None:
    fleet = Config().fleet
    assert fleet.root is None
    assert fleet.probation_s == 60
    assert fleet.probation == ProbationConfig(0.01, 20, 3.0, 20)
    assert fleet.activation_window is None
    assert fleet.max_artifact_bytes == 2 * 1024**3


def test_a_full_section_loads_with_the_root_relative_to_the_file(write_yaml, tmp_path) -> None:
    path = write_yaml(
        "state_dir: /srv/es\n"
        "fleet:\n"
        "  broker: mqtt://127.0.0.1\n"
        "  device_id: dev-1\n"
        "  root: root.json\n"
        "  probation_s: 5\n"
        "  probation: {max_error_rate: 0.5, min_requests: 3}\n"
        "  activation_window: '22:30-04:00'\n"
        "  max_artifact_bytes: 1048576\n"
    )
    (path.parent / "root.json").write_text("{}")
    fleet = load_config(path, env={}, overrides=RUN_DIR).fleet
    assert fleet.root == path.parent / "root.json"
    assert fleet.probation_s == 5
    assert fleet.probation == ProbationConfig(0.5, 3, 3.0, 20)
    assert fleet.activation_window == "22:30-04:00"
    assert fleet.max_artifact_bytes == 1 << 20


def test_the_root_file_is_not_required_without_a_broker(write_yaml) -> None:
    path = write_yaml("state_dir: /srv/es\nfleet: {root: /nonexistent/root.json}\n")
    assert load_config(path, env={}, overrides=RUN_DIR).fleet.root is not None


def test_activation_windows() -> None:
    assert window(None, "k") is None
    assert window("00:00-23:59", "k") == (0, 23 * 60 + 59)
    assert window("22:00-02:30", "k") == (22 * 60, 150)  # over midnight
    with pytest.raises(ConfigError):
        FleetConfig(activation_window="7-8")
