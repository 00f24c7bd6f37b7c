"""Prompt compression of the shared context (generation stage, before the model sees it).

Two methods, both through the ``compress_context`` hook: the runner hands them the context text once per
example and every turn's prompt then carries the compressed text; queries are never compressed.

- ``ppl_compress``: perplexity-based token dropping in the style of LLMLingua-1 / Selective Context. A small
  causal LM (by default the embedded SmolLM2-135M) scores every context token by its self-information
  -log p(x_t | x_<t); the least informative tokens are dropped until ``rate`` of them remain, in their order.
  Based on Jiang et al., "LLMLingua" (arXiv 2310.05736) and Li et al., "Compressing Context to Enhance
  Inference Efficiency of Large Language Models" (Selective Context, arXiv 2310.06201). Works offline.
- ``llmlingua2``: LLMLingua-2 through the ``llmlingua`` package (Pan et al., arXiv 2403.12968), SCBench's
  setting rate 1/3. Needs the package (``pip install -e ".[llmlingua]"``) and its compressor model: a local
  folder (``path``) or a hub id (``model``) for users with network. Two things llmlingua 0.2.2 does that an
  offline user trips over, handled here: it picks its word-merging rule from the model *name* (which must contain
  ``xlm-roberta-large`` or ``bert-base-multilingual-cased``; any other name fails deep inside with
  ``NotImplementedError``), so the name is checked up front; and it fetches tiktoken's gpt-3.5-turbo encoding at
  start-up only to count GPT tokens for its own statistics, so without network (``tiktoken: auto``) a stand-in that
  counts words takes its place: the compressed text is the same, and the rate scbench records is measured with
  the run's own tokenizer anyway.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from scbench.methods.base import Method, positive_int

LLMLINGUA2_MODEL = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"
LLMLINGUA2_FAMILIES = ("xlm-roberta-large", "bert-base-multilingual-cased")
"""Substrings llmlingua 0.2.2 looks for in the model name to choose how sub-word tokens merge into words."""
TIKTOKEN_MODES = ("auto", "required", "off")


class _WordCount:
    """Stands in for tiktoken's encoding where llmlingua only counts tokens for its statistics: counts words."""

    name = "words (stand-in for tiktoken gpt-3.5-turbo)"

    def encode(self, text: str, **_) -> list[str]:
        return text.split()


def _check_rate(obj) -> None:
    rate = obj.rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ValueError(f"{type(obj).__name__}.rate must be a number in (0, 1] (fraction of tokens kept), got {rate!r}")


def self_information(model, ids: list[int], *, bos: int | None, segment: int, overlap: int) -> torch.Tensor:
    """-log p(x_t | x_<t) of every token in ``ids`` under a causal LM, in nats: float64 [len(ids)].

    Scored in segments of ``segment`` tokens, each conditioned on the ``overlap`` tokens before it (the first on
    ``bos`` when given); a token with nothing to condition on (the first one without ``bos``) gets +inf, so it is
    always kept.
    """
    n = len(ids)
    info = torch.full((n,), math.inf, dtype=torch.float64)
    dev = next(model.parameters()).device
    for start in range(0, n, segment):
        prefix = ids[max(0, start - overlap):start] if start else ([bos] if bos is not None else [])
        seg = ids[start:start + segment]
        inp = torch.tensor([prefix + seg], device=dev)
        with torch.inference_mode():
            logits = model(input_ids=inp, use_cache=False).logits[0, :-1].float()
        logp = logits.log_softmax(-1).gather(-1, inp[0, 1:, None])[:, 0].double().cpu()
        # logp[j] scores token j + 1 of the input; the segment's tokens start at input index len(prefix)
        first = len(prefix) - 1
        if first < 0:  # no prefix: the first token has no score
            info[start + 1:start + len(seg)] = -logp[: len(seg) - 1]
        else:
            info[start:start + len(seg)] = -logp[first:first + len(seg)]
    return info


def keep_most_informative(info: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` tokens with the highest self-information (clamped to [1, n])."""
    k = min(len(info), max(1, k))
    return info.topk(k).indices.sort().values


@dataclass
class PerplexityCompress(Method):
    """Drop the least informative context tokens, as scored by a small causal LM, to a target rate."""

    rate: float = 1 / 3
    """Fraction of the context's tokens kept (SCBench's prompt-compression setting: 1/3)."""
    scorer: str = "embedded:smollm2"
    """The scoring LM: ``embedded:smollm2``, a local folder or hub id, or ``engine`` for the run's own model."""
    segment: int = 1024
    """Tokens scored per forward (bounds the logits' memory and keeps long contexts inside the scorer window)."""
    overlap: int = 256
    """Tokens of the previous segment each later segment is conditioned on."""

    name: ClassVar[str] = "ppl_compress"
    stages: ClassVar[tuple[str, ...]] = ("generation",)
    dense_prefill: ClassVar[bool] = False
    approximation: ClassVar[str | None] = (
        "token-level dropping by one global top-k over self-information (Selective Context's criterion at "
        "token granularity); no LLMLingua budget controller, no iterative per-segment re-scoring, no "
        "demonstration-level coarse filtering; long contexts are scored in segments conditioned on an overlap"
    )

    def __post_init__(self) -> None:
        _check_rate(self)
        if not isinstance(self.scorer, str) or not self.scorer:
            raise ValueError(f"PerplexityCompress.scorer must be a model path, hub id or 'engine', got {self.scorer!r}")
        positive_int(self, "segment", minimum=16)
        positive_int(self, "overlap", minimum=0)
        if self.overlap >= self.segment:
            raise ValueError(f"PerplexityCompress.overlap ({self.overlap}) must be smaller than segment ({self.segment})")

    def setup(self, engine) -> None:
        """Pick the scoring model for the run's engine once (loading it when it is not the run's model)."""
        if getattr(self, "_scorer_for", None) is not engine:
            self._scorer = self.scoring_model(engine)
            self._scorer_for = engine

    def scoring_model(self, engine):
        """(model, tokenizer) that score tokens: the run's engine when it is the scorer, else the process's shared
        transformers engine for ``scorer`` on the run's device (``scbench.registry.ENGINES``)."""
        from scbench.engines.models import resolve
        from scbench.registry import ENGINES

        if self.scorer == "engine":
            return engine.model, engine.tokenizer
        same = getattr(engine.model, "name_or_path", None) == resolve(self.scorer)
        if same and not getattr(engine, "adapter_info", None):  # the run's model is the scorer: no second copy
            return engine.model, engine.tokenizer
        scorer = ENGINES.open({"name": self.scorer, "path": self.scorer, "device": str(engine.device)}, "hf")
        return scorer.model, scorer.tokenizer

    def compress_context(self, context: str, *, engine) -> str:
        self.setup(engine)  # a no-op after the runner's call; callers outside the runner get the same scorer
        model, tok = self._scorer
        ids = tok(context, add_special_tokens=False)["input_ids"]
        if not ids:
            return context
        info = self_information(model, ids, bos=tok.bos_token_id, segment=self.segment, overlap=self.overlap)
        target = max(1, round(self.rate * len(ids)))
        k, text = target, context
        for _ in range(4):  # kept tokens can merge when the text is re-tokenized: top up towards the target
            kept = [ids[i] for i in keep_most_informative(info, k).tolist()]
            text = tok.decode(kept, clean_up_tokenization_spaces=False)
            short = len(tok(text, add_special_tokens=False)["input_ids"])
            if short >= target or k >= len(ids):
                break
            k += target - short
        return text


@dataclass
class LLMLingua2(Method):
    """LLMLingua-2 token classification (keep / drop) of the context through the ``llmlingua`` package."""

    rate: float = 1 / 3
    """Fraction of the context's tokens kept (SCBench: 1/3)."""
    model: str = LLMLINGUA2_MODEL
    """Hub id of the compressor model, used when ``path`` is null (needs network once)."""
    path: str | None = None
    """Local folder holding the compressor model (wins over ``model``; works offline)."""
    device: str = "auto"
    """Where the compressor runs: ``auto`` (the run's device), ``cpu``, ``cuda``, ..."""
    tiktoken: str = "auto"
    """llmlingua's GPT token counter (statistics only): ``auto`` = tiktoken's gpt-3.5-turbo encoding, or a word
    counter when it cannot be loaded (offline); ``required`` = fail without it; ``off`` = always the word counter."""

    name: ClassVar[str] = "llmlingua2"
    stages: ClassVar[tuple[str, ...]] = ("generation",)
    dense_prefill: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_rate(self)
        if self.tiktoken not in TIKTOKEN_MODES:
            raise ValueError(f"LLMLingua2.tiktoken must be one of {TIKTOKEN_MODES}, got {self.tiktoken!r}")
        if importlib.util.find_spec("llmlingua") is None:
            raise ImportError(
                "method llmlingua2 needs the llmlingua package, which is not installed: "
                "pip install -e '.[llmlingua]' (or pip install llmlingua)"
            )
        if self.path is not None and not (Path(self.path) / "config.json").is_file():
            raise FileNotFoundError(
                f"llmlingua2: method.path={self.path!r} holds no compressor model (no config.json there); put a "
                f"LLMLingua-2 model such as {self.model} in that folder, or set method.path=null to load "
                f"method.model={self.model!r} from the hub"
            )
        source = self.path or self.model
        if not any(f in str(source) for f in LLMLINGUA2_FAMILIES):
            raise ValueError(
                f"llmlingua2: the compressor model name {str(source)!r} contains none of {LLMLINGUA2_FAMILIES}; "
                "llmlingua chooses how sub-word tokens merge into words from that name and fails otherwise. "
                f"Keep the hub name in the folder name (e.g. .../{LLMLINGUA2_MODEL.split('/')[-1]})"
            )
        self._compressor = None
        self.gpt_counter: str | None = None
        """What counted llmlingua's GPT tokens (set when the compressor loads): tiktoken or the word stand-in."""

    def _gpt_encoding(self):
        import tiktoken

        if self.tiktoken == "off":
            return _WordCount()
        try:
            return tiktoken.encoding_for_model("gpt-3.5-turbo")
        except Exception as e:  # noqa: BLE001 - offline: requests/urllib errors, or a broken TIKTOKEN_CACHE_DIR
            if self.tiktoken == "required":
                raise RuntimeError(
                    f"llmlingua2: tiktoken could not load the gpt-3.5-turbo encoding ({type(e).__name__}: {e}); "
                    "put it in TIKTOKEN_CACHE_DIR or set method.tiktoken=auto to count words instead"
                ) from e
            import logging

            logging.getLogger(__name__).warning(
                "llmlingua2: tiktoken unavailable (%s); llmlingua's own token statistics count words instead "
                "(the compressed text does not change)", type(e).__name__)
            return _WordCount()

    def compressor(self, engine):
        if self._compressor is None:
            from llmlingua import PromptCompressor

            source = self.path or self.model
            device = str(engine.device) if self.device == "auto" else self.device
            from unittest import mock

            import tiktoken

            enc = self._gpt_encoding()
            self.gpt_counter = getattr(enc, "name", type(enc).__name__)
            try:  # PromptCompressor asks tiktoken by name in its constructor: hand it the encoding chosen above
                with mock.patch.object(tiktoken, "encoding_for_model", lambda _name: enc):
                    self._compressor = PromptCompressor(model_name=source, use_llmlingua2=True, device_map=device)
            except OSError as e:  # not on disk and not downloadable (no network, wrong id); requests errors too
                raise FileNotFoundError(
                    f"llmlingua2: could not load the compressor model {source!r} ({type(e).__name__}: {e}). It needs "
                    "the model (set method.path to a local folder holding it, or network for the hub id); "
                    "tiktoken's gpt-3.5-turbo encoding is optional (method.tiktoken=auto)"
                ) from e
        return self._compressor

    def compress_context(self, context: str, *, engine) -> str:
        out = self.compressor(engine).compress_prompt(context, rate=self.rate)
        return out["compressed_prompt"]
