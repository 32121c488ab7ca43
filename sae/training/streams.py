"""Resumable streams of equal-size training batches from a tensor, an iterable, or a cache.

Every stream yields (acts [B, d], grads [B, d] | None) by global batch index, so a resumed run
skips exactly the batches it already consumed and sees the same data order (docs/ALGORITHMS.md: exact
resume). `rechunk` is a pure generator: incoming batches of any size -> batches of exactly B.
Under data parallelism each rank's stream yields its B/W rows of every global batch; a cache
reads only its own share of the shards (`iter_batches(rank=, world_size=)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from itertools import chain, count, islice
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from sae.batch_items import Batch, split_item
from sae.devices import to_device
from sae.errors import SAEConfigError, SAEDataError


@runtime_checkable
class ActivationSource(Protocol):
    """What a cache-like source offers the trainer (activations.reader.ActivationCache is one).

    iter_batches(batch_size, shuffle=, seed=, **options) is one pass over every row as tensors
    [b, d] or (acts, grads) pairs, in any chunk sizes; the options the streams pass are buffer_rows
    (shuffle buffer) and, under data parallelism, rank= and world_size= (that rank's share only).
    """

    d_in: int
    "Width of the activation rows iter_batches yields."
    n_tokens: int
    "Rows in one pass."
    has_grads: bool
    "True when iter_batches yields (acts, grads) pairs."

    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, **options: Any) -> Iterable[Any]:
        ...


def rechunk(items: Iterable[Any], batch_size: int) -> Iterator[Batch]:
    """Concatenate/split batches into exactly `batch_size` rows; a final partial batch is dropped."""
    xs: list[Tensor] = []
    gs: list[Tensor] = []
    held = 0
    with_grads: bool | None = None
    for item in items:
        x, g = split_item(item)
        if x.dim() != 2:
            raise SAEDataError(f"activation batches must be 2-D [B, d], got shape {tuple(x.shape)}.")
        if xs and x.shape[1] != xs[0].shape[1]:
            raise SAEDataError(f"a batch has width {x.shape[1]} after batches of width {xs[0].shape[1]}.")
        if g is not None and g.shape != x.shape:
            raise SAEDataError(f"gradients have shape {tuple(g.shape)} but activations {tuple(x.shape)}.")
        if with_grads is None:
            with_grads = g is not None
        elif with_grads != (g is not None):
            raise SAEDataError("some batches carry gradients and some do not; use one kind throughout.")
        xs.append(x)
        if g is not None:
            gs.append(g)
        held += x.shape[0]
        while held >= batch_size:
            x_all = torch.cat(xs) if len(xs) > 1 else xs[0]
            g_all = (torch.cat(gs) if len(gs) > 1 else gs[0]) if gs else None
            yield x_all[:batch_size], None if g_all is None else g_all[:batch_size]
            xs = [x_all[batch_size:]]
            gs = [] if g_all is None else [g_all[batch_size:]]
            held -= batch_size


def epoch_seed(seed: int, epoch: int) -> int:
    """Distinct shuffling seed per (run seed, pass) pair."""
    return seed * 1_000_003 + epoch


class BatchStream:
    """Batches by global index; `reiterable` streams can be reopened, one-shot ones only skipped."""

    d_in: int
    has_grads: bool
    tokens_per_pass: int | None
    reiterable: bool = True
    rank_local: bool = False
    "True when the stream already yields only this rank's rows (a cache read by rank)."

    def batches(self, start: int = 0) -> Iterator[Batch]:
        raise NotImplementedError

    def peek(self, n: int) -> list[Batch]:
        """The first n batches, without consuming them from a later `batches(0)`."""
        return list(islice(self.batches(0), n))


class TensorStream(BatchStream):
    """Shuffled (seeded, reshuffled each pass) batches of an in-memory tensor."""

    def __init__(self, acts: Tensor, grads: Tensor | None, batch_size: int, shuffle: bool, seed: int) -> None:
        if acts.dim() != 2:
            raise SAEDataError(f"activations must be a 2-D tensor [N, d], got shape {tuple(acts.shape)}.")
        if grads is not None and grads.shape != acts.shape:
            raise SAEDataError(f"grads must have the activations' shape {tuple(acts.shape)}, got {tuple(grads.shape)}.")
        if acts.shape[0] < batch_size:
            raise SAEConfigError(f"batch_size={batch_size} is larger than the {acts.shape[0]} activation rows given.")
        self.acts, self.grads = acts, grads
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.d_in, self.has_grads = acts.shape[1], grads is not None
        self.per_pass = acts.shape[0] // batch_size
        self.tokens_per_pass = self.per_pass * batch_size

    def _order(self, epoch: int) -> Tensor:
        n = self.acts.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))

    def batches(self, start: int = 0) -> Iterator[Batch]:
        epoch, order = -1, torch.empty(0, dtype=torch.int64)
        for index in count(start):
            e, i = divmod(index, self.per_pass)
            if e != epoch:
                epoch, order = e, self._order(e)
            rows = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.acts[rows], None if self.grads is None else self.grads[rows]


class PassStream(BatchStream):
    """Re-iterable source read pass after pass: a list of batches, or a cache's `iter_batches`."""

    def __init__(
        self,
        make_pass: Callable[[int], Iterable[Any]],
        batch_size: int,
        tokens_per_pass: int | None,
        shape: tuple[int, bool] | None = None,
    ) -> None:
        """`shape` = (d_in, has_grads) when known (a cache says so); otherwise read from the first batch."""
        self.make_pass, self.batch_size, self.tokens_per_pass = make_pass, batch_size, tokens_per_pass
        if shape is None:
            first = next(iter(make_pass(0)), None)
            if first is None:
                raise SAEDataError("the activations iterable is empty.")
            x, g = split_item(first)
            shape = (x.shape[-1], g is not None)
        self.d_in, self.has_grads = shape

    def batches(self, start: int = 0) -> Iterator[Batch]:
        index = 0
        for epoch in count():
            produced = 0
            for batch in rechunk(self.make_pass(epoch), self.batch_size):
                produced += 1
                if index >= start:
                    yield batch
                index += 1
            if produced == 0:
                raise SAEDataError(f"one pass over the data holds fewer rows than batch_size={self.batch_size}.")


class OneShotStream(BatchStream):
    """A plain iterator (e.g. a generator): read once; peeked batches are replayed from memory."""

    reiterable = False

    def __init__(self, iterator: Iterator[Any], batch_size: int) -> None:
        self._rest = rechunk(iterator, batch_size)
        self._buffer: list[Batch] = []
        self._opened = False
        self.tokens_per_pass = None
        first = self.peek(1)
        if not first:
            raise SAEDataError(f"the activations iterator yields fewer rows than batch_size={batch_size}.")
        self.d_in, self.has_grads = first[0][0].shape[1], first[0][1] is not None

    def peek(self, n: int) -> list[Batch]:
        self._buffer.extend(islice(self._rest, max(0, n - len(self._buffer))))
        return self._buffer[:n]

    def batches(self, start: int = 0) -> Iterator[Batch]:
        if self._opened:
            raise SAEConfigError("a one-shot iterator can be read only once; pass a list, tensor or cache to reuse it.")
        self._opened = True
        replay, self._buffer = self._buffer, []  # what peek() consumed comes first
        yield from islice(chain(replay, self._rest), start, None)


class RankSliceStream(BatchStream):
    """Rank r's rows [r*b, (r+1)*b) of every global batch of another stream (b = B / W)."""

    def __init__(self, stream: BatchStream, rank: int, world_size: int) -> None:
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.d_in, self.has_grads, self.tokens_per_pass = stream.d_in, stream.has_grads, stream.tokens_per_pass
        self.reiterable = stream.reiterable

    def _slice(self, batch: Batch) -> Batch:
        x, g = batch
        b = x.shape[0] // self.world_size
        rows = slice(self.rank * b, (self.rank + 1) * b)
        return x[rows], None if g is None else g[rows]

    def batches(self, start: int = 0) -> Iterator[Batch]:
        return map(self._slice, self.stream.batches(start))

    def peek(self, n: int) -> list[Batch]:
        return [self._slice(batch) for batch in self.stream.peek(n)]


class DeviceStream(BatchStream):
    """Another stream's batches moved to a device (CUDA: through pinned memory, non-blocking, so the copy of
    batch i+1 overlaps step i when a prefetch thread reads this stream)."""

    def __init__(self, stream: BatchStream, device: torch.device) -> None:
        self.stream, self.device = stream, device
        self.d_in, self.has_grads, self.tokens_per_pass = stream.d_in, stream.has_grads, stream.tokens_per_pass
        self.reiterable, self.rank_local = stream.reiterable, stream.rank_local

    def _move(self, batch: Batch) -> Batch:
        return tuple(to_device(t, self.device) for t in batch)  # type: ignore[return-value]

    def batches(self, start: int = 0) -> Iterator[Batch]:
        for batch in self.stream.batches(start):
            yield self._move(batch)

    def peek(self, n: int) -> list[Batch]:
        return [self._move(batch) for batch in self.stream.peek(n)]


def make_stream(
    activations: Any,
    grads: Tensor | None,
    batch_size: int,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    buffer_rows: int | None = None,
) -> BatchStream:
    """Wrap what the user passed (tensor, iterable, or cache object) as a resumable stream.

    batch_size is the global batch; with world_size W > 1 the stream yields rank `rank`'s
    batch_size / W rows of each global batch. buffer_rows: a cache's shuffle buffer (its default if None).
    """
    stream = _make_global_stream(activations, grads, batch_size, shuffle, seed, rank, world_size, buffer_rows)
    if world_size > 1 and not stream.rank_local:
        stream = RankSliceStream(stream, rank, world_size)
    return stream


def _make_global_stream(
    activations: Any, grads: Tensor | None, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int,
    buffer_rows: int | None,
) -> BatchStream:
    if isinstance(activations, Tensor):
        return TensorStream(activations, grads, batch_size, shuffle, seed)
    if grads is not None:
        raise SAEConfigError("grads= goes with an activations tensor; iterables yield (acts, grads) pairs instead.")
    if isinstance(activations, ActivationSource):
        return source_stream(activations, batch_size, shuffle, seed, rank, world_size, buffer_rows)
    if isinstance(activations, Iterator):
        return OneShotStream(activations, batch_size)
    if isinstance(activations, Iterable):
        tokens = None
        if isinstance(activations, Sized):
            rows = sum(split_item(item)[0].shape[0] for item in activations)
            tokens = (rows // batch_size) * batch_size
        return PassStream(lambda epoch: activations, batch_size, tokens)
    raise SAEConfigError(
        f"activations must be a tensor [N, d], an iterable of batches, or a cache directory path; "
        f"got {type(activations).__name__}."
    )


def source_stream(
    source: ActivationSource, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
    buffer_rows: int | None = None,
) -> PassStream:
    """Pass after pass of `source.iter_batches`, reseeded each pass; under W > 1 ranks, this rank's share only."""
    local = batch_size // world_size
    sharded = world_size > 1
    options: dict[str, Any] = {} if buffer_rows is None else {"buffer_rows": buffer_rows}
    if sharded:  # this rank reads only its own share of the cache
        options.update(rank=rank, world_size=world_size)

    def read_pass(epoch: int) -> Iterable[Any]:
        return source.iter_batches(local, shuffle=shuffle, seed=epoch_seed(seed, epoch), **options)

    n_tokens = int(source.n_tokens)
    if n_tokens < batch_size:  # the tensor stream says the same for tensors
        raise SAEConfigError(
            f"batch_size={batch_size} is larger than the {n_tokens} rows of the activation cache; "
            "lower --batch-size or cache more tokens."
        )
    tokens = (n_tokens // batch_size) * batch_size
    stream = PassStream(read_pass, local, tokens, shape=(int(source.d_in), bool(source.has_grads)))
    stream.rank_local = sharded
    return stream
