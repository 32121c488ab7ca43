"""Streaming per-feature statistics over a cache in one ordered pass, in bounded memory.

From each batch (once the `window` rows after it are encoded, so every row's ±window latents are at hand) we keep

1. per-feature counts, sums, maxima, a histogram over shared log-spaced bins and the running top-N rows;
2. per feature and per fine histogram bin a uniform reservoir (the rows with the largest seeded hash keys);
   after the pass the quantile buckets' edges are read off the histogram, they fall on fine-bin edges, so
   the largest keys over a bucket's bins are exactly a uniform sample of that bucket;
3. for each row that enters a top-N list or a reservoir, that feature's activations over the row's window
   (rows dropped later are simply forgotten).

Memory is O(F * (top_n + 49 * samples) * window), never O(rows * F).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

DENSE_THRESHOLD = 0.1  # as sae.metrics.dense_fraction


HIST_EDGES = np.logspace(-4, 4, 49)  # 6 bins a decade, shared by every feature and every SAE


def with_margins(batches: Iterable[torch.Tensor], margin: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, latents [margin + S + margin, F]) for consecutive segments of S rows that cover the stream.

    A segment is yielded once the `margin` rows after it have arrived, so every row's ±margin neighbours are in
    its block (zeros beyond either end of the cache); the lag holds one batch plus 2 * margin rows, and batches
    smaller than the margin are fine.
    """
    buf: torch.Tensor | None = None  # rows [done - margin, seen)
    done = 0
    for z in batches:
        buf = torch.cat([z.new_zeros(margin, z.shape[1]) if buf is None else buf, z])
        ready = buf.shape[0] - 2 * margin
        if ready > 0:
            yield done, buf
            done += ready
            buf = buf[ready:]
    if buf is not None and buf.shape[0] > margin:
        yield done, torch.cat([buf, buf.new_zeros(margin, buf.shape[1])])


def _windows(block: torch.Tensor, local_rows: torch.Tensor, feats: torch.Tensor, window: int) -> torch.Tensor:
    """[M, 2w+1] latents of feature feats[i] over rows local_rows[i] ± w of a `with_margins` block."""
    return block[local_rows[:, None] + torch.arange(2 * window + 1), feats[:, None]]


def _bin_of(values: torch.Tensor, overflow_bin: bool = False) -> torch.Tensor:
    """Index of each positive value in the shared log bins. Values below the range land in bin 0; values above
    it in the last bin, or with `overflow_bin` in a bin of their own (a quantile edge can be the top edge)."""
    edges = torch.as_tensor(HIST_EDGES, dtype=values.dtype)
    return (torch.bucketize(values, edges, right=True) - 1).clamp(0, len(HIST_EDGES) - (1 if overflow_bin else 2))


def sample_keys(rows: torch.Tensor, feats: torch.Tensor, n_features: int, seed: int) -> torch.Tensor:
    """A random int64 key per (row, feature): output number row * F + feature of SplitMix64 seeded with `seed`
    (Steele et al., 2014). A hash rather than a generator's next draws, so samples do not depend on batching."""
    index = rows.numpy().astype(np.uint64) * np.uint64(n_features) + feats.numpy().astype(np.uint64)
    x = np.uint64(seed % 2**64) + (index + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return torch.from_numpy((x >> np.uint64(1)).astype(np.int64))


def _rank_in_group(group: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, rank): entries sorted by group then descending key, and each one's rank within its group."""
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    sorted_group = group[order]
    return order, torch.arange(order.shape[0]) - torch.searchsorted(sorted_group, sorted_group, side="left")


@dataclass
class FeatureStats:
    """Per-feature numbers kept while streaming: O(F * top_n * window) whatever the cache size."""

    count: torch.Tensor  # [F] rows with a positive activation
    total: torch.Tensor  # [F] sum of activations (float64)
    max_act: torch.Tensor  # [F]
    histogram: torch.Tensor  # [F, bins] counts of positive activations per shared log bin
    top_vals: torch.Tensor  # [F, N], descending
    top_rows: torch.Tensor  # [F, N], -1 where fewer than N positive rows exist (value 0)
    top_windows: torch.Tensor  # [F, N, 2w+1] the feature's latents over rows top_rows ± w

    @classmethod
    def empty(cls, n_features: int, top_n: int, window: int) -> FeatureStats:
        return cls(torch.zeros(n_features, dtype=torch.int64), torch.zeros(n_features, dtype=torch.float64),
                   torch.zeros(n_features), torch.zeros(n_features, len(HIST_EDGES) - 1, dtype=torch.int64),
                   torch.zeros(n_features, top_n), torch.full((n_features, top_n), -1, dtype=torch.int64),
                   torch.zeros(n_features, top_n, 2 * window + 1))

    def update(self, start: int, block: torch.Tensor, window: int) -> None:
        """Add the segment of a `with_margins` block; the top-N by a running merge with the segment's rows."""
        z = block[window : block.shape[0] - window]
        n_features, top_n = self.top_vals.shape
        rows, feats = (z > 0).nonzero(as_tuple=True)  # only the active entries: [S, F] reductions cost more
        vals = z[rows, feats]
        self.count += torch.bincount(feats, minlength=n_features)
        self.total += torch.bincount(feats, weights=vals.double(), minlength=n_features)
        self.max_act.scatter_reduce_(0, feats, vals, reduce="amax")
        n_bins = self.histogram.shape[1]
        self.histogram += torch.bincount(feats * n_bins + _bin_of(vals),
                                         minlength=n_features * n_bins).view(n_features, n_bins)
        if top_n == 0:
            return
        # the top-N by (value desc, row asc), a total order, so ties go to the earliest rows whatever the batching;
        # contenders are the kept rows and the segment's rows at or above the N-th largest value of both
        seg_top = torch.topk(z, min(top_n, z.shape[0]), dim=0).values  # [n, F]
        nth = torch.topk(torch.cat([self.top_vals, seg_top.T], dim=1), top_n, dim=1).values[:, -1]
        old_f, old_n = ((self.top_vals >= nth[:, None]) & (self.top_vals > 0)).nonzero(as_tuple=True)
        sel = vals >= nth[feats]
        f = torch.cat([old_f, feats[sel]])
        v = torch.cat([self.top_vals[old_f, old_n], vals[sel]])
        r = torch.cat([self.top_rows[old_f, old_n], rows[sel] + start])
        slot = torch.cat([old_n, rows[sel]])  # the kept slot, or the row within the segment
        is_new = torch.arange(f.shape[0]) >= old_f.shape[0]
        by_row = torch.argsort(r, stable=True)
        order, rank = _rank_in_group(f[by_row], v[by_row])
        keep = rank < top_n
        pick, rank = by_row[order[keep]], rank[keep]
        f, v, r, slot, is_new = f[pick], v[pick], r[pick], slot[pick], is_new[pick]
        self.top_vals = torch.zeros_like(self.top_vals).index_put_((f, rank), v)
        self.top_rows = torch.full_like(self.top_rows, -1).index_put_((f, rank), r)
        windows = torch.zeros_like(self.top_windows)
        windows[f[~is_new], rank[~is_new]] = self.top_windows[f[~is_new], slot[~is_new]]
        windows[f[is_new], rank[is_new]] = _windows(block, slot[is_new], f[is_new], window)
        self.top_windows = windows


class BinReservoirs:
    """A uniform sample of `size` rows per (feature, fine histogram bin), as the rows with the largest keys.

    Fine bins (plus one for values above the top edge) rather than quantile buckets, whose edges are only
    known after the pass; a bucket is a union of fine bins, so its sample is drawn from theirs in `samples`.
    """

    def __init__(self, n_features: int, size: int, window: int, seed: int) -> None:
        self.n_features, self.size, self.window, self.seed = n_features, size, window, seed
        self.n_bins = len(HIST_EDGES)  # 48 histogram bins and the overflow bin
        # the smallest kept key of each full reservoir (-1 while one has room): only larger keys can enter
        self.threshold = torch.full((n_features * self.n_bins,), -1, dtype=torch.int64)
        self.group = torch.empty(0, dtype=torch.int64)
        self.key = torch.empty(0, dtype=torch.int64)
        self.row = torch.empty(0, dtype=torch.int64)
        self.val = torch.empty(0)
        self.windows = torch.empty(0, 2 * window + 1)

    def update(self, start: int, block: torch.Tensor) -> None:
        w = self.window
        z = block[w : block.shape[0] - w]
        rows, feats = (z > 0).nonzero(as_tuple=True)
        vals = z[rows, feats]
        group = feats * self.n_bins + _bin_of(vals, overflow_bin=True)
        key = sample_keys(rows + start, feats, self.n_features, self.seed)
        enter = key > self.threshold[group]
        if self.size == 0 or not enter.any():
            return
        rows, feats, vals, group, key = rows[enter], feats[enter], vals[enter], group[enter], key[enter]
        touched = torch.zeros_like(self.threshold, dtype=torch.bool)
        touched[group] = True
        rerank = touched[self.group]
        n_old = int(rerank.sum())
        cand_group = torch.cat([self.group[rerank], group])
        cand_key = torch.cat([self.key[rerank], key])
        order, rank = _rank_in_group(cand_group, cand_key)
        chosen = order[rank < self.size]
        old, new = chosen[chosen < n_old], chosen[chosen >= n_old] - n_old
        stay = ~rerank
        self.group = torch.cat([self.group[stay], self.group[rerank][old], group[new]])
        self.key = torch.cat([self.key[stay], self.key[rerank][old], key[new]])
        self.row = torch.cat([self.row[stay], self.row[rerank][old], rows[new] + start])
        self.val = torch.cat([self.val[stay], self.val[rerank][old], vals[new]])
        self.windows = torch.cat([self.windows[stay], self.windows[rerank][old],
                                  _windows(block, rows[new], feats[new], w)])
        full = order[rank == self.size - 1]
        self.threshold[cand_group[full]] = cand_key[full]

    def samples(self, edges: torch.Tensor, per_bucket: int) -> dict[int, list[list[tuple[int, float, int]]]]:
        """feature -> per quantile bucket (edges [F, n_buckets - 1]) its samples by value: (row, value, index of
        the row's window in self.windows).

        A sample of `per_bucket` rows per bucket: the largest keys among its fine bins' reservoirs, which hold
        every row of the bucket's top keys since each fine bin lies inside one bucket (`quantile_edges`).
        """
        n_buckets = edges.shape[1] + 1
        feats = self.group // self.n_bins
        bucket = (self.val.unsqueeze(1) >= edges[feats]).sum(1)
        order, rank = _rank_in_group(feats * n_buckets + bucket, self.key)
        chosen = order[rank < per_bucket]
        chosen = chosen[torch.argsort(self.val[chosen], stable=True)]
        out: dict[int, list] = {}
        for i, f, b, row, val in zip(chosen.tolist(), feats[chosen].tolist(), bucket[chosen].tolist(),
                                     self.row[chosen].tolist(), self.val[chosen].tolist(), strict=True):
            out.setdefault(f, [[] for _ in range(n_buckets)])[b].append((row, val, i))
        return out


def quantile_edges(histogram: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """[F, n_buckets - 1] bucket edges at the histogram's quantiles (upper bin edge, so approximate).

    Every edge is a fine-bin edge HIST_EDGES[1..48], so `value >= edge` never splits a fine bin of `_bin_of`
    (with its overflow bin): what lets `BinReservoirs` sample buckets whose edges are known only at the end.
    """
    cdf = histogram.cumsum(1).double()
    frac = cdf / cdf[:, -1:].clamp(min=1)
    upper = torch.as_tensor(HIST_EDGES[1:])
    qs = torch.arange(1, n_buckets, dtype=torch.float64) / n_buckets
    if qs.numel() == 0:  # one bucket: no edges
        return torch.empty(histogram.shape[0], 0)
    idx = torch.stack([(frac < q).sum(1) for q in qs], dim=1).clamp(max=len(upper) - 1)
    return upper[idx].float()


def stream_features(blocks: Iterable[tuple[int, torch.Tensor]], n_features: int, top_n: int, window: int,
                    per_bucket: int, seed: int) -> tuple[FeatureStats, BinReservoirs]:
    """The single pass over `with_margins(latents, window)` blocks."""
    stats = FeatureStats.empty(n_features, top_n, window)
    reservoirs = BinReservoirs(n_features, per_bucket, window, seed)
    for start, block in blocks:
        stats.update(start, block, window)
        reservoirs.update(start, block)
    return stats, reservoirs
