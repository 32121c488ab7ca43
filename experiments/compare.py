"""Train several architectures at equal mean L0 on the same cache and compare them side by side.

    python -m experiments.compare --activations runs/demo/cache --eval-activations runs/demo/cache-eval \
        --grads-activations runs/demo/cache-grads --n-features 4608 --k 32 --out runs/compare

Writes ``comparison.json``, ``comparison.md`` (the table) and ``comparison.html`` (plotly: L0 vs FVU,
L0 vs CE recovered, dead fraction, per-token L0 histograms) into ``--out``. g-SAE needs a cache with
gradients, usually smaller (gradients cost a backward pass): it is compared against a TopK trained on
that same gradient cache, and the table says which data each row saw.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from activations.storage import atomic_write_bytes, atomic_write_json
from experiments.training import RunConfig, json_safe, train_run

ARCHS = ("topk", "mutual_choice", "feature_choice")
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
    ("train tok/s", "train_tokens_per_s", "{:,.0f}"),
)


def plan_runs(base: RunConfig, grads_activations: str | None) -> list[tuple[str, RunConfig]]:
    """TopK, MC and FC on the main cache; g-SAE and its TopK baseline on the gradient cache."""
    runs = [(arch, replace(base, arch=arch, out=str(Path(base.out) / arch))) for arch in ARCHS]
    # aux_zipf targets under-used latents as well as dead ones (Ayonrinde 2024): compare it with AuxK on MC.
    runs.append(
        (
            "mutual_choice+aux_zipf",
            replace(
                base,
                arch="mutual_choice",
                out=str(Path(base.out) / "mc_aux_zipf"),
                options={**base.options, "aux_loss": "aux_zipf"},
            ),
        )
    )
    if grads_activations:
        for arch, label in (("gradient_topk", "gradient_topk"), ("topk", "topk@grads-cache")):
            runs.append(
                (
                    label,
                    replace(
                        base,
                        arch=arch,
                        activations=grads_activations,
                        out=str(Path(base.out) / label.replace("@", "_")),
                    ),
                )
            )
    return runs


def run_comparison(runs: list[tuple[str, RunConfig]], model: Any, ce_tokens: int, log_fn=None) -> list[dict[str, Any]]:
    """Train (or reuse a finished run), evaluate, and add CE/KL with the model (a name, an object or None)."""
    import numpy as np

    import activations
    from experiments.evaluation import sae_in_the_loop

    if isinstance(model, str):
        model = activations.load_model(model)
    rows = []
    for label, cfg in runs:
        eval_path, saved = Path(cfg.out) / "eval.json", Path(cfg.out) / "run_config.json"
        finished = eval_path.exists() and (Path(cfg.out) / "cfg.json").exists() and saved.exists()
        if finished and json.loads(saved.read_text()) == json.loads(json.dumps(dataclasses.asdict(cfg))):
            import sae as sae_lib

            trained, metrics = sae_lib.load(cfg.out), json.loads(eval_path.read_text())
            print(f"[compare] {label}: reusing the finished run in {cfg.out}", file=sys.stderr)
        else:
            print(f"[compare] training {label} ({cfg.arch}) on {cfg.activations}", file=sys.stderr)
            trained, metrics = train_run(cfg, log_fn=log_fn)
        row = {
            "run": label,
            "arch": cfg.arch,
            "data": Path(cfg.activations).name,
            "out": cfg.out,
            **{
                k: metrics.get(k)
                for k in (
                    "l0",
                    "l0_std",
                    "fvu",
                    "dead_frac",
                    "dense_frac",
                    "zero_latent_token_frac",
                    "train_tokens",
                    "train_tokens_per_s",
                    "in_sample",
                    "batch_mode",
                )
            },
        }
        batch_mode = metrics.get("batch_mode")
        if batch_mode:  # MC/FC: the training selection rerun on eval batches (batch-size dependent)
            row["batch_mode_text"] = f"{batch_mode['l0']:.1f} / {batch_mode['fvu']:.4f}"
        row["l0_histogram"] = metrics.get("l0_histogram")
        density = metrics.get("density")
        if density is not None:
            row["rare_frac"] = float(sum(1 for p in _as_list(density) if p < 1e-3) / len(_as_list(density)))
        if model is not None:
            if "ce_loss_recovered" not in metrics:
                cache = activations.load_cache(cfg.eval_activations or cfg.activations)
                n_ctx = max(1, -(-ce_tokens // int(cache.manifest["context"])))
                tokens = np.asarray(cache.tokens[:n_ctx])
                metrics.update(sae_in_the_loop(model, trained, cfg.hook or cache.hooks[0], tokens))
                atomic_write_json(eval_path, json_safe(metrics))
            row.update(
                {
                    k: metrics[k]
                    for k in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_loss_recovered", "delta_ce", "kl_div")
                }
            )
        rows.append(row)
    return rows


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
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

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


def write_report(rows: list[dict[str, Any]], out: Path) -> str:
    rows = json_safe(rows)  # histograms arrive as tensors
    table = markdown_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "comparison.json", rows)
    atomic_write_bytes(out / "comparison.md", table.encode())
    atomic_write_bytes(out / "comparison.html", figures_html(rows).encode())
    return table


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import run_user_command

    parser = argparse.ArgumentParser(
        prog="python -m experiments.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--activations", required=True, help="training cache (TopK, MC, FC)")
    parser.add_argument("--eval-activations", help="held-out cache for every run's metrics")
    parser.add_argument("--grads-activations", help="cache with --with-grads for g-SAE and its TopK baseline")
    parser.add_argument("--n-features", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--total-tokens", type=int, help="training tokens per run (default: one pass)")
    parser.add_argument("--model", default="smollm2-135m", help="for CE/KL; 'none' skips them")
    parser.add_argument("--ce-tokens", type=int, default=4096)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--wandb", action="store_true", help="log each run to W&B")
    args = parser.parse_args(argv)

    def run() -> int:
        base = RunConfig(
            activations=args.activations,
            out=args.out,
            n_features=args.n_features,
            k=args.k,
            batch_size=args.batch_size,
            total_tokens=args.total_tokens,
            eval_activations=args.eval_activations,
            wandb=args.wandb,
        )
        rows = run_comparison(
            plan_runs(base, args.grads_activations), None if args.model == "none" else args.model, args.ce_tokens
        )
        print(write_report(rows, Path(args.out)))
        return 0

    return run_user_command("compare", run)


if __name__ == "__main__":
    sys.exit(main())
