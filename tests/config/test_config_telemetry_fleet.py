"""The ``telemetry`` and ``fleet`` sections: defaults, paths, environment, and every key's
errors naming the dotted key and the line it was set on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edgeserve.config import (
    Config,
    FleetConfig,
    TelemetryConfig,
    default_device_id,
    load_config,
    parse_broker_url,
)
from edgeserve.errors import ConfigError

RUN_DIR = {"run_dir": "/run/es-test"}

BAD = [
    ("telemetry: {enabled: 'yes'}", "telemetry.enabled", "must be true or false"),
    ("telemetry: {db: ''}", "telemetry.db", "must be a path"),
    ("telemetry: {interval_s: 0.2}", "telemetry.interval_s", "must be 0.5..3600 seconds"),
    ("telemetry: {interval_s: 7200}", "telemetry.interval_s", "must be 0.5..3600 seconds"),
    ("telemetry: {interval_s: fast}", "telemetry.interval_s", "must be a number"),
    ("telemetry: {max_bytes: 65535}", "telemetry.max_bytes", "must be 65536 (64 KiB)"),
    ("telemetry: {max_bytes: 1.5}", "telemetry.max_bytes", "must be an integer"),
    ("telemetry: {batch_bytes: 100}", "telemetry.batch_bytes", "must be 1024..16777216"),
    ("telemetry: {batch_bytes: 33554432}", "telemetry.batch_bytes", "must be 1024..16777216"),
    ("telemetry: {upload_bytes_per_s: 0}", "telemetry.upload_bytes_per_s", "1024..1073741824"),
    ("telemetry: {sample_every_s: 0}", "telemetry.sample_every_s", "must be 0.1..3600 seconds"),
    ("telemetry: {intervall_s: 1}", "telemetry.intervall_s", "did you mean 'interval_s'?"),
    ("telemetry: 5", "telemetry", "must be a mapping, got int"),
    ("fleet: {broker: 'http://h:1'}", "fleet.broker", "scheme must be mqtt:// or mqtts://"),
    ("fleet: {broker: 'h:1883'}", "fleet.broker", "must be mqtt://host[:port]"),
    ("fleet: {broker: 'mqtt://'}", "fleet.broker", "needs a host name or address"),
    ("fleet: {broker: 'mqtt://h:0'}", "fleet.broker", "port must be 1..65535"),
    ("fleet: {broker: 'mqtt://h:99999'}", "fleet.broker", "port must be 1..65535"),
    ("fleet: {broker: 'mqtt://h/x'}", "fleet.broker", "must be mqtt://host[:port]"),
    ("fleet: {broker: 'mqtt://[zz]:1'}", "fleet.broker", "not an IPv6 address"),
    ("fleet: {broker: 'mqtt://u:p@h'}", "fleet.broker", "no credentials in the URL"),
    ("fleet: {device_id: 'dev 1'}", "fleet.device_id", "1-64 of letters, digits"),
    ("fleet: {device_id: " + "x" * 65 + "}", "fleet.device_id", "1-64 of letters"),
    ("fleet: {device_id: 'a/b'}", "fleet.device_id", "1-64 of letters"),
    ("fleet: {groups: [lab, 'x+y']}", "fleet.groups[1]", "1-64 of letters"),
    ("fleet: {groups: [lab, lab]}", "fleet.groups[1]", "duplicate group"),
    ("fleet: {groups: {a: 1}}", "fleet.groups", "must be a list"),
    ("fleet: {topic_prefix: 'a/#'}", "fleet.topic_prefix", "joined by '/'"),
    ("fleet: {topic_prefix: '/a'}", "fleet.topic_prefix", "joined by '/'"),
    ("fleet: {topic_prefix: 'a//b'}", "fleet.topic_prefix", "joined by '/'"),
    ("fleet: {topic_prefix: 'a/+/b'}", "fleet.topic_prefix", "joined by '/'"),
    ("fleet: {username: ''}", "fleet.username", "must be a non-empty string"),
    ("fleet: {tls: {key_file: /k}}", "fleet.tls.key_file", "only together with cert_file"),
    ("fleet: {tls: {cafile: /k}}", "fleet.tls.cafile", "did you mean 'ca_file'?"),
    (
        "fleet: {broker: 'mqtt://h', tls: {ca_file: /ca.pem}}",
        "fleet.tls.ca_file",
        "use mqtts:// (TLS is never optional)",
    ),
    ("fleet: {password_file: /p}", "fleet.password_file", "set username too"),
    (
        "fleet: {broker: 'mqtt://broker.example', username: u, password_file: /p}",
        "fleet.password_file",
        "would go in clear text to 'broker.example': use mqtts://",
    ),
    ("fleet: {broker: 'mqtts://h', tls: {ca_file: /nonexistent.pem}}", "fleet.tls.ca_file", ""),
    (
        "fleet: {broker: 'mqtts://h', tls: {cert_file: /no.crt, key_file: /no.key}}",
        "fleet.tls.cert_file",
        "file not found",
    ),
    (
        "fleet: {broker: 'mqtts://h', username: u, password_file: /nonexistent}",
        "fleet.password_file",
        "file not found",
    ),
    ("fleet: {broker: 'mqtt://h', root: /nonexistent/root.json}", "fleet.root", "file not found"),
]


@pytest.mark.parametrize(
    ("text", "key", "problem"), BAD, ids=[f"{i:02d}-{c[1]}" for i, c in enumerate(BAD)]
)
def test_bad_key_is_named_with_its_line(write_yaml, text: str, key: str, problem: str) -> None:
    path = write_yaml("state_dir: /srv/es\n" + text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={}, overrides=RUN_DIR)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
    assert problem in str(err.value)
    assert f"({path} line 2)" in str(err.value)


def test_defaults_are_on_and_alone() -> None:
    config = Config()
    assert config.telemetry == TelemetryConfig(
        enabled=True,
        db=None,
        interval_s=10.0,
        max_bytes=67108864,
        batch_bytes=65536,
        upload_bytes_per_s=65536,
        sample_every_s=1.0,
    )
    assert config.telemetry_db() == Path("/var/lib/edgeserve/telemetry.db")
    assert config.fleet.broker is None  # no broker: the daemon runs as it always did
    assert (config.fleet.topic_prefix, config.fleet.groups) == ("edgeserve/v1", ())
    assert config.fleet.topic("dev-1", "online") == "edgeserve/v1/devices/dev-1/online"


def test_a_full_section_loads_with_paths_relative_to_the_file(write_yaml, tmp_path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("ca.pem", "client.crt"):
        (etc / name).write_text("pem")
    for name in ("client.key", "password"):
        (etc / name).write_text("secret")
        (etc / name).chmod(0o640)
    text = """\
        state_dir: /srv/es
        telemetry: {db: spool/t.db, interval_s: 0.5, max_bytes: 65536, batch_bytes: 1024,
                    upload_bytes_per_s: 2048, sample_every_s: 0.1}
        fleet:
          broker: MQTTS://[::1]
          device_id: dev-1.lab_2
          groups: [lab, north.site-3]
          topic_prefix: acme/edge/v2
          tls: {ca_file: ca.pem, cert_file: client.crt, key_file: client.key}
          username: dev-1
          password_file: password
        """
    config = load_config(write_yaml(text), env={}, overrides=RUN_DIR)
    assert config.telemetry_db() == etc / "spool" / "t.db"
    assert (config.telemetry.interval_s, config.telemetry.sample_every_s) == (0.5, 0.1)
    fleet = config.fleet
    assert parse_broker_url(fleet.broker or "") == ("mqtts", "::1", 8883)
    assert (fleet.device_id, fleet.groups) == ("dev-1.lab_2", ("lab", "north.site-3"))
    assert (fleet.tls.ca_file, fleet.tls.key_file) == (etc / "ca.pem", etc / "client.key")
    assert fleet.password_file == etc / "password"
    assert fleet.topic("dev-1.lab_2", "telemetry") == "acme/edge/v2/devices/dev-1.lab_2/telemetry"


@pytest.mark.parametrize("key", ["tls.key_file", "password_file"])
def test_secrets_open_to_others_are_refused(write_yaml, tmp_path, key: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    secret.chmod(0o644)
    cert = tmp_path / "client.crt"
    cert.write_text("pem")
    texts = {
        "tls.key_file": f"tls: {{cert_file: {cert}, key_file: {secret}}}",
        "password_file": f"username: u, password_file: {secret}",
    }
    text = f"fleet: {{broker: 'mqtts://h', {texts[key]}}}\n"
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(text), env={}, overrides=RUN_DIR)
    assert err.value.key == f"fleet.{key}"
    assert "is open to others; chmod o-rwx it" in str(err.value)
    secret.chmod(0o640)
    loaded = load_config(write_yaml(text), env={}, overrides=RUN_DIR)
    assert loaded.fleet.broker == "mqtts://h"


def test_fleet_files_are_not_required_without_a_broker(write_yaml) -> None:
    text = "fleet: {tls: {ca_file: /nonexistent.pem}, username: u, password_file: /nope}\n"
    config = load_config(write_yaml(text), env={}, overrides=RUN_DIR)
    assert config.fleet.broker is None


def test_plain_mqtt_password_is_allowed_on_loopback(write_yaml, tmp_path) -> None:
    password = tmp_path / "pw"
    password.write_text("s")
    password.chmod(0o600)
    text = f"fleet: {{broker: 'mqtt://127.0.0.1:1884', username: u, password_file: {password}}}"
    config = load_config(write_yaml(text + "\n"), env={}, overrides=RUN_DIR)
    assert parse_broker_url(config.fleet.broker or "") == ("mqtt", "127.0.0.1", 1884)


def test_telemetry_db_that_is_a_directory_is_refused(write_yaml, tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(f"telemetry: {{db: {tmp_path}}}\n"), env={}, overrides=RUN_DIR)
    assert err.value.key == "telemetry.db"
    assert "is a directory" in str(err.value)


def test_environment_variables_for_the_fleet() -> None:
    env = {
        "EDGESERVE_FLEET_BROKER": "mqtt://localhost",
        "EDGESERVE_FLEET_DEVICE_ID": "dev-9",
        "EDGESERVE_FLEET_GROUPS": "a, b,,c",
    }
    fleet = load_config(None, env=env, overrides=RUN_DIR).fleet
    assert (fleet.broker, fleet.device_id, fleet.groups) == (
        "mqtt://localhost",
        "dev-9",
        ("a", "b", "c"),
    )
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"EDGESERVE_FLEET_BROKER": "tcp://x"}, overrides=RUN_DIR)
    assert err.value.key == "fleet.broker"
    assert "$EDGESERVE_FLEET_BROKER" in str(err.value)


def test_device_id_defaults_to_a_valid_hostname() -> None:
    assert default_device_id() in (socket.gethostname(), None)
    # The constructors validate without load_config too, naming the key inside the section.
    with pytest.raises(ConfigError, match=r"^device_id: must be 1-64"):
        FleetConfig(device_id="")
    with pytest.raises(ConfigError, match=r"^interval_s: must be 0.5..3600"):
        TelemetryConfig(interval_s=0.49)
    assert TelemetryConfig(interval_s=0.5).interval_s == 0.5


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("mqtt://h", ("mqtt", "h", 1883)),
        ("mqtts://h", ("mqtts", "h", 8883)),
        ("mqtt://10.0.0.2:1884", ("mqtt", "10.0.0.2", 1884)),
        ("mqtts://[fe80::1]:8884", ("mqtts", "fe80::1", 8884)),
    ],
)
def test_broker_urls(url: str, parsed: tuple[str, str, int]) -> None:
    assert parse_broker_url(url) == parsed
