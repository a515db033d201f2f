"""Checkpoints that are complete or absent, and a resume that survives a damaged one.

:class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` plugin of every dmtc Trainer
(:func:`dmtc.trainer.build_trainer`): each checkpoint (best, ``last.ckpt``, the step saved on an interrupt)
is streamed to a temporary sibling, fsynced and renamed into place, so a kill or a full disk during a save
leaves the previous file, never a truncated one. Before ``last.ckpt`` is replaced, the file it replaces
stays as ``last.prev.ckpt`` (a hard link: no copy), the previous good state to fall back on.

:func:`resume_checkpoint` picks what a rerun resumes from: ``last.ckpt`` if it can be read, else
``last.prev.ckpt``; an unreadable file (truncated by a copy, a crash of the machine, or an older version
of dmtc that wrote in place) is moved aside to ``<name>.corrupt`` with one warning naming it, never a
stack trace. Leftover temporary files of a killed save are removed there too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dmtc.errors import DMTCError
from dmtc.files import atomic_file, is_rank_zero, remove_temporaries, temp_sibling

log = logging.getLogger(__name__)

LAST = "last.ckpt"
PREVIOUS = "last.prev.ckpt"
"""The ``last.ckpt`` that the newest one replaced: the fallback when ``last.ckpt`` is unreadable."""
CORRUPT_SUFFIX = ".corrupt"


class CorruptCheckpoint(DMTCError):
    """A checkpoint file that cannot be read (truncated, damaged, not a checkpoint)."""


def _is_local(path: str | os.PathLike[str]) -> bool:
    return "://" not in os.fspath(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written so that a reader never sees a partial file.

    :meth:`save_checkpoint` streams the checkpoint into a temporary sibling (same folder, so the rename is
    atomic), fsyncs it, renames it over the target and fsyncs the folder: the target is the old file or the
    new one at every moment, also across a crash of the machine. When the target is ``last.ckpt``, the
    file it replaces is kept as ``last.prev.ckpt`` (hard link; the one before is removed first, so a save
    needs room for one checkpoint more, as any safe save does). A full disk, quota or file-size limit ends
    in one :class:`dmtc.errors.OutputError` naming the file; the temporary file is removed. Remote (``s3://``
    ...) paths are left to Lightning's own plugin.

    :meth:`load_checkpoint` raises :class:`CorruptCheckpoint` naming the file when it cannot be read.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically and durably (see the class)."""
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        if path.name == LAST:  # room for the new file: the generation before the current one goes
            path.with_name(PREVIOUS).unlink(missing_ok=True)
        keep = (lambda: _keep_previous(path)) if path.name == LAST else None
        with atomic_file(path, durable=True, before_replace=keep) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        """Lightning's load; an unreadable file is one :class:`CorruptCheckpoint` naming it."""
        kwargs: dict[str, Any] = {} if map_location is None else {"map_location": map_location}
        if weights_only is not None:  # Lightning < 2.4 has no weights_only
            kwargs["weights_only"] = weights_only
        try:
            return super().load_checkpoint(path, **kwargs)
        except FileNotFoundError as err:
            raise DMTCError(f"checkpoint {path} does not exist") from err
        except Exception as err:  # any failure to read means the file is unusable
            raise CorruptCheckpoint(f"checkpoint {path} cannot be read ({_reason(err)}): it is truncated or "
                                    "damaged; delete it (a rerun resumes from the previous checkpoint)") from err


def _keep_previous(last: Path) -> None:
    """Make the current ``last`` (if any) the previous generation ``last.prev.ckpt``, by a hard link."""
    previous = last.with_name(PREVIOUS)
    if not last.is_file():
        return
    link = temp_sibling(previous)
    try:
        os.link(last, link)
        os.replace(link, previous)
    except OSError as err:  # a file system without hard links: no previous generation
        link.unlink(missing_ok=True)
        log.debug("cannot keep %s as %s (%s)", last, previous, err)


def _reason(err: BaseException) -> str:
    """The first sentence of ``err``'s message (torch's run on for lines)."""
    text = str(err).strip().splitlines()
    return (text[0].split(". ")[0] if text else type(err).__name__)[:200]


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a usable Lightning checkpoint (missing, truncated, damaged, no ``state_dict``),
    or None if it is one. Cheap: tensors are memory-mapped, not read."""
    try:
        contents = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        return "missing"
    except Exception as err:  # any failure to read means the file is unusable
        return _reason(err)
    if not isinstance(contents, dict) or "state_dict" not in contents:
        return "not a Lightning checkpoint (no state_dict)"
    return None


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The ``global_step`` a readable checkpoint was saved at, else None."""
    try:
        contents = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(contents["global_step"])
    except Exception:  # an unreadable file has no step
        return None


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> None:
    """Delete the temporary files of checkpoint saves that a kill interrupted (global rank 0). Call it only
    while holding the run folder (:mod:`dmtc.run_lock`): no other process writes there then."""
    if Path(directory).is_dir() and is_rank_zero():
        remove_temporaries(directory)


def resume_checkpoint(directory: str | os.PathLike[str], *, what: str = "the run") -> Path | None:
    """The checkpoint a rerun resumes from in ``directory``: ``last.ckpt`` if it is readable, else the
    previous generation ``last.prev.ckpt``, else None (nothing to resume: start ``what`` from its start).

    An unreadable candidate is renamed to ``<name>.corrupt`` (kept for inspection, not read again) with one
    warning naming it and what the run falls back to; only the global rank 0 renames. Interrupted saves'
    temporary files are removed."""
    directory = Path(directory)
    remove_stale_temporaries(directory)
    damaged: list[tuple[Path, str]] = []
    for name in (LAST, PREVIOUS):
        path = directory / name
        if not path.is_file():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                _set_aside(damaged, f"resuming from {path} (step {checkpoint_step(path)}) instead")
            return path
        damaged.append((path, problem))
    if damaged:
        _set_aside(damaged, f"no readable checkpoint left: {what} starts again from its beginning")
    return None


def _set_aside(damaged: list[tuple[Path, str]], outcome: str) -> None:
    for path, problem in damaged:
        moved = path.with_name(path.name + CORRUPT_SUFFIX)
        if is_rank_zero():
            try:
                os.replace(path, moved)
            except OSError:
                moved = path
        log.warning("checkpoint %s is unreadable (%s; truncated or damaged): set aside as %s; %s", path, problem,
                    moved.name, outcome)


def remove_resume_files(directory: str | os.PathLike[str], *, keep_last: bool = False) -> None:
    """Drop what only a resume needs once a stage is finished: ``last.prev.ckpt`` (and ``last.ckpt`` unless
    ``keep_last``); global rank 0 only."""
    if not is_rank_zero():
        return
    directory = Path(directory)
    (directory / PREVIOUS).unlink(missing_ok=True)
    if not keep_last:
        (directory / LAST).unlink(missing_ok=True)
