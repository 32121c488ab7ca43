"""`analyze()`: stream an activation cache through an SAE into the store (statistics, geometry, head attribution)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import sae as sae_pkg
from activations.format import CacheError
from activations.models import load_model
from activations.reader import load_cache
from experiments.analysis.errors import AnalysisError
from experiments.analysis.geometry import N_LOGIT_TOKENS, N_NEIGHBOURS, logit_extremes, logit_lens, nearest_by_cosine
from experiments.analysis.stats import DENSE_THRESHOLD, HIST_EDGES, quantile_edges, stream_features, with_margins
from experiments.analysis.store import DEFAULT_STORE, write_sae
from experiments.attention import head_attribution, one_head_features
from sae.devices import resolve_device, to_device
from sae.hub import download_sae_folder, hub_name_of, parse_hub_name
from sae.pretrained import is_pretrained_name, pretrained_folder


def _encoded(sae_model, cache, hook: str, batch_size: int, progress: bool,
             device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """Latents [B, F] in cache order, with the SAE's per-token inference rule, behind the one progress bar; encoded
    on `device` (the SAE's own when None), returned on the CPU, where the statistics are kept."""
    device = device or sae_model.W_enc.device
    with tqdm(total=cache.n_tokens, desc="analyze", unit="tok", disable=not progress) as bar:
        for x in cache.iter_batches(batch_size, shuffle=False, hook=hook, with_grads=False):
            with torch.no_grad():
                z = sae_model.encode(to_device(x, device)).cpu()
            yield z
            bar.update(x.shape[0])


def _load_inputs(sae_dir, activations_dir, hook: str | None):
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
    try:
        return load_model(cache.manifest["model"] if model == "auto" else model,
                          backend=cache.manifest.get("backend", "transformer_lens"))
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
    device: str = "cpu",
) -> Path:
    """Analyse one SAE on a cache and add (or replace) it in the store at `out`; returns the store file.

    model: None (no logit lens, and contexts show token ids), a name for `activations.load_model`, "auto"
    (the cache's own model, None if it cannot be loaded), or a loaded HookedTransformer. device: where the SAE
    encodes the cache (auto: CUDA when available); the statistics and the store stay on the CPU.
    """
    target = resolve_device(device)  # a bad device is one error before anything is read
    hub = hub_name_of(sae_dir)  # hf://ORG/REPO[/SUB][@REV] (or the hf:/ a Path makes of it): its cached folder
    if hub is not None:
        try:
            sae_dir = download_sae_folder(hub)
        except sae_pkg.SAEError as exc:
            raise AnalysisError(str(exc)) from exc
        name = name or parse_hub_name(hub).repo_id.split("/")[1]
    elif is_pretrained_name(sae_dir):  # RELEASE/SAE_ID of SAELens' registry: its (cached or converted) folder
        release_id = Path(sae_dir).as_posix()
        try:
            sae_dir = pretrained_folder(release_id)
        except sae_pkg.SAEError as exc:
            raise AnalysisError(str(exc)) from exc
        name = name or release_id.replace("/", "_")
    sae_dir = Path(sae_dir)
    sae_model, cache, hook = _load_inputs(sae_dir, activations_dir, hook)
    lm = _resolve_model(model, cache)
    n_features = sae_model.cfg.n_features
    w_dec = sae_model.W_dec.detach().float()
    resid = logit_lens(w_dec, hook, lm)  # before streaming: a width mismatch should fail fast

    if window < 0 or batch_size < 1 or n_quantiles < 1:
        raise AnalysisError(f"need window >= 0, batch size >= 1 and n_quantiles >= 1, got window={window}, "
                            f"batch_size={batch_size}, n_quantiles={n_quantiles}")
    blocks = with_margins(_encoded(sae_model.to(target), cache, hook, batch_size, progress), window)
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
