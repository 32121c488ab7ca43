"""The comparison's report: the per-run table and figures, mean ± 95% CI over seeds with paired differences, the
seed papers' claims with their verdicts, and the Pareto curves over k."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from activations.storage import atomic_write_bytes, atomic_write_json
from experiments.comparison.plan import ABLATION, BASELINE, ON_GRADS
from experiments.evaluation import GRADIENT_RULE, PLAIN_TOPK_RULE
from experiments.training import json_safe

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


