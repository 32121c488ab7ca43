"""`saewb sweep`: run a W&B-format sweep file locally or with a W&B agent."""

from __future__ import annotations

import argparse
from typing import Any

from activations.devices import DEVICE_HELP
from experiments.sweeps.runner import run_sweep

SWEEP_HELP = """\
A sweep file uses W&B's sweep YAML format:

  name: topk_k_grid                     # default output folder: runs/sweeps/<name>
  method: grid                          # grid | random | bayes
  metric: {name: fvu, goal: minimize}   # any eval.json number: fvu, l0, dead_frac, explained_variance...
  parameters:                           # RunConfig fields, or SAEConfig/TrainConfig fields
    activations: {value: runs/demo/cache}
    k: {values: [16, 32, 64]}
    lr: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-3}   # random/bayes only
  count: 4                              # random/bayes: runs to draw (or run_cap:, or --count)

Distributions: uniform, q_uniform, int_uniform, log_uniform (min/max are exponents of e),
log_uniform_values, q_log_uniform_values; {values: [...]} may add probabilities: [...].

Online (an API key in $WANDB_API_KEY or from `wandb login`): the sweep is created on W&B and an
agent in this process trains the runs its controller picks (bayes needs this). Offline (no key),
or with --local / --no-wandb: the runs are expanded here (grid: every combination, in order;
random: seeded samples; bayes falls back to random), each logged to an offline W&B run under
./wandb (upload later with `wandb sync`) unless --no-wandb.

Each run trains into <out>/<run name>, named by its varying parameters (e.g. k=32). Results go to
<out>/sweep_results.json (after every run) and a table sorted by the metric. Rerunning the same
command skips runs whose folder already holds eval.json, so an interrupted sweep resumes. Exit
status 1 when some run failed (a diverging lr, a bad option); the others still finish.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `saewb sweep FILE [--count N] [--out DIR] [--no-wandb] [--local] [--shared-stream]`."""
    parser = subparsers.add_parser(
        "sweep",
        help="train a grid/random/bayes sweep of SAEs from a W&B sweep YAML file",
        description="Train one SAE per parameter set of a sweep file and rank them by its metric.",
        epilog=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", metavar="FILE", help="sweep YAML file, e.g. experiments/sweeps/topk_k_grid.yaml")
    parser.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="runs to train: random/bayes samples, or the first N of a grid "
        "(default: the file's count/run_cap; a grid runs whole)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the run folders and sweep_results.json "
        "(default: the file's out_root, else runs/sweeps/<name>)",
    )
    parser.add_argument("--no-wandb", action="store_true", help="no W&B logging at all; runs the sweep locally")
    parser.add_argument(
        "--local",
        action="store_true",
        help="expand the sweep here even with an API key (runs still log to W&B, online)",
    )
    parser.add_argument(
        "--shared-stream",
        action="store_true",
        help="locally, train runs that read the same batches (same activations, hook, batch_size, "
        "total_tokens, seed) together on one pass over the cache",
    )
    parser.add_argument(
        "--sample-seed",
        type=int,
        default=0,
        metavar="S",
        help="seed for drawing random/bayes runs locally (default: 0; keep it to resume)",
    )
    parser.add_argument("--device", help=f"where every run trains, overriding the file: {DEVICE_HELP} "
                        "(default: the file's device, else auto)")
    parser.set_defaults(func=cmd_sweep)
    return parser


def cmd_sweep(args: argparse.Namespace) -> int:
    results = run_sweep(
        args.file,
        count=args.count,
        out_root=args.out,
        wandb=not args.no_wandb,
        local=args.local,
        shared_stream=args.shared_stream,
        seed=args.sample_seed,
        device=args.device,
    )
    return 1 if any(entry["status"] == "failed" for entry in results) else 0
