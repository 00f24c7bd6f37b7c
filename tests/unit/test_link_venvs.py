"""scripts/link_venvs.py (hard links identical files across `make test`'s environments) and the skip marker the
Makefile writes when the disk is too full for a reference environment."""
from __future__ import annotations

import os

import pytest
from support import disk_skip_reason, load_script

link_venvs = load_script("link_venvs.py")


def write(path, data: bytes, mode: int = 0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def test_identical_files_become_one(tmp_path):
    big = os.urandom(200_000)
    a = write(tmp_path / "a" / "torch" / "lib.so", big)
    b = write(tmp_path / "b" / "site" / "torch" / "lib.so", big)
    c = write(tmp_path / "c" / "x.so", big)
    other = write(tmp_path / "b" / "other.so", big[:-1] + bytes([big[-1] ^ 1]))  # same size, one byte differs
    small = write(tmp_path / "c" / "small.py", b"x" * 100)
    small2 = write(tmp_path / "a" / "small.py", b"x" * 100)
    exe = write(tmp_path / "c" / "exe.so", big, 0o755)  # same bytes, other mode: left alone
    linked, saved = link_venvs.link_identical([tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "none"],
                                              min_bytes=1 << 16)
    assert (linked, saved) == (2, 2 * len(big))
    assert a.stat().st_ino == b.stat().st_ino == c.stat().st_ino
    assert a.read_bytes() == b.read_bytes() == c.read_bytes() == big
    assert other.stat().st_ino != a.stat().st_ino and other.read_bytes() != big
    assert exe.stat().st_ino != a.stat().st_ino
    assert small.stat().st_ino != small2.stat().st_ino  # under min_bytes
    assert not list(tmp_path.rglob("*.scbench-link"))
    assert link_venvs.link_identical([tmp_path / "a", tmp_path / "b", tmp_path / "c"]) == (0, 0)  # idempotent


def test_main_skips_missing_folders(tmp_path, capsys):
    write(tmp_path / "a" / "f", b"y" * 70_000)
    write(tmp_path / "b" / "f", b"y" * 70_000)
    assert link_venvs.main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "gone")]) == 0
    out = capsys.readouterr().out
    assert "1 identical files" in out and "gone" not in out


def test_disk_skip_marker(tmp_path):
    python = tmp_path / ".venv-x" / "bin" / "python"
    assert disk_skip_reason(python) is None  # no env, no marker: the caller fails or skips as before
    (tmp_path / ".venv-x.skipped").write_text(".venv-x not built: 900 MiB free on disk, it needs 3000\n")
    assert disk_skip_reason(python) == ".venv-x not built: 900 MiB free on disk, it needs 3000"
    write(python, b"#!/bin/sh\n", 0o755)
    assert disk_skip_reason(python) is None  # a built environment is used whatever the marker says


@pytest.mark.parametrize("env", [".venv-vllm", ".venv-kvpress"])
def test_markers_are_ignored_by_git(env):
    from support import ROOT
    assert f"/{env}.skipped" in (ROOT / ".gitignore").read_text().splitlines()
