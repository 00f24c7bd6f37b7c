"""Prompt compression of the shared context (methods/prompt_compression.py) and its place in the runner.

Self-information against a plain per-token loop; the perplexity compressor hits its rate on generated data;
through the runner only the context is compressed (every query reaches the model whole) and the rate and time
are recorded; the LLMLingua-2 adapter's errors name what is missing (no model is downloaded here), and the adapter
runs the real ``llmlingua`` package end to end on a tiny random XLM-RoBERTa token classifier built in the test.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from scbench.data import load_examples
from scbench.engines.hf import HFSession
from scbench.methods.prompt_compression import (
    LLMLingua2,
    PerplexityCompress,
    keep_most_informative,
    self_information,
)
from scbench.records import RunSpec
from scbench.registry import TASKS
from scbench.runner import Replay


def example(engine, task_name="scbench_kv", length=400, turns=2, seed=0):
    task = TASKS.get(task_name)
    ex = load_examples(task, "generated", n=1, length=length, turns=turns, seed=seed,
                       count=lambda t: len(engine.encode(t, add_special_tokens=False)))[0]
    return task, ex


def plain_information(model, ids, bos, segment, overlap):
    """One forward per token: -log p(token | what its segment is conditioned on)."""
    out = []
    for j, tok in enumerate(ids):
        start = j // segment * segment
        ctx = ids[max(0, start - overlap):j] if start else ([bos] if bos is not None else []) + ids[:j]
        if not ctx:
            out.append(float("inf"))
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ctx]), use_cache=False).logits[0, -1].double()
        out.append(-float(logits.log_softmax(-1)[tok]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("bos", [1, None])
@pytest.mark.parametrize("segment,overlap", [(64, 0), (16, 5)])
def test_self_information_matches_plain_loop(tiny_engine, bos, segment, overlap):
    ids = torch.randint(10, 3000, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    fast = self_information(tiny_engine.model, ids, bos=bos, segment=segment, overlap=overlap)
    ref = plain_information(tiny_engine.model, ids, bos, segment, overlap)
    assert torch.equal(fast.isinf(), ref.isinf()) and int(fast.isinf().sum()) == (0 if bos is not None else 1)
    finite = ~ref.isinf()
    torch.testing.assert_close(fast[finite], ref[finite], atol=1e-4, rtol=1e-4)


def test_keeps_the_most_informative_in_order():
    info = torch.tensor([0.5, 3.0, 0.1, float("inf"), 2.0, 0.2], dtype=torch.float64)
    assert keep_most_informative(info, 3).tolist() == [1, 3, 4]
    assert keep_most_informative(info, 0).tolist() == [3]  # at least one token
    assert keep_most_informative(info, 99).tolist() == list(range(6))


@pytest.mark.parametrize("task_name", ["scbench_kv", "scbench_qa_eng"])
@pytest.mark.parametrize("rate", [1 / 3, 0.5])
def test_hits_its_rate(tiny_engine, task_name, rate):
    task, ex = example(tiny_engine, task_name, length=500)
    context = task.first_prompt(ex, 0).context
    short = PerplexityCompress(rate=rate, scorer="engine").compress_context(context, engine=tiny_engine)
    n = len(tiny_engine.encode(context, add_special_tokens=False))
    kept = len(tiny_engine.encode(short, add_special_tokens=False))
    assert abs(kept / n - rate) <= 0.02, (kept, n)


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_runner_compresses_the_context_never_the_query(tiny_engine, mode, monkeypatch):
    fed: list[int] = []
    feed = HFSession.feed
    monkeypatch.setattr(HFSession, "feed", lambda self, ids, **kw: fed.extend(ids) or feed(self, ids, **kw))
    task, ex = example(tiny_engine, length=400, turns=2)
    spec = RunSpec(model={}, method={"name": "ppl_compress"}, task="scbench_kv", mode=mode, max_turns=2, max_new_tokens=3)
    replay = Replay(tiny_engine, PerplexityCompress(scorer="engine"), task, ex, spec)
    res = list(replay)
    text = tiny_engine.tokenizer.decode(fed)
    compressed = replay.example.context
    assert compressed in text and ex.context not in text
    assert all(turn.input in text for turn in ex.turns)  # queries are never compressed
    first, second = res[0].stats, res[1].stats
    assert abs(first.method_costs["context_rate"] - 1 / 3) <= 0.02 and second.method_costs["context_rate"] == first.method_costs["context_rate"]
    assert first.method_costs["context_compress_s"] > 0 and second.method_costs["context_compress_s"] == 0.0
    assert res[0].reference["answer"] == ex.turns[0].answer  # scoring still sees the original turn


def test_ppl_compress_bad_knobs():
    for bad, field in (({"rate": 0}, "rate"), ({"rate": 1.5}, "rate"), ({"scorer": ""}, "scorer"),
                       ({"segment": 8}, "segment"), ({"segment": 64, "overlap": 64}, "overlap")):
        with pytest.raises(ValueError, match=field):
            PerplexityCompress(**bad)


# --- LLMLingua-2 adapter (the package and its model are not needed: a stand-in module plays the package) ------------
def offline_tiktoken(monkeypatch):
    """tiktoken as it behaves without network: loading the gpt-3.5-turbo encoding raises a connection error."""
    tiktoken = pytest.importorskip("tiktoken")

    def refuse(name):
        raise ConnectionError(f"no network to fetch the encoding for {name}")

    monkeypatch.setattr(tiktoken, "encoding_for_model", refuse)


def fake_llmlingua(monkeypatch, compressor_cls):
    offline_tiktoken(monkeypatch)
    mod = types.ModuleType("llmlingua")
    mod.__spec__ = importlib.machinery.ModuleSpec("llmlingua", None)
    mod.PromptCompressor = compressor_cls
    monkeypatch.setitem(sys.modules, "llmlingua", mod)


def test_llmlingua2_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "llmlingua", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"llmlingua package.*\[llmlingua\]"):
        LLMLingua2()


def test_llmlingua2_names_the_missing_model_folder(monkeypatch, tmp_path):
    fake_llmlingua(monkeypatch, object)
    with pytest.raises(FileNotFoundError, match=r"method.path=.*nowhere.*no compressor model"):
        LLMLingua2(path=str(tmp_path / "nowhere"))


def test_llmlingua2_names_the_unreachable_hub_model(monkeypatch, tiny_engine):
    class Offline:
        def __init__(self, model_name, **kw):
            raise OSError(f"We couldn't connect to the hub to load {model_name}")

    fake_llmlingua(monkeypatch, Offline)
    with pytest.raises(FileNotFoundError, match=r"llmlingua-2-xlm-roberta-large-meetingbank.*method.path.*tiktoken"):
        LLMLingua2().compress_context("some context", engine=tiny_engine)


def test_llmlingua2_calls_the_package_with_the_local_model(monkeypatch, tmp_path, tiny_engine):
    calls = []

    class Compressor:
        def __init__(self, model_name, use_llmlingua2, device_map):
            calls.append((model_name, use_llmlingua2, device_map))

        def compress_prompt(self, context, rate):
            calls.append((context, rate))
            return {"compressed_prompt": context[: int(len(context) * rate)]}

    folder = tmp_path / "llmlingua-2-xlm-roberta-large-local"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    fake_llmlingua(monkeypatch, Compressor)
    m = LLMLingua2(path=str(folder), rate=0.5)
    assert m.compress_context("abcdefgh", engine=tiny_engine) == "abcd"
    assert m.compress_context("ijkl", engine=tiny_engine) == "ij"  # the compressor is loaded once
    assert calls == [(str(folder), True, "cpu"), ("abcdefgh", 0.5), ("ijkl", 0.5)]
    assert m.gpt_counter.startswith("words")  # tiktoken offline: the word stand-in counted llmlingua's statistics


def test_llmlingua2_names_the_model_family_llmlingua_needs(monkeypatch, tmp_path):
    fake_llmlingua(monkeypatch, object)
    (tmp_path / "my-compressor").mkdir()
    (tmp_path / "my-compressor" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"my-compressor.*xlm-roberta-large.*folder name"):
        LLMLingua2(path=str(tmp_path / "my-compressor"))
    with pytest.raises(ValueError, match="tiktoken"):
        LLMLingua2(tiktoken="sometimes")


def test_llmlingua2_tiktoken_required_fails_offline(monkeypatch, tiny_engine):
    fake_llmlingua(monkeypatch, object)
    with pytest.raises(RuntimeError, match=r"tiktoken could not load.*TIKTOKEN_CACHE_DIR"):
        LLMLingua2(tiktoken="required").compress_context("ctx", engine=tiny_engine)


def tiny_llmlingua2_model(folder):
    """A random 2-layer XLM-RoBERTa token classifier (keep/drop) with a sentencepiece-style character tokenizer,
    saved as an LLMLingua-2 compressor folder: the package's real loading and compression code runs on it."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification, XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = specials + ["\u2581"] + list(chars) + ["\u2581" + c for c in chars]
    vocab = [(p, 0.0 if p in specials else -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok = XLMRobertaTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                  cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=len(pieces), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=520, num_labels=2, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2)
    XLMRobertaForTokenClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_llmlingua2_runs_the_real_package(tmp_path, tiny_engine, mode, monkeypatch):
    """The installed llmlingua (no stand-in module) loads a local compressor folder offline and compresses the
    context through the runner; the kept words come from the context, in order, at about the asked rate."""
    pytest.importorskip("llmlingua")
    offline_tiktoken(monkeypatch)
    folder = tmp_path / "tiny-xlm-roberta-large-random"
    tiny_llmlingua2_model(folder)
    method = LLMLingua2(path=str(folder), rate=1 / 3, device="cpu")
    task, ex = example(tiny_engine, "scbench_kv", length=500, turns=2)
    spec = RunSpec(model={}, method={"name": "llmlingua2"}, task=task.name, mode=mode, max_turns=2,
                   max_seq_length=tiny_engine.window, max_new_tokens=4)
    replay = Replay(tiny_engine, method, task, ex, spec)
    results = list(replay)
    assert len(results) == 2 and method.gpt_counter.startswith("words")
    short, full = replay.example.context, ex.context
    assert 0 < len(short) < len(full)
    pos = 0
    for w in short.split():  # every kept alphanumeric run occurs in the context, in order
        for run in "".join(c if c.isalnum() else " " for c in w).split():
            at = full.find(run, pos)
            assert at >= 0, (run, w)
            pos = at
    first, second = results[0].stats, results[1].stats
    assert 0.1 < first.method_costs["context_rate"] < 0.7 and second.method_costs["context_rate"] == first.method_costs["context_rate"]
    assert first.method_costs["context_compress_s"] > 0 and second.method_costs["context_compress_s"] == 0.0


def test_scorer_is_the_run_model_or_a_cached_engine(tiny_engine, embedded_folder, monkeypatch):
    """``engine`` and a run whose model is the scorer reuse the run's model; any other scorer is loaded once
    through the engine registry (the process's shared engines) on the run's device."""
    from scbench.registry import ENGINES

    loaded = []
    stand_in = types.SimpleNamespace(model="scorer-model", tokenizer="scorer-tokenizer")
    monkeypatch.setattr(ENGINES, "open", lambda cfg, name: loaded.append((cfg, name)) or stand_in)
    assert PerplexityCompress(scorer="engine").scoring_model(tiny_engine)[0] is tiny_engine.model
    assert PerplexityCompress().scoring_model(tiny_engine) == ("scorer-model", "scorer-tokenizer")
    assert loaded == [({"name": "embedded:smollm2", "path": "embedded:smollm2", "device": "cpu"}, "hf")]
    run_model = types.SimpleNamespace(model=types.SimpleNamespace(name_or_path=embedded_folder), tokenizer="tok",
                                      adapter_info={}, device=torch.device("cpu"))
    assert PerplexityCompress().scoring_model(run_model) == (run_model.model, "tok")
    run_model.adapter_info = {"adapter": "probe"}  # an adapted run model is not the plain scorer
    assert PerplexityCompress().scoring_model(run_model) == ("scorer-model", "scorer-tokenizer")
