"""Benchmark: DMT pseudo labelling in one pass (dmtc) vs the reference's two passes, end to end on CPU.

    python benchmarks/bench_labeling.py [--backbone resnet_tiny] [--size 128 128] [--num-images 200]
                                        [--classes 10] [--ratio 0.4] [--batch-size 8] [--threads T]
                                        [--repeats 5] [--workdir DIR]
    python benchmarks/bench_labeling.py --backbone resnet50 --size 256 512 --num-images 20

What is compared. At the start of every DMT phase each model labels the unlabeled images, and the
class-balanced curriculum keeps, per class c, the most confident fraction ``r`` of the pixels predicted as
c (threshold t_c); the other pixels become 255 (ignore). Both methods below produce these labels for the
same images with the same model (``dmtc.models.deeplab_v2``, eval mode, ``torch.no_grad``, random
weights: the cost does not depend on them) and the same image loader (synthetic PNGs decoded, resized to
``--size`` like the pipeline's base size, normalised; batch ``--batch-size``, no worker processes).

* **one pass (dmtc)** -- :func:`dmtc.dmt.labeling.predict_to_store` as the pipeline calls it
  (:func:`dmtc.dmt.labeling.label_images`): one forward pass per image writes the argmax label (uint8 PNG)
  and its confidence (16-bit PNG) to a :class:`~dmtc.dmt.store.PseudoLabelStore` and fills a
  per-class :class:`~dmtc.dmt.curriculum.ConfidenceHistogram`; the store is finalised (histogram.npz +
  manifest); thresholds for ``r`` come from the histogram; the training set applies them when it loads
  a map, so the read-back stage loads every entry once and calls
  :func:`~dmtc.dmt.curriculum.apply_thresholds`.
* **two passes (reference)** -- written here the way the DMT reference code works: pass 1 forwards
  every image and gathers, per class, the float32 confidences of the pixels predicted as that class;
  the threshold is the exact order statistic (sort descending, take the ``ceil(r * n_c)``-th value);
  pass 2 forwards every image again, sets ``label[conf < t[label]] = 255`` and saves the label map and
  the confidence map as float32 ``.npy`` files (2 x 4 bytes per pixel: ~4 MB per 512x1024 Cityscapes
  image); the read-back stage ``np.load``s both once, as its training set does.

Why: the project target is "labeling wall time <= 0.55x the two-pass method". The forward pass
dominates both, so the ratio tends to 0.5 for heavy models (``--backbone resnet50``) and sits above it
for tiny ones, where image decoding, PNG encoding and the read-back are a larger share.

Stages (seconds, wall clock): forward = the loop time of each pass minus the timed sub-stages below
(image loading, model, upsampling, softmax/argmax, quantisation, device copies); statistics = histogram
update / confidence gathering; threshold = histogram lookup / per-class sort; write = histogram + manifest
(the store's PNGs are written by background threads during the loop, their thread time printed apart) /
apply thresholds + two float32 .npy per image; read-back = load + apply / load.
Files are read back from the page cache in both cases (no cache dropping), and nothing is fsync'ed.

Sanity check: the kept-pixel counts per class must agree within tie tolerance. The store quantises
confidences to 16 bits, so dmtc keeps every pixel whose stored code equals the threshold's code; the
check is ``k_c <= kept_ref <= kept_dmtc <= kept_ref + ties_c`` with ``k_c = ceil(r * n_c)`` and
``ties_c`` the histogram count of the threshold bin. Prints a markdown table (date, machine, torch
version, command) with the breakdown, the ratio, and the bytes on disk per image.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_model  # benchmarks/machine.py (this folder is on sys.path)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dmtc.data.datasets import read_image
from dmtc.data.synthetic import SyntheticSpec, generate_synthetic
from dmtc.data.transforms import build_eval_transform
from dmtc.dmt.curriculum import ConfidenceHistogram, apply_thresholds
from dmtc.dmt.labeling import predict_to_store
from dmtc.dmt.store import PseudoLabelStore
from dmtc.models import deeplab_v2

IGNORE = 255
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ inputs
class ImageFolder(Dataset):
    """Synthetic train images as the labeling loader yields them: ``{"image", "name", "size"}``."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int]) -> None:
        self.paths = list(paths)
        self.transform = build_eval_transform(mean=MEAN, std=STD, base_size=list(size))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from torchvision import tv_tensors

        image = read_image(self.paths[index])
        image_t = self.transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)))
        image_t = image_t.as_subclass(Tensor)
        return {"image": image_t, "name": self.paths[index].stem,
                "size": torch.tensor(image_t.shape[-2:], dtype=torch.int64)}


def make_images(root: Path, num_images: int, size: tuple[int, int]) -> list[Path]:
    """Generate ``num_images`` synthetic train images (square, side min(size)) under ``root``."""
    spec = SyntheticSpec(image_size=min(size), num_train=num_images, num_val=1)
    generate_synthetic(root, spec, seed=0)
    return sorted((root / "images" / "train").glob("*.png"))[:num_images]


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


class Timer:
    """Accumulates wall time of named stages."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.s[stage] = self.s.get(stage, 0.0) + seconds

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - start)
        return timed


# ------------------------------------------------------------------------------------ one pass (dmtc)
def run_one_pass(model: nn.Module, loader: DataLoader, workdir: Path, num_classes: int,
                 ratio: float) -> tuple[dict[str, float], dict[str, Any]]:
    """dmtc: predict_to_store + finalize, thresholds from the histogram, read back + apply at load."""
    timer = Timer()
    store = PseudoLabelStore(workdir / "store")
    hist = ConfidenceHistogram(num_classes)
    # Time the real code paths by wrapping the instance methods predict_to_store calls. The PNGs are
    # encoded and written by background threads (dmtc.dmt.store_writer), overlapping the loop: their
    # thread time is reported apart ("background"), and the loop's wall time, waiting for the last writes
    # included, is forward + statistics.
    background = Timer()
    store.write_reserved = background.wrap("write", store.write_reserved)  # type: ignore[method-assign]
    hist.update = timer.wrap("statistics", hist.update)  # type: ignore[method-assign]
    start = time.perf_counter()
    names = predict_to_store(model, loader, store, hist, "cpu")
    loop = time.perf_counter() - start
    timer.add("forward", loop - timer.s["statistics"])
    start = time.perf_counter()
    store.finalize({"num_classes": num_classes, "num_images": len(names)}, names=names, histogram=hist)
    timer.add("write", time.perf_counter() - start)

    start = time.perf_counter()
    thresholds = hist.thresholds(ratio)
    timer.add("threshold", time.perf_counter() - start)

    kept = np.zeros(num_classes, dtype=np.int64)
    start = time.perf_counter()
    for name in store.names():
        label, conf = store.load(name)
        pseudo = apply_thresholds(label, conf, thresholds, IGNORE)
        kept += np.bincount(pseudo.reshape(-1), minlength=256)[:num_classes]
    timer.add("read-back", time.perf_counter() - start)

    entries = sum(store.label_path(n).stat().st_size + store.confidence_path(n).stat().st_size for n in names)
    bins = torch.bucketize(thresholds.clamp(max=float(hist.edges[-1])), hist.edges)  # the threshold's bin
    ties = hist.counts.gather(1, bins.clamp(max=hist.bins - 1).view(-1, 1)).view(-1)
    info = {"kept": torch.from_numpy(kept), "predicted": hist.predicted(), "ties": ties,
            "bytes_entries": entries / len(names),
            "bytes_store": dir_bytes(store.directory) - entries, "thresholds": thresholds,
            "background_write_s": background.s.get("write", 0.0)}
    return timer.s, info


# ----------------------------------------------------------------------------- two passes (reference)
@torch.no_grad()
def predict(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Confidence and argmax label at input resolution (same head as predict_to_store)."""
    logits = model(images)["logits"]
    logits = F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    conf, label = logits.softmax(dim=1).max(dim=1)
    return conf, label


def run_two_passes(model: nn.Module, loader: DataLoader, workdir: Path, num_classes: int,
                   ratio: float) -> tuple[dict[str, float], dict[str, Any]]:
    """Reference: pass 1 gathers confidences and sorts them per class, pass 2 re-predicts, thresholds
    and saves float32 .npy label and confidence maps, which training reads back once."""
    timer = Timer()
    out = workdir / "reference"
    out.mkdir(parents=True, exist_ok=True)

    # Pass 1: forward every image, gather per-class confidences.
    per_class: list[list[Tensor]] = [[] for _ in range(num_classes)]
    start = time.perf_counter()
    inner = 0.0
    for batch in loader:
        conf, label = predict(model, batch["image"])
        t0 = time.perf_counter()
        for c in range(num_classes):
            per_class[c].append(conf[label == c])
        inner += time.perf_counter() - t0
    timer.add("forward", time.perf_counter() - start - inner)
    timer.add("statistics", inner)

    # Exact order statistics: t_c = the ceil(r * n_c)-th largest confidence of class c.
    start = time.perf_counter()
    thresholds = torch.full((num_classes,), math.inf)
    for c in range(num_classes):
        values = torch.cat(per_class[c])
        if values.numel() == 0:
            continue
        ordered, _ = torch.sort(values, descending=True)
        k = max(1, math.ceil(ratio * values.numel() - 1e-9))
        thresholds[c] = ordered[k - 1]
    del per_class
    timer.add("threshold", time.perf_counter() - start)

    # Pass 2: forward again, apply the thresholds, save float32 maps.
    names: list[str] = []
    start = time.perf_counter()
    inner = 0.0
    for batch in loader:
        conf, label = predict(model, batch["image"])
        t0 = time.perf_counter()
        label = label.float()
        label[conf < thresholds[label.long()]] = IGNORE
        label_np, conf_np = label.numpy(), conf.numpy()
        for i, name in enumerate(batch["name"]):
            np.save(out / f"{name}_label.npy", label_np[i])
            np.save(out / f"{name}_conf.npy", conf_np[i])
            names.append(name)
        inner += time.perf_counter() - t0
    timer.add("forward", time.perf_counter() - start - inner)
    timer.add("write", inner)

    # Training reads every map back once.
    kept = np.zeros(num_classes, dtype=np.int64)
    start = time.perf_counter()
    for name in names:
        label_np = np.load(out / f"{name}_label.npy").astype(np.int64)
        conf_np = np.load(out / f"{name}_conf.npy")
        del conf_np
        kept += np.bincount(label_np.reshape(-1), minlength=256)[:num_classes]
    timer.add("read-back", time.perf_counter() - start)
    info = {"kept": torch.from_numpy(kept), "bytes_entries": dir_bytes(out) / len(names),
            "thresholds": thresholds}
    return timer.s, info


# ----------------------------------------------------------------------------------------- report
def best_run(runs: list[tuple[dict[str, float], dict[str, Any]]]) -> tuple[dict[str, float], dict[str, Any]]:
    """The run with the lowest total time: on a shared machine interference only ever adds time."""
    return min(runs, key=lambda run: sum(run[0].values()))


def check_kept(one: dict[str, Any], two: dict[str, Any], ratio: float) -> tuple[bool, list[str]]:
    """``k_c <= kept_dmtc <= k_c + ties_c`` and ``k_c <= kept_ref`` for every predicted class.

    dmtc ranks by the score -log(1 - p), so only pixels tied at its threshold code exceed k_c; the
    reference ranks float32 softmax values, which tie at 1.0 when a model is confident, so it may keep more.
    """
    rows = ["| class | predicted | k_c = ceil(r·n_c) | kept (one pass) | kept (two passes) | ties at t_c |",
            "|---:|---:|---:|---:|---:|---:|"]
    ok = True
    for c, n in enumerate(one["predicted"].tolist()):
        k = max(1, math.ceil(ratio * n - 1e-9)) if n else 0
        k1, k2, ties = int(one["kept"][c]), int(two["kept"][c]), int(one["ties"][c])
        good = (k1 == k2 == 0) if n == 0 else (k <= k1 <= k + ties and k <= k2)
        ok &= good
        rows.append(f"| {c} | {n} | {k} | {k1} | {k2} | {ties} |" + ("" if good else " **mismatch**"))
    return ok, rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet_tiny")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5, help="runs per method; the fastest is shown")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = (int(args.size[0]), int(args.size[1]))
    scratch = Path(tempfile.mkdtemp(prefix="bench_labeling_", dir=args.workdir))
    try:
        paths = make_images(scratch / "data", args.num_images, size)
        loader = DataLoader(ImageFolder(paths, size), batch_size=args.batch_size, num_workers=0)
        model = deeplab_v2(args.classes, backbone=args.backbone).eval()
        with torch.no_grad():  # warm-up: first-call allocations are charged to neither method
            model(next(iter(loader))["image"])
        runs: dict[str, list[tuple[dict[str, float], dict[str, Any]]]] = {"one": [], "two": []}
        for r in range(args.repeats):  # alternate, so drift (thermal, page cache, other load) hits both
            for key, fn in (("one", run_one_pass), ("two", run_two_passes)):
                work = scratch / f"{key}{r}"
                stages, info = fn(model, loader, work, args.classes, args.ratio)
                runs[key].append((stages, info))
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (s1, info1), (s2, info2) = best_run(runs["one"]), best_run(runs["two"])

    ok, kept_rows = check_kept(info1, info2, args.ratio)
    total1, total2 = sum(s1.values()), sum(s2.values())
    stages = ("forward", "statistics", "threshold", "write", "read-back")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}  ")
    print(f"machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}, torch.get_num_threads()="
          f"{torch.get_num_threads()}  ")
    print(f"torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}  ")
    print(f"command: `{command}`  ")
    print(f"setup: deeplab_v2({args.classes}, backbone={args.backbone!r}), {len(paths)} images "
          f"{size[0]}×{size[1]}, batch {args.batch_size}, ratio {args.ratio}, CPU; {args.repeats} "
          f"alternating runs per method, the fastest run shown (totals one pass: "
          f"{', '.join(f'{sum(r[0].values()):.3f}' for r in runs['one'])} s; two passes: "
          f"{', '.join(f'{sum(r[0].values()):.3f}' for r in runs['two'])} s)\n")
    print("| stage | one pass (dmtc) | two passes (reference) |")
    print("|---|---:|---:|")
    names = {"forward": "forward (incl. image loading)", "statistics": "statistics (histogram / gather)",
             "threshold": "threshold (histogram / sort)", "write": "write (PNG store / apply + .npy)",
             "read-back": "read-back (load + apply / load)"}
    for stage in stages:
        print(f"| {names[stage]} s | {s1.get(stage, 0.0):.3f} | {s2.get(stage, 0.0):.3f} |")
    print(f"| **total s** | **{total1:.3f}** | **{total2:.3f}** |")
    print(f"| **ratio one/two (target ≤ 0.55)** | **{total1 / total2:.3f}** | 1 |")
    print(f"| PNG writes in background threads s (overlapping the loop; not in the total) | "
          f"{info1['background_write_s']:.3f} | – |")
    print(f"| bytes on disk per image | {info1['bytes_entries']:.0f} | {info2['bytes_entries']:.0f} |")
    print(f"| bytes per store (histogram + manifest) | {info1['bytes_store']} | 0 |")
    print()
    print(f"kept pixels per class at ratio {args.ratio} "
          f"({'OK' if ok else 'MISMATCH'}: k_c ≤ one-pass ≤ k_c + ties, k_c ≤ two-pass):\n")
    print("\n".join(kept_rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
