"""The package's lazy namespace: ``import tcopilot`` loads nothing heavy, each name loads its own module."""

from __future__ import annotations

import importlib
import subprocess
import sys

import tcopilot


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (this one has imported everything already) and return its stdout."""
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_import_and_cli_help_load_neither_torch_nor_transformers():
    out = _fresh(
        "import sys, tcopilot, tcopilot.cli\n"
        "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))"
    )
    assert out == "[]"


def test_a_fused_op_loads_torch_but_not_transformers():
    out = _fresh(
        "import sys\nfrom tcopilot import logit_capture, log_attention\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    assert out == "True False"


def test_every_public_name_resolves_to_its_module_object():
    assert sorted(tcopilot.__all__) == sorted(tcopilot._LAZY)
    for name, module in tcopilot._LAZY.items():
        assert getattr(tcopilot, name) is getattr(importlib.import_module(module), name)
        assert name in dir(tcopilot)


def test_generate_stays_the_function_after_its_submodule_is_imported():
    # Importing tcopilot.generate (graph_decode does) sets the package attribute "generate" to the module; the
    # package keeps the function there, as the eager imports used to.
    out = _fresh(
        "import tcopilot\nfrom tcopilot import GraphDecoder\nimport tcopilot.generate\n"
        "print(callable(tcopilot.generate), tcopilot.generate.__module__)\n"
        "from tcopilot import *\nprint(generate.__name__)"
    )
    assert out == "True tcopilot.generate\ngenerate"


def test_submodules_are_reachable_as_attributes_after_a_bare_import():
    out = _fresh(
        "import tcopilot\n"
        "print(tcopilot.train.Trainer.__name__, type(tcopilot.pilot.LOGIT_SCALE_RULES).__name__,\n"
        "      tcopilot.kernels.logit_capture.logit_capture is tcopilot.logit_capture)"
    )
    assert out == "Trainer dict True"


def test_an_unknown_name_raises_attribute_error():
    try:
        tcopilot.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("no AttributeError")
