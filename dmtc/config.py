"""OmegaConf resolvers and small helpers for Hydra configs; importing this module registers them."""

from __future__ import annotations

import hashlib
import re

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


def register_resolvers() -> None:
    """Register dmtc's resolvers (idempotent)."""
    if not OmegaConf.has_resolver("dmtc_run_name"):
        OmegaConf.register_new_resolver("dmtc_run_name", run_name)


register_resolvers()
