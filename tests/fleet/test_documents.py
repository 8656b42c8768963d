"""Fleet documents: canonical bytes, bounded parsing, the envelope and the schemas."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from edgeserve.errors import DocumentRefused, InvalidArgument
from edgeserve.fleet.canonical import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    Signature,
    canonical_bytes,
    envelope_bytes,
    key_id,
    parse_envelope,
    parse_json,
)
from edgeserve.fleet.documents import Deployment, Root, parse_time, parse_window

SHA = "ab" * 32


def deployment_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "type": "deployment",
        "serial": 3,
        "expires": "2030-01-01T00:00:00Z",
        "target": {"devices": ["dev-1"], "groups": []},
        "requires": {
            "arch": None,
            "min_free_disk_mb": 0,
            "min_free_memory_mb": 0,
            "accelerator": None,
        },
        "probation_s": 60,
        "activation_window": None,
        "models": [model()],
    }
    fields.update(overrides)
    return fields


def model(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "mlp",
        "version": "2",
        "sha256": SHA,
        "length": 1024,
        "source": {"mqtt": True},
        "default": True,
        "batching": {"max_batch_size": 8, "max_queue_delay_ms": 2},
    }
    entry.update(overrides)
    return entry


def refused_schema(fields: dict[str, Any], *fragments: str, max_length: int = 2**31) -> str:
    with pytest.raises(DocumentRefused) as caught:
        Deployment.from_signed(fields, max_length=max_length)
    assert caught.value.reason == "schema"
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    return str(caught.value)


# -- canonical JSON --------------------------------------------------------------------------


def test_canonical_bytes_are_sorted_compact_utf8() -> None:
    one = {"b": [1, True, None], "a": {"é": "ü", "z": "x"}, "c": "日本"}
    two = {"c": "日本", "a": {"z": "x", "é": "ü"}, "b": [1, True, None]}
    expected = '{"a":{"z":"x","é":"ü"},"b":[1,true,null],"c":"日本"}'.encode()
    assert canonical_bytes(one) == expected
    assert canonical_bytes(two) == expected
    assert canonical_bytes(parse_json(json.dumps(one, indent=4).encode())) == expected


def test_floats_are_refused_both_ways() -> None:
    with pytest.raises(DocumentRefused, match="floats"):
        canonical_bytes({"x": 1.0})
    for text in (b'{"x": 1.5}', b'{"x": 1e3}', b'{"x": NaN}', b'{"x": Infinity}'):
        with pytest.raises(DocumentRefused) as caught:
            parse_json(text)
        assert caught.value.reason == "schema"


def test_refusals_are_invalid_arguments_with_a_reason() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_json(b"{not json")
    assert isinstance(caught.value, DocumentRefused)
    assert caught.value.reason == "schema" and "not valid JSON" in str(caught.value)


def test_a_document_over_the_size_limit_is_refused_before_parsing() -> None:
    data = b'{"x":"' + b"a" * MAX_DOCUMENT_BYTES + b'"}'
    with pytest.raises(DocumentRefused, match="more than the"):
        parse_json(data)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 30_000])
def test_deep_nesting_is_a_schema_error_not_a_recursion_error(depth: int) -> None:
    data = b"[" * depth + b"]" * depth
    with pytest.raises(DocumentRefused, match="nested deeper") as caught:
        parse_json(data, max_bytes=10**6)
    assert caught.value.reason == "schema"


def test_nesting_at_the_limit_parses_and_brackets_in_strings_do_not_count() -> None:
    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    assert parse_json(b'{"s": "[[[[[[[[[[[[[[[[[[[[[[[[\\"[[[["}')["s"].startswith("[[[")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_ambiguous_or_hostile_json_is_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(DocumentRefused, match=fragment):
        parse_json(data)


# -- the envelope ----------------------------------------------------------------------------


def test_envelope_round_trip_and_key_id() -> None:
    raw = bytes(range(32))
    assert key_id(raw) == hashlib.sha256(raw).hexdigest()
    data = envelope_bytes({"type": "x"}, [Signature(key_id(raw), b"\x01" * 64)])
    envelope = parse_envelope(data)
    assert envelope.signed == {"type": "x"}
    assert envelope.signatures == (Signature(key_id(raw), b"\x01" * 64),)
    assert envelope.signed_bytes == b'{"type":"x"}'


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"signed": {}, "signatures": [], "extra": 1}, "unknown key"),
        ({"signed": {}}, "missing key"),
        ({"signed": [], "signatures": []}, "signed: must be an object"),
        ({"signed": {}, "signatures": [{"keyid": "AB" * 32, "sig": ""}]}, "keyid"),
        ({"signed": {}, "signatures": [{"keyid": SHA, "sig": "***"}]}, "not base64"),
        ({"signed": {}, "signatures": [{"keyid": SHA, "sig": "", "x": 1}]}, "unknown key"),
    ],
)
def test_malformed_envelopes_are_refused(document: dict[str, Any], fragment: str) -> None:
    with pytest.raises(DocumentRefused, match=fragment):
        parse_envelope(json.dumps(document).encode())


# -- schemas ---------------------------------------------------------------------------------


def test_a_valid_deployment_parses() -> None:
    fields = deployment_fields(
        activation_window="22:30-04:00",
        models=[model(), model(version="1", default=False, source={"url": "https://h/a.esar"})],
    )
    deployment = Deployment.from_signed(fields)
    assert deployment.serial == 3
    assert deployment.activation_window == (22 * 60 + 30, 4 * 60)
    assert [(m.name, m.version, m.url) for m in deployment.models] == [
        ("mlp", "2", None),
        ("mlp", "1", "https://h/a.esar"),
    ]
    assert deployment.models[0].batching == {"max_batch_size": 8, "max_queue_delay_ms": 2}


@pytest.mark.parametrize("bad", ["../etc", "..", "a/b", ".hidden", "a\\b", "", "x" * 129, "é"])
@pytest.mark.parametrize("field", ["name", "version"])
def test_names_that_are_not_plain_are_refused(field: str, bad: str) -> None:
    refused_schema(deployment_fields(models=[model(**{field: bad})]), f"models[0].{field}")


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (model(sha256=SHA.upper()), "sha256"),
        (model(sha256=SHA[:-1]), "sha256"),
        (model(length=0), "length"),
        (model(length=2**31 + 1), "length"),
        (model(length=True), "length"),
        (model(source={"url": "ftp://h/a"}), "source.url"),
        (model(source={"url": "file:///etc/passwd"}), "source.url"),
        (model(source={"url": "https://user:pw@h/a"}), "source.url"),
        (model(source={"mqtt": False}), "source"),
        (model(source={"mqtt": True, "url": "https://h/a"}), "source"),
        (model(default="yes"), "default"),
        (model(batching={"max_queue_delay_ms": 0.5}), "floats"),
        (model(batching={"max_batch_size": 0}), "max_batch_size"),
        (model(batching={"threads": 2}), "unknown key"),
        (model(extra=1), "unknown key"),
    ],
)
def test_bad_model_entries_are_refused(entry: dict[str, Any], fragment: str) -> None:
    # Through the parser, as a device reads it (floats are refused there).
    text = json.dumps(deployment_fields(models=[entry]))
    with pytest.raises(DocumentRefused, match=fragment) as caught:
        Deployment.from_signed(parse_json(text.encode()), max_length=2**31)
    assert caught.value.reason == "schema"


def test_one_default_per_model_name_and_no_duplicates() -> None:
    refused_schema(deployment_fields(models=[model(), model(version="3")]), "more than one default")
    refused_schema(deployment_fields(models=[model(), model(default=False)]), "listed twice")
    Deployment.from_signed(deployment_fields(models=[model(), model(name="b")]))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"type": "root"}, "signed.type"),
        ({"serial": 0}, "serial"),
        ({"serial": "4"}, "serial"),
        ({"expires": "2030-01-01T00:00:00"}, "expires"),
        ({"expires": "2030-02-30T00:00:00Z"}, "expires"),
        ({"target": {"devices": [], "groups": []}}, "names no device"),
        ({"target": {"devices": ["a/b"], "groups": []}}, "target.devices"),
        ({"requires": {"arch": "x86_64"}}, "missing key"),
        ({"probation_s": -1}, "probation_s"),
        ({"activation_window": "25:00-01:00"}, "activation_window"),
        ({"activation_window": "08:00-08:00"}, "same time"),
        ({"surprise": 1}, "unknown key"),
    ],
)
def test_bad_deployment_fields_are_refused(overrides: dict[str, Any], fragment: str) -> None:
    refused_schema(deployment_fields(**overrides), fragment)


def test_root_schema_binds_keyids_to_keys() -> None:
    raw = bytes(range(32))
    text = base64.b64encode(raw).decode()
    signed = {
        "type": "root",
        "version": 1,
        "keys": {key_id(raw): text},
        "threshold": 1,
        "expires": "2030-01-01T00:00:00Z",
    }
    root = Root.from_signed(signed)
    assert root.keys == {key_id(raw): raw} and root.to_signed() == signed
    with pytest.raises(DocumentRefused, match="keyid is not the sha256"):
        Root.from_signed({**signed, "keys": {SHA: text}})
    with pytest.raises(DocumentRefused, match="threshold"):
        Root.from_signed({**signed, "threshold": 2})
    with pytest.raises(DocumentRefused, match="32 bytes"):
        Root.from_signed({**signed, "keys": {SHA: base64.b64encode(raw[:31]).decode()}})


def test_times_and_windows() -> None:
    assert parse_time("2027-01-01T00:00:00Z").isoformat() == "2027-01-01T00:00:00+00:00"
    assert parse_window(None) is None
    assert parse_window("00:00-23:59") == (0, 23 * 60 + 59)
    with pytest.raises(DocumentRefused):
        parse_time("2027-01-01T00:00:00+01:00")
