"""Check a whole run spec before any model loads: data source and path, the method's knobs (names, types,
ranges), the task and its variant, the model's adapter and window against the requested lengths.

Every problem is a ``SpecError``: one line saying what is wrong (naming the key) and a ``fix`` line saying what
to write instead. ``scbench run`` prints both and exits 2, without a traceback.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

DATA_KEYS = ("source", "path", "hub_id", "split", "n", "length", "turns", "seed")
DATA_SOURCES = ("generated", "local", "hub")


class SpecError(ValueError):
    """A spec that cannot run; ``fix`` says what to change."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.message, self.fix = message, fix

    def __str__(self) -> str:
        return self.message + (f"\n  fix: {self.fix}" if self.fix else "")


def did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --- method knobs ---------------------------------------------------------------------------------------
_TYPES = {"int": (int,), "float": (float, int), "bool": (bool,), "str": (str,), "None": (type(None),),
          "list": (list, tuple), "tuple": (list, tuple), "dict": (dict,)}


def type_ok(value, annotation) -> bool | None:
    """Whether ``value`` fits a dataclass field annotation (a string under ``from __future__ import annotations``):
    True / False, or None when the annotation is beyond the plain types checked here."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    allowed: list[type] = []
    for part in (p.strip() for p in text.split("|")):
        base = part.split("[", 1)[0].removeprefix("typing.")
        if base not in _TYPES:
            return None
        allowed += _TYPES[base]
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, tuple(allowed))


_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "None": "null",
          "list": "a list", "tuple": "a list", "dict": "a mapping"}


def type_words(annotation) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return " or ".join(_WORDS.get(p.strip().split("[", 1)[0], p.strip()) for p in text.split("|"))


def cls_default(field) -> str:
    if field.default is not dataclasses.MISSING:
        return "null" if field.default is None else str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
    return "..."


def check_method(cfg: dict, engine_name: str | None = "hf"):
    """The method instance of ``{name, knob: value}``; SpecError for an unknown name or knob, a wrong type or a
    value its ``__post_init__`` refuses, or an engine the method does not run on."""
    from scbench.registry import METHODS, UnknownName

    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name is None:
        raise SpecError("the method config has no 'name'", "pick one with method=NAME (scbench ls methods)")
    try:
        cls = METHODS.get(name)
    except UnknownName as e:
        raise SpecError(str(e), "scbench ls methods lists them") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for knob, value in cfg.items():
        if knob not in fields:
            raise SpecError(f"method {name!r} has no knob {knob!r}",
                            f"{did_you_mean(knob, fields)}its knobs: {', '.join(fields) or 'none'}")
        if type_ok(value, fields[knob].type) is False:
            want = type_words(fields[knob].type)
            raise SpecError(f"method {name}: {knob} must be {want}, got {value!r}", f"e.g. method.{knob}={cls_default(fields[knob])}")
    try:
        method = cls(**cfg)
    except (ValueError, TypeError) as e:
        raise SpecError(f"method {name}: {e}", f"change the knob it names (defaults: configs/method/{name}.yaml)") from None
    if engine_name is not None and engine_name not in method.engines:
        raise SpecError(f"method {name!r} runs on engines {', '.join(method.engines)}, not {engine_name!r}",
                        f"use engine={method.engines[0]} or another method")
    return method


# --- data ------------------------------------------------------------------------------------------------
def check_data(data: dict, task_name: str) -> None:
    """Keys, source, path (it exists and holds the task's rows) and the generator's sizes."""
    from scbench.data.loaders import DataError, local_files

    for key in data:
        if key not in DATA_KEYS:
            raise SpecError(f"data has no key {key!r}", f"{did_you_mean(key, DATA_KEYS)}keys: {', '.join(DATA_KEYS)}")
    source = data.get("source", "generated")
    if source not in DATA_SOURCES:
        raise SpecError(f"data.source={source!r} is not a data source",
                        f"{did_you_mean(str(source), DATA_SOURCES)}use one of {', '.join(DATA_SOURCES)}")
    n = data.get("n")
    if n is not None and (not _is_int(n) or n < 1):
        raise SpecError(f"data.n={n!r} must be an integer >= 1 or null", "e.g. data.n=2 (null: every row)")
    if source == "local":
        path = data.get("path")
        if not path:
            raise SpecError("data.source=local needs data.path",
                            f"data.path=DIR with {task_name}.jsonl (or a .jsonl/.json/.parquet file); "
                            f"scbench data generate task={task_name} out=DIR writes one")
        if not Path(path).expanduser().exists():
            raise SpecError(f"data.path {path} does not exist",
                            f"point data.path at a folder holding {task_name}.jsonl, or use data.source=generated")
        try:
            local_files(Path(path).expanduser(), task_name)
        except DataError as e:
            raise SpecError(str(e), f"scbench data generate task={task_name} out={path} writes one") from None
    elif source == "generated":
        for key, minimum in (("length", 64), ("turns", 1)):
            v = data.get(key)
            if v is not None and (not _is_int(v) or v < minimum):
                raise SpecError(f"data.{key}={v!r} must be an integer >= {minimum}", f"e.g. data.{key}={max(minimum, 2)}")
        if data.get("seed") is not None and not _is_int(data["seed"]):
            raise SpecError(f"data.seed={data['seed']!r} must be an integer", "e.g. data.seed=0")


# --- model -----------------------------------------------------------------------------------------------
def check_model(model: dict, data: dict, max_new_tokens: int | None = None) -> None:
    """The model has a path, its adapter folder exists, and generated contexts fit its window."""
    path = model.get("path")
    if not path:
        raise SpecError("the model config has no 'path'", "pick one with model=NAME (scbench ls models) or set model.path")
    if str(path).startswith("random:"):
        from scbench.engines.models import RANDOM_PRESETS

        if path.removeprefix("random:") not in RANDOM_PRESETS:
            raise SpecError(f"model.path {path}: no such random preset",
                            f"{did_you_mean(path.removeprefix('random:'), RANDOM_PRESETS)}presets: {', '.join(RANDOM_PRESETS)}")
    if model.get("adapter"):
        from scbench.engines.models import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_dir

        fix = f"set model.adapter to an adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        try:
            folder = adapter_dir(model["adapter"])
        except FileNotFoundError as e:
            raise SpecError(str(e), fix) from None
        missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / f).is_file()]
        if missing:
            raise SpecError(f"adapter folder {str(model['adapter'])!r} not found or incomplete: no {', '.join(missing)} "
                            f"in {folder}", fix)
    window, length = model.get("window"), data.get("length")
    if data.get("source", "generated") == "generated" and _is_int(window) and _is_int(length) and length >= window:
        raise SpecError(f"data.length={length} tokens does not fit the window of {model.get('name') or path} "
                        f"({window} tokens, prompts and answers included)",
                        f"use data.length<={window * 7 // 8} or a model with a longer window")
    if _is_int(window) and _is_int(max_new_tokens) and max_new_tokens >= window // 2:
        raise SpecError(f"max_new_tokens={max_new_tokens} leaves no room for the context in the window of "
                        f"{model.get('name') or path} ({window} tokens)", f"use max_new_tokens<={window // 8} or null")


def check_model_path(model: dict) -> None:
    """A local model folder exists (run right before the model loads, after the store and the data files)."""
    path = str(model.get("path") or "")
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise SpecError(f"model.path {path} does not exist", "give a local model folder or a Hugging Face id")


def check_spec(spec, engine_name: str = "hf", *, model: bool = True):
    """Everything about ``spec`` (a RunSpec) that can be checked without loading a model; returns the method
    instance. Raises SpecError (one line + fix) on the first problem. ``model=False``: the caller brings a loaded
    engine, the model config is not checked."""
    from scbench.registry import TASKS, UnknownName

    try:
        spec.validate()
    except ValueError as e:
        raise SpecError(str(e), "see the defaults in configs/config.yaml") from None
    try:
        task = TASKS.get(spec.task)
    except UnknownName as e:
        raise SpecError(str(e), "scbench ls tasks lists them") from None
    try:
        task.with_variant(spec.task_variant)
    except ValueError as e:
        raise SpecError(str(e), "task.variant=null is the reference scoring") from None
    method = check_method(dict(spec.method), engine_name)
    check_data(dict(spec.data), spec.task)
    if model:
        check_model(dict(spec.model), dict(spec.data), spec.max_new_tokens)
    return method
