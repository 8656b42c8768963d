"""Custom handler modules shipped inside a model archive.

A manifest whose ``handler`` names a ``.py`` member (``"handler.py"``) gets that file
imported from the model's directory under a unique module name, so two versions of the
same model never share module state. The handler is, in this order:

1. the module's ``handler`` attribute: a ``BaseHandler`` subclass, or an instance of one;
2. otherwise the one ``BaseHandler`` subclass the module itself defines (classes it
   imports, such as ``TensorHandler`` to extend, do not count).

The module is one file: other files of the archive are read through
``context.model_dir``; the model directory is not put on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from edgeserve.handlers.base import BaseHandler

HandlerFactory = Callable[[], BaseHandler]


class HandlerModuleError(Exception):
    """A custom handler module cannot be used; the message names the file and why."""


def import_handler_module(path: Path, module_name: str) -> ModuleType:
    """Execute the file as module ``module_name`` (registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HandlerModuleError(f"handler module '{path.name}' cannot be imported")
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs: dataclasses and pickling look their module up by name.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        forget_module(module_name)
        raise HandlerModuleError(
            f"handler module '{path.name}' has a syntax error at line {exc.lineno}: {exc.msg}"
        ) from exc
    except Exception as exc:
        forget_module(module_name)
        raise HandlerModuleError(
            f"importing handler module '{path.name}' raised {type(exc).__name__}: {exc}"
        ) from exc
    return module


def find_handler(module: ModuleType, filename: str) -> tuple[type[BaseHandler], HandlerFactory]:
    """The handler class of a custom module and a factory that gives its instance."""
    attr = getattr(module, "handler", None)
    if attr is not None:
        if isinstance(attr, type) and issubclass(attr, BaseHandler):
            return attr, attr
        if isinstance(attr, BaseHandler):
            return type(attr), lambda: attr
        raise HandlerModuleError(
            f"handler module '{filename}': 'handler' must be a BaseHandler subclass or "
            f"instance, got {type(attr).__name__}"
        )
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseHandler)
        and obj.__module__ == module.__name__
    ]
    if not classes:
        raise HandlerModuleError(
            f"handler module '{filename}' defines no subclass of "
            f"edgeserve.handlers.base.BaseHandler"
        )
    if len(classes) > 1:
        names = ", ".join(sorted(cls.__name__ for cls in classes))
        raise HandlerModuleError(
            f"handler module '{filename}' defines {len(classes)} handler classes ({names}); "
            f"keep one, or name it with a module attribute 'handler = ClassName'"
        )
    return classes[0], classes[0]


def forget_module(module_name: str) -> None:
    sys.modules.pop(module_name, None)
