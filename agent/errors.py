"""The one error family of edgeserve.

Every error the core raises is an ``EdgeserveError``; its *kind* is protocol-neutral
and exactly one table per edge (``api/errors.py`` for gRPC, ``cli/exits.py`` for exit codes)
maps kinds to wire codes. Constructors take the facts and build the message, so a
message always names the model, version, input or config key at fault.

    EdgeserveError
    ├── NotFound            unknown model or version
    ├── InvalidArgument     bad shape / dtype / size / input name
    │   └── DocumentRefused     a fleet document refused; ``reason`` says why in one
    │                           word (schema, threshold, unknown_key, bad_signature,
    │                           rollback, version_skip, expired, wrong_target,
    │                           requirements) for the reported state
    ├── Overloaded          queue full (no work done)
    ├── Expired             deadline passed while queued (model not run), or a load
    │                       stage (load, warm-up, thread probe) ran past its time
    ├── NotReady            model or server not ready
    ├── HandlerFailed       user or model code raised; message never carries input data
    ├── MessageTooLarge     request over the configured size limit
    ├── ConfigError         bad configuration, names the dotted key
    ├── ArchiveError        malformed / tampered / unsafe model archive
    │   └── VerificationError   signature refused: unsigned, unknown key, bad or
    │                           malformed signature
    ├── StoreError          model store I/O failure
    │   ├── StoreFull           the state dir has no space left (nothing changed)
    │   └── StoreReadOnly       the state dir cannot be written (nothing changed)
    ├── WarmupFailed        sample inputs did not give the expected outputs
    ├── ManagementError     refused management call (permissions, budget)
    ├── PermissionDenied    the caller is known but not allowed (uid, group, path)
    └── Unauthenticated     the caller did not prove who it is (no or wrong token)
"""

from __future__ import annotations

import enum
import errno

ECHO_LIMIT = 128
"""Characters of a client-controlled string (a model, input or parameter name) that an
error message repeats; longer ones are cut and end in "…", so no request can push a status
message past gRPC's metadata limit."""


def clip(text: object, limit: int = ECHO_LIMIT) -> str:
    """``text`` as a string of at most ``limit`` characters ("…" marks a cut)."""
    value = str(text)
    return value if len(value) <= limit else value[: limit - 1] + "…"


class Kind(enum.Enum):
    NOT_FOUND = "not_found"
    INVALID_ARGUMENT = "invalid_argument"
    OVERLOADED = "overloaded"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    NOT_READY = "not_ready"
    INTERNAL = "internal"
    TOO_LARGE = "too_large"
    PERMISSION_DENIED = "permission_denied"
    FAILED_PRECONDITION = "failed_precondition"
    UNAUTHENTICATED = "unauthenticated"


class EdgeserveError(Exception):
    """Root of every error edgeserve raises on purpose."""

    kind: Kind = Kind.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(EdgeserveError):
    kind = Kind.NOT_FOUND

    @classmethod
    def model(cls, name: str, version: str | None = None) -> NotFound:
        if version:
            return cls(f"model '{clip(name)}' version '{clip(version)}' is not loaded")
        return cls(f"model '{clip(name)}' is not loaded")


class InvalidArgument(EdgeserveError):
    kind = Kind.INVALID_ARGUMENT

    @classmethod
    def for_input(cls, model: str, input_name: str, problem: str) -> InvalidArgument:
        return cls(f"model '{clip(model)}' input '{clip(input_name)}': {problem}")


class Overloaded(EdgeserveError):
    kind = Kind.OVERLOADED

    @classmethod
    def queue_full(cls, model: str, version: str, limit: int) -> Overloaded:
        return cls(f"model '{model}' version '{version}': queue is full ({limit} requests)")


class Expired(EdgeserveError):
    kind = Kind.EXPIRED

    @classmethod
    def while_queued(cls, model: str, version: str) -> Expired:
        return cls(f"model '{model}' version '{version}': deadline passed while queued")

    @classmethod
    def stage(cls, model: str, version: str, stage: str, timeout_s: float) -> Expired:
        """Model code run outside a request (``stage``: load, warm-up, thread probe) did
        not return in time; its thread is left behind (it cannot be stopped)."""
        return cls(
            f"model '{model}' version '{version}': {stage} did not finish within "
            f"{timeout_s:g} s (runtime.load_timeout_s); its thread is abandoned"
        )


class NotReady(EdgeserveError):
    kind = Kind.NOT_READY

    @classmethod
    def model(cls, name: str, version: str, state: str) -> NotReady:
        return cls(f"model '{name}' version '{version}' is not ready (state: {state})")


class HandlerFailed(EdgeserveError):
    """Model or handler code raised. The message is fixed text plus a correlation id."""

    kind = Kind.INTERNAL

    def __init__(self, model: str, version: str, correlation_id: str) -> None:
        super().__init__(
            f"model '{model}' version '{version}' failed during inference "
            f"(correlation id {correlation_id}; see the daemon log)"
        )
        self.correlation_id = correlation_id


class MessageTooLarge(EdgeserveError):
    kind = Kind.TOO_LARGE


class ConfigError(EdgeserveError):
    kind = Kind.INVALID_ARGUMENT

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


class ArchiveError(EdgeserveError):
    kind = Kind.INVALID_ARGUMENT


class VerificationError(ArchiveError):
    """An archive's signature does not vouch for it (``signing.TrustStore.verify``).

    A kind of ``ArchiveError``, so every caller that refuses bad archives refuses these;
    catch it to tell "not signed by a key we trust" from "malformed or corrupt".
    """


class StoreError(EdgeserveError):
    kind = Kind.INTERNAL

    @classmethod
    def from_os(cls, exc: OSError, doing: str) -> StoreError:
        """The error for an ``OSError`` met while ``doing`` (e.g. "cannot write the live
        set '/var/lib/edgeserve/live.json'"): full and read-only state dirs get their own
        kinds, so a client is told RESOURCE_EXHAUSTED or FAILED_PRECONDITION, not INTERNAL."""
        reason = exc.strerror or type(exc).__name__
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreFull(f"state dir full: {doing} ({reason}); nothing was changed")
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return StoreReadOnly(f"state dir read-only: {doing} ({reason}); nothing was changed")
        return StoreError(f"{doing}: {reason}")


class StoreFull(StoreError):
    """No space left in the state dir (ENOSPC, EDQUOT); the operation changed nothing."""

    kind = Kind.OVERLOADED  # RESOURCE_EXHAUSTED: a resource ran out, no work done


class StoreReadOnly(StoreError):
    """The state dir cannot be written (read-only file system, permissions)."""

    kind = Kind.FAILED_PRECONDITION


class WarmupFailed(EdgeserveError):
    kind = Kind.FAILED_PRECONDITION


class ManagementError(EdgeserveError):
    kind = Kind.FAILED_PRECONDITION


class PermissionDenied(EdgeserveError):
    kind = Kind.PERMISSION_DENIED


class Unauthenticated(EdgeserveError):
    """No credentials, or wrong ones (a missing or wrong management token); the message
    says which, and never echoes what the caller sent."""

    kind = Kind.UNAUTHENTICATED


class DocumentRefused(InvalidArgument):
    """A signed fleet document (root or deployment) that must not be acted on.

    ``reason`` is one short word for the device's reported state; the message says what
    was wrong for a human. Constructors take the facts (``fleet/verifier.py``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{message} ({reason})")
        self.reason = reason
        self.detail = message

    @classmethod
    def schema(cls, where: str, problem: str) -> DocumentRefused:
        return cls("schema", f"{where}: {problem}" if where else problem)
