"""Feature analysis for the dashboard: stream an activation cache through an SAE into a SQLite store.

The store is one ``store.sqlite`` file per folder. SQLite because it is in the standard library, needs no
server, answers an indexed ``(sae, feature)`` lookup in about a millisecond, keeps several SAEs side by side
in one file and lets many readers (Streamlit sessions) open it at once.

The cache is read in order three times, each pass in bounded memory (O(F * top_n), never O(rows * F)):

1. per-feature counts, sums, maxima, a histogram over shared log-spaced bins and the running top-N rows;
2. quantile samples: per feature and per activation-quantile bucket (edges read off the histogram) a
   uniform reservoir, kept as the entries with the largest random keys (seeded, so the store is repeatable);
3. the per-token activations of the windows around every chosen row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

STORE_FILE = "store.sqlite"
DEFAULT_STORE = "runs/demo/store"
DENSE_THRESHOLD = 0.1  # as sae.metrics.dense_fraction
HIST_EDGES = np.logspace(-4, 4, 49)  # 6 bins a decade, shared by every feature and every SAE
N_LOGIT_TOKENS = 10
N_NEIGHBOURS = 10

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
CREATE INDEX IF NOT EXISTS training_log_sae ON training_log (sae_id, step);
"""


class AnalysisError(ValueError):
    """A bad input to `saewb analyze` (missing folder, width mismatch, unknown hook); one line, no traceback."""


# ---- streaming statistics ------------------------------------------------------------------------


@dataclass
class FeatureStats:
    """What pass 1 keeps: O(F * top_n) numbers whatever the cache size."""

    count: torch.Tensor  # [F] rows with a positive activation
    total: torch.Tensor  # [F] sum of activations (float64)
    max_act: torch.Tensor  # [F]
    histogram: torch.Tensor  # [F, bins] counts of positive activations per shared log bin
    top_vals: torch.Tensor  # [F, N], descending
    top_rows: torch.Tensor  # [F, N], -1 where fewer than N positive rows exist


def _encoded(sae_model, cache, hook: str, batch_size: int, desc: str, progress: bool) -> Iterator[tuple[int, Any]]:
    """(first row, latents [B, F]) in cache order, with the SAE's per-token inference rule."""
    start = 0
    with tqdm(total=cache.n_tokens, desc=desc, unit="tok", disable=not progress) as bar:
        for x in cache.iter_batches(batch_size, shuffle=False, hook=hook, with_grads=False):
            with torch.no_grad():
                z = sae_model.encode(x)
            yield start, z
            start += x.shape[0]
            bar.update(x.shape[0])


def _bin_of(values: torch.Tensor) -> torch.Tensor:
    """Index of each positive value in the shared log bins; out-of-range values land in the end bins."""
    edges = torch.as_tensor(HIST_EDGES, dtype=values.dtype)
    return (torch.bucketize(values, edges, right=True) - 1).clamp(0, len(HIST_EDGES) - 2)


def stream_stats(batches, n_features: int, top_n: int) -> FeatureStats:
    """Pass 1: densities, means, maxima, histograms and the top-N rows by a running topk merge."""
    n_bins = len(HIST_EDGES) - 1
    count = torch.zeros(n_features, dtype=torch.int64)
    total = torch.zeros(n_features, dtype=torch.float64)
    max_act = torch.zeros(n_features)
    hist = torch.zeros(n_features * n_bins, dtype=torch.int64)
    top_vals = torch.zeros(n_features, top_n)
    top_rows = torch.full((n_features, top_n), -1, dtype=torch.int64)
    for start, z in batches:
        active = z > 0
        count += active.sum(0)
        total += z.sum(0, dtype=torch.float64)
        max_act = torch.maximum(max_act, z.max(0).values)
        rows, feats = active.nonzero(as_tuple=True)
        hist += torch.bincount(feats * n_bins + _bin_of(z[rows, feats]), minlength=n_features * n_bins)
        vals = torch.cat([top_vals, z.T], dim=1)
        ids = torch.cat([top_rows, torch.arange(start, start + z.shape[0]).expand(n_features, -1)], dim=1)
        best = torch.topk(vals, top_n, dim=1).indices
        top_vals, top_rows = vals.gather(1, best), ids.gather(1, best)
    top_rows = torch.where(top_vals > 0, top_rows, torch.full_like(top_rows, -1))
    return FeatureStats(count, total, max_act, hist.view(n_features, n_bins), top_vals, top_rows)


def quantile_edges(histogram: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """[F, n_buckets - 1] bucket edges at the histogram's quantiles (upper bin edge, so approximate)."""
    cdf = histogram.cumsum(1).double()
    frac = cdf / cdf[:, -1:].clamp(min=1)
    upper = torch.as_tensor(HIST_EDGES[1:])
    qs = torch.arange(1, n_buckets, dtype=torch.float64) / n_buckets
    idx = torch.stack([(frac < q).sum(1) for q in qs], dim=1).clamp(max=len(upper) - 1)
    return upper[idx].float()


def stream_quantile_samples(batches, edges: torch.Tensor, per_bucket: int, seed: int) -> dict[int, list]:
    """Pass 2: a uniform reservoir of `per_bucket` rows per (feature, quantile bucket), by largest random key."""
    n_buckets = edges.shape[1] + 1
    generator = torch.Generator().manual_seed(seed)
    keep = {"group": torch.empty(0, dtype=torch.int64), "key": torch.empty(0), "row": torch.empty(0, dtype=torch.int64),
            "val": torch.empty(0)}
    for start, z in batches:
        rows, feats = (z > 0).nonzero(as_tuple=True)
        vals = z[rows, feats]
        bucket = (vals.unsqueeze(1) >= edges[feats]).sum(1)
        new = {"group": feats * n_buckets + bucket, "key": torch.rand(vals.shape[0], generator=generator),
               "row": rows + start, "val": vals}
        cat = {name: torch.cat([keep[name], new[name]]) for name in keep}
        order = torch.argsort(cat["key"], descending=True, stable=True)
        order = order[torch.argsort(cat["group"][order], stable=True)]
        group = cat["group"][order]
        first = torch.searchsorted(group, group, side="left")
        rank = torch.arange(group.shape[0]) - first
        chosen = order[rank < per_bucket]
        keep = {name: cat[name][chosen] for name in cat}
    samples: dict[int, list] = {}
    order = torch.argsort(keep["val"], stable=True)
    for group, row, val in zip(keep["group"][order].tolist(), keep["row"][order].tolist(),
                               keep["val"][order].tolist(), strict=True):
        feature, bucket = divmod(group, n_buckets)
        samples.setdefault(feature, [[] for _ in range(n_buckets)])[bucket].append((row, val))
    return samples


def stream_pair_values(batches, pair_rows: torch.Tensor, pair_feats: torch.Tensor) -> torch.Tensor:
    """Pass 3: z[row, feature] for each (row, feature) pair; pairs must be sorted by row."""
    out = torch.zeros(pair_rows.shape[0])
    for start, z in batches:
        lo, hi = torch.searchsorted(pair_rows, torch.tensor([start, start + z.shape[0]])).tolist()
        if lo < hi:
            out[lo:hi] = z[pair_rows[lo:hi] - start, pair_feats[lo:hi]]
    return out


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
    """Scalar metrics of eval.json (the per-feature lists stay out of the summary row)."""
    path = sae_dir / "eval.json"
    if not path.exists():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if isinstance(v, int | float | str | bool)}


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

    def passes(desc: str):
        return _encoded(sae_model, cache, hook, batch_size, desc, progress)

    stats = stream_stats(passes("analyze 1/3 stats"), n_features, top_n)
    edges = quantile_edges(stats.histogram, n_quantiles)
    samples = stream_quantile_samples(passes("analyze 2/3 samples"), edges, samples_per_quantile, seed)

    chosen_feats = [f for f in range(n_features) for r in stats.top_rows[f].tolist() if r >= 0]
    chosen_rows = [r for f in range(n_features) for r in stats.top_rows[f].tolist() if r >= 0]
    for f, buckets in samples.items():
        for bucket in buckets:
            chosen_feats += [f] * len(bucket)
            chosen_rows += [r for r, _ in bucket]
    win = context_windows(cache, np.array(chosen_rows, dtype=np.int64), window)
    feats = np.broadcast_to(np.array(chosen_feats, dtype=np.int64)[:, None], win.rows.shape)
    has_row = win.rows >= 0
    order = np.argsort(win.rows[has_row], kind="stable")
    pair_rows = torch.from_numpy(win.rows[has_row][order].copy())
    pair_feats = torch.from_numpy(feats[has_row][order].copy())
    values = stream_pair_values(passes("analyze 3/3 contexts"), pair_rows, pair_feats).numpy()
    acts = np.zeros(win.rows.shape, dtype=np.float32)
    flat = np.flatnonzero(has_row)[order]
    acts.flat[flat] = values
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
        quantiles = [[context(f, r, v) for r, v in bucket] for bucket in samples.get(f, [])]
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
    metrics.update({"analysis_dead_frac": float((stats.count == 0).double().mean()),
                    "analysis_dense_frac": float((stats.count.double() / max(n_rows, 1) > DENSE_THRESHOLD)
                                                 .double().mean())})
    summary = {
        "name": name or sae_dir.name, "path": str(sae_dir.resolve()), "arch": cfg.arch, "n_features": n_features,
        "k": cfg.k, "d_in": cfg.d_in, "hook": hook,
        "model": sae_model.metadata.get("model_name") or cache.manifest["model"],
        "n_rows": n_rows, "metrics": json.dumps(metrics), "hist_edges": json.dumps(HIST_EDGES.tolist()),
    }
    return write_sae(Path(out), summary, feature_rows, _training_log(sae_dir))


def write_sae(out: Path, summary: dict[str, Any], feature_rows: list[tuple], log: list[tuple]) -> Path:
    """Add or replace one SAE in the store, atomically: edit a copy, then os.replace it over the original."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / STORE_FILE
    fd, tmp_name = tempfile.mkstemp(prefix=".store-", suffix=".sqlite", dir=out)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if target.exists():
            with sqlite3.connect(target) as src, sqlite3.connect(tmp) as dst:
                src.backup(dst)
        con = sqlite3.connect(tmp)
        with con:
            con.executescript(SCHEMA)
            old = con.execute("SELECT id FROM saes WHERE name = ?", (summary["name"],)).fetchone()
            if old:
                for table, column in (("features", "sae_id"), ("training_log", "sae_id"), ("saes", "id")):
                    con.execute(f"DELETE FROM {table} WHERE {column} = ?", (old[0],))
            columns = ", ".join(summary)
            cur = con.execute(f"INSERT INTO saes ({columns}) VALUES ({', '.join('?' * len(summary))})",
                              tuple(summary.values()))
            sae_id = cur.lastrowid
            con.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [(sae_id, *row) for row in feature_rows])
            con.executemany("INSERT INTO training_log VALUES (?, ?, ?, ?, ?)", [(sae_id, *row) for row in log])
        con.close()
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the store from a dashboard run by another user
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
