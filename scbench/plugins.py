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

import importlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path

ENV = "SCBENCH_PLUGINS"
GROUPS = {"scbench.methods": "METHODS", "scbench.tasks": "TASKS"}
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
    """Make ``path`` a plugin folder for this process and its children (``plugins=DIR``)."""
    resolved = str(Path(path).expanduser().resolve())
    have = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    if resolved not in have:
        os.environ[ENV] = os.pathsep.join([*have, resolved])
        from scbench import registry

        for attr in GROUPS.values():
            getattr(registry, attr)._plugins_read = False


def config_dirs() -> list[Path]:
    """Plugin folders' ``configs/`` folders (extra Hydra config roots)."""
    return [d / "configs" for d in plugin_dirs() if (d / "configs").is_dir()]


def register_module(module) -> list[str]:
    """Register what a plugin module defines: every Method subclass (under its ``name``) and every Task instance
    (under its ``name``) whose class the module defines. Returns the names."""
    from scbench.methods.base import Method
    from scbench.registry import METHODS, TASKS
    from scbench.tasks.base import Task

    names = []
    for value in list(vars(module).values()):
        if isinstance(value, type) and issubclass(value, Method) and value.__module__ == module.__name__ \
                and value.name != Method.name:
            METHODS.add(value.name, value)
            names.append(value.name)
        elif isinstance(value, Task) and type(value).__module__ == module.__name__:
            TASKS.add(value.name, value)
            names.append(value.name)
    return names


def _import_file(path: Path) -> None:
    name = path.stem.replace("-", "_")
    if name in sys.modules:
        register_module(sys.modules[name])
        return
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py" if path.is_dir() else path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    register_module(module)


def load_plugins() -> None:
    """Register entry points and import plugin folders (each once per process)."""
    from scbench import registry

    for group, attr in GROUPS.items():
        if group in _loaded:
            continue
        _loaded.add(group)
        for ep in metadata.entry_points(group=group):
            getattr(registry, attr).add(ep.name, ep.value)
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
                _import_file(path)
