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
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        raise DataError(f"{where}: field 'id' must be a string or an integer, got {_kind(row['id'])}")
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


def _decode(raw: bytes, path: Path, row: int | None, offset: int) -> str:
    """UTF-8 text of ``raw`` (the bytes at ``offset`` of ``path``); bad bytes name the file, row and byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        where = f"{path}:row {row}" if row is not None else f"{path}:line {line}"
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                        f"of the file); save the data as UTF-8") from None


ANSWER_KINDS = {
    "text": "a string",
    "texts": "a string or a non-empty list of strings",
    "number": "a number (or its digits as a string), or a list of them",
    "key": "a string or an integer",
}
TASK_ANSWERS = {
    "scbench_kv": "text", "scbench_prefix_suffix": "text", "scbench_repoqa": "text", "scbench_summary": "text",
    "scbench_choice_eng": "text", "scbench_repoqa_and_kv": "text",
    "scbench_vt": "texts", "scbench_qa_eng": "texts", "scbench_qa_chn": "texts", "scbench_many_shot": "texts",
    "scbench_mf": "number", "scbench_summary_with_needles": "key",
}
"""What each task's answers must be (a task may also set ``answer_kind``); other tasks take any of the kinds
but never null, booleans or objects."""


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {json.dumps(value, default=str)[:40]}"


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    if isinstance(v, str):
        try:
            float(v.strip())
            return True
        except ValueError:
            return False
    return False


def answer_ok(kind: str, answer: Any) -> bool:
    if kind == "text":
        return isinstance(answer, str)
    if kind == "texts":
        return isinstance(answer, str) or (isinstance(answer, list) and bool(answer)
                                           and all(isinstance(a, str) for a in answer))
    if kind == "number":
        return _is_number(answer) or (isinstance(answer, list) and bool(answer) and all(map(_is_number, answer)))
    if kind == "key":
        return isinstance(answer, str) or (isinstance(answer, int) and not isinstance(answer, bool))
    return any(answer_ok(k, answer) for k in ANSWER_KINDS)


def check_answers(task, examples: list[Example]) -> None:
    """Refuse answers of the wrong type for ``task`` (they would be accepted and silently score 0)."""
    kind = getattr(task, "answer_kind", None) or TASK_ANSWERS.get(task.name, "any")
    for ex in examples:
        for j, turn in enumerate(ex.turns):
            if not answer_ok(kind, turn.answer):
                want = ANSWER_KINDS.get(kind, "a string, a list of strings or a number")
                raise DataError(f"{ex.source}: multi_turns[{j}].answer must be {want} for {task.name}, "
                                f"got {_kind(turn.answer)}")


def _read_file(path: Path) -> Iterable[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        offset, rows = 0, 0
        with path.open("rb") as fh:
            for i, raw in enumerate(fh):
                start, offset = offset, offset + len(raw)
                if i == 0 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not part of the row
                    raw, start = raw[3:], start + 3
                line = _decode(raw, path, i, start)
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:row {i}: not valid JSON ({e.msg} at column {e.colno}, byte offset "
                                    f"{start + len(line[: e.pos].encode('utf-8'))} of the file)") from None
                rows += 1
                yield f"{path}:row {i}", value
        if not rows:
            raise DataError(f"{path}: no rows (the file is empty)")
    elif path.suffix == ".json":
        raw = path.read_bytes()
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        text = _decode(raw[bom:], path, None, bom)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        if not rows:
            raise DataError(f"{path}: no rows (an empty list)")
        for i, r in enumerate(rows):
            yield f"{path}:row {i}", r
    elif path.suffix == ".parquet":
        import pandas as pd

        try:
            records = pd.read_parquet(path).to_dict(orient="records")
        except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for a broken file
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        if not records:
            raise DataError(f"{path}: no rows (the file is empty)")
        for i, r in enumerate(records):
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
    if not items:
        raise DataError(f"no rows for {task.name} from data.source={source}" + (f" ({path})" if path else ""))
    if n is not None:
        items = items[:n]
    examples = [parse_row(r, where) for where, r in items]
    check_answers(task, examples)
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"duplicate example id {dup!r} in {task.name} data ({examples[ids.index(dup)].source})")
    return examples
