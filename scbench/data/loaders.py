"""Load SCBench rows from the hub, a local folder or file, or the offline generators.

Every path ends in ``parse_row``, which checks the schema
``{id, context: str | list[int], multi_turns: [{input: str, answer, ...}], ...}`` and names the file,
the row and the field when something is off.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Iterable

from scbench.records import Example, Turn

HUB_ID = "microsoft/SCBench"


class DataError(ValueError):
    """A malformed row or an unusable data source."""


def parse_row(row: Any, where: str) -> Example:
    """Validate one row and turn it into an Example. ``where`` names the file and row for errors."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("id", "context", "multi_turns"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (fields present: {', '.join(sorted(row))})")
    context = row["context"]
    if not isinstance(context, str) and not (
        isinstance(context, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in context)
    ):
        raise DataError(f"{where}: field 'context' must be a string or a list of integers, got {type(context).__name__}")
    turns_raw = row["multi_turns"]
    if not isinstance(turns_raw, list) or not turns_raw:
        raise DataError(f"{where}: field 'multi_turns' must be a non-empty list")
    turns = []
    for j, t in enumerate(turns_raw):
        if not isinstance(t, dict):
            raise DataError(f"{where}: multi_turns[{j}] must be an object")
        if not isinstance(t.get("input"), str):
            raise DataError(f"{where}: multi_turns[{j}].input must be a string")
        if "answer" not in t or t["answer"] is None:
            raise DataError(f"{where}: multi_turns[{j}].answer is missing")
        turns.append(Turn(input=t["input"], answer=t["answer"], extra={k: v for k, v in t.items() if k not in ("input", "answer")}))
    extra = {k: v for k, v in row.items() if k not in ("id", "context", "multi_turns")}
    return Example(id=str(row["id"]), context=context, turns=tuple(turns), extra=extra, source=where)


def _read_file(path: Path) -> Iterable[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:row {i}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:row {i}: not valid JSON ({e.msg} at column {e.colno})") from None
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        for i, r in enumerate(rows):
            yield f"{path}:row {i}", r
    elif path.suffix == ".parquet":
        import pandas as pd

        for i, r in enumerate(pd.read_parquet(path).to_dict(orient="records")):
            yield f"{path}:row {i}", _plain(r)
    else:
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")


def _plain(value: Any) -> Any:
    """numpy arrays / scalars from parquet -> plain Python lists and numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def local_files(path: Path, config: str) -> list[Path]:
    """Files holding ``config`` under ``path``: the file itself, ``<config>.{jsonl,json,parquet}``,
    or every data file in ``<config>/``."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    for ext in (".jsonl", ".json", ".parquet"):
        if (path / f"{config}{ext}").exists():
            return [path / f"{config}{ext}"]
    sub = path / config
    if sub.is_dir():
        files = sorted(p for p in sub.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
        if files:
            return files
    raise DataError(f"no data for {config} under {path}: expected {config}.jsonl, {config}.parquet or {config}/*.jsonl")


def load_hub(config: str, hub_id: str = HUB_ID, split: str = "test") -> Iterable[tuple[str, Any]]:
    try:
        import datasets
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # offline mode, no network, unknown config...
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        raise DataError(
            f"could not load {hub_id}/{config} (split {split}) from the Hugging Face hub"
            f"{' (offline mode is set)' if offline else ''}: {type(e).__name__}: {e}. "
            f"Use data.source=local data.path=DIR with {config}.jsonl, or data.source=generated."
        ) from None
    for i, r in enumerate(ds):
        yield f"hub:{hub_id}/{config}:row {i}", r


def generate_rows(task, n: int, length: int, n_turns: int, seed: int, count=None) -> list[dict]:
    """``n`` rows of ``task`` at about ``length`` context tokens, deterministic in ``seed``."""
    from scbench.tasks.base import approx_tokens

    if n < 1:
        raise DataError(f"data.n must be >= 1, got {n}")
    if length < 64:
        raise DataError(f"data.length must be >= 64 tokens, got {length}")
    if n_turns < 1:
        raise DataError(f"data.turns must be >= 1, got {n_turns}")
    count = count or approx_tokens
    rows = []
    for i in range(n):
        rng = random.Random(f"{task.name}:{seed}:{i}")
        rows.append(task.generate_row(rng, i, length, n_turns, count))
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def load_examples(task, source: str, *, path: str | None = None, hub_id: str = HUB_ID, split: str = "test",
                  n: int | None = None, length: int = 2000, turns: int = 5, seed: int = 0, count=None) -> list[Example]:
    """Examples for ``task`` from ``source`` in {generated, local, hub}; ``n`` caps the number of rows."""
    if n is not None and n < 1:
        raise DataError(f"data.n must be >= 1 or null, got {n}")
    if source == "generated":
        rows = generate_rows(task, n or 1, length, turns, seed, count)
        items = [(f"generated:{task.name}:seed={seed}:row {i}", r) for i, r in enumerate(rows)]
    elif source == "local":
        if not path:
            raise DataError("data.source=local needs data.path (a folder or a .jsonl/.json/.parquet file)")
        items = [item for f in local_files(Path(path), task.name) for item in _read_file(f)]
    elif source == "hub":
        items = list(load_hub(task.name, hub_id, split))
    else:
        raise DataError(f"data.source must be generated, local or hub, got {source!r}")
    if n is not None:
        items = items[:n]
    examples = [parse_row(r, where) for where, r in items]
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"duplicate example id {dup!r} in {task.name} data ({examples[ids.index(dup)].source})")
    return examples
