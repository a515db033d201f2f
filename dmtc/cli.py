"""Shared behaviour of the ``@hydra.main`` entry points: user errors end with one clear message."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from dmtc.errors import DMTCError


def user_message(err: BaseException) -> str:
    """The user-facing text of ``err``; strips the worker traceback a DataLoader wraps around it."""
    text = str(err)
    if "Original Traceback" in text and "DMTCError: " in text:
        text = text.rsplit("DMTCError: ", 1)[-1].strip()
    return text


def run_entry(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Call ``fn(cfg)``; a :class:`DMTCError` (also raised inside a DataLoader worker) exits with status 1
    and its message alone instead of a stack trace."""
    try:
        return fn(cfg)
    except DMTCError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(1)
