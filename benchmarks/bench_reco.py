"""Benchmark: ReCo loss forward + backward on CPU (DMTC sizes), vectorised vs a per-query loop.

    python benchmarks/bench_reco.py [--runs 10] [--loop-runs 3] [--threads T]

Input: N=8 images, D=150 features at 33×65 (a 257×513 crop at output stride 8), 19 classes, blocky
labels with ~10% ignored pixels, probabilities peaked on the label (about half the valid pixels are hard
anchors), 256 queries × 512 negatives, τ = 0.5, strong threshold 0.97.

Modes: ``shared`` (default of ``reco_loss``: a class's negatives shared by its queries), ``exact``
(per-query negatives), ``loop`` (``benchmarks/reco_loop_reference.py``, per-class/per-query loops).
Each mode runs in a fresh subprocess: extra peak memory = peak RSS (``ru_maxrss``) after the first
forward+backward minus the RSS just before it; time = median over ``--runs`` calls after warm-up (two
calls; for ``loop`` the first, measured-for-memory call only).
Prints markdown table rows (date, machine, torch version, command). Targets for ``shared``: ≤ 100 ms
median and ≤ 512 MB extra peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (this folder is on sys.path)

HERE = Path(__file__).resolve().parent
N, D, H, W, C = 8, 150, 33, 65, 19
QUERIES, NEGATIVES, TAU, STRONG = 256, 512, 0.5, 0.97


def make_inputs(seed: int = 0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, C, (N, 1, 6, 11), generator=g).float()
    labels = F.interpolate(coarse, size=(H, W), mode="nearest").squeeze(1).long()
    ignore = F.interpolate((torch.rand(N, 1, 11, 22, generator=g) < 0.1).float(), size=(H, W), mode="nearest")
    valid = ignore.squeeze(1) < 0.5
    labels[~valid] = 255
    logits = torch.randn(N, C, H, W, generator=g) * 1.5
    logits += 7.5 * F.one_hot(labels.clamp_max(C - 1), C).permute(0, 3, 1, 2)
    probs = torch.softmax(logits, dim=1)
    features = torch.randn(N, D, H, W, generator=g).requires_grad_(True)
    return features, labels, valid, probs


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(mode: str, runs: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    from reco_loop_reference import reco_loss_loop

    from dmtc.losses.reco import reco_loss

    features, labels, valid, probs = make_inputs()
    torch.manual_seed(0)

    def step() -> float:
        features.grad = None
        if mode == "loop":
            loss = reco_loss_loop(features, labels, valid, probs, STRONG, TAU, QUERIES, NEGATIVES)
        else:
            loss = reco_loss(features, labels, valid, probs, strong_threshold=STRONG, temperature=TAU,
                             num_queries=QUERIES, num_negatives=NEGATIVES, shared_negatives=(mode == "shared"))
        loss.backward()
        return loss.item()

    before = rss_mb()
    first_loss = step()
    peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    for _ in range(0 if mode == "loop" else 2):  # the loop mode is slow: its first call is the warm-up
        step()
    times, losses = [], []
    for _ in range(runs):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    own = probs.permute(0, 2, 3, 1)[valid].gather(1, labels[valid].unsqueeze(1)).squeeze(1)
    return {
        "mode": mode,
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "max_ms": 1000 * max(times),
        "peak_extra_mb": peak_extra,
        "mean_loss": statistics.fmean([first_loss, *losses]),
        "hard_fraction": float((own < STRONG).float().mean()),
        "runs": runs,
        "threads": torch.get_num_threads(),
    }


def machine() -> str:
    return f"{os.cpu_count()} CPU ({cpu_model()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--loop-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--modes", default="shared,exact,loop")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.runs)))
        return

    import torch

    results = []
    for mode in args.modes.split(","):
        runs = args.loop_runs if mode == "loop" else args.runs
        cmd = [sys.executable, __file__, "--worker", mode, "--runs", str(runs)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))

    date = datetime.date.today().isoformat()
    command = "python benchmarks/bench_reco.py " + " ".join(sys.argv[1:])
    print(f"<!-- {date} · {machine()} · load avg {os.getloadavg()[0]:.1f} at end · torch {torch.__version__} · "
          f"`{command.strip()}` -->")
    print(f"N={N} D={D} {H}×{W} C={C}, {QUERIES} queries × {NEGATIVES} negatives, fwd+bwd, "
          f"hard-anchor fraction {results[0]['hard_fraction']:.2f}")
    print()
    print("| date | machine | torch | threads | mode | median ms | min–max ms | extra peak MB | runs | mean loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {date} | {machine()} | {torch.__version__} | {r['threads']} | {r['mode']} | "
              f"{r['median_ms']:.1f} | {r['min_ms']:.1f}–{r['max_ms']:.1f} | {r['peak_extra_mb']:.0f} | "
              f"{r['runs']} | {r['mean_loss']:.4f} |")


if __name__ == "__main__":
    main()
