"""Ed25519 signatures over model archives.

An archive is signed by a detached member, ``signature.ed25519.json``::

    {"key_id": "<first 16 hex of sha256(raw public key)>", "signature": "<base64>"}

The signature covers the exact bytes of ``manifest.json``. The manifest lists the sha256
of every other member, and reading an archive checks those digests, so a valid signature
over the manifest vouches for the whole archive.

Policy: whoever verifies passes a ``TrustStore``. ``None`` (no checking) is for the
packager reading its own output and for tests that say so; the daemon always passes one
when ``trust.require_signed`` is on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeserve import jsonsafe
from edgeserve.errors import ConfigError, VerificationError

SIGNATURE_NAME = "signature.ed25519.json"
_MAX_SIGNATURE_BYTES = 4096
_MAX_SIGNATURE_DEPTH = 4
"""One object of two strings: anything nested deeper is not a signature file."""


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """The short id of a public key: sha256 of its 32 raw bytes, first 16 hex digits."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(path_private: Path, path_public: Path) -> str:
    """Write a new Ed25519 key pair as PEM (private file mode 0600); return its key id.

    Refuses to overwrite an existing private key file.
    """
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        fd = os.open(path_private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(str(path_private), "exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(private_pem)
    path_public.write_bytes(public_pem)
    return key_id_of(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; ConfigError naming the file otherwise."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read signing key: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(path), f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(str(path), "is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; ConfigError naming the file otherwise."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read trusted key: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(str(path), f"not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(str(path), "is not an Ed25519 public key")
    return key


def sign_manifest(manifest_bytes: bytes, private_key_path: Path) -> bytes:
    """The content of ``signature.ed25519.json`` for these exact manifest bytes."""
    key = load_private_key(private_key_path)
    document = {
        "key_id": key_id_of(key.public_key()),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
    }
    return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


class TrustStore:
    """The public keys an archive may be signed by, indexed by key id."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> TrustStore:
        keys: dict[str, Ed25519PublicKey] = {}
        for path in paths:
            key = load_public_key(path)
            keys[key_id_of(key)] = key
        return cls(keys)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, manifest_bytes: bytes, signature_json: bytes | None, *, source: str) -> str:
        """Check the signature over ``manifest_bytes``; return the signer's key id.

        ``source`` names the archive (or directory) in the error message. Every refusal
        (unsigned, unknown key, bad signature, malformed signature file) is a
        ``VerificationError``.
        """
        if signature_json is None:
            raise VerificationError(f"archive '{source}' is not signed (no {SIGNATURE_NAME})")
        key_id, signature = _parse_signature(signature_json, source)
        key = self._keys.get(key_id)
        if key is None:
            raise VerificationError(
                f"archive '{source}' is signed by unknown key id {key_id} "
                f"(trusted: {', '.join(self.key_ids) or 'none'})"
            )
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            raise VerificationError(
                f"archive '{source}' has a bad signature (key id {key_id}): "
                "manifest.json was changed after signing or the signature is forged"
            ) from None
        return key_id


def _parse_signature(data: bytes, source: str) -> tuple[str, bytes]:
    def bad(problem: str) -> VerificationError:
        return VerificationError(f"archive '{source}': {SIGNATURE_NAME} {problem}")

    if len(data) > _MAX_SIGNATURE_BYTES:
        raise bad(f"is larger than {_MAX_SIGNATURE_BYTES} bytes")
    try:
        document = jsonsafe.parse_json(
            data, max_bytes=_MAX_SIGNATURE_BYTES, max_depth=_MAX_SIGNATURE_DEPTH
        )
    except jsonsafe.JsonRefused as exc:
        raise bad(f"is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise bad("must be a JSON object")
    key_id, encoded = document.get("key_id"), document.get("signature")
    if not isinstance(key_id, str) or not isinstance(encoded, str):
        raise bad("needs string fields 'key_id' and 'signature'")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise bad("field 'signature' is not base64") from None
    return key_id, signature
