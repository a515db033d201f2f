"""Shared behaviour of the ``@hydra.main`` entry points: user errors end with one clear message."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from dmtc.errors import DMTCError


def user_message(err: BaseException) -> str:
    """The user-facing text of ``err``; strips the worker traceback a DataLoader wraps around it."""
    text = str(err)
    if "Original Traceback" in text and "DMTCError: " in text:
        text = text.rsplit("DMTCError: ", 1)[-1].strip()
    return text


#: environment variables Lightning's DDP launcher sets in the launching process
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def one_multirun_job() -> Iterator[None]:
    """Run one job of a Hydra multirun so that DDP works in it as in a single run.

    Lightning's DDP launcher starts ranks 1..N-1 by rerunning the script with ``sys.argv`` plus
    ``hydra.run.dir=<hydra.run.dir>``; in a multirun ``sys.argv`` is the whole sweep (``-m sid=0,1``) and
    ``hydra.run.dir`` is not the job's folder, so every child would run the sweep again (an open Lightning
    issue). Here both describe this job (its overrides, its folder). After the job its process group is
    destroyed and the launcher's environment variables are removed, so the next job of the sweep starts its
    own processes instead of talking to the finished job's. Outside a multirun nothing changes."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, env = list(sys.argv), {k: os.environ.get(k) for k in _DDP_ENV}
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sys.argv = argv


def run_entry(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Call ``fn(cfg)``; a :class:`DMTCError` (also raised inside a DataLoader worker) or a mandatory config
    value left unset (``???``) exits with status 1 and one message instead of a stack trace. A multirun
    job's DDP processes run that job only (:func:`one_multirun_job`)."""
    try:
        with one_multirun_job():
            return fn(cfg)
    except DMTCError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(1)
    except MissingMandatoryValue as err:  # a ??? key of the config the command line left unset
        key = err.full_key or "a required key"
        print(f"error: {key} must be set (the config has no default for it): add {key}=... to the command "
              f"(e.g. dataset=folder needs dataset.num_classes=N and 'dataset.class_names=[...]'; README)",
              file=sys.stderr)
        sys.exit(1)
