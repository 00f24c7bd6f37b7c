"""Hard-link identical files across the project's virtual environments to save disk.

`make test` builds three environments (.venv, .venv-vllm, .venv-kvpress), each with its own copy of the same
torch 2.13.0 CPU build (~750 MB). On a CI machine with a small disk that copy is what runs out (CI, 2026-12-02:
"No space left on device" while installing .venv-kvpress). This script replaces every file that is byte-identical
to one already seen (same size, mode and SHA-256, at least --min-bytes long) by a hard link to it, so identical
packages cost their size once. pip never rewrites an installed file in place (it unpacks new files and removes old
ones), so the linked copies stay independent for pip's purposes.

Usage: python scripts/link_venvs.py DIR [DIR ...] [--min-bytes N]; folders that do not exist are skipped. Standard
library only: it runs with the system python before or after any environment exists. Prints the bytes saved.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def candidates(dirs: list[Path], min_bytes: int) -> dict[tuple[int, int], list[Path]]:
    """Regular files (no symlinks) of at least min_bytes, grouped by (size, mode)."""
    groups: dict[tuple[int, int], list[Path]] = {}
    for root in dirs:
        for folder, _, files in os.walk(root):
            for name in files:
                p = Path(folder) / name
                st = p.lstat()
                if not p.is_symlink() and st.st_size >= min_bytes and p.is_file():
                    groups.setdefault((st.st_size, st.st_mode), []).append(p)
    return groups


def link_identical(dirs: list[Path], min_bytes: int = 1 << 16) -> tuple[int, int]:
    """Link byte-identical files to one copy; returns (files linked, bytes saved)."""
    linked = saved = 0
    for (size, _), paths in candidates(dirs, min_bytes).items():
        if len(paths) < 2:
            continue
        first: dict[str, Path] = {}
        for p in paths:
            st = p.stat()
            key = digest(p)
            keep = first.setdefault(key, p)
            if keep is p:
                continue
            kst = keep.stat()
            if (kst.st_ino, kst.st_dev) == (st.st_ino, st.st_dev):
                continue  # already one file
            if kst.st_dev != st.st_dev:
                continue  # hard links stay on one file system
            tmp = p.with_name(p.name + ".scbench-link")
            os.link(keep, tmp)
            os.replace(tmp, p)
            linked += 1
            saved += size
    return linked, saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--min-bytes", type=int, default=1 << 16)
    args = ap.parse_args(argv)
    dirs = [d for d in args.dirs if d.is_dir()]
    linked, saved = link_identical(dirs, args.min_bytes)
    print(f"link_venvs: {linked} identical files in {', '.join(map(str, dirs)) or 'nothing'} now hard links "
          f"({saved / 2**20:.0f} MiB saved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
