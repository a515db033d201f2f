"""Embedded synthetic segmentation dataset: the framework's default ``dataset=synthetic``, written to disk.

The scenes (classes, :class:`SyntheticSpec`, rendering) are :mod:`dmtc.data.synthetic_scenes`; this module
writes a dataset of them with the on-disk shape of the real datasets (``images/``, ``labels/``, ``lists/``
and ``manifest.json``) once per (spec, seed): into a temporary sibling folder, under a lock, renamed into
place whole with the manifest written last. Every image draws from its own RNG seeded by
``(seed, split, index)``, so generation is deterministic whatever the number of worker processes.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import uuid
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from dmtc.data.layouts import IGNORE_INDEX
from dmtc.data.synthetic_scenes import (
    DEFAULT_SPEC,
    SPLITS,
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    SyntheticSpec,
    render_sample,
)
from dmtc.errors import DMTCError
from dmtc.files import MANIFEST, read_json, sibling_lock, write_manifest

__all__ = [
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "SPLITS",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "SyntheticSpec",
    "generate_synthetic",
    "render_sample",
]

FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------- on disk
def _manifest(spec: SyntheticSpec, seed: int) -> dict:
    return {
        "format": "dmtc-synthetic",
        "version": FORMAT_VERSION,
        "seed": seed,
        "spec": asdict(spec),
        "counts": {split: spec.count(split) for split in SPLITS},
        "classes": list(SYNTHETIC_CLASSES),
        "palette": [list(c) for c in SYNTHETIC_PALETTE],
        "ignore_index": IGNORE_INDEX,
    }


def _matches(root: Path, expected: dict) -> bool:
    """Whether ``root`` holds a manifest equal to ``expected`` as a whole (after a JSON round trip, so
    tuples equal lists), not just on the expected keys as :func:`dmtc.files.read_manifest` checks."""
    return read_json(root / MANIFEST) == json.loads(json.dumps(expected))


_Job = tuple[str, int, str, int, int, SyntheticSpec]  # (out dir, seed, split, split id, index, spec)


def _write_one(job: _Job) -> None:

    out, seed, split, split_id, index, spec = job
    image, label = render_sample(np.random.default_rng([seed, split_id, index]), spec)
    name = f"{split}_{index:05d}.png"
    params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    for path, array in ((os.path.join(out, "images", split, name), image[..., ::-1]),
                        (os.path.join(out, "labels", split, name), label)):
        try:
            written = cv2.imwrite(path, array, params)
        except cv2.error:
            written = False
        if not written:
            raise DMTCError(f"cannot write the synthetic dataset file {path} (disk full, a file-size limit or no "
                            "permission?): free space there or set paths.cache_dir to a writable folder, then "
                            "rerun the same command (a half-written dataset is never used)")


def _init_worker() -> None:
    cv2.setNumThreads(0)  # one process per core already; avoids OpenCV's thread pool inherited by fork


def _run_jobs(jobs: list[_Job], workers: int) -> None:
    if workers <= 1 or multiprocessing.current_process().daemon:  # daemons may not have children
        for job in jobs:
            _write_one(job)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        for _ in pool.imap_unordered(_write_one, jobs, chunksize=16):
            pass


def _write_dataset(out: Path, spec: SyntheticSpec, seed: int, workers: int) -> None:
    jobs: list[_Job] = []
    for split_id, split in enumerate(SPLITS):
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        jobs += [(str(out), seed, split, split_id, i, spec) for i in range(spec.count(split))]
    _run_jobs(jobs, workers)
    (out / "lists").mkdir()
    for split in SPLITS:
        names = "".join(f"{split}_{i:05d}\n" for i in range(spec.count(split)))
        (out / "lists" / f"{split}.txt").write_text(names)
    # Last, so a folder with a manifest is always complete; indent 2 is part of the on-disk format.
    write_manifest(out, _manifest(spec, seed), indent=2)


# What the generator writes, plus "splits": labeled/unlabeled lists the framework derives from the train
# list (configs/dataset/synthetic.yaml keeps them under the root); stale once the data is regenerated.
_OWN_ENTRIES = {"images", "labels", "lists", MANIFEST, "splits"}


def _check_replaceable(root: Path) -> None:
    """Refuse to delete a folder that holds anything the generator would not have written."""
    if not root.is_dir():
        raise DMTCError(f"synthetic dataset root {root} exists and is not a folder; remove it or pick "
                        "another dataset root")
    foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWN_ENTRIES)
    if foreign:
        raise DMTCError(f"synthetic dataset root {root} is stale or incomplete but also holds {foreign}, "
                        "which the generator did not write; it will not delete it. Empty the folder or "
                        "pick another dataset root")


def _temp_sibling(root: Path) -> Path:
    """A fresh hidden sibling of ``root`` named after this host and process (see :func:`_is_stale`)."""
    return root.parent / f".{root.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _is_stale(path: Path, name: str) -> bool:
    """Whether ``path`` is a temporary folder of a process of this host that no longer runs.

    Folders of other hosts (a shared file system) are left alone: their writer may still be running.
    """
    host_pid, _, _ = path.name[len(f".{name}.tmp-"):].rpartition("-")
    host, _, pid = host_pid.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive but not ours to signal
        return False
    return False


def _remove(path: Path, ignore_errors: bool = True) -> None:
    shutil.rmtree(path, ignore_errors=ignore_errors)


def generate_synthetic(root: str | Path, spec: SyntheticSpec = DEFAULT_SPEC, *, seed: int = 0,
                       workers: int | None = None) -> Path:
    """Write the synthetic dataset to ``root`` once and return ``root``.

    Layout, like a real dataset: ``images/{train,val}/<name>.png`` (RGB), ``labels/{train,val}/<name>.png``
    (uint8 class ids, 255 = ignore), ``lists/{train,val}.txt`` (one name such as ``train_00000`` per line)
    and ``manifest.json`` (spec, seed, counts, classes, format version).

    If ``root/manifest.json`` already matches ``spec`` and ``seed`` this returns at once. Otherwise the
    dataset is generated into a temporary sibling folder and renamed into place, replacing a stale or
    half-written ``root``; concurrent callers (e.g. DDP ranks) serialise on a sibling lock file, and the
    rename keeps ``root`` either absent or complete. Output is byte-identical for the same ``spec`` and
    ``seed`` whatever ``workers`` is (default: up to 2 processes).
    """
    root = Path(root).absolute()
    if not isinstance(seed, int) or seed < 0:
        raise DMTCError(f"synthetic dataset seed must be a non-negative integer, got {seed!r}")
    expected = _manifest(spec, seed)
    if _matches(root, expected):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    if workers is None:  # a pool only pays off beyond a few dozen images
        total = spec.num_train + spec.num_val
        workers = min(2, os.cpu_count() or 1) if total >= 64 else 1

    with sibling_lock(root):
        if _matches(root, expected):  # another process finished while we waited
            return root
        if root.exists():
            _check_replaceable(root)
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # leftovers of killed runs on this host
            if _is_stale(stale, root.name):
                _remove(stale)
        tmp = _temp_sibling(root)
        try:
            _write_dataset(tmp, spec, seed, workers)
            for _ in range(3):
                if _matches(root, expected):
                    return root
                if root.exists():
                    trash = _temp_sibling(root)
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(root, trash)
                    _remove(trash)
                try:
                    os.rename(tmp, root)
                    return root
                except OSError:  # another process put its copy in place between our steps
                    continue
            raise DMTCError(f"could not move the generated synthetic dataset into {root}; "
                            "is another process rewriting it with a different spec?")
        finally:
            _remove(tmp)
