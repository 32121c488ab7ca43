"""Shuffling a stream of row chunks into batches in bounded memory (a pure generator, no model needed)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def mixing_buffer(
    chunks: Iterable[torch.Tensor], batch_size: int, buffer_rows: int, generator: torch.Generator | None
) -> Iterator[torch.Tensor]:
    """Yield ``[batch_size, width]`` batches from row chunks, mixed through a buffer of ``buffer_rows`` rows.

    The buffer fills to capacity (at least two batches); from then on every batch is a swap: ``batch_size`` slots
    drawn without replacement (consecutive runs of one random permutation of the slots, drawn again when used up)
    are gathered into the batch and refilled, in one copy, with the next incoming rows. Each row is copied twice
    (chunk to buffer, buffer to batch), and nothing is permuted as a whole. When the stream ends the rows still held
    come out in random order, the last batch partial, so one pass covers every row exactly once. With
    ``generator=None`` rows keep their order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if generator is None:
        yield from _in_order(chunks, batch_size)
        return
    capacity = max(buffer_rows, 2 * batch_size)
    buffer: torch.Tensor | None = None
    stage: torch.Tensor | None = None  # incoming rows of a swap that spans chunks
    filled = staged = 0
    order, cursor = torch.empty(0, dtype=torch.long), capacity

    def swap(rows: torch.Tensor) -> torch.Tensor:
        nonlocal order, cursor
        assert buffer is not None
        if cursor + batch_size > capacity:
            order, cursor = torch.randperm(capacity, generator=generator), 0
        slots = order[cursor : cursor + batch_size]
        cursor += batch_size
        out = buffer.index_select(0, slots)
        buffer.index_copy_(0, slots, rows)
        return out

    for chunk in chunks:
        n, pos = chunk.shape[0], 0
        if n and buffer is None:
            buffer = chunk.new_empty(capacity, *chunk.shape[1:])
            stage = chunk.new_empty(batch_size, *chunk.shape[1:])
        while pos < n:
            assert buffer is not None and stage is not None
            if filled < capacity:
                take = min(capacity - filled, n - pos)
                buffer[filled : filled + take] = chunk[pos : pos + take]
                filled, pos = filled + take, pos + take
            elif staged == 0 and n - pos >= batch_size:  # a whole batch of this chunk swaps straight in
                yield swap(chunk[pos : pos + batch_size])
                pos += batch_size
            else:
                take = min(batch_size - staged, n - pos)
                stage[staged : staged + take] = chunk[pos : pos + take]
                staged, pos = staged + take, pos + take
                if staged == batch_size:
                    yield swap(stage)
                    staged = 0
    if buffer is None:
        return
    assert stage is not None
    order = torch.randperm(filled + staged, generator=generator)
    rest = buffer[:filled].index_select(0, order) if not staged else torch.cat([buffer[:filled], stage[:staged]])[order]
    for i in range(0, rest.shape[0], batch_size):
        yield rest[i : i + batch_size]


def _in_order(chunks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """The chunks' rows in order, cut into batches (the last one partial)."""
    pending: list[torch.Tensor] = []
    held = 0
    for chunk in chunks:
        if not chunk.shape[0]:
            continue
        pending.append(chunk)
        held += chunk.shape[0]
        if held >= batch_size:
            block = torch.cat(pending) if len(pending) > 1 else pending[0]
            n_out = held // batch_size * batch_size
            for i in range(0, n_out, batch_size):
                yield block[i : i + batch_size]
            pending, held = [block[n_out:]], held - n_out
    if held:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]
