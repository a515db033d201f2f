"""Loggers that continue the same log when a run is resumed.

Rerunning a command reuses its run folder and resumes training from ``last.ckpt``; its loggers continue
the log of the earlier attempt(s) instead of starting a new one:

* **W&B**: :func:`wandb_run_id` keeps the run id in ``<run dir>/wandb_run_id`` (created on the first start,
  written atomically by rank 0); :func:`dmtc.builders.build_loggers` passes it to ``WandbLogger`` with
  ``resume="allow"``, so every attempt logs to one W&B run (offline: one ``offline-run-*-<id>`` folder per
  attempt, which ``wandb sync`` uploads into that one run). ``overwrite=true`` starts a new id.
* **CSV**: :class:`CSVLogger` appends to the existing ``metrics.csv`` (one header, columns widened
  when new metrics appear) instead of deleting it as Lightning's ``CSVLogger`` does, and drops the rows
  that the resumed attempt logs again: those written after the last checkpoint save (or the last
  successful end of a fit/validate), i.e. after the state the rerun resumes from.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from dmtc.errors import DMTCError

log = logging.getLogger(__name__)

#: File in the run folder holding the W&B run id of the run.
WANDB_ID_FILE = "wandb_run_id"
#: File next to ``metrics.csv`` holding how many of its rows a checkpoint (or a finished stage) backs.
COMMITTED_FILE = "metrics_committed.json"

_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def new_wandb_run_id() -> str:
    """A fresh W&B run id: 8 random lowercase letters and digits (W&B's own format)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def wandb_run_id(run_dir: _PATH, *, fresh: bool = False) -> str:
    """The W&B run id of the run in ``run_dir``: the one stored in ``run_dir/wandb_run_id`` (a resumed run
    continues its W&B run), else a new one that rank 0 stores there atomically. ``fresh=True``
    (``overwrite=true``: the run is retrained from scratch) always starts and stores a new id.

    Other DDP ranks only read the file: their ``WandbLogger`` never starts a W&B run, so the id they get
    before rank 0 has written it is never used.
    """
    path = Path(run_dir) / WANDB_ID_FILE
    if not fresh and path.is_file():
        run_id = path.read_text().strip()
        if not _WANDB_ID.fullmatch(run_id):
            raise DMTCError(f"{path} holds {run_id!r}, not a W&B run id (letters, digits, '_' or '-'): write the "
                            "id of the W&B run to continue there, or delete the file to start a new W&B run")
        return run_id
    run_id = new_wandb_run_id()
    if _is_rank_zero():
        _atomic_write_text(path, run_id + "\n")
        log.info("new W&B run id %s (stored in %s)", run_id, path)
    return run_id


def finish_other_wandb_run(run_id: str) -> None:
    """Finish the W&B run open in this process if it is not ``run_id``.

    Lightning's ``WandbLogger`` reuses any open run; Hydra multirun runs its jobs one after another in one
    process, so without this every job after the first would log into the first job's W&B run.
    """
    import wandb

    if wandb.run is not None and wandb.run.id != run_id:
        log.info("finishing W&B run %s of an earlier job in this process", wandb.run.id)
        wandb.finish()


def _step_of(row: dict[str, Any]) -> float | None:
    try:
        return float(row["step"])
    except (KeyError, TypeError, ValueError):
        return None


class ResumableExperimentWriter(ExperimentWriter):
    """Lightning's CSV experiment writer, continuing an existing ``metrics.csv`` when ``resume`` is true.

    On opening, the rows that :attr:`COMMITTED_FILE` does not vouch for (logged after the last checkpoint
    save or successful stage end, e.g. by a killed attempt; or cut mid-line by the kill) are dropped; without
    that file (a log written by Lightning's own ``CSVLogger``) every well-formed row is kept. At the first
    save of this attempt, earlier rows at a step beyond the first step it logs are dropped too, so the
    step column never goes back (a phase or run retrained from an older state). ``resume=False`` starts
    a new file, as Lightning does.
    """

    def __init__(self, log_dir: str, resume: bool = True) -> None:
        self._resume = resume
        self._rows = 0  # data rows in metrics.csv
        self._earlier: list[dict[str, str]] | None = None  # rows of earlier attempts, until the first save
        super().__init__(log_dir=log_dir)

    @property
    def committed_path(self) -> Path:
        """The file recording how many rows of ``metrics.csv`` survive a resume."""
        return Path(self.log_dir) / COMMITTED_FILE

    @override
    def _check_log_dir_exists(self) -> None:
        metrics = Path(self.metrics_file_path)
        if not self._resume or not metrics.is_file():
            if metrics.is_file():
                log.info("starting a new CSV log: %s removed", metrics)
            metrics.unlink(missing_ok=True)
            self.committed_path.unlink(missing_ok=True)
            return
        with metrics.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
        if "step" not in header:
            log.warning("%s has no step column: starting a new CSV log", metrics)
            metrics.unlink()
            self.committed_path.unlink(missing_ok=True)
            return
        committed = self._read_committed()
        kept = rows if committed is None else rows[:committed]
        # a line cut by a kill has missing (None) or extra (key None) fields
        kept = [r for r in kept if None not in r and None not in r.values() and _step_of(r) is not None]
        self.metrics_keys = header
        self._earlier = kept
        self._rows = len(kept)
        if len(kept) < len(rows):
            self._write_rows(kept)
        log.info("continuing the CSV log %s: %d earlier rows kept, %d logged after the last checkpoint dropped",
                 metrics, len(kept), len(rows) - len(kept))

    def _read_committed(self) -> int | None:
        try:
            return int(json.loads(self.committed_path.read_text())["rows"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s: keeping every row of the CSV log", self.committed_path)
            return None

    def _write_rows(self, rows: list[dict[str, Any]], fieldnames: list[str] | None = None) -> None:
        """Replace ``metrics.csv`` atomically by ``rows`` under ``fieldnames`` (default: the current keys)."""
        path = Path(self.metrics_file_path)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames or self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

    @override
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._write_rows(rows, fieldnames)

    @override
    def save(self) -> None:
        if not self.metrics:
            return
        if self._earlier is not None:
            first = min(float(m["step"]) for m in self.metrics)
            kept = [r for r in self._earlier if _step_of(r) <= first]
            if len(kept) < len(self._earlier):
                log.warning("CSV log: dropping %d earlier rows logged after step %g, the first step of this "
                            "attempt", len(self._earlier) - len(kept), first)
                self._write_rows(kept)
                self._rows = len(kept)
            self._earlier = None
        count = len(self.metrics)
        super().save()
        self._rows += count

    def commit(self) -> None:
        """Record that every row written so far survives a resume (the state they describe is saved)."""
        _atomic_write_text(self.committed_path, json.dumps({"rows": self._rows}) + "\n")


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` (``save_dir/name/version/metrics.csv``) continuing the same file when the
    run is resumed (``resume=True``), see :class:`ResumableExperimentWriter`.

    Rows are marked as surviving a resume whenever a checkpoint is saved (``after_save_checkpoint``) and
    when a fit/validate ends successfully: the rerun resumes from ``last.ckpt`` (or skips a finished DMT
    phase), so rows logged after that point are logged again by the rerun and the earlier copies are
    dropped. ``version`` defaults to ``""`` (no ``version_N`` folder per attempt): a fixed folder is what
    makes the log continue.
    """

    def __init__(
        self,
        save_dir: _PATH,
        name: str | None = "csv",
        version: int | str | None = "",
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
        resume: bool = True,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._resume = bool(resume)

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ResumableExperimentWriter:
        """The writer of ``metrics.csv`` and ``hparams.yaml`` (opened, and an earlier log trimmed, on first use)."""
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = ResumableExperimentWriter(log_dir=self.log_dir, resume=self._resume)
        return self._experiment

    @override
    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()
        self.experiment.commit()

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is None:
            return
        self.save()
        if status == "success":
            self._experiment.commit()
