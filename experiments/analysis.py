"""Feature analysis for the dashboard: stream an activation cache through an SAE into a SQLite store.

The store is one ``store.sqlite`` file per folder. SQLite because it is in the standard library, needs no
server, answers an indexed ``(sae, feature)`` lookup in about a millisecond, keeps several SAEs side by side
in one file and lets many readers (Streamlit sessions) open it at once.

The cache is read once, in order, in bounded memory (O(F * (top_n + 49 * samples) * window), never
O(rows * F)). Each batch is analysed once the `window` rows after it have been encoded, so that every row's
±window latents are at hand; from it we keep

1. per-feature counts, sums, maxima, a histogram over shared log-spaced bins and the running top-N rows;
2. per feature and per fine histogram bin a uniform reservoir (the rows with the largest seeded hash keys);
   after the pass the quantile buckets' edges are read off the histogram, they fall on fine-bin edges, so
   the largest keys over a bucket's bins are exactly a uniform sample of that bucket;
3. for each row that enters a top-N list or a reservoir, that feature's activations over the row's window
   (rows dropped later are simply forgotten).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from activations.storage import default_file_mode
from experiments.attention import head_attribution, one_head_features

STORE_FILE = "store.sqlite"
DEFAULT_STORE = "runs/demo/store"
DENSE_THRESHOLD = 0.1  # as sae.metrics.dense_fraction
HIST_EDGES = np.logspace(-4, 4, 49)  # 6 bins a decade, shared by every feature and every SAE
N_LOGIT_TOKENS = 10
N_NEIGHBOURS = 10

STORE_SCHEMA_VERSION = 1
"""Written as PRAGMA user_version; a store from a newer schema is refused (stores from before it read 0)."""
STORE_TABLES = ("saes", "features", "training_log")
SCHEMA = """
CREATE TABLE IF NOT EXISTS saes (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, path TEXT, arch TEXT, n_features INTEGER, k INTEGER,
    d_in INTEGER, hook TEXT, model TEXT, n_rows INTEGER, metrics TEXT, hist_edges TEXT
);
CREATE TABLE IF NOT EXISTS features (
    sae_id INTEGER NOT NULL, feature INTEGER NOT NULL, density REAL, mean_act REAL, max_act REAL,
    histogram TEXT, top_contexts TEXT, quantile_samples TEXT, logit_top TEXT, logit_bottom TEXT,
    neighbours TEXT, top_tokens TEXT, PRIMARY KEY (sae_id, feature)
);
CREATE TABLE IF NOT EXISTS training_log (sae_id INTEGER NOT NULL, step INTEGER, dead_frac REAL, l0 REAL, fvu REAL);
CREATE TABLE IF NOT EXISTS head_attribution (sae_id INTEGER NOT NULL, feature INTEGER NOT NULL, shares TEXT,
    PRIMARY KEY (sae_id, feature));
CREATE INDEX IF NOT EXISTS training_log_sae ON training_log (sae_id, step);
"""


class AnalysisError(ValueError):
    """A bad input to `saewb analyze` (missing folder, width mismatch, unknown hook); one line, no traceback."""


# ---- streaming statistics ------------------------------------------------------------------------


def _encoded(sae_model, cache, hook: str, batch_size: int, progress: bool) -> Iterator[torch.Tensor]:
    """Latents [B, F] in cache order, with the SAE's per-token inference rule, behind the one progress bar."""
    with tqdm(total=cache.n_tokens, desc="analyze", unit="tok", disable=not progress) as bar:
        for x in cache.iter_batches(batch_size, shuffle=False, hook=hook, with_grads=False):
            with torch.no_grad():
                z = sae_model.encode(x)
            yield z
            bar.update(x.shape[0])


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


# ---- decoder geometry ------------------------------------------------------------------------------


def logit_lens(w_dec: torch.Tensor, hook: str, model) -> torch.Tensor | None:
    """[F, d_model] residual-stream direction of each decoder row (times W_U: its direct effect on the logits),
    or None for a hook the logit lens does not apply to.

    Residual-stream-like hooks map through W_U; an attention hook_z row is split into heads, mapped through
    that layer's W_O and summed (the heads' contribution to the residual stream), then through W_U.
    """
    if model is None:
        return None
    d_model = model.cfg.d_model
    match = re.fullmatch(r"blocks\.(\d+)\.attn\.hook_z", hook)
    if match:
        w_o = model.W_O[int(match.group(1))]  # [heads, d_head, d_model]
        if w_dec.shape[1] != w_o.shape[0] * w_o.shape[1]:
            raise AnalysisError(f"SAE d_in={w_dec.shape[1]} does not match {hook} width "
                                f"{w_o.shape[0] * w_o.shape[1]} of the model")
        resid = torch.einsum("fhd,hdm->fm", w_dec.view(w_dec.shape[0], *w_o.shape[:2]), w_o)
    elif re.fullmatch(r"(blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)|hook_embed)", hook):
        if w_dec.shape[1] != d_model:
            raise AnalysisError(f"SAE d_in={w_dec.shape[1]} does not match the model's d_model={d_model} at {hook}")
        resid = w_dec
    else:
        return None
    return resid


def logit_extremes(resid: torch.Tensor, w_u: torch.Tensor, n: int, chunk: int = 512):
    """Top and bottom `n` (token, logit) per feature, in chunks so [F, vocab] never exists at once."""
    tops, bottoms = [], []
    for lo in range(0, resid.shape[0], chunk):
        logits = resid[lo : lo + chunk] @ w_u
        tops.append(torch.topk(logits, n, dim=1))
        bottoms.append(torch.topk(logits, n, dim=1, largest=False))
    cat = lambda parts: (torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]))  # noqa: E731
    return cat(tops), cat(bottoms)


def nearest_by_cosine(w_dec: torch.Tensor, n: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, n] indices and cosines of each decoder row's nearest other rows, computed in row chunks."""
    unit = torch.nn.functional.normalize(w_dec, dim=1)
    n = min(n, unit.shape[0] - 1)
    idx, cos = [], []
    for lo in range(0, unit.shape[0], chunk):
        sims = unit[lo : lo + chunk] @ unit.T
        sims[torch.arange(sims.shape[0]), torch.arange(lo, lo + sims.shape[0])] = -2.0
        top = torch.topk(sims, n, dim=1)
        idx.append(top.indices)
        cos.append(top.values)
    return torch.cat(idx), torch.cat(cos)


# ---- the whole analysis ------------------------------------------------------------------------------


def _load_inputs(sae_dir, activations_dir, hook: str | None):
    import sae as sae_pkg
    from activations.cache import CacheError
    from activations.reader import load_cache

    sae_dir = Path(sae_dir)
    if not sae_dir.is_dir():
        raise AnalysisError(f"SAE folder {sae_dir} does not exist (train one with `saewb train --out {sae_dir}`)")
    try:
        sae_model = sae_pkg.load(sae_dir).eval()
        cache = load_cache(activations_dir)
    except (CacheError, sae_pkg.SAEError, FileNotFoundError) as exc:
        raise AnalysisError(str(exc)) from exc
    if hook is not None and hook not in cache.hooks:
        raise AnalysisError(f"hook {hook!r} is not in cache {activations_dir}; it holds {cache.hooks}")
    hook = hook or sae_model.metadata.get("hook_name")
    if hook not in cache.hooks:
        if len(cache.hooks) > 1:
            raise AnalysisError(f"SAE hook {hook!r} is not in cache {activations_dir}; pick one of {cache.hooks} "
                                "with --hook")
        hook = cache.hooks[0]  # a single-hook cache: the SAE was trained on it whatever its metadata says
    width = int(cache.manifest["d_in"][hook])
    if width != sae_model.cfg.d_in:
        raise AnalysisError(
            f"cache {activations_dir} has width {width} at {hook} but SAE {sae_dir} has d_in={sae_model.cfg.d_in}"
        )
    return sae_model, cache, hook


def _resolve_model(model, cache):
    """None, a loaded model, or one loaded by name; "auto" (the cache's model) quietly becomes None when that
    model cannot be loaded (a synthetic cache), while an explicit name that fails is the user's error."""
    if model is None or not isinstance(model, str):
        return model
    from activations.models import load_model

    try:
        return load_model(cache.manifest["model"] if model == "auto" else model)
    except Exception as exc:  # noqa: BLE001 - transformer_lens/HF raise many kinds for an unknown name
        if model == "auto":
            print(f"saewb analyze: no logit lens or token strings: cannot load {cache.manifest['model']!r} ({exc})")
            return None
        raise AnalysisError(f"cannot load model {model!r}: {exc}") from exc


@dataclass
class Windows:
    """Token windows around M cache rows: ids and rows [M, 2w+1] (-1: no row, e.g. BOS), which slots exist."""

    ids: np.ndarray
    rows: np.ndarray
    valid: np.ndarray
    centre: np.ndarray  # [M] index of the chosen row among its window's valid slots


def context_windows(cache, chosen_rows: np.ndarray, window: int) -> Windows:
    """The windows of `window` tokens each side of each chosen row, clipped at its context's ends."""
    tokens = np.asarray(cache.tokens)
    row_of = np.full(tokens.shape, -1, dtype=np.int64)
    row_of[cache.row_index[:, 0], cache.row_index[:, 1]] = np.arange(cache.n_tokens)
    ctx, pos = cache.row_index[chosen_rows, 0], cache.row_index[chosen_rows, 1]
    positions = pos[:, None] + np.arange(-window, window + 1)[None, :]
    valid = (positions >= 0) & (positions < tokens.shape[1])
    clipped = positions.clip(0, tokens.shape[1] - 1)
    rows = np.where(valid, row_of[ctx[:, None], clipped], -1)
    return Windows(tokens[ctx[:, None], clipped], rows, valid, np.minimum(pos, window))


def _training_log(sae_dir: Path) -> list[tuple[int, float | None, float | None, float | None]]:
    path = sae_dir / "train_log.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "step" in rec:
                out.append((int(rec["step"]), rec.get("dead_frac"), rec.get("l0"), rec.get("fvu")))
    return out


def _metrics(sae_dir: Path) -> dict[str, Any]:
    """Scalar metrics of eval.json (the per-feature lists stay out of the summary row); a g-SAE's plain-TopK
    numbers come along as plain_topk_<key>, so the dashboard can show both rules."""
    path = sae_dir / "eval.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    scalar = (int, float, str, bool)
    out = {k: v for k, v in data.items() if isinstance(v, scalar)}
    out.update({f"plain_topk_{k}": v for k, v in (data.get("plain_topk") or {}).items() if isinstance(v, scalar)})
    return out


def analyze(
    sae_dir: str | Path,
    activations_dir: str | Path,
    model=None,
    out: str | Path = DEFAULT_STORE,
    name: str | None = None,
    hook: str | None = None,
    top_n: int = 20,
    window: int = 8,
    n_quantiles: int = 4,
    samples_per_quantile: int = 3,
    batch_size: int = 4096,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Analyse one SAE on a cache and add (or replace) it in the store at `out`; returns the store file.

    model: None (no logit lens, and contexts show token ids), a name for `activations.load_model`, "auto"
    (the cache's own model, None if it cannot be loaded), or a loaded HookedTransformer.
    """
    sae_dir = Path(sae_dir)
    sae_model, cache, hook = _load_inputs(sae_dir, activations_dir, hook)
    lm = _resolve_model(model, cache)
    n_features = sae_model.cfg.n_features
    w_dec = sae_model.W_dec.detach().float()
    resid = logit_lens(w_dec, hook, lm)  # before streaming: a width mismatch should fail fast

    if window < 0 or batch_size < 1 or n_quantiles < 1:
        raise AnalysisError(f"need window >= 0, batch size >= 1 and n_quantiles >= 1, got window={window}, "
                            f"batch_size={batch_size}, n_quantiles={n_quantiles}")
    blocks = with_margins(_encoded(sae_model, cache, hook, batch_size, progress), window)
    stats, reservoirs = stream_features(blocks, n_features, top_n, window, samples_per_quantile, seed)
    samples = reservoirs.samples(quantile_edges(stats.histogram, n_quantiles), samples_per_quantile)

    has_top = stats.top_rows >= 0
    chosen_feats = has_top.nonzero()[:, 0].tolist()
    chosen_rows = stats.top_rows[has_top].tolist()
    sample_idx = []
    for f, buckets in samples.items():
        for bucket in buckets:
            chosen_feats += [f] * len(bucket)
            chosen_rows += [r for r, _, _ in bucket]
            sample_idx += [i for _, _, i in bucket]
    recorded = torch.cat([stats.top_windows[has_top], reservoirs.windows[sample_idx]]).numpy()  # slot j: row r-w+j
    rows = np.array(chosen_rows, dtype=np.int64)
    win = context_windows(cache, rows, window)
    has_row = win.rows >= 0
    # a window's rows are the non-BOS positions of one context within ±w, hence within ±w rows of its centre
    slot = np.where(has_row, win.rows - rows[:, None] + window, 0)
    acts = np.where(has_row, np.take_along_axis(recorded, slot, axis=1), 0.0)
    acts = np.round(acts.astype(np.float64), 5)
    tokenizer = getattr(lm, "tokenizer", None)
    unique_ids, inverse = np.unique(win.ids, return_inverse=True)
    strings = np.array([f"<{t}>" if tokenizer is None else tokenizer.decode([int(t)]) for t in unique_ids.tolist()],
                       dtype=object)
    token_strings = strings[inverse.reshape(win.ids.shape)]
    where = {(f, r): i for i, (f, r) in enumerate(zip(chosen_feats, chosen_rows, strict=True))}

    def text(token: int) -> str:
        return f"<{token}>" if tokenizer is None else tokenizer.decode([token])

    def context(f: int, r: int, value: float) -> dict[str, Any]:
        i = where[(f, r)]
        keep = win.valid[i]
        return {"row": r, "value": round(value, 5), "centre": int(win.centre[i]),
                "tokens": token_strings[i][keep].tolist(), "acts": acts[i][keep].tolist()}

    neighbour_idx, neighbour_cos = nearest_by_cosine(w_dec, N_NEIGHBOURS)
    head_shares = None  # attention-output SAEs (Kissane et al.): each head's share of each decoder row
    if hook.endswith("attn.hook_z") and lm is not None:
        head_shares = head_attribution(w_dec, int(lm.cfg.n_heads))
    if resid is not None:
        (top_ids, top_logits), (bottom_ids, bottom_logits) = logit_extremes(
            resid, lm.W_U.detach().float(), N_LOGIT_TOKENS)
    n_rows = cache.n_tokens
    density = (stats.count.double() / max(n_rows, 1)).tolist()
    mean_act = (stats.total / stats.count.clamp(min=1)).tolist()
    feature_rows = []
    for f in range(n_features):
        tops = [context(f, r, v) for v, r in zip(stats.top_vals[f].tolist(), stats.top_rows[f].tolist(), strict=True)
                if r >= 0]
        quantiles = [[context(f, r, v) for r, v, _ in bucket] for bucket in samples.get(f, [])]
        logit_top = logit_bottom = None
        if resid is not None:
            logit_top = [[text(t), round(v, 4)] for t, v in zip(top_ids[f].tolist(), top_logits[f].tolist(),
                                                                 strict=True)]
            logit_bottom = [[text(t), round(v, 4)] for t, v in zip(bottom_ids[f].tolist(),
                                                                    bottom_logits[f].tolist(), strict=True)]
        top_tokens = " ".join(sorted({c["tokens"][c["centre"]].strip() for c in tops}))
        if logit_top:
            top_tokens += " | " + " ".join(t.strip() for t, _ in logit_top)
        neighbours = [[i, round(c, 4)] for i, c in zip(neighbour_idx[f].tolist(), neighbour_cos[f].tolist(),
                                                       strict=True)]
        feature_rows.append((
            f, density[f], mean_act[f], float(stats.max_act[f]), json.dumps(stats.histogram[f].tolist()),
            json.dumps(tops), json.dumps(quantiles), json.dumps(logit_top), json.dumps(logit_bottom),
            json.dumps(neighbours), top_tokens,
        ))
    cfg = sae_model.cfg
    metrics = _metrics(sae_dir)
    if head_shares is not None:
        metrics.update({"n_heads": head_shares.shape[1], "one_head_features": one_head_features(head_shares)})
    metrics["analysis_cache"] = str(Path(activations_dir).resolve())  # the rows behind the top contexts
    metrics.update({"analysis_dead_frac": float((stats.count == 0).double().mean()),
                    "analysis_dense_frac": float((stats.count.double() / max(n_rows, 1) > DENSE_THRESHOLD)
                                                 .double().mean())})
    summary = {
        "name": name or sae_dir.name, "path": str(sae_dir.resolve()), "arch": cfg.arch, "n_features": n_features,
        "k": cfg.k, "d_in": cfg.d_in, "hook": hook,
        "model": sae_model.metadata.get("model_name") or cache.manifest["model"],
        "n_rows": n_rows, "metrics": json.dumps(metrics), "hist_edges": json.dumps(HIST_EDGES.tolist()),
    }
    heads = [] if head_shares is None else [(f, json.dumps(np.round(head_shares[f].numpy(), 5).tolist()))
                                            for f in range(n_features)]
    return write_sae(Path(out), summary, feature_rows, _training_log(sae_dir), heads)


def write_sae(out: Path, summary: dict[str, Any], feature_rows: list[tuple], log: list[tuple],
              head_rows: list[tuple] | None = None) -> Path:
    """Add or replace one SAE in the store, atomically: edit a copy, then os.replace it over the original."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / STORE_FILE
    fd, tmp_name = tempfile.mkstemp(prefix=".store-", suffix=".sqlite", dir=out)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if target.exists():
            AnalysisStore(target).con.close()  # a damaged or newer store is refused, never overwritten
            with sqlite3.connect(target) as src, sqlite3.connect(tmp) as dst:
                src.backup(dst)
        con = sqlite3.connect(tmp)
        with con:
            con.executescript(SCHEMA)
            con.execute(f"PRAGMA user_version = {STORE_SCHEMA_VERSION}")
            old = con.execute("SELECT id FROM saes WHERE name = ?", (summary["name"],)).fetchone()
            if old:
                tables = (("features", "sae_id"), ("training_log", "sae_id"), ("head_attribution", "sae_id"),
                          ("saes", "id"))
                for table, column in tables:
                    con.execute(f"DELETE FROM {table} WHERE {column} = ?", (old[0],))
            columns = ", ".join(summary)
            cur = con.execute(f"INSERT INTO saes ({columns}) VALUES ({', '.join('?' * len(summary))})",
                              tuple(summary.values()))
            sae_id = cur.lastrowid
            con.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [(sae_id, *row) for row in feature_rows])
            con.executemany("INSERT INTO training_log VALUES (?, ?, ?, ?, ?)", [(sae_id, *row) for row in log])
            con.executemany("INSERT INTO head_attribution VALUES (?, ?, ?)",
                            [(sae_id, *row) for row in head_rows or []])
        con.close()
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would hide the store from another user's dashboard
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# ---- reading the store -----------------------------------------------------------------------------


class StoreError(ValueError):
    """No store at the given path, or an SAE / feature that is not in it."""


class AnalysisStore:
    """Read-only access to a store folder (or its store.sqlite); safe to share across Streamlit sessions."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / STORE_FILE if path.is_dir() or path.suffix != ".sqlite" else path
        if not self.path.exists():
            raise StoreError(
                f"no analysis store at {path}: build one with `saewb analyze --sae RUN --activations CACHE "
                f"--out {path if path.suffix != '.sqlite' else path.parent}` (or `make demo`)"
            )
        self.con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        self.con.row_factory = sqlite3.Row
        self._check()

    def _check(self) -> None:
        """A damaged file, an empty one, or a store of a newer schema: one StoreError with the way to rebuild."""
        rebuild = (f"delete it and rebuild it with `saewb analyze --sae RUN --activations CACHE "
                   f"--out {self.path.parent}`")
        try:
            version = int(self.con.execute("PRAGMA user_version").fetchone()[0])
            tables = {r[0] for r in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a readable analysis store ({exc}); {rebuild}") from None
        if version > STORE_SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer sae-workbench (store schema {version}; this one "
                             f"reads up to {STORE_SCHEMA_VERSION}): upgrade sae-workbench, or {rebuild}")
        missing = [t for t in STORE_TABLES if t not in tables]
        if missing:
            raise StoreError(
                f"{self.path} is empty or not an analysis store (no table {', '.join(missing)}); {rebuild}"
            )

    def saes(self) -> list[dict[str, Any]]:
        rows = self.con.execute("SELECT * FROM saes ORDER BY name").fetchall()
        return [{**dict(r), "metrics": json.loads(r["metrics"]), "hist_edges": json.loads(r["hist_edges"])}
                for r in rows]

    def sae(self, name: str) -> dict[str, Any]:
        for info in self.saes():
            if info["name"] == name:
                return info
        raise StoreError(f"SAE {name!r} is not in the store; it holds {[s['name'] for s in self.saes()]}")

    def _id(self, name: str) -> int:
        row = self.con.execute("SELECT id FROM saes WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError(f"SAE {name!r} is not in the store")
        return int(row[0])

    def head_shares(self, name: str, idx: int) -> list[float] | None:
        """Feature `idx`'s share per attention head (hook_z SAEs analysed with a model), else None."""
        tables = {r[0] for r in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "head_attribution" not in tables:  # a store from before head attribution
            return None
        row = self.con.execute("SELECT shares FROM head_attribution WHERE sae_id = ? AND feature = ?",
                               (self._id(name), int(idx))).fetchone()
        return None if row is None else json.loads(row[0])

    def feature(self, name: str, idx: int) -> dict[str, Any]:
        """One feature's card; a StoreError names the valid range when `idx` is outside it."""
        sae_id = self._id(name)
        row = self.con.execute("SELECT * FROM features WHERE sae_id = ? AND feature = ?", (sae_id, int(idx))).fetchone()
        if row is None:
            n = self.con.execute("SELECT n_features FROM saes WHERE id = ?", (sae_id,)).fetchone()[0]
            raise StoreError(f"feature {idx} is out of range: {name} has features 0..{n - 1}")
        out = dict(row)
        for key in ("histogram", "top_contexts", "quantile_samples", "logit_top", "logit_bottom", "neighbours"):
            out[key] = json.loads(out[key])
        return out

    def search(self, name: str, text: str, limit: int = 50) -> list[tuple[int, str]]:
        """Features whose top tokens or logit-lens tokens contain `text` (case-insensitive), densest first."""
        rows = self.con.execute(
            "SELECT feature, top_tokens FROM features WHERE sae_id = ? AND instr(lower(top_tokens), lower(?)) > 0 "
            "ORDER BY density DESC LIMIT ?", (self._id(name), text.strip(), limit)).fetchall()
        return [(int(r[0]), r[1]) for r in rows]

    def densities(self, name: str) -> np.ndarray:
        rows = self.con.execute("SELECT density FROM features WHERE sae_id = ? ORDER BY feature",
                                (self._id(name),)).fetchall()
        return np.array([r[0] for r in rows], dtype=np.float64)

    def dead_features(self, name: str) -> list[int]:
        rows = self.con.execute("SELECT feature FROM features WHERE sae_id = ? AND density = 0 ORDER BY feature",
                                (self._id(name),)).fetchall()
        return [int(r[0]) for r in rows]

    def training_log(self, name: str) -> list[dict[str, Any]]:
        rows = self.con.execute("SELECT step, dead_frac, l0, fvu FROM training_log WHERE sae_id = ? ORDER BY step",
                                (self._id(name),)).fetchall()
        return [dict(r) for r in rows]


# ---- CLI -------------------------------------------------------------------------------------------------


def cmd_analyze(args: argparse.Namespace) -> int:
    model = None if args.model.lower() == "none" else args.model
    path = analyze(args.sae, args.activations, model=model, out=args.out, name=args.name, hook=args.hook,
                   top_n=args.top_n, window=args.window, batch_size=args.batch_size, progress=not args.quiet)
    print(f"wrote {path}; browse it with `saewb dashboard --store {args.out}`")
    return 0


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """`saewb analyze`: build or extend the dashboard's store."""
    parser = subparsers.add_parser(
        "analyze",
        help="analyse an SAE's features on an activation cache into the dashboard's store",
        description="Stream a cache through an SAE (in order, bounded memory) and write per-feature density, "
        "mean/max activation, top-N contexts with per-token activations, quantile samples, an activation "
        "histogram, logit-lens tokens and decoder-cosine neighbours, plus the training log's dead fraction, into "
        "STORE/store.sqlite. Analysing another SAE into the same store adds it (same --name replaces it).",
    )
    parser.add_argument("--sae", required=True, help="SAE run folder (as written by `saewb train`)")
    parser.add_argument("--activations", required=True, help="activation cache folder (ideally held-out)")
    parser.add_argument("--model", default="auto", help="model for token strings and the logit lens (default: "
                        "auto, the cache's own model; 'none' skips both and shows token ids)")
    parser.add_argument("--out", default=DEFAULT_STORE, help=f"store folder (default: {DEFAULT_STORE})")
    parser.add_argument("--name", help="name of the SAE in the store (default: the SAE folder's name)")
    parser.add_argument("--hook", help="hook of a multi-hook cache (default: the SAE's hook_name)")
    parser.add_argument("--top-n", type=int, default=20, help="top activating contexts kept per feature (default 20)")
    parser.add_argument("--window", type=int, default=8, help="tokens each side of the max (default 8)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows encoded at a time (default 4096)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_analyze)
    return parser
