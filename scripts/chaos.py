"""Fault injection: SIGKILL a small sweep at random phases N times, re-launch until it finishes, compare with a clean run.

    python scripts/chaos.py [--kills 20] [--seed 0] [--workdir /tmp/scbench-chaos] [--json OUT.json]

The sweep (``SWEEP`` below: KIVI 2- and 4-bit at group 8 / residual 8, whose resume once lost the decode-time
quantisation of the prompt tail, multi-turn and multi-request, a random-weight tiny Llama
on the CPU) first runs once uninterrupted into ``clean.sqlite``. Then each launch into ``chaos.sqlite`` gets a
random target phase (model load, prefill, decode, inside a store commit, between turns) and occurrence; when the
child reaches it, a timer thread SIGKILLs the child a few milliseconds later (no cleanup runs) and records the
phase the process was really in. After a kill the sweep is re-launched (it resumes; the dead owner's lease is
taken over); when it finishes before the kills are spent, a new round starts on a fresh store. At the end every
round's store is compared with the clean one on every turn column but timings. Prints kills, phases hit, rows
lost, rows differing, duplicate rows, runs not done and resume mismatches; exits 1 when any is non-zero.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

SWEEP = ["-m", "method=kivi", "method.group=8", "method.residual=8", "method.bits=2,4", "mode=multi_turn,multi_request",
         "model.path=random:tiny-llama", "model.name=tiny-llama", "model.device=cpu", "model.dtype=float32",
         "model.window=4096", "data.n=2", "data.length=400", "data.turns=3", "max_new_tokens=12", "progress=false"]
PHASES = {"model_load": 1, "prefill": 8, "decode": 8, "commit": 6, "between_turns": 6}
"""Target phases and the largest occurrence a launch may be killed at (counted from the launch's start)."""
VOLATILE = {"created"}


# --- the child: one launch of the sweep, with phase hooks ------------------------------------------------
def child(target: str, phase_file: str, seed: int, argv: list[str]) -> None:
    from scbench import run as run_mod
    from scbench.engines import hf_session
    from scbench.store import Store

    rng = random.Random(seed)
    phase, _, nth = target.partition(":")
    nth = int(nth or 0)
    state = {"now": "startup", "seen": collections.Counter()}
    fh = os.open(phase_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def kill_soon(delay: float) -> None:
        def fire():
            os.pwrite(fh, f"{state['now']:<32}".encode(), 0)  # the phase the process is really in
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Timer(delay, fire).start()

    def enter(name: str) -> None:
        state["now"] = name
        state["seen"][name] += 1
        if name == phase and state["seen"][name] == nth:
            kill_soon(rng.uniform(0.0, 0.3 if name == "model_load" else 0.01))

    def wrap(owner, attr: str, name: str, after: str = "running"):
        real = getattr(owner, attr)

        def hooked(*a, **k):
            enter(name)
            try:
                return real(*a, **k)
            finally:
                state["now"] = after
                if after == "between_turns":
                    enter("between_turns")

        setattr(owner, attr, hooked)

    wrap(run_mod, "get_engine", "model_load")
    wrap(hf_session.HFSession, "feed", "prefill")
    wrap(hf_session.HFSession, "generate", "decode")
    wrap(Store, "put", "commit", after="between_turns")
    if phase == "between_turns":  # killed right after a commit returns: no delay
        real_enter = enter

        def enter(name: str) -> None:  # noqa: F811 - the immediate variant for this phase
            real_enter(name)
            if name == "between_turns" and state["seen"][name] == nth:
                os.pwrite(fh, f"{'between_turns':<32}".encode(), 0)
                os.kill(os.getpid(), signal.SIGKILL)

    from scbench.cli import main

    main(["run", *argv])


# --- the parent -------------------------------------------------------------------------------------------
def launch(store: Path, workdir: Path, target: str | None, seed: int) -> tuple[int, str | None]:
    """Run the sweep once into ``store``; (exit code, phase killed in or None)."""
    phase_file = workdir / "phase.txt"
    phase_file.unlink(missing_ok=True)
    args = [*SWEEP, f"store={store}", f"hydra.sweep.dir={workdir}/hydra"]
    cmd = [sys.executable, __file__, "--child", target or "none:0", "--phase-file", str(phase_file),
           "--seed", str(seed), "--", *args]
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed = None
    if p.returncode == -signal.SIGKILL:
        killed = phase_file.read_text().strip() if phase_file.exists() else "?"
    elif p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
    return p.returncode, killed


def turns(db: Path) -> dict:
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    cur = con.execute("SELECT * FROM turns")
    cols = [c[0] for c in cur.description]
    out = collections.defaultdict(list)
    for r in cur.fetchall():
        d = dict(zip(cols, r))
        key = (d["run_id"], d["example_id"], d["turn"])
        costs = json.loads(d.get("method_costs") or "{}")
        d["method_costs"] = {k: v for k, v in costs.items() if not k.endswith("_s")}
        out[key].append({k: v for k, v in d.items() if k not in VOLATILE and not k.endswith("_s")
                         and k not in ("decode_tok_s", "decode_path", "peak_mem_bytes")})
    con.close()
    return out


def run_states(db: Path) -> list[dict]:
    from scbench.store import Store

    store = Store(db, readonly=True)
    try:
        return store.runs()
    finally:
        store.close()


def compare(clean: dict, chaos: dict) -> dict:
    lost = [k for k in clean if k not in chaos]
    extra = [k for k in chaos if k not in clean]
    dup = [k for k, v in chaos.items() if len(v) > 1]
    differ = [k for k in clean if k in chaos and chaos[k][0] != clean[k][0]]
    return {"rows": len(clean), "lost": len(lost), "extra": len(extra), "duplicates": len(dup), "differing": len(differ),
            "differing_rows": [list(k) for k in differ[:10]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs to inject in all (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/scbench-chaos")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.phase_file, a.seed, a.rest)
        return
    rng = random.Random(a.seed)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for p in work.glob("*.sqlite*"):
        p.unlink()
    t0 = time.time()
    clean = work / "clean.sqlite"
    rc, _ = launch(clean, work, None, 0)
    if rc != 0:
        sys.exit(f"the clean sweep failed (exit {rc})")
    want = turns(clean)
    print(f"clean sweep: {len(want)} turn rows in {time.time() - t0:.0f} s", flush=True)
    kills, phases, launches, rounds = 0, collections.Counter(), 0, []
    store = None
    while kills < a.kills or store is not None:
        if store is None:
            store = work / f"chaos{len(rounds)}.sqlite"
            rounds.append(store)
        target = None
        if kills < a.kills:
            phase = rng.choice(sorted(PHASES))
            target = f"{phase}:{rng.randint(1, PHASES[phase])}"
        rc, killed = launch(store, work, target, rng.randrange(2**31))
        launches += 1
        if killed is not None:
            kills += 1
            phases[killed] += 1
            print(f"kill {kills}: target {target}, killed in {killed}", flush=True)
        elif rc == 0:
            store = None  # this round's sweep finished
        else:
            sys.exit(f"a launch failed with exit {rc} (not a kill)")
    report = {"kills": kills, "launches": launches, "rounds": len(rounds), "phases_hit": dict(sorted(phases.items())),
              "seconds": round(time.time() - t0)}
    totals = collections.Counter()
    not_done, mismatches = 0, 0
    for db in rounds:
        c = compare(want, turns(db))
        for k in ("lost", "extra", "duplicates", "differing"):
            totals[k] += c[k]
        if c["differing_rows"]:
            print(f"{db.name}: rows differing {c['differing_rows']}")
        runs = run_states(db)
        not_done += sum(r["status"] != "done" for r in runs)
        mismatches += sum(bool(r.get("resume_mismatch")) for r in runs)
    report.update({"rows_per_round": len(want), "rows_lost": totals["lost"], "rows_differing": totals["differing"],
                   "rows_extra": totals["extra"], "duplicate_rows": totals["duplicates"], "runs_not_done": not_done,
                   "resume_mismatches": mismatches})
    print(json.dumps(report, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    bad = totals["lost"] + totals["differing"] + totals["extra"] + totals["duplicates"] + not_done + mismatches
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
