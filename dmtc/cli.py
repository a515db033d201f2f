"""Shared behaviour of the ``@hydra.main`` entry points: user errors, interrupts and failed writes end with one
clear message; one command at a time per run folder."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from dmtc import interrupts
from dmtc.errors import OUTPUT_ERRNOS, DMTCError, OutputError
from dmtc.files import remove_temporaries
from dmtc.run_lock import hold_run_folder

RERUN = "rerun the same command to continue"
#: errno values that only a write can meet
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


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


def interrupt_message(signum: int | None, requeued: bool = False) -> str:
    """What an interrupted run tells its user: the signal, the step saved (if training was stopped) and that
    the same command continues it (``requeued``: the scheduler reruns it)."""
    name = interrupts.signal_name(signum) if signum is not None else "a signal"
    then = "the job is requeued and continues" if requeued else RERUN
    saved = interrupts.saved()
    if saved is not None:
        path, step, stage = saved
        return f"stopped by {name} at step {step} of {stage}: saved to {path}; {then} from that step"
    return (f"stopped by {name} before a training step could be saved: what was saved so far (checkpoints, "
            f"finished phases, complete pseudo-label stores) is kept; {then}")


def _output_path(cfg: DictConfig) -> Path | None:
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # a config without an output folder (tests composing a bare config)
        return None


def run_entry(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Call ``fn(cfg)`` holding the run folder (:mod:`dmtc.run_lock`; temporary files that a killed command
    left there are removed first) with clean interrupts (:mod:`dmtc.interrupts`). Exits with status 1 and
    one message instead of a stack trace on a :class:`DMTCError` (also raised inside a DataLoader worker: a
    busy run folder, a diverged run, a file that cannot be written, ...), a mandatory config value left unset
    (``???``) or an ``OSError`` writing a file (disk full, quota, file-size limit, permissions); with 128 +
    the signal number and one line on Ctrl-C / SIGINT / SIGTERM. A multirun job's DDP processes run that job
    only (:func:`one_multirun_job`)."""
    try:
        with interrupts.handle_interrupts():
            try:
                output = _output_path(cfg)
                with one_multirun_job(), (hold_run_folder(output) if output is not None
                                          else contextlib.nullcontext()) as lock:
                    if lock is not None:  # the folder is ours: what a killed command was writing goes
                        remove_temporaries(output, recursive=True)
                    return fn(cfg)
            except BaseException as err:
                if interrupts.is_interrupt(err):  # the message needs the state before the handlers go
                    signum = _signum(err)
                    requeue = interrupts.requeue_handler() if signum in interrupts.REQUEUE_SIGNALS else None
                    raise _Stopped(interrupt_message(signum, requeued=requeue is not None), signum, requeue) from None
                raise
    except _Stopped as stop:
        print(f"interrupted: {stop.message}", file=sys.stderr)
        if stop.requeue is not None:  # SLURM (submitit): requeue this job, which reruns the command, then exit
            stop.requeue()
        sys.exit(128 + (stop.signum or 15))
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once
        print(f"interrupted: stopped at once by a second Ctrl-C; the last saved checkpoint is kept; {RERUN}",
              file=sys.stderr)
        sys.exit(130)
    except DMTCError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # one that no write site named (those raise OutputError, a DMTCError)
        if err.errno in _WRITE_ERRNOS:
            print(f"error: {OutputError(err.filename or 'a file', err)}", file=sys.stderr)
        elif err.errno in OUTPUT_ERRNOS and err.filename:  # permissions, reading or writing
            print(f"error: cannot access {err.filename}: {err.strerror}; fix its permissions or point the config "
                  "at another folder", file=sys.stderr)
        else:
            raise
        sys.exit(1)
    except MissingMandatoryValue as err:  # a ??? key of the config the command line left unset
        key = err.full_key or "a required key"
        print(f"error: {key} must be set (the config has no default for it): add {key}=... to the command "
              f"(e.g. dataset=folder needs dataset.num_classes=N and 'dataset.class_names=[...]'; README)",
              file=sys.stderr)
        sys.exit(1)


class _Stopped(BaseException):
    def __init__(self, message: str, signum: int | None, requeue: Callable[..., Any] | None = None) -> None:
        super().__init__(message)
        self.message, self.signum, self.requeue = message, signum, requeue


def _signum(err: BaseException) -> int | None:
    if isinstance(err, interrupts.Interrupted):
        return err.signum
    return interrupts.pending() or 15  # Lightning's SIGTERM stop (or ours passed on to it)

