"""Compare dmtc's dynamic mutual loss with the public DMT code's ``DynamicMutualLoss`` on random inputs.

The reference is not part of dmtc: point ``--losses`` at ``segmentation/utils/losses.py`` of a checkout of
https://github.com/voldemortX/DST-CBC (master). It is imported from that file as it is, and both losses are
evaluated on the same random batches (pseudo-labeled samples first, as the reference expects them, with its
``N×2×H×W`` targets = label and the other model's stored confidence; labeled samples carry confidence 1) for
every (γ1, γ2) pair in {0, 1, 3, 5}², in float32 (the reference builds float32 weights). Prints the
largest absolute difference per pair and exits 1 above ``--tol``.

    git clone https://github.com/voldemortX/DST-CBC /tmp/DST-CBC
    python benchmarks/compare_reference_loss.py --losses /tmp/DST-CBC/segmentation/utils/losses.py
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys

import torch

from dmtc.losses.mutual import dynamic_mutual_loss


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("dst_cbc_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DynamicMutualLoss


def random_batch(generator: torch.Generator, n_pseudo: int, n_labeled: int, classes: int, size: int):
    n = n_pseudo + n_labeled
    logits = torch.randn(n, classes, size, size, generator=generator) * 3
    labels = torch.randint(0, classes, (n, size, size), generator=generator)
    labels[torch.rand(n, size, size, generator=generator) < 0.15] = 255
    conf = torch.rand(n, size, size, generator=generator)
    conf[n_pseudo:] = 1.0
    is_pseudo = torch.arange(n) < n_pseudo
    return logits, labels, conf, is_pseudo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", required=True, help="path to DST-CBC's segmentation/utils/losses.py")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args()
    reference_cls = load_reference(args.losses)
    gammas = [0.0, 1.0, 3.0, 5.0]
    generator = torch.Generator().manual_seed(0)
    worst_all = 0.0
    print(f"{'gamma1':>7}{'gamma2':>7}{'max |ours - reference|':>26}")
    for g1, g2 in itertools.product(gammas, gammas):
        reference = reference_cls(gamma1=g1, gamma2=g2, ignore_index=255)
        worst = 0.0
        for trial in range(args.trials):
            n_pseudo, n_labeled = (6, 2) if trial % 2 == 0 else (7, 1)
            logits, labels, conf, is_pseudo = random_batch(generator, n_pseudo, n_labeled, 19, 9)
            ours = dynamic_mutual_loss(logits, labels, conf, is_pseudo, g1, g2)
            targets = torch.stack([labels.float(), conf], dim=1)
            theirs, _ = reference(logits, targets, split_index=n_pseudo)
            worst = max(worst, abs(float(ours) - float(theirs)))
        worst_all = max(worst_all, worst)
        print(f"{g1:7g}{g2:7g}{worst:26.3e}")
    ok = worst_all <= args.tol
    print(f"largest difference {worst_all:.3e} ({'within' if ok else 'above'} tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
