"""Named registries of factories with lazy imports and "did you mean" errors."""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable


class UnknownName(KeyError, ValueError):
    """An unknown registry key (a bad value in a config, too); the message lists valid names and the closest match."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def suggest(name: str, valid: list[str], kind: str) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(sorted(valid))}"


class Registry:
    """Maps a name to "module:attribute"; the module is imported only when the name is used.

    Out-of-tree entries come from the entry-point group ``scbench.<kind>s`` (``scbench.methods``,
    ``scbench.tasks``) and from plugin folders (``scbench.plugins``), read on first use."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, str | Callable] = {}
        self._sources: dict[str, str] = {}
        """name -> "module:attribute" as registered (``_entries`` holds the object once imported)."""
        self._plugins_read: str | None = None
        """$SCBENCH_PLUGINS when plugins were last read (None: never); a changed value reads them again."""

    def add(self, name: str, target: str | Callable) -> None:
        if name in self._entries and target not in (self._entries[name], self._sources.get(name)):
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries.setdefault(name, target)
        if isinstance(target, str):
            self._sources[name] = target

    def _read_plugins(self) -> None:
        import os

        from scbench.plugins import ENV, load_plugins

        if self._plugins_read != os.environ.get(ENV, ""):
            self._plugins_read = os.environ.get(ENV, "")
            load_plugins({"scbench.methods": METHODS, "scbench.tasks": TASKS})

    def names(self) -> list[str]:
        self._read_plugins()
        return sorted(self._entries)

    def check(self, name: str) -> None:
        if name not in self._entries:
            self._read_plugins()
        if name not in self._entries:
            raise UnknownName(suggest(name, list(self._entries), self.kind))

    def target(self, name: str) -> str | Callable:
        """The registered "module:attribute" (the object itself when it was added as one)."""
        self.check(name)
        return self._sources.get(name, self._entries[name])

    def get(self, name: str) -> Any:
        self.check(name)
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target


class EngineRegistry(Registry):
    """Engine classes by name; ``open`` builds one through its ``from_config`` and keeps it for the process."""

    def __init__(self):
        super().__init__("engine")
        self._open: dict[tuple, Any] = {}

    def open(self, model: dict, name: str = "hf", options: dict | None = None):
        """One engine per model config, engine name and options per process (Hydra multirun jobs and methods that
        load a second model share it). Opening an ``exclusive`` engine (vLLM reserves its device's memory) closes
        the other engines of its class first."""
        options = dict(options or {})
        key = (name, repr(sorted(model.items())), repr(sorted(options.items())))
        if key not in self._open:
            cls = self.get(name)
            if cls.exclusive:
                for k in [k for k, e in self._open.items() if type(e) is cls]:
                    self._open.pop(k).close()
            self._open[key] = cls.from_config(model, options)
        return self._open[key]


ENGINES = EngineRegistry()
ENGINES.add("hf", "scbench.engines.hf:HFEngine")
ENGINES.add("vllm", "scbench.engines.vllm:VLLMEngine")

TASKS = Registry("task")
for _name in ("scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_repoqa", "scbench_qa_eng", "scbench_qa_chn",
              "scbench_choice_eng", "scbench_mf", "scbench_many_shot", "scbench_summary",
              "scbench_summary_with_needles", "scbench_repoqa_and_kv"):
    TASKS.add(_name, f"scbench.tasks.{_name.removeprefix('scbench_')}:TASK")

METHODS = Registry("method")
METHODS.add("full", "scbench.methods.full:FullAttention")
METHODS.add("streamingllm", "scbench.methods.streamingllm:StreamingLLM")
METHODS.add("snapkv", "scbench.methods.snapkv:SnapKV")
METHODS.add("pyramidkv", "scbench.methods.pyramidkv:PyramidKV")
METHODS.add("h2o", "scbench.methods.h2o:H2O")
METHODS.add("adakv", "scbench.methods.adakv:AdaKV")
METHODS.add("kvzip", "scbench.methods.kvzip:KVzip")
METHODS.add("duo_attention", "scbench.methods.duo_attention:DuoAttention")
METHODS.add("kivi", "scbench.methods.kivi:KIVI")
METHODS.add("vllm_kv_quant", "scbench.methods.vllm_kv_quant:VLLMKVQuant")
METHODS.add("ashape", "scbench.methods.ashape:AShape")
METHODS.add("trishape", "scbench.methods.trishape:TriShape")
METHODS.add("vertical_slash", "scbench.methods.vertical_slash:VerticalSlash")
METHODS.add("quest", "scbench.methods.quest:Quest")
METHODS.add("retrieval_attention", "scbench.methods.retrieval_attention:RetrievalAttention")
METHODS.add("ppl_compress", "scbench.methods.prompt_compression:PerplexityCompress")
METHODS.add("llmlingua2", "scbench.methods.prompt_compression:LLMLingua2")
METHODS.add("cacheblend", "scbench.methods.cacheblend:CacheBlend")
