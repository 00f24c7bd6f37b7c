"""Helpers shared by tests (not a test module): a byte-level tokenizer, the tiny random Llama (model and engine), a
synthetic results store and the loader of scripts/ modules."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from scbench.records import TurnResult, TurnStats
from scbench.store import Store

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens, no merges) with ChatML specials: no model download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def random_llama(vocab: int, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                 intermediate: int = 128, window: int = 4096, seed: int | None = 0, **config):
    """A random-weight ``LlamaForCausalLM`` (the tests' one tiny model; the defaults are ``make_tiny_engine``'s).
    ``seed`` seeds torch first (None: leave the generator as it is); ``config`` adds LlamaConfig keys."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=window, **config))


def llama8b_engine(layers: int):
    """HFEngine over ``layers`` layers of Llama-3.1-8B's shape (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336),
    random bf16 weights built on the GPU, with ``byte_tokenizer`` (vocabulary 1024): the GPU tests' 8B-shaped model."""
    from scbench.engines.hf import HFEngine

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the weights in bf16 directly (8B parameters)
    try:
        with torch.device("cuda"):
            model = random_llama(1024, layers=layers, hidden=4096, heads=32, kv_heads=8, intermediate=14336,
                                 window=131072, rope_theta=500000.0)
    finally:
        torch.set_default_dtype(default)
    return HFEngine(path="unused", model=model, tokenizer=byte_tokenizer(), device="cuda", dtype="bfloat16")


def make_tiny_engine(tokenizer, seed: int = 0, layers: int = 2, **shape):
    """HFEngine over ``random_llama`` (hidden 64, 4 query / 2 KV heads unless ``shape`` says otherwise) with
    ``tokenizer``, on the CPU in float32."""
    from scbench.engines.hf import HFEngine

    model = random_llama(len(tokenizer), layers=layers, seed=seed, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    return HFEngine("tiny-random-llama", name="tiny-random-llama", model=model, tokenizer=tokenizer, device="cpu",
                    dtype="float32")


# A synthetic leaderboard: method config, stages, kept fraction of the full KV
GRID = [  # method config, stages, kept fraction of the full KV
    ({"name": "full"}, [], 1.0),
    ({"name": "snapkv", "budget": 0.125, "window": 32, "kernel": 5}, ["compression"], 0.125),
    ({"name": "snapkv", "budget": 0.25, "window": 32, "kernel": 5}, ["compression"], 0.25),
    ({"name": "ashape", "n_init": 32, "n_local": 224}, ["generation"], 1.0),
]
TASKS = [("scbench_kv", "string_retrieval", "kv"), ("scbench_qa_eng", "semantic_retrieval", "qa_eng")]


def make_store(path):
    store = Store(path)
    for m, (method, stages, frac) in enumerate(GRID):
        for mode in ("multi_turn", "multi_request"):
            for t, (task, category, metric) in enumerate(TASKS):
                run_id = f"r{m}{mode[6]}{t}"
                spec = {"model": {"name": "tiny"}, "method": method, "task": task, "task_variant": None, "mode": mode}
                prov = {"git": {"commit": "abc", "dirty": False}, "packages": {"torch": "x"}, "engine": {"model": "tiny"},
                        "method": {"name": method["name"], "params": method, "stages": stages},
                        "task": {"name": task, "version": "1", "category": category, "variant": "faithful"}}
                label = method["name"] if len(method) == 1 else f"{method['name']}({method.get('budget', '')})"
                store.open_run(run_id, model="tiny", method=method["name"], method_label=label, task=task, mode=mode,
                               spec=spec, provenance=prov)
                for ex in range(2):
                    for turn in range(3):
                        score = min(1.0, frac + 0.1 * ex + 0.05 * turn)
                        stats = TurnStats(prompt_tokens=1000 + 50 * turn, prefill_computed=1000 if turn == 0 else 50,
                                          prefill_reused=0 if turn == 0 else 1000, ttft_s=0.1, decode_s=0.2,
                                          decode_tok_s=40.0, kv_bytes=int(frac * 2**22), kv_full_bytes=2**22,
                                          attn_density=0.3 if stages == ["generation"] else 1.0)
                        store.put(run_id, TurnResult(str(ex), turn, stats.prompt_tokens, "p", {"answer": "a"},
                                                     {metric: score}, stats))
                store.finish_run(run_id)
    store.record_failure("bad", spec={"model": {"name": "tiny"}, "method": {"name": "kivi"}, "task": "scbench_kv",
                                      "mode": "multi_turn"}, error="OutOfMemoryError: CUDA out of memory")
    store.close()
    return path


ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str):
    """A module of ``scripts/`` (``path`` relative to it, e.g. ``probe/probe_data.py``), loaded from its file without
    putting scripts/ on sys.path. It is registered under its file name, as the scripts import their siblings by
    name when they run: load a sibling before the module that imports it."""
    name = Path(path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def disk_skip_reason(python) -> str | None:
    """Why `make test` did not build the environment of interpreter ``python`` (``<env>/bin/python``): the Makefile
    writes ``<env>.skipped`` when the disk is too full for that environment and the tests; None when it did not."""
    from pathlib import Path

    marker = Path(python).parents[1].with_name(Path(python).parents[1].name + ".skipped")
    if Path(python).exists() or not marker.is_file():
        return None
    return marker.read_text().strip() or f"{marker} exists"


def reference_python() -> str:
    """The reference implementations' interpreter (kvpress, optimum-quanto: `make kvpress-env`). Missing: a failure
    under `make test` (it names the interpreter) or CI, a skip elsewhere."""
    import os
    from pathlib import Path

    import pytest

    named = os.environ.get("SCBENCH_KVPRESS_PYTHON")
    py = Path(named) if named else Path(__file__).resolve().parents[1] / ".venv-kvpress" / "bin" / "python"
    if not py.exists():
        if reason := disk_skip_reason(py):
            pytest.skip(reason)
        msg = f"reference environment missing ({py}): run `make kvpress-env`"
        if named or os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return str(py)


# --- the kvpress cross-checks (tests/methods/test_compression_kvpress.py, test_headwise_kvpress.py) ---------------
KVPRESS_SIDE = ROOT / "tests" / "reference" / "kvpress_side.py"


def run_reference(model, ids: list[int], presses: list[dict], tmp: Path) -> dict:
    """Run presses on the kvpress side (tests/reference/kvpress_side.py, in .venv-kvpress) over the saved model."""
    import json
    import os
    import subprocess

    import pytest

    model.save_pretrained(tmp / "model")
    (tmp / "req.json").write_text(json.dumps({"model_dir": str(tmp / "model"), "ids": ids, "presses": presses}))
    proc = subprocess.run([reference_python(), str(KVPRESS_SIDE), str(tmp / "req.json"), str(tmp / "out.json")],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        pytest.fail(f"kvpress side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((tmp / "out.json").read_text())


def keys_after(engine, method, ids) -> list[torch.Tensor]:
    s = engine.session(method)
    s.feed(ids, compress=True, sparse=False)
    return [layer.keys.clone() for layer in s.cache.layers]


def agreement(a: list[list[list[int]]], b: list[list[list[int]]]) -> dict:
    """Kept sets [layer][head] -> mean and worst |a & b| / min(|a|, |b|), kept counts of head 0 per layer."""
    rates = [len(set(x) & set(y)) / min(len(x), len(y)) for la, lb in zip(a, b) for x, y in zip(la, lb)]
    return {"agreement": sum(rates) / len(rates), "min_head": min(rates),
            "kept_per_layer": [(len(la[0]), len(lb[0])) for la, lb in zip(a, b)]}


def two_turn_decode(engine, method, prompt, follow, mode: str | None = None, first: int = 20, second: int = 15):
    """Greedy decode ``first`` tokens after ``prompt`` (compressed), keep the first turn's tokens but the last, then ``second`` after
    ``follow``, with ``engine.decode_mode = mode`` (None: leave it) -> (tokens of both turns, their decode paths,
    the session, memory after the first turn). The fast-decode plugins' tests compare these between paths."""
    old = engine.decode_mode
    if mode is not None:
        engine.decode_mode = mode
    try:
        s = engine.session(method)
        s.feed(prompt, compress=True, sparse=False)
        a = s.generate(first)
        mem = s.memory()
        s.drop_last(len(a.tokens) - 1)
        s.feed(follow, compress=False, sparse=False)
        b = s.generate(second)
        return [a.tokens, b.tokens], [a.decode_path, b.decode_path], s, mem
    finally:
        engine.decode_mode = old


def triton_interpreting() -> bool:
    """Triton is importable and runs its CPU interpreter (``TRITON_INTERPRET=1`` set before triton was imported)."""
    try:
        import triton
    except ImportError:
        return False
    return bool(triton.knobs.runtime.interpret)


def triton_kernel_marks() -> list:
    """``pytestmark`` of a Triton kernel test on CUDA, or on CPU tensors in Triton's interpreter
    (``TRITON_INTERPRET=1``, the ``interpreted`` fixture); skipped without Triton."""
    import pytest

    from scbench.kernels.paged_decode import triton

    cpu_ok = os.environ.get("TRITON_INTERPRET") == "1"
    return [pytest.mark.skipif(triton is None or (not torch.cuda.is_available() and not cpu_ok),
                               reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)"),
            pytest.mark.usefixtures("interpreted_without_cuda")]


# --- batched vs sequential replays (tests/engines/test_batched_decode.py, test_quest_batch.py) ---
TIMING = {"prefill_s", "ttft_s", "decode_s", "decode_tok_s", "compress_s", "peak_mem_bytes", "load_s", "warmup_s", "retry_s",
          "decode_path", "decode_kernel", "decode_batch", "decode_runs", "decode_step_s", "chunk_kv_s", "prefill_saved_s", "context_compress_s"}
"""Turn stats that differ between two replays of the same rows (times, paths, kernels, batch sizes)."""


def batch_replay(engine, cls, method: dict, mode: str, done=None, keep=None, task="scbench_kv", length=300, **kw):
    """One generated example (4 turns, 10 new tokens) replayed by ``cls`` (``Replay`` / ``BatchedReplay``): its rows."""
    rep = make_replay(engine, cls, method, mode, done=done, task=task, length=length, **kw)
    if keep is not None:
        keep.append(rep)
    return list(rep)


def make_replay(engine, cls, method: dict, mode: str, done=None, task="scbench_kv", length=300, **kw):
    """``batch_replay``'s replay object, not yet run."""
    from scbench.data import load_examples
    from scbench.records import RunSpec
    from scbench.registry import TASKS
    from scbench.run import build_method

    count = lambda t: len(engine.encode(t, add_special_tokens=False))  # noqa: E731
    ex = load_examples(TASKS.get(task), "generated", n=1, length=length, turns=4, seed=1, count=count)[0]
    spec = RunSpec(model={}, method=method, task=task, mode=mode, max_turns=4, max_new_tokens=10, **kw)
    return cls(engine, build_method(method), TASKS.get(task), ex, spec, done=done)


def assert_topk_rows(s, got, n, k, n_init, n_local):
    """A row select's output ``got`` [B * H, n_init + n_local + k] for scores ``s`` [B, H, C] of ``n`` valid keys: the
    static rows first (-1 where absent), then kk distinct searchable rows whose scores are topk's multiset, -1 after
    (tests/unit/test_prev_select.py, test_sample_select.py)."""
    b, h, c = s.shape
    ns, hi = n_init + n_local, n - n_local
    static = [j if j < n else -1 for j in range(n_init)] + [hi + j if hi + j >= n_init else -1 for j in range(n_local)]
    got = got.cpu()
    assert torch.equal(got[:, :ns], torch.tensor(static, dtype=torch.int32).expand(b * h, -1))
    kk = min(k, max(0, hi - n_init))
    sc = s.float().cpu().reshape(b * h, c)
    for r in range(b * h):
        sel = got[r, ns:]
        assert bool((sel[kk:] == -1).all())
        a = sel[:kk].long()
        assert a.unique().numel() == kk and bool(((a >= n_init) & (a < hi)).all())
        want = sc[r, n_init:hi].topk(kk).values if kk else sc[r, :0]
        assert torch.equal(sc[r, a].sort().values, want.sort().values)


def spy_returns(monkeypatch, module, name: str) -> list:
    """``module.name`` still runs; the list collects what each call returned (e.g. KIVI's flush schedules)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    return calls


def same_rows(a, b):
    """Two replays' rows agree: turns, predictions, scores and every stat but the timing columns (``TIMING``)."""
    assert [r.turn for r in a] == [r.turn for r in b]
    assert [r.prediction for r in a] == [r.prediction for r in b]
    for x, y in zip(a, b):
        assert x.scores == y.scores
        sx, sy = ({k: v for k, v in vars(r.stats).items() if k not in TIMING} for r in (x, y))
        for st in (sx, sy):  # the method's own columns: times differ from run to run
            st["method_costs"] = {k: v for k, v in st.get("method_costs", {}).items() if not k.endswith("_s")}
        assert sx == sy
    return len(a)


def quest_bounds_after(kmin, kmax, k, at: int, page: int):
    """Torch reference of a Quest decode step's bounds update: copies of the per-page key minima / maxima
    [B, Hkv, P, D] with key row ``at`` of k [B, Hkv, C, D] folded into its page (the page's first key resets them)."""
    import torch

    lo, hi = kmin.clone(), kmax.clone()
    pg, new = at // page, k[:, :, at]
    lo[:, :, pg] = new if at % page == 0 else torch.minimum(lo[:, :, pg], new)
    hi[:, :, pg] = new if at % page == 0 else torch.maximum(hi[:, :, pg], new)
    return lo, hi


# --- grouped sweeps (tests/e2e/test_sweep_grouped.py, test_sweep_memory.py) ---------------------------------
SWEEP_CFGS = {  # budgets sized to ~300-token contexts
    "full": {"name": "full"},
    "snapkv": {"name": "snapkv", "budget": 96, "window": 8, "kernel": 5},
    "pyramidkv": {"name": "pyramidkv", "budget": 96, "window": 8, "kernel": 5, "beta": 20},
    "h2o": {"name": "h2o", "budget": 96},
    "streamingllm": {"name": "streamingllm", "n_init": 8, "n_local": 88},
    "kivi": {"name": "kivi", "bits": 2, "group": 32, "residual": 32},
    "quest": {"name": "quest", "budget": 64, "page_size": 16, "recent_pages": 1, "dense_layers": 1},
    "retrieval_attention": {"name": "retrieval_attention", "top_k": 48, "n_init": 8, "n_local": 8},
    "adakv": {"name": "adakv", "budget": 96, "window": 8, "kernel": 5},
    "kvzip": {"name": "kvzip", "budget": 96, "chunk": 128},
}
SWEEP_TIMING = {"prefill_s", "ttft_s", "decode_s", "decode_tok_s", "compress_s", "peak_mem_bytes", "load_s", "retry_s",
                "index_build_s", "prefill_shared", "scores_shared", "decode_step_s", "context_compress_s", "chunk_kv_s",
                "prefill_saved_s", "decode_path", "decode_batch", "decode_runs", "decode_kernel"}


def sweep_spec(method: dict, mode: str, **kw):
    """A grouped-sweep test's run: the tiny model, scbench_kv, 2 generated examples of 3 turns."""
    from scbench.records import RunSpec

    return RunSpec(model={"name": "tiny-random-llama"}, method=method, task="scbench_kv", mode=mode,
                   data={"n": 2, "length": 300, "turns": 3, "seed": 0}, max_turns=3, max_new_tokens=6, **kw)


def sweep_rows(db) -> tuple:
    """A store's turns without their timing columns, prefill_shared per turn, (status, label) per run."""
    from scbench.store import Store

    store = Store(db)
    out = {}
    for t in store.turns():
        row = {k: v for k, v in t.items() if k not in SWEEP_TIMING | {"created"}}
        if isinstance(row.get("method_costs"), dict):  # the method's own columns: times differ from run to run
            row["method_costs"] = {k: v for k, v in row["method_costs"].items() if not k.endswith("_s")}
        out[(t["run_id"], t["example_id"], t["turn"])] = row
    shared = {(t["run_id"], t["example_id"], t["turn"]): t["prefill_shared"] for t in store.turns()}
    runs = {r["run_id"]: (r["status"], r["method_label"]) for r in store.runs()}
    store.close()
    return out, shared, runs


def first_turns(db, by_mode: bool = False) -> dict:
    """A store's first turns by (method, example id), or by ((method, mode), example id) with ``by_mode``."""
    from scbench.store import Store

    store = Store(str(db))
    labels = {r["run_id"]: (r["method"], r["mode"]) if by_mode else r["method"] for r in store.runs()}
    first = {(labels[t["run_id"]], t["example_id"]): t for t in store.turns() if t["turn"] == 0}
    store.close()
    return first


SWEEP_RIDERS = [{"name": "ashape", "n_init": 8, "n_local": 56},
                {"name": "trishape", "n_init": 8, "n_local": 56, "n_last": 16},
                {"name": "vertical_slash", "vertical_size": 16, "slash_size": 56, "last_q": 16, "init_cols": 4,
                 "local_diags": 16},
                {"name": "cacheblend", "chunk_size": 64, "recompute_ratio": 0.15, "select_layer": 1}]
"""Methods that prefill their own way: with ``timing=batched`` they join a group to decode with it (``can_ride``)."""
