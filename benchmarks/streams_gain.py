"""DMT / DMTC gain over supervised training with independent vs shared data streams (synthetic set).

Runs the real entry point, ``python train.py method=M method.streams=S sid=SID``, for every method, stream
mode and sid (``--parallel`` runs side by side, one thread each), each in its own run folder under --out; a
finished run folder is reused. "Supervised" is the shared-stream warm-up pair: with shared batches DMT's
warm-up trains A and B exactly as ``python train.py method=supervised`` does with seeds 0 and 1 (plain DMT,
no contrastive term), so every gain is measured against the same two supervised models per sid.

Prints markdown tables (per run and mean ± sample std over sids) for benchmarks/RESULTS.md.

    python benchmarks/streams_gain.py --sids 0 1 2 --parallel 2
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (this folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def run_dir(out: Path, method: str, streams: str, sid: str) -> Path:
    return out / f"{method}_{streams}_sid{sid}"


def launch(out: Path, method: str, streams: str, sid: str, extra: list[str]) -> subprocess.Popen | None:
    folder = run_dir(out, method, streams, sid)
    if (folder / "results.json").is_file():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "train.py"), f"method={method}", f"method.streams={streams}", f"sid={sid}",
           f"hydra.run.dir={folder}", "logger=none", "dataset.num_workers=1", *extra]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(folder / "stdout.log", "w")  # noqa: SIM115 (closed by the process's end)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def mean_ab(val: dict) -> float:
    return (val["a"]["miou"] + val["b"]["miou"]) / 2


def fmt(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sids", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--methods", nargs="+", default=["dmt", "dmtc"])
    parser.add_argument("--streams", nargs="+", default=["independent", "shared"])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_streams_gain"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    # the shared-stream DMT runs first: their warm-ups are the supervised baseline
    jobs = list(itertools.product(args.sids, ["dmt"], ["shared"]))
    jobs += [(sid, m, s) for sid, m, s in itertools.product(args.sids, args.methods, args.streams)
             if (sid, m, s) not in jobs]
    start = time.perf_counter()
    running: list[subprocess.Popen] = []
    for sid, method, streams in jobs:
        while len(running) >= args.parallel:
            running[0].wait()
            running = [p for p in running if p.poll() is None]
        proc = launch(out, method, streams, sid, args.overrides)
        if proc is not None:
            running.append(proc)
    for proc in running:
        proc.wait()
    wall = time.perf_counter() - start

    def results(method: str, streams: str, sid: str) -> dict | None:
        path = run_dir(out, method, streams, sid) / "results.json"
        return json.loads(path.read_text()) if path.is_file() else None

    print(f"{datetime.date.today()}, {cpu_model()}, `python benchmarks/streams_gain.py --sids {' '.join(args.sids)} "
          f"--parallel {args.parallel}` ({wall / 60:.0f} min for the runs not yet in {out})\n")
    print("| sid | supervised A / B | method | streams | warm-up A / B | final A / B | ensemble final | "
          "final − supervised (mean of A, B) |")
    print("|---|---|---|---|---|---|---|---|")
    gains: dict[tuple[str, str], list[float]] = {}
    for sid in args.sids:
        base = results("dmt", "shared", sid)
        if base is None:
            continue
        sup = base["phases"][0]["val"]
        for method, streams in itertools.product(args.methods, args.streams):
            r = results(method, streams, sid)
            if r is None:
                continue
            warm, final = r["phases"][0]["val"], r["phases"][-1]["val"]
            gain = mean_ab(final) - mean_ab(sup)
            gains.setdefault((method, streams), []).append(gain)
            print(f"| {sid} | {sup['a']['miou']:.2f} / {sup['b']['miou']:.2f} | {method} | {streams} | "
                  f"{warm['a']['miou']:.2f} / {warm['b']['miou']:.2f} | {final['a']['miou']:.2f} / "
                  f"{final['b']['miou']:.2f} | {final['ens']['miou']:.2f} | {gain:+.2f} |")
    print("\n| method | streams | final − supervised over sids (n) |")
    print("|---|---|---|")
    for (method, streams), values in gains.items():
        print(f"| {method} | {streams} | {fmt(values)} (n={len(values)}) |")


if __name__ == "__main__":
    main()
