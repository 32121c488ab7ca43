"""Train several architectures at equal mean L0 on the same cache and compare them side by side.

    python -m experiments.compare --activations runs/demo/cache --eval-activations runs/demo/cache-eval \
        --grads-activations runs/demo/cache-grads --eval-grads-activations runs/demo/cache-eval-grads \
        --n-features 4608 --k 16 32 64 --seeds 0 1 2 --out runs/compare

Writes ``comparison.json``, ``comparison.md`` (the table) and ``comparison.html`` (plotly: L0 vs FVU,
L0 vs CE recovered, dead fraction, per-token L0 histograms) into ``--out``. g-SAE needs a cache with
gradients, usually smaller (gradients cost a backward pass): it is compared against a TopK trained on
that same gradient cache, and the table says which data each row saw; g-SAE appears twice, under its
gradient rule and as plain TopK at inference. With several seeds or k, ``comparison.md`` starts with
mean ± 95% CI over seeds and the paired differences from TopK (same cache, seed and k), and
``comparison_pareto.html`` draws L0–FVU and L0–ΔCE curves over k. Finished runs are reused, so an
interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

import activations
import sae as sae_lib
from activations.storage import atomic_write_bytes, atomic_write_json
from experiments.evaluation import GRADIENT_RULE, PLAIN_TOPK_RULE, merge_in_the_loop, saes_in_the_loop
from experiments.training import RunConfig, finish_run, json_safe, train_run
from experiments.user_errors import run_user_command
from sae.errors import SAEConfigError

COLUMNS = (  # header, metric key, format
    ("run", "run", "{}"),
    ("data", "data", "{}"),
    ("L0", "l0", "{:.1f}"),
    ("L0 std", "l0_std", "{:.1f}"),
    ("FVU", "fvu", "{:.4f}"),
    ("L0 / FVU, batch mode", "batch_mode_text", "{}"),
    ("dead", "dead_frac", "{:.3f}"),
    ("rare (ρ<1e-3)", "rare_frac", "{:.3f}"),
    ("dense", "dense_frac", "{:.3f}"),
    ("zero-L0 tokens", "zero_latent_token_frac", "{:.3f}"),
    ("CE recovered", "ce_loss_recovered", "{:.3f}"),
    ("ΔCE", "delta_ce", "{:.4f}"),
    ("KL", "kl_div", "{:.4f}"),
    ("CE tokens", "ce_eval_tokens", "{:,}"),
    ("train tok/s", "train_tokens_per_s", "{:,.0f}"),
)


RUN_SPECS: tuple[tuple[str, str, dict[str, Any], bool], ...] = (  # label, arch, options, on the gradient cache
    ("topk", "topk", {}, False),
    ("mutual_choice", "mutual_choice", {}, False),
    ("feature_choice", "feature_choice", {}, False),
    ("feature_choice+zipf", "feature_choice", {"fc_capacity": "zipf"}, False),
    # aux_zipf targets under-used latents as well as dead ones (Ayonrinde 2024): compare it with AuxK on MC.
    ("mutual_choice+aux_zipf", "mutual_choice", {"aux_loss": "aux_zipf"}, False),
    # MC's per-token L0 tracks token norm under scalar normalisation; standardising each token removes the norm.
    ("mutual_choice+per_token_standardize", "mutual_choice", {"normalization": "per_token_standardize"}, False),
    ("gradient_topk", "gradient_topk", {}, True),
    ("topk@grads-cache", "topk", {}, True),
)
ON_GRADS = {label: on_grads for label, _, _, on_grads in RUN_SPECS}
"""Whether each run type trains on the gradient cache."""
BASELINE = {False: "topk", True: "topk@grads-cache"}
"""The TopK run each row is paired with: the one trained on the same cache, seed and k."""
ABLATION = {
    "feature_choice+zipf": "feature_choice",
    "mutual_choice+aux_zipf": "mutual_choice",
    "mutual_choice+per_token_standardize": "mutual_choice",
    f"gradient_topk ({PLAIN_TOPK_RULE})": f"gradient_topk ({GRADIENT_RULE})",
}
"""Runs also paired with the run they change one thing of (capacities, aux loss, normalisation, rule)."""


def plan_runs(
    base: RunConfig,
    grads_activations: str | None,
    eval_grads_activations: str | None = None,
    seeds: list[int] | None = None,
    ks: list[int] | None = None,
    labels: list[str] | None = None,
    grads_total_tokens: int | None = None,
) -> list[tuple[str, RunConfig]]:
    """Every run of the comparison: each label of RUN_SPECS at each k and seed, equal training tokens.

    g-SAE and its TopK baseline train on the gradient cache (and are evaluated on the gradient eval cache,
    so g-SAE is scored with its own rule), for grads_total_tokens (default: the base's) since a gradient
    cache is usually small. One seed and one k keep the flat layout out/<label>; a grid writes
    out/k<k>-s<seed>/<label>.
    """
    seeds, ks = seeds or [base.seed], ks or [base.k]
    known = [spec[0] for spec in RUN_SPECS]
    unknown = sorted(set(labels or []) - set(known))
    if unknown:
        raise SAEConfigError(f"unknown comparison run(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
    grid = len(seeds) > 1 or len(ks) > 1
    runs = []
    for k in ks:
        for seed in seeds:
            folder = Path(base.out) / (f"k{k}-s{seed}" if grid else "")
            for label, arch, options, on_grads in RUN_SPECS:
                if (labels and label not in labels) or (on_grads and not grads_activations):
                    continue
                cfg = replace(base, arch=arch, k=k, seed=seed, out=str(folder / label.replace("@", "_")),
                              options={**base.options, **options})
                if on_grads:
                    cfg = replace(cfg, activations=grads_activations,
                                  eval_activations=eval_grads_activations or cfg.eval_activations,
                                  total_tokens=grads_total_tokens or cfg.total_tokens)
                runs.append((label, cfg))
    return runs


def select_learning_rates(
    runs: list[tuple[str, RunConfig]], multipliers: list[float], tokens: int, validation_rows: int, out: Path,
    validation_activations: str | None = None,
) -> dict[str, float]:
    """Per label, the lr from multipliers x default with the lowest validation FVU; applied to every k and seed.

    Each label trains once per multiplier on `tokens` tokens at the first (k, seed) of the plan and is scored
    on `validation_rows` eval-cache rows placed after the metric rows (eval_offset), so the choice never
    sees the rows the comparison reports. Runs on the gradient cache validate on `validation_activations`
    (the main eval cache: its gradient eval cache is too small to split), g-SAE there as plain TopK.
    Finished selection runs are reused; the choice is written to out/lr_selection.json (merged with the labels
    already there).
    """
    first: dict[str, RunConfig] = {}
    for label, cfg in runs:
        first.setdefault(label, cfg)
    chosen, report = {}, {}
    for label, cfg in first.items():
        base_lr = cfg.lr or sae_lib.default_lr(cfg.n_features)
        on_grads = ON_GRADS[label]
        scores = {}
        for m in multipliers:
            folder = out / "lr-select" / f"{label.replace('@', '_')}-x{m:g}"
            trial = replace(
                cfg, lr=base_lr * m, total_tokens=tokens, out=str(folder), eval_offset=cfg.eval_tokens,
                eval_tokens=validation_rows, progress=False,
                eval_activations=(validation_activations or cfg.eval_activations) if on_grads else cfg.eval_activations,
            )
            _, metrics = _train_or_reuse(label, trial)
            scores[m] = metrics["fvu"]
        best = min(scores, key=lambda m: scores[m])
        chosen[label] = base_lr * best
        report[label] = {"default_lr": base_lr, "chosen_multiplier": best, "chosen_lr": base_lr * best,
                         "tokens": tokens, "validation_fvu_by_multiplier": {f"{m:g}": v for m, v in scores.items()}}
        print(f"[compare] {label}: lr x{best:g} ({base_lr * best:.3g}); validation FVU "
              + ", ".join(f"x{m:g} {v:.4f}" for m, v in scores.items()), file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lr_selection.json"
    before = json.loads(path.read_text()) if path.exists() else {}  # a --runs subset keeps the other labels' choice
    atomic_write_json(path, json_safe({**before, **report}))
    return chosen


def read_lr_selection(out: Path, labels: list[str]) -> dict[str, float]:
    """The learning rates out/lr_selection.json recorded, for --report-only (which trains nothing)."""
    path = out / "lr_selection.json"
    if not path.exists():
        raise SAEConfigError(f"--report-only with --lr-multipliers needs the choice a finished run recorded in {path}; "
                             "it does not exist (run the comparison first)")
    report = json.loads(path.read_text())
    missing = sorted(set(labels) - set(report))
    if missing:
        raise SAEConfigError(f"{path} has no learning rate for {', '.join(missing)}")
    return {label: float(report[label]["chosen_lr"]) for label in labels}


def _train_or_reuse(label: str, cfg: RunConfig, log_fn=None) -> tuple[Any, dict[str, Any]]:
    """A finished run folder of the same RunConfig is loaded; anything else is trained (resuming checkpoints)."""
    if _finished(cfg):
        model, metrics = sae_lib.load(cfg.out), json.loads((Path(cfg.out) / "eval.json").read_text())
        if stale_calibration(cfg.arch, metrics):  # an older rule: recalibrate and score again, no training
            print(f"[compare] {label}: recalibrating the finished run in {cfg.out} on a spread sample", file=sys.stderr)
            keep = {key: metrics[key] for key in ("shared_stream_runs",) if key in metrics}
            return model, finish_run(cfg, model, float(metrics["train_seconds"]), **keep)
        print(f"[compare] {label}: reusing the finished run in {cfg.out}", file=sys.stderr)
        return model, metrics
    print(f"[compare] training {label} ({cfg.arch}, k={cfg.k}, seed {cfg.seed}) on {cfg.activations}", file=sys.stderr)
    return train_run(cfg, log_fn=log_fn)


def stale_calibration(arch: str, metrics: dict[str, Any]) -> bool:
    """An MC/FC run whose thresholds were calibrated before the current rule: on a contiguous slice instead of
    contexts spread over the training cache, or (FC) without the capacity scale that keeps the mean L0 at k."""
    if not sae_lib.get_architecture(arch).calibration_rule or "calibration" not in metrics:
        return False
    record = metrics["calibration"]
    spread = "spread over the training cache" in str(record.get("source", ""))
    return not spread or (record.get("rule") == "per_latent" and "capacity_scale" not in record)


def _finished(cfg: RunConfig) -> bool:
    """The run folder holds a saved SAE and eval.json, trained with this RunConfig (progress display aside)."""
    out = Path(cfg.out)
    saved = out / "run_config.json"
    if not ((out / "eval.json").exists() and (out / "cfg.json").exists() and saved.exists()):
        return False
    before, now = json.loads(saved.read_text()), json.loads(json.dumps(dataclasses.asdict(cfg)))
    before.pop("progress", None)
    now.pop("progress", None)
    return before == now


def _not_reportable(cfg: RunConfig, ce_tokens: int) -> str | None:
    """Why a run cannot go into a --report-only report as it is (None when it can); ce_tokens 0: no CE/KL."""
    if not _finished(cfg):
        return "not finished"
    metrics = json.loads((Path(cfg.out) / "eval.json").read_text())
    if stale_calibration(cfg.arch, metrics):
        return "calibrated by an older rule (a run without --report-only recalibrates it)"
    if ce_tokens and not has_ce(metrics, ce_contexts(cfg, ce_tokens)):
        return f"no CE/KL on {ce_contexts(cfg, ce_tokens)} contexts yet"
    return None


def run_comparison(
    runs: list[tuple[str, RunConfig]], model: Any, ce_tokens: int, log_fn=None, report_only: bool = False
) -> list[dict[str, Any]]:
    """Train (or reuse a finished run), evaluate, and add CE/KL with the model (a name, an object or None).

    A g-SAE gives two rows: its gradient rule and plain TopK at inference. Resumable: a run whose folder
    holds eval.json for the same RunConfig is reused, and CE/KL once computed on at least as many contexts
    are kept in eval.json. CE/KL are computed after training, for every run on the same held-out contexts
    at once (one clean and one zero-ablated run per batch; see add_ce).
    report_only: compute nothing; leave out runs that have not finished, that a rerun would recalibrate, or
    that lack the CE/KL this report would add (so it can run beside the comparison that is filling them in).
    """
    if isinstance(model, str):
        hooks = [cfg.hook or activations.load_cache(cfg.activations).hooks[0] for _, cfg in runs]
        hf = any(activations.backend_of_hook(h) == "hf" for h in hooks)
        model = activations.load_model(model, backend="hf" if hf else None)
    done = []
    bar = tqdm(runs, desc="compare", unit="run", disable=len(runs) < 2)
    for label, cfg in bar:
        bar.set_postfix_str(f"{label} k={cfg.k} seed={cfg.seed}")
        if report_only and (why := _not_reportable(cfg, ce_tokens if model is not None else 0)):
            print(f"[compare] {label} k={cfg.k} seed {cfg.seed}: {why}, left out of the report", file=sys.stderr)
            continue
        trained, metrics = _train_or_reuse(label, replace(cfg, progress=cfg.progress and len(runs) < 2), log_fn)
        done.append((label, cfg, trained, metrics))
    if model is not None and not report_only:
        add_ce(done, model, ce_tokens)
    rows = []
    for label, cfg, _, metrics in done:
        row = _row(label, cfg, metrics)
        rows.append(row)
        if "plain_topk" in metrics:  # g-SAE under plain TopK: the same dictionary, the other rule
            plain = {**metrics, **metrics["plain_topk"]}
            rows.append({**_row(label, cfg, plain), "run": f"{label} ({PLAIN_TOPK_RULE})"})
            row["run"] = f"{label} ({metrics.get('selection_rule', GRADIENT_RULE)})"
    return rows


def ce_contexts(cfg: RunConfig, ce_tokens: int) -> int:
    """Held-out contexts CE/KL use for this run: enough for ce_tokens, at most what its eval cache holds."""
    cache = activations.load_cache(cfg.eval_activations or cfg.activations)
    return min(len(cache.tokens), max(1, -(-ce_tokens // int(cache.manifest["context"]))))


def has_ce(metrics: dict[str, Any], n_contexts: int) -> bool:
    """CE/KL are in eval.json, from at least n_contexts contexts (runs before ce_contexts was recorded: 127
    scored positions per 128-token context)."""
    if "ce_loss_recovered" not in metrics:
        return False
    return int(metrics.get("ce_contexts", int(metrics.get("ce_eval_tokens", 0)) // 127)) >= n_contexts


def add_ce(done: list[tuple[str, RunConfig, Any, dict[str, Any]]], model: Any, ce_tokens: int) -> None:
    """CE/KL for every run that lacks them, written into its eval.json. Runs on the same eval cache and hook
    are scored together on the same first contexts (paired with their TopK), sharing the clean and the
    zero-ablated forward; a gradient SAE's group computes the clean loss gradient, the others do not."""
    groups: dict[tuple[str, str, bool, int], list[tuple[RunConfig, Any, dict[str, Any]]]] = {}
    for _, cfg, trained, metrics in done:
        n_ctx = ce_contexts(cfg, ce_tokens)
        if has_ce(metrics, n_ctx):
            continue
        source = cfg.eval_activations or cfg.activations
        hook = cfg.hook or activations.load_cache(source).hooks[0]
        groups.setdefault((source, hook, bool(trained.needs_grads), n_ctx), []).append((cfg, trained, metrics))
    for (source, hook, grads, n_ctx), members in groups.items():
        tokens = np.asarray(activations.load_cache(source).tokens[:n_ctx])
        print(f"[compare] CE/KL of {len(members)} run(s) on {n_ctx} contexts of {source}"
              f"{' with the clean loss gradient' if grads else ''}", file=sys.stderr)
        results = saes_in_the_loop(model, {cfg.out: trained for cfg, trained, _ in members}, hook, tokens,
                                   progress=True)
        for cfg, _, metrics in members:
            merge_in_the_loop(metrics, results[cfg.out])
            atomic_write_json(Path(cfg.out) / "eval.json", json_safe(metrics))


def _row(label: str, cfg: RunConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("l0", "l0_std", "l0_norm_corr", "fvu", "dead_frac", "dense_frac", "zero_latent_token_frac", "train_tokens",
            "train_tokens_per_s", "in_sample", "batch_mode", "selection_rule", "ce_loss_clean", "ce_loss_sae",
            "ce_loss_zero", "ce_loss_recovered", "delta_ce", "kl_div", "ce_eval_tokens")
    row = {"run": label, "label": label, "arch": cfg.arch, "k": cfg.k, "seed": cfg.seed,
           "data": Path(cfg.activations).name, "out": cfg.out, **{k: metrics.get(k) for k in keys}}
    batch_mode = metrics.get("batch_mode")
    if batch_mode:  # MC/FC: the training selection rerun on eval batches (batch-size dependent)
        row["batch_mode_text"] = f"{batch_mode['l0']:.1f} / {batch_mode['fvu']:.4f}"
        row["batch_mode_fvu"] = batch_mode["fvu"]
    row["l0_histogram"] = metrics.get("l0_histogram")
    density = metrics.get("density")
    if density is not None:
        values = _as_list(density)
        row["rare_frac"] = float(sum(1 for p in values if p < 1e-3) / len(values))
    row["calibration"] = (metrics.get("calibration") or None)
    return row


def _as_list(values: Any) -> list[float]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(header for header, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["–" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figures_html(rows: list[dict[str, Any]]) -> str:
    """One self-contained HTML page with the four comparison plots."""
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=(
            "L0 vs FVU (lower is better)",
            "L0 vs CE loss recovered",
            "dead fraction",
            "per-token L0 histogram",
        ),
    )
    for row in rows:
        fig.add_trace(
            go.Scatter(
                x=[row["l0"]],
                y=[row["fvu"]],
                mode="markers+text",
                text=[row["run"]],
                textposition="top center",
                name=row["run"],
                legendgroup=row["run"],
            ),
            1,
            1,
        )
        if row.get("ce_loss_recovered") is not None:
            fig.add_trace(
                go.Scatter(
                    x=[row["l0"]],
                    y=[row["ce_loss_recovered"]],
                    mode="markers+text",
                    text=[row["run"]],
                    textposition="top center",
                    showlegend=False,
                    legendgroup=row["run"],
                ),
                1,
                2,
            )
        fig.add_trace(go.Bar(x=[row["run"]], y=[row["dead_frac"]], showlegend=False, legendgroup=row["run"]), 2, 1)
        hist = row.get("l0_histogram")
        if hist:
            fig.add_trace(
                go.Scatter(y=hist, mode="lines", name=row["run"], showlegend=False, legendgroup=row["run"]), 2, 2
            )
    fig.update_xaxes(title_text="L0", row=1, col=1)
    fig.update_xaxes(title_text="L0", row=1, col=2)
    fig.update_xaxes(title_text="latents active on a token", row=2, col=2)
    fig.update_yaxes(title_text="tokens", type="log", row=2, col=2)
    fig.update_layout(height=800, title="SAE architectures at equal mean L0")
    return fig.to_html(include_plotlyjs="cdn", full_html=True)


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Two-sided 95% Student-t quantiles by degrees of freedom (n seeds - 1); 1.96 beyond."""
SUMMARY_METRICS = (  # key, header, format: what the seed-aggregated tables report
    ("l0", "L0", "{:.1f}"),
    ("l0_std", "L0 std", "{:.1f}"),
    ("l0_norm_corr", "r(L0, ‖x‖)", "{:.2f}"),
    ("fvu", "FVU", "{:.4f}"),
    ("batch_mode_fvu", "FVU batch mode", "{:.4f}"),
    ("dead_frac", "dead", "{:.3f}"),
    ("rare_frac", "rare (ρ<1e-3)", "{:.3f}"),
    ("delta_ce", "ΔCE", "{:.4f}"),
    ("ce_loss_recovered", "CE recovered", "{:.3f}"),
    ("kl_div", "KL", "{:.4f}"),
)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for one value)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, float("nan")
    return mean, T_975.get(n - 1, 1.96) * float(np.std(values, ddof=1)) / n**0.5


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (run, k): mean ± 95% CI over seeds of each metric, and the paired differences (the interval of the
    per-seed differences) from the TopK baseline trained on the same cache with the same seed and k and, for
    the runs in ABLATION, from the run they change one thing of. CE/KL differences pair only runs scored on
    the same held-out tokens (the same number of the same first contexts)."""
    by_key: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["run"], row["k"]), {})[row["seed"]] = row
    out = []
    for (run, k), seeds in by_key.items():
        on_grads = ON_GRADS[seeds[next(iter(seeds))]["label"]]
        references = [BASELINE[on_grads]] + ([ABLATION[run]] if run in ABLATION else [])
        summary: dict[str, Any] = {"run": run, "k": k, "seeds": sorted(seeds), "baseline": references[0],
                                   "references": [r for r in references if r != run]}
        scored = [r["ce_eval_tokens"] for r in seeds.values() if r.get("ce_eval_tokens")]
        summary["ce_eval_tokens"] = min(scored) if scored else None  # the fewest any seed's CE/KL used
        for key, _, _ in SUMMARY_METRICS:
            values = [r[key] for r in seeds.values() if _number(r.get(key))]
            if values:
                summary[key] = interval(values)
            for ref in summary["references"]:
                other = by_key.get((ref, k), {})
                diffs = [r[key] - other[s][key] for s, r in seeds.items()
                         if _number(r.get(key)) and s in other and _number(other[s].get(key))
                         and (key not in CE_KEYS or r.get("ce_eval_tokens") == other[s].get("ce_eval_tokens"))]
                if diffs:
                    summary[f"{key}_vs_{ref}"] = interval(diffs)
        out.append(summary)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and value == value  # not None, not nan


def summary_tables(summaries: list[dict[str, Any]]) -> str:
    """Markdown: metrics as mean ± 95% CI over seeds, then paired differences from TopK."""

    def cell(value, fmt: str) -> str:
        if value is None:
            return "–"
        mean, half = value
        return fmt.format(mean) + ("" if half != half else " ± " + fmt.format(half))

    heads = [h for _, h, _ in SUMMARY_METRICS]
    lines = ["| run | k | seeds | " + " | ".join(heads) + " |", "|" + "---|" * (3 + len(heads))]
    for s in summaries:
        cells = [cell(s.get(key), fmt) for key, _, fmt in SUMMARY_METRICS]
        lines.append(f"| {s['run']} | {s['k']} | {len(s['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (run − reference, same seed and k; mean ± 95% CI): the TopK trained on the same "
              "cache, and the run each variant changes one thing of:", ""]
    lines += ["| run | k | vs | " + " | ".join("Δ " + h for h in heads) + " |", "|" + "---|" * (3 + len(heads))]
    for s in summaries:
        for ref in s["references"]:
            cells = [cell(s.get(f"{key}_vs_{ref}"), fmt) for key, _, fmt in SUMMARY_METRICS]
            lines.append(f"| {s['run']} | {s['k']} | {ref} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CLAIMS = (  # claim of the seed papers, run, reference ("" for an absolute value), metric, better when
    ("FC has ≈ 0 dead latents (Ayonrinde)", "feature_choice", "", "dead_frac", "zero"),
    ("FC (Zipf capacities) has ≈ 0 dead latents", "feature_choice+zipf", "", "dead_frac", "zero"),
    ("MC FVU ≤ TopK at equal L0 (Ayonrinde; BatchTopK, Bussmann)", "mutual_choice", "topk", "fvu", "lower"),
    ("FC FVU ≤ TopK at equal L0 (Ayonrinde)", "feature_choice", "topk", "fvu", "lower"),
    ("FC (Zipf) FVU ≤ TopK at equal L0", "feature_choice+zipf", "topk", "fvu", "lower"),
    ("aux_zipf: fewer dead latents than AuxK (MC)", "mutual_choice+aux_zipf", "mutual_choice", "dead_frac", "lower"),
    ("aux_zipf: fewer rare latents than AuxK (MC)", "mutual_choice+aux_zipf", "mutual_choice", "rare_frac", "lower"),
    ("aux_zipf: at no FVU cost (MC)", "mutual_choice+aux_zipf", "mutual_choice", "fvu", "not higher"),
    (f"g-SAE ΔCE < TopK at equal L0, {GRADIENT_RULE} (Olmo)", f"gradient_topk ({GRADIENT_RULE})",
     "topk@grads-cache", "delta_ce", "lower"),
    (f"g-SAE ΔCE < TopK at equal L0, {PLAIN_TOPK_RULE}", f"gradient_topk ({PLAIN_TOPK_RULE})", "topk@grads-cache",
     "delta_ce", "lower"),
    ("MC with per-token standardisation: FVU ≤ TopK", "mutual_choice+per_token_standardize", "topk", "fvu",
     "lower"),
    ("MC with per-token standardisation: ΔCE ≤ TopK", "mutual_choice+per_token_standardize", "topk", "delta_ce",
     "lower"),
    ("FC Zipf capacities beat uniform (FVU)", "feature_choice+zipf", "feature_choice", "fvu", "lower"),
    ("MC: per-token standardisation beats scalar normalisation (FVU)", "mutual_choice+per_token_standardize",
     "mutual_choice", "fvu", "lower"),
)
"""Each claim is judged on the 95% interval of the paired difference (or of the value, for "zero")."""
CE_KEYS = ("delta_ce", "ce_loss_recovered", "kl_div")
"""Metrics with the model in the loop: the claims table names how many held-out tokens they were scored on."""
ZERO_DEAD = 0.01
"""'≈ 0 dead' is reproduced when the interval's upper end stays below 1% of the latents."""


def verdict(value: tuple[float, float] | None, better: str) -> str:
    """reproduced / not reproduced / inconclusive from mean ± half-width (nan half-width: one seed)."""
    if value is None:
        return "not measured"
    mean, half = value
    if half != half:
        return "one seed: no interval"
    lo, hi = mean - half, mean + half
    if better == "zero":
        return "reproduced" if hi < ZERO_DEAD else "not reproduced"
    if better == "lower":
        return "reproduced" if hi < 0 else "not reproduced" if lo > 0 else "inconclusive (interval spans 0)"
    return "reproduced" if lo <= 0 else "not reproduced"  # "not higher": no significant rise


def claims_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown: each claim, the number (mean ± 95% CI over seeds, paired where a reference is named), verdict."""
    by_run = {(s["run"], s["k"]): s for s in summaries}
    lines = ["| claim | k | run − reference | value (95% CI) | seeds | verdict |", "|---|---|---|---|---|---|"]
    for claim, run, ref, key, better in CLAIMS:
        for k in sorted({s["k"] for s in summaries}):
            s = by_run.get((run, k))
            if s is None:
                continue
            value = s.get(key) if not ref else s.get(f"{key}_vs_{ref}")
            shown = "–" if value is None else f"{value[0]:+.4f}"
            if value is not None and value[1] == value[1]:
                shown += f" ± {value[1]:.4f}"
            if not ref and value is not None:
                shown = shown.lstrip("+")
            if key in CE_KEYS and s.get("ce_eval_tokens"):
                shown += f" ({s['ce_eval_tokens']:,} tokens)"
            lines.append(f"| {claim} | {k} | {run}{' − ' + ref if ref else ''} ({key}) | {shown} | "
                         f"{len(s['seeds'])} | {verdict(value, better)} |")
    return "\n".join(lines) + "\n"


def pareto_html(summaries: list[dict[str, Any]]) -> str:
    """L0–FVU and L0–ΔCE curves, one line per run over k, with 95% CI error bars."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("L0 vs FVU (lower is better)", "L0 vs ΔCE (lower is better)"))
    for run in dict.fromkeys(s["run"] for s in summaries):
        points = sorted((s for s in summaries if s["run"] == run), key=lambda s: s["k"])
        for col, key in ((1, "fvu"), (2, "delta_ce")):
            pts = [p for p in points if p.get(key) and p.get("l0")]
            if not pts:
                continue
            fig.add_trace(go.Scatter(
                x=[p["l0"][0] for p in pts], y=[p[key][0] for p in pts], mode="lines+markers", name=run,
                legendgroup=run, showlegend=col == 1,
                error_y={"type": "data", "array": [0 if p[key][1] != p[key][1] else p[key][1] for p in pts]},
            ), 1, col)
    fig.update_xaxes(title_text="mean L0 (threshold mode for MC/FC)")
    fig.update_layout(height=500, title="Pareto curves over k, mean ± 95% CI over seeds")
    return fig.to_html(include_plotlyjs="cdn", full_html=True)


def write_report(rows: list[dict[str, Any]], out: Path) -> str:
    rows = json_safe(rows)  # histograms arrive as tensors
    table = markdown_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    html = figures_html(rows)
    if len({(r.get("k"), r.get("seed")) for r in rows}) > 1:  # a grid over seeds / k: aggregate it
        summaries = aggregate(rows)
        table = ("The seed papers' claims, judged on 95% intervals over seeds:\n\n" + claims_table(summaries) + "\n"
                 + summary_tables(summaries) + "\nEvery run:\n\n" + table)
        atomic_write_json(out / "comparison_summary.json", json_safe(summaries))
        atomic_write_bytes(out / "comparison_pareto.html", pareto_html(summaries).encode())
    atomic_write_json(out / "comparison.json", rows)
    atomic_write_bytes(out / "comparison.md", table.encode())
    atomic_write_bytes(out / "comparison.html", html.encode())
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--activations", required=True, help="training cache (TopK, MC, FC)")
    parser.add_argument("--eval-activations",
                        help="held-out cache for every run's metrics (MC/FC calibrate on the training cache)")
    parser.add_argument("--grads-activations", help="cache with --with-grads for g-SAE and its TopK baseline")
    parser.add_argument("--eval-grads-activations",
                        help="held-out cache with --with-grads: g-SAE is then scored with its gradient rule too")
    parser.add_argument("--n-features", type=int, default=4608)
    parser.add_argument("--k", type=int, nargs="+", default=[32], help="one or more k (a Pareto curve over k)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; >= 3 gives 95%% intervals")
    parser.add_argument("--runs", nargs="+", help=f"subset of: {', '.join(s[0] for s in RUN_SPECS)}")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--total-tokens", type=int, help="training tokens per run (default: one pass)")
    parser.add_argument("--grads-total-tokens", type=int,
                        help="training tokens of g-SAE and its TopK baseline (default: --total-tokens)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: 2e-4/sqrt(F/2^14))")
    parser.add_argument("--lr-multipliers", type=float, nargs="+",
                        help="choose each run's lr among these multiples of the default by validation FVU (0.5 1 2)")
    parser.add_argument("--lr-select-tokens", type=int, default=262_144, help="training tokens of each lr trial")
    parser.add_argument("--validation-rows", type=int, default=32_768,
                        help="eval-cache rows after the metric rows that score the lr trials")
    parser.add_argument("--eval-tokens", type=int, default=65_536,
                        help="eval-cache rows for the metrics")
    parser.add_argument("--model", default="smollm2-135m", help="for CE/KL; 'none' skips them")
    parser.add_argument("--ce-tokens", type=int, default=4096,
                        help="held-out tokens for CE/KL (whole contexts, at most the eval cache); every run is scored "
                             "on the same first contexts, together with the others on that cache; a run scored on "
                             "fewer contexts is scored again")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--wandb", action="store_true", help="log each run to W&B")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report from the runs of this plan that have finished")
    args = parser.parse_args(argv)

    def run() -> int:
        base = RunConfig(
            activations=args.activations,
            out=args.out,
            n_features=args.n_features,
            k=args.k[0],
            batch_size=args.batch_size,
            total_tokens=args.total_tokens,
            lr=args.lr,
            eval_activations=args.eval_activations,
            eval_tokens=args.eval_tokens,
            wandb=args.wandb,
        )
        runs = plan_runs(base, args.grads_activations, args.eval_grads_activations, args.seeds, args.k, args.runs,
                         args.grads_total_tokens)
        if args.lr_multipliers and args.report_only:  # the choice a finished comparison made, never a new one
            lrs = read_lr_selection(Path(args.out), [label for label, _ in runs])
        elif args.lr_multipliers:
            lrs = select_learning_rates(runs, args.lr_multipliers, args.lr_select_tokens, args.validation_rows,
                                        Path(args.out), args.eval_activations)
        if args.lr_multipliers:
            runs = [(label, replace(cfg, lr=lrs[label])) for label, cfg in runs]
        model = None if args.model == "none" else args.model
        rows = run_comparison(runs, model, args.ce_tokens, report_only=args.report_only)
        print(write_report(rows, Path(args.out)))
        return 0

    return run_user_command("compare", run)


if __name__ == "__main__":
    sys.exit(main())
