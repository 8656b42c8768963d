"""Triton's inference parameters: which ones edgeserve honours, ignores or refuses.

KServe v2 requests, their inputs and their requested outputs carry free-form
``parameters``. Triton reserves some of them for features that change what a request
means; a server that ignored those would answer something other than what was asked, so
each is either honoured here or refused with INVALID_ARGUMENT naming it. A parameter set
to its "off" value (false, 0, "") asks for nothing and is accepted.

=======  =============================================  ====================================
where    parameter                                      edgeserve
=======  =============================================  ====================================
request  ``sequence_id``, ``sequence_start``,           refused: no sequence batcher (Triton's
         ``sequence_end``                               stateful models)
request  ``timeout`` (int, microseconds)                honoured: a queue deadline, like the
                                                        call's gRPC deadline (the earlier wins)
request  ``typed_output_contents`` (bool)               edgeserve's own: typed ``contents`` in
                                                        the reply instead of raw
request  ``triton_enable_empty_final_response``         ignored: it asks a decoupled model for a
                                                        final empty response; edgeserve's models
                                                        are not decoupled, and Triton ignores it
                                                        for those too (perf_analyzer always sends
                                                        it)
request  any other ``triton_*``                         refused: reserved for Triton features
                                                        edgeserve lacks
request  ``priority``                                   ignored: one priority level, as Triton
                                                        does for a model without
                                                        ``priority_levels``
request  ``headers``, ``binary_data_output``, others    ignored: HTTP-only, or custom values
                                                        for a backend (TorchScript models take
                                                        no parameters, as in Triton's libtorch
                                                        backend)
input    ``shared_memory_region``, ``_offset``,         refused: no shared-memory extension
         ``_byte_size``
output   ``classification``                             refused: no classification extension
output   ``shared_memory_*``                            refused
input,   ``binary_data_size``, ``binary_data``, others  ignored (HTTP-only or custom)
output
=======  =============================================  ====================================

The checks run only when a request has parameters (an empty map costs one length test).
"""

from __future__ import annotations

from collections.abc import Mapping

from edgeserve.errors import InvalidArgument, clip
from edgeserve.proto import kserve_v2_pb2 as pb

TYPED_OUTPUT = "typed_output_contents"
"""Request parameter (bool): reply with typed ``contents`` instead of ``raw_output_contents``."""

_SEQUENCES = "sequences (stateful models) are not implemented"
_SHARED_MEMORY = "shared memory is not implemented; send the tensor's contents in the request"
_REFUSED_REQUEST = {
    "sequence_id": _SEQUENCES,
    "sequence_start": _SEQUENCES,
    "sequence_end": _SEQUENCES,
}
_RESERVED_PREFIX = "triton_"
# Meaningful only for decoupled models, which edgeserve does not have; Triton ignores it
# for the others, and perf_analyzer sends it true on every request.
_IGNORED_RESERVED = frozenset({"triton_enable_empty_final_response"})
_RESERVED = "a Triton feature edgeserve does not implement (models are not decoupled)"
_REFUSED_TENSOR = {
    "shared_memory_region": _SHARED_MEMORY,
    "shared_memory_offset": _SHARED_MEMORY,
    "shared_memory_byte_size": _SHARED_MEMORY,
}
_REFUSED_OUTPUT = {
    **_REFUSED_TENSOR,
    "classification": "classification is not implemented; request the tensor and rank it",
}
_Parameters = Mapping[str, pb.InferParameter]


def _value(param: pb.InferParameter) -> bool | int | str | float | None:
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def _refusal(where: str, key: str, reason: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: parameter '{clip(key)}' is not supported: {reason}")


def request_timeout_s(params: _Parameters, model: str) -> float | None:
    """Refuse the request parameters edgeserve cannot honour; the ``timeout`` in seconds.

    None when there is no timeout (absent, or 0 as in Triton).
    """
    timeout = None
    for key, param in params.items():
        value = _value(param)
        if key == "timeout":
            timeout = _timeout_s(value, model)
        elif key == TYPED_OUTPUT:
            if not isinstance(value, bool):
                raise InvalidArgument(f"model '{clip(model)}': parameter '{key}' must be a bool")
        elif key in _IGNORED_RESERVED:
            continue
        elif key in _REFUSED_REQUEST or key.startswith(_RESERVED_PREFIX):
            if value:
                reason = _REFUSED_REQUEST.get(key, _RESERVED)
                raise _refusal(f"model '{clip(model)}'", key, reason)
    return timeout


def _timeout_s(value: object, model: str) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problem = f"must be a whole number of microseconds >= 0, got {clip(repr(value))}"
        raise InvalidArgument(f"model '{clip(model)}': parameter 'timeout' {problem}")
    return value / 1e6 if value else None


def wants_typed_output(params: _Parameters) -> bool:
    """Whether the request asked for typed ``contents`` in its reply."""
    param = params.get(TYPED_OUTPUT)
    return param is not None and param.bool_param


def check_input_parameters(params: _Parameters, model: str, name: str) -> None:
    """Refuse an input's parameters that edgeserve cannot honour (shared memory)."""
    for key, param in params.items():
        if key in _REFUSED_TENSOR and _value(param):
            raise _refusal(f"model '{clip(model)}' input '{clip(name)}'", key, _REFUSED_TENSOR[key])


def check_output_parameters(params: _Parameters, model: str, name: str) -> None:
    """Refuse a requested output's parameters edgeserve cannot honour."""
    for key, param in params.items():
        if key in _REFUSED_OUTPUT and _value(param):
            reason = _REFUSED_OUTPUT[key]
            raise _refusal(f"model '{clip(model)}' output '{clip(name)}'", key, reason)
