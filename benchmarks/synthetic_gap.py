"""Supervised mIoU on the synthetic set with 1/8 of the labels vs all labels: the gap DMT must close.

Runs the real entry point (`python train.py method=supervised split=S sid=SID ...`) once per split, each in its own run
folder under --out, and prints a markdown table with date, machine and command for benchmarks/RESULTS.md.

    python benchmarks/synthetic_gap.py --splits 8 1 --sids 0 [-- extra overrides]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (this folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", nargs="+", default=["8", "1"])
    parser.add_argument("--sids", nargs="+", default=["0"])
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_synthetic_gap"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()

    rows = []
    for sid in args.sids:
        for split in args.splits:
            run_dir = Path(args.out) / f"split{split}_sid{sid}"
            cmd = [sys.executable, str(REPO / "train.py"), "method=supervised", f"split={split}", f"sid={sid}",
                   f"hydra.run.dir={run_dir}", "logger=none", *args.overrides]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, WANDB_MODE="disabled"))
            wall = time.perf_counter() - start
            res = json.loads((run_dir / "results.json").read_text())
            rows.append((split, sid, res["num_labeled"], res["miou"], res["steps"], wall))
            print(f"split={split} sid={sid}: mIoU {res['miou']:.2f} ({wall:.0f} s)", flush=True)

    print(f"\n{datetime.date.today()} · {os.cpu_count()} × {cpu_model()} · torch "
          f"{__import__('torch').__version__} · `python benchmarks/synthetic_gap.py "
          f"--splits {' '.join(args.splits)} --sids {' '.join(args.sids)} {' '.join(args.overrides)}`\n")
    print("| split | sid | labeled images | steps | val mIoU | wall time (s) |")
    print("|---|---|---|---|---|---|")
    for split, sid, n, miou, steps, wall in rows:
        print(f"| {split} | {sid} | {n} | {steps} | {miou:.2f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
