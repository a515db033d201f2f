"""The default demo's wall time and DMTC's gain over supervised training, per sid (synthetic set, split 8).

For each sid, runs the real entry point as a user does, one run at a time (torch's default threads):

* ``python train.py sid=SID``: the default job (DMTC, warm-up of A and B, five phases); its wall time is
  the process's, from start to exit (data generation included when --out's cache is empty);
* ``python train.py method=supervised sid=SID seed=K`` for K = 0 and 1: the labeled images only, with the
  warm-up's schedule, seeded as models A (pair seed 0) and B (pair seed 1) are.

The gain is ``mean(final A, final B) - mean(supervised seed 0, seed 1)`` (the supervised models the
pair would be without DMTC), also given against the pair's own warm-up. Each run has its own folder
under --out; a folder with results.json is reused. The synthetic set is generated once under
``--out/cache`` (counted in the first default job's wall time). Prints markdown for benchmarks/RESULTS.md.

    python benchmarks/demo_gain.py --sids 0 1 2 [--out /tmp/demo_gain] [-- HYDRA_OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (this folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, name: str, overrides: list[str]) -> tuple[dict, float | None]:
    """``train.py overrides`` in ``out/name`` (reused when finished): its results.json and wall time (None
    when reused)."""
    folder = out / name
    results = folder / "results.json"
    if results.is_file():
        return json.loads(results.read_text()), None
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={folder}", "logger=csv"]
    env = dict(os.environ, DMTC_CACHE_DIR=str(out / "cache"), WANDB_MODE="disabled")
    start = time.perf_counter()
    with open(folder / "stdout.log", "w") as log:
        code = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed with exit code {code}: see {folder / 'stdout.log'}")
    return json.loads(results.read_text()), wall


def fmt(values: list[float]) -> str:
    """``mean ± sample std`` (the value alone for one)."""
    if len(values) < 2:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sids", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/demo_gain"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    print(f"<!-- {datetime.date.today()} · {cpu_model()} · {os.cpu_count()} CPUs · commit {commit.strip()} · "
          f"`python benchmarks/demo_gain.py {shlex.join(sys.argv[1:])}` -->")
    print("| sid | default job wall | supervised seed 0 / 1 | warm-up A / B | final A / B / ensemble "
          "| final − supervised | final − warm-up |")
    print("|---|---|---|---|---|---|---|")
    gains, own, walls = [], [], []
    for sid in args.sids:
        dmtc, wall = run(args.out, f"dmtc_sid{sid}", [f"sid={sid}", *args.overrides])
        sup = [run(args.out, f"supervised_sid{sid}_seed{k}", ["method=supervised", f"sid={sid}", f"seed={k}",
                                                               *args.overrides])[0] for k in (0, 1)]
        sup_miou = [r["miou"] for r in sup]
        warm = dmtc["phases"][0]["val"]
        final = dmtc["phases"][-1]["val"]
        final_ab = (final["a"]["miou"] + final["b"]["miou"]) / 2
        gains.append(final_ab - statistics.mean(sup_miou))
        own.append(final_ab - (warm["a"]["miou"] + warm["b"]["miou"]) / 2)
        if wall is not None:
            walls.append(wall)
        print(f"| {sid} | {'reused' if wall is None else f'{wall:.1f} s'} | {sup_miou[0]:.2f} / {sup_miou[1]:.2f} "
              f"| {warm['a']['miou']:.2f} / {warm['b']['miou']:.2f} | {final['a']['miou']:.2f} / "
              f"{final['b']['miou']:.2f} / {final['ens']['miou']:.2f} | {gains[-1]:+.2f} | {own[-1]:+.2f} |",
              flush=True)
    print(f"\nDMTC − supervised (mean of A and B): **{fmt(gains)}**; DMTC − its own warm-up: {fmt(own)}"
          + (f"; default job wall {min(walls):.1f}–{max(walls):.1f} s" if walls else ""))


if __name__ == "__main__":
    main()
