"""Reading a stream's batches for a run: steps start .. stop-1, optionally read ahead in a thread."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch

from sae.batch_items import Batch
from sae.errors import SAEDataError
from sae.training.streams import BatchStream

_DONE = object()


class prefetch:
    """The same items, produced up to `depth` ahead by a background thread; its exceptions re-raise here.

    Cache reads (memmap copies, dtype conversion) release the GIL, so they overlap the training maths.
    Use as a context manager (or call close()): it stops and joins the thread, so no reader is left
    running torch ops while the interpreter shuts down.
    """

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        self._slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name="saewb-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(error)

    def _put(self, item: Any) -> bool:
        """Block until there is room or close() was called; False when closed."""
        while not self._stop.is_set():
            try:
                self._slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._slots.get()
        if item is _DONE:
            self._slots.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_prefetch_depth() -> int:
    """2 when the machine has a core beyond torch's intra-op threads, else 0.

    Measured (benchmarks/memory_io.py): on a 2-core machine whose cores both run the step's GEMM, a
    reader thread only competes with them (9,025 vs 9,383 tokens/s); with a spare core it overlaps.
    """
    return 2 if (os.cpu_count() or 1) > torch.get_num_threads() else 0


@contextmanager
def batch_reader(
    stream: BatchStream, start: int, stop: int, depth: int | None
) -> Iterator[Iterator[tuple[int, Batch]]]:
    """(step, batch) for steps start .. stop-1 of `stream`, read `depth` ahead in a thread when depth > 0.

    depth None picks `default_prefetch_depth()`. A stream that ends early is an SAEDataError naming the
    step. Nothing past the last batch is read, and on exit the thread is joined and the stream's
    generator closed (its files released) before the caller goes on.
    """
    if depth is None:
        depth = default_prefetch_depth()
    source = stream.batches(start)
    try:
        items: Iterator[Batch] = islice(source, stop - start)
        if depth > 0:
            with prefetch(items, depth) as ahead:
                yield _numbered(ahead, start, stop)
        else:
            yield _numbered(items, start, stop)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _numbered(batches: Iterator[Batch], start: int, stop: int) -> Iterator[tuple[int, Batch]]:
    for step in range(start, stop):
        batch = next(batches, None)
        if batch is None:
            raise SAEDataError(f"the activations ran out at step {step} of {stop}.")
        yield step, batch
