"""Loggers that continue the same log when a run is resumed, on one step axis across a run's stages.

Rerunning a command reuses its run folder and resumes training from ``last.ckpt``; its loggers continue
the log of the earlier attempt(s) instead of starting a new one:

* **W&B**: :func:`wandb_run_id` keeps the run id in ``<run dir>/wandb_run_id`` (created on the first start,
  written atomically by rank 0); :func:`dmtc.trainer.build_loggers` passes it to ``WandbLogger`` with
  ``resume="allow"``, so every attempt logs to one W&B run (offline: one ``offline-run-*-<id>`` folder per
  attempt, which ``wandb sync`` uploads into that one run). ``overwrite=true`` starts a new id.
* **CSV**: :class:`CSVLogger` appends to the existing ``metrics.csv`` (one header, columns widened
  when new metrics appear) instead of deleting it as Lightning's ``CSVLogger`` does, and drops the rows
  that the resumed attempt logs again: those written after the last checkpoint save (or the last
  successful end of a fit/validate), i.e. after the state the rerun resumes from.

A DMT run trains one Lightning Trainer per stage (warm-up, phases), each counting steps from 0;
:class:`StepOffsetLogger` shifts each stage's steps by the steps of the stages before it, so one log (one
W&B run, one CSV file) covers the whole run on one continuous axis. Everything here uses Lightning's public
``Logger`` interface only.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import secrets
import string
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from dmtc.errors import DMTCError, output_error
from dmtc.files import atomic_write_text, is_rank_zero, temp_sibling

log = logging.getLogger(__name__)

#: File in the run folder holding the W&B run id of the run.
WANDB_ID_FILE = "wandb_run_id"
#: File next to ``metrics.csv`` holding how many of its rows a checkpoint (or a finished stage) backs.
COMMITTED_FILE = "metrics_committed.json"
METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"

_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def new_wandb_run_id() -> str:
    """A fresh W&B run id: 8 random lowercase letters and digits (W&B's own format)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def wandb_run_id(run_dir: str | os.PathLike[str], *, fresh: bool = False) -> str:
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
    if is_rank_zero():
        atomic_write_text(path, run_id + "\n")
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


def _step_of(row: Mapping[str, Any]) -> float | None:
    try:
        return float(row["step"])
    except (KeyError, TypeError, ValueError):
        return None


class ResumableCSV:
    """``metrics.csv`` (one header, sorted columns, ``step`` among them) continued across attempts.

    On opening with ``resume=True``, the rows that :data:`COMMITTED_FILE` does not vouch for (logged after
    the last checkpoint save or successful stage end, e.g. by a killed attempt; or cut mid-line by the
    kill) are dropped; without that file (a log written by Lightning's own ``CSVLogger``) every well-formed
    row is kept. At the first write of this attempt, earlier rows at a step beyond the first step it logs
    are dropped too, so the step column never goes back (a stage retrained from an older state).
    ``resume=False`` starts a new file. Rewrites go through a temporary file and a rename.
    """

    def __init__(self, log_dir: Path, resume: bool) -> None:
        self.path, self.committed_path = log_dir / METRICS_FILE, log_dir / COMMITTED_FILE
        self.keys: list[str] = []
        self.rows = 0  # data rows in metrics.csv
        self.earlier: list[dict[str, str]] | None = None  # rows of earlier attempts, until the first write
        log_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.path.is_file():
            self._continue()
        else:
            if self.path.is_file():
                log.info("starting a new CSV log: %s removed", self.path)
            self._start_new()

    def _start_new(self) -> None:
        self.path.unlink(missing_ok=True)
        self.committed_path.unlink(missing_ok=True)

    def _continue(self) -> None:
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
        if "step" not in header:
            log.warning("%s has no step column: starting a new CSV log", self.path)
            self._start_new()
            return
        committed = self._read_committed()
        kept = rows if committed is None else rows[:committed]
        # a line cut by a kill has missing (None) or extra (key None) fields
        kept = [r for r in kept if None not in r and None not in r.values() and _step_of(r) is not None]
        self.keys, self.earlier, self.rows = header, kept, len(kept)
        if len(kept) < len(rows):
            self._rewrite(kept)
        log.info("continuing the CSV log %s: %d earlier rows kept, %d logged after the last checkpoint dropped",
                 self.path, len(kept), len(rows) - len(kept))

    def _read_committed(self) -> int | None:
        try:
            return int(json.loads(self.committed_path.read_text())["rows"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s: keeping every row of the CSV log", self.committed_path)
            return None

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = temp_sibling(self.path)
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (each with a ``step``), widening the header when they bring new columns; a full disk
        or a file-size limit is one :class:`dmtc.errors.OutputError` naming the log."""
        if not rows:
            return
        try:
            self._append(rows)
        except OSError as err:
            failed = output_error(self.path, err)
            if failed is None or failed is err:
                raise
            raise failed from err

    def _append(self, rows: list[dict[str, Any]]) -> None:
        if self.earlier is not None:
            first = min(float(r["step"]) for r in rows)
            kept = [r for r in self.earlier if _step_of(r) <= first]
            if len(kept) < len(self.earlier):
                log.warning("CSV log: dropping %d earlier rows logged after step %g, the first step of this "
                            "attempt", len(self.earlier) - len(kept), first)
                self._rewrite(kept)
                self.rows = len(kept)
            self.earlier = None
        new_keys = set().union(*rows) - set(self.keys)
        exists = self.path.is_file()
        if new_keys:
            self.keys = sorted([*self.keys, *new_keys])
            if exists:
                with self.path.open(newline="") as f:
                    self._rewrite(list(csv.DictReader(f)))
        with self.path.open("a" if exists else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.keys)
            if not exists:
                writer.writeheader()
            writer.writerows(rows)
        self.rows += len(rows)

    def commit(self) -> None:
        """Record that every row written so far survives a resume (the state they describe is saved)."""
        atomic_write_text(self.committed_path, json.dumps({"rows": self.rows}) + "\n")


class CSVLogger(Logger):
    """Metrics in ``save_dir/name/version/metrics.csv`` and hyper-parameters in ``hparams.yaml`` (Lightning's
    CSV format), continuing the same file when the run is resumed (``resume=True``, :class:`ResumableCSV`).

    Rows are marked as surviving a resume whenever a checkpoint is saved (``after_save_checkpoint``) and
    when a fit/validate ends successfully: the rerun resumes from ``last.ckpt`` (or skips a finished DMT
    phase), so rows logged after that point are logged again by the rerun and the earlier copies are
    dropped. ``version`` defaults to ``""`` (no ``version_N`` folder per attempt): a fixed folder is what
    makes the log continue. Only rank 0 writes.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        name: str | None = "csv",
        version: int | str | None = "",
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
        resume: bool = True,
    ) -> None:
        super().__init__()
        self._save_dir, self._name = os.fspath(save_dir), name or ""
        self._version = "" if version is None else version
        self.prefix, self.flush_every = prefix, int(flush_logs_every_n_steps)
        self.resume = bool(resume)
        self.hparams: dict[str, Any] = {}
        self.pending: list[dict[str, Any]] = []
        self.file: ResumableCSV | None = None  # opened (and an earlier log trimmed) on first use

    @property
    @override
    def name(self) -> str:
        return self._name

    @property
    @override
    def version(self) -> int | str:
        return self._version

    @property
    @override
    def save_dir(self) -> str:
        return self._save_dir

    @property
    @override
    def root_dir(self) -> str:
        return os.path.join(self.save_dir, self.name)

    @property
    @override
    def log_dir(self) -> str:
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        return os.path.join(self.root_dir, version)

    @property
    def experiment(self) -> ResumableCSV:
        """The ``metrics.csv`` writer (opened, and an earlier log trimmed, on first use)."""
        if self.file is None:
            self.file = ResumableCSV(Path(self.log_dir), resume=self.resume)
        return self.file

    @override
    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        params = vars(params) if isinstance(params, Namespace) else dict(params or {})
        self.experiment  # noqa: B018  (opens the log: a resumed run's log is trimmed right away)
        self.hparams.update(params)
        save_hparams_to_yaml(os.path.join(self.log_dir, HPARAMS_FILE), self.hparams)

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        row = {f"{self.prefix}-{k}" if self.prefix else k: v.item() if isinstance(v, torch.Tensor) else v
               for k, v in metrics.items()}
        row["step"] = len(self.pending) if step is None else step
        self.pending.append(row)
        if (row["step"] + 1) % self.flush_every == 0:
            self.save()

    @override
    @rank_zero_only
    def save(self) -> None:
        rows, self.pending = self.pending, []
        self.experiment.append(rows)

    @override
    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()
        self.experiment.commit()

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self.file is None and not self.pending:
            return
        self.save()
        if status == "success":
            self.experiment.commit()


class StepOffsetLogger(Logger):
    """``logger`` with every logged step shifted by ``offset``: one continuous step axis over the Trainers of
    one run (DMT: warm-up, then each phase, each Trainer counting from 0; a resumed stage's Trainer counts
    from its checkpoint's step). ``columns`` are added to every logged row (DMT: ``phase``; the end-of-phase
    re-validation of the best checkpoints also ``best_revalidation``). Everything else is passed through."""

    def __init__(self, logger: Logger, offset: int, columns: dict[str, float] | None = None) -> None:
        super().__init__()
        self.logger, self.offset = logger, int(offset)
        self.columns = dict(columns or {})

    # the wrapped logger's folder and identity (Lightning's Logger properties)
    name = property(lambda self: self.logger.name)
    version = property(lambda self: self.logger.version)
    save_dir = property(lambda self: self.logger.save_dir)
    root_dir = property(lambda self: self.logger.root_dir)
    log_dir = property(lambda self: self.logger.log_dir)

    @property
    def experiment(self) -> Any:
        """The wrapped logger's experiment object (e.g. the W&B run)."""
        return self.logger.experiment

    @override
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.logger.log_metrics({**metrics, **self.columns}, None if step is None else step + self.offset)

    @override
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        self.logger.log_hyperparams(params, *args, **kwargs)

    @override
    def log_graph(self, model: torch.nn.Module, input_array: torch.Tensor | None = None) -> None:
        self.logger.log_graph(model, input_array)

    @override
    def save(self) -> None:
        self.logger.save()

    @override
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.logger.after_save_checkpoint(checkpoint_callback)

    @override
    def finalize(self, status: str) -> None:
        self.logger.finalize(status)
