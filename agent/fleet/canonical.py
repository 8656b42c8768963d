"""Fleet documents on the wire: canonical JSON, bounded parsing and the signed envelope.

Pure data, no I/O and no cryptography (``verifier`` signs and checks signatures); the
schemas of what an envelope carries are ``fleet/documents.py``.

Canonical JSON (what a signature covers): the value serialised with keys sorted by code
point, no insignificant whitespace (``,`` and ``:``), UTF-8 with non-ASCII characters
written as themselves (``ensure_ascii=False``). Only null, booleans, integers, strings,
arrays and objects with string keys: **floats are refused**, so no two serialisers can
disagree about ``1.0`` against ``1`` or ``1e0``. (A deployment's batching therefore gives
``max_queue_delay_ms`` in whole milliseconds.) Parsing refuses what canonical JSON cannot
say back (floats, NaN, duplicate keys) and is bounded: at most ``MAX_DOCUMENT_BYTES`` and
``MAX_DEPTH`` levels of nesting, checked before the JSON parser runs, so a hostile
document is a ``DocumentRefused("schema")``, never a ``RecursionError``.

The envelope::

    {"signed": {...}, "signatures": [{"keyid": "<64 hex>", "sig": "<base64>"}]}

``keyid`` is the hex sha256 of the raw 32-byte Ed25519 public key; ``sig`` is the
Ed25519 signature over ``canonical_bytes(signed)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from edgeserve import jsonsafe
from edgeserve.errors import DocumentRefused

MAX_DOCUMENT_BYTES = 64 * 1024
MAX_DEPTH = 16
MAX_SIGNATURES = 32

HEX64 = re.compile(r"[0-9a-f]{64}")


def _bad(where: str, problem: str) -> NoReturn:
    raise DocumentRefused.schema(where, problem)


# -- canonical JSON --------------------------------------------------------------------------


def canonical_bytes(value: Any) -> bytes:
    """The canonical JSON of ``value`` (see the module docstring); refuses floats."""
    _check_value(value, "", 0)
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except UnicodeEncodeError:
        _bad("", "a string is not valid Unicode (lone surrogate)")


def _check_value(value: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        _bad(where, f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        _bad(where, f"floats are not allowed in fleet documents, got {value!r}")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                _bad(where, f"object keys must be strings, got {key!r}")
            _check_value(item, f"{where}.{key}" if where else key, depth + 1)
        return
    _bad(where, f"not a JSON value: {type(value).__name__}")


def parse_json(
    data: bytes, *, max_bytes: int = MAX_DOCUMENT_BYTES, max_depth: int = MAX_DEPTH
) -> Any:
    """A JSON value from untrusted bytes, bounded in size and depth; no floats, no NaN,
    no duplicate keys (``jsonsafe.parse_json``). Every refusal is ``DocumentRefused("schema")``."""
    try:
        return jsonsafe.parse_json(
            data, max_bytes=max_bytes, max_depth=max_depth, allow_floats=False
        )
    except jsonsafe.JsonRefused as exc:
        _bad("", str(exc))


# -- the envelope ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope; ``signed_bytes`` is what the signatures must cover."""

    signed: Mapping[str, Any]
    signatures: tuple[Signature, ...]

    @property
    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.signed)


def key_id(public_key_raw: bytes) -> str:
    """The keyid of a raw 32-byte Ed25519 public key: hex sha256 of those bytes."""
    if len(public_key_raw) != 32:
        _bad("keys", f"an Ed25519 public key has 32 bytes, got {len(public_key_raw)}")
    return hashlib.sha256(public_key_raw).hexdigest()


def envelope_bytes(signed: Mapping[str, Any], signatures: list[Signature]) -> bytes:
    """The canonical bytes of an envelope (what is published and written to files)."""
    sigs = [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in signatures]
    return canonical_bytes({"signed": dict(signed), "signatures": sigs})


def parse_envelope(data: bytes, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> Envelope:
    """The envelope's shape only: the schema of ``signed`` is the document type's."""
    document = parse_json(data, max_bytes=max_bytes)
    exact_keys(document, "", {"signed", "signatures"})
    signed, sigs = document["signed"], document["signatures"]
    if not isinstance(signed, dict):
        _bad("signed", "must be an object")
    if not isinstance(sigs, list) or len(sigs) > MAX_SIGNATURES:
        _bad("signatures", f"must be a list of at most {MAX_SIGNATURES}")
    parsed = []
    for i, entry in enumerate(sigs):
        where = f"signatures[{i}]"
        exact_keys(entry, where, {"keyid", "sig"})
        keyid, sig = entry["keyid"], entry["sig"]
        if not isinstance(keyid, str) or not HEX64.fullmatch(keyid):
            _bad(f"{where}.keyid", "must be 64 lowercase hex digits")
        if not isinstance(sig, str):
            _bad(f"{where}.sig", "must be a base64 string")
        parsed.append(Signature(keyid, decode_b64(sig, f"{where}.sig")))
    return Envelope(signed, tuple(parsed))


def decode_b64(text: str, where: str) -> bytes:
    """Strict base64; refused as ``where`` when it is not."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        _bad(where, "is not base64")


def exact_keys(value: Any, where: str, keys: set[str]) -> None:
    """Refuse ``value`` unless it is an object with exactly ``keys``."""
    if not isinstance(value, dict):
        _bad(where, "must be an object")
    unknown, missing = set(value) - keys, keys - set(value)
    if unknown:
        _bad(where, f"unknown key(s) {', '.join(sorted(unknown))}")
    if missing:
        _bad(where, f"missing key(s) {', '.join(sorted(missing))}")
