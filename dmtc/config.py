"""OmegaConf resolvers and small helpers for Hydra configs; importing this module registers them."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from omegaconf import OmegaConf

MAX_RUN_NAME = 120


def run_name(override_dirname: str) -> str:
    """Run-folder name from Hydra's ``override_dirname`` (``dataset-city_sid-1_split-8``).

    The same command maps to the same folder, so rerunning it resumes that run. Characters outside
    ``[A-Za-z0-9._+-]`` (path separators, ``=``, commas, brackets) become ``_`` so that a path into the
    folder is itself a valid Hydra override value; no overrides gives ``default``; a name longer than 120
    characters is cut and suffixed with a hash of the whole, so it stays unique and within file-system limits.
    """
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", override_dirname).strip("_")
    if len(name) > MAX_RUN_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: MAX_RUN_NAME - 11]}-{digest}"
    return name or "default"


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
