"""Built-in handlers, found by the name a manifest gives in its ``handler`` field.

    "tensor"            -> TensorHandler            numeric tensors in and out (default)
    "image_classifier"  -> ImageClassifierHandler   encoded images in, top-k labels out

A manifest may instead name a ``.py`` member of its archive; ``edgeserve.serving.runtime``
imports that module and finds the handler class in it.
"""

from __future__ import annotations

from edgeserve.handlers.base import BaseHandler, HandlerContext, InputRejected
from edgeserve.handlers.image import ImageClassifierHandler
from edgeserve.handlers.tensor import TensorHandler

__all__ = [
    "BUILTIN_HANDLERS",
    "BaseHandler",
    "HandlerContext",
    "ImageClassifierHandler",
    "InputRejected",
    "TensorHandler",
    "get_handler_class",
]

BUILTIN_HANDLERS: dict[str, type[BaseHandler]] = {
    "tensor": TensorHandler,
    "image_classifier": ImageClassifierHandler,
}


def get_handler_class(name: str) -> type[BaseHandler]:
    """The built-in handler class called ``name``; LookupError naming the known ones."""
    try:
        return BUILTIN_HANDLERS[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_HANDLERS))
        raise LookupError(f"unknown handler '{name}' (built-in handlers: {known})") from None
