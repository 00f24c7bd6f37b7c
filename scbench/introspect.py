"""A method class's stages, engines and knobs read from its source (``ast``), without importing it.

``scbench ls methods`` uses this so that it does not import torch and every method module (seconds); the
plain path imports the class (``declared``) and the tests compare both on every registered method.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
from functools import lru_cache

FIELDS = ("stages", "engines")


@lru_cache(maxsize=None)
def _module_ast(module: str):
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as fh:
        return ast.parse(fh.read(), spec.origin)


def _is_classvar(annotation: ast.expr) -> bool:
    text = ast.unparse(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _find(module: str, name: str, depth: int = 0) -> dict | None:
    """{"stages", "engines", "knobs": {name: (annotation, default)}} of class ``name`` in ``module``, with what it
    inherits from bases defined in the same module or imported from a module (``from X import Base``)."""
    tree = _module_ast(module)
    if tree is None or depth > 8:
        return None
    imports = {a.asname or a.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module
               for a in node.names}
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if cls is None:
        return _find(imports[name], name, depth + 1) if name in imports else None
    constants = {}  # module-level NAME = literal, so a default written as a constant shows its value
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = repr(ast.literal_eval(node.value))
            except ValueError:
                pass
    info = {"stages": (), "engines": ("hf",), "knobs": {}}
    for base in cls.bases:
        base_name = ast.unparse(base)
        if base_name == "object":
            continue
        found = _find(imports.get(base_name, module), base_name, depth + 1) if "." not in base_name else None
        if found is None:
            return None
        info = {"stages": found["stages"], "engines": found["engines"], "knobs": dict(found["knobs"])}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            key = node.target.id
            if _is_classvar(node.annotation):
                if key in FIELDS and node.value is not None:
                    info[key] = tuple(ast.literal_eval(node.value))
            else:
                default = None if node.value is None else ast.unparse(node.value)
                info["knobs"][key] = (ast.unparse(node.annotation), constants.get(default, default))
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in FIELDS:
                info[node.targets[0].id] = tuple(ast.literal_eval(node.value))
    return info


def from_source(target: str) -> dict | None:
    """Stages, engines and knobs ({name: default as written}) of ``"module:Class"``; None when the source cannot
    be read this way (then import the class: ``declared``)."""
    module, _, name = target.partition(":")
    try:
        info = _find(module, name)
    except (ValueError, SyntaxError, ImportError, TypeError):
        return None
    if info is None:
        return None
    return {"stages": list(info["stages"]), "engines": list(info["engines"]),
            "knobs": {k: default for k, (_, default) in info["knobs"].items()}}


def declared(cls) -> dict:
    """The same description from the imported class (the plain reference)."""
    def default(f):
        if f.default is not dataclasses.MISSING:
            return repr(f.default)
        return None

    return {"stages": list(cls.stages), "engines": list(cls.engines),
            "knobs": {f.name: default(f) for f in dataclasses.fields(cls)}}


def describe_method(registry, name: str) -> dict:
    """From the source when possible, else by importing the class."""
    target = registry.target(name)
    if isinstance(target, str):
        info = from_source(target)
        if info is not None:
            return info
    return declared(registry.get(name))
