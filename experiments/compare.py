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
import sys
from dataclasses import replace
from pathlib import Path

from experiments.comparison.plan import RUN_SPECS, plan_runs
from experiments.comparison.report import write_report
from experiments.comparison.runs import read_lr_selection, run_comparison, select_learning_rates
from experiments.training import RunConfig
from experiments.user_errors import run_user_command


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
    parser.add_argument("--device", help="where each run trains: auto, cpu, cuda or cuda:N (default: the trainer's "
                        "auto); finished runs are reused whatever device trained them")
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
            options={"device": args.device} if args.device else {},
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
