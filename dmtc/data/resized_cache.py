"""A one-time cache of a dataset resized to its training base size (``dataset.resized_cache=true``).

Why: DMT's Cityscapes protocol (DMT §4.1) resizes every 2048×1024 image to 512×1024 before augmenting, so a
training worker spends most of its time decoding pixels it throws away (a 2048×1024 PNG takes tens of ms
to decode, the 512×1024 one a quarter of that; ``benchmarks/bench_city_input.py`` measures both). The
cache decodes each source once, resizes it exactly as the training transform would, and stores the result
as lossless PNG (compression level 1: fast to write and to decode). Training then reads the small files and
the transform's base resize becomes a no-op (torchvision returns an input already at the target size).

What is stored, and why it is exact:

* images: ``v2.Resize(base_size, antialias=dataset.antialias)`` (bilinear) on the decoded RGB image, the very call the
  training transform makes, written losslessly: a cached sample is bit-identical to an uncached one.
* labels: the same call on the *raw* label ids (nearest, as v2 always resizes masks), so
  ``dataset.label_map`` still applies when reading and the void ids are kept.

Layout: ``<cache root>`` mirrors the dataset's templates (extension switched to ``.png``), e.g.
``${paths.cache_dir}/resized/city/512x1024/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png``.
Every file is written to a temporary name and renamed, so a file that exists is complete; a file is reused
only if it is newer than its source. ``manifest.json`` (source root, size, names per subset, file count) is
written last; a manifest naming another source root or size makes every file be rebuilt. An interrupted
build is therefore completed by the next call, never trusted blindly, and a second call with nothing to do
writes nothing. The dataset root is only read (it may be read-only).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from dmtc.data.datasets import read_image, read_label
from dmtc.data.layouts import DatasetLayout
from dmtc.errors import DMTCError
from dmtc.files import atomic_write_bytes, read_manifest, sibling_lock, write_manifest

log = logging.getLogger(__name__)

VERSION = 1
#: PNG zlib level of cached files: 1 writes fast and decodes as fast as any level (inflate speed barely
#: depends on it); files are ~30% larger than level 9.
PNG_LEVEL = 1


@dataclass(frozen=True)
class _Task:
    """One sample to (re)build: source files and cache files (label paths ``None`` when unlabeled)."""

    image_src: str
    image_dst: str
    label_src: str | None
    label_dst: str | None
    size: tuple[int, int]
    antialias: bool = True


def cache_root(base_dir: Path | str, size: Sequence[int], antialias: bool = True) -> Path:
    """Folder of the cache at ``size`` (H, W) under ``base_dir`` (``dataset.resized_cache_dir``):
    ``<H>x<W>`` for antialiased resizing, ``<H>x<W>-bilinear`` for plain bilinear (the reference's)."""
    return Path(base_dir) / (f"{int(size[0])}x{int(size[1])}" + ("" if antialias else "-bilinear"))


def _png_template(template: str) -> str:
    stem, dot, ext = template.rpartition(".")
    if not dot or "/" in ext or "}" in ext:
        return template + ".png"
    return f"{stem}.png"


def cached_layout(layout: DatasetLayout, root: Path) -> DatasetLayout:
    """``layout`` re-rooted at the cache ``root`` (same templates, ``.png`` files, names by scanning)."""
    return replace(
        layout,
        root=Path(root),
        image_template=_png_template(layout.image_template),
        label_template=_png_template(layout.label_template),
        list_template=None,
    )


def resize_sample(
    image: np.ndarray, label: np.ndarray | None, size: Sequence[int], antialias: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an RGB uint8 image (bilinear, antialiased unless ``antialias=False``) and an optional raw label
    (nearest) to ``size`` with the training transform's own call, so cached and uncached samples are
    identical."""
    image_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
    resize = v2.Resize(list(size), antialias=antialias)
    if label is None:
        return resize(image_t).permute(1, 2, 0).numpy(), None
    out_image, out_label = resize(image_t, tv_tensors.Mask(torch.from_numpy(label)))
    return out_image.permute(1, 2, 0).numpy(), out_label.as_subclass(torch.Tensor).numpy()


def _write_png(path: Path, array: np.ndarray, *, bgr_from_rgb: bool) -> None:
    """Encode as PNG and write atomically (:func:`dmtc.files.atomic_write_bytes`)."""
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if bgr_from_rgb else array
    ok, buf = cv2.imencode(".png", data, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
    if not ok:
        raise DMTCError(f"OpenCV could not encode the resized cache file {path}")
    try:
        atomic_write_bytes(path, buf.tobytes())
    except OSError as err:
        raise DMTCError(f"cannot write the resized cache file {path} ({err.strerror}): check space and "
                        "permissions there") from err


def _build_one(task: _Task) -> int:
    image = read_image(Path(task.image_src))
    label = read_label(Path(task.label_src)) if task.label_src is not None else None
    if label is not None and label.shape != image.shape[:2]:
        raise DMTCError(f"label {task.label_src} is {label.shape[1]}×{label.shape[0]} but its image is "
                        f"{image.shape[1]}×{image.shape[0]}: image and label must have the same size")
    small, small_label = resize_sample(image, label, task.size, task.antialias)
    _write_png(Path(task.image_dst), small, bgr_from_rgb=True)
    if small_label is not None:
        _write_png(Path(task.label_dst), small_label, bgr_from_rgb=False)
    return 1


def _worker_init() -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(0)


def _fresh(dst: Path, src: Path) -> bool:
    try:
        return dst.stat().st_mtime >= src.stat().st_mtime
    except FileNotFoundError:
        return False


def build_resized_cache(
    layout: DatasetLayout,
    names: Mapping[str, Iterable[str]],
    size: Sequence[int],
    root: Path | str,
    *,
    processes: int = 2,
    antialias: bool = True,
) -> DatasetLayout:
    """Make sure the cache at ``root`` holds every ``names[subset]`` sample of ``layout`` resized to
    ``size`` (H, W); build what is missing or stale with ``processes`` worker processes (≤ 1: in this
    process) and return the cached layout. Labels are cached where the source label exists. Processes that
    build the same cache at once (DDP ranks, SLURM tasks) take turns on a lock: the first builds it, the
    others find it complete."""
    root = Path(root)
    with sibling_lock(root):
        return _build(layout, names, size, root, processes=processes, antialias=antialias)


def _build(layout: DatasetLayout, names: Mapping[str, Iterable[str]], size: Sequence[int], root: Path, *,
           processes: int, antialias: bool) -> DatasetLayout:
    size = (int(size[0]), int(size[1]))
    target = cached_layout(layout, root)
    wanted = {subset: sorted(set(subset_names)) for subset, subset_names in names.items()}
    source_root = str(layout.root.resolve())
    manifest = read_manifest(root)
    same_source = (manifest is not None and manifest.get("version") == VERSION
                   and manifest.get("source_root") == source_root and list(manifest.get("size", [])) == list(size)
                   and bool(manifest.get("antialias", True)) == bool(antialias))
    other_source = manifest is not None and not same_source  # no manifest = interrupted: files are checked
    if other_source:
        log.warning("resized cache %s was built from %s at %s: rebuilding it from %s at %s", root,
                    manifest.get("source_root"), manifest.get("size"), source_root, list(size))
    tasks: list[_Task] = []
    for subset, subset_names in wanted.items():
        for name in subset_names:
            image_src, image_dst = layout.image_path(subset, name), target.image_path(subset, name)
            label_src, label_dst = layout.label_path(subset, name), target.label_path(subset, name)
            has_label = label_src.is_file()
            stale = (other_source or not _fresh(image_dst, image_src)
                     or (has_label and not _fresh(label_dst, label_src)))
            if stale:
                tasks.append(_Task(str(image_src), str(image_dst), str(label_src) if has_label else None,
                                   str(label_dst) if has_label else None, size, bool(antialias)))
    known = {s: set(v) for s, v in (manifest or {}).get("names", {}).items()} if same_source else {}
    if not tasks and all(set(v) <= known.get(s, set()) for s, v in wanted.items()):
        log.info("resized cache %s is complete (%d samples at %dx%d)", root, sum(map(len, wanted.values())), *size)
        return target
    if tasks:
        _run(tasks, processes, root)
    merged = {s: sorted(known.get(s, set()) | set(wanted.get(s, ()))) for s in sorted(set(known) | set(wanted))}
    record = {
        "version": VERSION,
        "source_root": source_root,
        "size": list(size),
        "antialias": bool(antialias),
        "count": sum(map(len, merged.values())),
        "names": merged,
        "images": f"torchvision v2.Resize(size, antialias={bool(antialias)}) of the RGB image (bilinear), PNG",
        "labels": "raw label ids (dataset.label_map applies on reading), nearest, PNG",
    }
    write_manifest(root, record)
    return target


def _run(tasks: list[_Task], processes: int, root: Path) -> None:
    from tqdm import tqdm

    start = time.perf_counter()
    log.info("building the resized cache %s: %d samples with %d process(es) (one-time)", root, len(tasks),
             max(1, processes))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DMTCError(f"cannot create the resized cache {root} ({err.strerror}): set dataset.resized_cache_dir "
                        "(or paths.cache_dir) to a writable folder") from err
    bar = tqdm(total=len(tasks), desc="resized cache", unit="img", mininterval=2.0)
    try:
        if processes <= 1 or len(tasks) < 8:
            for task in tasks:
                bar.update(_build_one(task))
        else:
            # spawn: a fresh interpreter per worker, safe whatever threads torch/opencv started here
            with mp.get_context("spawn").Pool(processes, initializer=_worker_init) as pool:
                for done in pool.imap_unordered(_build_one, tasks, chunksize=4):
                    bar.update(done)
    finally:
        bar.close()
    log.info("resized cache %s: %d samples built in %.1fs", root, len(tasks), time.perf_counter() - start)
