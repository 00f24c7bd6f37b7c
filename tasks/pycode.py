"""Offline RepoQA material: a "repository" of real Python standard-library code with needle functions.

Whole top-level statements of randomly chosen stdlib files are concatenated (each file opens with a
``# file: <path>`` line) up to the requested length. Needles are functions or methods with a
docstring whose name occurs once in the context; the needle's docstring is removed from the context,
its first paragraph (with the function's name replaced) becomes the description, and the needle's
remaining source lines, exactly as they appear in the context, are the gold answer.
"""
from __future__ import annotations

import ast
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from scbench.tasks.base import TokenCounter, fit_length
from scbench.tasks.material import stdlib_files, stdlib_root


@dataclass
class Needle:
    name: str
    answer: str
    description: str


@dataclass
class _Unit:
    lines: list[str]
    start: int
    end: int
    header: str
    candidates: list[tuple] = field(default_factory=list)
    """(def_start, def_end, doc_start, doc_end, name, description), 0-based inclusive line indexes."""
    drop: set[int] = field(default_factory=set)
    head: bool = False
    """A class head (kept whenever the file is)."""

    def text(self) -> str:
        body = "\n".join(line for i, line in enumerate(self.lines[self.start:self.end + 1], self.start)
                         if i not in self.drop)
        return self.header + body.rstrip()


def _candidates(node: ast.AST) -> list[tuple]:
    out = []
    fns = [node] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
    if isinstance(node, ast.ClassDef):
        fns = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for fn in fns:
        doc = ast.get_docstring(fn)
        if not doc or fn.name.startswith("__") or len(fn.body) < 2:
            continue
        doc_node = fn.body[0]
        if doc_node.lineno <= fn.lineno:
            continue
        kept = (fn.end_lineno - fn.lineno + 1) - (doc_node.end_lineno - doc_node.lineno + 1)
        lead = " ".join(doc.split("\n\n")[0].split())
        if len(lead) < 40 or not 3 <= kept <= 80:
            continue
        lead = re.sub(rf"\b{re.escape(fn.name)}\b", "this function", lead)
        out.append((fn.lineno - 1, fn.end_lineno - 1, doc_node.lineno - 1, doc_node.end_lineno - 1, fn.name, lead))
    return out


def _start(node: ast.AST) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1


def _split(node: ast.AST) -> list[tuple[int, int, list | None]]:
    """Line ranges of one top-level statement: a class is cut into its head and one piece per body
    statement (contiguous, so the concatenation is the class itself)."""
    if not isinstance(node, ast.ClassDef) or len(node.body) < 2:
        return [(_start(node), node.end_lineno - 1, _candidates(node))]
    pieces, head_end = [], _start(node.body[0]) - 1
    if head_end >= _start(node):
        pieces.append((_start(node), head_end, None))
    for i, stmt in enumerate(node.body):
        last = (_start(node.body[i + 1]) - 1) if i + 1 < len(node.body) else node.end_lineno - 1
        cands = _candidates(stmt) if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
        pieces.append((_start(stmt), last, cands))
    return pieces


def _units(rng: random.Random, chars: int) -> list[_Unit]:
    """Top-level statements of shuffled stdlib files, about ``chars`` characters in all."""
    files = list(stdlib_files())
    rng.shuffle(files)
    root, units, total = stdlib_root(), [], 0
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        header = f"# file: {path.relative_to(root).as_posix()}\n"
        found = []
        for node in tree.body:
            for first, last, cands in _split(node):
                found.append(_Unit(lines, first, last, header, cands or [], head=cands is None))
                header = ""
        if not any(u.candidates for u in found):
            continue  # files without a usable needle only add length
        # statements without needles are thinned for short contexts so that needles fit
        keep = [u for u in found if u.candidates or u.head or rng.random() < min(1.0, chars / 400_000)]
        if found[0] not in keep:
            keep[0].header = found[0].header
        units += keep
        total += sum(len(u.text()) + 2 for u in keep)
        if total >= chars:
            break
    return units


def build_code(rng: random.Random, length: int, count: TokenCounter, n_needles: int,
               extra_lines: list[str] = ()) -> tuple[str, list[Needle]]:
    """A code context of about ``length`` tokens with ``n_needles`` needles; ``extra_lines`` (for
    example KV pairs) are inserted between random top-level statements. Short contexts may need a
    few draws of files before enough needles fit."""
    for _ in range(30):
        found = _attempt(rng, length, count, n_needles, list(extra_lines))
        if found is not None:
            return found
    raise ValueError(f"length={length} is too short for {n_needles} needle functions")


def _attempt(rng, length, count, n_needles, extra_lines):
    extra_tokens = sum(count(x + "\n\n") for x in extra_lines)
    units = _units(rng, chars=int(max(length, 256) * 6))
    layout = random.Random(rng.getrandbits(32))

    def render(n: int) -> str:
        return "\n\n".join(u.text() for u in units[:n])

    n, text = fit_length(render, max(length - extra_tokens, 64), count, start=max(1, length // 60))
    chosen = units[:n]
    defined = Counter(re.findall(r"\bdef\s+(\w+)\s*\(", text))
    names = {}
    for u in chosen:
        for c in u.candidates:
            if defined[c[4]] == 1:
                names.setdefault(c[4], (u, c))
    if len(names) < n_needles:
        return None
    needles = []
    for name in layout.sample(sorted(names), n_needles):
        u, (d0, d1, s0, s1, _, desc) = names[name]
        u.drop.update(range(s0, s1 + 1))
        answer = "\n".join(line for i, line in enumerate(u.lines[d0:d1 + 1], d0) if i not in u.drop)
        needles.append(Needle(name, answer, desc))
    pieces = [u.text() for u in chosen]
    room = length - extra_tokens - count("\n\n".join(pieces))
    clash = re.compile(r"\bdef\s+(%s)\s*\(" % "|".join(re.escape(x.name) for x in needles) or "(?!)")
    for u in units[n:]:  # top up what the removed docstrings and the coarse fit left free
        if room <= 0:
            break
        piece = u.text()
        cost = count(piece + "\n\n")
        if cost > room or clash.search(piece):
            continue
        pieces.append(piece)
        room -= cost
    for line in extra_lines:
        pieces.insert(layout.randint(0, len(pieces)), line)
    return "\n\n".join(pieces), needles
