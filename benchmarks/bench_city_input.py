"""Cityscapes input speed per DataLoader worker, with and without the resized cache (issue 5, item 7).

DMT's Cityscapes protocol (DMT §4.1) resizes the 2048×1024 images to 512×1024 before augmenting, so a
worker decodes four times the pixels it keeps. This script writes a temporary miniature Cityscapes of
``--n`` synthetic 2048×1024 PNGs (smooth gradients, shapes, sensor-like noise: 2–4 MB each like the real
ones) with label-id PNGs, builds the datamodule the way training does (``build_datamodule`` with
``dataset=city``: base resize 512×1024, scale 0.5–1.5, crop 256×512, flip, normalise) and times, in this
one process with one thread (= one worker):

* training samples: decode (image + label ids → train ids) vs transform, from the originals and from the
  resized cache (``dataset.resized_cache=true``; its one-time build is timed too);
* evaluation inputs: ``dmt`` protocol (decode + resize to 512×1024 + normalise; originals and cache) and
  ``full`` protocol (1024×2048 decode + normalise, originals only).

    python benchmarks/bench_city_input.py [--n 24] [--repeats 2] [--cache-workers 2]

It prints a markdown table (date, machine, versions, command). Nothing is written outside a temp folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from hydra import compose, initialize_config_dir
from torchvision import tv_tensors

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py; this folder is on sys.path)

import dmtc.config  # noqa: E402,F401  (resolvers)
from dmtc.data.build import build_datamodule  # noqa: E402
from dmtc.data.datasets import read_image, read_label  # noqa: E402
from dmtc.data.layouts import DatasetLayout  # noqa: E402
from dmtc.data.transforms import build_eval_transform  # noqa: E402
from dmtc.models.inits import input_normalization  # noqa: E402

H, W = 1024, 2048
IDS = np.array([0, 1, 4, 7, 8, 11, 17, 20, 21, 23, 24, 26, 33], dtype=np.uint8)


def synthetic_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A street-like 1024×2048 BGR image and its label ids: gradients, filled shapes, noise."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    sky = np.stack([200 - yy * 0.1, 170 - yy * 0.05 + xx * 0.01, 120 + xx * 0.02], -1)
    image = np.clip(sky, 0, 255).astype(np.uint8)
    label = np.full((H, W), 23, np.uint8)  # sky
    horizon = int(rng.integers(400, 550))
    image[horizon:] = np.clip(np.stack([90 + (yy[horizon:] - horizon) * 0.05] * 3, -1), 0, 255).astype(np.uint8)
    label[horizon:] = 7  # road
    for _ in range(40):
        cls = int(rng.choice(IDS))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        if rng.random() < 0.5:
            w, h = int(rng.integers(40, 400)), int(rng.integers(40, 400))
            cv2.rectangle(image, (x, y), (x + w, y + h), colour, -1)
            cv2.rectangle(label, (x, y), (x + w, y + h), cls, -1)
        else:
            r = int(rng.integers(20, 200))
            cv2.circle(image, (x, y), r, colour, -1)
            cv2.circle(label, (x, y), r, cls, -1)
    image = cv2.GaussianBlur(image, (5, 5), 0)
    noise = rng.normal(0, 3.0, image.shape).astype(np.float32)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    label[-60:] = 1  # ego vehicle (void)
    return image, label


def make_tree(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for subset, count in (("train", n), ("val", max(2, n // 4))):
        for i in range(count):
            city = "aachen" if i % 2 == 0 else "bochum"
            stem = f"{city}_{i:06d}_000019"
            (root / "leftImg8bit" / subset / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / subset / city).mkdir(parents=True, exist_ok=True)
            image, label = synthetic_scene(rng)
            cv2.imwrite(str(root / "leftImg8bit" / subset / city / f"{stem}_leftImg8bit.png"), image)
            cv2.imwrite(str(root / "gtFine" / subset / city / f"{stem}_gtFine_labelIds.png"), label)


def time_samples(layout: DatasetLayout, subset: str, names: list[str], transform: Callable, repeats: int,
                 labels: bool = True) -> tuple[float, float]:
    """Mean ms per sample of (decode, transform), as SegmentationDataset.__getitem__ does them."""
    decode, trans = [], []
    for _ in range(repeats):
        for name in names:
            t0 = time.perf_counter()
            image = read_image(layout.image_path(subset, name))
            label = (read_label(layout.label_path(subset, name), layout.label_map) if labels
                     else np.full(image.shape[:2], 255, np.uint8))
            t1 = time.perf_counter()
            image_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
            out = transform(image_t, tv_tensors.Mask(torch.from_numpy(label)))
            out[0].as_subclass(torch.Tensor).sum()  # nothing lazy
            t2 = time.perf_counter()
            decode.append(t1 - t0)
            trans.append(t2 - t1)
    return 1000 * statistics.mean(decode), 1000 * statistics.mean(trans)


def mean_size(paths: list[Path]) -> float:
    return statistics.mean(p.stat().st_size for p in paths) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=24, help="training images (val: n/4)")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the images per measurement")
    parser.add_argument("--cache-workers", type=int, default=2, help="processes building the cache")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker = one thread
    cv2.setNumThreads(0)
    with tempfile.TemporaryDirectory(prefix="bench_city_") as tmp:
        root, cache = Path(tmp) / "cityscapes", Path(tmp) / "cache"
        t0 = time.perf_counter()
        make_tree(root, args.n)
        print(f"wrote {args.n} + {max(2, args.n // 4)} 2048x1024 samples in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr)
        common = ["dataset=city", f"dataset.root={root}", f"paths.cache_dir={cache}", "split=1",
                  "backbone.init=none", f"dataset.num_workers={args.cache_workers}"]
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            cfg_plain = compose("train", overrides=common)
            cfg_cache = compose("train", overrides=[*common, "dataset.resized_cache=true"])
        plain, split = build_datamodule(cfg_plain)
        t0 = time.perf_counter()
        cached, _ = build_datamodule(cfg_cache)
        build_s = time.perf_counter() - t0
        train, val = split.labeled, split.val
        rows = []
        torch.manual_seed(0)
        d, t = time_samples(plain.layout, "train", train, plain.train_transform, args.repeats)
        rows.append(("train, originals (2048×1024 PNG)", d, t))
        d, t = time_samples(cached.layout, "train", train, cached.train_transform, args.repeats)
        rows.append(("train, resized cache (512×1024 PNG)", d, t))
        norm = input_normalization(cfg_plain)
        full_tf = build_eval_transform(base_size=None, **norm)
        d, t = time_samples(plain.val_layout, "val", val, plain.eval_transform, args.repeats)
        rows.append(("eval `dmt` (→512×1024), originals", d, t))
        d, t = time_samples(cached.val_layout, "val", val, cached.eval_transform, args.repeats)
        rows.append(("eval `dmt` (→512×1024), resized cache", d, t))
        d, t = time_samples(plain.val_layout, "val", val, full_tf, args.repeats)
        rows.append(("eval `full` (1024×2048), originals", d, t))
        orig_mb = mean_size([plain.layout.image_path("train", n) for n in train])
        cache_mb = mean_size([cached.layout.image_path("train", n) for n in train])
        label_mb = mean_size([plain.layout.label_path("train", n) for n in train])
        cache_label_mb = mean_size([cached.layout.label_path("train", n) for n in train])
        n_cached = len(train) + len(val)

    cpu = cpu_model()
    load = os.getloadavg()[0]
    print(f"\n**{dt.date.today()}**, {os.cpu_count()} CPU ({cpu}), load avg (1 min) at the end {load:.2f}; "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, opencv {cv2.__version__}, "
          f"Python {platform.python_version()}; one process, 1 thread (= one DataLoader worker).")
    print(f"`python benchmarks/bench_city_input.py --n {args.n} --repeats {args.repeats} "
          f"--cache-workers {args.cache_workers}`: {args.n} train + {len(val)} val synthetic 2048×1024 PNGs "
          f"(image {orig_mb:.2f} MB, labelIds {label_mb:.3f} MB each; cached {cache_mb:.2f} MB + "
          f"{cache_label_mb:.3f} MB), mean over {args.repeats} passes.\n")
    print("| pipeline (per worker) | decode ms | transform ms | total ms | samples/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, d, t in rows:
        print(f"| {label} | {d:.1f} | {t:.1f} | {d + t:.1f} | {1000 / (d + t):.1f} |")
    print(f"\nOne-time cache build: {n_cached} samples in {build_s:.1f}s with {args.cache_workers} processes "
          f"({n_cached / build_s:.1f} samples/s; the full Cityscapes train+val, 3475 samples, ≈ "
          f"{3475 / (n_cached / build_s) / 60:.0f} min at that rate).")


if __name__ == "__main__":
    main()
