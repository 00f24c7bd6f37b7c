"""The wheel runs: build it, install it into a fresh virtual environment (dependencies borrowed from this one through
a .pth line, so no network), then from another folder `scbench ls` and one short run of the default (probe) model."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_and_runs(tmp_path):
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                            str(dist), str(REPO)], capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "is absent from the `packages` configuration" not in build.stdout + build.stderr
    wheel = next(dist.glob("scbench-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, env=env)
    own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    here = Path(sysconfig.get_paths()["purelib"])  # this environment's dependencies (and the folders its .pth
    borrowed = [str(here)]                           # lines add: a worktree borrowing another venv's), after the wheel
    for pth in here.glob("*.pth"):
        borrowed += [line for line in pth.read_text().splitlines() if line.endswith("site-packages") and Path(line).is_dir()]
    Path(own, "_borrowed_deps.pth").write_text("\n".join(dict.fromkeys(borrowed)) + "\n")

    def scbench(*args):
        p = subprocess.run([str(venv / "bin" / "scbench"), *args], cwd=elsewhere, capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    where = subprocess.run([str(py), "-c", "import scbench, scbench.models; print(scbench.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True, env=env).stdout
    assert where.startswith(own), where  # the installed copy, not the repository
    assert "streamingllm" in scbench("ls", "methods").stdout
    assert "smollm2-135m-probe" in scbench("ls", "models").stdout
    run = scbench("run", "data.n=1", "data.length=200", "data.turns=1", "max_turns=1", "max_new_tokens=2",
                  "progress=false", "store=out/s.sqlite")
    assert "model: smollm2-135m-probe" in run.stdout, run.stdout
    assert (elsewhere / "out" / "s.sqlite").exists() and not (elsewhere / "results").exists()
