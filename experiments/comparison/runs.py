"""Running a comparison: the learning-rate choice, training or reusing each run (recalibrating runs of an older
rule), and CE/KL of all runs on the same held-out contexts at once."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import activations
import sae as sae_lib
from activations.storage import atomic_write_json
from experiments.comparison.plan import ON_GRADS
from experiments.evaluation import GRADIENT_RULE, PLAIN_TOPK_RULE, merge_in_the_loop, saes_in_the_loop
from experiments.training import RunConfig, finish_run, json_safe, train_run
from sae.config import fields_with_role
from sae.errors import SAEConfigError
from sae.io import CFG_FILENAME, read_cfg


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
    """The run folder holds a saved SAE and eval.json, trained with this RunConfig; how it ran (the progress display
    and the run-only options: device, prefetching, logging, checkpoints) aside. autocast and sparse_kernels are
    run-only for a resume but change the numbers, so they count here."""
    out = Path(cfg.out)
    saved = out / "run_config.json"
    if not ((out / "eval.json").exists() and (out / CFG_FILENAME).exists() and saved.exists()):
        return False
    before, now = json.loads(saved.read_text()), json.loads(json.dumps(dataclasses.asdict(cfg)))
    run_only = fields_with_role("run_only") - {"autocast", "sparse_kernels"}
    for record in (before, now):
        record.pop("progress", None)
        record["options"] = {k: v for k, v in (record.get("options") or {}).items() if k not in run_only}
    # An SAE option now named that the run left to its default is no difference if the default it got (recorded in
    # cfg.json) is the value named: runs from before a default changed stay reusable once the plan names that value.
    used = read_cfg(out).get("workbench", {}).get("config", {})
    for key in set(now["options"]) - set(before["options"]):
        if key in used and used[key] == now["options"][key]:
            before["options"][key] = used[key]
    return before == now


def _not_reportable(cfg: RunConfig, ce_tokens: int) -> str | None:
    """Why a run cannot go into a --report-only report as it is (None when it can); ce_tokens 0: no CE/KL."""
    if not _finished(cfg):
        return "not finished"
    metrics = json.loads((Path(cfg.out) / "eval.json").read_text())
    if stale_calibration(cfg.arch, metrics):
        return "calibrated by an older rule (a run without --report-only recalibrates it)"
    n_ctx = ce_contexts(cfg, ce_tokens) if ce_tokens else 0
    if n_ctx and not has_ce(metrics, n_ctx, cfg):
        return f"no CE/KL on {n_ctx} contexts yet"
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


def scored_tokens(cfg: RunConfig, n_contexts: int) -> int:
    """Positions CE/KL score in the first n_contexts contexts of the run's eval cache: those whose next token is not
    BOS (documents inside a context are separated by BOS too)."""
    cache = activations.load_cache(cfg.eval_activations or cfg.activations)
    tokens = np.asarray(cache.tokens[:n_contexts])
    return int((tokens[:, 1:] != int(cache.manifest["bos_token_id"])).sum())


def has_ce(metrics: dict[str, Any], n_contexts: int, cfg: RunConfig | None = None) -> bool:
    """CE/KL are in eval.json, from at least n_contexts contexts; a run scored before ce_contexts was recorded
    counts when it scored at least as many positions as the first n_contexts contexts hold (needs cfg)."""
    if "ce_loss_recovered" not in metrics:
        return False
    if "ce_contexts" in metrics or cfg is None:
        return int(metrics.get("ce_contexts", 0)) >= n_contexts
    return int(metrics.get("ce_eval_tokens", 0)) >= scored_tokens(cfg, n_contexts)


def add_ce(done: list[tuple[str, RunConfig, Any, dict[str, Any]]], model: Any, ce_tokens: int) -> None:
    """CE/KL for every run that lacks them, written into its eval.json. Runs on the same eval cache and hook
    are scored together on the same first contexts (paired with their TopK), sharing the clean and the
    zero-ablated forward; a gradient SAE's group computes the clean loss gradient, the others do not."""
    groups: dict[tuple[str, str, bool, int], list[tuple[RunConfig, Any, dict[str, Any]]]] = {}
    for _, cfg, trained, metrics in done:
        n_ctx = ce_contexts(cfg, ce_tokens)
        if has_ce(metrics, n_ctx, cfg):
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


