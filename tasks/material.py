"""Real text that ships with every CPython install, used by the offline generators.

- ``documents()``: the Python language-reference sections in ``pydoc_data.topics`` (what ``help()``
  shows), each split into a title, a lead paragraph and a body. The lead paragraph opens the section
  and states what it is about; generators use it as the reference summary and drop it from the
  document body.
- ``paragraphs()``: the body paragraphs of those sections (documentary filler text).
- ``stdlib_files()``: the standard library's ``.py`` files (tests, IDLE, tkinter and lib2to3 left out).

The material is fixed per Python version, so generated rows are deterministic for a given interpreter.
"""
from __future__ import annotations

import re
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SOURCE_DOCS = "CPython pydoc_data.topics (Python language reference sections)"
SOURCE_CODE = "CPython standard library source files"
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages",
             "__pycache__", "pydoc_data", "encodings", "config-3", "venv"}


@dataclass(frozen=True)
class Document:
    key: str
    title: str
    lead: str
    """First paragraph, whitespace-collapsed (the reference summary)."""
    paragraphs: tuple[str, ...]
    """Body paragraphs after the lead, as in the source."""


@lru_cache(maxsize=1)
def documents() -> tuple[Document, ...]:
    """Sections with a title line, a prose lead of >= 100 characters (not ending in ":") and a body of
    >= 400 characters."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        lines = topics[key].split("\n")
        if len(lines) < 3 or not lines[1] or set(lines[1]) != {"*"}:
            continue
        paras = [p for p in re.split(r"\n\s*\n", "\n".join(lines[2:]).strip()) if p.strip()]
        if len(paras) < 2 or paras[0].startswith(" "):
            continue
        lead = " ".join(paras[0].split())
        if len(lead) >= 100 and not lead.endswith(":") and sum(len(p) for p in paras[1:]) >= 400:
            out.append(Document(key, lines[0].strip(), lead, tuple(paras[1:])))
    return tuple(out)


@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Every prose body paragraph of ``documents()`` (indented code/grammar blocks left out)."""
    return tuple(" ".join(p.split()) for d in documents() for p in d.paragraphs
                 if not p.startswith(" ") and len(p) >= 80)


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if 1_500 <= size <= 80_000:
            files.append(path)
    return tuple(files)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])
