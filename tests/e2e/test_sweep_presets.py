"""Every named sweep preset composes, and every group choice it sweeps over exists (methods, tasks, modes)."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from scbench.cli import config_dir, group_choices

PRESETS = group_choices("sweep")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes(preset):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={preset}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    assert params, f"sweep {preset} sweeps nothing"
    for key, values in params.items():
        if key in ("method", "task", "mode", "model"):
            for v in str(values).split(","):
                assert v in group_choices(key), f"sweep {preset}: {key}={v} has no config"
    assert cfg.shard is None and cfg.pin_gpu is False


def test_smoke_and_tau_presets_exist():
    assert {"default", "smoke", "paper_tau", "tau_cpu"} <= set(PRESETS)
