"""`scbench ls methods` reads stages, engines and knobs from the sources (no torch import); the imported classes are
the reference: both agree on every registered method."""
from __future__ import annotations

import ast
import subprocess
import sys
import time

import pytest

from scbench.introspect import declared, from_source
from scbench.registry import METHODS


@pytest.mark.parametrize("name", METHODS.names())
def test_source_matches_the_class(name):
    target = METHODS.target(name)
    if not isinstance(target, str):
        pytest.skip("registered as an object (a plugin)")
    fast, ref = from_source(target), declared(METHODS.get(name))
    assert fast is not None
    assert fast["stages"] == ref["stages"] and fast["engines"] == ref["engines"]
    assert list(fast["knobs"]) == list(ref["knobs"])
    for knob, text in fast["knobs"].items():  # literal defaults as written vs as constructed
        try:
            written = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue  # an expression (field(default_factory=...)): shown as written
        assert written == ast.literal_eval(ref["knobs"][knob]), (name, knob)


def test_ls_methods_is_fast_and_imports_no_torch():
    code = ("import sys, time; t = time.perf_counter(); from scbench.cli import main; main(['ls', 'methods']); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(time.perf_counter() - t, file=sys.stderr)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert time.perf_counter() - t0 < 10  # the bound that matters is no torch (seconds); this only catches a hang
    assert "streamingllm" in out.stdout and "stages=compression" in out.stdout and "n_local=3968" in out.stdout
