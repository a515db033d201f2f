"""User-facing errors.

Everything a user can get wrong (a missing data root, a missing split list, a corrupt image, a checkpoint
for another class count, ...) raises :class:`DMTCError` with one message that names the file or config key
and says how to fix it. The entry points print that message alone, without a traceback.

A file dmtc cannot write (a full disk, a quota, a file-size limit, a read-only or foreign folder) is an
:class:`OutputError`: a :class:`DMTCError` that is also the :class:`OSError` it comes from.
"""

from __future__ import annotations

import errno
import os


class DMTCError(Exception):
    """A mistake in the user's inputs or configuration; the message says what and how to fix it."""


#: errno values meaning "this output cannot be written here", and what to do about each
_OUTPUT_FIXES = {
    errno.ENOSPC: "the disk is full: free space there or point paths.log_dir / paths.cache_dir to another disk",
    errno.EDQUOT: "your disk quota is used up: free space there or point paths.log_dir / paths.cache_dir elsewhere",
    errno.EFBIG: "the file exceeds the file-size limit (ulimit -f, or the file system's): raise the limit",
    errno.EACCES: "the folder is not writable by you: fix its permissions or point paths.log_dir / "
                  "paths.cache_dir to a writable folder",
    errno.EPERM: "the folder is not writable by you: fix its permissions or point paths.log_dir / "
                 "paths.cache_dir to a writable folder",
    errno.EROFS: "the file system is read-only: point paths.log_dir / paths.cache_dir to a writable folder",
}
OUTPUT_ERRNOS = frozenset(_OUTPUT_FIXES)


class OutputError(DMTCError, OSError):
    """``path`` could not be written (``errno`` one of :data:`OUTPUT_ERRNOS`); the message names the file,
    the reason and the fix. Still an :class:`OSError` (same ``errno``, ``strerror``, ``filename``)."""

    def __init__(self, path: str | os.PathLike[str], err: OSError) -> None:
        code = err.errno if err.errno is not None else errno.EIO
        strerror = err.strerror or str(err)
        fix = _OUTPUT_FIXES.get(code, "check the disk and the folder's permissions")
        super().__init__(code, strerror, os.fspath(path))
        self.message = (f"cannot write {os.fspath(path)}: {strerror} ({errno.errorcode.get(code, code)}); {fix}, "
                        "then rerun the same command to continue (nothing half-written is used)")

    def __str__(self) -> str:
        return self.message


def output_error(path: str | os.PathLike[str], err: BaseException) -> OutputError | None:
    """The :class:`OutputError` for a failed write of ``path`` when ``err`` (or an exception it was raised
    from or during, as torch wraps a failed ``write`` in a ``RuntimeError``) is an :class:`OSError` of
    :data:`OUTPUT_ERRNOS`; else None (a bug or another failure, to be raised as it is)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OutputError):
            return current
        if isinstance(current, OSError) and current.errno in OUTPUT_ERRNOS:
            return OutputError(path, current)
        current = current.__cause__ or current.__context__
    return None
