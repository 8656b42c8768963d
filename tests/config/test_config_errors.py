"""Every bad config is a ConfigError whose key is the dotted path of the value at fault."""

from __future__ import annotations

import pytest

from edgeserve.config import load_config
from edgeserve.errors import ConfigError

# (YAML, dotted key, a fragment of the problem)
BAD_CONFIGS = [
    ("server:\n  lisen: []\n", "server.lisen", "unknown key (did you mean 'listen'?)"),
    ("sever: {}\n", "sever", "unknown key (did you mean 'server'?)"),
    ("zzz: 1\n", "zzz", "unknown key; known: state_dir, run_dir, server"),
    (
        "models:\n  - name: a\n  - name: b\n    batching: {max_queue_delay_ms: -3}\n",
        "models[1].batching.max_queue_delay_ms",
        "must be 0..60000, got -3.0",
    ),
    (
        "models:\n  - name: a\n    batching: {max_batchsize: 8}\n",
        "models[0].batching.max_batchsize",
        "did you mean 'max_batch_size'?",
    ),
    ("models:\n  - default: true\n", "models[0].archive", "set 'archive' or 'name'"),
    ("models:\n  - name: 'bad name'\n", "models[0].name", "letters, digits"),
    ("models: {name: a}\n", "models", "must be a list, got dict"),
    (
        "models:\n  - {name: a, version: '1'}\n  - {name: a, version: '1'}\n",
        "models[1]",
        "same model and version as models[0]",
    ),
    (
        "models:\n  - {name: a, version: '1', default: true}\n"
        "  - {name: a, version: '2', default: true}\n",
        "models[1].default",
        "models[0] is already the default of 'a'",
    ),
    ("models:\n  - {archive: /nonexistent/m.esar}\n", "models[0].archive", "file not found"),
    ("models:\n  - {name: a, device: tpu}\n", "models[0].device", "auto, cpu, cuda or cuda:N"),
    (
        "server:\n  listen: ['unix:///tmp/a.sock', '0.0.0.0:8001']\n",
        "server.listen[1]",
        "'0.0.0.0:8001' is not a loopback address; set server.allow_non_loopback",
    ),
    ("server:\n  listen: ['192.168.1.5:8001']\n", "server.listen[0]", "not a loopback"),
    ("server:\n  listen: ['unix://relative.sock']\n", "server.listen[0]", "must be absolute"),
    (
        "server:\n  listen: ['unix:///" + "x" * 120 + "']\n",
        "server.listen[0]",
        "longer than 107 bytes",
    ),
    ("server:\n  listen: ['127.0.0.1:99999']\n", "server.listen[0]", "port must be 0..65535"),
    ("server:\n  listen: ['::1:8001']\n", "server.listen[0]", "must be unix:///path, host:port"),
    ("server:\n  listen: ['127.0.0.1:1', '127.0.0.1:1']\n", "server.listen[1]", "duplicate"),
    ("server:\n  listen: []\n", "server.listen", "needs at least one address"),
    ("server:\n  max_message_bytes: 10\n", "server.max_message_bytes", "1024..2147483647"),
    ("server:\n  grace_period_s: ten\n", "server.grace_period_s", "must be a number"),
    ("server:\n  allow_non_loopback: 'yes'\n", "server.allow_non_loopback", "true or false"),
    ("server: 5\n", "server", "must be a mapping, got int"),
    (
        "management:\n  listen: ['127.0.0.1:9000']\n",
        "management.token_file",
        "required because listen has TCP address '127.0.0.1:9000'",
    ),
    (
        "server: {allow_non_loopback: true}\nmanagement:\n  listen: ['10.0.0.1:9000']\n",
        "management.listen[0]",
        "management is local only",
    ),
    ("management:\n  socket_mode: 0666\n", "management.socket_mode", "nothing for others"),
    (
        "management:\n  allowed_group: 'wheel staff'\n",
        "management.allowed_group",
        "not a valid group name",
    ),
    (
        "management:\n  listen: [127.0.0.1:9000]\n  token_file: /nonexistent/token\n",
        "management.token_file",
        "file not found",
    ),
    ("runtime:\n  device: gpu\n", "runtime.device", "must be auto, cpu, cuda or cuda:N"),
    ("runtime:\n  memory_budget_mb: -1\n", "runtime.memory_budget_mb", "must be >= 0"),
    ("runtime:\n  memory_budget_mb: 1.5\n", "runtime.memory_budget_mb", "must be an integer"),
    ("trust:\n  keys: [/nonexistent/key.pem]\n", "trust.keys[0]", "file not found"),
    (
        "batching:\n  preferred_batch_sizes: [4, 2]\n",
        "batching.preferred_batch_sizes",
        "ascending distinct",
    ),
    (
        "batching:\n  max_batch_size: 4\n  preferred_batch_sizes: [2, 8]\n",
        "batching.preferred_batch_sizes",
        "8 is larger than max_batch_size 4",
    ),
    ("batching:\n  instances: 0\n", "batching.instances", "must be 1..64"),
    ("batching:\n  max_batch_size: true\n", "batching.max_batch_size", "must be an integer"),
    (
        "metrics:\n  prometheus_listen: 0.0.0.0:9100\n",
        "metrics.prometheus_listen",
        "not a loopback",
    ),
    (
        "metrics:\n  prometheus_listen: unix:///tmp/m.sock\n",
        "metrics.prometheus_listen",
        "must be a TCP host:port",
    ),
    (
        "logging:\n  level: loud\n",
        "logging.level",
        "must be one of debug, info, warning, error, critical, got 'loud'",
    ),
    ("logging:\n  format: xml\n", "logging.format", "must be one of json, text"),
    ("state_dir: ''\n", "state_dir", "must be a path"),
]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    BAD_CONFIGS,
    ids=[f"{i:02d}-{case[1]}" for i, case in enumerate(BAD_CONFIGS)],
)
def test_bad_config_names_the_key(write_yaml, text: str, key: str, problem: str) -> None:
    path = write_yaml(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={}, overrides={"run_dir": "/run/es-test"})
    assert err.value.key == key
    message = str(err.value)
    assert message.startswith(f"{key}: "), message
    assert problem in message
    assert f"({path} line " in message  # and where in the file it was set


def test_non_loopback_is_allowed_only_when_asked(write_yaml) -> None:
    text = (
        "server:\n  listen: ['0.0.0.0:8001']\n  allow_non_loopback: true\n"
        "metrics:\n  prometheus_listen: '[::]:9100'\n"
    )
    config = load_config(write_yaml(text), env={})
    assert config.server.listen == ("0.0.0.0:8001",)
    assert config.metrics.prometheus_listen == "[::]:9100"


def test_bad_environment_values_name_the_key_and_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"EDGESERVE_MEMORY_BUDGET_MB": "lots"})
    assert err.value.key == "runtime.memory_budget_mb"
    assert "$EDGESERVE_MEMORY_BUDGET_MB" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"EDGESERVE_LISTEN": "0.0.0.0:1"})
    assert err.value.key == "server.listen[0]"
    assert "from $EDGESERVE_LISTEN" in str(err.value)


def test_unknown_override_key_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={}, overrides={"server.lisen": ["127.0.0.1:1"]})
    assert str(err.value) == "server.lisen: unknown key (did you mean 'listen'?) (from overrides)"
