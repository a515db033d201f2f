"""OmegaConf resolvers and small helpers for Hydra configs; importing this module registers them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

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


def register_resolvers() -> None:
    """Register dmtc's resolvers (idempotent)."""
    if not OmegaConf.has_resolver("dmtc_run_name"):
        OmegaConf.register_new_resolver("dmtc_run_name", run_name)
    if not OmegaConf.has_resolver("dmtc_checkpoint_folder"):
        OmegaConf.register_new_resolver("dmtc_checkpoint_folder", checkpoint_folder)
    if not OmegaConf.has_resolver("dmtc_synthetic_dir"):
        OmegaConf.register_new_resolver("dmtc_synthetic_dir", synthetic_dir)


register_resolvers()
