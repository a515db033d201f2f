"""Files that are either complete or absent, and which process writes them.

Every file dmtc writes that a later run trusts (results.json, done.json, pseudo-label stores, the resized
cache, the synthetic set, logs) follows one protocol:

1. each file is written to a temporary sibling (``.<name>.<pid>.<random>.tmp``) and moved into place with
   ``os.replace`` (atomic on POSIX): a reader sees the old file or the new one, never half of one; files that
   later steps build on (checkpoints: :mod:`dmtc.checkpoint_io`; a phase's ``done.json``) are also fsynced
   with their folder (``durable=True``), so a crash of the machine cannot leave a renamed but empty file;
2. a collection of files (a store, a cache) is complete only once its ``manifest.json`` is written, last,
   by :func:`write_manifest`; :func:`read_manifest` returns it only when it matches what the reader expects.

A write that fails for want of space, quota or permission raises :class:`dmtc.errors.OutputError`
naming the file (the temporary sibling is removed first). Under DDP only the global rank 0 writes shared
files (:func:`is_rank_zero`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from dmtc.errors import output_error

try:  # POSIX only; elsewhere concurrent builders rely on atomic renames alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.json"
RESULTS = "results.json"
"""A finished run's (or evaluation's) results file in its run folder."""


def is_rank_zero() -> bool:
    """Whether this process is the global rank 0: torch.distributed's rank once the process group exists,
    else Lightning's rank as its launchers give it to each process (``rank_zero_only.rank``, from ``RANK``,
    ``LOCAL_RANK`` or ``SLURM_PROCID``) on node 0 (``NODE_RANK``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def temp_sibling(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (same file system, so the final rename is atomic)."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"


_TEMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{12}\.tmp$")


def remove_temporaries(directory: str | os.PathLike[str], *, recursive: bool = False) -> int:
    """Delete the :func:`temp_sibling` files that writes killed mid-way left in ``directory`` (and below it if
    ``recursive``); returns how many. Only for a folder no live process writes to: a held run folder
    (:mod:`dmtc.run_lock`)."""
    removed = 0
    for root, _, names in os.walk(directory) if recursive else [(directory, None, os.listdir(directory))]:
        for name in names:
            if _TEMP_NAME.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, name))
                    removed += 1
    return removed


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush ``directory``'s entries (a rename into it) to disk; a no-op where the OS cannot (Windows, some
    network file systems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, durable: bool = False,
                before_replace: Callable[[], None] | None = None) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary sibling renamed onto ``path`` when the block ends, so
    a reader sees the old file or the new one, never a partial one. ``durable``: the data and the rename are
    fsynced (a crash of the machine keeps the old or the new file, not an empty one); ``before_replace`` runs
    just before the rename. On failure the temporary file is removed (a full disk leaves the old file, never
    a truncated one); a full disk, quota, file-size limit or missing permission raises
    :class:`dmtc.errors.OutputError` naming ``path``."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        failed = output_error(path, err)
        if failed is not None and failed is not err:
            raise failed from err
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`; ``durable`` as there)."""
    with atomic_file(path, durable=durable) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 ``text``."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any], *, durable: bool = False) -> Path:
    """Write ``data`` as indented JSON, atomically (:func:`atomic_write_bytes`)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", durable=durable)


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """The parsed JSON file, or None if it is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_manifest(directory: str | os.PathLike[str], manifest: Mapping[str, Any], *, indent: int = 1) -> Path:
    """Write ``<directory>/manifest.json``, atomically: call it after every other file of the collection."""
    return atomic_write_text(Path(directory) / MANIFEST, json.dumps(dict(manifest), indent=indent) + "\n")


def read_manifest(directory: str | os.PathLike[str], expected: Mapping[str, Any] | None = None
                  ) -> dict[str, Any] | None:
    """The collection's manifest if it exists, is a JSON object and holds every key of ``expected`` with
    an equal value (compared after a JSON round trip, so tuples equal lists); else None."""
    manifest = read_json(Path(directory) / MANIFEST)
    if not isinstance(manifest, dict):
        return None
    want = json.loads(json.dumps(dict(expected or {})))
    if any(key not in manifest or manifest[key] != value for key, value in want.items()):
        return None
    return manifest


@contextlib.contextmanager
def sibling_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the hidden sibling file ``.<root name>.lock`` while building ``root`` (POSIX
    ``flock``; the kernel drops it with its process): processes that build the same folder at once (DDP ranks,
    SLURM tasks, two jobs) take turns, and the later ones find it complete."""
    if fcntl is None:
        yield
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
