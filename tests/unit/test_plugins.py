"""Out-of-tree methods and tasks: a plugin folder (tests/fixtures/plugins/random_evict) and an entry point."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch

from scbench import plugins, registry
from scbench.data import generate_rows

# clean_registries: tests/conftest.py

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "plugins" / "random_evict"


def test_plugin_folder_registers_method_task_and_configs(clean_registries, monkeypatch):
    from scbench.overrides import group_choices

    monkeypatch.setenv(plugins.ENV, str(FIXTURE))
    assert "random_evict" in registry.METHODS.names() and "passkey" in registry.TASKS.names()
    assert "random_evict" in group_choices("method") and "passkey" in group_choices("task")
    m = registry.METHODS.get("random_evict")(budget=10, n_init=2, n_local=3)
    k = torch.randn(1, 2, 40, 8)
    kept, _ = m.compress_cache(0, k, k.clone(), None)
    assert kept.shape == (1, 2, 10, 8)
    assert torch.equal(kept[..., :2, :], k[..., :2, :]) and torch.equal(kept[..., -3:, :], k[..., -3:, :])
    rows = generate_rows(registry.TASKS.get("passkey"), 1, 300, 2, 0)
    assert rows[0]["multi_turns"][1]["answer"] in rows[0]["context"]


def test_missing_plugin_folder_is_named(clean_registries, monkeypatch, tmp_path):
    monkeypatch.setenv(plugins.ENV, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="plugin folder .*nope"):
        registry.METHODS.names()


def test_entry_point_group(clean_registries, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURE))
    eps = {"scbench.methods": [metadata.EntryPoint("rand_ep", "random_evict:RandomEvict", "scbench.methods")],
           "scbench.tasks": [metadata.EntryPoint("passkey_ep", "passkey:TASK", "scbench.tasks")]}
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: eps.get(group, []))
    assert registry.METHODS.get("rand_ep").__name__ == "RandomEvict"
    assert registry.TASKS.get("passkey_ep").name == "passkey"
    with pytest.raises(KeyError, match="Did you mean 'rand_ep'"):
        registry.METHODS.get("rand_epp")
