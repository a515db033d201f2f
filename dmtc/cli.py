"""Shared behaviour of the ``@hydra.main`` entry points: user errors end with one clear message."""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def run_entry(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Call ``fn(cfg)``; a :class:`DMTCError` (also raised inside a DataLoader worker) or a mandatory config
    value left unset (``???``) exits with status 1 and one message instead of a stack trace."""
    try:
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
