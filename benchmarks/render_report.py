"""Render BENCHMARKS.md and its figure from a bench_training.py results.json (never edit them by hand).

    .venv-bench/bin/python benchmarks/render_report.py runs/bench/results.json \\
        --report benchmarks/BENCHMARKS.md --figure benchmarks/training_throughput.png

Runs in .venv-bench (matplotlib lives there, not in the product venv); reads only the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TITLES = {
    "topk": "TopK",
    "mutual_choice": "Mutual-Choice (ours) vs BatchTopK",
    "feature_choice": "Feature-Choice (ours) vs BatchTopK",
}
NAMES = {"ours": "sae-workbench", "saelens": "SAELens", "sparsify": "sparsify"}
COLORS = {"ours": "#1f77b4", "saelens": "#ff7f0e", "sparsify": "#2ca02c"}


def one_gemm_floor(results: dict[str, Any]) -> float:
    """Tokens/s of the encoder's forward GEMM alone (2 d F FLOPs a token); older results.json lack the key."""
    g = results["gemm"]
    return g.get("one_gemm_floor_tokens_per_s") or g["median_flops_per_s"] / (2 * g["shape"][1] * g["shape"][2])


def label(row: dict[str, Any]) -> str:
    return f"{NAMES.get(row['framework'], row['framework'])} {row['framework_version']} ({row['arch']})"


def figure(results: dict[str, Any], path: Path) -> None:
    """Tokens/s per comparison (median bar, min-max whiskers, both floors) and held-out FVU."""
    summary = results["summary"]
    rows = [(arch, row) for arch, group in summary.items() for row in group]
    names = [f"{TITLES.get(arch, arch)}\n{label(row)}" for arch, row in rows]
    y = list(range(len(rows)))[::-1]
    fig, (ax_rate, ax_fvu) = plt.subplots(1, 2, figsize=(12, 1.0 + 0.7 * len(rows)), sharey=True,
                                          gridspec_kw={"width_ratios": [3, 1.2]})
    rates = [row["tokens_per_s"] for _, row in rows]
    errors = [[row["tokens_per_s"] - row["tokens_per_s_min"] for _, row in rows],
              [row["tokens_per_s_max"] - row["tokens_per_s"] for _, row in rows]]
    colors = [COLORS.get(row["framework"], "gray") for _, row in rows]
    ax_rate.barh(y, rates, xerr=errors, color=colors, capsize=3)
    floor, one_gemm = results["gemm"]["floor_tokens_per_s"], one_gemm_floor(results)
    ax_rate.axvline(floor, color="black", linestyle="--", linewidth=1)
    ax_rate.text(floor, len(rows) - 0.4, f" dense-encoder floor\n {floor:,.0f} tok/s", va="top", fontsize=8)
    ax_rate.axvline(one_gemm, color="black", linestyle=":", linewidth=1)
    ax_rate.text(one_gemm, len(rows) - 0.4, f" one-GEMM floor\n {one_gemm:,.0f} tok/s", va="top", fontsize=8)
    for yi, (_, row) in zip(y, rows, strict=True):  # the label sits past the max whisker
        ax_rate.text(row["tokens_per_s_max"], yi, f"  {row['tokens_per_s']:,.0f}", va="center", fontsize=8)
    ax_rate.set_yticks(y, names, fontsize=8)
    ax_rate.set_xlabel("training tokens/s (median of repeats; whiskers: min-max)")
    ax_rate.set_xlim(0, max(rates + [floor, one_gemm]) * 1.25)
    fvus = [row["fvu_heldout"] for _, row in rows]
    ax_fvu.barh(y, fvus, color=colors)
    for yi, value in zip(y, fvus, strict=True):
        ax_fvu.text(value, yi, f" {value:.3f}", va="center", fontsize=8)
    ax_fvu.set_xlabel("held-out FVU (lower is better)")
    ax_fvu.set_xlim(0, max(fvus) * 1.35)
    s = results["settings"]
    fig.suptitle(f"SAE training on {results['data']['model']} {results['data']['hook']} (d={results['data']['d_in']}):"
                 f" F={s['n_features']}, k={s['k']}, batch {s['batch_size']}, {s['steps']} steps, "
                 f"{results['machine']['cpu_count']} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def table(results: dict[str, Any], arch: str) -> list[str]:
    floor, one_gemm = results["gemm"]["floor_tokens_per_s"], one_gemm_floor(results)
    lines = [
        f"### {TITLES.get(arch, arch)}",
        "",
        "| framework | tokens/s (median, min-max) | of one-GEMM floor | of dense-encoder floor | ours ÷ this "
        "| tokens/s incl. init | init s | peak RSS MB (before training) | held-out FVU | held-out L0 "
        "| FVU / L0, batch mode | inference rule |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["summary"][arch]:
        speedup = row["ours_speedup"]
        lines.append(
            f"| {label(row)} | {row['tokens_per_s']:,.0f} ({row['tokens_per_s_min']:,.0f}-"
            f"{row['tokens_per_s_max']:,.0f}) | {row['tokens_per_s'] / one_gemm:.0%} "
            f"| {row['tokens_per_s'] / floor:.0%} "
            f"| {'-' if row['framework'] == 'ours' or speedup is None else f'{speedup:.2f}x'} "
            f"| {row['tokens_per_s_total']:,.0f} | {row['init_s']:.1f} | {row['peak_rss_mb']:,.0f} "
            f"({row['rss_before_training_mb']:,.0f}) "
            f"| {row['fvu_heldout']:.4f} | {row['l0_heldout']:.1f} | {batch_mode(row)} | {row['inference_rule']} |"
        )
    return lines + [""]


def batch_mode(row: dict[str, Any]) -> str:
    """Held-out FVU / L0 with the training (batch) selection rule, for MC, FC and BatchTopK."""
    if row.get("fvu_heldout_batch_mode") is None:
        return "-"
    return f"{row['fvu_heldout_batch_mode']:.4f} / {row['l0_heldout_batch_mode']:.1f}"


def settings_lines(results: dict[str, Any]) -> list[str]:
    lines = ["| framework / arch | settings the run reported |", "|---|---|"]
    seen = set()
    for group in results["summary"].values():
        for row in group:
            key = (row["framework"], row["arch"])
            if key in seen:
                continue
            seen.add(key)
            text = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
            lines.append(f"| {row['framework']} / {row['arch']} | {text} |")
    return lines


def report(results: dict[str, Any], results_path: Path, report_path: Path, figure_path: Path) -> str:
    s, m, d, g = results["settings"], results["machine"], results["data"], results["gemm"]
    gflops = [f"{v / 1e9:.0f}" for v in g["flops_per_s"]]
    timed = s["steps"] - s["warmup_steps"]
    lines = [
        "# Training throughput: sae-workbench vs SAELens vs sparsify",
        "",
        f"<!-- Generated by benchmarks/render_report.py from {os.path.relpath(results_path)} ({results['created']}). "
        "Do not edit: rerun the command below. -->",
        "",
        "Reproduce (creates `.venv-bench` with the peers if missing; the numbers below come from this command):",
        "",
        "```",
        "make bench   # both shapes (F=9216, k=32 and F=32768, k=64); this report's part of it:",
        "# = .venv/bin/python benchmarks/bench_training.py " + shlex.join(results["argv"]),
        "```",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores, torch {m['torch']} with {m['torch_threads']} threads, "
        f"Python {m['python']}. Data: {d['train_rows']:,} training rows ({s['steps']} steps x {s['batch_size']}) and "
        f"{d['heldout_rows']:,} held-out rows of `{d['hook']}` (d={d['d_in']}) from {d['model']}, "
        f"in the order `{d['order']}`.",
        "",
        f"fp32 GEMM rate at the encoder's shape [{g['shape'][0]}, {g['shape'][1]}] @ [{g['shape'][1]}, "
        f"{g['shape'][2]}]: median **{g['median_flops_per_s'] / 1e9:.0f} GFLOP/s** (per repeat: "
        f"{', '.join(gflops)}). One-GEMM floor = GEMM FLOP/s / (2 d F) = **{one_gemm_floor(results):,.0f} "
        "tokens/s** (the encoder's forward GEMM alone: no exact TopK step can beat it, and with sparse kernels "
        "nothing else in our step is O(B d F)). Dense-encoder floor = GEMM FLOP/s / (6 d F) = "
        f"**{g['floor_tokens_per_s']:,.0f} tokens/s** (that forward plus the two backward GEMMs of an encoder "
        "trained densely, as the peers train theirs). \"of ... floor\" = tokens/s / that floor; "
        "\"ours ÷ this\" = our tokens/s over that framework's.",
        "",
        f"![training throughput]({os.path.relpath(figure_path, report_path.parent)})",
        "",
    ]
    for arch in results["summary"]:
        lines += table(results, arch)
    lines += [
        "## How it was measured",
        "",
        f"- Same F={s['n_features']}, k={s['k']}, batch {s['batch_size']}, {s['steps']} steps, constant Adam "
        f"lr {s['lr']:.3g}, seed {s['seed']}, dead-latent window {s['dead_tokens']:,} tokens (AuxK), same rows "
        "in the same order for every framework. Each run is a separate process; runs alternate "
        f"(ours, SAELens, sparsify, ...) for {s['repeats']} repeat(s).",
        f"- tokens/s times the training loop only: {timed} step(s) after {s['warmup_steps']} untimed warm-up "
        "step(s), identical for every framework. \"incl. init\" also counts the warm-up and the set-up before the "
        "loop (ours: scalar-normalisation estimate + geometric-median b_pre; SAELens: its norm-scaling estimate "
        "+ b_dec init; sparsify: none, its mean b_dec init runs inside step 0) and what runs after it (ours, "
        "Mutual-Choice and Feature-Choice: the end-of-training threshold calibration on the training rows, which "
        "the peers do not have).",
        "- Peak RSS: `ru_maxrss` of the run's process read right after training, before the held-out evaluation; "
        "in brackets the same high-water mark just before training (imports, the training rows every runner "
        "holds in memory, the model), so the difference is what training itself adds.",
        "- Held-out FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the held-out rows (float64, the "
        "held-out mean), from each framework's reconstruction in inference mode (rule in the table). With only "
        f"{s['steps']} steps no SAE is converged: FVU here checks that each framework trained sensibly, it does "
        "not rank quality. Held-out L0 is what the inference rule keeps: learned thresholds (JumpReLU) have not "
        "settled after a short run (SAELens' BatchTopK threshold starts at 0 and moves by an EMA with rate 0.01; "
        "ours is initialised from the first observed minimum and moves with beta 0.999). \"batch mode\" applies "
        "the training rule (top k*B of each held-out batch of B, or per-latent capacities) instead, which is what "
        "the training loss saw.",
        "- sparsify runs its eager CPU path (SPARSIFY_DISABLE_TRITON=1) in a loop mirroring its Trainer's step "
        "(its Trainer needs a transformers model); SAELens runs its own `SAETrainer.fit()`. What each framework "
        "keeps of its own defaults (initialisation, normalisation, aux-loss scale, gradient clipping) is listed "
        "below and in the runner docstrings (benchmarks/train_*.py).",
        "",
        "## Settings each run reported",
        "",
        *settings_lines(results),
        *GPU_SECTION.splitlines(),
        "",
    ]
    return "\n".join(lines)


GPU_SECTION = """
## On a GPU

Not yet measured: no GPU has been lent to a session so far. `make bench-gpu` (benchmarks/bench_gpu.py) is ready:
on one GPU it times our TopK at d=576 and 2304, F=16,384 to 131,072, k=32 and 64, batch 4096, fp32 and bf16,
against the GPU's GEMM rate measured in the same run (one-GEMM and dense-encoder floors), with peak GPU memory
and held-out FVU; then, in fp32, ours side by side with SAELens TopK and sparsify TopK with its Triton decoder
through make bench's own runners (each in its own process, the same rows in the same order, runs alternating), with
tokens/s, our speed-up, peak GPU memory and held-out FVU (the peers need .venv-bench installable on the GPU machine;
`--peers none` skips them). `benchmarks/step_syncs.py --device cuda` measures what per-step logging costs.
"""
"""What the report says of GPU figures until benchmarks/bench_gpu.py has run on one."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="results.json written by bench_training.py")
    parser.add_argument("--report", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--figure", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    args.report.parent.mkdir(parents=True, exist_ok=True)
    figure(results, args.figure)
    args.report.write_text(report(results, args.results, args.report, args.figure))
    print(f"[bench] wrote {args.report} and {args.figure}")


if __name__ == "__main__":
    main()
