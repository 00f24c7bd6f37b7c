"""The tests mirror the code: no test module edits sys.path or imports another test module, and the tiny model is
built in one place (tests/support.py)."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _test_files():
    return sorted(p for p in TESTS.rglob("*.py") if p.name not in ("support.py",))


def offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            found.append(f"line {node.lineno}: sys.path (load scripts/ modules with support.load_script)")
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            if name.split(".")[-1].startswith("test_") or name in ("conftest", "tests") or name.startswith("tests."):
                found.append(f"line {node.lineno}: imports the test module {name} (shared helpers go in support.py)")
        if (isinstance(node, ast.Name) and node.id == "LlamaConfig") or (
                isinstance(node, ast.ImportFrom) and any(a.name == "LlamaConfig" for a in node.names)):
            found.append(f"line {node.lineno}: a local LlamaConfig (use support.random_llama / make_tiny_engine)")
    return found


def test_no_sys_path_no_test_imports_one_tiny_model():
    bad = {str(p.relative_to(TESTS)): o for p in _test_files() if (o := offences(p))}
    assert bad == {}


def test_the_check_can_fail(tmp_path):
    f = tmp_path / "test_x.py"
    f.write_text("import sys\nsys.path.insert(0, 'scripts')\nfrom test_other import x\n"
                 "from transformers import LlamaConfig\n")
    assert sorted(o.split(":")[0] for o in offences(f)) == ["line 2", "line 3", "line 4"]
