"""Custom handler modules shipped in the archive: found, isolated, and refused clearly."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from edgeserve.errors import ArchiveError, InvalidArgument
from edgeserve.serving.runtime import RuntimeOptions, load_model, served_signature

from .conftest import MLP_IN, MLP_OUT

CPU = RuntimeOptions(device="cpu")

SCALING = textwrap.dedent('''\
    from edgeserve.handlers.tensor import TensorHandler

    class ScaledHandler(TensorHandler):
        """Multiplies the model's output by handler_config['scale']."""

        def postprocess(self, data):
            return super().postprocess(data * self.context.config["scale"])
''')

FAILING = textwrap.dedent("""\
    from edgeserve.handlers.base import BaseHandler, InputRejected


    class HandlerBoom(Exception):
        pass


    class Failing(BaseHandler):
        def preprocess(self, inputs):
            x = inputs["x"]
            if bool((x < 0).any()):
                raise InputRejected("x", "must not be negative")
            raise HandlerBoom("custom failure text 42")
""")

SIGNATURE = textwrap.dedent("""\
    from edgeserve.handlers.base import BaseHandler
    from edgeserve.types import TensorSpec


    class Summary(BaseHandler):
        @classmethod
        def served_signature(cls, config):
            return ((TensorSpec("x", "FP32", (-1, 16)),), (TensorSpec("best", "INT64", (-1,)),))

        def preprocess(self, inputs):
            return inputs["x"]

        def postprocess(self, data):
            return {"best": data.argmax(dim=1)}
""")


def _make(model_dirs, mlp, source: str, member: str = "handler.py", **config):
    return model_dirs.make(
        mlp, MLP_IN, MLP_OUT, handler=member, handler_config=config, files={member: source}
    )


def test_custom_handler_is_loaded_and_used(model_dirs, mlp) -> None:
    model = load_model(*_make(model_dirs, mlp, SCALING, scale=3.0), CPU)
    try:
        assert type(model.handler).__name__ == "ScaledHandler"
        x = torch.randn(2, 16)
        with torch.inference_mode():
            expected = mlp(x) * 3.0
        assert torch.equal(model.run({"x": x})["y"], expected)
    finally:
        model.close()


def test_each_load_gets_its_own_module_and_close_forgets_it(model_dirs, mlp) -> None:
    first = load_model(*_make(model_dirs, mlp, SCALING, scale=1.0), CPU)
    second = load_model(*_make(model_dirs, mlp, SCALING, scale=2.0), CPU)
    names = [type(m.handler).__module__ for m in (first, second)]
    assert names[0] != names[1] and all(name in sys.modules for name in names)
    assert type(first.handler) is not type(second.handler)
    first.close()
    second.close()
    assert not any(name in sys.modules for name in names)


def test_handler_attribute_picks_among_several_classes(model_dirs, mlp) -> None:
    source = SCALING + textwrap.dedent("""\

        class Other(ScaledHandler):
            pass

        handler = Other
    """)
    model = load_model(*_make(model_dirs, mlp, source, scale=1.0), CPU)
    try:
        assert type(model.handler).__name__ == "Other"
    finally:
        model.close()


def test_handler_attribute_may_be_an_instance(model_dirs, mlp) -> None:
    source = SCALING + "\nhandler = ScaledHandler()\n"
    model = load_model(*_make(model_dirs, mlp, source, scale=1.0), CPU)
    try:
        assert model.handler is sys.modules[type(model.handler).__module__].handler
    finally:
        model.close()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "import torch\nVALUE = 1\n",
            "model 'm' version '1': handler module 'handler.py' defines no subclass of "
            "edgeserve.handlers.base.BaseHandler",
        ),
        (
            "from edgeserve.handlers.tensor import TensorHandler\n"
            "class A(TensorHandler): pass\nclass B(TensorHandler): pass\n",
            "model 'm' version '1': handler module 'handler.py' defines 2 handler classes "
            "(A, B); keep one, or name it with a module attribute 'handler = ClassName'",
        ),
        (
            "class Broken(:\n    pass\n",
            "model 'm' version '1': handler module 'handler.py' has a syntax error at line 1: ",
        ),
        (
            "import no_such_module_for_edgeserve_tests\n",
            "model 'm' version '1': importing handler module 'handler.py' raised "
            "ModuleNotFoundError: No module named 'no_such_module_for_edgeserve_tests'",
        ),
        (
            "handler = 42\n",
            "model 'm' version '1': handler module 'handler.py': 'handler' must be a "
            "BaseHandler subclass or instance, got int",
        ),
    ],
    ids=["no-class", "two-classes", "syntax-error", "import-error", "bad-attribute"],
)
def test_unusable_modules_are_refused(model_dirs, mlp, source: str, message: str) -> None:
    before = set(sys.modules)
    with pytest.raises(ArchiveError) as info:
        load_model(*_make(model_dirs, mlp, source), CPU)
    assert str(info.value).startswith(message)
    assert not [name for name in set(sys.modules) - before if name.startswith("_edgeserve_handler")]


def test_handler_module_must_be_a_member(model_dirs, mlp) -> None:
    made = model_dirs.make(mlp, MLP_IN, MLP_OUT, handler="missing.py")
    with pytest.raises(ArchiveError, match="handler module 'missing.py' is not in the archive"):
        load_model(*made, CPU)


def test_custom_errors_propagate_unchanged_and_input_rejections_are_invalid(
    model_dirs, mlp
) -> None:
    model = load_model(*_make(model_dirs, mlp, FAILING), CPU)
    try:
        with pytest.raises(Exception) as info:
            model.run({"x": torch.ones(1, 16)})
        assert type(info.value).__name__ == "HandlerBoom"
        assert type(info.value).__module__ == type(model.handler).__module__
        assert str(info.value) == "custom failure text 42"
        with pytest.raises(InvalidArgument) as rejected:
            model.run({"x": -torch.ones(1, 16)})
        assert str(rejected.value) == "model 'm' input 'x': must not be negative"
    finally:
        model.close()


def test_custom_served_signature(model_dirs, mlp) -> None:
    model_dir, manifest = _make(model_dirs, mlp, SIGNATURE)
    inputs, outputs = served_signature(model_dir, manifest)
    assert [o.name for o in outputs] == ["best"]
    model = load_model(model_dir, manifest, CPU)
    try:
        assert model.outputs == outputs
        x = torch.randn(5, 16)
        with torch.inference_mode():
            expected = mlp(x).argmax(dim=1)
        got = model.run({"x": x})["best"]
        assert got.dtype == torch.int64 and torch.equal(got, expected)
    finally:
        model.close()
