"""One command per run folder: a second one on a folder in use stops within seconds, naming the holder.

:func:`hold_run_folder` takes ``<run dir>/run.lock`` for the duration of a task: an exclusive POSIX record
lock (``fcntl.lockf``) on the file, which holds ``{"pid", "host", "started", "command"}`` of the holder.

* The kernel drops the lock when its process ends, however it ends (kill -9 included), so a lock is never
  left behind by a dead process. A file that still names a holder but is not locked belongs to a run that
  died without cleaning up: it is taken over with one warning naming that process.
* POSIX record locks are per process: DataLoader workers forked by the holder do not inherit them, so a
  leftover worker cannot keep the folder busy after the holder died. They work across hosts on NFS (lockd).
* Under DDP only the launching process (global rank 0, :func:`dmtc.files.is_rank_zero`) locks; the ranks it
  starts skip the lock (they would otherwise wait on their own parent).
* Where the file system refuses locks (some parallel file systems), the file alone decides: a holder on
  this host counts while its pid runs, one on another host counts until its file is deleted.

On release the file is removed (while still locked, and a taker checks that the file it locked is still
the one at that path, so two commands can never both hold the folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dmtc.errors import DMTCError, output_error
from dmtc.files import is_rank_zero

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


class RunFolderBusy(DMTCError):
    """Another live command holds the run folder."""


def _holder_text(info: dict[str, Any] | None, *, command: bool = True) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    started = info.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, float) else ""
    what = f" ({info['command']})" if command and info.get("command") else ""
    return f"pid {info.get('pid')} on host {info.get('host')}{when}{what}"


def _read_info(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        info = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}


class RunLock:
    """The lock of one run folder (see the module); :meth:`acquire` then :meth:`release`."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def _busy(self, info: dict[str, Any] | None) -> RunFolderBusy:
        return RunFolderBusy(f"run folder {self.run_dir} is in use by {_holder_text(info)}; wait for that command "
                             f"to finish or stop it, or run in another folder (hydra.run.dir=...)")

    def acquire(self) -> None:
        """Take the folder or raise :class:`RunFolderBusy` (naming the holder) at once; an unwritable folder
        is one :class:`dmtc.errors.OutputError`."""
        for _ in range(20):  # a race with a holder that removes its file while releasing: try again
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise (output_error(self.path, err) or err) from err
            try:
                locked = self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                info = _read_info(fd)
                os.close(fd)
                raise self._busy(info)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its holder had just removed
                os.close(fd)
                continue
            self._take(fd)
            return
        raise self._busy(None)

    def _lock(self, fd: int) -> bool:
        """Whether the lock on ``fd`` was taken (False: another process holds it)."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            if err.errno not in _UNSUPPORTED:
                raise
        # no locks on this file system: the file's holder decides
        info = _read_info(fd)
        if info and info.get("host") == socket.gethostname() and _pid_alive(info.get("pid")):
            return info.get("pid") == os.getpid()
        if info and info.get("host") != socket.gethostname():
            return False
        return True

    def _take(self, fd: int) -> None:
        previous = _read_info(fd)
        if previous and previous.get("pid") != os.getpid():
            log.warning("run folder %s: taking over the lock of %s, which is no longer running", self.run_dir,
                        _holder_text(previous, command=False))
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(_me()) + "\n").encode())
        except OSError as err:
            os.close(fd)
            raise (output_error(self.path, err) or err) from err
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)  # closing drops the record lock
        self.fd = None


@contextlib.contextmanager
def hold_run_folder(run_dir: str | os.PathLike[str]) -> Iterator[RunLock | None]:
    """Hold ``run_dir`` for the duration (global rank 0 only; other ranks get None): see the module."""
    if not is_rank_zero():
        yield None
        return
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
