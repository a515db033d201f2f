"""OmegaConf resolvers and small helpers for Hydra configs; importing this module registers them."""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Sequence
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import InterpolationResolutionError

from dmtc.errors import DMTCError

MAX_RUN_NAME = 120
#: overrides a long run name keeps first: the keys seed sweeps and the paper's table vary
FIRST_KEPT = ("sid", "seed", "split", "method", "dataset")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")


def run_name(override_dirname: str, overrides: Sequence[str] | None = None) -> str:
    """Run-folder name from Hydra's ``override_dirname`` (``dataset-city_sid-1_split-8``).

    The same command maps to the same folder, so rerunning it resumes that run. Characters outside
    ``[A-Za-z0-9._+-]`` (path separators, ``=``, commas, brackets) become ``_`` so that a path into the
    folder is itself a valid Hydra override value; no overrides gives ``default``. A name longer than 120
    characters keeps what fits of its overrides (``overrides``: the job's override lines,
    ``hydra.overrides.task``), ``sid``, ``seed``, ``split``, ``method`` and ``dataset`` first, then the
    shortest, and replaces the rest by a hash of the whole name (``dataset-folder_sid-1_h-3cd8c66815``), so
    it stays unique, readable (a sweep's swept keys stay visible) and within file-system limits; without
    ``overrides`` it is cut and suffixed with the hash.
    """
    name = _safe(override_dirname)
    if len(name) <= MAX_RUN_NAME:
        return name or "default"
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    if not overrides:
        return f"{name[: MAX_RUN_NAME - 11]}-{digest}"
    items = {_safe(str(o).replace("=", "-", 1)): str(o).split("=", 1)[0].lstrip("+~") for o in overrides}
    candidates = sorted((i for i in items if i and i in name),
                        key=lambda i: (items[i] not in FIRST_KEPT, len(i), i))
    kept, budget = [], MAX_RUN_NAME - len(f"h-{digest}")
    for item in candidates:
        if sum(len(k) + 1 for k in kept) + len(item) + 1 <= budget:
            kept.append(item)
    return "_".join([*sorted(kept), f"h-{digest}"])


def checkpoint_folder(ckpt: Any) -> str:
    """Run-folder prefix of an evaluation/labeling run: ``<checkpoint file stem>-<hash of its absolute
    path>/`` (empty without a checkpoint), so evaluating two checkpoints with the same overrides never shares
    (and overwrites) one ``results.json``, while rerunning one command finds its own folder again."""
    if ckpt is None or str(ckpt) in ("", "???"):
        return ""
    from pathlib import Path

    path = Path(str(ckpt)).expanduser().absolute()
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", path.stem)[:60] or "ckpt"
    return f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}/"


def synthetic_dir(seed: int, spec: Any) -> str:
    """Folder name of a generated synthetic dataset: ``seed<seed>`` for the default spec, else
    ``seed<seed>-<hash of the spec>``.

    Two runs that ask for different specs (``dataset.generate.spec.hue_jitter=30``) thus never share,
    and never regenerate, each other's data; an override equal to a default changes nothing.
    """
    import json
    from dataclasses import asdict

    from dmtc.data.synthetic import DEFAULT_SPEC, SyntheticSpec
    from dmtc.errors import DMTCError

    values = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec or {})
    try:
        resolved = SyntheticSpec(**values)
    except (TypeError, ValueError, DMTCError):  # prepare_dataset reports a bad spec with a clear message
        resolved = None
    if resolved == DEFAULT_SPEC:
        return f"seed{seed}"
    text = json.dumps(asdict(resolved) if resolved is not None else values, sort_keys=True, default=str)
    return f"seed{seed}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def slurm_tasks(devices: Any) -> int:
    """SLURM tasks per node for ``trainer.devices`` (one DDP process per device): an explicit count or list;
    ``auto``/-1 cannot be known before the job starts."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    try:
        count = int(devices)
    except (TypeError, ValueError):
        count = -1
    if count < 1:
        raise DMTCError(f"trainer.devices={devices} with hydra/launcher=slurm: set the number of devices per "
                        "node (e.g. trainer.devices=4); it is the number of SLURM tasks per node")
    return count


def slurm_gpus(accelerator: Any, devices: Any) -> int | None:
    """GPUs per node to request: one per task unless ``trainer.accelerator=cpu`` (None: no GPU request, so a CPU
    job schedules on a GPU-less partition)."""
    return None if str(accelerator).lower() == "cpu" else slurm_tasks(devices)

#: overrides that never name a sweep's folder (where it runs, how it logs; cf. hydra.job.config.override_dirname)
SWEEP_NAME_EXCLUDED = ("overwrite", "dataset.num_workers", "dataset.prefetch_factor", "logger", "paths.", "hydra.",
                       "hydra/")


def sweep_name(overrides: Sequence[str]) -> str:
    """A multirun's folder name from its command-line overrides (``sid=0,1 split=8`` → ``sid-0_1_split-8``,
    long names as :func:`run_name`): the same ``-m`` command gives the same folder, so rerunning it after a
    crash resumes every job of the sweep (finished jobs return their results), and different sweeps never
    share a folder. Where it runs and logs (``hydra.*``, the launcher, ``paths.*``, ``logger``) is left out."""
    kept = [str(o) for o in overrides if not str(o).lstrip("+~").startswith(SWEEP_NAME_EXCLUDED)]
    dirname = "_".join(sorted(o.lstrip("+~").replace("=", "-", 1) for o in kept))
    return run_name(dirname, kept)


class PinSweepFolder(Callback):
    """Hydra callback: fix a multirun's folder before its jobs start.

    ``hydra.sweep.dir`` is named by the sweep's overrides (:func:`sweep_name`), which only the launching
    process sees (``sid=0,1``); every job composes its config again with its own overrides (``sid=0``) and
    would name another folder. The launching process therefore resolves the name once and hands it to the
    jobs as the override ``hydra.sweep.dir=<folder>``, as if the user had typed it (local and SLURM jobs
    alike). A ``hydra.sweep.dir`` given on the command line is left as it is."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        try:  # the launcher's settings (e.g. SLURM tasks from trainer.devices), checked before any submission
            OmegaConf.to_container(config.hydra.launcher, resolve=True)
        except InterpolationResolutionError as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, DMTCError):  # OmegaConf chains its own errors
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(1)
        hydra_overrides = list(config.hydra.overrides.hydra)
        if any(str(o).lstrip("+~").startswith("hydra.sweep.dir=") for o in hydra_overrides):
            return
        folder = str(config.hydra.sweep.dir)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = folder
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={folder}")


def register_resolvers() -> None:
    """Register dmtc's resolvers (idempotent)."""
    resolvers = {"dmtc_run_name": run_name, "dmtc_checkpoint_folder": checkpoint_folder,
                 "dmtc_synthetic_dir": synthetic_dir, "dmtc_sweep_name": sweep_name,
                 "dmtc_slurm_tasks": slurm_tasks, "dmtc_slurm_gpus": slurm_gpus}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()
