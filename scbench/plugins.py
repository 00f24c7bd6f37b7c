"""Out-of-tree methods and tasks, without editing the package.

Two ways in, both read on the first use of a registry:

* an installed package declares entry points in the groups ``scbench.methods`` / ``scbench.tasks``
  (``random_evict = "my_pkg.random_evict:RandomEvict"``);
* a plugin folder (``scbench run plugins=DIR``, or ``SCBENCH_PLUGINS=DIR1:DIR2`` for every command): each
  ``*.py`` file (and package) in it is imported under its own name, and every Method subclass and Task instance
  it defines is registered under its ``name``; its ``configs/`` folder (``configs/method/<name>.yaml``, ``configs/task/...``) joins Hydra's
  search path, so ``method=<name>`` finds both the config and the class.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path

ENV = "SCBENCH_PLUGINS"
_loaded: set[str] = set()


def plugin_dirs() -> list[Path]:
    """The folders named by $SCBENCH_PLUGINS (``os.pathsep``-separated); a missing one is an error."""
    out = []
    for part in filter(None, os.environ.get(ENV, "").split(os.pathsep)):
        path = Path(part).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"plugin folder {part} (from {ENV} or plugins=) does not exist")
        out.append(path)
    return out


def add_plugin_dir(path: str | os.PathLike) -> None:
    """Make ``path`` a plugin folder for this process and its children (``plugins=DIR``); the registries read it
    on their next use (they notice the changed environment)."""
    resolved = str(Path(path).expanduser().resolve())
    have = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    if resolved not in have:
        os.environ[ENV] = os.pathsep.join([*have, resolved])


def config_dirs() -> list[Path]:
    """Plugin folders' ``configs/`` folders (extra Hydra config roots)."""
    return [d / "configs" for d in plugin_dirs() if (d / "configs").is_dir()]


def _derives(cls, module: str, name: str) -> bool:
    """Whether ``cls`` derives from ``module.name`` (by its MRO, so this module imports neither base)."""
    return isinstance(cls, type) and any(c.__module__ == module and c.__name__ == name for c in cls.__mro__)


def register_module(module, registries: dict) -> list[str]:
    """Register what a plugin module defines: every Method subclass (under its ``name``) and every Task instance
    (under its ``name``) whose class the module defines. ``registries``: entry-point group -> Registry."""
    names = []
    for value in list(vars(module).values()):
        if _derives(value, "scbench.methods.base", "Method") and value.__module__ == module.__name__ \
                and value.__name__ != "Method":
            registries["scbench.methods"].add(value.name, value)
            names.append(value.name)
        elif _derives(type(value), "scbench.tasks.base", "Task") and type(value).__module__ == module.__name__:
            registries["scbench.tasks"].add(value.name, value)
            names.append(value.name)
    return names


def _import_file(path: Path, registries: dict) -> None:
    name = path.stem.replace("-", "_")
    if name in sys.modules:
        register_module(sys.modules[name], registries)
        return
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py" if path.is_dir() else path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    register_module(module, registries)


def load_plugins(registries: dict) -> None:
    """Register entry points and import plugin folders (each once per process). ``registries``: entry-point group
    (``scbench.methods``, ``scbench.tasks``) -> the Registry it fills."""
    for group, reg in registries.items():
        if group in _loaded:
            continue
        _loaded.add(group)
        for ep in metadata.entry_points(group=group):
            reg.add(ep.name, ep.value)
    for folder in plugin_dirs():
        key = str(folder)
        if key in _loaded:
            continue
        _loaded.add(key)
        if key not in sys.path:
            sys.path.insert(0, key)  # plugin modules may import each other
        for path in sorted(folder.iterdir()):
            if path.name.startswith(("_", ".")) or path.name == "configs":
                continue
            if (path.suffix == ".py" and path.is_file()) or (path.is_dir() and (path / "__init__.py").exists()):
                _import_file(path, registries)
