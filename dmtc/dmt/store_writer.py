"""Pseudo-label PNGs written from background threads, so labeling never waits for PNG encoding.

Labeling (:func:`dmtc.dmt.labeling.predict_to_store`) hands each batch's labels and score codes to a
:class:`BackgroundStoreWriter` and goes on with the next batch. On CUDA the two maps are copied to pinned
host memory asynchronously and a CUDA event marks the copy; a writer thread waits on that event (not the
labeling thread), then encodes and writes the image's two PNGs (OpenCV and file writes release the GIL).

* **Same files, same order of record.** Names are recorded in the caller's thread in submission order
  (:meth:`dmtc.dmt.store.PseudoLabelStore.reserve`) and every file gets exactly the bytes
  :meth:`~dmtc.dmt.store.PseudoLabelStore.write` would write; only the order in which files appear on disk
  differs, which nothing reads (the manifest is written after :meth:`BackgroundStoreWriter.close`).
* **Bounded.** At most ``max_pending`` images (default 4 per thread) wait in memory: :meth:`submit` blocks
  when the writers fall behind.
* **Errors surface.** A failed write is raised by the next :meth:`submit` or by :meth:`close` (leaving the
  ``with`` block), never lost; the store then has no manifest and is not trusted.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import numpy as np
import torch

from dmtc.dmt.store import PseudoLabelStore


def default_threads() -> int:
    """Writer threads when not given: one per CPU core, at most 4 (a 512×1024 image's two PNGs take tens of
    milliseconds to encode; four threads keep up with a GPU labeling ~100 images/s)."""
    return max(1, min(4, os.cpu_count() or 1))


class BackgroundStoreWriter:
    """Writes a :class:`~dmtc.dmt.store.PseudoLabelStore`'s images from a bounded pool of threads.

    Use as a context manager; leaving the block waits for every write and raises the first error::

        with BackgroundStoreWriter(store) as writer:
            for batch in loader:
                ...
                writer.submit(names, labels_uint8, codes, sizes)
    """

    def __init__(self, store: PseudoLabelStore, threads: int | None = None, max_pending: int | None = None) -> None:
        self.store = store
        self.threads = int(threads or default_threads())
        self._slots = threading.BoundedSemaphore(int(max_pending or 4 * self.threads))
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="dmtc-store-writer")
        self._pending: deque[Future[None]] = deque()
        self._closed = False

    def __enter__(self) -> BackgroundStoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller failed: stop queued writes, keep its exception
            self.close(cancel=True)

    def _raise_finished_errors(self) -> None:
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def submit(self, names: Sequence[str], labels: torch.Tensor, codes: torch.Tensor,
               sizes: Sequence[Sequence[int]]) -> None:
        """Queue image i of a batch: ``labels[i, :h, :w]`` (uint8 class ids) and ``codes[i, :h, :w]`` (integer
        score codes 0..65535, any integer dtype) with ``(h, w) = sizes[i]``, under ``names[i]``. Tensors on a
        CUDA device are copied to the host asynchronously; the caller's thread does not wait."""
        if self._closed:
            raise RuntimeError("BackgroundStoreWriter is closed")
        self._raise_finished_errors()
        ready = None
        if labels.device.type == "cuda" or codes.device.type == "cuda":
            labels = labels.to("cpu", non_blocking=True)  # pinned destination: an asynchronous copy
            codes = codes.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        for i, name in enumerate(names):
            height, width = (int(v) for v in sizes[i])
            self.store.reserve(name)  # the record of names stays in submission order
            self._slots.acquire()
            try:
                future = self._pool.submit(self._write, name, labels[i, :height, :width],
                                           codes[i, :height, :width], ready)
            except BaseException:
                self._slots.release()
                raise
            self._pending.append(future)

    def _write(self, name: str, label: torch.Tensor, code: torch.Tensor, ready: Any) -> None:
        try:
            if ready is not None:
                ready.synchronize()  # this thread waits for the copy, not the labeling loop
            self.store.write_reserved(name, label.numpy(), code.numpy().astype(np.uint16))
        finally:
            self._slots.release()

    def close(self, cancel: bool = False) -> None:
        """Wait for every queued write (``cancel``: drop the ones not started) and stop the threads; raises
        the first write error. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if cancel:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)
            return
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
