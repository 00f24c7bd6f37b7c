"""Shared fixtures: the embedded tokenizer/model (converted once per machine) and a tiny random Llama."""
from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("SCBENCH_CPU_KERNELS", "0")  # before scbench.kernels.fused reads it: see _cpu_kernels_when_asked

from support import make_tiny_engine, triton_interpreting  # noqa: E402

try:  # absl (rouge-score's dependency) builds a handler on whatever sys.stderr is when it is imported (under pytest:
    # a capture stream) and closes that stream when logging.config.dictConfig (Hydra, in an in-process CLI test)
    # shuts the handlers down: pytest then fails with "I/O operation on closed file" and loses sys.stderr. The real
    # stderr is never closed by it.
    import absl.logging

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
except ImportError:  # pragma: no cover - rouge-score not installed
    pass


@pytest.fixture(scope="session")
def embedded_folder():
    from scbench.engines.models import resolve

    return resolve("embedded:smollm2")


@pytest.fixture(scope="session")
def smol_tokenizer(embedded_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_folder)


@pytest.fixture(scope="session")
def tiny_engine(smol_tokenizer):
    return make_tiny_engine(smol_tokenizer)


@pytest.fixture(scope="session")
def embedded_engine():
    from scbench.run import get_engine

    return get_engine({"name": "smollm2-135m", "path": "embedded:smollm2", "device": "cpu"})


@pytest.fixture
def interpreted(monkeypatch):
    """Triton's CPU interpreter (``TRITON_INTERPRET=1`` before triton is imported: `make test` sets it, and
    test_h2o_kernel.test_interpreter_run starts such a process), with triton 3.6's index patch for numpy >= 2."""
    if not triton_interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_interpreter_run starts it)")
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def numpy2_index(tensor, scope):  # triton 3.6's interpreter takes int() of 1-element arrays (numpy >= 2 refuses)
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", numpy2_index)


@pytest.fixture
def interpreted_without_cuda(request):
    """``interpreted`` where there is no CUDA (Triton kernel tests then run on CPU tensors); nothing on CUDA."""
    import torch

    if not torch.cuda.is_available():
        request.getfixturevalue("interpreted")


SLOW_FIXTURES = {"embedded_engine"}
"""Fixtures that load the embedded model: a test using one is slow whether or not it says so."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _slow_marks_the_embedded_model(request, monkeypatch):
    """The ``slow`` marker means "loads the embedded model": a test without it fails when it loads those weights
    (through an engine, a method's scorer, or a run), so `make test-fast` stays fast."""
    if request.node.get_closest_marker("slow"):
        return
    from transformers import AutoModelForCausalLM

    from scbench.engines.models import EMBEDDED, cache_root

    embedded = [str(cache_root() / "models" / spec["folder"]) for spec in EMBEDDED.values()]
    real = AutoModelForCausalLM.from_pretrained

    def guarded(path, *args, **kwargs):
        if any(str(path) == e or str(path).startswith(e + "+") for e in embedded):
            pytest.fail(f"{request.node.nodeid} loads the embedded model ({path}): mark it @pytest.mark.slow")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", guarded)


KERNEL_FIXTURES = {"interpreted", "interpreted_without_cuda"}
"""Fixtures of the Triton kernel tests (CPU tensors through the kernels under the interpreter)."""


@pytest.fixture(autouse=True)
def _cpu_kernels_when_asked(request, monkeypatch):
    """Under ``TRITON_INTERPRET=1`` (`make test`) a decode step on CPU can run the fused step's Triton kernels in the
    interpreter (``fused.CPU_KERNELS``): two to three times slower than the references, and no more than an
    integration test of kernels that their own tests compare with the references on random inputs. So the suite
    starts with ``SCBENCH_CPU_KERNELS=0`` (set at the top of this file, unless the caller set it: ``=1`` runs every
    decode through them), and only the tests marked ``cpu_kernels`` (the fused step against the unfused one, a whole
    sweep every way, batched replays) and the kernel tests (the ``interpreted`` fixtures) turn them on, in this
    process and in the processes they start."""
    if request.node.get_closest_marker("cpu_kernels") or KERNEL_FIXTURES & set(request.fixturenames):
        from scbench.kernels import fused

        monkeypatch.setattr(fused, "CPU_KERNELS", fused.INTERPRET)
        monkeypatch.setenv("SCBENCH_CPU_KERNELS", "1")


@pytest.fixture
def clean_registries(monkeypatch):
    """Method / task registries and plugin state restored after the test (plugin tests register out-of-tree names)."""
    from scbench import plugins, registry

    for reg in (registry.METHODS, registry.TASKS):
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
        monkeypatch.setattr(reg, "_sources", dict(reg._sources))
        monkeypatch.setattr(reg, "_plugins_read", None)
    monkeypatch.setattr(plugins, "_loaded", set())
    monkeypatch.setenv(plugins.ENV, "")  # (setenv records the original value, absent or not, for teardown)


@pytest.fixture(scope="session")
def tiny_folder(smol_tokenizer, tmp_path_factory):
    """The tiny random Llama saved with the embedded tokenizer: a model folder for CLI runs (model.path=FOLDER)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    engine = make_tiny_engine(smol_tokenizer)
    engine.model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder

