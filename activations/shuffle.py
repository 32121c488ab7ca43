"""Shuffling a stream of row chunks into batches in bounded memory (a pure generator, no model needed)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def mixing_buffer(
    chunks: Iterable[torch.Tensor], batch_size: int, buffer_rows: int, generator: torch.Generator | None
) -> Iterator[torch.Tensor]:
    """Yield ``[batch_size, width]`` batches from row chunks, mixed through a buffer of ``buffer_rows`` rows.

    The buffer fills to capacity, is permuted, and its first half is emitted; the kept half mixes
    with the next chunks. With ``generator=None`` rows keep their order. The last partial batch is
    yielded too, so one pass covers every row exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    capacity = max(buffer_rows, 2 * batch_size)
    pending: list[torch.Tensor] = []
    held = 0
    buffer: torch.Tensor | None = None

    def drain(keep: int) -> Iterator[torch.Tensor]:
        nonlocal buffer
        assert buffer is not None
        if generator is not None:
            buffer = buffer[torch.randperm(buffer.shape[0], generator=generator)]
        n_out = (buffer.shape[0] - keep) // batch_size * batch_size
        for i in range(0, n_out, batch_size):
            yield buffer[i : i + batch_size]
        buffer = buffer[n_out:]

    for chunk in chunks:
        pending.append(chunk)
        held += chunk.shape[0]
        if held >= capacity:
            buffer = torch.cat(([buffer] if buffer is not None else []) + pending)
            pending, held = [], buffer.shape[0]
            yield from drain(keep=capacity // 2)
            held = buffer.shape[0]
    parts = ([buffer] if buffer is not None else []) + pending
    if not parts:
        return
    buffer = torch.cat(parts)
    yield from drain(keep=0)
    if buffer.shape[0]:
        yield buffer
